"""Benchmark: every sampler of sampler.SAMPLERS (and dpm++2m with Karras spacing) at 5, 10, 20 and 50 steps on the
shapes demo model: held-out colour / shape / motion accuracy from pixels (shapes.evaluate), seconds per video, and how
far each sampler's videos are from DDIM's with the same seeds.

Every held-out prompt of shapes.split() gets `--per-combo` videos (one generate() call, seed = prompt index, as
evaluate.py draws them; n = 84 at 3 per prompt), guidance 6. Seconds are the wall time of those generate() calls
(text encoder, denoising, VAE decode) divided by the number of videos, on `--threads` CPU threads; "x DDIM" is that
time over DDIM's at the same step count (all samplers cost one network evaluation per step, so ~1 up to timing noise).
"|px - DDIM|" and "|px - DDPM|" are the mean absolute pixel differences (0-255) from the DDIM / DDPM videos of the
same prompts and seeds (Euler is DDIM and Euler ancestral is DDPM on the latents, up to the zero-SNR clamp).

    python bench/samplers.py                              # ~40 min on one thread of a busy 2-core VM
    python bench/samplers.py --steps 20 --samplers ddim euler --per-combo 1
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import generate as G  # noqa: E402
import shapes  # noqa: E402
from sampler import KARRAS, SAMPLERS, make_sampler  # noqa: E402


def run(pipe, captions, name, karras, steps, per_combo, guidance):
    """Videos (n, F, H, W, 3) uint8 for every caption, and the wall seconds of the generate calls."""
    max_len = pipe.transformer.config.max_text_seq_length
    videos, seconds = [], 0.0
    for i, c in enumerate(captions):
        t0 = time.perf_counter()
        frames = G.generate(pipe, c, num_videos=per_combo, num_inference_steps=steps, guidance_scale=guidance,
                            sampler=name, karras=karras, seed=i, max_sequence_length=max_len,
                            progress=False)                                              # (n, F, 3, H, W)
        seconds += time.perf_counter() - t0
        videos.append(shapes.from_tensor(frames * 2 - 1))                                   # (n, F, H, W, 3)
    return np.concatenate(videos), seconds


def step_overhead(pipe, per_combo, specs, repeats=200):
    """Milliseconds of sampler arithmetic per step (sampler.step on random latents of the demo's shape), without the
    network: what the samplers could cost beyond their one network evaluation per step."""
    info = pipe.info
    shape = (per_combo, (info.num_frames - 1) // info.temporal_compression + 1, pipe.transformer.config.out_channels,
             info.height // info.spatial_compression, info.width // info.spatial_compression)
    out, x, ms = torch.randn(shape), torch.randn(shape), {}
    for spec in specs:
        name, karras = spec.removesuffix("+karras"), spec.endswith("+karras")
        sampler, g = make_sampler(name, pipe.scheduler, 50, karras=karras), torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for r in range(repeats):
            sampler.step(out, r % 49, x, g)
        ms[spec] = 1000 * (time.perf_counter() - t0) / repeats
    return ms


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=G.DEMO_MODEL)
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS) + [f"{k}+karras" for k in KARRAS],
                   help="names from sampler.SAMPLERS; NAME+karras for Karras spacing")
    p.add_argument("--steps", nargs="+", type=int, default=[5, 10, 20, 50])
    p.add_argument("--per-combo", type=int, default=3, help="videos per held-out prompt")
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = G.load_pipeline(args.model)
    captions = [shapes.caption(a) for a in shapes.split()[1]]
    labels = [c for c in captions for _ in range(args.per_combo)]
    run(pipe, captions[:2], "ddim", False, 2, args.per_combo, args.guidance)     # warm-up, not timed
    order = {"ddim": 0, "ddpm": 1}                                  # the references first
    samplers = sorted(args.samplers, key=lambda s: order.get(s, 2))
    rows = []
    for steps in args.steps:
        ref = {}
        for spec in samplers:
            name, karras = spec.removesuffix("+karras"), spec.endswith("+karras")
            videos, seconds = run(pipe, captions, name, karras, steps, args.per_combo, args.guidance)
            acc = shapes.evaluate(videos, labels)
            if spec in order:
                ref[spec] = videos, seconds
            diff = {k: np.abs(videos.astype(np.float32) - v[0]).mean() for k, v in ref.items()}
            ratio = seconds / ref["ddim"][1] if "ddim" in ref else float("nan")
            rows.append((spec, steps, acc, seconds / len(labels), ratio, diff))
            print(f"  {spec} {steps} steps: colour {acc['colour']:.3f} shape {acc['shape']:.3f} motion "
                  f"{acc['motion']:.3f}, {seconds / len(labels):.2f} s/video", file=sys.stderr)
    print(f"{args.model}: held-out prompts, {args.per_combo} video(s) each, guidance {args.guidance}, "
          f"{args.threads} thread(s)")
    print("| sampler | steps | n | colour | shape | motion | all | s/video | x DDIM | "
          "\\|px - DDIM\\| | \\|px - DDPM\\| |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for spec, steps, acc, spv, ratio, diff in sorted(rows, key=lambda r: (samplers.index(r[0]), r[1])):
        d = " | ".join(f"{diff[k]:.2f}" if k in diff else "-" for k in order)
        print(f"| {spec} | {steps} | {acc['n']} | {100 * acc['colour']:.1f}% | {100 * acc['shape']:.1f}% | "
              f"{100 * acc['motion']:.1f}% | {100 * acc['all']:.1f}% | {spv:.2f} | {ratio:.2f} | {d} |")
    ms = step_overhead(pipe, args.per_combo, samplers)
    print("sampler.step alone, ms per step: " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))


if __name__ == "__main__":
    main()
