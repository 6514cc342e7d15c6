"""The LoRA lesson: teach the demo model a colour its training data never had (cyan) with train_lora.py on the CPU,
and measure the lesson from pixels.

    python bench/lora_lesson.py                      # demo/shapes-tiny; ~15 min on one CPU thread, ~3 of them training
    python bench/lora_lesson.py --keep runs/lesson   # keep the clips and the LoRA (generate.py --lora runs/lesson/lora)

1. Data, as train_lora.py reads it (name.gif + name.txt pairs): `--clips` cyan clips over every shape, motion and
   background, and `--prior-clips` (default as many) clips of the demo's training prompts. The second set is a
   prior-preservation set (as in DreamBooth): without it the cheapest way to lower the loss is to make every colour a
   bit more cyan. `--prior own` makes those clips with the model itself, as DreamBooth does (measured worse here:
   the README's "What the shape cost comes from").
2. train_lora.py on those clips, timed end to end (validation, caching, training, writing the file).
3. Scored by shapes.evaluate before and after: every cyan prompt (36) with `--per-combo` seeds, and the held-out
   prompts with `--held-out-per-combo` seeds (the README's table uses 10: n = 280), to see what the lesson cost.
4. diffusers' CogVideoXPipeline with load_lora_weights(the LoRA folder) on one cyan prompt: our frames.
"""
import argparse
import os
import sys
import tempfile
import time

import imageio.v3 as iio
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import shapes  # noqa: E402
import train_lora  # noqa: E402
from evaluate import evaluate_model  # noqa: E402
from generate import generate  # noqa: E402
from pipeline import load_pipeline, resolve_model_path  # noqa: E402
from lora import load_lora  # noqa: E402

COLOUR = "cyan"
LESSON = [shapes.Attrs(COLOUR, s, m, b) for s in shapes.SHAPES for m in shapes.MOTIONS for b in shapes.BACKGROUNDS]


def own_clips(model: str, n: int, seed: int, attrs_list):
    """n videos the model itself makes of prompts drawn from attrs_list (generate.py's defaults: 50 DDIM steps,
    guidance 6), as make_clips returns them: the prompts make_clips draws, so the renders' prior and this one match."""
    _, captions = shapes.make_clips(n, seed, attrs_list)
    pipe = load_pipeline(model, device="cpu")
    L = pipe.transformer.config.max_text_seq_length
    videos = [shapes.from_tensor(generate(pipe, c, seed=seed + i, max_sequence_length=L, progress=False)[0] * 2 - 1)
              for i, c in enumerate(captions)]  # (F, H, W, 3) uint8 each
    return np.stack(videos), captions


def write_clips(folder: str, clips: int, prior: int, seed: int, own: str | None = None) -> None:
    """`clips` cyan clips and `prior` clips of the training prompts, as name.gif + name.txt; with `own` (a model
    path) the prior clips are that model's own videos of those prompts, as DreamBooth's prior preservation uses."""
    train, _ = shapes.split()
    os.makedirs(folder)
    for tag, attrs, n, s in (("new", LESSON, clips, seed), ("old", train, prior, seed + 1)):
        if tag == "old" and own:
            videos, captions = own_clips(own, n, s, attrs)
        else:
            videos, captions = shapes.make_clips(n, s, attrs)
        for i, (video, text) in enumerate(zip(videos, captions)):
            iio.imwrite(os.path.join(folder, f"{tag}{i:04d}.gif"), video, duration=125, loop=0)
            with open(os.path.join(folder, f"{tag}{i:04d}.txt"), "w") as f:
                f.write(text)


def score(model: str, lora: str | None, per_combo: int, held_per_combo: int, steps: int) -> dict:
    pipe = load_pipeline(model, device="cpu")
    if lora:
        load_lora(pipe.transformer, lora)
    _, held_out = shapes.split()
    # seeds 1000+: not the ones the README's held-out table draws (0+)
    return {f"{COLOUR} prompts": evaluate_model(pipe, LESSON, per_combo, steps, 6.0, seed=1000),
            "held-out prompts": evaluate_model(pipe, held_out, held_per_combo, steps, 6.0, seed=1000)}


def peer_difference(model: str, lora_folder: str) -> tuple[float, float]:
    """Max |ours - diffusers| over the frames of one cyan prompt (20 steps), and the frames' range."""
    from diffusers import CogVideoXPipeline
    from diffusers.utils import logging
    logging.set_verbosity_error()
    prompt = shapes.caption(shapes.Attrs(COLOUR, "triangle", "left", "gray"))
    peer = CogVideoXPipeline.from_pretrained(model)
    peer.load_lora_weights(lora_folder)
    peer.set_progress_bar_config(disable=True)
    L = peer.transformer.config.max_text_seq_length
    kw = dict(num_frames=9, height=64, width=64, num_inference_steps=20, guidance_scale=6.0)
    ref = peer(prompt=prompt, negative_prompt="", generator=torch.Generator().manual_seed(3), output_type="pt",
               max_sequence_length=L, **kw).frames
    pipe = load_pipeline(model, device="cpu")
    load_lora(pipe.transformer, lora_folder)
    ours = generate(pipe, prompt, seed=3, max_sequence_length=L, progress=False, **kw)
    return (ours - ref).abs().max().item(), (ref.max() - ref.min()).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the bundled demo model (demo/shapes-tiny)")
    p.add_argument("--clips", type=int, default=288, help="cyan clips")
    p.add_argument("--prior-clips", type=int, default=None, help="clips of the training prompts (default: --clips)")
    p.add_argument("--prior", choices=("renders", "own"), default="renders",
                   help="the prior clips: rendered by shapes.py, or the model's own videos of those prompts")
    p.add_argument("--train-steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--caption-dropout", type=float, default=0.3, help="train_lora.py's: a share of empty captions")
    p.add_argument("--per-combo", type=int, default=2, help="videos per cyan prompt (36 prompts)")
    p.add_argument("--held-out-per-combo", type=int, default=10, help="videos per held-out prompt (28 prompts)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps when scoring")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", default=None, help="a new folder to keep the clips and the LoRA in")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = resolve_model_path(args.model)
    if args.keep and os.path.exists(args.keep):
        print(f"error: --keep {args.keep} exists; name a new folder", file=sys.stderr)
        return 2
    work = args.keep or tempfile.mkdtemp(prefix="lora-lesson-")
    data, out = os.path.join(work, "clips"), os.path.join(work, "lora")
    prior = args.clips if args.prior_clips is None else args.prior_clips
    write_clips(data, args.clips, prior, seed=11, own=model if args.prior == "own" else None)

    t0 = time.perf_counter()
    rc = train_lora.main(["--model", model, "--data", data, "--output", out, "--num-frames", "9", "--height", "64",
                          "--width", "64", "--rank", str(args.rank), "--alpha", str(args.rank),
                          "--steps", str(args.train_steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                          "--warmup", str(args.train_steps // 10), "--checkpoint-every", str(args.train_steps),
                          "--caption-dropout", str(args.caption_dropout),
                          "--no-gradient-checkpointing", "--seed", "0", "--device", "cpu"])  # fp32 on a CPU
    minutes = (time.perf_counter() - t0) / 60
    if rc:
        return rc
    results = {}
    for name, lora in (("before", None), ("after", out)):
        for prompts, table in score(model, lora, args.per_combo, args.held_out_per_combo, args.steps).items():
            results[f"{prompts}, {name}"] = table
    err, span = peer_difference(model, out)

    print(f"\nLoRA lesson on {model}: {args.clips + prior} clips ({args.clips} {COLOUR}, prior: {args.prior}), "
          f"rank {args.rank}, "
          f"{args.train_steps} steps of batch {args.batch_size}, lr {args.lr}, caption dropout {args.caption_dropout}, "
          f"fp32, {args.threads} threads: "
          f"train_lora.py took {minutes:.1f} min end to end; scored with {args.steps} DDIM steps, guidance 6")
    shapes.print_table(results)
    print(f"diffusers load_lora_weights vs ours, one {COLOUR} prompt, 20 steps: max abs {err:.2e} "
          f"({err / span:.1e} of the frames' range)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
