"""Reading the official Hugging Face checkpoint layout: config.json and (sharded) safetensors.

Every component folder of a CogVideoX snapshot (`transformer/`, `vae/`, `text_encoder/`) holds a
`config.json` and either one `<name>.safetensors` or shards `<name>-0000k-of-0000n.safetensors`
listed in `<name>.safetensors.index.json`. All loaders in this project go through `load_weights`,
which is strict: the checkpoint must hold exactly the model's keys with exactly its shapes, and
every error names the offending key and file.

Models are built on the meta device (no memory, no random init), then the tensors read from disk
are assigned in place of the meta parameters, so a model never exists twice in RAM.
"""
import dataclasses
import json
import os
from typing import Callable

import torch
import torch.nn as nn
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded; the message says what and where."""


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"missing file: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def config_from_dict(cls, d: dict):
    """Build the dataclass `cls` from a config.json dict: keys starting with '_' (`_class_name`,
    `_diffusers_version`) and keys the dataclass does not know are ignored; lists become tuples."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
    return cls(**kw)


def weight_files(folder: str, name: str) -> list[str]:
    """The safetensors files of one component: `<name>.safetensors`, or the shards named by
    `<name>.safetensors.index.json`. Missing files are errors that name them."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    single = os.path.join(folder, f"{name}.safetensors")
    index = single + ".index.json"
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = [os.path.join(folder, f) for f in sorted(set(weight_map.values()))]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise CheckpointError(f"shard listed in {index} is missing: {missing[0]}")
        return files
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(f"no weights in {folder}: expected {name}.safetensors or {name}.safetensors.index.json")


def read_tensors(files: list[str], device="cpu", dtype: torch.dtype | None = None,
                 rename: Callable[[str], str] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the given safetensors files, floating ones cast to `dtype`. Each tensor is read
    straight from the memory-mapped file to `device`; a key present in two files is an error."""
    out, origin = {}, {}
    for path in files:
        try:
            f = safe_open(path, framework="pt", device=str(device))
        except Exception as e:  # safetensors raises its own types for truncated or foreign files
            raise CheckpointError(f"cannot read {path}: {e} (truncated or not a safetensors file?)") from None
        with f:
            for key in f.keys():
                name = rename(key) if rename else key
                if name in out:
                    raise CheckpointError(f"key {key!r} appears in both {origin[name]} and {path}")
                try:
                    t = f.get_tensor(key)
                except Exception as e:
                    raise CheckpointError(f"cannot read tensor {key!r} from {path}: {e}") from None
                if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                    t = t.to(dtype)
                out[name], origin[name] = t, path
    return out


def load_weights(model: nn.Module, folder: str, name: str, dtype=torch.float32, device="cpu",
                 rename: Callable[[str], str] | None = None) -> nn.Module:
    """Assign the weights in `folder` to `model` (usually built on the meta device). Strict: a missing
    key, an unexpected key or a shape mismatch raises CheckpointError naming the key and file."""
    files = weight_files(folder, name)
    sd = read_tensors(files, device=device, dtype=dtype, rename=rename)
    where = files[0] if len(files) == 1 else os.path.join(folder, f"{name}.safetensors.index.json")
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"key {missing[0]!r}{more} missing from {where}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"unexpected key {unexpected[0]!r}{more} in {where}: does the config match the weights?")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"shape of {k!r} in {where} is {tuple(sd[k].shape)}, the model expects {tuple(v.shape)}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)
