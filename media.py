"""Reading and writing media: images and videos in (any format imageio reads), videos out as .mp4, .gif or a folder of
PNG frames, each with a contact sheet beside it. Pixels are float in [0, 1] here, (3, H, W) for an image and
(F, 3, H, W) for a video, as the pipelines take and return them.

Writing follows cli.py's rules: every file is written atomically and signed with cli.MARK, and nothing is replaced
that check_video_output refuses.
"""
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

import cli


def unreadable(what: str, path: str, e: Exception) -> ValueError:
    """imageio's failure as one line of ours (its own "Could not find a backend to open `x`` with iomode `r`" has a
    stray backtick and says little)."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if text.startswith("Could not find a backend"):
        text = f"imageio has no reader for it: not an {what} file, or a format imageio does not know"
    return ValueError(f"cannot read {what} {path}: {text}")


def read_image(path: str) -> torch.Tensor:
    """An image file -> (3, H, W) float in [0, 1]."""
    import imageio.v3 as iio
    try:
        pixels = np.asarray(iio.imread(path))
    except Exception as e:
        raise unreadable("image", path, e) from None
    return to_rgb(pixels, 2, f"image {path}").permute(2, 0, 1)                       # (3, H, W)


def read_video(path: str) -> torch.Tensor:
    """A video file (mp4, gif, ...) -> (F, 3, H, W) float in [0, 1]."""
    import imageio.v3 as iio
    try:
        frames = np.asarray(iio.imread(path, index=None))
    except Exception as e:
        raise unreadable("video", path, e) from None
    return to_rgb(frames, 3, f"video {path}").permute(0, 3, 1, 2)                    # (F, 3, H, W)


def to_rgb(pixels: np.ndarray, ndim: int, what: str) -> torch.Tensor:
    """Decoded pixels with `ndim` axes before the channels ((H, W) for an image, (F, H, W) for a video): gray (no
    channel axis or 1), gray + alpha (2), RGB (3) or RGBA (4), 8 or 16 bits -> (..., 3) float in [0, 1]. Alpha is
    dropped, as PIL's convert("RGB") in diffusers' load_image drops it; 16-bit PNGs are scaled by 65535, not 255."""
    if pixels.ndim == ndim:
        pixels = pixels[..., None]
    if pixels.ndim != ndim + 1 or pixels.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"{what} has shape {pixels.shape}, expected {'(H, W, 3)' if ndim == 2 else '(F, H, W, 3)'} "
                         f"RGB (gray and alpha channels are accepted too)")
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{what} has {pixels.dtype} pixels; save it with 8 or 16 bits per channel")
    rgb = pixels[..., :3] if pixels.shape[-1] >= 3 else np.repeat(pixels[..., :1], 3, axis=-1)
    return torch.from_numpy(rgb.astype(np.float32) / np.iinfo(pixels.dtype).max)



def as_frames(x, ndim: int, what: str) -> torch.Tensor:
    """An image (ndim 3: (3, H, W)) or a video (ndim 4: (F, 3, H, W)) given as a path, or as a tensor in [0, 1]."""
    t = (read_image if ndim == 3 else read_video)(x) if isinstance(x, (str, os.PathLike)) else torch.as_tensor(x).float()
    if t.ndim != ndim or t.shape[-3] != 3:
        raise ValueError(f"{what} must be a path or a tensor of {ndim} dims with 3 channels, got shape {tuple(t.shape)}")
    return t


def resize(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 3, h, w) in [0, 1] -> (N, 3, height, width): scale to cover, then centre-crop (no-op at the right size)."""
    h, w = frames.shape[-2:]
    if (h, w) == (height, width):
        return frames
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    frames = F.interpolate(frames, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (nh - height) // 2, (nw - width) // 2
    return frames[..., top:top + height, left:left + width]


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) in [0, 1] -> (F, H, W, 3) uint8, truncating like diffusers' export_to_video."""
    return (frames.permute(0, 2, 3, 1).float().cpu().numpy() * 255).astype(np.uint8)


def contact_sheet(frames: np.ndarray, columns: int = 8) -> np.ndarray:
    """(F, H, W, 3) uint8 -> one image of the frames in a grid, 2-pixel gaps, for a quick look at a video."""
    n, h, w, _ = frames.shape
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    sheet = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, np.uint8)
    for i, f in enumerate(frames):
        r, c = divmod(i, cols)
        sheet[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = f
    return sheet


VIDEO_EXTENSIONS = (".mp4", ".gif", "")   # "" (no extension): a folder of PNG frames


def sheet_path(path: str) -> str:
    """The contact sheet beside a video: clip.mp4 -> clip.png, frames/ -> frames.png."""
    return os.path.splitext(path.rstrip("/" + os.sep))[0] + ".png"


def check_video_output(path: str, named: bool = True, flag: str = "--output") -> None:
    """Refuse, before any work, an output save_video could not write or would have to destroy something for: see
    cli.py for the rules. named: the user typed this path (a file there may be replaced)."""
    ext = os.path.splitext(path.rstrip("/" + os.sep))[1].lower()
    if ext not in VIDEO_EXTENSIONS:
        raise ValueError(f"{flag} {path}: use .mp4, .gif, or a folder name (no extension) for PNG frames")
    if ext:
        cli.check_file(path, flag, named)
    else:
        cli.check_folder(path, flag)
    cli.check_file(sheet_path(path), flag, named=False)


def save_video(frames: torch.Tensor, path: str, fps: float, named: bool = True) -> list[str]:
    """(F, 3, H, W) in [0, 1] -> .mp4, .gif or a folder of PNGs (a path without extension), plus the contact sheet
    `<stem>.png` beside it. Every file is written atomically and signed (cli.MARK); nothing is replaced that
    check_video_output refuses. Returns the paths written."""
    import imageio
    import imageio.v3 as iio
    if not fps > 0:
        raise ValueError(f"fps={fps} must be > 0")
    check_video_output(path, named)
    arr = to_uint8(frames)
    ext = os.path.splitext(path.rstrip("/" + os.sep))[1].lower()
    if ext == ".mp4":
        cli.atomic_write(path, lambda p: imageio.mimwrite(p, list(arr), fps=fps, format="FFMPEG",
                                                          output_params=["-metadata", f"comment={cli.MARK}"]))
    elif ext == ".gif":
        cli.atomic_write(path, lambda p: iio.imwrite(p, arr, duration=1000 / fps, loop=0, comment=cli.MARK.encode()))
    else:
        with cli.output_folder(path, "generate.py") as tmp:
            for i, f in enumerate(arr):
                cli.write_png(os.path.join(tmp, f"{i:04d}.png"), f)
    sheet = sheet_path(path)
    cli.atomic_write(sheet, lambda p: cli.write_png(p, contact_sheet(arr)))
    return [path, sheet]
