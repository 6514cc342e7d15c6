"""Benchmark: one transformer forward, ours (model.py) vs diffusers' CogVideoXTransformer3DModel, same weights.

The real 2b / 5b widths (30 / 48 heads of 64) with fewer layers; the peer is built with random weights, saved with
save_pretrained and loaded by ours, so both compute the same function (the output difference is printed). Ours and
the peer run alternately in one process, `--repeat` times each after one warm-up; the table shows the fastest run,
the highest activation peak (CPU: VmHWM - VmRSS from /proc/self/status, the high-water mark reset before each run
through /proc/self/clear_refs; CUDA: max_memory_allocated - memory_allocated) and the achieved FLOP/s
(model.flops_per_forward / wall time) against the machine's matmul peak, a large torch.mm in the same dtype timed in the
same run, before and after (the better of the two is used).

    python bench/transformer.py                          # 2b and 5b, 1 layer, 13 x 40 x 60 latents (7,800 tokens)
    python bench/transformer.py --widths 2b --layers 2 --size 60x90 --repeat 2
    python bench/transformer.py --device cuda --dtype bfloat16 --layers 4
    python bench/transformer.py --compile                # adds ours under torch.compile (inductor)
"""
import argparse
import dataclasses
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def timed(fn, dev):
    """(wall seconds, CPU seconds of this process, peak activation bytes, result) of one call. On a shared
    machine the CPU seconds are the steadier measure: they leave out the time other jobs held the cores."""
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = status_kb("VmRSS") * 1024
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else status_kb("VmHWM") * 1024
    return seconds, cpu, peak - base, out


def matmul_peak(dtype, dev, n=4096, repeat=3) -> float:
    """FLOP/s of the fastest of `repeat` (n x n) @ (n x n) products."""
    a, b = (torch.randn(n, n, device=dev).to(dtype) for _ in range(2))
    a @ b
    best = min(timed(lambda: a @ b, dev)[0] for _ in range(repeat))  # wall: the cores' rate
    return 2 * n ** 3 / best


def randomise(peer, seed):
    """Random weights of a realistic scale (std 0.02, LayerNorm scales around 1); the init's zeros would hide work."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in peer.state_dict().items():
            t.copy_(torch.randn(t.shape, generator=g) * 0.02 + (1.0 if name.endswith("norm.weight") else 0.0))
    return peer


def peer_rope(peer, x):
    if not peer.config.use_rotary_positional_embeddings:
        return None
    from diffusers import CogVideoXPipeline
    fake = SimpleNamespace(vae_scale_factor_spatial=8, transformer=peer)  # borrow the pipeline's RoPE builder
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(fake, x.shape[3] * 8, x.shape[4] * 8, x.shape[1],
                                                                   x.device)


def bench_width(name, args, dev, dtype, peak_flops):
    from diffusers import CogVideoXTransformer3DModel
    cfg = dataclasses.replace(M.PRESETS[f"cogvideox-{name}"], num_layers=args.layers)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        peer = randomise(CogVideoXTransformer3DModel(**dataclasses.asdict(cfg)), seed=0)
        peer.save_pretrained(tmp)
        peer = peer.to(dev, dtype).eval()
        ours = M.load_transformer(tmp, dtype=dtype, device=dev)
    h, w = map(int, args.size.split("x"))
    B, L = args.batch, cfg.max_text_seq_length
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, args.frames, cfg.in_channels, h, w, generator=g).to(dev, dtype)
    text = torch.randn(B, L, cfg.text_embed_dim, generator=g).to(dev, dtype)
    t = torch.full((B,), 500, device=dev)
    rope = peer_rope(peer, x)
    runs = {"peer": lambda: peer(x, text, t, image_rotary_emb=rope, return_dict=False)[0],
            "ours": lambda: ours(x, text, t)}
    if args.compile:
        compiled = torch.compile(ours)
        runs["ours compiled"] = lambda: compiled(x, text, t)
    results, outs = {k: (float("inf"), float("inf"), 0) for k in runs}, {}
    with torch.no_grad():
        for k, fn in runs.items():  # warm-up: caches, kernels, compilation
            s, _, _, outs[k] = timed(fn, dev)
            print(f"  {name} {k} warm-up {s:.1f} s", file=sys.stderr)
        for i in range(args.repeat):  # alternate so that load from other jobs hits both sides alike
            for k in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                s, cpu, mem, _ = timed(runs[k], dev)
                results[k] = (min(results[k][0], s), min(results[k][1], cpu), max(results[k][2], mem))
                print(f"  {name} {k} {s:.1f} s (cpu {cpu:.1f} s)", file=sys.stderr)
    N = args.frames * h * w // cfg.patch_size ** 2
    flops = M.flops_per_forward(cfg, N, L) * B
    ref = outs["peer"].float()
    rows = []
    for k, (s, cpu, mem) in results.items():
        err = ((outs[k].float() - ref).abs().max() / ref.abs().max()).item()
        rows.append((f"{name} {k}", N + L, s, s / results["peer"][0], cpu, cpu / results["peer"][1], mem / 2**20,
                     mem / results["peer"][2] if results["peer"][2] else float("nan"), flops / s / 1e9, err))
    del peer, ours
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", nargs="+", default=["2b", "5b"], choices=["2b", "5b"])
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--frames", type=int, default=13, help="latent frames")
    p.add_argument("--size", default="40x60", help="latent HxW (60x90 = 480x720 video)")
    p.add_argument("--batch", type=int, default=1, help="2 = one classifier-free-guidance step")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per implementation (fastest is reported)")
    p.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    peak0 = matmul_peak(dtype, dev)
    rows = []
    for name in args.widths:
        rows += bench_width(name, args, dev, dtype, peak0)
    peak = max(peak0, matmul_peak(dtype, dev))

    threads = f", {torch.get_num_threads()} threads" if dev.type == "cpu" else ""
    print(f"Transformer forward, {args.layers} layer(s), batch {args.batch}, {args.frames} x {args.size} latents, "
          f"{args.dtype} on {args.device}{threads}; matmul peak {peak / 1e9:.1f} GFLOP/s; best of {args.repeat}")
    print(f"| {'case':<17} | tokens | wall s | time/peer | CPU s | CPU/peer | peak MiB | mem/peer | GFLOP/s "
          f"| of peak | rel err |")
    print(f"|{'-' * 19}|-------:|-------:|----------:|------:|---------:|---------:|---------:|--------:|--------:"
          f"|--------:|")
    for case, S, s, ratio, cpu, cratio, mib, mratio, gf, err in rows:
        print(f"| {case:<17} | {S:6d} | {s:6.2f} | {ratio:9.3f} | {cpu:5.2f} | {cratio:8.3f} | {mib:8.0f} | "
              f"{mratio:8.3f} | {gf:7.1f} | {gf * 1e9 / peak:7.1%} | {err:7.1e} |")


if __name__ == "__main__":
    main()
