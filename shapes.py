"""Moving shapes: a procedural video data set with captions, a held-out split, and a pixel-level evaluator.

A clip is one coloured shape sliding in a straight line across a plain background, captioned e.g.
"a red circle moving right on a black background". It exists so a tiny CogVideoX can be trained from scratch on
2 CPU cores in minutes, and so what it generates can be scored without a learned judge.

Choices, and why:
- 9 frames of 64x64: the causal VAE compresses 4x in time and 8x in space, so a clip becomes 3x8x8 latents
  (1 + 8/4 frames) -- 48 tokens with the transformer's 2x2 patches, cheap enough to train on a CPU.
- Shapes are big (half-extent 9-14 px, i.e. 1-2 latent pixels from centre to edge) so they survive the 8x spatial
  compression, and they move 2-3 px per frame (16-24 px over the clip, 2-3 latent pixels) so motion is visible in
  3 latent frames. The whole path stays inside the frame, so the evaluator always sees the whole shape.
- Colours are the saturated corners of the RGB cube (all pairwise distances >= 1), backgrounds are black, gray and
  white; every object/background pair differs by >= 0.86 in RGB, so colours stay distinguishable after a lossy VAE.
  White objects are never drawn on a white background. Cyan, the last corner, is kept out of the training data
  (NEW_COLOURS) for the LoRA lesson; it is >= 0.86 from every background too.
- Triangles point up; shapes are drawn with a 1-px anti-aliased edge from a signed distance, which keeps sub-pixel
  motion smooth.
- Held out: 10 of the 60 colour/shape/motion combinations (17%), on every background. Every colour, shape and motion,
  and every *pair* of them, still appears in training, so the held-out prompts test composition, not new words.
  The README prompt (red circle, right) is a training combination.
- Evaluator, from pixels only: background = nearest background colour to the median border pixel; object = pixels
  more than half-way (in RGB) from the background to the object colour, cleaned by a 3x3 opening; colour = nearest
  palette colour (other than the background) to the median of the most distant pixels; shape = best IoU, summed
  over frames, between the object mask and a circle / square / upward triangle of the same area and centroid (not
  the bounding box, so blurred corners and a lost triangle tip do not flip the answer); motion = sign of the
  dominant axis of the least-squares centroid velocity, if the centroid moves >= 4 px over the clip. A frame whose
  "object" is too small, too big or fits no shape (IoU < 0.6) holds no object; a video with fewer than half its
  frames holding one (blank, noise) gets no colour, shape or motion, which always scores wrong. It reads 100% on
  clean clips and on clips blurred with a 2-px Gaussian or 4x average-pooled and upsampled.

Frames are uint8 arrays (F, H, W, 3), the layout of a decoded mp4; `to_tensor` turns them into VAE input.
Legend: N clips, F frames, H height, W width (pixels), 3 RGB channels.
"""
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "white": (1, 1, 1)}
# A colour no training clip has, for the LoRA lesson (bench/lora_lesson.py): split() never draws it, but captions,
# render and the evaluator know it, so a video asked to be cyan and drawn blue or green scores wrong, and vice versa.
NEW_COLOURS = {"cyan": (0, 1, 1)}
ALL_COLOURS = {**COLOURS, **NEW_COLOURS}
SHAPES = ("circle", "square", "triangle")
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), image y points down
BACKGROUNDS = {"black": (0, 0, 0), "gray": (0.5, 0.5, 0.5), "white": (1, 1, 1)}

# colour, shape, motion; each colour twice, each shape and motion 2-4 times, no pair of attributes repeated.
HELD_OUT = (
    ("red", "square", "up"), ("red", "triangle", "left"),
    ("green", "circle", "down"), ("green", "triangle", "right"),
    ("blue", "circle", "left"), ("blue", "square", "right"),
    ("yellow", "square", "down"), ("yellow", "triangle", "up"),
    ("white", "circle", "up"), ("white", "square", "left"),
)


class Attrs(NamedTuple):
    colour: str
    shape: str
    motion: str
    background: str


@dataclass(frozen=True)
class ClipConfig:
    num_frames: int = 9
    height: int = 64
    width: int = 64
    size: tuple = (9.0, 14.0)   # half-extent range in pixels: circle radius, half the side of square and triangle
    speed: tuple = (2.0, 3.0)   # pixels per frame

    def __post_init__(self):
        travel = self.speed[1] * (self.num_frames - 1)
        if 2 * self.size[1] + travel > min(self.height, self.width):
            raise ValueError(f"ClipConfig: a shape of half-extent {self.size[1]} moving {travel:.0f} px does not fit "
                             f"in {self.height}x{self.width}; lower size/speed/num_frames or enlarge the frame")


# ---------------------------------------------------------------- captions

def caption(attrs):
    return f"a {attrs.colour} {attrs.shape} moving {attrs.motion} on a {attrs.background} background"


_CAPTION = re.compile(r"an? (\w+) (\w+) moving (\w+) on an? (\w+) background")


def parse_caption(text):
    m = _CAPTION.fullmatch(text.strip().lower().rstrip("."))
    if m is None:
        raise ValueError(f"caption {text!r} is not of the form 'a <colour> <shape> moving <direction> on a "
                         f"<background> background'")
    attrs = Attrs(*m.groups())
    for value, known in zip(attrs, (ALL_COLOURS, SHAPES, MOTIONS, BACKGROUNDS)):
        if value not in known:
            raise ValueError(f"caption {text!r}: unknown word {value!r}; expected one of {list(known)}")
    return attrs


def split():
    """All valid attribute tuples as (train, held_out), held_out = the HELD_OUT combinations on every background."""
    every = [Attrs(c, s, m, b) for c in COLOURS for s in SHAPES for m in MOTIONS for b in BACKGROUNDS if c != b]
    held = set(HELD_OUT)
    return [a for a in every if a[:3] not in held], [a for a in every if a[:3] in held]


# ---------------------------------------------------------------- rendering

def signed_distance(shape, dx, dy, s):
    """Distance in pixels outside (>0) / inside (<0) a shape of half-extent s centred at the origin."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - s
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - s
    # triangle with apex (0, -s) and base corners (+-s, s): the base line and the two slanted edges
    return np.maximum(dy - s, (2 * np.abs(dx) - dy - s) / np.sqrt(5))


def render(attrs, rng, cfg=ClipConfig(), rgb=None):
    """One clip as uint8 (F, H, W, 3); the start position, size and speed are drawn from rng (np.random.Generator).
    rgb (three values in [0, 1]) paints the shape in a colour that has no name, instead of attrs.colour."""
    F, H, W = cfg.num_frames, cfg.height, cfg.width
    s = rng.uniform(*cfg.size)
    speed = rng.uniform(*cfg.speed)
    dx, dy = MOTIONS[attrs.motion]
    travel = speed * (F - 1)
    # start so that the whole path stays inside the frame
    x0 = rng.uniform(s + travel * (dx < 0), W - s - travel * (dx > 0))
    y0 = rng.uniform(s + travel * (dy < 0), H - s - travel * (dy > 0))
    t = np.arange(F)[:, None, None]
    cx, cy = (x0 + dx * speed * t).astype(np.float32), (y0 + dy * speed * t).astype(np.float32)  # (F, 1, 1)
    py, px = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5  # pixel centres, (H, W)
    cover = np.clip(0.5 - signed_distance(attrs.shape, px - cx, py - cy, s), 0, 1)  # (F, H, W)
    bg, fg = np.array(BACKGROUNDS[attrs.background]), np.array(ALL_COLOURS[attrs.colour] if rgb is None else rgb)
    palette = np.round(255 * (bg + np.linspace(0, 1, 256)[:, None] * (fg - bg))).astype(np.uint8)  # (256, 3)
    return palette[np.round(255 * cover).astype(np.uint8)]  # (F, H, W, 3)


def make_clips(n, seed, attrs_list, cfg=ClipConfig(), paint=None):
    """n clips with attributes drawn uniformly from attrs_list: uint8 (N, F, H, W, 3) and their captions.
    paint(rng, attrs): an unnamed colour for that clip's shape (render's rgb), or None for its caption's."""
    rng = np.random.default_rng(seed)
    picks = [attrs_list[i] for i in rng.integers(len(attrs_list), size=n)]
    videos = np.stack([render(a, rng, cfg, paint and paint(rng, a)) for a in picks])  # (N, F, H, W, 3)
    return videos, [caption(a) for a in picks]


def to_tensor(frames):
    """uint8 (..., F, H, W, 3) -> float32 torch (..., F, 3, H, W) in [-1, 1] (the VAE's input range)."""
    x = torch.as_tensor(np.asarray(frames)).float().div(127.5).sub(1)
    return x.movedim(-1, -3)  # (..., F, 3, H, W)


def from_tensor(x):
    """float torch (..., F, 3, H, W) in [-1, 1] -> uint8 numpy (..., F, H, W, 3)."""
    x = (x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8).movedim(-3, -1).numpy()  # (..., F, H, W, 3)


# ---------------------------------------------------------------- evaluator

def _nearest(rgb, palette, exclude=()):
    names = [k for k in palette if k not in exclude]
    d = [np.linalg.norm(rgb - np.array(palette[k])) for k in names]
    return names[int(np.argmin(d))]


def _open(mask):
    """Morphological opening of (F, H, W) masks with a 3x3 square: drops specks and lines under 3 px, keeps corners."""
    H, W = mask.shape[-2:]
    shifts = [(i, j) for i in range(3) for j in range(3)]
    p = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    core = np.all([p[:, i:i + H, j:j + W] for i, j in shifts], axis=0)
    p = np.pad(core, ((0, 0), (1, 1), (1, 1)))
    return np.any([p[:, i:i + H, j:j + W] for i, j in shifts], axis=0)


def _fit_shapes(mask):
    """Area, centroid and IoU with each shape of the same area and centroid, for (F, H, W) masks.

    Matching area and centroid rather than the bounding box keeps this robust to blurred or clipped corners."""
    py, px = np.mgrid[0:mask.shape[1], 0:mask.shape[2]] + 0.5  # pixel centres, (H, W)
    area = mask.sum((1, 2))  # (F,)
    a = np.maximum(area, 1)[:, None, None]
    cx, cy = (mask * px).sum((1, 2), keepdims=True) / a, (mask * py).sum((1, 2), keepdims=True) / a  # (F, 1, 1)
    ious = []
    for shape, s in (("circle", np.sqrt(a / np.pi)), ("square", np.sqrt(a) / 2), ("triangle", np.sqrt(a / 2))):
        ty = cy - s / 3 if shape == "triangle" else cy  # a triangle's centroid lies s/3 below its box centre
        t = signed_distance(shape, px - cx, py - ty, s) <= 0  # (F, H, W)
        ious.append((mask & t).sum((1, 2)) / np.maximum((mask | t).sum((1, 2)), 1))
    return area, cx.ravel(), cy.ravel(), np.stack(ious, 1)  # (F,), (F,), (F,), (F, shapes)


def classify(frames, cfg=ClipConfig()):
    """Attributes read from the pixels of uint8 (F, H, W, 3) frames; colour/shape/motion are None if no object."""
    return measure(frames, cfg)[0]


def measure(frames, cfg=ClipConfig()):
    """classify's Attrs, and where the object is: centroids cx, cy (F,) in pixels and found (F,), the frames that
    hold one shape (all False when there is no object)."""
    x = np.asarray(frames, np.float32) / 255  # (F, H, W, 3)
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1).reshape(-1, 3)
    bg = np.median(border, axis=0)
    background = _nearest(bg, BACKGROUNDS)
    dist = np.linalg.norm(x - bg, axis=-1)  # (F, H, W)
    area_lo, area_hi = 0.5 * 2 * cfg.size[0] ** 2, 1.5 * 4 * cfg.size[1] ** 2  # smallest triangle, largest square
    far = np.quantile(dist, 1 - area_lo / dist[0].size / 2)  # a distance reached inside any object
    none = np.zeros(len(x), bool)
    if far < 0.3:
        return Attrs(None, None, None, background), np.full(len(x), np.nan), np.full(len(x), np.nan), none
    fg = np.median(x[dist > 0.7 * far], axis=0)
    mask = _open(dist > 0.5 * np.linalg.norm(fg - bg))  # half coverage, whatever the contrast
    area, cx, cy, iou = _fit_shapes(mask)
    found = (area >= area_lo) & (area <= area_hi) & (iou.max(1) >= 0.6)  # (F,) frames that hold one shape
    if found.sum() < max(2, len(x) / 2):
        return Attrs(None, None, None, background), cx, cy, none
    colour = _nearest(fg, ALL_COLOURS, exclude=[background])
    shape = SHAPES[int(np.argmax(iou[found].sum(0)))]
    t = np.nonzero(found)[0]
    vx, vy = np.polyfit(t, cx[found], 1)[0], np.polyfit(t, cy[found], 1)[0]  # pixels per frame
    motion = None
    if max(abs(vx), abs(vy)) * (len(x) - 1) >= 4:  # at least 4 px over the clip
        motion = ("right" if vx > 0 else "left") if abs(vx) >= abs(vy) else ("down" if vy > 0 else "up")
    return Attrs(colour, shape, motion, background), cx, cy, found


def score_video(frames, attrs, cfg=ClipConfig()):
    """{attribute: correct?} for one uint8 (F, H, W, 3) video against the Attrs it was asked for."""
    pred = classify(frames, cfg)
    return {k: getattr(pred, k) == getattr(attrs, k) for k in Attrs._fields}


def evaluate(videos, captions, cfg=ClipConfig()):
    """Accuracy per attribute over videos (N, F, H, W, 3) uint8 and their captions; 'all' = every attribute right."""
    asked = [parse_caption(c) for c in captions]
    rows = [score_video(v, a, cfg) for v, a in zip(videos, asked)]
    table = {k: float(np.mean([r[k] for r in rows])) for k in Attrs._fields}
    table["all"] = float(np.mean([all(r.values()) for r in rows]))
    table["n"] = len(rows)
    table["shape_of"] = {s: float(np.mean([r["shape"] for r, a in zip(rows, asked) if a.shape == s]))
                         for s in SHAPES if any(a.shape == s for a in asked)}  # per asked shape: which one is weak
    return table


def print_table(results):
    """Print {name: evaluate(...)} as a markdown table, one row per name."""
    cols = list(Attrs._fields) + ["all"]
    print("| set | n | " + " | ".join(cols) + " | shape: " + " / ".join(SHAPES) + " |")
    print("|---|---:|" + "---:|" * (len(cols) + 1))
    for name, r in results.items():
        by_shape = " / ".join(f"{100 * r['shape_of'][s]:.0f}" if s in r["shape_of"] else "-" for s in SHAPES)
        print(f"| {name} | {r['n']} | " + " | ".join(f"{100 * r[c]:.1f}%" for c in cols) + f" | {by_shape} |")
