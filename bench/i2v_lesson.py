"""The image-to-video lesson: how CogVideoX-5b-I2V was made from CogVideoX-5b, redone on the demo model.

    python train_tiny.py                                          # the demo's recipe -> runs/shapes-tiny (~1.6 h)
    python bench/i2v_lesson.py --model runs/shapes-tiny --output runs/shapes-tiny-i2v      # ~13 min on 2 CPU cores
    python generate.py --model runs/shapes-tiny-i2v --image first_frame.png --prompt "a red circle moving right ..."

The base must have a real posterior: the shipped demo (v1) encodes every frame to a posterior of std 1.00 against a
spread of 0.68 between frames, so its condition latents, drawn from that posterior as every I2V pipeline does, are
mostly noise (README, "The demo model").

5b-I2V is 5b with a wider input: its patch embedding reads 32 latent channels instead of 16, the noisy video's and
the image's (the first frame, VAE-encoded and padded with zero latents to the video's length), stacked on the
channels. The new half of the embedding starts at zero, so on its first step the widened model is exactly the
text-to-video model, the image ignored; fine-tuning on clips whose own first frame is the condition teaches it to
use the image (THUDM's I2V recipe; train_lora.py's image-to-video path noises that frame and drops it 5% of the time).

1. widen(): demo/shapes-tiny's transformer with `in_channels` 8 -> 16, new channels zero; the pipeline class in
   model_index.json becomes CogVideoXImageToVideoPipeline (nothing else changes: the VAE, T5, tokenizer, scheduler).
2. `--clips` clips of the training prompts (name.gif + name.txt), and `train_lora.py --full` on them, timed.
3. The snapshot: the widened one with the fine-tuned transformer, stored in bf16 as the official I2V weights are.
4. Scored from pixels (score): for each prompt a clip is rendered with a fixed seed and its first frame is the image;
   the generated video must keep the image's colour and shape, start where the image's object is (centroid of frame
   0 within START_TOLERANCE px) and move as the prompt says. Before (the widened model) and after.
5. diffusers' CogVideoXImageToVideoPipeline on the written snapshot, one prompt and image: our frames.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import imageio.v3 as iio
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cli  # noqa: E402
import shapes  # noqa: E402
import train_lora  # noqa: E402
from checkpoint import read_json, save_component, write_json  # noqa: E402
from generate import generate  # noqa: E402
from model import load_transformer  # noqa: E402
from pipeline import load_pipeline, read_model_info  # noqa: E402
from train_tiny import fast_bf16  # noqa: E402

TOOL = "bench/i2v_lesson.py"
START_TOLERANCE = 4.0  # px: a shape moves 2-3 px a frame, so within 4 px of the image's is "starts there"
COLUMNS = ("colour", "shape", "start", "motion")


def widen(base: str, folder: str) -> None:
    """A copy of snapshot `base` at `folder` (new) whose transformer also reads the image latents: patch_embed.proj
    gets as many zero input channels as it had, the config's in_channels doubles (ModelInfo.is_i2v reads that), and
    model_index.json names the image-to-video pipeline, so diffusers loads it as one."""
    shutil.copytree(base, folder, ignore=shutil.ignore_patterns("train_log.jsonl", cli.MARKER_FILE))
    shutil.rmtree(os.path.join(folder, "transformer"))
    model = load_transformer(os.path.join(base, "transformer"))
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    w = sd["patch_embed.proj.weight"]  # (D, C, p, p): a Conv2d over [video latents; image latents] on channels
    sd["patch_embed.proj.weight"] = torch.cat([w, torch.zeros_like(w)], dim=1)  # (D, 2C, p, p)
    config = read_json(os.path.join(base, "transformer", "config.json"))
    config["in_channels"] = 2 * config["in_channels"]
    save_component(sd, config, os.path.join(folder, "transformer"))
    index = read_json(os.path.join(folder, "model_index.json"))
    write_json(os.path.join(folder, "model_index.json"), {**index, "_class_name": "CogVideoXImageToVideoPipeline"})


def write_clips(folder: str, clips: int, seed: int) -> None:
    """`clips` clips of the demo's training prompts as name.gif + name.txt: each is its own image condition."""
    train, _ = shapes.split()
    os.makedirs(folder)
    videos, captions = shapes.make_clips(clips, seed, train)
    for i, (video, text) in enumerate(zip(videos, captions)):
        iio.imwrite(os.path.join(folder, f"clip{i:05d}.gif"), video, duration=125, loop=0)
        with open(os.path.join(folder, f"clip{i:05d}.txt"), "w") as f:
            f.write(text)


def score(pipe, attrs_list, per_combo: int, steps: int, seed: int) -> dict:
    """Fraction right per column (and 'all') over len(attrs_list) * per_combo videos; the image of video k of prompt
    i is frame 0 of a clip rendered with seed + i * per_combo + k."""
    rows, asked, L = [], [], pipe.transformer.config.max_text_seq_length
    for i, attrs in enumerate(attrs_list):
        for k in range(per_combo):
            clip = shapes.render(attrs, np.random.default_rng(seed + i * per_combo + k))  # (F, H, W, 3) uint8
            image = torch.from_numpy(clip[0]).permute(2, 0, 1).float() / 255  # (3, H, W) in [0, 1]
            frames = generate(pipe, shapes.caption(attrs), image=image, num_inference_steps=steps,
                              seed=seed + i * per_combo + k, max_sequence_length=L, progress=False)
            video = shapes.from_tensor(frames[0] * 2 - 1)  # (F, H, W, 3) uint8
            pred, cx, cy, found = shapes.measure(video)
            _, gx, gy, _ = shapes.measure(clip)
            start = bool(found[0]) and np.hypot(cx[0] - gx[0], cy[0] - gy[0]) <= START_TOLERANCE
            rows.append({"colour": pred.colour == attrs.colour, "shape": pred.shape == attrs.shape, "start": start,
                         "motion": pred.motion == attrs.motion})
            asked.append(attrs.shape)
    table = {c: float(np.mean([r[c] for r in rows])) for c in COLUMNS}
    shape_of = {s: float(np.mean([r["shape"] for r, a in zip(rows, asked) if a == s])) for s in shapes.SHAPES
                if s in asked}
    return {**table, "all": float(np.mean([all(r.values()) for r in rows])), "n": len(rows), "shape_of": shape_of}


def peer_difference(model: str, steps: int = 20) -> tuple[float, float]:
    """Max |ours - diffusers' CogVideoXImageToVideoPipeline| over one prompt's frames, and the frames' range."""
    from diffusers import CogVideoXImageToVideoPipeline
    from diffusers.utils import logging
    logging.set_verbosity_error()
    _, held_out = shapes.split()
    attrs = held_out[0]
    clip = shapes.render(attrs, np.random.default_rng(7))
    image = torch.from_numpy(clip[0]).permute(2, 0, 1).float() / 255  # (3, H, W)
    peer = CogVideoXImageToVideoPipeline.from_pretrained(model)
    peer.set_progress_bar_config(disable=True)
    L = peer.transformer.config.max_text_seq_length
    kw = dict(num_frames=9, height=64, width=64, num_inference_steps=steps, guidance_scale=6.0)
    ref = peer(image=image[None], prompt=shapes.caption(attrs), negative_prompt="", output_type="pt",
               generator=torch.Generator().manual_seed(3), max_sequence_length=L, **kw).frames
    ours = generate(load_pipeline(model, device="cpu"), shapes.caption(attrs), image=image, seed=3,
                    max_sequence_length=L, progress=False, **kw)
    return (ours - ref).abs().max().item(), (ref.max() - ref.min()).item()


def print_table(results: dict) -> None:
    print("| model, prompts | n | " + " | ".join(COLUMNS) + " | all | shape: " + " / ".join(shapes.SHAPES) + " |")
    print("|---|---:|" + "---:|" * (len(COLUMNS) + 2))
    for name, r in results.items():
        by_shape = " / ".join(f"{100 * r['shape_of'][s]:.0f}" if s in r["shape_of"] else "-" for s in shapes.SHAPES)
        print(f"| {name} | {r['n']} | " + " | ".join(f"{100 * r[c]:.1f}%" for c in COLUMNS + ("all",))
              + f" | {by_shape} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True,
                   help="the text-to-video snapshot to widen: a train_tiny.py run with a real posterior (v2 or later)")
    p.add_argument("--output", required=True, help="a new folder: the image-to-video snapshot")
    p.add_argument("--clips", type=cli.positive_int, default=4000, help="training clips (each its own condition)")
    p.add_argument("--train-steps", type=cli.positive_int, default=4000)
    p.add_argument("--batch-size", type=cli.positive_int, default=16)
    p.add_argument("--lr", type=cli.positive_float, default=3e-4)
    p.add_argument("--per-combo", type=cli.positive_int, default=3, help="videos per held-out prompt (28 prompts)")
    p.add_argument("--train-per-combo", type=cli.nonnegative_int, default=1,
                   help="videos per training prompt (140 prompts; 0: skip)")
    p.add_argument("--steps", type=cli.positive_int, default=50, help="DDIM steps when scoring")
    p.add_argument("--threads", type=cli.positive_int, default=2)
    p.add_argument("--keep", default=None, help="a new folder to keep the clips and train_lora.py's run in")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = args.model
    for flag, path in (("--output", args.output), ("--keep", args.keep)):
        if path and os.path.exists(path):
            print(f"error: {flag} {path} exists; name a new folder", file=sys.stderr)
            return 2
    try:
        if read_model_info(base).is_i2v:
            raise ValueError(f"{base} is already an image-to-video model; give a text-to-video one")
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        print(f"error: --model {base}: {e}", file=sys.stderr)
        return 2
    work = args.keep or tempfile.mkdtemp(prefix="i2v-lesson-")
    widened, data, run = (os.path.join(work, d) for d in ("widened", "clips", "run"))
    widen(base, widened)
    write_clips(data, args.clips, seed=21)

    t0 = time.perf_counter()
    dtype = "bf16" if fast_bf16(torch.device("cpu")) else "fp32"
    rc = train_lora.main(["--model", widened, "--data", data, "--output", run, "--full", "--num-frames", "9",
                          "--height", "64", "--width", "64", "--steps", str(args.train_steps),
                          "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                          "--warmup", str(args.train_steps // 20), "--checkpoint-every", str(args.train_steps),
                          "--no-gradient-checkpointing", "--seed", "0", "--device", "cpu", "--dtype", dtype])
    minutes = (time.perf_counter() - t0) / 60
    if rc:
        return rc
    with cli.output_folder(args.output, TOOL) as tmp:
        os.rmdir(tmp)
        shutil.copytree(widened, tmp, ignore=shutil.ignore_patterns("transformer"))
        tuned = load_transformer(os.path.join(run, "transformer"))
        save_component({k: v.to(torch.bfloat16) for k, v in tuned.state_dict().items()},
                       read_json(os.path.join(widened, "transformer", "config.json")), os.path.join(tmp, "transformer"))

    train, held_out = shapes.split()
    results = {}
    for name, model in (("widened, before", widened), ("fine-tuned", args.output)):
        pipe = load_pipeline(model, device="cpu")
        results[f"{name}, held-out"] = score(pipe, held_out, args.per_combo, args.steps, seed=5000)
        if args.train_per_combo and model == args.output:
            results[f"{name}, training"] = score(pipe, train, args.train_per_combo, args.steps, seed=6000)
    err, span = peer_difference(args.output)

    print(f"\nI2V lesson on {base}: {args.clips} clips, train_lora.py --full, {args.train_steps} steps of batch "
          f"{args.batch_size}, lr {args.lr:g}, {dtype}, {args.threads} threads: {minutes:.1f} min end to end; "
          f"scored with {args.steps} DDIM steps, guidance 6, start within {START_TOLERANCE:g} px")
    print_table(results)
    print(f"diffusers CogVideoXImageToVideoPipeline vs ours, one held-out prompt, 20 steps: max abs {err:.2e} "
          f"({err / span:.1e} of the frames' range)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
