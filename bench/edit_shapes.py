"""Benchmark: video editing by DDIM inversion (edit.py) on the shapes demo model, scored from pixels.

Each clip is a red circle sliding in one of the four directions on a black, gray or white background (one clip per
combination, 12 in all by default). Each is edited from "a red circle moving <m> on a <b> background" into "a blue
circle moving <m> on a <b> background". A good edit changes the colour and keeps everything else: the shape, the
background, the direction and the path. Scored with shapes.evaluate against the target caption (colour = blue,
motion = the source's direction, ...), plus:
  - red left: the fraction still classified red (the edit did nothing);
  - path px: the mean distance, over frames, between the object's centroid in the edit and in the source clip.
Rows: the source clips themselves (the evaluator's ceiling), plain text-to-video with the target caption at the same
seed (what the prompt alone gives: right colour and direction, but its own path), and each edit method.
Note that "blue circle moving left" is one of the held-out combinations the demo model never saw in training.

    python bench/edit_shapes.py                          # the bundled demo model, 12 clips, 50 steps
    python bench/edit_shapes.py --clips 24 --steps 25 --methods inject plain --guidance 6
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
from edit import check_edit, edit  # noqa: E402
from generate import generate  # noqa: E402
from pipeline import load_pipeline, resolve_model_path  # noqa: E402


def source_clips(n: int, seed: int):
    """n red-circle clips cycling through every (motion, background) pair: uint8 (N, F, H, W, 3), source captions."""
    combos = [shapes.Attrs("red", "circle", m, b) for b in ("black", "gray", "white") for m in shapes.MOTIONS]
    videos = [shapes.make_clips(1, seed + i, [combos[i % len(combos)]])[0][0] for i in range(n)]
    return np.stack(videos), [shapes.caption(combos[i % len(combos)]) for i in range(n)]


def centroids(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) uint8 -> (F, 2) centroid (x, y) of the pixels that differ from the background by more than half
    the largest difference (the background is the median border colour, as shapes.classify reads it)."""
    x = frames.astype(np.float32) / 255
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1).reshape(-1, 3)
    d = np.linalg.norm(x - np.median(border, axis=0), axis=-1)                  # (F, H, W)
    mask = d > 0.5 * d.max(axis=(1, 2), keepdims=True)
    py, px = np.mgrid[0:x.shape[1], 0:x.shape[2]] + 0.5
    area = np.maximum(mask.sum((1, 2)), 1)
    return np.stack([(mask * px).sum((1, 2)) / area, (mask * py).sum((1, 2)) / area], axis=1)


def uint8(frames: torch.Tensor) -> np.ndarray:
    """(1, F, 3, H, W) in [0, 1] -> (F, H, W, 3) uint8, rounded as evaluate.py does."""
    return shapes.from_tensor(frames[0] * 2 - 1)


def path_px(videos: np.ndarray, sources: np.ndarray) -> float:
    """Mean distance, over frames and videos, between the object's centroid in each video and in its source."""
    return float(np.mean([np.linalg.norm(centroids(v) - centroids(s), axis=1).mean() for v, s in zip(videos, sources)]))


def score(videos: np.ndarray, targets: list[str], sources: np.ndarray) -> dict:
    table = shapes.evaluate(videos, targets)
    table["red_left"] = float(np.mean([shapes.classify(v).colour == "red" for v in videos]))
    table["path_px"] = path_px(videos, sources)
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the bundled demo model (demo/shapes-tiny)")
    p.add_argument("--clips", type=int, default=12)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--methods", nargs="+", default=["inject", "plain"], choices=["inject", "plain"])
    p.add_argument("--source-prompt", choices=["empty", "caption"], default="empty",
                   help="condition the inversion on the empty prompt (official) or the source caption")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--save", default=None, help="a folder to write the contact sheets of every row into")
    args = p.parse_args(argv)

    try:
        pipe = load_pipeline(resolve_model_path(args.model), device=args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    L = pipe.transformer.config.max_text_seq_length
    sources, captions = source_clips(args.clips, args.seed)
    targets = [c.replace("a red circle", "a blue circle") for c in captions]
    results, seconds, outputs = {}, {}, {}
    results["source clips (ceiling)"] = score(sources, captions, sources)

    t0 = time.perf_counter()
    t2v = [uint8(generate(pipe, t, num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed + i,
                          num_frames=sources.shape[1], height=sources.shape[2], width=sources.shape[3],
                          max_sequence_length=L, progress=False)) for i, t in enumerate(targets)]
    seconds["t2v"] = (time.perf_counter() - t0) / args.clips
    outputs["text-to-video, target caption"] = np.stack(t2v)

    for method in args.methods:
        try:
            check_edit(pipe.info, method)
        except ValueError as e:
            print(f"skipping {method}: {e}")
            continue
        t0 = time.perf_counter()
        edited = []
        for i, (src, cap, tgt) in enumerate(zip(sources, captions, targets)):
            frames = torch.from_numpy(src).permute(0, 3, 1, 2).float() / 255       # (F, 3, H, W) in [0, 1]
            out = edit(pipe, frames, tgt, method=method, height=src.shape[1], width=src.shape[2],
                       num_inference_steps=args.steps, seed=args.seed + i,
                       guidance_scale=args.guidance, source_prompt=cap if args.source_prompt == "caption" else "",
                       max_sequence_length=L, progress=False)
            edited.append(uint8(out))
        seconds[method] = (time.perf_counter() - t0) / args.clips
        outputs[f"edit {method}, source prompt {args.source_prompt}"] = np.stack(edited)

    for name, videos in outputs.items():
        results[name] = score(videos, targets, sources)

    print(f"\n{args.clips} clips, {args.steps} DDIM steps, guidance {args.guidance}, model {pipe.info.path}, "
          f"{args.device}; seconds per clip: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    cols = ["colour", "shape", "motion", "background", "all", "red_left"]
    print("| row | n | " + " | ".join(cols) + " | path px |")
    print("|---|---:|" + "---:|" * (len(cols) + 1))
    for name, r in results.items():
        print(f"| {name} | {r['n']} | " + " | ".join(f"{100 * r[c]:.0f}%" for c in cols) + f" | {r['path_px']:.1f} |")
    if args.save:
        import imageio.v3 as iio
        from media import contact_sheet
        os.makedirs(args.save, exist_ok=True)
        for name, videos in {"source": sources, **outputs}.items():
            sheet = np.concatenate([contact_sheet(v, columns=v.shape[0]) for v in videos])
            iio.imwrite(os.path.join(args.save, name.split(",")[0].replace(" ", "_") + ".png"), sheet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
