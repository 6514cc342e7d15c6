"""Text-, image- and video-to-video with CogVideoX: the command line and the Python API.

    python generate.py --prompt "a red circle moving right on a black background"
    python generate.py --model CogVideoX-5b-I2V --image cat.png --prompt "a cat turns its head"
    python generate.py --model CogVideoX-5b --video in.mp4 --strength 0.7 --prompt "the same scene in winter"

A run is decided first, from the snapshot's configs alone: `plan()` checks every argument, reads the input image or
video and builds the sampler, once, before any weight is read (the command line, `generate()`, edit.py and
train_lora.py all go through it). Then `make_videos()` runs one job of the plan, top to bottom: tokenize -> T5
(prompt and negative prompt) -> initial noise from the seed (after the VAE posterior sample of the conditioning
image/video, the order diffusers uses, so one seed gives the same video here and there) -> the sampler loop with
classifier-free guidance -> VAE decode -> frames in [0, 1]. `generate()` is the two together; the command line
writes the frames to files (media.py). Loading a snapshot and the encode/decode boundaries are in pipeline.py.

Legend: B batch, F latent frames, C channels, H/W height/width (latent unless said "pixel"), L text tokens.
"""
import contextlib
import dataclasses
import os
import sys
import time
import warnings

import torch

import cli
from media import as_frames, check_video_output, resize, save_video
from model import CogVideoXTransformer
from offload import OFFLOAD, on_device
import parallel
from pipeline import (DEMO_MODEL, ModelInfo, Pipeline, decode_latents, encode_frames, encode_text, front_padding,
                      load_pipeline, pad_front, read_model_info, resolve_model_path, worth_tiling)
from quantize import quantize_int8
from sampler import SAMPLERS, Sampler, add_noise, denoise, make_sampler
from text_encoder import Tokenizer

# The Python API in one import, as the README imports it (DEMO_MODEL, load_pipeline: pipeline.py; save_video: media.py)
__all__ = ["DEMO_MODEL", "load_pipeline", "generate", "save_video", "plan", "make_videos"]


# ----------------------------------------------------------------------------------------------------------------------
# The plan: everything a run needs, decided before any weight is read


@dataclasses.dataclass
class Job:
    """One batch of videos: its prompts (sampled together), their negative prompts, its seed, and the files its
    videos go to."""
    prompts: list[str]
    negatives: list[str]
    seed: int
    outputs: list[tuple[str, bool]]  # (path, named by the user) per video, prompt-major; none from Python
    line: int | None = None          # the prompt's line in --prompt-file


@dataclasses.dataclass
class Request:
    """A run, decided and checked by plan() before any weight is read; nothing after it checks again (save_video
    only looks at its outputs once more when it writes them: a file may have appeared meanwhile)."""
    jobs: list[Job]
    num_frames: int
    height: int                  # pixels
    width: int
    text_length: int             # T5 tokens
    sampler: Sampler             # the sampler and its timesteps (strength applied for video-to-video)
    guidance_scale: float
    use_dynamic_cfg: bool
    num_videos: int              # per prompt
    image: torch.Tensor | None   # image-to-video: the first frame (3, h, w) in [0, 1], any size (resized when encoded)
    video: torch.Tensor | None   # video-to-video: (num_frames, 3, h, w) in [0, 1], any size
    tiled: bool                  # the VAE works in tiles: asked for, and worth it at this size
    step_cache: float | None


def check_request(info: ModelInfo, num_frames: int, height: int, width: int, image=None) -> None:
    """Reject what the model cannot take, with a message saying how to fix it. image: the I2V first frame, if any."""
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
    if image is not None and not info.is_i2v:
        raise ValueError(f"{info.path} is a text-to-video model; image-to-video needs an I2V checkpoint (e.g. CogVideoX-5b-I2V)")
    if image is None and info.is_i2v:
        raise ValueError(f"{info.path} is an image-to-video model: pass an image (--image PATH)")


def output_paths(output: str, num_videos: int, line: int | None = None) -> list[tuple[str, bool]]:
    """(path, named) for each video of one prompt: `output` itself (named by the user), or derived from it with the
    prompt's line number and the video's index: clip.mp4 -> clip-0007.mp4, clip_0.mp4, clip-0007_1.mp4."""
    stem, ext = os.path.splitext(output.rstrip("/" + os.sep))
    stem = stem if line is None else f"{stem}-{line:04d}"
    if num_videos == 1:
        return [(stem + ext, line is None)]
    return [(f"{stem}_{i}{ext}", False) for i in range(num_videos)]


def plan(info: ModelInfo, prompt: str | list[str], *, negative_prompt: str | list[str] = "",
         num_frames: int | None = None, height: int | None = None, width: int | None = None,
         num_inference_steps: int = 50, guidance_scale: float = 6.0, use_dynamic_cfg: bool = False,
         sampler: str = "ddim", karras: bool = False, seed: int = 42, num_videos: int = 1, image=None, video=None,
         strength: float = 0.8, max_sequence_length: int | None = None, vae_tiling: bool = False,
         step_cache: float | None = None, output: str | None = None,
         lines: list[int | None] | None = None) -> Request:
    """generate()'s arguments (see there), checked and completed from the snapshot's configs alone: no weight is
    read (an image or video path is read here). Each default the model has (frames, size, text length) is its own.
    prompt: one job, every prompt batched together; with `lines` (the command line: each prompt's line in a prompt
    file, or [None] for --prompt), one job per prompt, seeded with seed + its index and its videos named after its
    line. output: where the videos go (output_paths), each path checked here, before any work."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if not prompts or len(negatives) != len(prompts):
        raise ValueError(f"{len(prompts)} prompt(s) and {len(negatives)} negative prompt(s): give one negative prompt "
                         f"per prompt, or a single string for all")
    for name, value, ok in (("num_inference_steps", num_inference_steps, num_inference_steps >= 1),
                            ("num_videos", num_videos, num_videos >= 1),
                            ("guidance_scale", guidance_scale, guidance_scale >= 0),
                            ("step_cache", step_cache, step_cache is None or step_cache > 0),
                            ("strength", strength, 0 < strength <= 1)):
        if not ok:
            raise ValueError(f"{name}={value} is out of range (steps and videos >= 1, guidance >= 0, step cache > 0, "
                             f"strength in (0, 1])")
    if image is not None and video is not None:
        raise ValueError("give either an image (image-to-video) or a video (video-to-video), not both")
    image = None if image is None else as_frames(image, 3, "image")                   # (3, h, w)
    video = None if video is None else as_frames(video, 4, "video")                   # (F, 3, h, w)
    if num_frames is None:
        num_frames = info.num_frames if video is None else len(video)
    height = info.height if height is None else height
    width = info.width if width is None else width
    check_request(info, num_frames, height, width, image)
    if video is not None:
        if len(video) < num_frames:
            raise ValueError(f"the video has {len(video)} frames, fewer than num_frames={num_frames}")
        video = video[:num_frames]
    schedule = make_sampler(sampler, info.scheduler, num_inference_steps, strength if video is not None else 1.0,
                            karras=karras)  # refuses e.g. a strength that keeps no step
    if lines is None:
        jobs = [Job(prompts, negatives, seed, output_paths(output, num_videos) if output else [])]
    else:
        jobs = [Job([p], [n], seed + i, output_paths(output, num_videos, line) if output else [], line)
                for i, (p, n, line) in enumerate(zip(prompts, negatives, lines))]
    for path, named in (out for job in jobs for out in job.outputs):
        check_video_output(path, named)
    return Request(jobs, num_frames, height, width,
                   info.max_text_seq_length if max_sequence_length is None else max_sequence_length, schedule,
                   guidance_scale, use_dynamic_cfg, num_videos, image, video,
                   vae_tiling and worth_tiling(info.vae, height, width), step_cache)


# ----------------------------------------------------------------------------------------------------------------------
# Generation


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
            self.accumulated += relative_change(signal, self.previous)
        fresh = self.residual is None or self.residual.shape != signal.shape
        self.previous = signal
        if fresh or last or self.accumulated >= self.threshold:
            self.accumulated = 0.0
            self.evaluations += 1
            return False
        return True


def relative_change(signal, previous) -> float:
    """The step cache's measure: mean |signal - previous| / mean |previous|. A module-level function so that
    parallel.py can swap in the same sums taken over every process of a video (all then take one decision)."""
    return ((signal - previous).abs().mean() / previous.abs().mean()).item()


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
def make_videos(pipe: Pipeline, request: Request, job: Job, *, progress: bool,
                timings: dict | None = None) -> torch.Tensor:
    """One job of a plan -> frames (len(job.prompts) * request.num_videos, F, 3, H, W) float in [0, 1], prompt-major.
    timings receives the wall time of each stage ("text", "denoise", "decode") and the number of full transformer
    evaluations ("evaluations": fewer than the steps with the step cache)."""
    info, dev, dtype = pipe.info, pipe.device, pipe.dtype
    timings = {} if timings is None else timings
    for note in prompt_notes(pipe.tokenizer, job.prompts):  # a prompt too long for the model: the tokenizer's warning
        warnings.warn(note)
    schedule = dataclasses.replace(request.sampler, x0=None)  # this run's own: the multistep ones keep their last x0
    generator = torch.Generator().manual_seed(job.seed)
    cfg = request.guidance_scale > 1
    B = len(job.prompts) * request.num_videos
    height, width, tiled = request.height, request.width, request.tiled

    # Text: (2B, L, D), every negative prompt first under guidance, as the pipelines batch it.
    t0 = time.perf_counter()
    emb = encode_text(pipe, job.negatives + job.prompts if cfg else job.prompts, request.text_length)  # ([2]P, L, D)
    text = emb.repeat_interleave(request.num_videos, dim=0)                           # (B' = [2]B, L, D)
    timings["text"] = time.perf_counter() - t0

    lf = (request.num_frames - 1) // info.temporal_compression + 1                    # latent frames
    pad = front_padding(pipe.transformer.config.patch_size_t, lf)
    h, w = height // info.spatial_compression, width // info.spatial_compression
    channels = pipe.transformer.config.out_channels

    # Conditioning latents first: their posterior samples come before the noise in the generator's stream.
    t0 = time.perf_counter()
    cond, start = None, None
    if request.image is not None:
        first = resize(request.image[None], height, width)[:, None].expand(B, -1, -1, -1, -1)  # (B, 1, 3, H, W)
        z = encode_frames(pipe, first, generator, tiled, condition=True)              # (B, 1, C, h, w)
        cond = torch.cat([z, z.new_zeros(B, lf + pad - 1, *z.shape[2:])], dim=1)      # (B, F, C, h, w)
        cond = torch.cat([cond, cond]) if cfg else cond                                # (B', F, C, h, w)
    if request.video is not None:
        clip = resize(request.video, height, width)[None].expand(B, -1, -1, -1, -1)   # (B, F, 3, H, W)
        # 1.5: diffusers refuses the odd latent count here; we pad it as the official trainer does
        start, _ = pad_front(encode_frames(pipe, clip, generator, tiled), pipe.transformer.config.patch_size_t)
    latents = torch.randn((B, lf + pad, channels, h, w), generator=generator).to(dev, dtype)  # (B, F, C, h, w)
    if start is not None:
        latents = add_noise(pipe.scheduler, start, latents, schedule.timesteps[0]).to(dtype)
    ofs = torch.full((text.shape[0],), 2.0, device=dev, dtype=dtype) if pipe.transformer.config.ofs_embed_dim else None

    steps = len(schedule.timesteps)
    cache = StepCache(pipe.transformer, request.step_cache, steps) if request.step_cache is not None else None

    def model(x, t):
        x = x if cond is None else torch.cat([x, cond], dim=2)                       # (B', F, 2C, h, w) for I2V
        return pipe.transformer(x, text, t, ofs)

    with on_device(pipe, pipe.transformer), cache or contextlib.nullcontext():
        latents = denoise(model, latents, schedule, guidance_scale=request.guidance_scale,
                          dynamic_cfg=request.use_dynamic_cfg, generator=generator, progress=progress)
    timings["denoise"] = time.perf_counter() - t0
    timings["evaluations"] = cache.evaluations if cache is not None else steps

    t0 = time.perf_counter()
    frames = decode_latents(pipe, latents[:, pad:], tiled)                            # (B, F, 3, H, W)
    timings["decode"] = time.perf_counter() - t0
    return frames


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
    request = plan(pipe.info, prompt, negative_prompt=negative_prompt, num_frames=num_frames, height=height,
                   width=width, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   use_dynamic_cfg=use_dynamic_cfg, sampler=sampler, karras=karras, seed=seed, num_videos=num_videos,
                   image=image, video=video, strength=strength, max_sequence_length=max_sequence_length,
                   vae_tiling=vae_tiling, step_cache=step_cache)
    return make_videos(pipe, request, request.jobs[0], progress=progress, timings=timings)


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
    p.add_argument("--context-parallel", action="store_true",
                   help="under torchrun: all processes render each video together (parallel.py: CFG-parallel, "
                        "Ulysses attention; video tokens and heads padded to a multiple of the processes and the "
                        "padding dropped exactly); process 0 writes")
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
    # Everything is checked before any weight is read, once: the flags that only make sense together here, then the
    # plan (which every process builds whole: each checks every output).
    lines = read_prompt_file(args.prompt_file) if args.prompt_file else [(None, args.prompt)]
    if args.lora_scale is not None and not args.lora:
        raise ValueError("--lora-scale needs --lora PATH")
    if args.strength is not None and not args.video:
        raise ValueError("--strength applies to video-to-video only: add --video PATH, or drop --strength")
    rank, world, local = shard()
    if args.context_parallel and world == 1:
        raise ValueError("--context-parallel needs several processes: run it under torchrun --nproc_per_node N")
    if world > 1 and args.device is None and torch.cuda.is_available():
        args.device = f"cuda:{local}"  # torchrun: one GPU per process
    info, device, dtype = prologue(args)
    request = plan(info, [prompt for _, prompt in lines], negative_prompt=args.negative_prompt,
                   num_frames=args.num_frames, height=args.height, width=args.width, num_inference_steps=args.steps,
                   guidance_scale=args.guidance, use_dynamic_cfg=args.dynamic_cfg, sampler=args.sampler,
                   karras=args.karras, seed=args.seed, num_videos=args.num_videos,
                   image=cli.existing_path("--image", args.image, "file") if args.image else None,
                   video=cli.existing_path("--video", args.video, "file") if args.video else None,
                   strength=0.8 if args.strength is None else args.strength, vae_tiling=args.vae_tiling,
                   step_cache=args.step_cache, output=args.output, lines=[line for line, _ in lines])
    if args.lora:
        from lora import check_lora
        with torch.device("meta"):
            check_lora(CogVideoXTransformer(info.transformer), args.lora)

    mine = request.jobs if args.context_parallel else request.jobs[rank::world]  # seeds: any split, same videos
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
    with parallel.command_line(pipe) if args.context_parallel else contextlib.nullcontext(True) as writes:
        for n, job in enumerate(mine):
            if job.line is not None and writes:
                print(f"[{n + 1}/{len(mine)}] line {job.line}: {job.prompts[0]}")
            timings = {}
            frames = make_videos(pipe, request, job, timings=timings, progress=writes)
            if not writes:  # context parallel: process 0 writes the video the processes made together
                continue
            written = [w for f, (out, named) in zip(frames, job.outputs)
                       for w in save_video(f, out, args.fps or info.fps, named)]
            print(f"wrote {', '.join(written)}")
            print(f"text {timings['text']:.1f}s, denoise {timings['denoise']:.1f}s, decode {timings['decode']:.1f}s, "
                  f"peak memory {peak_memory_gb(pipe.device):.2f} GB")
            if args.step_cache is not None:
                print(f"step cache: {timings['evaluations']} transformer evaluations for {args.steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
