"""Benchmark: loading a full-size CogVideoX-2b transformer (1.69B parameters), ours (model.load_transformer) vs
diffusers' CogVideoXTransformer3DModel.from_pretrained: seconds and peak resident memory.

A random 2b transformer is written once in bf16 (3.4 GB) in the official layout (config.json, shards and their
index.json) to --dir and reused by later runs. Every case runs in a fresh subprocess, `--repeat` times, ours and
the peer alternating, with the fastest time and the highest peak reported. Each case loads in two dtypes: bf16
(the file's: ours keeps views of the memory-mapped file) and fp32 (a cast: one copy per tensor). Memory-mapped
weights are only read when used, so besides "load" (the call returns) the table shows "load+read": the load plus
a pass that touches every page of every weight (a strided sum), which the first forward would pay. Peak RSS is
VmHWM from /proc/self/status (file pages mapped into the process count, so mapped weights are not free);
"peak - base" is the increase over the RSS before loading (after imports), compared with the bytes of the loaded
weights. The page cache is warm: the first (discarded) run of each case reads the file once. The checksums of
the loaded weights must agree.

    python bench/load.py                                 # writes /tmp/cogvideox-mini-bench/2b-bf16 once (3.4 GB)
    python bench/load.py --repeat 3 --dtypes bfloat16
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def write_checkpoint(folder: str, shard_bytes: int = 2 * 10**9) -> None:
    """Random bf16 weights of the full 2b transformer, sharded like diffusers' save_pretrained (index.json)."""
    import dataclasses
    from diffusers import CogVideoXTransformer3DModel
    from safetensors.torch import save_file
    import model as M
    with torch.device("meta"):
        peer = CogVideoXTransformer3DModel(**dataclasses.asdict(M.PRESETS["cogvideox-2b"]))
    os.makedirs(folder, exist_ok=True)
    peer.save_config(folder)
    shapes = {k: v.shape for k, v in peer.state_dict().items()}
    shards, size = [[]], 0
    for k, s in shapes.items():
        n = s.numel() * 2
        if size + n > shard_bytes and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, keys in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        sd = {k: (torch.randn(shapes[k], generator=g) * 0.02).to(torch.bfloat16) for k in keys}
        save_file(sd, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        total += sum(t.numel() * 2 for t in sd.values())
        print(f"  wrote {name}", file=sys.stderr)
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def run_case(case: str, folder: str, dtype: torch.dtype) -> dict:
    """One load in this (fresh) process."""
    if case == "ours":
        from model import load_transformer
        load = lambda: load_transformer(folder, dtype=dtype)
    else:
        from diffusers import CogVideoXTransformer3DModel
        load = lambda: CogVideoXTransformer3DModel.from_pretrained(folder, torch_dtype=dtype).eval()
    base = status_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    model = load()
    loaded = time.perf_counter() - t0
    with torch.no_grad():  # every 512th value: touches every 4 KiB page in either dtype, cheaply
        checksum = sum(p.reshape(-1)[::512].double().sum().item() for p in model.parameters())
    read = time.perf_counter() - t0
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"load": loaded, "read": read, "base": base, "peak": status_kb("VmHWM") * 1024, "weights": weight_bytes,
            "checksum": checksum}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/cogvideox-mini-bench/2b-bf16", help="where the random checkpoint lives")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    p.add_argument("--repeat", type=int, default=2, help="timed loads per case (fastest time, highest peak)")
    p.add_argument("--case", choices=["ours", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:  # child process
        print(json.dumps(run_case(args.case, args.dir, getattr(torch, args.dtype))))
        return
    if not os.path.isfile(os.path.join(args.dir, "diffusion_pytorch_model.safetensors.index.json")):
        write_checkpoint(args.dir)
    files = [f for f in os.listdir(args.dir) if f.endswith(".safetensors")]
    file_bytes = sum(os.path.getsize(os.path.join(args.dir, f)) for f in files)

    rows = []
    for dtype in args.dtypes:
        res = {}
        for i in range(args.repeat + 1):  # run 0 warms the page cache and is not counted
            for case in (["peer", "ours"] if i % 2 else ["ours", "peer"]):
                cmd = [sys.executable, __file__, "--case", case, "--dir", args.dir, "--dtype", dtype]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"case {case} {dtype} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"  {case} {dtype}: load {r['load']:.2f} s, +read {r['read']:.2f} s, peak "
                      f"{r['peak'] / 2**30:.2f} GiB{' (warm-up)' if i == 0 else ''}", file=sys.stderr)
                if i == 0:
                    continue
                if case in res:
                    old = res[case]
                    r = dict(r, load=min(r["load"], old["load"]), read=min(r["read"], old["read"]),
                             peak=max(r["peak"], old["peak"]), base=min(r["base"], old["base"]))
                res[case] = r
        assert abs(res["ours"]["checksum"] - res["peer"]["checksum"]) <= 1e-6 * abs(res["peer"]["checksum"]), res
        for case in ("ours", "peer"):
            r, ref = res[case], res["peer"]
            rows.append((f"{case} {dtype}", r["weights"] / 2**30, r["load"], r["read"], r["read"] / ref["read"],
                         r["peak"] / 2**30, (r["peak"] - r["base"]) / 2**30, (r["peak"] - r["base"]) / r["weights"],
                         r["peak"] / r["weights"]))

    print(f"Loading the full-size 2b transformer ({len(files)} bf16 shards, {file_bytes / 2**30:.2f} GiB) on CPU, "
          f"warm page cache, best of {args.repeat} per case in fresh processes")
    print("| case           | weights GiB | load s | load+read s | time/peer | peak RSS GiB | peak - base GiB "
          "| (peak - base)/weights | peak/weights |")
    print("|----------------|------------:|-------:|------------:|----------:|-------------:|----------------:"
          "|----------------------:|-------------:|")
    for case, w, load, read, ratio, peak, inc, inc_ratio, peak_ratio in rows:
        print(f"| {case:<14} | {w:11.2f} | {load:6.2f} | {read:11.2f} | {ratio:9.3f} | {peak:12.2f} | {inc:15.2f} "
              f"| {inc_ratio:21.3f} | {peak_ratio:12.3f} |")


if __name__ == "__main__":
    main()
