"""Shared test set-up: fixed seeds and a fixed thread count, so runs are reproducible and fast on CI's 2 cores."""
import os
import random
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny import make_snapshot  # noqa: E402  (tests/tiny.py, after the path set-up)

torch.set_num_threads(1)  # the test models are tiny: one thread is fastest and deterministic


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """snapshots(family) -> the folder of a tiny random snapshot of that family (tiny.FAMILIES), made once per module."""
    made = {}

    def get(family):
        if family not in made:
            made[family] = make_snapshot(str(tmp_path_factory.mktemp(family.replace(".", "_"))), family)
        return made[family]
    return get
