"""What full fine-tuning (`train_lora.py --full`) holds in memory: measured on the demo model, computed for the
released ones.

    python bench/full_memory.py                    # demo/shapes-tiny, 3 training steps on the CPU, ~10 s

Measured: the bytes of every parameter, gradient and AdamW state tensor after real training steps (train_lora's own
unfreeze, AdamW settings and diffusion_loss, gradient checkpointing on), against 16 bytes per trainable parameter
(fp32 weight 4 + gradient 4 + AdamW exp_avg 4 + exp_avg_sq 4); and the process's peak RSS before and after, whose
growth adds the activations and the allocator's slack. Computed: the same 16 bytes per parameter for each released
transformer, its parameters counted on the meta device from model.PRESETS (exact, no download), with the usual
lower-precision variants beside it. Activations are not in those numbers: with gradient checkpointing they are one
block's recompute plus each block's input, small next to the states at 49 x 480 x 720 (see the README).
"""
import os
import resource
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train_lora  # noqa: E402
from model import PRESETS, CogVideoXTransformer, load_transformer  # noqa: E402
from pipeline import read_model_info  # noqa: E402

GIB = 2 ** 30
# bytes per trainable parameter: (weights, gradients, optimizer states, what it is)
VARIANTS = [
    (4, 4, 8, "fp32 weights, fp32 grads, fp32 AdamW (train_lora --full)"),
    (4 + 2, 2, 8, "bf16 compute copy + fp32 master, bf16 grads, fp32 AdamW (classic mixed precision)"),
    (2, 2, 8, "bf16 weights and grads, fp32 AdamW (no master copy: small updates round away)"),
    (2, 2, 4, "bf16 weights, grads and AdamW states"),
    (2, 2, 2, "bf16 weights and grads, 8-bit AdamW (bitsandbytes)"),
]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def state_bytes(params, optimizer) -> dict:
    """Bytes held by the trainable parameters, their gradients and the optimizer's per-parameter tensors."""
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0]
    return {"params": sum(p.nbytes for p in params), "grads": sum(p.grad.nbytes for p in params if p.grad is not None),
            "adamw": sum(t.nbytes for t in states)}


def measure(snapshot: str, steps: int = 3) -> dict:
    """A few --full steps on random latents at the model's own size, as train_lora's loop runs them."""
    info = read_model_info(snapshot)
    model = load_transformer(os.path.join(snapshot, "transformer"), dtype=torch.float32, config=info.transformer)
    before = peak_rss()
    params = train_lora.unfreeze(model, [])
    model.gradient_checkpointing = True
    optimizer = torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4)
    cfg, g = info.transformer, torch.Generator().manual_seed(0)
    frames = (info.num_frames - 1) // info.temporal_compression + 1
    shape = (1, frames, cfg.out_channels, cfg.sample_height, cfg.sample_width)        # (B, F, C, H, W)
    for _ in range(steps):
        x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        text = torch.randn(1, info.max_text_seq_length, cfg.text_embed_dim, generator=g)
        t = torch.randint(0, 1000, (1,), generator=g)
        loss = train_lora.diffusion_loss(model, info.scheduler, x0, text, t, noise, torch.float32)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the grads: they are part of what a step holds
    n = sum(p.numel() for p in params)
    return {"n": n, **state_bytes(params, optimizer), "rss_before": before, "rss_after": peak_rss()}


def released() -> list[tuple[str, int]]:
    with torch.device("meta"):
        return [(name, sum(p.numel() for p in CogVideoXTransformer(cfg).parameters())) for name, cfg in PRESETS.items()]


def main() -> None:
    torch.set_num_threads(1)
    m = measure(os.path.join(ROOT, "demo", "shapes-tiny"))
    total = m["params"] + m["grads"] + m["adamw"]
    before, after = m["rss_before"] / 2 ** 20, m["rss_after"] / 2 ** 20
    print(f"demo/shapes-tiny: {m['n']:,} trainable parameters; params {m['params']:,} B + grads {m['grads']:,} B + "
          f"AdamW {m['adamw']:,} B = {total:,} B = {total / m['n']:.2f} B/param; peak RSS {before:.0f} MiB after "
          f"loading -> {after:.0f} MiB after 3 steps (+{after - before:.0f} MiB)")
    print()
    names = released()
    print("| bytes/param | " + " | ".join(n for n, _ in names) + " | variant |")
    print("|---:|" + "---:|" * len(names) + "---|")
    print("| parameters | " + " | ".join(f"{n / 1e9:.3f} B" for _, n in names) + " | |")
    for w, gr, opt, what in VARIANTS:
        b = w + gr + opt
        print(f"| {b} | " + " | ".join(f"{n * b / GIB:.1f} GiB" for _, n in names) + f" | {what} |")


if __name__ == "__main__":
    main()
