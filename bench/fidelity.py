"""Benchmark: speed against fidelity on the demo model. Each speed option renders the same held-out prompts with the
same seeds as the default run (50 DDIM steps, guidance 6, fp32); reported per option: denoising wall time as a ratio
to the default, PSNR and SSIM of its frames against the default run's frames (evaluate.psnr / evaluate.ssim, on
[0, 1] frames, averaged over videos), and the evaluator's colour / shape / motion scores.

    python bench/fidelity.py                              # every option, the 28 held-out prompts, one video each
    python bench/fidelity.py --only step-cache-0.1 int8   # a few
    python bench/fidelity.py --per-combo 2                # n = 56 per option

The wall time is the whole generate() call (text encoding, denoising, decoding), measured one video at a time with
the given threads on an otherwise idle machine; options that change only the denoising loop show their effect diluted
by the fixed cost of T5 and the VAE (small on the demo). Peak memory is not compared: on the demo it is dominated by
the interpreter and torch, not by the weights an option shrinks.
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
from evaluate import psnr, ssim  # noqa: E402
from generate import DEMO_MODEL, generate, load_pipeline  # noqa: E402
from quantize import quantize_int8  # noqa: E402
from sampler import SAMPLERS  # noqa: E402

# name -> (load_pipeline keywords, generate keywords, int8): each differs from the default in one thing
OPTIONS = {
    "default": ({}, {}, False),
    **{f"step-cache-{t}": ({}, {"step_cache": t}, False) for t in (0.05, 0.1, 0.2)},
    "int8": ({}, {}, True),
    "bf16": ({"dtype": torch.bfloat16}, {}, False),
    "10-steps": ({}, {"num_inference_steps": 10}, False),
    **{f"{s}-20-steps": ({}, {"sampler": s, "num_inference_steps": 20}, False) for s in SAMPLERS},  # ddim: 20 steps
    "offload-blocks": ({"offload": "blocks"}, {}, False),
}


def run(name, model, prompts, seeds):
    load_kw, gen_kw, int8 = OPTIONS[name]
    pipe = load_pipeline(model, **load_kw)
    if int8:
        quantize_int8(pipe.transformer)
    length = pipe.transformer.config.max_text_seq_length
    frames, seconds = [], 0.0
    for prompt, seed in zip(prompts, seeds):
        start = time.perf_counter()
        frames.append(generate(pipe, prompt, seed=seed, max_sequence_length=length, progress=False, **gen_kw).float())
        seconds += time.perf_counter() - start
    return torch.cat(frames), seconds  # (n, F, 3, H, W) in [0, 1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--only", nargs="+", choices=list(OPTIONS), help="these options (the default always runs)")
    p.add_argument("--per-combo", type=int, default=1, help="videos per held-out prompt (seeds 0, 1, ...)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    _, held_out = shapes.split()
    prompts = [shapes.caption(a) for a in held_out for _ in range(args.per_combo)]
    seeds = [k for _ in held_out for k in range(args.per_combo)]
    names = ["default"] + [n for n in OPTIONS if n != "default" and (not args.only or n in args.only)]
    reference, rows = None, []
    for name in names:
        frames, seconds = run(name, args.model, prompts, seeds)
        reference = frames if reference is None else reference
        acc = shapes.evaluate(np.concatenate([shapes.from_tensor(f[None] * 2 - 1) for f in frames]), prompts)
        per_video = [(psnr(f, r), ssim(f, r)) for f, r in zip(frames, reference)]
        rows.append((name, seconds, *np.mean([(min(a, 99.0), b) for a, b in per_video], axis=0), acc))
        print(f"  {name}: {seconds:.1f} s", file=sys.stderr)
    base = rows[0][1]
    print(f"Speed against fidelity on {os.path.basename(args.model.rstrip('/'))}: {len(prompts)} held-out videos per "
          f"option, seeds as the default run (50 DDIM steps, guidance 6, fp32), {args.threads} threads")
    print("| option | wall time / default | PSNR dB | SSIM | colour | shape | motion |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, seconds, p_db, s, acc in rows:
        psnr_text = "identical" if p_db >= 99.0 else f"{p_db:.1f}"  # 99: every video equal to the default's
        print(f"| {name} | {seconds / base:.2f} | {psnr_text} | {s:.3f} | " + " | ".join(
            f"{100 * acc[k]:.1f}%" for k in ("colour", "shape", "motion")) + " |")


if __name__ == "__main__":
    main()
