"""Benchmark: the opt-in step cache (generate.StepCache, TeaCache-like) on the shapes demo model: transformer
evaluations, denoising time, evaluator accuracy and pixel difference from the uncached videos.

For each threshold, every held-out prompt and every `--train-every`-th training prompt of shapes.split() is
generated with the same seed as the uncached run (None), scored by shapes.evaluate, and compared pixel by pixel
with the uncached video (mean and max |difference| on the 0-255 scale).

    python bench/step_cache.py                           # thresholds 0.05 0.1 0.2 0.3, 50 DDIM steps, guidance 6
    python bench/step_cache.py --thresholds 0.1 --train-every 1
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import shapes  # noqa: E402
from generate import DEMO_MODEL, generate, load_pipeline  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--thresholds", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.3])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--train-every", type=int, default=5, help="use every n-th training prompt")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    train, held_out = shapes.split()
    sets = {"held-out": [shapes.caption(a) for a in held_out],
            "train": [shapes.caption(a) for a in train[::args.train_every]]}
    max_len = pipe.transformer.config.max_text_seq_length
    reference, rows = {}, []
    for threshold in [None] + args.thresholds:
        acc, evals, seconds, diffs = {}, [], 0.0, []
        for name, captions in sets.items():
            videos = []
            for i, c in enumerate(captions):
                timings = {}
                frames = generate(pipe, c, num_inference_steps=args.steps, guidance_scale=args.guidance, seed=i,
                                  max_sequence_length=max_len, step_cache=threshold, progress=False, timings=timings)
                evals.append(timings["evaluations"])
                seconds += timings["denoise"]
                if threshold is None:
                    reference[name, i] = frames
                diffs.append((frames - reference[name, i]).abs().flatten() * 255)
                videos.append(shapes.from_tensor(frames * 2 - 1))  # (1, F, H, W, 3) uint8
            acc[name] = shapes.evaluate(np.concatenate(videos), captions)
        d = torch.cat(diffs)
        rows.append((threshold, np.mean(evals), seconds, acc, d.mean().item(), d.max().item()))
        print(f"  threshold {threshold}: {np.mean(evals):.1f} evaluations, {seconds:.1f} s, "
              f"all {acc['held-out']['all']:.3f} / {acc['train']['all']:.3f}", file=sys.stderr)

    n = {k: len(v) for k, v in sets.items()}
    print(f"Step cache on {os.path.basename(args.model.rstrip('/'))}: {args.steps} DDIM steps, guidance "
          f"{args.guidance}, {n['held-out']} held-out + {n['train']} training prompts, one video each, same seeds")
    print("| threshold | evaluations / video | fewer evals | denoise s | speed-up | held-out all | train all "
          "| held-out colour/shape/motion | mean abs px diff | max abs px diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    base = rows[0]
    for threshold, ev, s, acc, dmean, dmax in rows:
        h = acc["held-out"]
        attrs = "/".join(f"{100 * h[k]:.0f}" for k in ("colour", "shape", "motion") if k in h)
        print(f"| {'off' if threshold is None else threshold} | {ev:.1f} | {base[1] / ev:.2f}x | {s:.1f} | "
              f"{base[2] / s:.2f}x | {100 * h['all']:.1f}% | {100 * acc['train']['all']:.1f}% | {attrs} | "
              f"{dmean:.2f} | {dmax:.0f} |")


if __name__ == "__main__":
    main()
