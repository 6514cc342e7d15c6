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


def _peer_verbosity():
    """{library: its logging level} for the peers (diffusers, transformers) imported so far."""
    levels = {}
    for name in ("diffusers", "transformers"):
        if name in sys.modules:
            levels[name] = __import__(f"{name}.utils.logging", fromlist=["get_verbosity"]).get_verbosity()
    return levels


@pytest.fixture(autouse=True)
def _restore_process_state():
    """Whatever a test changes process-wide is put back afterwards, so that no test's verdict depends on the tests run
    before it (issue #38): torch's thread count (train_tiny.main, evaluate.main and tour.main set it from --threads,
    default 2), the environment, the working directory, torch's default dtype and grad mode, and the peers' logging
    level (tests silence diffusers where they call it). The global RNGs are seeded before each test (_seed)."""
    threads, env, cwd = torch.get_num_threads(), dict(os.environ), os.getcwd()
    dtype, grad, verbosity = torch.get_default_dtype(), torch.is_grad_enabled(), _peer_verbosity()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if dict(os.environ) != env:
        os.environ.clear()
        os.environ.update(env)
    if os.getcwd() != cwd:
        os.chdir(cwd)
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)
    for name in _peer_verbosity():  # a peer imported during the test goes back to its default level
        logging = sys.modules[f"{name}.utils.logging"]
        logging.set_verbosity(verbosity.get(name, logging._get_default_logging_level()))


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches (per code object, with a recompile limit) emptied before and after a test that compiles,
    so that what it compiles and counts does not depend on what other tests compiled."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """snapshots(family) -> the folder of a tiny random snapshot of that family (tiny.FAMILIES), made once per module."""
    made = {}

    def get(family):
        if family not in made:
            made[family] = make_snapshot(str(tmp_path_factory.mktemp(family.replace(".", "_"))), family)
        return made[family]
    return get
