"""LoRA fine-tuning of a CogVideoX checkpoint (text-to-video or image-to-video) on your own clips, on one GPU or many.

    python train_lora.py --model CogVideoX-5b --data my_clips --output runs/my_style --steps 1000
    torchrun --nproc_per_node 8 train_lora.py ...                  # same run, the batch split over 8 GPUs
    python generate.py --model CogVideoX-5b --lora runs/my_style --prompt "..."

The flow, top to bottom in `main()`: find the samples and validate every one (all problems in one report, nothing
dropped silently) -> encode each clip once with the VAE and each caption once with T5 into a cache (keyed on the
file's bytes and the settings) -> free the encoders -> train only the LoRA A/B matrices of the transformer on the
v-prediction loss -> pytorch_lora_weights.safetensors, which `generate.py --lora` and diffusers' `load_lora_weights`
both read at the alpha it was trained at.

Dataset folder, either layout (paths relative to the folder):
  - official (THUDM finetune/): `prompts.txt` (or `prompt.txt`) and `videos.txt`, one sample per line;
  - pairs: `name.mp4` + `name.txt` (the caption), any number of them.
Each clip needs at least --num-frames frames; they are taken at an even stride (the official `range(0, N, N//F)`),
then scaled to cover --height x --width and centre-cropped.

Versus THUDM's finetune/ trainer: the same loss (see diffusion_loss), timesteps uniform in 0..999, AdamW betas
(0.9, 0.95), weight decay 1e-4, clipping at 1.0, rank 128 / alpha 64, bf16 with fp32 LoRA weights. Different on
purpose: warm-up then cosine decay instead of a constant LR, a default LR of 1e-4 (theirs 2e-5; SAT's configs
suggest 5e-4 to 1e-3 for LoRA), clips shorter than --num-frames refused instead of padded with their last frame,
cover-and-crop resizing instead of a stretch, and the alpha written into the LoRA file. --caption-dropout (off, as
theirs; SAT's configs drop 10% of captions) trains a share of samples on the empty caption, which guidance's
unconditional branch is (make_batch).

Reproducibility: the data order, the timestep, the noise and the VAE posterior draw of every sample are pure
functions of (--seed, the sample's position in the global stream), and the LR is a pure function of the step. So a
resumed run redoes exactly what the uninterrupted one would have done, and N processes with batch B/N each see the
same samples and noises as one process with batch B.

Image-to-video (5b-I2V, 1.5-I2V): each clip is its own condition, as in the official I2V recipe and diffusers'
train_cogvideox_image_to_video_lora.py. Its first frame is noised in pixel space (noise_first_frame, sigma =
exp(N(-3, 0.5))) and VAE-encoded once into the cache next to the clip; every step draws a latent from that posterior,
scales it (condition_scale), pads it with zero latents to the clip's latent length (condition_latents), zeroes it
with probability 0.05 (drop_condition) and concatenates it to x_t on the channels; 1.5-I2V also gets ofs = 2.0
(training_ofs), as its pipeline passes.

Buckets (--buckets HxWxF,...): a folder may hold clips of several sizes and lengths. Each clip trains in the nearest
bucket (nearest_bucket), resized and cropped by the same media.resize as generate.py, and every micro-batch is drawn
from one bucket (micro_batch); the cache keys hold the bucket's size. Without --buckets there is one bucket, the
training size, and everything is as it always was (a clip too short for it is refused, not dropped).

Full fine-tuning (--full): every transformer weight trains (but those --freeze names), fp32 master weights, AdamW
and gradient checkpointing as for LoRA; checkpoints and the result are a `transformer/` folder in the official layout
(config.json + safetensors, the checkpoint's own keys) that load_transformer and diffusers' from_pretrained read.

Legend: B batch, F latent frames, C latent channels, H/W latent height/width, L text tokens, D text width.
"""
import argparse
import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import math
import os
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import cli
from cli import atomic_write
from checkpoint import read_json, save_component, write_json
from generate import Request, check_request, make_videos, plan, shard
from lora import WEIGHT_NAME, add_lora, lora_state_dict, save_lora, set_lora_state
from media import read_video, resize, save_video
from model import CogVideoXTransformer, load_transformer
from pipeline import Pipeline, pad_front, read_model_info, resolve_model_path
from sampler import add_noise, v_target
from text_encoder import Tokenizer, load_text_encoder
from vae import load_vae, sample_posterior

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FRAME_NOISE = (-3.0, 0.5)  # I2V: log sigma ~ N(-3, 0.5) of the pixel noise on the conditioning frame
IMAGE_DROPOUT = 0.05       # I2V: probability that a sample trains without its image (zero latents)


# ----------------------------------------------------------------------------------------------------------------------
# The dataset: find the samples, validate all of them up front


@dataclasses.dataclass
class Sample:
    name: str       # how reports name it: "videos/a.mp4 (line 3)" or "a.mp4"
    video: str      # absolute path
    caption: str


def _lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f.read().splitlines()]
    while lines and not lines[-1]:  # trailing blank lines are not samples; blank lines inside are empty captions
        lines.pop()
    return lines


def find_samples(folder: str) -> tuple[list[Sample], list[str]]:
    """-> (samples, problems that concern the folder itself rather than one sample)."""
    if not os.path.isdir(folder):
        return [], [f"dataset folder {folder} not found"]
    prompts = next((os.path.join(folder, n) for n in ("prompts.txt", "prompt.txt")
                    if os.path.isfile(os.path.join(folder, n))), None)
    videos = os.path.join(folder, "videos.txt")
    has_videos = os.path.isfile(videos)
    if bool(prompts) != has_videos:  # half of the official layout, unless it is a name.mp4 + name.txt pair
        have, lack = (os.path.basename(prompts), "videos.txt") if prompts else ("videos.txt", "prompts.txt")
        stem = os.path.splitext(have)[0]
        if not any(os.path.isfile(os.path.join(folder, stem + e)) for e in VIDEO_EXTENSIONS):
            return [], [f"{folder} has {have} but no {lack}: give both (one caption / one video path per line), or "
                        f"name.mp4 + name.txt pairs"]
    if prompts and has_videos:
        captions, paths = _lines(prompts), _lines(videos)
        problems = [] if len(captions) == len(paths) else [
            f"{os.path.basename(prompts)} has {len(captions)} lines but videos.txt has {len(paths)}: one caption per video"]
        n = max(len(captions), len(paths))
        captions, paths = captions + [""] * (n - len(captions)), paths + [""] * (n - len(paths))  # each gap reported
        samples = [Sample(f"{p or '(no video)'} (line {i + 1})", os.path.join(folder, p) if p else "", c)
                   for i, (p, c) in enumerate(zip(paths, captions))]
        return samples, problems
    files = sorted(os.listdir(folder))
    stems = {os.path.splitext(n)[0]: n for n in files if n.lower().endswith(VIDEO_EXTENSIONS)}
    samples, problems = [], []
    for stem, name in stems.items():
        txt = os.path.join(folder, stem + ".txt")
        caption = open(txt, encoding="utf-8").read().strip() if os.path.isfile(txt) else None
        if caption is None:
            problems.append(f"{name}: caption file {stem}.txt not found")
        else:
            samples.append(Sample(name, os.path.join(folder, name), caption))
    for n in files:
        if n.endswith(".txt") and os.path.splitext(n)[0] not in stems:
            problems.append(f"{n}: no video named {os.path.splitext(n)[0]}.mp4 (or {', '.join(VIDEO_EXTENSIONS[1:])})")
    if not stems and not problems:
        problems.append(f"no samples in {folder}: expected prompts.txt + videos.txt, or name.mp4 + name.txt pairs")
    return samples, problems


def frame_indices(n: int, num_frames: int) -> list[int]:
    """num_frames indices at an even stride from the start, the official `range(0, n, n // num_frames)[:num_frames]`."""
    return list(range(0, n, n // num_frames))[:num_frames]


def select_frames(frames: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(N, 3, h, w) -> (num_frames, 3, h, w); a clip shorter than num_frames is an error, never padded."""
    if len(frames) < num_frames:
        raise ValueError(f"too short: {len(frames)} frames, at least {num_frames} needed (or lower --num-frames)")
    return frames[frame_indices(len(frames), num_frames)]


def load_clip(path: str, num_frames: int, height: int, width: int) -> torch.Tensor:
    """A video file -> (3, num_frames, height, width) in [-1, 1], the VAE's input layout."""
    frames = resize(select_frames(read_video(path), num_frames), height, width)     # (F, 3, H, W) in [0, 1]
    return (frames * 2 - 1).permute(1, 0, 2, 3).contiguous()                       # (3, F, H, W)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(folder: str) -> str:
    """Identity of a model component for cache keys: its config and the names and sizes of its files."""
    parts = []
    for n in sorted(os.listdir(folder)):
        p = os.path.join(folder, n)
        parts.append(f"{n}:{open(p).read() if n.endswith('.json') else os.path.getsize(p)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cache_settings(model: str, num_frames: int, height: int, width: int, max_text_len: int, dtype,
                   i2v: bool = False) -> dict:
    """Everything besides a clip's bytes and a caption's text that changes what the encoders produce. i2v: the file
    also holds the noised first frame's posterior (a T2V entry lacks it, so the keys differ)."""
    video = [num_frames, height, width, str(dtype), fingerprint(os.path.join(model, "vae"))]
    return {"video": video + ["first frame", FRAME_NOISE] if i2v else video,
            "text": [max_text_len, str(dtype), fingerprint(os.path.join(model, "text_encoder")),
                     fingerprint(os.path.join(model, "tokenizer"))]}


def cache_keys(sample: Sample, video_hash: str, settings: dict) -> tuple[str, str]:
    """(latent key, text key): a changed clip, caption, size, dtype or model gives new keys, so it is recomputed."""
    return _key(video_hash, settings["video"]), _key(sample.caption, settings["text"])


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def empty_caption_key(settings: dict) -> str:
    """The text key of the empty caption, which --caption-dropout trains on: the unconditional input of guidance."""
    return _key("", settings["text"])


Size = tuple[int, int, int]  # a bucket: (height, width, frames), in pixels


def parse_buckets(text: str, info) -> list[Size]:
    """--buckets 'HxWxF,...' -> [(height, width, frames)], each checked as generate.py checks a size (check_request),
    so a bad one is refused in one line that names it and the fix, before any weight is read."""
    buckets = []
    for part in (p.strip() for p in text.split(",")):
        bits = part.lower().split("x")
        if len(bits) != 3 or not all(b.isdigit() for b in bits):
            raise ValueError(f"--buckets {part!r}: write each bucket as HEIGHTxWIDTHxFRAMES, comma-separated, e.g. "
                             f"{info.height}x{info.width}x{info.num_frames}")
        h, w, f = map(int, bits)
        cfg, down = info.transformer, info.spatial_compression
        table = (cfg.sample_height * down, cfg.sample_width * down)  # the size a learned position table was made for
        if cfg.use_learned_positional_embeddings and (h, w) != table:
            raise ValueError(f"--buckets {part}: {info.path} has a learned position table for {table[0]}x{table[1]} "
                             f"only; every bucket must be {table[0]}x{table[1]}xFRAMES")
        try:
            check_request(info, f, h, w, torch.zeros(3, 16, 16) if info.is_i2v else None)
        except ValueError as e:
            raise ValueError(f"--buckets {part}: {e}") from None
        if (h, w, f) in buckets:
            raise ValueError(f"--buckets {part}: given twice; list each bucket once")
        buckets.append((h, w, f))
    return buckets


def nearest_bucket(frames: int, height: int, width: int, buckets: list[Size]) -> int | None:
    """The bucket a clip of this length and size trains in: among those with no more frames than it has (a clip is
    never padded), the nearest aspect ratio first (the centre crop discards the least), then the nearest area (the
    least scaling), then the most frames (the most of the clip seen). None: it is shorter than every bucket."""
    fits = [i for i, (_, _, f) in enumerate(buckets) if f <= frames]
    if not fits:
        return None
    if len(fits) == 1:
        return fits[0]
    aspect = lambda i: round(abs(math.log(height * buckets[i][1] / (width * buckets[i][0]))), 9)
    area = lambda i: round(abs(math.log(height * width / (buckets[i][0] * buckets[i][1]))), 9)
    return min(fits, key=lambda i: (aspect(i), area(i), -buckets[i][2]))


@dataclasses.dataclass
class Found:
    good: list            # [(sample, latent key, text key)]: the samples that train
    bucket: list[int]     # the bucket of each good sample, an index into the bucket list
    dropped: list[str]    # "name: why", each clip that fits no bucket (--buckets; without it that is a problem)
    problems: list[str]   # what must be fixed before anything runs
    shapes: dict          # video hash -> (frames, height, width) of clips decoded now (several buckets only)


def clip_shape(path: str, digest: str, cache: str) -> tuple[int, int, int]:
    """(frames, height, width) of a clip: from cache/clips/<hash>.json when an earlier run wrote it, else decoded."""
    known = os.path.join(cache, "clips", digest + ".json")
    if os.path.isfile(known):
        return tuple(read_json(known))
    frames = read_video(path)                                                       # (N, 3, h, w)
    return len(frames), frames.shape[2], frames.shape[3]


def sort_samples(samples: list[Sample], problems: list[str], cache: str, settings: list[dict], buckets: list[Size],
                 strict: bool = True) -> Found:
    """Check every sample, put each clip in its bucket (settings: cache_settings of each) and return them with the
    full list of problems. With one bucket, clips already in the cache were readable when cached (same bytes), so
    only new ones are decoded; with several, a clip's length and size pick its bucket, read from cache/clips/ once
    known, so again only new clips are decoded. strict (no --buckets): a clip too short is a problem that stops the
    run; otherwise it is dropped and reported, as a mixed folder is expected to hold some."""
    found = Found([], [], [], problems, {})
    for s in samples:
        if not s.caption:
            problems.append(f"{s.name}: empty caption")
        if not s.video or not os.path.isfile(s.video):
            problems.append(f"{s.name}: file not found" + (f" ({s.video})" if s.video else ""))
            continue
        digest, b = sha256_file(s.video), 0
        if len(buckets) > 1 or not os.path.isfile(latent_path(cache, cache_keys(s, digest, settings[0])[0])):
            try:
                shape = clip_shape(s.video, digest, cache)
            except ValueError as e:
                problems.append(f"{s.name}: {str(e).splitlines()[0]}")  # not the decoder's whole log
                continue
            if len(buckets) > 1:
                found.shapes[digest] = shape
            b = nearest_bucket(*shape, buckets)
            if b is None:
                need = min(f for _, _, f in buckets)
                if strict:
                    problems.append(f"{s.name}: too short: {shape[0]} frames, at least {need} needed (or lower "
                                    f"--num-frames)")
                else:
                    found.dropped.append(f"{s.name}: {shape[0]} frames, fewer than any bucket's (the shortest has "
                                         f"{need})")
                continue
        if s.caption:
            found.good.append((s, *cache_keys(s, digest, settings[b])))
            found.bucket.append(b)
    return found


def validate(samples: list[Sample], problems: list[str], cache: str, settings: dict, num_frames: int):
    """One training size (no --buckets): -> [(sample, latent key, text key)] for the good samples and the full list of
    problems, a clip shorter than num_frames among them."""
    found = sort_samples(samples, problems, cache, [settings], [(0, 0, num_frames)])
    return found.good, found.problems


def latent_path(cache: str, key: str) -> str:
    return os.path.join(cache, "latents", key + ".safetensors")


def micro_batch(seed: int, micro: int, batch: int, groups: list[list[int]]) -> list[int]:
    """The good-sample indices of global micro-batch `micro`, all from one bucket (groups: each bucket's indices).
    Each bucket has its own endless stream of epochs (dataset_index), and the buckets take turns in rounds: a round is
    a shuffle of every bucket repeated ceil(n_b / batch) times, so each clip is seen about once a round whatever its
    bucket's size. A pure function of (seed, micro), as a resume and torchrun need; with one bucket it is the plain
    stream (positions micro * batch onwards), as without buckets."""
    turns = [math.ceil(len(g) / batch) for g in groups]
    if sum(t > 0 for t in turns) == 1:
        b, k = turns.index(max(turns)), micro
    else:
        r, i = divmod(micro, sum(turns))
        order = np.random.default_rng([seed, r, len(groups)]).permutation(np.repeat(np.arange(len(groups)), turns))
        b = int(order[i])
        k = r * turns[b] + int((order[:i] == b).sum())  # the bucket's turns before this one
    g = groups[b]
    return [g[dataset_index(seed, p, len(g), b)] for p in range(k * batch, (k + 1) * batch)]


# ----------------------------------------------------------------------------------------------------------------------
# The cache: VAE latents and T5 embeddings, computed once


@torch.no_grad()
def build_cache(args, good, cache: str, device, dtype, sizes: list[Size] | None = None, shapes=None,
                vae_config=None, empty_key: str | None = None) -> None:
    """Encode what the cache lacks: each clip to its VAE posterior (mean, logvar), each caption to T5 states. The
    posterior is stored rather than one draw, so every step draws a fresh latent (the VAE's own augmentation). I2V
    (args.i2v): also the posterior of the clip's noised first frame, noised once per clip as diffusers' script does
    when it caches (THUDM's trainer re-noises every step, which needs the VAE in memory while training).
    sizes: each good sample's bucket (default: all at --height x --width x --num-frames); shapes: the clip shapes
    sort_samples decoded, kept in cache/clips/ so the next run need not decode them to find their buckets.
    vae_config: the VAE config the checks read (ModelInfo.vae), so the file is read once per run. empty_key: also
    the empty caption, under this key (--caption-dropout)."""
    for digest, shape in (shapes or {}).items():
        atomic_write(os.path.join(cache, "clips", digest + ".json"), lambda p: write_json(p, list(shape)))
    sizes = sizes or [(args.height, args.width, args.num_frames)] * len(good)
    todo_v = [(s, k, size) for (s, k, _), size in zip(good, sizes) if not os.path.isfile(latent_path(cache, k))]
    captions = {k: s.caption for s, _, k in good} | ({empty_key: ""} if empty_key else {})
    todo_t = {k: c for k, c in captions.items() if not os.path.isfile(os.path.join(cache, "text", k + ".safetensors"))}
    if todo_v:
        vae = load_vae(os.path.join(args.model, "vae"), dtype=dtype, device=device, config=vae_config)
        for s, k, (height, width, frames) in tqdm(todo_v, desc="encoding clips"):
            clip = load_clip(s.video, frames, height, width)
            mean, logvar = vae.encode(clip[None].to(device, dtype))                 # (1, C, F, H, W) each
            tensors = {"mean": mean[0].transpose(0, 1).contiguous().cpu(),          # (F, C, H, W)
                       "logvar": logvar[0].transpose(0, 1).contiguous().cpu()}
            if args.i2v:
                frame = noise_first_frame(clip, frame_generator(k))                 # (3, 1, H, W)
                mean, logvar = vae.encode(frame[None].to(device, dtype))            # (1, C, 1, h, w) each
                tensors.update(image_mean=mean[0, :, 0].contiguous().cpu(),         # (C, h, w)
                               image_logvar=logvar[0, :, 0].contiguous().cpu())
            atomic_write(latent_path(cache, k), lambda p: save_file(tensors, p))
        del vae
    if todo_t:
        tokenizer = Tokenizer(os.path.join(args.model, "tokenizer"))
        t5 = load_text_encoder(os.path.join(args.model, "text_encoder"), dtype=dtype, device=device)
        for k, caption in tqdm(todo_t.items(), desc="encoding captions"):
            ids = tokenizer([caption], max_length=args.max_text_len).to(device)     # (1, L)
            emb = {"embedding": t5(ids)[0].contiguous().cpu()}                      # (L, D)
            atomic_write(os.path.join(cache, "text", k + ".safetensors"), lambda p: save_file(emb, p))
        del t5
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------------
# The training math


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The RNG of one sample of the global stream: independent of the process count and of where a run resumed."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, position]).generate_state(1)[0]))


def dataset_index(seed: int, position: int, n: int, stream: int = 0) -> int:
    """Sample `position` of an endless stream of epochs, each a fresh permutation of the n samples. stream: bucket
    b's own stream (bucket 0's is the one a run without buckets has always drawn)."""
    epoch, i = divmod(position, n)
    return int(np.random.default_rng([seed, epoch] + ([stream] if stream else [])).permutation(n)[i])


def learning_rate(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then a cosine decay to zero at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def frame_generator(latent_key: str) -> torch.Generator:
    """The RNG of a clip's conditioning-frame noise: a pure function of its cache key (its bytes and the settings),
    so a rebuilt cache holds the same entry."""
    return torch.Generator().manual_seed(int(latent_key[:15], 16))


def noise_first_frame(clip: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """clip (3, F, H, W) in [-1, 1] -> its first frame (3, 1, H, W) plus Gaussian noise of std sigma, log sigma ~
    N(-3, 0.5) (median sigma 0.05, a few pixel levels), the official I2V recipe: the condition is never pixel-exact,
    so the model learns to follow the image rather than depend on its exact values."""
    image = clip[:, :1]
    sigma = torch.normal(*FRAME_NOISE, size=(1,), generator=generator).exp()
    return image + torch.randn(image.shape, generator=generator, dtype=image.dtype) * sigma.to(image.dtype)


def condition_scale(z: torch.Tensor, scaling_factor: float, invert: bool) -> torch.Tensor:
    """A drawn image latent -> the scale the model was trained on: times scaling_factor, but divided by it for 1.5
    (its VAE config's invert_scale_latents). The inference pipelines scale the condition so (generate.py through
    pipeline.encode_frames, diffusers' I2V pipeline), and a LoRA must see in training what it will see in use
    (diffusers' training script, written for 1.0, always multiplies)."""
    return z / scaling_factor if invert else z * scaling_factor


def condition_latents(image: torch.Tensor, frames: int) -> torch.Tensor:
    """The scaled image latent (C, H, W) -> (frames, C, H, W): itself, then frames - 1 zero latents. For 1.5,
    frames is the padded count (the video's first frame repeated in front), and the image stays at index 0, as
    generate.py and diffusers' 1.5 pipeline place it."""
    return torch.cat([image[None], image.new_zeros(frames - 1, *image.shape)])


def drop_condition(cond: torch.Tensor, generator: torch.Generator, p: float = IMAGE_DROPOUT) -> torch.Tensor:
    """Zero the whole condition with probability p (the recipe's noised_image_dropout, 0.05): the model also sees
    text-only samples, so it does not lean on the image for everything."""
    return torch.zeros_like(cond) if torch.rand((), generator=generator) < p else cond


def training_ofs(ofs_embed_dim: int | None, batch: int) -> torch.Tensor | None:
    """1.5-I2V's ofs input (B,): 2.0, the value its pipeline and THUDM's trainer pass; None for models without it."""
    return None if ofs_embed_dim is None else torch.full((batch,), 2.0)


def make_batch(items, positions: list[tuple[int, int]], cache: str, scaling_factor: float, timesteps: int, patch_size_t,
               i2v: bool = False, invert_scale: bool = False, dropout: float = IMAGE_DROPOUT,
               caption_dropout: float = 0.0, empty_key: str | None = None):
    """The samples at these stream positions -> x0 (B, F, C, H, W) fp32 scaled latents, text (B, L, D), t (B,), the
    noise (B, F, C, H, W) and, for I2V, the condition (B, F, C, H, W) (else None), all drawn from each sample's own
    generator (the condition's draws after the others, so T2V streams are unchanged). caption_dropout: the
    probability that a sample's text is the empty caption's (cache key empty_key), drawn last, so a run without it
    draws what it always drew."""
    x0, text, t, noise, cond = [], [], [], [], []
    for pos, (_, lat_key, txt_key) in zip(positions, items):
        g = sample_generator(*pos)
        lat = load_file(latent_path(cache, lat_key))
        z = sample_posterior(lat["mean"].float(), lat["logvar"].float(), g) * scaling_factor  # (F, C, H, W)
        x0.append(pad_front(z[None], patch_size_t)[0][0])                             # 1.5: an even latent count
        text.append(load_file(os.path.join(cache, "text", txt_key + ".safetensors"))["embedding"])
        t.append(torch.randint(0, timesteps, (1,), generator=g))
        noise.append(torch.randn(x0[-1].shape, generator=g))                          # x0's shape, padding included
        if i2v:
            image = sample_posterior(lat["image_mean"].float(), lat["image_logvar"].float(), g)  # (C, H, W)
            image = condition_latents(condition_scale(image, scaling_factor, invert_scale), len(x0[-1]))
            cond.append(drop_condition(image, g, dropout))                            # (F, C, H, W)
        if caption_dropout and torch.rand((), generator=g) < caption_dropout:
            text[-1] = load_file(os.path.join(cache, "text", empty_key + ".safetensors"))["embedding"]  # (L, D)
    return torch.stack(x0), torch.stack(text), torch.cat(t), torch.stack(noise), torch.stack(cond) if i2v else None


def diffusion_loss(model, scheduler, x0, text, t, noise, dtype, cond=None, ofs=None):
    """The v-prediction loss at uniformly drawn timesteps. THUDM's trainer converts v̂ to x̂0 = √ᾱ x_t − √(1−ᾱ) v̂ and
    weights (x̂0 − x0)² by 1/(1−ᾱ); since x̂0 − x0 = −√(1−ᾱ)(v̂ − v) that is exactly (v̂ − v)², computed here directly.
    Mean over each sample's elements, then over the batch. I2V: the clean condition (B, F, C, H, W) goes next to x_t
    on the channels, only x_t is noised and only the video's channels are predicted; ofs (B,) for 1.5-I2V."""
    x_t = add_noise(scheduler, x0, noise, t)                                        # (B, F, C, H, W)
    x_in = x_t if cond is None else torch.cat([x_t, cond], dim=2)                   # (B, F, [2]C, H, W)
    args = (x_in.to(dtype), text.to(dtype), t) + (() if ofs is None else (ofs.to(dtype),))
    pred = model(*args)                                                             # (B, F, C, H, W)
    return ((pred.float() - v_target(scheduler, x0, noise, t)) ** 2).mean()


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_dir(output: str, step: int) -> str:
    return os.path.join(output, f"checkpoint-{step:06d}")


def save_checkpoint(output: str, step: int, model, optimizer, args) -> str:
    """checkpoint-<step>/ with the optimizer state and the weights: the LoRA file (usable as is by --lora), or with
    --full a transformer/ folder (save_transformer). Written to a temporary folder and renamed, so a crash never
    leaves a half checkpoint."""
    final = checkpoint_dir(output, step)
    name = os.path.basename(final)
    weights = "transformer/" if args.full else WEIGHT_NAME
    cli.record(output, [f"{name}/{n}" for n in (weights, "training_state.pt", cli.MARKER_FILE)], TOOL)
    with cli.output_folder(final, TOOL) as tmp:
        if args.full:
            save_transformer(model, args.model, os.path.join(tmp, "transformer"))
        else:
            save_lora(os.path.join(tmp, WEIGHT_NAME), lora_state_dict(model), args.rank, args.alpha)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "args": vars(args)},
                   os.path.join(tmp, "training_state.pt"))
    cli.record(output, [name], TOOL, relist=True)
    return final


SHARD_BYTES = 5e9  # the official snapshots' shards are ~5 GB (an fp32 5b is 22 GB)


def save_transformer(model, base: str, folder: str) -> None:
    """A new transformer/ folder in the official layout: the base snapshot's config.json as it is and the weights in
    fp32 under the checkpoint's own keys (our module names are those keys), sharded past 5 GB, so load_transformer
    and diffusers' CogVideoXTransformer3DModel.from_pretrained read it. fp32, not the base's bf16: a fine-tune's
    updates are mostly smaller than a bf16 step of the weight they change, and rounding would erase them."""
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    config = read_json(os.path.join(base, "transformer", "config.json"))
    save_component(sd, config, folder, max_shard_bytes=SHARD_BYTES)


def freeze_matches(names: list[str], patterns: list[str]) -> list[bool]:
    """Which parameter names a --freeze list covers: a glob on the whole name ('patch_embed.*', '*.norm1.*') or a
    module path and everything below it ('transformer_blocks.0')."""
    return [any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n, p + ".*") for p in patterns) for n in names]


def check_freeze(text: str, info) -> list[str]:
    """--freeze 'PATTERN,...' -> the patterns, each checked against the parameter names of the model built on the
    meta device (no weight read): a pattern that matches nothing, or a list that freezes everything, is refused."""
    patterns = [p.strip() for p in text.split(",")]
    with torch.device("meta"):
        names = [n for n, _ in CogVideoXTransformer(info.transformer).named_parameters()]
    for p in patterns:
        if not p or not any(freeze_matches(names, [p])):
            raise ValueError(f"--freeze {p!r} matches no transformer parameter; names look like {names[0]!r} or "
                             f"'transformer_blocks.0.attn1.to_q.weight' (globs with *, or a module path)")
    if all(freeze_matches(names, patterns)):
        raise ValueError(f"--freeze {text}: freezes every parameter, nothing would train")
    return patterns


def unfreeze(model, patterns: list[str]) -> list[torch.nn.Parameter]:
    """Full fine-tuning: every parameter trains but those the --freeze patterns cover. -> the trainable ones."""
    names = [n for n, _ in model.named_parameters()]
    for (_, p), frozen in zip(model.named_parameters(), freeze_matches(names, patterns)):
        p.requires_grad_(not frozen)
    return [p for p in model.parameters() if p.requires_grad]


def find_resume(output: str, resume: str) -> str:
    if resume != "latest":
        return resume
    found = sorted(n for n in os.listdir(output) if n.startswith("checkpoint-")) if os.path.isdir(output) else []
    if not found:
        raise ValueError(f"--resume latest: no checkpoint-* folder in {output}")
    return os.path.join(output, found[-1])


TOOL = "train_lora.py"
RUN_FILES = ("loss.jsonl", "loss.png", WEIGHT_NAME, "transformer", "validation")  # besides checkpoint-*/, cache/


def run_entries(output: str) -> list[str]:
    """What a run writes into --output and a later run replaces: checkpoint-*/ and RUN_FILES (not the cache, whose
    files are keyed on their content and reused)."""
    found = sorted(n for n in os.listdir(output) if n.startswith("checkpoint-")) if os.path.isdir(output) else []
    return found + list(RUN_FILES)


def check_output(args) -> None:
    """Before any work. A run without --resume starts clean: --output must be new, empty, or an earlier run's folder
    holding nothing but what this tool wrote there, at any depth (its files are removed once the dataset is cached,
    so `--resume latest` can never pick up the earlier run's checkpoints). With --resume the run continues in its
    folder: what it may replace (checkpoint-*/, the log, the LoRA, validation/) must be ours; files of the user's
    elsewhere in it are left alone."""
    if args.resume:
        cli.check_folder(args.output, "--output", exact=False, parts=run_entries(args.output))
    else:
        cli.check_folder(args.output, "--output")
    if args.cache_dir:
        cli.check_folder(args.cache_dir, "--cache-dir", exact=False)


def start_clean(output: str) -> list[str]:
    """Remove an earlier run's files from `output` (checked again now: nothing but ours), keeping its cache; -> the
    names removed."""
    cli.check_folder(output, "--output")
    gone = [n for n in sorted(os.listdir(output)) if n not in ("cache", cli.MARKER_FILE)]
    for n in gone:
        p = os.path.join(output, n)
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
    if gone:
        cli.record(output, gone, TOOL, relist=True)
    return gone


# Settings that must not change across a resume, or it would not continue the same run.
SAME_ON_RESUME = ("model", "rank", "alpha", "seed", "batch_size", "grad_accum", "num_frames", "height", "width",
                  "buckets", "full", "freeze", "caption_dropout")
# what a checkpoint from before these flags ran with
ADDED_LATER = {"buckets": None, "full": False, "freeze": None, "caption_dropout": 0.0}


def load_checkpoint(path: str, model, optimizer, args) -> int:
    """Restore the optimizer and the LoRA weights; with --full the weights were read from path/transformer when the
    model was built (a full model is not read twice)."""
    if not os.path.isfile(os.path.join(path, "training_state.pt")):
        raise ValueError(f"--resume {path}: not a checkpoint folder (no training_state.pt in it)")
    state = torch.load(os.path.join(path, "training_state.pt"), map_location="cpu", weights_only=True)
    old = state["args"]
    changed = [f"--{k.replace('_', '-')} was {old.get(k, ADDED_LATER.get(k))}" for k in SAME_ON_RESUME
               if old.get(k, ADDED_LATER.get(k)) != getattr(args, k)]
    if changed:
        raise ValueError(f"--resume {path}: {', '.join(changed)}; resume with the same settings")
    if not args.full:
        set_lora_state(model, load_file(os.path.join(path, WEIGHT_NAME)))
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


# ----------------------------------------------------------------------------------------------------------------------
# Logging and validation renders


def log_step(path: str, record: dict, truncate_after: int | None = None) -> None:
    """Append one JSON line; on resume first drop the lines past the resumed step (they will be redone)."""
    if truncate_after is not None and os.path.isfile(path):
        kept = [line for line in open(path) if line.strip() and json.loads(line)["step"] <= truncate_after]
        atomic_write(path, lambda p: open(p, "w").writelines(kept))
    if record:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def plot_losses(log: str, png: str) -> bool:
    """loss.png from the log when matplotlib is installed (an optional dependency)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in open(log) if line.strip()]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8)
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="LoRA training loss")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


class Renderer:
    """Renders the validation prompt with the model being trained. T5 and the VAE wait on the CPU between renders and
    visit the GPU only while one runs."""

    def __init__(self, args, info, request: Request, device, dtype):
        self.args, self.request, self.device = args, request, device
        self.pipe = Pipeline(tokenizer=Tokenizer(os.path.join(args.model, "tokenizer")),
                             text_encoder=load_text_encoder(os.path.join(args.model, "text_encoder"), dtype=dtype),
                             transformer=None,
                             vae=load_vae(os.path.join(args.model, "vae"), dtype=dtype, config=info.vae),
                             scheduler=info.scheduler, info=info, device=device, dtype=dtype)

    def __call__(self, model, step: int) -> str:
        a, pipe = self.args, self.pipe
        pipe.transformer = model
        for m in (pipe.text_encoder, pipe.vae):
            m.to(self.device)
        mixed = next(model.parameters()).dtype != pipe.dtype  # --full: fp32 master weights, --dtype compute
        with torch.autocast(self.device.type, dtype=pipe.dtype, enabled=mixed):
            frames = make_videos(pipe, self.request, self.request.jobs[0], progress=False)
        for m in (pipe.text_encoder, pipe.vae):
            m.to("cpu")
        cli.record(a.output, [f"validation/step-{step:06d}.{ext}" for ext in ("mp4", "png")], TOOL)
        return save_video(frames[0], os.path.join(a.output, "validation", f"step-{step:06d}.mp4"), pipe.info.fps)[0]


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = cli.ArgumentParser(description="LoRA or full fine-tuning of CogVideoX (text- or image-to-video) on your own "
                                       "clips.")
    p.add_argument("--model", required=True,
                   help="a local CogVideoX snapshot folder (2b, 5b, 5b-I2V, 1.5-5B, 1.5-5B-I2V)")
    p.add_argument("--data", required=True, help="prompts.txt + videos.txt, or name.mp4 + name.txt pairs")
    p.add_argument("--output", default="runs/lora",
                   help="a new folder, or one an earlier run of this tool created (checkpoints, the LoRA, the log)")
    p.add_argument("--cache-dir", default=None, help="latent/text cache (default: <output>/cache)")
    p.add_argument("--num-frames", type=cli.positive_int, default=None, help="default: the model's (49; 81 for 1.5)")
    p.add_argument("--height", type=cli.pixels, default=None, help="a multiple of 16 (default: the model's)")
    p.add_argument("--width", type=cli.pixels, default=None, help="a multiple of 16 (default: the model's)")
    p.add_argument("--buckets", default=None,
                   help="clips of several sizes: HxWxF,... (e.g. 480x720x49,720x480x49); each clip trains in the "
                        "nearest, each batch in one (default: one bucket, --height x --width x --num-frames)")
    p.add_argument("--full", action="store_true",
                   help="full fine-tuning: every transformer weight trains (fp32 + AdamW: 16 bytes a parameter)")
    p.add_argument("--freeze", default=None,
                   help="with --full: parameters that stay frozen, PATTERN,... (globs or module paths, e.g. "
                        "'patch_embed,time_embedding')")
    p.add_argument("--rank", type=cli.positive_int, default=128, help="LoRA rank")
    p.add_argument("--alpha", type=cli.positive_float, default=64.0,
                   help="the LoRA scale is alpha/rank (THUDM's default 64/128)")
    p.add_argument("--steps", type=cli.positive_int, default=1000, help="optimizer steps")
    p.add_argument("--batch-size", type=cli.positive_int, default=1, help="samples per micro-step, over all processes")
    p.add_argument("--grad-accum", type=cli.positive_int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=cli.positive_float, default=None,
                   help="peak learning rate (default 1e-4; 2e-5 with --full, THUDM's SFT rate)")
    p.add_argument("--warmup", type=cli.nonnegative_int, default=100, help="linear warm-up steps, then cosine decay to 0")
    p.add_argument("--weight-decay", type=cli.nonnegative_float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=cli.positive_float, default=1.0, help="gradient clipping")
    p.add_argument("--seed", type=cli.seed, default=42, help="data order, timesteps, noise")
    p.add_argument("--caption-dropout", type=cli.probability, default=0.0,
                   help="probability that a sample trains on the empty caption (SAT's configs: 0.1; THUDM's finetune/ "
                        "and diffusers' scripts: 0): guidance extrapolates from the empty caption's prediction")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="frozen weights and autocast: default bf16 on GPU, fp32 on CPU (the LoRA itself is fp32)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each block in backward: much less memory, ~30%% slower")
    p.add_argument("--checkpoint-every", type=cli.positive_int, default=200, help="steps between checkpoints")
    p.add_argument("--resume", default=None, help="a checkpoint-<step> folder, or 'latest' in --output")
    p.add_argument("--validation-prompt", default=None, help="a prompt rendered during training")
    p.add_argument("--validation-image", default=None,
                   help="image-to-video models: the first frame of the validation render")
    p.add_argument("--validate-every", type=cli.nonnegative_int, default=0,
                   help="render --validation-prompt every N steps (0: never)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the local rank's GPU when "
                                                  "there is one, else cpu)")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 2e-5 if args.full else 1e-4
    return args


def setup_distributed(device_arg):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: then one process per GPU (nccl), or per CPU worker (gloo)."""
    rank, world, local = shard()
    device = cli.pick_device(device_arg)
    cuda = device.type == "cuda"
    device = torch.device("cuda", local) if cuda and device.index is None else device
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return world, rank, local, device


def all_ok(ok: bool, world: int, device) -> bool:
    """True on every process only if it is true on every process (so a bad dataset stops all of them)."""
    if world == 1:
        return ok
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def check_args(args, info, world: int) -> Request:
    """Every flag, before any work (no weight is read). Returns the plan of the validation render (generate.plan),
    which also fixes the training size: --num-frames, --height and --width, or the model's; with --buckets, the
    first bucket's."""
    if args.validation_image and not info.is_i2v:
        raise ValueError(f"--validation-image: {args.model} is a text-to-video model; leave it out")
    if args.validation_image and not args.validation_prompt:
        raise ValueError("--validation-image needs --validation-prompt (and --validate-every N)")
    if args.validation_prompt and info.is_i2v and not args.validation_image:
        raise ValueError(f"--validation-prompt: {args.model} is an image-to-video model; add --validation-image PATH")
    if args.freeze and not args.full:
        raise ValueError("--freeze lists what full fine-tuning keeps frozen: add --full (a LoRA trains only itself)")
    args.freeze_patterns = check_freeze(args.freeze, info) if args.freeze else []  # kept: checked once
    size = (args.num_frames, args.height, args.width)
    if args.buckets is not None:
        if any(v is not None for v in size):
            raise ValueError("--buckets sets every training size: leave out --num-frames, --height and --width")
        args.bucket_sizes = buckets = parse_buckets(args.buckets, info)  # kept: parsed and checked once
        args.buckets = ",".join(f"{h}x{w}x{f}" for h, w, f in buckets)  # one spelling, compared on resume
        size = (buckets[0][2], buckets[0][0], buckets[0][1])  # the validation render's
    # an I2V plan needs an image; without a validation render, a blank one only fixes the size
    image = args.validation_image or (torch.zeros(3, 16, 16) if info.is_i2v else None)
    request = plan(info, args.validation_prompt or "", num_frames=size[0], height=size[1], width=size[2],
                   seed=args.seed, image=image)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the process count {world}")
    if args.validate_every and not args.validation_prompt:
        raise ValueError("--validate-every needs --validation-prompt")
    if args.validation_prompt and not args.validate_every:
        raise ValueError("--validation-prompt needs --validate-every N")
    cli.existing_path("--data", args.data, "folder")
    if args.resume and args.resume != "latest":
        cli.existing_path("--resume", args.resume, "folder")
    check_output(args)
    return request


def main(argv=None) -> int:
    args = parse_args(argv)

    def work():
        try:
            return train(args, *setup_distributed(args.device))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    return cli.run(work)


def train(args, world: int, rank: int, local: int, device) -> int:
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    say = print if rank == 0 else (lambda *a, **k: None)
    info = read_model_info(resolve_model_path(args.model))
    request = check_args(args, info, world)
    args.num_frames, args.height, args.width = request.num_frames, request.height, request.width
    args.max_text_len = request.text_length
    scheduler = info.scheduler
    if scheduler.prediction_type != "v_prediction":
        raise ValueError(f"{args.model}: the scheduler predicts {scheduler.prediction_type!r}; every CogVideoX "
                         f"checkpoint, and this trainer, use 'v_prediction'")
    cache = args.cache_dir or os.path.join(args.output, "cache")
    args.i2v = info.is_i2v
    buckets = args.bucket_sizes if args.buckets else [(args.height, args.width, args.num_frames)]
    settings = [cache_settings(args.model, f, h, w, args.max_text_len, dtype, args.i2v) for h, w, f in buckets]
    # --caption-dropout's empty caption (the text settings are the same in every bucket)
    empty_key = empty_caption_key(settings[0]) if args.caption_dropout else None

    # 1. Validate every sample, then fill the cache; one process per machine does it, the others wait.
    ok, found = True, None
    if local == 0:
        found = sort_samples(*find_samples(args.data), cache, settings, buckets, strict=args.buckets is None)
        problems = found.problems or ([] if found.good else
                                      [f"no clip fits a bucket of --buckets {args.buckets}"] + found.dropped)
        if problems:
            print(f"error: {len(problems)} problem(s) in the dataset {args.data}; nothing was written. Fix or remove:\n  "
                  + "\n  ".join(problems), file=sys.stderr)
            ok = False
        else:
            check_output(args)  # again: nothing of the user's appeared while the clips were read
            cli.claim_folder(args.output, TOOL, "--output")
            if args.cache_dir:
                cli.claim_folder(args.cache_dir, TOOL, "--cache-dir")
            root, prefix = (args.cache_dir, "") if args.cache_dir else (args.output, "cache/")
            cli.record(root, [f"{prefix}{kind}/{k}.safetensors" for s, lat, txt in found.good
                              for kind, k in (("latents", lat), ("text", txt))]
                       + [f"{prefix}clips/{d}.json" for d in found.shapes]
                       + ([f"{prefix}text/{empty_key}.safetensors"] if empty_key else []), TOOL)
            build_cache(args, found.good, cache, device, dtype, [buckets[b] for b in found.bucket], found.shapes,
                        info.vae, empty_key)
    if not all_ok(ok, world, device):
        return 2
    if rank == 0 and not args.resume and (gone := start_clean(args.output)):
        say(f"a new run in {args.output}: removed the earlier run's {', '.join(gone)} (the cache is kept; "
            f"--resume continues a run instead)")
    if local != 0:  # the cache is complete now: list the same samples (cheap: every clip is cached)
        found = sort_samples(*find_samples(args.data), cache, settings, buckets, strict=args.buckets is None)
    good = found.good
    groups = [[i for i, b in enumerate(found.bucket) if b == n] for n in range(len(buckets))]
    say(f"{len(good)} samples, cache {cache}")
    if args.buckets:
        say("clips per bucket: " + ", ".join(f"{h}x{w}x{f} {len(g)}" for (h, w, f), g in zip(buckets, groups))
            + f"; {len(found.dropped)} dropped" + "".join(f"\n  dropped {d}" for d in found.dropped))

    # 2. The transformer: with LoRA on its attention projections, only A and B training (fp32 master weights); or
    # with --full every weight but the frozen ones, in fp32 (the master weights; autocast computes in --dtype).
    resume = find_resume(args.output, args.resume) if args.resume else None
    weights = os.path.join(args.model, "transformer")
    if args.full and resume:
        weights = os.path.join(resume, "transformer")
        if not os.path.isdir(weights):
            raise ValueError(f"--resume {resume}: no transformer/ folder in it, so not a --full run's checkpoint; "
                             f"resume with the same settings")
    model = load_transformer(weights, dtype=torch.float32 if args.full else dtype, device=device,
                             config=info.transformer)
    torch.manual_seed(args.seed)
    if args.full:
        params = unfreeze(model, args.freeze_patterns)
    else:
        params = add_lora(model, args.rank, args.alpha)
    model.gradient_checkpointing = args.gradient_checkpointing
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else model
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=args.weight_decay)
    start = 0
    if resume:
        start = load_checkpoint(resume, model, optimizer, args)
        say(f"resumed from {resume} at step {start}")
    log = os.path.join(args.output, "loss.jsonl")
    if rank == 0:
        os.makedirs(args.output, exist_ok=True)
        cli.record(args.output, ["loss.jsonl"], TOOL)
        if start:
            log_step(log, {}, truncate_after=start)
        else:
            open(log, "w").close()
    render = Renderer(args, info, request, device, dtype) if args.validate_every and rank == 0 else None
    what = (f"full fine-tuning{f' (frozen: {args.freeze})' if args.freeze else ''}" if args.full else
            f"LoRA rank {args.rank}, alpha {args.alpha:g}")
    say(f"{what}: {sum(p.numel() for p in params) / 1e6:.2f}M trainable "
        f"parameters; {world} process(es), global batch {args.batch_size} x {args.grad_accum} accumulation")

    # 3. The loop. Process `rank` takes its slice of each micro-batch of the global sample stream.
    per_rank = args.batch_size // world
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=rank != 0, desc="training")
    for step in bar:
        lr = learning_rate(step, args.lr, args.warmup, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            m = step * args.grad_accum + micro
            first = m * args.batch_size + rank * per_rank
            positions = [(args.seed, p) for p in range(first, first + per_rank)]
            items = [good[i] for i in micro_batch(args.seed, m, args.batch_size, groups)[rank * per_rank:][:per_rank]]
            x0, text, t, noise, cond = (x if x is None else x.to(device) for x in make_batch(
                items, positions, cache, info.vae.scaling_factor, scheduler.num_train_timesteps,
                info.transformer.patch_size_t, args.i2v, info.vae.invert_scale_latents,
                caption_dropout=args.caption_dropout, empty_key=empty_key))
            ofs = training_ofs(info.transformer.ofs_embed_dim, len(x0))
            sync = world == 1 or micro == args.grad_accum - 1
            with (contextlib.nullcontext() if sync else net.no_sync()):
                with autocast:
                    loss = diffusion_loss(net, scheduler, x0, text, t, noise, dtype, cond,
                                          None if ofs is None else ofs.to(device))
                (loss / args.grad_accum).backward()
            total += loss.detach() / args.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(total)
            total /= world
        done = step + 1
        if rank == 0:
            log_step(log, {"step": done, "loss": total.item(), "lr": lr, "grad_norm": grad_norm.item()})
            bar.set_postfix(loss=f"{total.item():.4f}", lr=f"{lr:.2e}")
            if done % args.checkpoint_every == 0 or done == args.steps:
                save_checkpoint(args.output, done, model, optimizer, args)
            if render and done % args.validate_every == 0:
                bar.write(f"step {done}: validation video {render(model, done)}")

    # 4. The result.
    if rank == 0:
        out = os.path.join(args.output, "transformer" if args.full else WEIGHT_NAME)
        cli.record(args.output, [os.path.basename(out) + ("/" if args.full else ""), "loss.png"], TOOL)
        if args.full:
            with cli.output_folder(out, TOOL) as tmp:
                os.rmdir(tmp)  # save_component makes the folder itself
                save_transformer(model, args.model, tmp)
            cli.record(args.output, ["transformer"], TOOL, relist=True)
        else:
            atomic_write(out, lambda p: save_lora(p, lora_state_dict(model), args.rank, args.alpha))
        png = os.path.join(args.output, "loss.png")
        plotted = plot_losses(log, png)
        print(f"wrote {out} and {log}" + (f" and {png}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
