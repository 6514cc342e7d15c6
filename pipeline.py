"""Loading a CogVideoX snapshot into a pipeline, and the pipeline's boundaries: prompts -> T5 embeddings, frames ->
VAE latents, latents -> frames. What generate.py, edit.py, tour.py and evaluate.py share below the sampler loop.

A snapshot is the official Hugging Face layout: transformer/, vae/, text_encoder/, tokenizer/ and scheduler/, each
with its config file. `read_model_info` reads the configs alone (no weights), so a run can check everything it was
asked before any weight is read; `load_pipeline` then builds every component from those same configs: each config
file is read once per run.

Legend: B batch, F latent frames, C channels, H/W height/width (latent unless said "pixel"), L text tokens.
"""
import os
from dataclasses import dataclass

import torch

import cli
from checkpoint import CheckpointError, config_from_dict, read_json
from model import CogVideoXTransformer, TransformerConfig, load_transformer
from offload import OFFLOAD, on_device
from sampler import SchedulerConfig, load_scheduler_config
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
    num_frames: int
    height: int
    width: int
    fps: int
    frame_multiple: int     # valid frame counts are frame_multiple * k + 1
    temporal_compression: int
    spatial_compression: int
    max_text_seq_length: int
    gpu_dtype: torch.dtype  # the precision it was trained in: fp16 for 2b, bf16 for the RoPE models (5b, 1.5)
    transformer: TransformerConfig  # the configs it was read from, so that a run reads each config file once
    vae: VAEConfig
    scheduler: SchedulerConfig


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


def model_info(path: str, transformer_config, vae_config, scheduler_config) -> ModelInfo:
    is_v15 = transformer_config.patch_size_t is not None
    spatial = 2 ** (len(vae_config.block_out_channels) - 1)
    if is_v15 and transformer_config.sample_height == 300:  # official 1.5: sample size is the max RoPE grid, not a default
        height, width, fps = 768, 1360, 16
    else:
        height, width = transformer_config.sample_height * spatial, transformer_config.sample_width * spatial
        fps = 16 if is_v15 else 8
    rope = transformer_config.use_rotary_positional_embeddings
    return ModelInfo(path=path, is_i2v=transformer_config.in_channels == 2 * transformer_config.out_channels,
                     num_frames=transformer_config.sample_frames, height=height, width=width, fps=fps,
                     frame_multiple=16 if is_v15 else 8,
                     temporal_compression=vae_config.temporal_compression_ratio, spatial_compression=spatial,
                     max_text_seq_length=transformer_config.max_text_seq_length,
                     gpu_dtype=torch.bfloat16 if rope or is_v15 else torch.float16,
                     transformer=transformer_config, vae=vae_config, scheduler=scheduler_config)


def read_model_info(path: str) -> ModelInfo:
    """What a snapshot is, from its config files alone (cheap: no weights read)."""
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not os.path.isdir(os.path.join(path, sub)):
            raise CheckpointError(f"{path} is not a CogVideoX snapshot: the folder {sub}/ is missing")
    tcfg = config_from_dict(TransformerConfig, read_json(os.path.join(path, "transformer", "config.json")))
    vcfg = config_from_dict(VAEConfig, read_json(os.path.join(path, "vae", "config.json")))
    return model_info(path, tcfg, vcfg, load_scheduler_config(os.path.join(path, "scheduler")))


def load_pipeline(path: str | ModelInfo | None = None, dtype: torch.dtype | None = None, device=None,
                  offload: bool | str | None = None) -> Pipeline:
    """Load every component of a CogVideoX snapshot folder (the official Hugging Face layout), given as a path, as
    the ModelInfo read_model_info returned for it, or None for the bundled demo model. dtype and device default as
    on the command line: the GPU if there is one, in the checkpoint's precision there (cli.pick_dtype), fp32 on the
    CPU; a torch.device is taken as given (the command line has checked it). The tokenizer and configs are read
    first, so a broken snapshot fails before any weight is read.
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
    device = device if isinstance(device, torch.device) else cli.pick_device(device)
    dtype = dtype or cli.pick_dtype(None, device, info.gpu_dtype)
    tokenizer = Tokenizer(os.path.join(path, "tokenizer"))
    where = torch.device("cpu") if offload else device
    transformer = load_transformer(os.path.join(path, "transformer"), dtype=dtype, device=where, config=info.transformer)
    vae = load_vae(os.path.join(path, "vae"), dtype=dtype, device=where, config=info.vae)
    text_encoder = load_text_encoder(os.path.join(path, "text_encoder"), dtype=dtype, device=where)
    return Pipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                    scheduler=info.scheduler, info=info, device=device, dtype=dtype, offload=offload)


# ----------------------------------------------------------------------------------------------------------------------
# The boundaries: text, frames and latents


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


def worth_tiling(config: VAEConfig, height: int, width: int) -> bool:
    """--vae-tiling pays off from two tiles per side on: a smaller frame is decoded whole, since cutting it (the demo's
    64 px frames into 48x40 px tiles) saves no memory worth having and leaves seams where the tiles are blended."""
    return height >= config.sample_height or width >= config.sample_width  # tiles are half the sample size
