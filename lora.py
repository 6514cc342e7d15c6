"""LoRA (Hu et al. 2021) for the CogVideoX transformer in plain PyTorch: W x + s·B(A x), s = scale·alpha/rank, on the
attention projections to_q, to_k, to_v and to_out.0 of every block (what all official CogVideoX fine-tunes target).

    model = load_transformer(snapshot)
    add_lora(model, rank=128, alpha=64)                # training: A random, B zero, only A and B train
    save_lora("out/pytorch_lora_weights.safetensors", lora_state_dict(model), rank=128, alpha=64)
    load_lora(model, "out", scale=1.0)                 # generation: merged into W, no cost per step

The file is the one diffusers' CogVideoX pipelines read with `pipe.load_lora_weights(folder)`:
`pytorch_lora_weights.safetensors`, keys `transformer.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r),
and the safetensors header entry `lora_adapter_metadata`: a JSON LoraConfig with `transformer.`-prefixed keys. With
that entry diffusers scales by lora_alpha/r; WITHOUT it, it takes alpha = rank, scale 1. Files in diffusers' older key
layout (`.lora.down.weight` / `.lora.up.weight`) are read too, renamed as diffusers renames them (peft_key). Who writes
what:
  - this project: metadata with the alpha it trained at, so loading anywhere gives the training scale;
  - diffusers `examples/cogvideo/train_cogvideox_lora.py`: no metadata, trained at alpha = rank (128/128): scale 1,
    which is what a missing alpha gives, so nothing to do;
  - THUDM `CogVideo/finetune` (rank 128, lora_alpha 64): no metadata, trained at 0.5: pass --lora-scale 0.5;
  - THUDM SAT export (`tools/export_sat_lora_weight.py`, alpha 1, rank 128 or 256): pass --lora-scale 1/rank;
    `convert.py lora` records SAT's alpha instead, so its files need no scale.
The applied factor is lora_scale·alpha/r, the product diffusers computes for `set_adapters([name], [lora_scale])`.

Legend: r rank, in/out the features of the wrapped Linear.
"""
import json
import math
import os

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoint import CheckpointError

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PREFIX = "transformer."          # diffusers' pipeline-level prefix for transformer LoRA keys
METADATA_KEY = "lora_adapter_metadata"


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. A starts as nn.Linear's default (Kaiming-uniform) and B as
    zero, as peft's `init_lora_weights=True`, so training starts from the base model exactly. A and B are fp32
    whatever the base dtype (the master weights of training); the input is cast to fp32 and the update back, as peft."""

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        super().__init__()
        self.base, self.scale = base, scale
        kw = dict(bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(base.in_features, rank, **kw)  # (r, in)
        self.lora_B = nn.Linear(rank, base.out_features, **kw)  # (out, r)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        y = self.base(x)
        return y + (self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scale).to(y.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base Linear with W + s·B·A folded in (computed in fp32, stored in W's dtype)."""
        w = self.base.weight
        delta = self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())  # (out, in)
        w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
        return self.base


def target_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Module path -> Linear for every attention projection, e.g. 'transformer_blocks.0.attn1.to_out.0'."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in TARGETS)}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def add_lora(model: nn.Module, rank: int, alpha: float) -> list[nn.Parameter]:
    """Wrap every target projection in a LoRALinear (scale alpha/rank); freeze everything else. Returns the trainable
    parameters. A is drawn from the global torch RNG: seed it first for a reproducible start."""
    if rank < 1 or alpha <= 0:
        raise ValueError(f"LoRA rank must be >= 1 and alpha > 0, got rank={rank}, alpha={alpha}")
    model.requires_grad_(False)
    targets = target_modules(model)
    if not targets:
        raise ValueError(f"the model has no {'/'.join(TARGETS)} Linear layers to put a LoRA on")
    for name, linear in targets.items():
        _replace(model, name, LoRALinear(linear, rank, alpha / rank))
    return [p for n, p in model.named_parameters() if ".lora_" in n]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The A and B weights of a model with LoRALinear layers, under the file's key names."""
    return {PREFIX + k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if ".lora_" in k}


def set_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy A and B weights (file key names) into a model that already has its LoRALinear layers (resume)."""
    own = {k.removeprefix(PREFIX): v for k, v in state.items()}
    expected = {k for k in model.state_dict() if ".lora_" in k}
    if set(own) != expected:
        bad = sorted(set(own) ^ expected)[0]
        raise CheckpointError(f"LoRA key {bad!r} is in one of the checkpoint and the model but not the other: "
                              f"was it trained with another rank or model?")
    model.load_state_dict(own, strict=False)


def lora_metadata(rank: int, alpha: float) -> dict:
    """The LoraConfig fields diffusers rebuilds the adapter from (keys unprefixed here)."""
    return {"r": rank, "lora_alpha": alpha, "target_modules": list(TARGETS), "lora_dropout": 0.0, "bias": "none",
            "use_dora": False, "use_rslora": False, "init_lora_weights": True}


def save_lora(path: str, state: dict[str, torch.Tensor], rank: int, alpha: float) -> None:
    """Write a LoRA file (see the module docstring); `state` has the file's key names (lora_state_dict)."""
    meta = {PREFIX + k: v for k, v in lora_metadata(rank, alpha).items()}
    save_file(state, path, metadata={"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)})


def lora_file(path: str) -> str:
    """A LoRA file, or a folder holding pytorch_lora_weights.safetensors (what the trainers write)."""
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHT_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"LoRA file not found: {path}")
    return path


def peft_key(key: str) -> str:
    """The PEFT name (`<module>.lora_A.weight` / `.lora_B.weight`) of a key in diffusers' older LoRA layouts, renamed
    as diffusers' own `load_lora_weights` renames them for CogVideoX (`loaders/peft.py: load_lora_adapter` calls
    `utils/state_dict_utils.py: convert_unet_state_dict_to_peft` on files without lora_A keys), so such files keep
    loading here as they do there:
      - `<module>.lora.down.weight` / `.lora.up.weight`: what `convert_state_dict_to_diffusers` writes, which diffusers'
        training scripts ran before saving, so many LoRAs on the Hub have these keys;
      - `<attn>.processor.to_q_lora.down.weight` (to_k, to_v; `to_out_lora` is to_out.0): the attention-processor
        layout from before diffusers used PEFT.
    A PEFT key, or any other, comes back unchanged (and is refused by read_lora if it is no LoRA weight)."""
    key = key.replace(".processor.", ".")
    for proj, module in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
        key = key.replace(f".{proj}_lora.", f".{module}.lora.")
    return key.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")


def read_lora(path: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict | None]:
    """-> ({module path: (A (r, in), B (out, r))}, LoraConfig metadata with the prefix removed, or None)."""
    path = lora_file(path)
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"cannot read LoRA file {path}: {e}") from None
    meta = json.loads(header[METADATA_KEY]) if header.get(METADATA_KEY) else None
    if meta is not None:
        meta = {k.removeprefix(PREFIX): v for k, v in meta.items() if k.startswith(PREFIX)} or None
    pairs = {}
    for key, t in tensors.items():
        if "dora_scale" in key:  # DoRA magnitudes: dropped, as diffusers drops them
            continue
        name, _, kind = peft_key(key.removeprefix(PREFIX)).rpartition(".lora_")
        if kind not in ("A.weight", "B.weight") or t.ndim != 2:
            raise CheckpointError(f"{path}: key {key!r} is not a LoRA weight in a layout diffusers reads "
                                  f"(<module>.lora_A.weight / .lora_B.weight, or the older .lora.down.weight / "
                                  f".lora.up.weight); convert the file to one of those first")
        pairs.setdefault(name, {})[kind[0]] = t
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]:
            raise CheckpointError(f"{path}: module {name!r} needs lora_A (r, in) and lora_B (out, r) with the same r")
    if not pairs:
        raise CheckpointError(f"{path} holds no LoRA weights")
    return {n: (ab["A"], ab["B"]) for n, ab in pairs.items()}, meta


def lora_scales(pairs: dict, meta: dict | None, path: str) -> dict[str, float]:
    """alpha/r per module, as diffusers derives it: from the metadata when present, else alpha = rank (1.0)."""
    if meta is None:
        return {name: 1.0 for name in pairs}
    if meta.get("use_dora"):
        raise CheckpointError(f"{path}: DoRA adapters are not supported")
    if meta.get("rank_pattern") or meta.get("alpha_pattern"):
        raise CheckpointError(f"{path}: per-module rank_pattern/alpha_pattern metadata is not supported")
    r, alpha = int(meta["r"]), float(meta.get("lora_alpha", 8))  # 8: peft's LoraConfig default
    for name, (A, _) in pairs.items():
        if A.shape[0] != r:
            raise CheckpointError(f"{path}: module {name!r} has rank {A.shape[0]} but the metadata says r={r}")
    s = alpha / (math.sqrt(r) if meta.get("use_rslora") else r)
    return {name: s for name in pairs}


def check_lora(model: nn.Module, path: str) -> tuple[dict, dict | None, dict[str, float]]:
    """Read a LoRA file and check it fits `model` (which may live on the meta device: only names and shapes are
    looked at, so the CLI can refuse a wrong file before any model weight is read). -> (pairs, metadata, scales)."""
    pairs, meta = read_lora(path)
    scales = lora_scales(pairs, meta, path)
    modules = dict(model.named_modules())
    for name, (A, B) in pairs.items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{lora_file(path)}: LoRA key {name!r} names no Linear layer of this model: is it a "
                                  f"LoRA for another model?")
        if (A.shape[1], B.shape[0]) != (linear.in_features, linear.out_features):
            raise CheckpointError(f"{lora_file(path)}: LoRA for {name!r} is {B.shape[0]}x{A.shape[1]}, the layer is "
                                  f"{linear.out_features}x{linear.in_features}: made for another model size?")
    return pairs, meta, scales


@torch.no_grad()
def load_lora(model: nn.Module, path: str, scale: float = 1.0, fuse: bool = True) -> str:
    """Apply a LoRA file to `model` (our CogVideoXTransformer). fuse=True folds s·B·A into each W (no run-time cost);
    fuse=False wraps the layers instead (the weights then stay exactly the base ones). Returns a one-line summary."""
    pairs, meta, scales = check_lora(model, path)
    modules = dict(model.named_modules())
    for name, (A, B) in pairs.items():
        wrapped = LoRALinear(modules[name], A.shape[0], scale * scales[name])
        wrapped.lora_A.weight.copy_(A)
        wrapped.lora_B.weight.copy_(B)
        _replace(model, name, wrapped.merged() if fuse else wrapped.requires_grad_(False))
    ranks = sorted({A.shape[0] for A, _ in pairs.values()})
    how = (f"alpha {meta['lora_alpha']} recorded" if meta else "no alpha recorded: alpha = rank as diffusers reads it "
           "(THUDM finetune LoRAs need --lora-scale 0.5, SAT exports 1/rank)")
    return (f"LoRA {lora_file(path)}: {len(pairs)} layers, rank {'/'.join(map(str, ranks))}, {how}; "
            f"applied at {scale:g} x {sorted(set(scales.values()))[0]:g}")
