"""Benchmark: VAE decode time and peak memory, ours (vae.py) vs diffusers' AutoencoderKLCogVideoX, tiled and untiled.

Full-size architecture (215.6M params) with the peer's random init, saved once with save_pretrained and loaded by
both sides, so both decode the same latents with the same weights; outputs are compared too. Every case runs in a
fresh subprocess so that peaks do not mix. Peak memory is the increase over the memory held just before decode:
on CPU VmHWM - VmRSS from /proc/self/status (the high-water mark is reset first via /proc/self/clear_refs; the
children run with MALLOC_MMAP_THRESHOLD_=4194304 so that freed tensors of 4 MiB and more go back to the OS and RSS
follows live memory), on CUDA torch.cuda.max_memory_allocated - memory_allocated. On a shared CPU, wall time is noisy; the
process CPU time is printed too.

The default tile is about half the decoded size, rounded down to a multiple of 48x40 px so that it tiles evenly
with the official overlaps (at 60x90 latents it is the official 240x360), giving a 3x3 grid of overlapping tiles
like the real 480x720 case. Before measuring, each case decodes one tiny latent (so weights are paged in and
kernels initialised); --repeat N decodes N times and reports the fastest run and the highest peak.

    python bench/vae.py                                  # 13 latent frames at 30x45 (49 frames 240x360)
    python bench/vae.py --frames 5 --size 8x12           # feasible on 2 CPU cores in a few minutes
    python bench/vae.py --device cuda --size 60x90       # the real 480x720 case on a GPU
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from transformer import timed  # noqa: E402  (bench/transformer.py: wall, CPU s, peak bytes of one call)

CASES = ["ours tiled", "ours untiled", "peer untiled", "peer tiled"]


def run_case(args) -> dict:
    """One case in this (fresh) process: load, decode once, report seconds and peak bytes."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, dev = getattr(torch, args.dtype), torch.device(args.device)
    h, w = map(int, args.size.split("x"))
    tile = tuple(map(int, args.tile.split("x")))
    torch.manual_seed(0)
    z = torch.randn(1, 16, args.frames, h, w).to(dev, dtype)
    ours, tiled = args.case.startswith("ours"), args.case.endswith(" tiled")
    if ours:
        from vae import load_vae
        vae = load_vae(args.weights, dtype=dtype, device=dev)
        decode = lambda z: vae.decode(z, tiled=tiled, tile_size=tile)
    else:
        from diffusers import AutoencoderKLCogVideoX
        vae = AutoencoderKLCogVideoX.from_pretrained(args.weights, dtype=dtype).to(dev).eval()
        if tiled:
            vae.enable_tiling(tile_sample_min_height=tile[0], tile_sample_min_width=tile[1])
        decode = lambda z: vae.decode(z).sample
    with torch.no_grad():
        decode(z[:, :, :1, :2, :2])  # warm-up: pages the weights in, initialises kernels
    seconds, cpu_seconds, peak = float("inf"), float("inf"), 0
    for _ in range(args.repeat):
        out = None  # the last run's output is freed before the next is measured
        with torch.no_grad():
            wall, cpu, bytes_, out = timed(lambda: decode(z), dev)
        seconds, cpu_seconds, peak = min(seconds, wall), min(cpu_seconds, cpu), max(peak, bytes_)
    torch.save(out.float().cpu(), os.path.join(args.outdir, args.case.replace(" ", "_") + ".pt"))
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_bytes": peak, "shape": list(out.shape)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=13, help="latent frames (13 -> 49 video frames)")
    p.add_argument("--size", default="30x45", help="latent HxW (60x90 = 480x720 video)")
    p.add_argument("--tile", default=None, help="tile HxW in pixels (default: half the decoded size)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    p.add_argument("--repeat", type=int, default=1, help="decodes per case (fastest time, highest peak)")
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--outdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    h, w = map(int, args.size.split("x"))
    args.tile = args.tile or f"{max(4 * h // 48, 1) * 48}x{max(4 * w // 40, 1) * 40}"
    if args.case:  # child process
        print(json.dumps(run_case(args)))
        return

    from diffusers import AutoencoderKLCogVideoX
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoencoderKLCogVideoX().save_pretrained(tmp)  # random init of the full-size architecture
        res = {}
        for case in CASES:
            cmd = [sys.executable, __file__, "--case", case, "--weights", tmp, "--outdir", tmp,
                   "--frames", str(args.frames), "--size", args.size, "--tile", args.tile, "--dtype", args.dtype,
                   "--device", args.device, "--threads", str(args.threads), "--repeat", str(args.repeat)]
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4194304")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"case {case!r} failed:\n{proc.stderr[-3000:]}")
            res[case] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {case}: {res[case]['seconds']:.1f} s", file=sys.stderr)
        outs = {c: torch.load(os.path.join(tmp, c.replace(" ", "_") + ".pt")) for c in CASES}

    print(f"VAE decode, {args.frames} latent frames at {args.size} -> {res['ours tiled']['shape']}, tile {args.tile} px,"
          f" {args.dtype} on {args.device} ({torch.get_num_threads() if args.device == 'cpu' else ''} threads)")
    print(f"{'case':<14} {'seconds':>9} {'cpu s':>9} {'peak MiB':>9} {'time/peer':>10} {'cpu/peer':>9} {'mem/peer':>9}")
    for case in CASES:
        ref = res["peer tiled" if case.endswith(" tiled") else "peer untiled"]
        r = res[case]
        print(f"{case:<14} {r['seconds']:9.2f} {r['cpu_seconds']:9.2f} {r['peak_bytes'] / 2**20:9.0f}"
              f" {r['seconds'] / ref['seconds']:10.3f} {r['cpu_seconds'] / ref['cpu_seconds']:9.3f}"
              f" {r['peak_bytes'] / ref['peak_bytes']:9.3f}")
    for a, b in [("ours tiled", "peer tiled"), ("ours untiled", "peer untiled"), ("ours tiled", "ours untiled")]:
        d = (outs[a] - outs[b]).abs()
        print(f"max |{a} - {b}| = {d.max().item():.2e} (mean {d.mean().item():.2e}, output mean |x| "
              f"{outs[b].abs().mean().item():.2e})")


if __name__ == "__main__":
    main()
