"""Benchmark: end to end on the shapes demo model, ours (generate.py) vs diffusers' CogVideoXPipeline on the same
snapshot with the same settings (T5 encode, 50 DDIM steps with guidance as one batch of 2, VAE decode), plus ours
with the step cache. Every case runs in a fresh subprocess, `--repeat` times alternating, fastest time and highest
peak reported. Peak memory is VmHWM from /proc/self/status; "peak - base" is the increase over the RSS after
loading (the working memory of generation). The frames are compared with the peer's.

    python bench/e2e.py
    python bench/e2e.py --steps 50 --repeat 3 --step-cache 0.1 0.2
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PROMPT = "a red circle moving right on a black background"


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def run_case(args) -> dict:
    torch.set_num_threads(args.threads)
    kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance)
    t0 = time.perf_counter()
    if args.case == "peer":
        from diffusers import CogVideoXPipeline
        from diffusers.utils import logging
        logging.set_verbosity_error()
        pipe = CogVideoXPipeline.from_pretrained(args.model)
        pipe.set_progress_bar_config(disable=True)
        max_len = pipe.transformer.config.max_text_seq_length
        run = lambda: pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt",
                           max_sequence_length=max_len, **kw).frames
    else:
        from generate import generate, load_pipeline
        pipe = load_pipeline(args.model)
        max_len = pipe.transformer.config.max_text_seq_length
        cache = float(args.case.split()[-1]) if "cache" in args.case else None
        timings = {}
        run = lambda: generate(pipe, PROMPT, seed=0, max_sequence_length=max_len, step_cache=cache, progress=False,
                               timings=timings, **kw)
    load = time.perf_counter() - t0
    base = status_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    with torch.no_grad():
        frames = run()
    seconds = time.perf_counter() - t0
    torch.save(frames.float(), os.path.join(args.outdir, args.case.replace(" ", "_") + ".pt"))
    evals = timings["evaluations"] if args.case != "peer" else args.steps
    return {"load": load, "seconds": seconds, "base": base, "peak": status_kb("VmHWM") * 1024, "evaluations": evals}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "demo", "shapes-tiny"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--step-cache", nargs="*", type=float, default=[0.1], help="thresholds for extra 'ours' cases")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--outdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:  # child process
        print(json.dumps(run_case(args)))
        return
    cases = ["peer", "ours"] + [f"ours cache {t}" for t in args.step_cache]
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            for case in (cases if i % 2 == 0 else cases[::-1]):
                cmd = [sys.executable, __file__, "--case", case, "--outdir", tmp, "--model", args.model, "--steps",
                       str(args.steps), "--guidance", str(args.guidance), "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"case {case} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"  {case}: {r['seconds']:.2f} s", file=sys.stderr)
                if case in res:
                    old = res[case]
                    r = dict(r, seconds=min(r["seconds"], old["seconds"]), load=min(r["load"], old["load"]),
                             peak=max(r["peak"], old["peak"]), base=min(r["base"], old["base"]))
                res[case] = r
        outs = {c: torch.load(os.path.join(tmp, c.replace(" ", "_") + ".pt")) for c in cases}
    print(f"End to end on {os.path.basename(args.model.rstrip('/'))}: {args.steps} DDIM steps, guidance "
          f"{args.guidance}, {tuple(outs['peer'].shape[1:])} frames, fp32 CPU, {args.threads} thread(s), best of "
          f"{args.repeat}")
    print("| case | load s | generate s | time/peer | transformer evals | peak RSS MiB | peak - base MiB "
          "| mem/peer | max abs diff vs peer (0-255) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    ref = res["peer"]
    for c in cases:
        r = res[c]
        inc, ref_inc = r["peak"] - r["base"], ref["peak"] - ref["base"]
        diff = (outs[c] - outs["peer"]).abs().max().item() * 255
        print(f"| {c} | {r['load']:.2f} | {r['seconds']:.2f} | {r['seconds'] / ref['seconds']:.3f} | "
              f"{r['evaluations']} | {r['peak'] / 2**20:.0f} | {inc / 2**20:.0f} | {inc / max(ref_inc, 1):.3f} | "
              f"{diff:.4f} |")


if __name__ == "__main__":
    main()
