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
import math
import mmap
import os
from typing import Callable

import torch
import torch.nn as nn
from safetensors.torch import save_file


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


def component_folder(path: str, name: str) -> str:
    """Every loader takes either a snapshot root or the component folder itself: `path/name` if it exists, else
    `path`."""
    sub = os.path.join(path, name)
    return sub if os.path.isdir(sub) else path


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


# safetensors dtype names (the header's "dtype" field) and their torch types
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def open_safetensors(path: str) -> tuple[dict, mmap.mmap, int]:
    """(header, file mapping, byte where the data starts). The format is an 8-byte little-endian header length,
    a JSON header {key: {dtype, shape, data_offsets: [begin, end]}} and the raw data. The file is mapped
    copy-on-write: tensors that view it are writable and never write back."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        for key, info in header.items():
            if info["dtype"] not in DTYPES:
                raise ValueError(f"tensor {key!r} has dtype {info['dtype']}, which this loader does not read")
            begin, end = info["data_offsets"]
            nbytes = math.prod(info["shape"]) * DTYPES[info["dtype"]].itemsize
            if end - begin != nbytes or not 0 <= begin <= end <= size - 8 - n:
                raise ValueError(f"tensor {key!r} at bytes {begin}..{end} does not fit the {size}-byte file")
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: {e} (truncated or not a safetensors file?)") from None
    return header, mapping, 8 + n


def read_tensors(files: list[str], device="cpu", dtype: torch.dtype | None = None,
                 rename: Callable[[str], str] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the given safetensors files, floating ones cast to `dtype`, on `device`.
    A tensor already in the right dtype on the CPU is a view of the memory-mapped file: no copy, its pages are
    read from disk (or the page cache) on first use and count once. Any other tensor is cast or moved from the
    mapping in one copy, and the pages it came from are released at once, so peak memory is the result plus
    one tensor, not the result plus the file. A key present in two files is an error."""
    out, origin = {}, {}
    device = torch.device(device)
    for path in files:
        header, mapping, start = open_safetensors(path)
        for key, info in header.items():
            name = rename(key) if rename else key
            if name in out:
                raise CheckpointError(f"key {key!r} appears in both {origin[name]} and {path}")
            (begin, end), shape, src = info["data_offsets"], info["shape"], DTYPES[info["dtype"]]
            if begin == end:  # torch.frombuffer refuses empty views
                t = torch.empty(shape, dtype=src)
            else:
                t = torch.frombuffer(mapping, dtype=src, count=math.prod(shape), offset=start + begin).view(shape)
            target = dtype if dtype is not None and src.is_floating_point else src
            if target != src or device.type != "cpu":
                t = t.to(device, target, copy=True)
                if hasattr(mapping, "madvise"):  # drop the source pages from RAM (Linux, macOS)
                    page = start + begin - (start + begin) % mmap.PAGESIZE
                    mapping.madvise(mmap.MADV_DONTNEED, page, start + end - page)
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


# ----------------------------------------------------------------------------------------------------------------------
# Writing: the mirror of the reading above


def write_json(path: str, d: dict) -> None:
    """As diffusers and transformers write their configs: indented, keys sorted, a final newline."""
    with open(path, "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
        f.write("\n")


def save_component(sd: dict[str, torch.Tensor], config: dict, folder: str, name: str = "diffusion_pytorch_model",
                   max_shard_bytes: float = math.inf) -> None:
    """A new component folder that `load_weights` reads back: config.json and the weights, one `<name>.safetensors`,
    or numbered shards and their index once the tensors pass max_shard_bytes."""
    os.makedirs(folder)
    write_json(os.path.join(folder, "config.json"), config)
    shards, size = [{}], 0
    for k in sorted(sd):
        if shards[-1] and size + sd[k].nbytes > max_shard_bytes:
            shards, size = shards + [{}], 0
        shards[-1][k], size = sd[k].contiguous(), size + sd[k].nbytes
    if len(shards) == 1:
        return save_file(shards[0], os.path.join(folder, f"{name}.safetensors"), metadata={"format": "pt"})
    files = [f"{name}-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)]
    for file, shard in zip(files, shards):
        save_file(shard, os.path.join(folder, file), metadata={"format": "pt"})
    write_json(os.path.join(folder, f"{name}.safetensors.index.json"),
               {"metadata": {"total_size": sum(t.nbytes for t in sd.values())},
                "weight_map": {k: file for file, shard in zip(files, shards) for k in shard}})
