"""CogVideoX's causal 3D VAE (diffusers' AutoencoderKLCogVideoX), loading the official `vae/` weights as they are.

Video (B, 3, F, H, W) in [-1, 1] <-> latents (B, 16, T, H/8, W/8) with T = 1 + (F - 1)/4. Time is causal: every
3D conv pads the past with copies of the first frame, so frame 0 is coded on its own (odd frame counts keep it
apart in the time down/up-sampling) and later frames only see earlier ones.

The official model never runs a whole video at once: it encodes 8 pixel frames (decodes 2 latent frames) at a time
and carries the last two input frames of every 3x3x3 conv from one batch to the next (`cache` below). GroupNorm
statistics and the decoder's latent conditioning are per batch, so this batching is part of the model's
definition, not an optimisation, and is reproduced exactly. Spatial tiling with overlap and linear blending
(off by default) bounds memory at 480x720 and above.

Shape legend: B batch, C channels, F pixel frames, T frames at the current stage (latent frames at the bottom),
H/W height/width at the current stage, h/w latent height/width.
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import component_folder, config_from_dict, load_weights, read_json


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("CogVideoXDownBlock3D",) * 4
    up_block_types: tuple[str, ...] = ("CogVideoXUpBlock3D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    act_fn: str = "silu"
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: float = 4
    sample_height: int = 480  # only sets the default tile size (half of it)
    sample_width: int = 720
    scaling_factor: float = 1.15258426  # applied by the caller, not here
    invert_scale_latents: bool = False  # 1.5 I2V divides the image latent by scaling_factor (see generate.py)
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False

    def __post_init__(self):
        n = len(self.block_out_channels)
        if self.down_block_types != ("CogVideoXDownBlock3D",) * n or self.up_block_types != ("CogVideoXUpBlock3D",) * n:
            raise ValueError(f"VAEConfig: down/up_block_types must be {n}x CogVideoXDownBlock3D / CogVideoXUpBlock3D "
                             f"(one per block_out_channels), got {self.down_block_types} / {self.up_block_types}")
        if self.act_fn != "silu":
            raise ValueError(f"VAEConfig: act_fn must be 'silu', got {self.act_fn!r}")
        if self.use_quant_conv or self.use_post_quant_conv:
            raise ValueError("VAEConfig: use_quant_conv / use_post_quant_conv are not used by any CogVideoX VAE; "
                             "set them to false")
        levels = math.log2(self.temporal_compression_ratio)
        if levels != int(levels) or not 0 <= levels < n:
            raise ValueError(f"VAEConfig: temporal_compression_ratio must be a power of 2 below 2**{n}, "
                             f"got {self.temporal_compression_ratio}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"VAEConfig: every block_out_channels {self.block_out_channels} must be divisible by "
                             f"norm_num_groups={self.norm_num_groups}")

    @property
    def time_levels(self) -> int:  # how many (leading) down/up blocks also halve/double time
        return int(math.log2(self.temporal_compression_ratio))

    @property
    def spatial_scale(self) -> int:  # pixels per latent along H and W
        return 2 ** (len(self.block_out_channels) - 1)


# The three released VAEs share one architecture; they differ in how the caller scales latents.
PRESETS = {
    "cogvideox-2b": VAEConfig(scaling_factor=1.15258426),
    "cogvideox-5b": VAEConfig(scaling_factor=0.7),
    "cogvideox1.5-5b": VAEConfig(scaling_factor=0.7, invert_scale_latents=True),
}

SAMPLE_FRAMES_PER_BATCH = 8  # encode 8 pixel frames at a time (remainder joins the first batch)
LATENT_FRAMES_PER_BATCH = 2  # decode 2 latent frames at a time (the VAE was trained this way)
TILE_OVERLAP = (1 / 6, 1 / 5)  # official overlap fractions (height, width), tuned for 480x720


# ---------------------------------------------------------------------------------------------------------------
# Layers. `cache` is one dict per frame-batch loop, keyed by conv module: the last k-1 input frames of every
# causal conv from the previous batch (absent on the first batch, where the first frame is repeated instead).

class CausalConv3d(nn.Module):
    """kxkxk conv that keeps the frame count: zero padding in space, past-only padding in time. Callers that own
    a large input call `conv(pad(x))` in two statements so that x can be freed before the conv runs."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.k = k
        self.conv = nn.Conv3d(cin, cout, k, padding=(0, k // 2, k // 2))

    def pad(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        if self.k == 1:
            return x
        past = cache.get(self)
        if past is None:
            past = x[:, :, :1].expand(-1, -1, self.k - 1, -1, -1)
        x = torch.cat([past, x], dim=2)  # (B, C, k-1+T, H, W)
        cache[self] = x[:, :, -(self.k - 1):].clone()
        return x

    def forward(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        return self.conv(self.pad(x, cache))  # (B, C', T, H, W)


def interpolate_like(zq: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Nearest-resize the latent chunk to f's (T, H, W). With an odd T > 1, frame 0 is resized on its own, mirroring
    how the time up-sampling kept it apart."""
    if f.shape[2] > 1 and f.shape[2] % 2 == 1:
        first = F.interpolate(zq[:, :, :1], size=(1, *f.shape[-2:]))
        rest = F.interpolate(zq[:, :, 1:], size=(f.shape[2] - 1, *f.shape[-2:]))
        return torch.cat([first, rest], dim=2)  # (B, c, T, H, W)
    return F.interpolate(zq, size=f.shape[-3:])


class SpatialNorm3D(nn.Module):
    """Decoder norm: GroupNorm whose scale and shift are 1x1x1 convs of the (resized) latents."""

    def __init__(self, channels: int, zq_channels: int, groups: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, channels, eps=1e-6)  # 1e-6 whatever norm_eps says, as upstream
        self.conv_y = CausalConv3d(zq_channels, channels, 1)
        self.conv_b = CausalConv3d(zq_channels, channels, 1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor, cache: dict) -> torch.Tensor:
        zq = interpolate_like(zq, f)
        h = self.norm_layer(f)
        h.mul_(self.conv_y(zq, cache))  # one full-size temporary at a time
        return h.add_(self.conv_b(zq, cache))


class ResnetBlock3D(nn.Module):
    """norm -> SiLU -> conv, twice, plus a (1x1x1 conv when channels change) shortcut. GroupNorm in the encoder,
    SpatialNorm3D conditioned on the latents in the decoder (zq_channels given)."""

    def __init__(self, cin: int, cout: int, groups: int, eps: float, zq_channels: int | None = None):
        super().__init__()
        if zq_channels is None:
            self.norm1, self.norm2 = nn.GroupNorm(groups, cin, eps=eps), nn.GroupNorm(groups, cout, eps=eps)
        else:
            self.norm1, self.norm2 = SpatialNorm3D(cin, zq_channels, groups), SpatialNorm3D(cout, zq_channels, groups)
        self.conv1 = CausalConv3d(cin, cout, 3)
        self.conv2 = CausalConv3d(cout, cout, 3)
        if cin != cout:
            self.conv_shortcut = nn.Conv3d(cin, cout, 1)

    def norm_act_pad(self, norm: nn.Module, conv: CausalConv3d, x, zq, cache: dict) -> torch.Tensor:
        return conv.pad(F.silu(norm(x) if zq is None else norm(x, zq, cache), inplace=True), cache)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None, cache: dict) -> torch.Tensor:
        h = self.norm_act_pad(self.norm1, self.conv1, x, zq, cache)  # (B, C, 2+T, H, W)
        h = self.conv1.conv(h)  # (B, C', T, H, W)
        h = self.norm_act_pad(self.norm2, self.conv2, h, zq, cache)
        h = self.conv2.conv(h)
        return h.add_(self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else x)


def frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    B, C, T, H, W = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)  # (B*T, C, H, W)


def batch_to_frames(x: torch.Tensor, B: int) -> torch.Tensor:
    return x.reshape(B, -1, *x.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, C, T, H, W)


def pool_frame_pairs(x: torch.Tensor) -> torch.Tensor:
    """Mean of frames (0, 1), (2, 3), ...; avg_pool2d because CPU has no bf16 avg_pool3d."""
    B, C, T, H, W = x.shape
    return F.avg_pool2d(x.reshape(B * C, 1, T, H * W), (2, 1)).view(B, C, T // 2, H, W)


class Downsample(nn.Module):
    """Optionally average frame pairs (an odd count keeps frame 0 alone), then a stride-2 3x3 conv per frame with
    zero padding on the right and bottom only."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compress_time and x.shape[2] > 1:
            if x.shape[2] % 2:
                x = torch.cat([x[:, :, :1], pool_frame_pairs(x[:, :, 1:])], dim=2)  # (B, C, 1+(T-1)/2, H, W)
            else:
                x = pool_frame_pairs(x)  # (B, C, T/2, H, W)
        B = x.shape[0]
        x = frames_to_batch(F.pad(x, (0, 1, 0, 1)))  # (B*T, C, H+1, W+1)
        return batch_to_frames(self.conv(x), B)  # (B, C, T, H/2, W/2)


class Upsample(nn.Module):
    """Nearest x2 in space, and optionally in time (an odd count keeps frame 0 single: T -> 2T-1), then a 3x3 conv
    per frame."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[2]
        if self.compress_time and T > 1 and T % 2:
            first = F.interpolate(x[:, :, :1], scale_factor=(1, 2, 2))
            x = torch.cat([first, F.interpolate(x[:, :, 1:], scale_factor=2.0)], dim=2)  # (B, C, 2T-1, 2H, 2W)
        elif self.compress_time and T > 1:
            x = F.interpolate(x, scale_factor=2.0)  # (B, C, 2T, 2H, 2W)
        else:
            x = F.interpolate(x, scale_factor=(1, 2, 2))  # (B, C, T, 2H, 2W)
        B = x.shape[0]
        x = frames_to_batch(x)  # (B*T, C, 2H, 2W)
        return batch_to_frames(self.conv(x), B)


class Block(nn.Module):
    """A stage of resnets, then an optional down- or up-sampler (keys `downsamplers.0` / `upsamplers.0` as
    upstream). Also serves as the mid block (two resnets, no sampler)."""

    def __init__(self, resnets: list[nn.Module], downsampler: nn.Module | None = None,
                 upsampler: nn.Module | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if downsampler is not None:
            self.downsamplers = nn.ModuleList([downsampler])
        if upsampler is not None:
            self.upsamplers = nn.ModuleList([upsampler])

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None, cache: dict) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, zq, cache)
        for sampler in [*getattr(self, "downsamplers", []), *getattr(self, "upsamplers", [])]:
            x = sampler(x)
        return x


# ---------------------------------------------------------------------------------------------------------------
# Encoder and decoder: one frame batch at a time.

class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, eps, n = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps, len(cfg.block_out_channels)
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], 3)
        self.down_blocks = nn.ModuleList()
        for i in range(n):
            cin = ch[max(i - 1, 0)]
            resnets = [ResnetBlock3D(cin if j == 0 else ch[i], ch[i], g, eps) for j in range(cfg.layers_per_block)]
            down = Downsample(ch[i], compress_time=i < cfg.time_levels) if i < n - 1 else None
            self.down_blocks.append(Block(resnets, downsampler=down))
        self.mid_block = Block([ResnetBlock3D(ch[-1], ch[-1], g, eps) for _ in range(2)])
        self.norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, 3)

    def forward(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        x = self.conv_in(x, cache)  # (B, C, F, H, W)
        for block in self.down_blocks:
            x = block(x, None, cache)
        x = self.mid_block(x, None, cache)  # (B, C, T, h, w)
        x = self.conv_out.pad(F.silu(self.norm_out(x), inplace=True), cache)
        return self.conv_out.conv(x)  # (B, 2*16, T, h, w)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, eps, zc = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.norm_eps, cfg.latent_channels
        n = len(ch)
        self.conv_in = CausalConv3d(zc, ch[0], 3)
        self.mid_block = Block([ResnetBlock3D(ch[0], ch[0], g, eps, zc) for _ in range(2)])
        self.up_blocks = nn.ModuleList()
        for i in range(n):
            cin = ch[max(i - 1, 0)]
            resnets = [ResnetBlock3D(cin if j == 0 else ch[i], ch[i], g, eps, zc)
                       for j in range(cfg.layers_per_block + 1)]
            up = Upsample(ch[i], compress_time=i < cfg.time_levels) if i < n - 1 else None
            self.up_blocks.append(Block(resnets, upsampler=up))
        self.norm_out = SpatialNorm3D(ch[-1], zc, g)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels, 3)

    def forward(self, z: torch.Tensor, cache: dict) -> torch.Tensor:
        x = self.conv_in(z, cache)  # (B, C, T, h, w)
        x = self.mid_block(x, z, cache)
        for block in self.up_blocks:
            x = block(x, z, cache)  # (B, C, F, H, W)
        x = self.conv_out.pad(F.silu(self.norm_out(x, z, cache), inplace=True), cache)
        return self.conv_out.conv(x)  # (B, 3, F, H, W)


def frame_batches(num_frames: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of each frame batch: batches of `size`, the remainder joining the first one (49 pixel frames ->
    9, 8, 8, 8, 8, 8; 13 latent frames -> 3, 2, 2, 2, 2, 2)."""
    rem = num_frames % size
    starts = [0] + [size * i + rem for i in range(1, max(num_frames // size, 1))]
    ends = starts[1:] + [num_frames]
    return list(zip(starts, ends))


def run_in_frame_batches(net: nn.Module, x: torch.Tensor, size: int) -> torch.Tensor:
    batches = frame_batches(x.shape[2], size)
    if len(batches) == 1:  # no slicing: a training step through encode/decode is the plain net's, to the bit
        return net(x, {})
    cache = {}
    out = [net(x[:, :, s:e], cache) for s, e in batches]
    del cache  # each conv caches its last frames: free them before the concatenation
    return torch.cat(out, dim=2)


# ---------------------------------------------------------------------------------------------------------------
# Spatial tiling.

def blend(prev: torch.Tensor, cur: torch.Tensor, extent: int, dim: int) -> None:
    """Linear cross-fade, in place, of cur's first rows/columns (along dim) with prev's last ones; element by element
    with Python-float weights exactly as upstream, so low-precision results match too."""
    e = min(prev.shape[dim], cur.shape[dim], extent)
    for i in range(e):
        a, b = prev.select(dim, prev.shape[dim] - e + i), cur.select(dim, i)
        b.copy_(a * (1 - i / e) + b * (i / e))


def last(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    n = min(n, t.shape[dim])
    return t.narrow(dim, t.shape[dim] - n, n).clone()


def tile_and_blend(run, x: torch.Tensor, tile: tuple[int, int], stride: tuple[int, int], extent: tuple[int, int],
          keep: tuple[int, int], out_len) -> torch.Tensor:
    """Run `run` on overlapping (tile x tile) windows of x (B, C, T, H, W) spaced by stride; each output tile is
    blended with the one above and the one to its left over `extent`, cropped to `keep` and written into place.
    Only the current tile's activations exist at any time; of earlier tiles only the strips still to be blended
    with are kept. out_len(n) is the output length of an input of length n along H or W."""
    H, W = x.shape[-2:]
    rows, cols = range(0, H, stride[0]), range(0, W, stride[1])
    out_h = sum(min(out_len(min(tile[0], H - i)), keep[0]) for i in rows)
    out_w = sum(min(out_len(min(tile[1], W - j)), keep[1]) for j in cols)
    out, above, y = None, [None] * len(cols), 0
    for i in rows:
        left, xo = None, 0
        for jj, j in enumerate(cols):
            t = run(x[:, :, :, i:i + tile[0], j:j + tile[1]])  # (B, C', T', th, tw)
            if above[jj] is not None:
                blend(above[jj], t, extent[0], dim=3)
            if left is not None:
                blend(left, t, extent[1], dim=4)
            above[jj], left = last(t, extent[0], dim=3), last(t, extent[1], dim=4)
            if out is None:
                out = t.new_empty(*t.shape[:3], out_h, out_w)  # (B, C', T', H', W')
            t = t[:, :, :, :keep[0], :keep[1]]
            out[:, :, :, y:y + t.shape[3], xo:xo + t.shape[4]] = t
            xo += t.shape[4]
            del t
        y += min(out_len(min(tile[0], H - i)), keep[0])
    return out


# ---------------------------------------------------------------------------------------------------------------

class CogVideoXVAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def tile_plan(self, tile_size, tile_overlap, decode: bool) -> tuple:
        """(tile, stride) over the input and (blend extent, kept size) over the output, per (H, W), with upstream's
        defaults and roundings. Upstream stitches a video of the wrong size when kept != stride (in output units);
        that is an error here. The official 240x360 px tiles with overlaps (1/6, 1/5) are fine, as is any multiple
        of 48x40 px with them."""
        s = self.config.spatial_scale
        px = tile_size or (self.config.sample_height // 2, self.config.sample_width // 2)
        lat = tuple(int(n / s) for n in px)
        tile, out_tile = (lat, px) if decode else (px, lat)
        stride = tuple(int(n * (1 - f)) for n, f in zip(tile, tile_overlap))
        extent = tuple(int(n * f) for n, f in zip(out_tile, tile_overlap))
        keep = tuple(n - e for n, e in zip(out_tile, extent))
        stride_out = tuple(n * s if decode else n / s for n in stride)
        if min(stride) < 1 or min(tile_overlap) < 0 or keep != stride_out:
            raise ValueError(f"tile_size {px} px with tile_overlap {tile_overlap} does not tile evenly (stride "
                             f"{stride}, kept {keep}); use e.g. the default, or multiples of 48x40 px")
        return tile, stride, extent, keep

    def encode(self, video: torch.Tensor, tiled: bool = False, tile_size: tuple[int, int] | None = None,
               tile_overlap: tuple[float, float] = TILE_OVERLAP) -> tuple[torch.Tensor, torch.Tensor]:
        """video (B, 3, F, H, W) in [-1, 1], F = 1 or 8k(+1) -> posterior mean and log-variance (B, 16, T, h, w),
        T = 1 + (F-1)//4. tiled splits H, W into tiles of tile_size px (default sample_height/2 x sample_width/2)
        overlapping by tile_overlap (fractions of a tile) when the video is larger than one tile. Gradients flow
        (train_tiny trains the VAE through encode/decode); inference runs it under torch.no_grad."""
        if video.ndim != 5 or video.shape[1] != self.config.in_channels:
            raise ValueError(f"encode expects video (B, {self.config.in_channels}, F, H, W), got {tuple(video.shape)}")
        run = lambda v: run_in_frame_batches(self.encoder, v, SAMPLE_FRAMES_PER_BATCH)
        plan = self.tile_plan(tile_size, tile_overlap, decode=False) if tiled else None
        if tiled and (video.shape[3] > plan[0][0] or video.shape[4] > plan[0][1]):
            h = tile_and_blend(run, video, *plan, out_len=lambda n: n >> (len(self.config.block_out_channels) - 1))
        else:
            h = run(video)
        mean, logvar = h.chunk(2, dim=1)  # (B, 16, T, h, w) each
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, tiled: bool = False, tile_size: tuple[int, int] | None = None,
               tile_overlap: tuple[float, float] = TILE_OVERLAP) -> torch.Tensor:
        """z (B, 16, T, h, w), unscaled latents (divide by scaling_factor first) -> video (B, 3, F, 8h, 8w),
        F = 1 + 4(T-1) for odd T. tiled: as in encode; tile_size is in pixels (latent tile = tile_size / 8)."""
        if z.ndim != 5 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"decode expects latents (B, {self.config.latent_channels}, T, h, w), "
                             f"got {tuple(z.shape)}")
        run = lambda t: run_in_frame_batches(self.decoder, t, LATENT_FRAMES_PER_BATCH)
        plan = self.tile_plan(tile_size, tile_overlap, decode=True) if tiled else None
        if tiled and (z.shape[3] > plan[0][0] or z.shape[4] > plan[0][1]):
            return tile_and_blend(run, z, *plan, out_len=lambda n: n * self.config.spatial_scale)
        return run(z)


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None):
    """mean + std * noise, drawing the noise as diffusers does (its DiagonalGaussianDistribution.sample): in the
    latents' dtype, on the generator's device when that is the CPU (then moved), so seeds reproduce upstream."""
    on_cpu = generator is not None and generator.device.type == "cpu"
    noise = torch.randn(mean.shape, generator=generator, device="cpu" if on_cpu else mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * noise.to(mean.device)


def load_vae(path: str, dtype: torch.dtype = torch.float32, device="cpu", config: VAEConfig | None = None) -> CogVideoXVAE:
    """The VAE of a snapshot: `path` is the `vae/` folder or the snapshot root; `config` its config.json if read."""
    folder = component_folder(path, "vae")
    cfg = config or config_from_dict(VAEConfig, read_json(os.path.join(folder, "config.json")))
    with torch.device("meta"):
        model = CogVideoXVAE(cfg)
    return load_weights(model, folder, "diffusion_pytorch_model", dtype=dtype, device=device)
