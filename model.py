"""The CogVideoX expert transformer: a diffusion transformer over [text; video] tokens.

References: the paper (Yang et al. 2024, "CogVideoX: Text-to-Video Diffusion Models with An Expert Transformer",
arXiv:2408.06072), the official SAT module it was trained with (THUDM/CogVideo, `sat/dit_video_concat.py`), and the
diffusers port this file equals numerically (`diffusers/models/transformers/cogvideox_transformer_3d.py`, the test
oracle in tests/test_model.py).

One file for all five released variants (2b, 5b, 5b-I2V, 1.5-5B, 1.5-5B-I2V). Parameter names equal the
keys of the official `transformer/diffusion_pytorch_model*.safetensors`, so the weights load as they are.
What makes CogVideoX different from a plain DiT:
  - text and video tokens attend jointly (full 3D attention, text first), but each modality has its own
    adaptive-LayerNorm modulation ("expert AdaLN": one shared LayerNorm, separate shift/scale/gate);
  - positions are either an absolute 3D sincos table (2b), 3D RoPE on video tokens only (5b, 1.5), or a
    learned table plus RoPE (5b-I2V); all tables are derived from the latent shape and cached per shape.

Shape legend: B batch, F latent frames, C latent channels, H/W latent height/width, p/pt spatial/temporal
patch size, N video tokens, L text tokens, S = L + N, D hidden width, h heads, d head dim, E time_embed_dim.
"""
import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from checkpoint import component_folder, config_from_dict, load_weights, read_json
from offload import sdpa


@dataclass
class TransformerConfig:
    """Field names and defaults are those of the official `transformer/config.json`. `dropout`,
    `activation_fn` and `timestep_activation_fn` are kept only so that configs read back unchanged: every
    release uses 0.0 / "gelu-approximate" / "silu", which is all this file implements."""
    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16  # 32 for I2V: noisy latents and image latents concatenated on C
    out_channels: int = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None  # 1.5-I2V only
    text_embed_dim: int = 4096
    num_layers: int = 30
    dropout: float = 0.0
    attention_bias: bool = True
    sample_width: int = 90  # latent W the position tables were trained at
    sample_height: int = 60  # latent H
    sample_frames: int = 49  # *pixel* frames (13 latent frames), an old naming quirk
    patch_size: int = 2
    patch_size_t: int | None = None  # None: CogVideoX 1.0 (2D patches); 2: CogVideoX 1.5
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True  # bias of the 1.0 conv patch projection (the 1.5 linear one always has a bias)

    def __post_init__(self):
        self.inner_dim = self.num_attention_heads * self.attention_head_dim
        bad = {"dropout": (self.dropout, 0.0), "activation_fn": (self.activation_fn, "gelu-approximate"),
               "timestep_activation_fn": (self.timestep_activation_fn, "silu")}
        for key, (value, supported) in bad.items():
            if value != supported:
                raise ValueError(f"config {key}={value!r} is not supported (every release uses {supported!r})")
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            raise ValueError("use_learned_positional_embeddings=True needs use_rotary_positional_embeddings=True")
        if self.patch_size_t is not None and not self.use_rotary_positional_embeddings:
            raise ValueError("patch_size_t (CogVideoX 1.5) needs use_rotary_positional_embeddings=True")
        if self.use_rotary_positional_embeddings and self.attention_head_dim % 16:
            raise ValueError(f"RoPE needs attention_head_dim % 16 == 0, got {self.attention_head_dim}")
        if not self.use_rotary_positional_embeddings and self.inner_dim % 16:
            raise ValueError(f"3D sincos positions need heads*head_dim % 16 == 0, got {self.inner_dim}")
        if self.ofs_embed_dim is not None and self.ofs_embed_dim != self.time_embed_dim:
            raise ValueError(f"ofs_embed_dim ({self.ofs_embed_dim}) must equal time_embed_dim ({self.time_embed_dim})")


_V10 = dict(sample_height=60, sample_width=90, sample_frames=49)
_V15 = dict(num_attention_heads=48, num_layers=42, sample_height=300, sample_width=300, sample_frames=81,
            patch_size_t=2, patch_bias=False, use_rotary_positional_embeddings=True)
PRESETS = {
    "cogvideox-2b": TransformerConfig(num_attention_heads=30, num_layers=30, **_V10),
    "cogvideox-5b": TransformerConfig(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True,
                                      **_V10),
    "cogvideox-5b-i2v": TransformerConfig(num_attention_heads=48, num_layers=42, in_channels=32,
                                          use_rotary_positional_embeddings=True,
                                          use_learned_positional_embeddings=True, **_V10),
    "cogvideox1.5-5b": TransformerConfig(**_V15),
    "cogvideox1.5-5b-i2v": TransformerConfig(in_channels=32, ofs_embed_dim=512, **_V15),
}


class CogVideoXTransformer(nn.Module):
    """(noisy latents, text embeddings, timestep) -> the prediction at the latents' shape: embed both modalities,
    run the blocks over [text; video], read the video tokens back out as latents. The forward only calls the blocks;
    how they run (streamed from host memory, skipped on some sampling steps, compiled) is set up outside it: see
    blocks() and compile()."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        D, E, p = cfg.inner_dim, cfg.time_embed_dim, cfg.patch_size
        self.patch_embed = PatchEmbed(cfg)
        self.time_embedding = MLPEmbedder(D, E)
        self.ofs_embedding = MLPEmbedder(cfg.ofs_embed_dim, E) if cfg.ofs_embed_dim else None
        self.transformer_blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm_final = nn.LayerNorm(D, eps=cfg.norm_eps, elementwise_affine=cfg.norm_elementwise_affine)
        self.norm_out = AdaLayerNorm(E, D, cfg.norm_elementwise_affine, cfg.norm_eps)
        self.proj_out = nn.Linear(D, (cfg.patch_size_t or 1) * p * p * cfg.out_channels)
        self.gradient_checkpointing = False  # recompute each block in backward (for training)
        self.block_source = None  # while a wrapper is active, what it supplies the blocks from: see blocks()
        self._tables = {}  # position tables per (shape, device, dtype); plain dict, never in the state dict

    def forward(self, x, text, t, ofs=None):
        """x (B, F, C_in, H, W) latents (I2V: image latents already concatenated on C; 1.5: F already padded
        to a multiple of patch_size_t); text (B, L, text_embed_dim); t (B,) timesteps; ofs (1,) or (B,) for
        1.5-I2V (the pipeline passes 2.0). Returns (B, F, C_out, H, W)."""
        cfg = self.config
        B, F_, C, H, W = x.shape
        L, p, pt = text.shape[1], cfg.patch_size, cfg.patch_size_t or 1
        if C != cfg.in_channels or H % p or W % p or F_ % pt:
            raise ValueError(f"latents {tuple(x.shape)} do not fit the config: need C == in_channels "
                             f"({cfg.in_channels}), H and W divisible by patch_size ({p}), F divisible by {pt}")
        if (ofs is None) != (self.ofs_embedding is None):
            raise ValueError(f"ofs must be given exactly when ofs_embed_dim is set (it is {cfg.ofs_embed_dim})")
        pos_c, pos_x = self.absolute_positions(F_, H, W, x.dtype, x.device) or (None, None)
        if pos_x is not None and L != cfg.max_text_seq_length:
            raise ValueError(f"this model adds absolute positions to [text; video], so the text length must be "
                             f"max_text_seq_length={cfg.max_text_seq_length}, got {L}")

        t = torch.as_tensor(t, device=x.device).reshape(-1)
        emb = self.time_embedding(timestep_embedding(t, cfg.inner_dim, cfg.flip_sin_to_cos, cfg.freq_shift).to(x.dtype))
        if self.ofs_embedding is not None:
            ofs = torch.as_tensor(ofs, device=x.device).reshape(-1)
            ofs = timestep_embedding(ofs, cfg.ofs_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift).to(x.dtype)
            emb = emb + self.ofs_embedding(ofs)  # (B, E)

        c = self.patch_embed.text_proj(text)  # (B, L, D)
        x = self.patch_embed(x)  # (B, N, D)
        if pos_x is not None:
            x = x + pos_x
        if pos_c is not None:
            c = c + pos_c
        rope = self.rope(F_, H, W, L, x.device)

        for block in self.blocks():
            x, c = block(x, c, emb, rope)  # (B, N, D), (B, L, D)

        x = self.norm_out(self.norm_final(x), emb)
        x = self.proj_out(x)  # (B, N, pt*p*p*C_out)
        return unpatchify(x, F_, H, W, p, pt)  # (B, F, C_out, H, W)

    def blocks(self):
        """The blocks as forward calls them, each (x, c, emb, rope) -> (x, c): the list itself or, while a wrapper is
        active, what it put in `block_source`: offload.BlockStream hands out the blocks one by one, each copied to the
        GPU just before it runs; generate.StepCache, one callable that runs them all or skips them on this step.
        Under gradient_checkpointing each is recomputed in backward instead of keeping its activations."""
        blocks = self.block_source or self.transformer_blocks
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return (functools.partial(checkpoint, block, use_reentrant=False) for block in blocks)
        return blocks

    def compile(self, *args, **kwargs):
        """torch.compile one block's forward and run every block through it, instead of the whole model: all blocks
        share their code, and since torch 2.5 (inline_inbuilt_nn_modules) their weights are inputs of the graph, so
        the one graph serves all 42 blocks. Compile time is that of one block, not of 42 unrolled; the parts around
        the blocks (embeddings, the step cache's decision, block streaming) stay eager. Arguments go to
        torch.compile."""
        forward = torch.compile(Block.forward, *args, **kwargs)
        for block in self.transformer_blocks:
            block.forward = functools.partial(forward, block)

    def absolute_positions(self, F_: int, H: int, W: int, dtype, device):
        """Additive (text, video) position embeddings, or None for pure-RoPE variants. Mirrors the original:
        the learned table (5b-I2V) is used only at the sample size; other frame counts fall back to sincos
        (with zero text rows), other H/W are refused."""
        cfg = self.config
        if cfg.use_rotary_positional_embeddings and not cfg.use_learned_positional_embeddings:
            return None
        if cfg.use_learned_positional_embeddings:
            if (H, W) != (cfg.sample_height, cfg.sample_width):
                raise ValueError(f"the learned position table of this model only supports latent H x W = "
                                 f"{cfg.sample_height} x {cfg.sample_width}, got {H} x {W}")
            if (F_ - 1) * cfg.temporal_compression_ratio + 1 == cfg.sample_frames:
                table = self.patch_embed.pos_embedding.to(dtype)  # (1, L + N, D)
                L = cfg.max_text_seq_length
                return table[:, :L], table[:, L:]
        p = cfg.patch_size
        table = self._cached(("sincos", F_, H, W, dtype, device), lambda: sincos_3d(
            cfg.inner_dim, F_, H // p, W // p, cfg.spatial_interpolation_scale, cfg.temporal_interpolation_scale,
            device).to(dtype)[None])  # (1, N, D); float64 until the cast
        return None, table

    def rope(self, F_: int, H: int, W: int, L: int, device):
        """(cos, sin), each (S, 1, d/2) fp32, or None. Text rows hold the identity rotation (cos 1, sin 0),
        so the whole joint sequence is rotated in one pass and RoPE acts on video tokens only."""
        cfg = self.config
        if not cfg.use_rotary_positional_embeddings:
            return None

        def make():
            p, Hg, Wg = cfg.patch_size, H // cfg.patch_size, W // cfg.patch_size
            if cfg.patch_size_t is None:  # 1.0: positions span the crop region of the training grid
                T = F_
                (top, left), (bottom, right) = crop_region(Hg, Wg, cfg.sample_height // p, cfg.sample_width // p)
                pos_h = torch.linspace(top, bottom * (Hg - 1) / Hg, Hg, dtype=torch.float32, device=device)
                pos_w = torch.linspace(left, right * (Wg - 1) / Wg, Wg, dtype=torch.float32, device=device)
                pos_t = torch.linspace(0, T * (T - 1) / T, T, dtype=torch.float32, device=device)
            else:  # 1.5: integer positions (the original slices them from a sample_height/p x sample_width/p grid)
                T = F_ // cfg.patch_size_t
                pos_t, pos_h, pos_w = (torch.arange(n, dtype=torch.float32, device=device) for n in (T, Hg, Wg))
            angles = rope_3d(cfg.attention_head_dim, pos_t, pos_h, pos_w)  # (N, d/2)
            angles = torch.cat([angles.new_zeros(L, angles.shape[1]), angles])[:, None]  # (S, 1, d/2)
            return torch.cos(angles), torch.sin(angles)
        return self._cached(("rope", F_, H, W, L, device), make)

    def _cached(self, key, make):
        if key not in self._tables:
            with torch.inference_mode(False):  # usable by autograd later even if first built while sampling
                self._tables[key] = make()
        return self._tables[key]


def load_transformer(path: str, dtype=torch.float32, device="cpu",
                     config: TransformerConfig | None = None) -> CogVideoXTransformer:
    """Build from `<path>/config.json` (or `config`, that file already read) on the meta device and assign the
    (sharded) safetensors weights. `path` is the `transformer/` folder or the snapshot root that contains it."""
    folder = component_folder(path, "transformer")
    cfg = config or config_from_dict(TransformerConfig, read_json(os.path.join(folder, "config.json")))
    with torch.device("meta"):
        model = CogVideoXTransformer(cfg)
    return load_weights(model, folder, "diffusion_pytorch_model", dtype=dtype, device=device)


def flops_per_forward(config: TransformerConfig, num_video_tokens: int, num_text_tokens: int = 226) -> float:
    """Matmul FLOPs of one forward at batch 1: per layer 24*D^2 per token (q, k, v, out: 4D^2 MACs; FF 8D^2)
    plus 4*S^2*D for QK^T and PV over the joint sequence. AdaLN, embeddings and proj_out (<0.1%) are ignored."""
    S, D = num_video_tokens + num_text_tokens, config.inner_dim
    return float(config.num_layers * (24 * D * D * S + 4 * S * S * D))


# ----------------------------------------------------------------------------------------------------------
# Modules (attribute names = checkpoint keys), in the order forward uses them


class PatchEmbed(nn.Module):
    """Video patches and text embeddings to width D. The 1.0 projection is stored as a stride-p Conv2d,
    which is the same linear map as the 1.5 Linear on (c, ph, pw)-ordered patches, so both run as one
    patchify + matmul."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        D, p, C = cfg.inner_dim, cfg.patch_size, cfg.in_channels
        if cfg.patch_size_t is None:
            self.proj = nn.Conv2d(C, D, kernel_size=p, stride=p, bias=cfg.patch_bias)
        else:
            self.proj = nn.Linear(C * cfg.patch_size_t * p * p, D)
        self.text_proj = nn.Linear(cfg.text_embed_dim, D)
        self.p, self.pt = p, cfg.patch_size_t or 1
        if cfg.use_learned_positional_embeddings:  # (1, L + N, D) at the sample size, text rows included
            T = (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1
            N = T * (cfg.sample_height // p) * (cfg.sample_width // p)
            self.register_buffer("pos_embedding", torch.zeros(1, cfg.max_text_seq_length + N, D))

    def forward(self, x):  # (B, F, C, H, W) -> (B, N, D)
        return F.linear(patchify(x, self.p, self.pt), self.proj.weight.flatten(1), self.proj.bias)


class MLPEmbedder(nn.Module):
    """Timestep (or ofs) sinusoid -> conditioning vector: Linear, SiLU, Linear."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        D, E = cfg.inner_dim, cfg.time_embed_dim
        self.norm1 = LayerNormZero(E, D, cfg.norm_elementwise_affine, cfg.norm_eps)
        self.attn1 = Attention(D, cfg.num_attention_heads, cfg.attention_head_dim, cfg.attention_bias)
        self.norm2 = LayerNormZero(E, D, cfg.norm_elementwise_affine, cfg.norm_eps)
        self.ff = FeedForward(D)

    def forward(self, x, c, emb, rope):  # x (B, N, D) video, c (B, L, D) text, emb (B, E)
        L = c.shape[1]
        nx, nc, gate, c_gate = self.norm1(x, c, emb)
        a = self.attn1(torch.cat([nc, nx], dim=1), rope)  # (B, S, D), text first
        x = torch.addcmul(x, gate, a[:, L:])  # x + gate * attn
        c = torch.addcmul(c, c_gate, a[:, :L])
        nx, nc, gate, c_gate = self.norm2(x, c, emb)
        x = torch.addcmul(x, gate, self.ff(nx))  # the FF is per token: no need to concatenate
        c = torch.addcmul(c, c_gate, self.ff(nc))
        return x, c


class LayerNormZero(nn.Module):
    """Expert AdaLN: one LayerNorm shared by both modalities, separate shift/scale/gate for video and text."""

    def __init__(self, cond_dim: int, dim: int, affine: bool, eps: float):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)

    def forward(self, x, c, emb):
        shift, scale, gate, c_shift, c_scale, c_gate = self.linear(F.silu(emb))[:, None].chunk(6, dim=2)  # (B, 1, D)
        return modulate(self.norm(x), shift, scale), modulate(self.norm(c), c_shift, c_scale), gate, c_gate


class Attention(nn.Module):
    """Joint self-attention over [text; video] with per-head QK LayerNorm and (optionally) RoPE."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(head_dim, eps=1e-6)
        self.norm_k = nn.LayerNorm(head_dim, eps=1e-6)
        self.to_q = nn.Linear(dim, heads * head_dim, bias=bias)
        self.to_k = nn.Linear(dim, heads * head_dim, bias=bias)
        self.to_v = nn.Linear(dim, heads * head_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim)])

    def qkv(self, s):
        """q, k, v from one matmul with the three weights stacked for this call only: nothing extra stays in
        memory, and weights changed in place (a merged LoRA) are always current. Projections wrapped by
        something else (LoRA training, int8) run one by one."""
        projections = (self.to_q, self.to_k, self.to_v)
        if not all(type(m) is nn.Linear for m in projections):
            return [m(s) for m in projections]
        bias = torch.cat([m.bias for m in projections]) if self.to_q.bias is not None else None
        return F.linear(s, torch.cat([m.weight for m in projections]), bias).chunk(3, dim=-1)  # 3 x (B, S, h*d)

    def forward(self, s, rope):
        B, S, _ = s.shape
        q, k, v = (y.view(B, S, self.heads, -1) for y in self.qkv(s))  # (B, S, h, d)
        q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, h, S, d)
        return self.to_out[0](o.transpose(1, 2).reshape(B, S, -1))  # (B, S, D)


def attention(q, k, v):
    """Full (non-causal, unmasked) attention; q, k, v (B, h, S, d). Replace this one function (e.g.
    `model.attention = sageattn`) to try another kernel; on CUDA, offload.sdpa tries the fastest kernels first."""
    return sdpa(q, k, v)


class FeedForward(nn.Module):
    """D -> 4D -> D with tanh-GELU. Index 1 of `net` was a dropout in the original; keys are net.0.proj, net.2."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(4 * dim, dim)])
        self.net[0].proj = nn.Linear(dim, 4 * dim)

    def forward(self, x):
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class AdaLayerNorm(nn.Module):
    """Final modulation of the video tokens: LayerNorm, then shift/scale from the conditioning vector."""

    def __init__(self, cond_dim: int, dim: int, affine: bool, eps: float):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)

    def forward(self, x, emb):
        shift, scale = self.linear(F.silu(emb))[:, None].chunk(2, dim=2)  # (B, 1, D), shift first
        return modulate(self.norm(x), shift, scale)


# ----------------------------------------------------------------------------------------------------------
# Small pure functions for the math


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool, freq_shift: int, max_period: float = 10000.0):
    """Sinusoid of the (possibly fractional) timestep, always in fp32 (callers cast it to the model dtype)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t[:, None].float() * torch.exp(exponent)[None]  # (B, dim/2)
    sin, cos = torch.sin(args), torch.cos(args)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (B, dim)


def modulate(x, shift, scale):
    """x * (1 + scale) + shift, as one kernel."""
    return torch.addcmul(shift, x, 1 + scale)


def sincos_1d(dim: int, pos):
    """[sin | cos] of positions against dim/2 geometric frequencies, in float64 (the original's precision)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0))
    args = pos.double()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (M, dim)


def sincos_3d(dim: int, T: int, Hp: int, Wp: int, spatial_scale: float, temporal_scale: float, device):
    """Absolute 3D sincos table (T*Hp*Wp, dim), tokens in (t, h, w) order, features [t: dim/4 | x: 3dim/8 |
    y: 3dim/8]. Positions are fp32 (divided by the interpolation scales), the table float64."""
    ys = torch.arange(Hp, dtype=torch.float32, device=device) / spatial_scale
    xs = torch.arange(Wp, dtype=torch.float32, device=device) / spatial_scale
    ts = torch.arange(T, dtype=torch.float32, device=device) / temporal_scale
    ds = 3 * dim // 8
    x_emb = sincos_1d(ds, xs)[None, :, :].expand(Hp, Wp, ds)  # (Hp, Wp, ds)
    y_emb = sincos_1d(ds, ys)[:, None, :].expand(Hp, Wp, ds)
    spatial = torch.cat([x_emb, y_emb], dim=-1).reshape(1, Hp * Wp, 2 * ds).expand(T, -1, -1)  # (T, Hp*Wp, 3dim/4)
    temporal = sincos_1d(dim // 4, ts)[:, None, :].expand(-1, Hp * Wp, -1)  # (T, Hp*Wp, dim/4)
    return torch.cat([temporal, spatial], dim=-1).reshape(T * Hp * Wp, dim)  # (N, dim)


def crop_region(grid_h: int, grid_w: int, base_h: int, base_w: int):
    """Where a (grid_h, grid_w) token grid sits inside the training grid (base_h, base_w) after an
    aspect-preserving resize: the RoPE positions of CogVideoX 1.0 span this region. Python's round()
    (banker's rounding) is part of the recipe."""
    if grid_h / grid_w > base_h / base_w:
        rh, rw = base_h, int(round(base_h / grid_h * grid_w))
    else:
        rh, rw = int(round(base_w / grid_w * grid_h)), base_w
    top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def rope_1d(dim: int, pos, theta: float = 10000.0):
    """Rotation angles (M, dim/2) of RoPE over one axis; pair (2i, 2i+1) of a head shares angle i."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim))
    return pos[:, None] * freqs[None]


def rope_3d(head_dim: int, pos_t, pos_h, pos_w):
    """Angles (T*Hg*Wg, d/2) for video tokens in (t, h, w) order; the head splits as [t: d/4 | h: 3d/8 | w: 3d/8]."""
    T, Hg, Wg = len(pos_t), len(pos_h), len(pos_w)
    dt, dhw = head_dim // 4, head_dim // 8 * 3
    at = rope_1d(dt, pos_t)[:, None, None, :].expand(T, Hg, Wg, -1)  # (T, Hg, Wg, dt/2)
    ah = rope_1d(dhw, pos_h)[None, :, None, :].expand(T, Hg, Wg, -1)
    aw = rope_1d(dhw, pos_w)[None, None, :, :].expand(T, Hg, Wg, -1)
    return torch.cat([at, ah, aw], dim=-1).reshape(T * Hg * Wg, head_dim // 2)  # (N, d/2)


def apply_rope(x, cos, sin):
    """Rotate each pair (x[2i], x[2i+1]) by its angle, in fp32; x (B, S, h, d), cos/sin (S, 1, d/2)."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, h, d/2) each
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)  # (B, S, h, d/2, 2)
    return out.flatten(-2).to(x.dtype)  # (B, S, h, d)


def patchify(x, p: int, pt: int):
    """(B, F, C, H, W) -> (B, N, C*pt*p*p): tokens in (f, h, w) order, features in (c, pt, ph, pw) order."""
    B, F_, C, H, W = x.shape
    x = x.reshape(B, F_ // pt, pt, C, H // p, p, W // p, p)
    x = x.permute(0, 1, 4, 6, 3, 2, 5, 7)  # (B, F/pt, H/p, W/p, C, pt, p, p)
    return x.reshape(B, -1, C * pt * p * p)


def unpatchify(x, F_: int, H: int, W: int, p: int, pt: int):
    """Inverse of patchify: (B, N, C*pt*p*p) -> (B, F, C, H, W)."""
    B = x.shape[0]
    x = x.reshape(B, F_ // pt, H // p, W // p, -1, pt, p, p)
    x = x.permute(0, 1, 5, 4, 2, 6, 3, 7)  # (B, F/pt, pt, C, H/p, p, W/p, p)
    return x.reshape(B, F_, -1, H, W)
