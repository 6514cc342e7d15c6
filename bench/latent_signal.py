"""How far apart a demo VAE keeps shapes and colours in latent space: the same clip (start, size, speed, background)
drawn as a red circle, a red square, a red triangle and a blue circle is encoded, and the mean square difference of
the posterior means of each pair is divided by the variance of all those means, per latent frame and overall.

Why it matters: the transformer learns what its v-prediction loss pays for, and a pair of prompts whose latents differ
by ~1% of their variance (circle and square in the v1 and early v2 VAEs) is worth almost nothing in that loss
(README, the demo model section; train_tiny.shape_separation is the fix).

    python bench/latent_signal.py demo/shapes-tiny runs/shapes-tiny
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import shapes  # noqa: E402
from vae import load_vae  # noqa: E402

PAIRS = {"circle-square": ("red", "square"), "circle-triangle": ("red", "triangle"), "red-blue": ("blue", "circle")}


@torch.no_grad()
def latent_signal(vae, clips=24):
    """{pair: (overall, [per latent frame])}, each a mean square difference over the means' variance."""
    diffs, means = {k: [] for k in PAIRS}, []
    for seed in range(clips):
        motion, background = list(shapes.MOTIONS)[seed % 4], list(shapes.BACKGROUNDS)[seed % 3]
        def encode(colour, shape):
            frames = shapes.render(shapes.Attrs(colour, shape, motion, background), np.random.default_rng(seed))
            return vae.encode(shapes.to_tensor(frames[None]).transpose(1, 2))[0][0]  # (C, T, h, w)
        ref = encode("red", "circle")
        means.append(ref)
        for name, (colour, shape) in PAIRS.items():
            z = encode(colour, shape)
            means.append(z)
            diffs[name].append((ref - z).square().mean((0, 2, 3)))  # (T,)
    var = torch.stack(means).var().item()
    return {k: (torch.stack(v).mean().item() / var, (torch.stack(v).mean(0) / var).tolist()) for k, v in diffs.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="snapshot folders (their vae/ is read)")
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | " + " | ".join(PAIRS) + " |\n|---|" + "---:|" * len(PAIRS))
    for model in args.models:
        res = latent_signal(load_vae(os.path.join(model, "vae")), args.clips)
        print(f"| {model} | " + " | ".join(f"{a:.3f} ({', '.join(f'{x:.3f}' for x in per)})"
                                          for a, per in res.values()) + " |")


if __name__ == "__main__":
    main()
