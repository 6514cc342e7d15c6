"""Benchmark: one training step of the demo's transformer (train_tiny.py's recipe: batch 32, v-loss, AdamW, bf16
autocast where the CPU has bf16 units), ours (model.py) vs diffusers' CogVideoXTransformer3DModel, same weights and
batches.

Why: the recipe's 28,000 transformer steps are most of `python train_tiny.py`'s time (README, the demo model), so
this is the number that decides whether the recipe fits a time budget. Variants of ours: PyTorch's math attention
kernel instead of the fused CPU one (64 tokens a clip: the fused kernel's backward is slow at that length), and
torch.compile (needs a C++ compiler). Each step is timed `--steps` times after warm-up, implementations alternating;
the table gives the median, the ratio to the peer, GFLOP/s (torch.utils.flop_counter on one step of ours) and the
process's peak RSS growth.

    python bench/train_step.py                 # 1 and 2 threads
    python bench/train_step.py --threads 2 --steps 20 --compile
"""
import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cli  # noqa: E402
import model as M  # noqa: E402
import train_tiny  # noqa: E402
from sampler import PRESETS as SCHEDULERS, add_noise, v_target  # noqa: E402
from transformer import peer_rope, status_kb  # noqa: E402  (bench/transformer.py, beside this file)


def make_step(net, call, bf16, attention):
    """One optimizer step of train_tiny.train_transformer on a given batch: forward under autocast, v-loss, backward,
    clipping, AdamW."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.01)
    schedule = SCHEDULERS["cogvideox-5b"]

    def step(x0, text, t, noise):
        kernel = sdpa_kernel(SDPBackend.MATH) if attention == "math" else contextlib.nullcontext()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), kernel:
            v = call(add_noise(schedule, x0, noise, t), text, t)
        loss = F.mse_loss(v.float(), v_target(schedule, x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    return step


def batches(n, cfg, tcfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1
    for _ in range(n):
        x0 = torch.randn(tcfg.dit_batch, frames, cfg.in_channels, cfg.sample_height, cfg.sample_width, generator=g)
        yield (x0, torch.randn(tcfg.dit_batch, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g),  # (B, L, D)
               torch.randint(0, 1000, (tcfg.dit_batch,), generator=g), torch.randn(x0.shape, generator=g))


def run(threads, args):
    from diffusers import CogVideoXTransformer3DModel
    from torch.utils.flop_counter import FlopCounterMode
    torch.set_num_threads(threads)
    tcfg = train_tiny.TrainConfig()
    cfg = train_tiny.transformer_config(tcfg, tcfg.t5_width)
    bf16 = train_tiny.fast_bf16(torch.device("cpu"))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        peer = CogVideoXTransformer3DModel(**dataclasses.asdict(cfg))
        peer.save_pretrained(tmp)
        ours = {name: M.load_transformer(tmp).train().requires_grad_(True) for name in ("ours", "ours, math attention")}
        if args.compile:
            ours["ours, compiled"] = M.load_transformer(tmp).train().requires_grad_(True)
    peer.train()
    rope = peer_rope(peer, next(batches(1, cfg, tcfg))[0])
    steps = {"diffusers": make_step(peer, lambda x, c, t: peer(x, c, t, image_rotary_emb=rope, return_dict=False)[0],
                                    bf16, "default")}
    for name, net in ours.items():
        call = torch.compile(net) if "compiled" in name else net
        steps[name] = make_step(net, call, bf16, "math" if "math" in name else "default")
    with FlopCounterMode(display=False) as counter:
        steps["ours"](*next(batches(1, cfg, tcfg, seed=99)))
    flops = counter.get_total_flops()
    data = list(batches(args.warmup + args.steps, cfg, tcfg))
    times = {k: [] for k in steps}
    rss0 = status_kb("VmHWM") / 1024
    for i, batch in enumerate(data):
        for k in (list(steps) if i % 2 == 0 else list(steps)[::-1]):  # alternate: load from other jobs hits all
            t0 = time.perf_counter()
            steps[k](*batch)
            if i >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    base, grew = statistics.median(times["diffusers"]), status_kb("VmHWM") / 1024 - rss0
    print(f"\n{threads} thread(s), batch {tcfg.dit_batch}, {'bf16 autocast' if bf16 else 'fp32'}, "
          f"{flops / 1e9:.1f} GFLOP a step, median of {args.steps} steps; peak RSS grew {grew:.0f} MB")
    print("| | ms / step | vs diffusers | GFLOP/s | 28,000 steps |\n|---|---:|---:|---:|---:|")
    for k, ts in times.items():
        s = statistics.median(ts)
        print(f"| {k} | {s * 1000:.0f} | {s / base:.2f}x | {flops / s / 1e9:.0f} | {s * 28000 / 60:.0f} min |")


def main():
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=cli.positive_int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=cli.positive_int, default=20, help="timed steps per implementation")
    p.add_argument("--warmup", type=cli.nonnegative_int, default=5)
    p.add_argument("--compile", action="store_true", help="also ours under torch.compile (needs a C++ compiler)")
    args = p.parse_args()
    for threads in args.threads:
        run(threads, args)


if __name__ == "__main__":
    main()
