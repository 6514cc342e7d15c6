"""Score a moving-shapes model from its pixels: generate for held-out and training prompts, print accuracy tables.

    python evaluate.py                                   # demo/shapes-tiny, 50 DDIM steps, guidance 6 (generate.py's)
    python evaluate.py --steps 10 --guidance 3 --per-combo 2 --sets held-out

Prompts are every colour/shape/motion/background tuple of shapes.split(): held out (combinations never seen in
training) and training ones; each gets `--per-combo` videos with fixed seeds, scored by shapes.evaluate.
"""
import argparse
import sys

import numpy as np
import torch

import shapes
from generate import DEMO_MODEL, generate, load_pipeline


def evaluate_model(pipe, attrs_list, per_combo, steps, guidance, seed=0):
    captions = [shapes.caption(a) for a in attrs_list]
    videos, labels = [], []
    max_len = pipe.transformer.config.max_text_seq_length
    for i, c in enumerate(captions):
        frames = generate(pipe, c, num_videos=per_combo, num_inference_steps=steps, guidance_scale=guidance,
                          seed=seed + i, max_sequence_length=max_len, progress=False)  # (n, F, 3, H, W) in [0, 1]
        videos.append(shapes.from_tensor(frames * 2 - 1))  # (n, F, H, W, 3) uint8
        labels += [c] * per_combo
    return shapes.evaluate(np.concatenate(videos), labels)


def report(model: str = DEMO_MODEL, per_combo: int = 1, steps: int = 50, guidance: float = 6.0,
           sets=("held-out", "train"), device="cpu") -> dict:
    """Load `model`, score the chosen prompt sets and print the table; returns {set: results}."""
    pipe = load_pipeline(model, device=device)
    train, held_out = shapes.split()
    results = {name: evaluate_model(pipe, attrs, per_combo, steps, guidance)
               for name, attrs in (("held-out", held_out), ("train", train)) if name in sets}
    print(f"{model}: {steps} DDIM steps, guidance {guidance}, {per_combo} video(s) per prompt")
    shapes.print_table(results)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description="Colour / shape / motion accuracy of a moving-shapes model.")
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--per-combo", type=int, default=1, help="videos per prompt")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--sets", nargs="+", choices=("held-out", "train"), default=("held-out", "train"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return report(args.model, args.per_combo, args.steps, args.guidance, args.sets, args.device)


if __name__ == "__main__":
    main()
    sys.exit(0)
