"""Benchmark: video-to-video (generate.py --video --strength) on the shapes demo model, recolouring, from pixels.

Source clips are rendered by shapes.py from training attributes (every shape, motion and background in turn); each
is redrawn with its caption's colour word changed ("a red square moving up ..." -> "a green square moving up ...").
Video-to-video noises the source's latents to `strength` of the schedule and denoises with the new caption, so low
strength keeps the source (old colour, same path) and strength 1 is text-to-video. Per strength, scored by
shapes.evaluate against the new caption (colour = the new one; shape, motion and background = the source's), plus
  - old colour: the fraction still read as the source's colour;
  - path px: mean distance, over frames, between the object's centroid in the output and in the source
    (bench/edit_shapes.py's measure; text-to-video at the same seeds is the reference for "path not kept").

    python bench/v2v_shapes.py                          # the bundled demo model, 24 clips, 50 steps, 0.3 ... 0.9
    python bench/v2v_shapes.py --clips 12 --strengths 0.5 0.7
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import shapes  # noqa: E402
from edit_shapes import path_px, uint8  # noqa: E402
from generate import generate  # noqa: E402
from pipeline import load_pipeline, resolve_model_path  # noqa: E402


def recolour_pairs(n: int, seed: int):
    """n source clips (uint8 (N, F, H, W, 3)), their attributes, and the target attributes (colour changed)."""
    train, _ = shapes.split()
    colours = list(shapes.COLOURS)
    sources, targets, videos = [], [], []
    for i in range(n):
        a = train[(i * 7) % len(train)]  # a stride through the training tuples: every shape, motion, background
        new = [c for c in colours if c not in (a.colour, a.background)]
        sources.append(a)
        targets.append(a._replace(colour=new[i % len(new)]))
        videos.append(shapes.make_clips(1, seed + i, [a])[0][0])
    return np.stack(videos), sources, targets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the bundled demo model (demo/shapes-tiny)")
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = load_pipeline(resolve_model_path(args.model), device="cpu")
    L = pipe.transformer.config.max_text_seq_length
    videos, sources, targets = recolour_pairs(args.clips, args.seed)
    captions = [shapes.caption(t) for t in targets]

    def row(outputs):
        table = shapes.evaluate(outputs, captions)
        table["old_colour"] = float(np.mean([shapes.classify(v).colour == s.colour for v, s in zip(outputs, sources)]))
        table["path_px"] = path_px(outputs, videos)
        return table

    rows, seconds = {"source clips": row(videos)}, {}
    for strength in args.strengths + [None]:
        t0 = time.perf_counter()
        outputs = []
        for i, (video, caption) in enumerate(zip(videos, captions)):
            frames = torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255  # (F, 3, H, W) in [0, 1]
            kw = dict(video=frames, strength=strength) if strength is not None else {}
            out = generate(pipe, caption, num_inference_steps=args.steps, guidance_scale=args.guidance,
                           seed=args.seed + i, num_frames=video.shape[0], height=video.shape[1], width=video.shape[2],
                           max_sequence_length=L, progress=False, **kw)
            outputs.append(uint8(out))
        name = f"strength {strength}" if strength is not None else "text-to-video, new caption"
        seconds[name] = (time.perf_counter() - t0) / args.clips
        rows[name] = row(np.stack(outputs))

    print(f"\n{args.clips} clips recoloured, {args.steps} DDIM steps (x strength), guidance {args.guidance}, model "
          f"{pipe.info.path}, {args.threads} threads; seconds per clip at strength 0.9: "
          f"{seconds.get('strength 0.9', float('nan')):.2f}")
    cols = ["colour", "shape", "motion", "background", "all", "old_colour"]
    print("| row | n | new " + " | ".join(cols) + " | path px |")
    print("|---|---:|" + "---:|" * (len(cols) + 1))
    for name, r in rows.items():
        print(f"| {name} | {r['n']} | " + " | ".join(f"{100 * r[c]:.0f}%" for c in cols) + f" | {r['path_px']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
