"""Weight-only int8 for the transformer (`--quantize int8`): its linear weights in about half the memory of bf16.

Modelled on gpt-fast's quantize.py (WeightOnlyInt8Linear): int8 weights with one scale per output channel, symmetric
(here absmax / 127, no zero point); activations stay as they are. It saves memory, not time: each layer turns its
weight back into the activation dtype when it runs, so only one layer's full-precision weight is ever live, and the
matmul is the usual one. The frames move by about the size of bf16's own rounding (tests/test_generate.py measures it).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Int8Linear(nn.Module):
    """A Linear whose weight is stored as int8 with one scale per output channel; the bias stays as it was."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0                   # (out,)
        self.register_buffer("weight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None], self.bias)


def quantize_int8(module: nn.Module) -> nn.Module:
    """Replace every nn.Linear inside `module` by an Int8Linear, in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
        else:
            quantize_int8(child)
    return module
