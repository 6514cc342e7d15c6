"""Score a moving-shapes model from its pixels: generate for held-out and training prompts, print accuracy tables.

    python evaluate.py                                   # demo/shapes-tiny, 50 DDIM steps, guidance 6 (generate.py's)
    python evaluate.py --steps 10 --guidance 3 --per-combo 2 --sets held-out

Prompts are every colour/shape/motion/background tuple of shapes.split(): held out (combinations never seen in
training) and training ones; each gets `--per-combo` videos with fixed seeds, scored by shapes.evaluate. The default
command makes 168 videos (28 held-out prompts, 140 training ones) of 50 steps: see the README for its run time.
"""
import sys

import numpy as np
import torch
from tqdm import tqdm

import cli
import shapes
from generate import generate
from pipeline import load_pipeline, read_model_info, resolve_model_path

SETS = ("held-out", "train")


def evaluate_model(pipe, attrs_list, per_combo, steps, guidance, seed=0, bar=None):
    """bar: a tqdm bar advanced by one per video."""
    captions = [shapes.caption(a) for a in attrs_list]
    videos, labels = [], []
    max_len = pipe.transformer.config.max_text_seq_length
    for i, c in enumerate(captions):
        frames = generate(pipe, c, num_videos=per_combo, num_inference_steps=steps, guidance_scale=guidance,
                          seed=seed + i, max_sequence_length=max_len, progress=False)  # (n, F, 3, H, W) in [0, 1]
        videos.append(shapes.from_tensor(frames * 2 - 1))  # (n, F, H, W, 3) uint8
        labels += [c] * per_combo
        if bar is not None:
            bar.update(per_combo)
    return shapes.evaluate(np.concatenate(videos), labels)


def report(model: str | None = None, per_combo: int = 1, steps: int = 50, guidance: float = 6.0,
           sets=SETS, device="cpu", progress: bool = True) -> dict:
    """Load `model` (None: the bundled demo), score the chosen prompt sets and print the table; returns
    {set: results}. progress: a bar over the videos on stderr."""
    pipe = load_pipeline(model, device=device)
    train, held_out = shapes.split()
    chosen = [(name, attrs) for name, attrs in (("held-out", held_out), ("train", train)) if name in sets]
    with tqdm(total=per_combo * sum(len(a) for _, a in chosen), desc="videos", unit="video",
              disable=not progress) as bar:
        results = {name: evaluate_model(pipe, attrs, per_combo, steps, guidance, bar=bar) for name, attrs in chosen}
    print(f"{pipe.info.path}: {steps} DDIM steps, guidance {guidance:g}, {per_combo} video(s) per prompt")
    shapes.print_table(results)
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Fidelity of one video to another (bench/fidelity.py: a speed option's frames against the default run's)

def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two videos in [0, 1] (any equal shapes): 10 log10(1 / MSE). Identical
    videos give inf."""
    mse = (x.double() - y.double()).square().mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """Structural similarity (Wang et al. 2004, eq. 13) of two videos (F, 3, H, W) in [0, 1], averaged over frames,
    channels and positions: local means, variances and covariance under an 11x11 Gaussian window of std 1.5 (only
    where it fits whole, as scikit-image's gaussian_weights=True), C1 = (0.01)^2, C2 = (0.03)^2 for a data range of 1.
    SSIM compares local structure, which PSNR (one global mean square) does not: a shifted edge costs PSNR a lot and
    SSIM little, a blurred corner the reverse."""
    g = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5 ** 2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]  # (1, 1, 11, 11), sums to 1
    x, y = (v.double().reshape(-1, 1, *v.shape[-2:]) for v in (x, y))  # (F*3, 1, H, W)
    blur = lambda v: torch.nn.functional.conv2d(v, window)  # local (weighted) mean, (F*3, 1, H-10, W-10)
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = (2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean().item()


def main(argv=None) -> int:
    p = cli.ArgumentParser(description="Colour / shape / motion accuracy of a moving-shapes model, from the pixels of "
                                        "its videos.")
    p.add_argument("--model", default=None, help="a snapshot folder (default: the bundled demo model)")
    p.add_argument("--per-combo", type=cli.positive_int, default=1, help="videos per prompt")
    p.add_argument("--steps", type=cli.positive_int, default=50, help="DDIM steps per video")
    p.add_argument("--guidance", type=cli.nonnegative_float, default=6.0,
                   help="classifier-free guidance scale (<= 1: no guidance)")
    p.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS),
                   help="which prompts: held-out (28 combinations never trained on), train (140)")
    p.add_argument("--threads", type=cli.positive_int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    args = p.parse_args(argv)

    def work():  # every value is checked, and the snapshot's configs read, before any weight is
        device = cli.pick_device(args.device)
        info = read_model_info(resolve_model_path(args.model))
        torch.set_num_threads(args.threads)
        report(info.path, args.per_combo, args.steps, args.guidance, args.sets, device)
    return cli.run(work)


if __name__ == "__main__":
    sys.exit(main())

