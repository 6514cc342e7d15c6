"""Benchmark: full-size CogVideoX-5b and -2b on one GPU, ours vs diffusers in one process (issue #21).

One run, in this order, prints the markdown tables for bench/RESULTS.md (with the GPU, torch version and date):
  1. a bf16 matmul peak (8192^3 torch.mm, timed at the start and the end; the better is used) for the MFU column;
  2. each SDPA kernel alone on the 5b attention shape (CFG batch 2, 48 heads, 17,776 tokens, head_dim 64), and
     model.attention (the first of offload.CUDA_SDPA_ORDER that takes the inputs);
  3. per model (5b, then 2b), one CFG step = one transformer forward at batch 2, 49 frames 480x720 (13 x 60 x 90
     latents, 226 text tokens): random weights built on the GPU (the peer's modules, weights normal(0, 0.02) and
     LayerNorm scales around 1), shared by ours (same tensors, same key names); first an fp32 forward of the peer
     (TF32 off) as the reference, then bf16: peer and ours eager, alternating, best of 3; both compiled (ours:
     CogVideoXTransformer.compile, one graph for all blocks; the peer: each block's nn.Module.compile, the same
     regional compilation, since compiling its whole 42-block forward would not fit the time); ours with the blocks
     streamed from pinned host memory (offload.BlockStream), eager and compiled. Columns: seconds per step, ratio,
     MFU (model.flops_per_forward x 2 / time / matmul peak), weights on the GPU, peak GPU memory of the step
     (weights + torch.cuda.max_memory_allocated increase; streamed: the increase alone, the blocks live on the
     host), and the max relative difference max|out - ref| / max|ref| against the fp32 reference;
  4. for 5b, the other stages, ours vs the peer's (transformers' T5EncoderModel, diffusers' AutoencoderKLCogVideoX)
     on shared random weights: T5-XXL encoding 2 prompts (resident, and with its blocks streamed from the CPU as
     --offload blocks runs it), VAE decode of the 49 frames untiled and tiled (official 240x360 tiles). With them, the
     end-to-end time of 50 steps is projected (T5 + 50 x step + decode) for all-on-GPU and for --offload blocks.
Every part runs inside a try: a failure (an unsupported kernel, out of memory) becomes one line in the table and the
rest still runs; a part that would start after DEADLINE_S is skipped and listed, so the whole run stays under 8
minutes of device time on an H100/H200 (the first call of each compiled model includes its compile time, printed).

    python bench/gpu.py            # on a CUDA machine
    python bench/gpu.py --smoke    # the same code on the CPU at toy sizes, in seconds (tests/test_perf.py runs it)
"""
import argparse
import dataclasses
import datetime
import os
import sys
import time

import torch

from transformer import matmul_peak, peer_rope, timed  # bench/transformer.py

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
from offload import CUDA_SDPA_ORDER, BlockStream  # noqa: E402
from text_encoder import PRESETS as T5_PRESETS, T5Encoder  # noqa: E402
from vae import CogVideoXVAE, VAEConfig  # noqa: E402

DEADLINE_S = 390  # no part starts later than this; the longest part (a compile) ends well within 8 minutes
STEPS = 50
GIB = 2 ** 30

FULL = dict(frames=13, height=60, width=90, text=226, repeat=3, t5=T5_PRESETS["t5-v1_1-xxl"], vae=VAEConfig(),
            transformer={name: M.PRESETS[f"cogvideox-{name}"] for name in ("5b", "2b")}, matmul=8192)
_TINY = dict(num_attention_heads=2, num_layers=3, text_embed_dim=32, time_embed_dim=16, max_text_seq_length=8,
             sample_height=8, sample_width=12)
SMOKE = dict(frames=2, height=8, width=12, text=8, repeat=1,
             t5=dataclasses.replace(T5_PRESETS["t5-v1_1-xxl"], vocab_size=64, d_model=32, d_kv=8, d_ff=48,
                                    num_layers=2, num_heads=4),
             vae=VAEConfig(block_out_channels=(8, 8, 8, 16), layers_per_block=1, norm_num_groups=2, sample_height=96,
                           sample_width=80),  # 48x40 px tiles: 2x3 of them over the 64x96 px frames
             transformer={name: dataclasses.replace(M.PRESETS[f"cogvideox-{name}"], **_TINY) for name in ("5b", "2b")},
             matmul=256)


class Clock:
    """Elapsed time, and the parts skipped or failed, for the report."""

    def __init__(self):
        self.start, self.notes = time.perf_counter(), []

    def elapsed(self):
        return time.perf_counter() - self.start

    def part(self, name, fn, *args):
        """fn(*args), or None with a note when past the deadline or when it raises."""
        if self.elapsed() > DEADLINE_S:
            self.notes.append(f"{name}: skipped, past the {DEADLINE_S} s deadline")
            return None
        print(f"[{self.elapsed():5.0f} s] {name}", file=sys.stderr)
        try:
            return fn(*args)
        except Exception as e:  # one line in the report, the rest of the run goes on
            self.notes.append(f"{name}: failed, {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None


def rel_err(out, ref):
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def nbytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def best_of(runs, dev, repeat):
    """{case: fn} -> {case: (best seconds, worst peak increase, output, first-call seconds)}; alternating order, one
    warm-up call each (kernels, caches, compilation) whose time is kept as the first-call time."""
    first, best, outs = {}, {}, {}
    for k, fn in runs.items():
        first[k], _, _, outs[k] = timed(fn, dev)
        print(f"    {k}: first call {first[k]:.1f} s", file=sys.stderr)
    for i in range(repeat):
        for k in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            s, _, mem, outs[k] = timed(runs[k], dev)
            old = best.get(k, (float("inf"), 0))
            best[k] = (min(old[0], s), max(old[1], mem))
    return {k: (*best[k], outs[k], first[k]) for k in runs}


# ----------------------------------------------------------------------------------------------------------------------
# 2. attention kernels


def sdpa_part(cfg, size, dev, dtype, repeat):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    S = size["frames"] * size["height"] * size["width"] // cfg.patch_size ** 2 + size["text"]
    g = torch.Generator(dev).manual_seed(0)
    q, k, v = (torch.randn(2, cfg.num_attention_heads, S, cfg.attention_head_dim, device=dev, generator=g, dtype=dtype)
               for _ in range(3))
    flops = 4 * 2 * cfg.num_attention_heads * S * S * cfg.attention_head_dim
    rows = []
    for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "model.attention"):
        def call(name=name):
            if name == "model.attention":
                return M.attention(q, k, v)
            with sdpa_kernel(getattr(SDPBackend, name)):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        try:
            s = min(timed(call, dev)[0] for _ in range(repeat + 1))
            rows.append(f"| {name} | {s * 1e3:.2f} | {flops / s / 1e12:.1f} |")
        except RuntimeError as e:
            rows.append(f"| {name} | unavailable: {str(e).splitlines()[0][:80]} | |")
    head = (f"Attention alone, q/k/v (2, {cfg.num_attention_heads}, {S}, {cfg.attention_head_dim}) {dtype}, best of "
            f"{repeat}; the order model.attention tries: {', '.join(b.name for b in CUDA_SDPA_ORDER or [])}\n\n"
            "| kernel | ms | TFLOP/s |\n|---|---:|---:|")
    return "\n".join([head] + rows)


# ----------------------------------------------------------------------------------------------------------------------
# 3. the transformer step


def randomise_(module, seed):
    """In place, on the module's device: normal(0, 0.02), LayerNorm scales 1 + normal(0, 0.02)."""
    g = torch.Generator(next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            t.copy_(torch.randn(t.shape, generator=g, device=t.device) * 0.02 + (1.0 if name.endswith("norm.weight")
                                                                                 else 0.0))


def transformer_part(name, cfg, size, dev, dtype, clock, compile_backend):
    """{case: dict(s, peak, gpu_weights, err, first, flops)} for the step of one model."""
    from diffusers import CogVideoXTransformer3DModel
    with torch.device(dev):
        peer = CogVideoXTransformer3DModel(**dataclasses.asdict(cfg)).eval().requires_grad_(False)
    randomise_(peer, seed=0)
    B, L = 2, size["text"]
    g = torch.Generator(dev).manual_seed(1)
    x = torch.randn(B, size["frames"], cfg.in_channels, size["height"], size["width"], device=dev, generator=g)
    text = torch.randn(B, L, cfg.text_embed_dim, device=dev, generator=g)
    t = torch.tensor([999, 500], device=dev)
    rope = peer_rope(peer, x)
    with torch.no_grad():
        ref = peer(x, text, t, image_rotary_emb=rope, return_dict=False)[0].float()  # the fp32 reference
    peer.to(dtype)
    x, text = x.to(dtype), text.to(dtype)
    with torch.device("meta"):
        ours = M.CogVideoXTransformer(cfg)
    ours.load_state_dict(peer.state_dict(), strict=True, assign=True)  # the same tensors
    ours.eval()
    N = size["frames"] * size["height"] * size["width"] // cfg.patch_size ** 2
    flops = M.flops_per_forward(cfg, N, L) * B
    results = {}

    def run(runs, repeat, gpu_weights):
        with torch.no_grad():
            for k, (s, mem, out, first) in best_of(runs, dev, repeat).items():
                results[k] = dict(s=s, peak=gpu_weights + mem, gpu_weights=gpu_weights, err=rel_err(out, ref),
                                  first=first, flops=flops)

    peer_step = lambda: peer(x, text, t, image_rotary_emb=rope, return_dict=False)[0]  # noqa: E731
    ours_step = lambda: ours(x, text, t)  # noqa: E731
    clock.part(f"{name} eager", run, {"peer eager": peer_step, "ours eager": ours_step}, size["repeat"], nbytes(ours))

    def compiled():
        for block in peer.transformer_blocks:
            block.compile(backend=compile_backend)
        ours.compile(backend=compile_backend)
        run({"peer compiled": peer_step, "ours compiled": ours_step}, max(size["repeat"] - 1, 1), nbytes(ours))
    clock.part(f"{name} compiled", compiled)

    def streamed():
        with torch.device("meta"):
            host = M.CogVideoXTransformer(cfg)
        host.load_state_dict({k: v.to("cpu") for k, v in ours.state_dict().items()}, strict=True, assign=True)
        host.eval()
        stream = BlockStream(host, dev)
        t0 = time.perf_counter()
        with stream:  # the first enter packs (and, on CUDA, pins) the host blocks
            print(f"    blocks packed in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        step, repeat = lambda: host(x, text, t), max(size["repeat"] - 1, 1)  # noqa: E731
        gpu_weights = nbytes(host) - nbytes(host.transformer_blocks)
        with stream:
            run({"ours streamed eager": step}, repeat, gpu_weights)
            if "ours compiled" in results:
                host.compile(backend=compile_backend)  # as ours: one graph for every block
                run({"ours streamed compiled": step}, repeat, gpu_weights)
    clock.part(f"{name} streamed", streamed)
    return results


# ----------------------------------------------------------------------------------------------------------------------
# 4. T5 and the VAE, for the end-to-end projection


def stages_part(size, dev, dtype):
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5Config, T5EncoderModel
    results = {}
    tc = size["t5"]
    with torch.device(dev):
        peer_t5 = T5EncoderModel(T5Config(**dataclasses.asdict(tc), is_encoder_decoder=False, use_cache=False))
    peer_t5 = peer_t5.to(dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        t5 = T5Encoder(tc)
    t5.load_state_dict({k: v for k, v in peer_t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
                       strict=True, assign=True)
    t5.eval()
    ids = torch.randint(0, tc.vocab_size, (2, size["text"]), device=dev)
    with torch.no_grad():
        r = best_of({"T5 peer": lambda: peer_t5(ids).last_hidden_state, "T5 ours": lambda: t5(ids)}, dev, 2)
    results.update({k: (s, mem + nbytes(t5)) for k, (s, mem, _, _) in r.items()})
    del peer_t5
    t5.to("cpu")

    def stage():  # what on_device does with --offload blocks: T5's blocks stream in, one ahead of the compute
        with BlockStream(t5, dev, t5.encoder.block):
            return t5(ids)
    with torch.no_grad():
        stage()  # the first entry packs the blocks into pinned host memory, once per pipeline
        s, _, mem, _ = timed(stage, dev)
    results["T5 ours, blocks streamed"] = (s, mem)
    del t5

    vc = size["vae"]
    with torch.device(dev):
        peer_vae = AutoencoderKLCogVideoX(**{f.name: getattr(vc, f.name) for f in dataclasses.fields(vc)})
    peer_vae = peer_vae.to(dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        vae = CogVideoXVAE(vc)
    vae.load_state_dict(peer_vae.state_dict(), strict=True, assign=True)
    vae.eval()
    z = torch.randn(1, vc.latent_channels, size["frames"], size["height"], size["width"], device=dev, dtype=dtype)

    def peer_decode(tiled):
        peer_vae.enable_tiling() if tiled else peer_vae.disable_tiling()
        return peer_vae.decode(z).sample
    cases = {"VAE decode peer": lambda: peer_decode(False), "VAE decode ours": lambda: vae.decode(z),
             "VAE decode ours tiled": lambda: vae.decode(z, tiled=True),
             "VAE decode peer tiled": lambda: peer_decode(True)}
    with torch.no_grad():
        vae.decode(z[:, :, :1, :8, :8]), peer_vae.decode(z[:, :, :1, :8, :8])  # warm-up: kernels, cuDNN handles
        for k, fn in cases.items():  # one decode each: at 49 x 480 x 720 they take seconds
            s, _, mem, _ = timed(fn, dev)
            results[k] = (s, mem + nbytes(vae))
    return results


# ----------------------------------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks that the script runs")
    args = p.parse_args()
    if args.smoke:  # fp32: bf16 kernels on a CPU without bf16 units are slow emulations; toy sizes: one thread
        size, dev, dtype, backend = SMOKE, torch.device("cpu"), torch.float32, "eager"
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        size, dev, dtype, backend = FULL, torch.device("cuda"), torch.bfloat16, "inductor"
    else:
        print("bench/gpu.py needs a CUDA GPU (or --smoke for the CPU check)", file=sys.stderr)
        return 2
    from diffusers.utils import logging
    logging.set_verbosity_error()
    clock = Clock()
    peak0 = matmul_peak(dtype, dev, n=size["matmul"], repeat=20)
    sdpa = clock.part("attention kernels", sdpa_part, size["transformer"]["5b"], size, dev, dtype, size["repeat"])
    steps, stages = {}, {}
    for name, cfg in size["transformer"].items():
        steps[name] = clock.part(f"{name} transformer", transformer_part, name, cfg, size, dev, dtype, clock,
                                 backend) or {}
        if name == "5b":
            stages = clock.part("5b T5 and VAE", stages_part, size, dev, dtype) or {}
        torch._dynamo.reset()  # the compiled graphs of this model, and what they hold on to
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    peak = max(peak0, matmul_peak(dtype, dev, n=size["matmul"], repeat=20))

    import diffusers
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (smoke run: toy sizes, not a measurement)"
    out = [f"## GPU: full-size 5b and 2b (`bench/gpu.py`)\n\n{gpu}; torch {torch.__version__} "
           f"(CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), diffusers {diffusers.__version__}; "
           f"{datetime.date.today()}; "
           f"{dtype} matmul peak {peak / 1e12:.1f} TFLOP/s; the run took {clock.elapsed():.0f} s.\n"]
    if sdpa:
        out.append(sdpa + "\n")
    again = max(size["repeat"] - 1, 1)
    out.append(f"One CFG step (one forward at batch 2): {size['frames']} x {size['height']} x {size['width']} "
               f"latents + {size['text']} text tokens, {dtype}, best of {size['repeat']} (compiled and streamed: "
               f"{again}); rel err: max|out - ref| / max|ref| against the peer in fp32 (TF32 off)\n\n"
               "| model | case | s/step | time/peer | MFU | weights on GPU GiB | peak GiB | rel err vs fp32 | "
               "first call s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, results in steps.items():
        for k, r in results.items():
            mode = "compiled" if "compiled" in k else "eager"
            peer = results.get(f"peer {mode}")
            ratio = f"{r['s'] / peer['s']:.3f}" if peer else "-"
            out.append(f"| {name} | {k} | {r['s']:.3f} | {ratio} | {r['flops'] / r['s'] / peak:.1%} | "
                       f"{r['gpu_weights'] / GIB:.2f} | {r['peak'] / GIB:.2f} | {r['err']:.1e} | {r['first']:.1f} |")
    if stages:
        out.append("\n5b's other stages (T5: 2 prompts of 226 tokens; the VAE decodes 13 latent frames to 49)\n\n"
                   "| stage | s | peak GiB (weights + working) |\n|---|---:|---:|")
        out += [f"| {k} | {s:.2f} | {mem / GIB:.2f} |" for k, (s, mem) in stages.items()]
    out += projection(steps.get("5b", {}), stages)
    if clock.notes:
        out.append("\nNot measured: " + "; ".join(clock.notes))
    print("\n".join(out))
    return 0


def projection(five, stages):
    """5b end to end, T5 + STEPS x step + decode, from the measured parts (lines of the report)."""
    lines = [f"\n5b, {STEPS} steps, projected from the parts above (T5 + {STEPS} x step + VAE decode):\n"]
    for who in ("peer", "ours"):
        for mode in ("eager", "compiled"):
            if f"{who} {mode}" in five and f"T5 {who}" in stages and f"VAE decode {who}" in stages:
                total = stages[f"T5 {who}"][0] + STEPS * five[f"{who} {mode}"]["s"] + stages[f"VAE decode {who}"][0]
                lines.append(f"- {who} {mode}, all on the GPU: {total:.1f} s")
    for mode in ("eager", "compiled"):
        k = f"ours streamed {mode}"
        if k in five and f"ours {mode}" in five and "VAE decode ours tiled" in stages:
            t5, vae = stages["T5 ours, blocks streamed"], stages["VAE decode ours tiled"]
            total = t5[0] + STEPS * five[k]["s"] + vae[0]
            resident = stages["T5 ours"][0] + STEPS * five[f"ours {mode}"]["s"] + stages["VAE decode ours"][0]
            peak = max(t5[1], five[k]["peak"], vae[1]) / GIB
            lines.append(f"- ours {mode}, --offload blocks, tiled VAE: {total:.1f} s ({total / resident:.2f}x all on "
                         f"the GPU), peak {peak:.2f} GiB (T5 stage {t5[1] / GIB:.2f}, step "
                         f"{five[k]['peak'] / GIB:.2f}, VAE {vae[1] / GIB:.2f})")
    return lines if len(lines) > 1 else []


if __name__ == "__main__":
    sys.exit(main())
