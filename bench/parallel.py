"""Benchmark: context parallelism (parallel.py). On the CPU, one transformer forward on 1, 2 and 3 gloo processes
(one thread each) against one process; on paper, the projection for CogVideoX-5b on H100s.

    python bench/parallel.py                # CPU measurement (a few minutes on 2 cores)
    python bench/parallel.py --project      # the 5b 49x480x720 projection table, no run

The CPU model has 2b's width and heads (30 x 64), 2 layers and random weights; the video is 13 frames at 240x352
(S = 226 + 4 x 15 x 22 = 1,546 tokens: a quarter of 2b's frame, a real size). Each process times its forward
(best of --repeat after one warm-up), the CPU time it used (its share of the work, whatever else runs on the
machine) and the time spent inside parallel.py's collectives (transfer plus waiting for the slowest rank); rank 0's
are reported.
"""
import argparse
import contextlib
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
import parallel  # noqa: E402

SIZES = {"cpu": (dict(num_attention_heads=30, attention_head_dim=64, num_layers=2), (4, 30, 44)),  # 13 x 240 x 352
         "smoke": (dict(num_attention_heads=3, attention_head_dim=16, num_layers=1), (1, 10, 12))}  # config, latent


def forward_times(rank: int, port: int, size: str, world: int, batch: int, threads: int, repeat: int, out=None):
    """(wall seconds per forward, CPU seconds of this process, wall seconds in collectives), the fastest of `repeat`,
    on rank `rank` of `world` (a gloo group on 127.0.0.1:port when world > 1); rank 0 saves them to `out`."""
    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        parallel.init(torch.device("cpu"))
    overrides, (frames, height, width) = SIZES[size]
    cfg = M.TransformerConfig(**overrides)
    torch.manual_seed(0)  # the same random weights and inputs on every rank
    transformer = M.CogVideoXTransformer(cfg).eval()
    x = torch.randn(batch, frames, cfg.in_channels, height, width)
    text = torch.randn(batch, cfg.max_text_seq_length, cfg.text_embed_dim)
    t = torch.full((batch,), 500)
    comm = [0.0]

    def timed(f):
        def g(*a, **k):
            t0 = time.perf_counter()
            r = f(*a, **k)
            comm[0] += time.perf_counter() - t0
            return r
        return g
    for name in ("all_to_all", "all_gather", "broadcast"):
        setattr(parallel, name, timed(getattr(parallel, name)))
    best = (float("inf"), 0.0, 0.0)
    with torch.no_grad(), parallel.context_parallel(transformer) if world > 1 else contextlib.nullcontext():
        for i in range(repeat + 1):
            if world > 1:
                dist.barrier()
            comm[0], t0, cpu = 0.0, time.perf_counter(), time.process_time()
            transformer(x, text, t)
            s = time.perf_counter() - t0
            if i and s < best[0]:
                best = (s, time.process_time() - cpu, comm[0])
    if world > 1:
        dist.destroy_process_group()
    if out is not None and rank == 0:
        torch.save(best, out)
    return best


def spawned(size, world, batch, repeat):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(ROOT, "bench", f".parallel-{os.getpid()}.pt")
    mp.spawn(forward_times, args=(port, size, world, batch, 1, repeat, out), nprocs=world)
    best = torch.load(out)
    os.remove(out)
    return best


def measure(size: str, repeat: int) -> None:
    print("| batch | processes x threads | s / forward | vs 1 x 1 | CPU s of process 0 | in collectives |\n"
          "|---|---|---:|---:|---:|---:|")
    for batch, what in ((1, "no guidance"), (2, "guidance")):
        base = None
        for world, threads in ((1, 1), (1, 2), (2, 1), (3, 1)):
            s, cpu, comm = (forward_times(0, 0, size, 1, batch, threads, repeat) if world == 1 else
                            spawned(size, world, batch, repeat))
            base = base or s
            how = "" if world == 1 else " (CFG-parallel)" if batch == 2 and world == 2 else " (Ulysses)"
            print(f"| {batch} ({what}) | {world} x {threads}{how} | {s:.2f} | {base / s:.2f}x | {cpu:.2f} | "
                  f"{comm / s:.0%} |", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The projection: CogVideoX-5b, 49 frames at 480x720, guidance on (two branches per step), bf16


ANCHOR_S = 87.5 / 50  # s/step on one H100: diffusers' 87.5 s for 50 steps (issue #35; bench/gpu.py has not run)
LINKS = {"NVLink (900 GB/s)": 450e9 * 0.6, "PCIe 5 (64 GB/s)": 25e9}  # per direction, x assumed efficiency
XDIT = {2: 1.92, 4: 2.82, 6: 3.21}  # xDiT's reported speed-ups for a 5B CogVideoX (issue #35)


def projection() -> None:
    cfg = M.PRESETS["cogvideox-5b"]
    N, L, D, h, layers, by = 13 * 30 * 45, 226, cfg.inner_dim, cfg.num_attention_heads, cfg.num_layers, 2
    S = N + L
    full = 2 * M.flops_per_forward(cfg, N, L)  # one step: the negative and positive branch
    print(f"5b at 49x480x720: N = {N} video + {L} text tokens, {full / 1e12:.0f} TFLOP per step (model.py's count; "
          f"attention {2 * layers * 4 * S * S * D / full:.0%}), anchored at {ANCHOR_S:.2f} s/step on one H100\n")
    print("| GPUs | split | compute s/step | MB sent per GPU per step | NVLink s/step | speed-up | PCIe s/step | "
          "speed-up | xDiT reported |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for gpus in (1, 2, 4, 6, 8):
        groups = 2 if gpus % 2 == 0 else 1
        m, branches = gpus // groups, 2 // groups  # Ulysses degree; forwards each GPU runs per step
        n, hl = -(-N // m), -(-h // m)
        mine = branches * layers * (24 * D * D * (n + L) + 4 * S * S * hl * cfg.attention_head_dim)  # per GPU
        compute = ANCHOR_S * mine / full
        # per layer and branch: q, k, v out and the output back (an all-to-all keeps 1/m of it at home), the text
        # output heads to the m - 1 others; per step: x (branches, n, D) to the gpus - 1 others (the final gather)
        d = cfg.attention_head_dim
        a2a = branches * layers * (4 * n * hl * m * d * (m - 1) / m + L * hl * d * (m - 1))
        sent = (a2a + (gpus - 1) * branches * n * D) * by
        row = [f"| {gpus} | {'-' if gpus == 1 else f'{groups} x Ulysses {m}' if m > 1 else 'CFG'} | {compute:.3f} | "
               f"{sent / 1e6:,.0f}"]
        for bw in LINKS.values():
            step = compute + sent / bw
            row.append(f"{step:.3f} | {ANCHOR_S / step:.2f}x")
        row.append(f"{XDIT[gpus]:.2f}x" if gpus in XDIT else "")
        print(" | ".join(row) + " |")
    print("\nAssumptions: compute splits exactly by FLOPs (text tokens replicated on every GPU, heads padded to a "
          "multiple of the Ulysses degree); communication is not overlapped with compute; links reach "
          + ", ".join(f"{k}: {v / 1e9:.0f} GB/s" for k, v in LINKS.items()) + " per direction.")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", action="store_true", help="print the 5b projection table only")
    p.add_argument("--repeat", type=int, default=2, help="timed forwards per configuration (after one warm-up)")
    p.add_argument("--smoke", action="store_true", help="a toy size, to check that the script runs")
    args = p.parse_args()
    projection() if args.project else measure("smoke" if args.smoke else "cpu", args.repeat)


if __name__ == "__main__":
    main()
