"""Text-, image- and video-to-video with CogVideoX: the command line and the Python API.

    python generate.py --prompt "a red circle moving right on a black background"
    python generate.py --model CogVideoX-5b-I2V --image cat.png --prompt "a cat turns its head"
    python generate.py --model CogVideoX-5b --video in.mp4 --strength 0.7 --prompt "the same scene in winter"

The flow, top to bottom in `generate()`: tokenize -> T5 (prompt and negative prompt) -> initial noise from the seed
(after the VAE posterior sample of the conditioning image/video, the order diffusers uses, so one seed gives the same
video here and there) -> the sampler loop with classifier-free guidance -> VAE decode -> frames in [0, 1] -> file.

Legend: B batch, F latent frames, C channels, H/W height/width (latent unless said "pixel"), L text tokens.
"""
import contextlib
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import cli
from checkpoint import CheckpointError, config_from_dict, read_json
from model import CogVideoXTransformer, TransformerConfig, load_transformer
from offload import OFFLOAD, on_device
from quantize import quantize_int8
from sampler import SAMPLERS, SchedulerConfig, add_noise, denoise, load_scheduler_config, make_sampler
from text_encoder import T5Encoder, Tokenizer, load_text_encoder
from vae import CogVideoXVAE, VAEConfig, load_vae, sample_posterior

DEMO_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "shapes-tiny")


# ----------------------------------------------------------------------------------------------------------------------
# Loading a snapshot


@dataclass
class ModelInfo:
    """What a snapshot is and the defaults it implies (the official cards: 49 frames at 480x720, 8 fps for 1.0;
    81 frames at 768x1360, 16 fps for 1.5)."""
    path: str
    is_i2v: bool            # the transformer takes [noise; image latents] on channels
    is_v15: bool            # CogVideoX 1.5: patch_size_t = 2, 16k+1 frames
    num_frames: int
    height: int
    width: int
    fps: int
    frame_multiple: int     # valid frame counts are frame_multiple * k + 1
    temporal_compression: int
    spatial_compression: int
    max_text_seq_length: int
    gpu_dtype: torch.dtype  # the precision it was trained in: fp16 for 2b, bf16 for the RoPE models (5b, 1.5)
    transformer: TransformerConfig  # the configs it was read from, so that a run reads each config.json once
    vae: VAEConfig


@dataclass
class Pipeline:
    tokenizer: Tokenizer
    text_encoder: T5Encoder
    transformer: CogVideoXTransformer
    vae: CogVideoXVAE
    scheduler: SchedulerConfig
    info: ModelInfo
    device: torch.device
    dtype: torch.dtype
    offload: str | None = None  # "model": each stage on the CPU until it runs; "blocks": the blocks stream too


OFFICIAL_REPOS = ("CogVideoX-2b", "CogVideoX-5b", "CogVideoX-5b-I2V", "CogVideoX1.5-5B", "CogVideoX1.5-5B-I2V")


def resolve_model_path(model: str | None) -> str:
    """A local snapshot folder; the bundled demo model when None; a Hub repo id only if huggingface_hub is installed."""
    if model is None:
        if not os.path.isdir(DEMO_MODEL):
            raise ValueError(f"the bundled demo model is missing ({DEMO_MODEL}); pass --model PATH to a CogVideoX snapshot")
        print(f"using the bundled demo model {os.path.relpath(DEMO_MODEL)} (tiny, trained on moving shapes); pass --model for a real one")
        return DEMO_MODEL
    if os.path.isdir(model):
        return model
    if model.count("/") == 1 and not model.startswith((".", "/")) and not os.path.exists(os.path.dirname(model)):
        try:
            from huggingface_hub import snapshot_download  # optional: never a requirement
        except ImportError:
            pass
        else:
            try:
                return snapshot_download(model)
            except Exception as e:  # offline, unknown repo, gated: one line, not the hub client's traceback
                raise ValueError(f"cannot download {model}: {e}") from None
    name = os.path.basename(model.rstrip("/"))
    repo = next((r for r in OFFICIAL_REPOS if r.lower() == name.lower()), "CogVideoX-5b")
    raise ValueError(f"model folder not found: {model}. Download a snapshot first, e.g. "
                     f"`hf download THUDM/{repo} --local-dir {model}` (pip install huggingface_hub)")


def model_info(path: str, transformer_config, vae_config) -> ModelInfo:
    is_v15 = transformer_config.patch_size_t is not None
    spatial = 2 ** (len(vae_config.block_out_channels) - 1)
    if is_v15 and transformer_config.sample_height == 300:  # official 1.5: sample size is the max RoPE grid, not a default
        height, width, fps = 768, 1360, 16
    else:
        height, width = transformer_config.sample_height * spatial, transformer_config.sample_width * spatial
        fps = 16 if is_v15 else 8
    rope = transformer_config.use_rotary_positional_embeddings
    return ModelInfo(path=path, is_i2v=transformer_config.in_channels == 2 * transformer_config.out_channels,
                     is_v15=is_v15, num_frames=transformer_config.sample_frames, height=height, width=width, fps=fps,
                     frame_multiple=16 if is_v15 else 8,
                     temporal_compression=vae_config.temporal_compression_ratio, spatial_compression=spatial,
                     max_text_seq_length=transformer_config.max_text_seq_length,
                     gpu_dtype=torch.bfloat16 if rope or is_v15 else torch.float16,
                     transformer=transformer_config, vae=vae_config)


def read_model_info(path: str) -> ModelInfo:
    """What a snapshot is, from its config files alone (cheap: no weights read)."""
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not os.path.isdir(os.path.join(path, sub)):
            raise CheckpointError(f"{path} is not a CogVideoX snapshot: the folder {sub}/ is missing")
    tcfg = config_from_dict(TransformerConfig, read_json(os.path.join(path, "transformer", "config.json")))
    vcfg = config_from_dict(VAEConfig, read_json(os.path.join(path, "vae", "config.json")))
    return model_info(path, tcfg, vcfg)


def load_pipeline(path: str | ModelInfo | None = None, dtype: torch.dtype | None = None, device=None,
                  offload: bool | str | None = None) -> Pipeline:
    """Load every component of a CogVideoX snapshot folder (the official Hugging Face layout), given as a path, as
    the ModelInfo read_model_info returned for it, or None for the bundled demo model. dtype and device default as
    on the command line: the GPU if there is one, in the checkpoint's precision there (cli.pick_dtype), fp32 on the
    CPU. The tokenizer and configs are read first, so a broken snapshot fails before any weight is read.
    offload: "model" (or True) keeps every stage on the CPU and moves each to the device only while it runs (T5,
    then the transformer, then the VAE); "blocks" does the same, except that the blocks of T5 and the transformer
    never move as a whole: they are streamed to the device one block ahead of the compute (offload.BlockStream)."""
    if offload is True:
        offload = "model"
    if offload not in (None, False, *OFFLOAD):
        raise ValueError(f"offload={offload!r} is unknown, use one of {OFFLOAD} (or True for 'model')")
    offload = offload or None
    info = path if isinstance(path, ModelInfo) else read_model_info(resolve_model_path(path))
    path = info.path
    device = cli.pick_device(None if device is None else str(device))
    dtype = dtype or cli.pick_dtype(None, device, info.gpu_dtype)
    tokenizer = Tokenizer(os.path.join(path, "tokenizer"))
    scheduler = load_scheduler_config(os.path.join(path, "scheduler"))
    where = torch.device("cpu") if offload else device
    transformer = load_transformer(os.path.join(path, "transformer"), dtype=dtype, device=where, config=info.transformer)
    vae = load_vae(os.path.join(path, "vae"), dtype=dtype, device=where, config=info.vae)
    text_encoder = load_text_encoder(os.path.join(path, "text_encoder"), dtype=dtype, device=where)
    return Pipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                    scheduler=scheduler, info=info, device=device,
                    dtype=dtype, offload=offload)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs and outputs


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


# ----------------------------------------------------------------------------------------------------------------------
# Generation


def check_request(info: ModelInfo, num_frames: int, height: int, width: int, image=None, video=None) -> None:
    """Reject what the model cannot take before any heavy work, with a message saying how to fix it."""
    m = info.frame_multiple
    if num_frames < 1 or (num_frames - 1) % m:
        lo = max(1, (num_frames - 1) // m * m + 1)
        raise ValueError(f"num_frames={num_frames} is not valid for this model: use {m}k+1 frames (e.g. {lo} or {lo + m})")
    for name, v in (("height", height), ("width", width)):
        if v < 16 or v % 16:
            lo = max(16, v // 16 * 16)
            raise ValueError(f"{name}={v} is not a positive multiple of 16: use e.g. {lo} or {lo + 16}")
    cfg, down = info.transformer, info.spatial_compression
    if cfg.use_learned_positional_embeddings and (height, width) != (cfg.sample_height * down, cfg.sample_width * down):
        # CogVideoX-5b-I2V adds a learned table of sample-size positions: the model (and diffusers) refuse other sizes
        raise ValueError(f"height x width = {height} x {width}: {info.path} has a learned position table for "
                         f"{cfg.sample_height * down} x {cfg.sample_width * down} only; leave out --height/--width")
    if image is not None and video is not None:
        raise ValueError("give either an image (image-to-video) or a video (video-to-video), not both")
    if image is not None and not info.is_i2v:
        raise ValueError(f"{info.path} is a text-to-video model; image-to-video needs an I2V checkpoint (e.g. CogVideoX-5b-I2V)")
    if image is None and info.is_i2v:
        raise ValueError(f"{info.path} is an image-to-video model: pass an image (--image PATH)")


def _as_tensor(x, reader, ndim: int, what: str) -> torch.Tensor:
    t = reader(x) if isinstance(x, (str, os.PathLike)) else torch.as_tensor(x).float()
    if t.ndim != ndim or t.shape[-3] != 3:
        raise ValueError(f"{what} must be a path or a tensor of {ndim} dims with 3 channels, got shape {tuple(t.shape)}")
    return t


@torch.no_grad()
def encode_text(pipe: Pipeline, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
    """Prompts -> T5 last hidden states (B, L, D) in the pipeline dtype. No attention mask: CogVideoX was trained with
    the padding tokens taking part, so they must take part here too."""
    ids = pipe.tokenizer(prompts, max_length=max_sequence_length).to(pipe.device)   # (B, L)
    with on_device(pipe, pipe.text_encoder) as t5:
        return t5(ids).to(pipe.dtype)                                                 # (B, L, D)


def front_padding(patch_size_t: int | None, latent_frames: int) -> int:
    """CogVideoX 1.5 patches two latent frames into one token, and its 16k+1 frames always give an odd latent count:
    this many frames go in front of the latents (noise when generating; a copy of the first latent frame for an
    encoded video, as THUDM's trainer pads) and are dropped before decoding. 0 for CogVideoX 1.0."""
    p_t = patch_size_t or 1
    return (p_t - latent_frames % p_t) % p_t


def pad_front(z: torch.Tensor, patch_size_t: int | None) -> tuple[torch.Tensor, int]:
    """Encoded latents (B, F', C, h, w) -> (B, F' + pad, C, h, w) with the first frame repeated in front, and pad."""
    pad = front_padding(patch_size_t, z.shape[1])
    return torch.cat([z[:, :1].expand(-1, pad, -1, -1, -1), z], dim=1), pad


@torch.no_grad()
def encode_frames(pipe: Pipeline, frames: torch.Tensor, generator: torch.Generator, tiled: bool,
                  condition: bool = False) -> torch.Tensor:
    """Frames (B, F, 3, H, W) in [0, 1] at the model's size -> scaled latents (B, F', C, h, w): the mirror of
    decode_latents. One VAE call and one posterior draw per video, in the order diffusers draws them (before the
    initial noise). condition: the I2V first frame, which CogVideoX 1.5 was trained with divided by scaling_factor
    instead of multiplied (its VAE config's invert_scale_latents)."""
    pixels = frames.permute(0, 2, 1, 3, 4) * 2 - 1                                    # (B, 3, F, H, W) in [-1, 1]
    with on_device(pipe, pipe.vae) as vae:
        zs = [sample_posterior(*vae.encode(v[None].to(pipe.device, pipe.dtype), tiled=tiled), generator) for v in pixels]
    z = torch.cat(zs).to(pipe.dtype).permute(0, 2, 1, 3, 4)                           # (B, F', C, h, w)
    sf = pipe.vae.config.scaling_factor
    return z / sf if condition and pipe.vae.config.invert_scale_latents else z * sf


@torch.no_grad()
def decode_latents(pipe: Pipeline, z: torch.Tensor, tiled: bool) -> torch.Tensor:
    """Scaled latents (B, F', C, H', W') -> frames (B, F, 3, H, W) in [0, 1]."""
    z = z.permute(0, 2, 1, 3, 4) / pipe.vae.config.scaling_factor                     # (B, C, F', H', W')
    with on_device(pipe, pipe.vae) as vae:
        video = vae.decode(z, tiled=tiled)                                            # (B, 3, F, H, W)
    return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).cpu()        # (B, F, 3, H, W)


def worth_tiling(vae: CogVideoXVAE, height: int, width: int) -> bool:
    """--vae-tiling pays off from two tiles per side on: a smaller frame is decoded whole, since cutting it (the demo's
    64 px frames into 48x40 px tiles) saves no memory worth having and leaves seams where the tiles are blended."""
    return height >= vae.config.sample_height or width >= vae.config.sample_width  # tiles are half the sample size


class StepCache:
    """Opt-in reuse of the block stack's work across adjacent sampling steps (TeaCache, Liu et al. 2024).
    The blocks' total effect on the video tokens, output - input, changes slowly between adjacent steps, and how
    much it changes is predicted by how much the first block's modulated input changes. So each call measures
    the relative L1 change of that input since the previous call and adds it up; while the sum stays below
    `threshold`, the blocks are skipped and the residual of the last full evaluation is added instead. The first
    call (and call `num_steps` - 1, the last step, when given) always evaluates. One cache per generation; the
    decision is taken for the whole batch (the CFG pair shares it), the residual is per sample.

        with on_device(pipe, transformer), StepCache(transformer, 0.2, num_steps):  # inside the stream, if any
            latents = denoise(...)

    While active, the transformer's forward gets its whole block stack as one callable, run_blocks, from
    `transformer.block_source` (model.CogVideoXTransformer.blocks)."""

    def __init__(self, model: CogVideoXTransformer, threshold: float, num_steps: int | None = None):
        self.model, self.threshold, self.num_steps = model, threshold, num_steps
        self.calls, self.evaluations, self.accumulated = 0, 0, 0.0
        self.previous = self.residual = None

    def __enter__(self):
        self.outer = self.model.block_source  # None (the block list), or an offload.BlockStream entered before
        self.model.block_source = [self.run_blocks]
        return self

    def __exit__(self, *exc):
        self.model.block_source = self.outer

    def run_blocks(self, x, c, emb, rope):
        """All the blocks, or none of them: x (B, N, D) video and c (B, L, D) text tokens -> (x, c)."""
        x_in = x
        for i, block in enumerate(self.outer or self.model.transformer_blocks):
            if i == 0 and self.skip(block.norm1(x, c, emb)[0]):
                return x + self.residual, c  # the blocks' effect at the last full evaluation (a stream stops here)
            x, c = block(x, c, emb, rope)
        self.residual = x - x_in  # (B, N, D)
        return x, c

    def skip(self, signal) -> bool:
        """signal: the first block's modulated video input (B, N, D) at this call."""
        last = self.num_steps is not None and self.calls == self.num_steps - 1
        self.calls += 1
        if self.previous is not None and self.previous.shape == signal.shape:
            self.accumulated += ((signal - self.previous).abs().mean() / self.previous.abs().mean()).item()
        fresh = self.residual is None or self.residual.shape != signal.shape
        self.previous = signal
        if fresh or last or self.accumulated >= self.threshold:
            self.accumulated = 0.0
            self.evaluations += 1
            return False
        return True


LISTED_VOCABULARY = 200  # a tokenizer with at most this many whole words (the demo's: its captions') lists them


def prompt_notes(tokenizer: Tokenizer, prompts: list[str]) -> list[str]:
    """Readable notes on prompts the model cannot follow as written: an empty one, and words its tokenizer has no
    piece for (spelled letter by letter, or <unk>): words the model never learned. Where the vocabulary is small
    (the demo's), the note lists the words the model knows."""
    sp, notes = tokenizer.sp, []
    n = sp.get_piece_size()
    single = lambda i: i == sp.unk_id() or (i < n and len(sp.id_to_piece(i).lstrip("\u2581")) <= 1)  # noqa: E731
    for prompt in dict.fromkeys(prompts):
        if not prompt.strip():
            notes.append("the prompt is empty: the video follows no text")
            continue
        unknown = [w for w, ids in tokenizer.words(prompt)
                   if sp.unk_id() in ids or (len(ids) > 1 and all(single(i) for i in ids))]
        if unknown:
            words = sorted({p[1:] for p in map(sp.id_to_piece, range(n)) if p.startswith("\u2581") and len(p) > 1})
            known = (f"it knows only: {' '.join(words)}" if len(words) <= LISTED_VOCABULARY else
                     "the video may not follow them")
            notes.append(f"the model never learned {', '.join(map(repr, dict.fromkeys(unknown)))} (its tokenizer "
                         f"spells {'it' if len(set(unknown)) == 1 else 'them'} letter by letter): {known}")
    return notes


@torch.no_grad()
def generate(pipe: Pipeline, prompt: str | list[str], *, negative_prompt: str | list[str] = "",
             num_frames: int | None = None, height: int | None = None, width: int | None = None,
             num_inference_steps: int = 50, guidance_scale: float = 6.0, use_dynamic_cfg: bool = False,
             sampler: str = "ddim", karras: bool = False, seed: int = 42, num_videos: int = 1, image=None, video=None,
             strength: float = 0.8, max_sequence_length: int | None = None, vae_tiling: bool = False,
             step_cache: float | None = None, progress: bool = True, timings: dict | None = None) -> torch.Tensor:
    """Generate `num_videos` videos for each prompt. Returns frames (len(prompts) * num_videos, F, 3, H, W) float in
    [0, 1], prompt-major (p0's videos, then p1's), the layout of diffusers' `output_type="pt"`.

    Every default the model has (frames, size, text length) comes from the model, exactly as on the command line.
    prompt / negative_prompt: a string or a list (a negative string applies to every prompt).
    image: image-to-video (I2V checkpoints): a path or a (3, H, W) tensor in [0, 1], the first frame.
    video: video-to-video: a path or an (F, 3, H, W) tensor in [0, 1]; `strength` in (0, 1] is how much of the
      schedule is re-run (1 = ignore the input video, small = stay close to it).
    step_cache: a threshold for StepCache (e.g. 0.1-0.3): skip the transformer blocks on steps whose input
      changed little, reusing the last evaluation's residual; faster, slightly different. None: every step runs.
      `timings["evaluations"]` receives the number of full transformer evaluations.
    The same seed gives the same video as the diffusers pipeline on the same checkpoint: one CPU generator, seeded
    once, draws the VAE posterior samples, then the initial noise, then the sampler's noise."""
    info, dev, dtype = pipe.info, pipe.device, pipe.dtype
    timings = {} if timings is None else timings
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if not prompts or len(negatives) != len(prompts):
        raise ValueError(f"{len(prompts)} prompt(s) and {len(negatives)} negative prompt(s): give one negative prompt "
                         f"per prompt, or a single string for all")
    for note in prompt_notes(pipe.tokenizer, prompts):  # a prompt too long for the model: the tokenizer's warning
        warnings.warn(note)
    for name, value, ok in (("num_inference_steps", num_inference_steps, num_inference_steps >= 1),
                            ("num_videos", num_videos, num_videos >= 1),
                            ("guidance_scale", guidance_scale, guidance_scale >= 0),
                            ("step_cache", step_cache, step_cache is None or step_cache > 0)):
        if not ok:
            raise ValueError(f"{name}={value} is out of range (steps and videos >= 1, guidance >= 0, step cache > 0)")
    height = info.height if height is None else height
    width = info.width if width is None else width
    L = info.max_text_seq_length if max_sequence_length is None else max_sequence_length
    if image is not None:
        image = _as_tensor(image, read_image, 3, "image")
    if video is not None:
        video = _as_tensor(video, read_video, 4, "video")
        if num_frames is not None:
            if len(video) < num_frames:
                raise ValueError(f"the video has {len(video)} frames, fewer than num_frames={num_frames}")
            video = video[:num_frames]
        num_frames = len(video)
    num_frames = info.num_frames if num_frames is None else num_frames
    check_request(info, num_frames, height, width, image, video)
    if not 0 < strength <= 1:
        raise ValueError(f"strength={strength} must be in (0, 1]")
    schedule = make_sampler(sampler, pipe.scheduler, num_inference_steps, strength if video is not None else 1.0,
                            karras=karras)
    generator = torch.Generator().manual_seed(seed)
    cfg = guidance_scale > 1
    B = len(prompts) * num_videos

    # Text: (2B, L, D), every negative prompt first under guidance, as the pipelines batch it.
    t0 = time.perf_counter()
    emb = encode_text(pipe, negatives + prompts if cfg else prompts, L)               # ([2]P, L, D)
    text = emb.repeat_interleave(num_videos, dim=0)                                   # (B' = [2]B, L, D)
    timings["text"] = time.perf_counter() - t0

    lf = (num_frames - 1) // info.temporal_compression + 1                            # latent frames
    pad = front_padding(pipe.transformer.config.patch_size_t, lf)
    h, w = height // info.spatial_compression, width // info.spatial_compression
    channels = pipe.transformer.config.out_channels
    tiled = vae_tiling and worth_tiling(pipe.vae, height, width)

    # Conditioning latents first: their posterior samples come before the noise in the generator's stream.
    t0 = time.perf_counter()
    cond, start = None, None
    if image is not None:
        first = resize(image[None], height, width)[:, None].expand(B, -1, -1, -1, -1)  # (B, 1, 3, H, W)
        z = encode_frames(pipe, first, generator, tiled, condition=True)              # (B, 1, C, h, w)
        cond = torch.cat([z, z.new_zeros(B, lf + pad - 1, *z.shape[2:])], dim=1)      # (B, F, C, h, w)
        cond = torch.cat([cond, cond]) if cfg else cond                                # (B', F, C, h, w)
    if video is not None:
        clip = resize(video, height, width)[None].expand(B, -1, -1, -1, -1)           # (B, F, 3, H, W)
        # 1.5: diffusers refuses the odd latent count here; we pad it as the official trainer does
        start, _ = pad_front(encode_frames(pipe, clip, generator, tiled), pipe.transformer.config.patch_size_t)
    latents = torch.randn((B, lf + pad, channels, h, w), generator=generator).to(dev, dtype)  # (B, F, C, h, w)
    if start is not None:
        latents = add_noise(pipe.scheduler, start, latents, schedule.timesteps[0]).to(dtype)
    ofs = torch.full((text.shape[0],), 2.0, device=dev, dtype=dtype) if pipe.transformer.config.ofs_embed_dim else None

    cache = StepCache(pipe.transformer, step_cache, len(schedule.timesteps)) if step_cache is not None else None

    def model(x, t):
        x = x if cond is None else torch.cat([x, cond], dim=2)                       # (B', F, 2C, h, w) for I2V
        return pipe.transformer(x, text, t, ofs)

    with on_device(pipe, pipe.transformer), cache or contextlib.nullcontext():
        latents = denoise(model, latents, schedule, guidance_scale=guidance_scale, dynamic_cfg=use_dynamic_cfg,
                          generator=generator, progress=progress)
    timings["denoise"] = time.perf_counter() - t0
    timings["evaluations"] = cache.evaluations if cache is not None else len(schedule.timesteps)

    t0 = time.perf_counter()
    frames = decode_latents(pipe, latents[:, pad:], tiled)                            # (B, F, 3, H, W)
    timings["decode"] = time.perf_counter() - t0
    return frames


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux reports KiB


def add_video_arguments(p, output: str) -> None:
    """The flags generate.py and edit.py share: the model, the video's size, the sampling run and the output."""
    p.add_argument("--model", default=None, help="a local CogVideoX snapshot folder (default: the bundled demo model)")
    p.add_argument("--negative-prompt", default="", help="what the video should not show")
    p.add_argument("--num-frames", type=cli.positive_int, default=None,
                   help="8k+1 for CogVideoX 1.0, 16k+1 for 1.5 (default: the model's, or fewer for a shorter video)")
    p.add_argument("--height", type=cli.pixels, default=None, help="a multiple of 16 (default: the model's)")
    p.add_argument("--width", type=cli.pixels, default=None, help="a multiple of 16 (default: the model's)")
    p.add_argument("--steps", type=cli.positive_int, default=50, help="sampler steps")
    p.add_argument("--guidance", type=cli.nonnegative_float, default=6.0,
                   help="classifier-free guidance scale (<= 1: no guidance)")
    p.add_argument("--seed", type=cli.seed, default=42, help="the same seed gives the same video")
    p.add_argument("--fps", type=cli.positive_float, default=None, help="frames per second (default: the model's)")
    p.add_argument("--dtype", choices=tuple(cli.DTYPES), default=None,
                   help="default: fp32 on CPU; on GPU fp16 for 2b (trained in fp16), bf16 otherwise")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    p.add_argument("--output", default=output,
                   help=".mp4, .gif, or a new folder name for PNG frames; a contact sheet <stem>.png is written beside")
    p.add_argument("--offload", nargs="?", const="model", choices=OFFLOAD, default=None,
                   help="keep each stage (T5, transformer, VAE) on the CPU until it runs; '--offload blocks' also "
                        "streams T5 and the transformer one block at a time (least GPU memory)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode in overlapping spatial tiles (less memory) when the frame spans two tiles")


def parse_args(argv=None):
    p = cli.ArgumentParser(description="Generate videos with CogVideoX: text-, image- and video-to-video.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="what the video shows")
    what.add_argument("--prompt-file", help="one prompt per line (blank lines and lines starting with # skipped); "
                                            "outputs are named <output stem>-<line number>")
    add_video_arguments(p, output="output.mp4")
    p.add_argument("--image", default=None, help="image-to-video: the first frame (I2V checkpoints)")
    p.add_argument("--video", default=None, help="video-to-video: the input video")
    p.add_argument("--strength", type=cli.strength, default=None,
                   help="video-to-video: how much of the schedule to re-run, in (0, 1] (default 0.8)")
    p.add_argument("--dynamic-cfg", action="store_true", help="CogVideoX's cosine guidance schedule")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="the sampler")
    p.add_argument("--karras", action="store_true", help="Karras sigma spacing (samplers that support it)")
    p.add_argument("--num-videos", type=cli.positive_int, default=1, help="videos per prompt")
    p.add_argument("--quantize", choices=("int8",), default=None, help="weight-only int8 transformer")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer block, one graph for all blocks (slow first step)")
    p.add_argument("--step-cache", type=cli.positive_float, default=None, metavar="THRESH",
                   help="skip the transformer on steps whose input changed less than THRESH in total (TeaCache; "
                        "e.g. 0.1-0.3: faster, slightly different)")
    p.add_argument("--lora", default=None, help="a LoRA file or folder (pytorch_lora_weights.safetensors)")
    p.add_argument("--lora-scale", type=cli.finite_float, default=None,
                   help="multiplies the LoRA's alpha/rank (default 1; THUDM finetune LoRAs: 0.5; SAT exports: 1/rank)")
    return p.parse_args(argv)


def read_prompt_file(path: str) -> list[tuple[int, str]]:
    """(line number, prompt) for every line that is not blank or a # comment."""
    cli.existing_path("--prompt-file", path, "file")
    try:
        with open(path, encoding="utf-8") as f:
            jobs = [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip() and not line.lstrip().startswith("#")]
    except UnicodeDecodeError:
        raise ValueError(f"--prompt-file {path} is not UTF-8 text") from None
    if not jobs:
        raise ValueError(f"--prompt-file {path} holds no prompt (one per line; # starts a comment)")
    return jobs


def output_paths(output: str, num_videos: int, line: int | None = None) -> list[tuple[str, bool]]:
    """(path, named) for each video of one prompt: `output` itself (named by the user), or derived from it with the
    prompt's line number and the video's index: clip.mp4 -> clip-0007.mp4, clip_0.mp4, clip-0007_1.mp4."""
    stem, ext = os.path.splitext(output.rstrip("/" + os.sep))
    stem = stem if line is None else f"{stem}-{line:04d}"
    if num_videos == 1:
        return [(stem + ext, line is None)]
    return [(f"{stem}_{i}{ext}", False) for i in range(num_videos)]


def shard() -> tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun (each process takes every world-th prompt), else (0, 1, 0)."""
    return tuple(int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))


def prologue(args) -> tuple[ModelInfo, torch.device, torch.dtype]:
    """What every command starts with, from the config files alone: the snapshot and its configs, the device
    (checked to exist) and the dtype policy (cli.pick_dtype with the model's training precision)."""
    info = read_model_info(resolve_model_path(args.model))
    device = cli.pick_device(args.device)
    return info, device, cli.pick_dtype(args.dtype, device, info.gpu_dtype)


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: run_cli(args))


def run_cli(args) -> int:
    # Everything that can be checked is checked before any weights are read; every process checks every output.
    jobs = read_prompt_file(args.prompt_file) if args.prompt_file else [(None, args.prompt)]
    if args.lora_scale is not None and not args.lora:
        raise ValueError("--lora-scale needs --lora PATH")
    if args.strength is not None and not args.video:
        raise ValueError("--strength applies to video-to-video only: add --video PATH, or drop --strength")
    if args.image and args.video:
        raise ValueError("give either --image (image-to-video) or --video (video-to-video), not both")
    rank, world, local = shard()
    if world > 1 and args.device is None and torch.cuda.is_available():
        args.device = f"cuda:{local}"  # torchrun: one GPU per process
    info, device, dtype = prologue(args)
    image = read_image(cli.existing_path("--image", args.image, "file")) if args.image else None
    video = read_video(cli.existing_path("--video", args.video, "file")) if args.video else None
    if video is not None and args.num_frames:
        if len(video) < args.num_frames:
            raise ValueError(f"--video {args.video} has {len(video)} frames, fewer than --num-frames {args.num_frames}")
        video = video[:args.num_frames]
    num_frames = len(video) if video is not None else (args.num_frames or info.num_frames)
    check_request(info, num_frames, args.height or info.height, args.width or info.width, image, video)
    strength = 0.8 if args.strength is None else args.strength
    make_sampler(args.sampler, load_scheduler_config(os.path.join(info.path, "scheduler")), args.steps,
                 strength if video is not None else 1.0, karras=args.karras)  # refuses e.g. a strength that keeps no step
    if args.lora:
        from lora import check_lora
        with torch.device("meta"):
            check_lora(CogVideoXTransformer(info.transformer), args.lora)
    outputs = {line: output_paths(args.output, args.num_videos, line) for line, _ in jobs}
    for out, named in (o for paths in outputs.values() for o in paths):
        check_video_output(out, named)

    mine = list(enumerate(jobs))[rank::world]  # the index in the whole file seeds the prompt: any split, same videos
    if not mine:
        print(f"process {rank} of {world}: no prompt left for it")
        return 0
    t0 = time.perf_counter()
    pipe = load_pipeline(info, dtype=dtype, device=device, offload=args.offload)
    if args.lora:
        from lora import load_lora
        print(load_lora(pipe.transformer, args.lora, 1.0 if args.lora_scale is None else args.lora_scale))
    if args.quantize == "int8":
        quantize_int8(pipe.transformer)
    if args.compile:
        pipe.transformer.compile()
    print(f"loaded in {time.perf_counter() - t0:.1f}s")
    for n, (index, (line, prompt)) in enumerate(mine):
        if line is not None:
            print(f"[{n + 1}/{len(mine)}] line {line}: {prompt}")
        timings = {}
        frames = generate(pipe, prompt, negative_prompt=args.negative_prompt, num_frames=num_frames,
                          height=args.height, width=args.width, num_inference_steps=args.steps,
                          guidance_scale=args.guidance, use_dynamic_cfg=args.dynamic_cfg, sampler=args.sampler,
                          karras=args.karras, seed=args.seed + index,
                          num_videos=args.num_videos, image=image, video=video,
                          strength=strength, vae_tiling=args.vae_tiling,
                          step_cache=args.step_cache, timings=timings)
        written = [w for f, (out, named) in zip(frames, outputs[line])
                   for w in save_video(f, out, args.fps or info.fps, named)]
        print(f"wrote {', '.join(written)}")
        print(f"text {timings['text']:.1f}s, denoise {timings['denoise']:.1f}s, decode {timings['decode']:.1f}s, "
              f"peak memory {peak_memory_gb(pipe.device):.2f} GB")
        if args.step_cache is not None:
            print(f"step cache: {timings['evaluations']} transformer evaluations for {args.steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
