"""Parity of vae.py with diffusers' AutoencoderKLCogVideoX on a tiny random VAE saved with save_pretrained."""
import dataclasses
import json
import os

import pytest
import torch
from diffusers import AutoencoderKLCogVideoX
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from checkpoint import CheckpointError
from vae import PRESETS, CogVideoXVAE, VAEConfig, load_vae, sample_posterior

# Channels change inside both encoder and decoder (conv_shortcut keys), 2 time-compressing levels as released.
# sample 96x80 sets the default tiles to 48x40 px = 6x5 latents (large enough for non-zero blends).
TINY = dict(block_out_channels=(4, 4, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
            sample_height=96, sample_width=80)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    peer = AutoencoderKLCogVideoX(**TINY)
    with torch.no_grad():
        for p in peer.parameters():  # move every weight (norms included) away from its init
            p.add_(torch.randn_like(p) * (0.3 if p.ndim == 1 else p.std().item() * 0.5 + 0.02))
    root = tmp_path_factory.mktemp("snap")
    peer.save_pretrained(root / "vae")
    ours = load_vae(str(root))  # snapshot root: picks vae/
    return peer.eval(), ours, root


def peer_encode(peer, x):
    with torch.no_grad():
        d = peer.encode(x).latent_dist
    return d.mean, d.logvar


def peer_decode(peer, z):
    with torch.no_grad():
        return peer.decode(z).sample


@pytest.mark.parametrize("frames", [1, 9, 17, 33])
def test_encode_matches_peer(pair, frames):
    peer, ours, _ = pair
    x = torch.rand(2, 3, frames, 30, 42) * 2 - 1  # 30x42: odd sizes after down-sampling
    mean_p, logvar_p = peer_encode(peer, x)
    mean, logvar = ours.encode(x)
    assert mean.shape == mean_p.shape == (2, 4, 1 + (frames - 1) // 4, 3, 5)
    assert rel(mean, mean_p) < 1e-5 and rel(logvar, logvar_p) < 1e-5
    assert logvar.min() >= -30 and logvar.max() <= 20


@pytest.mark.parametrize("latents", [1, 3, 5, 9])
def test_decode_matches_peer(pair, latents):
    peer, ours, _ = pair
    z = torch.randn(1, 4, latents, 4, 7)
    ref = peer_decode(peer, z)
    out = ours.decode(z)
    assert out.shape == ref.shape == (1, 3, 1 + 4 * (latents - 1), 32, 56)
    assert rel(out, ref) < 1e-5


def test_logvar_clamp_and_posterior_sample(pair):
    peer, ours, _ = pair
    x = torch.rand(1, 3, 9, 16, 24) * 2 - 1
    with torch.no_grad():
        h = torch.cat(ours.encode(x), dim=1)
    h[:, 4:, 0] = 50.0  # logvar beyond the clamp
    mean, logvar = h.chunk(2, dim=1)
    ref = DiagonalGaussianDistribution(h).sample(torch.Generator().manual_seed(7))
    out = sample_posterior(mean, logvar.clamp(-30, 20), torch.Generator().manual_seed(7))
    assert torch.equal(out, ref)


TILINGS = [
    dict(),  # the config's default tile (sample/2) and the official overlaps (1/6, 1/5)
    dict(tile_size=(32, 48), tile_overlap=(1 / 4, 1 / 3)),
]


def set_peer_tiling(peer, tile_size=None, tile_overlap=None):
    peer.tile_sample_min_height, peer.tile_sample_min_width = tile_size or (
        peer.config.sample_height // 2, peer.config.sample_width // 2)
    peer.tile_latent_min_height = peer.tile_sample_min_height // 8
    peer.tile_latent_min_width = peer.tile_sample_min_width // 8
    peer.tile_overlap_factor_height, peer.tile_overlap_factor_width = tile_overlap or (1 / 6, 1 / 5)
    peer.use_tiling = True


@pytest.mark.parametrize("opts", TILINGS)
def test_tiled_encode_matches_peer(pair, opts):
    peer, ours, _ = pair
    x = torch.rand(1, 3, 9, 70, 90) * 2 - 1
    set_peer_tiling(peer, **opts)
    try:
        mean_p, logvar_p = peer_encode(peer, x)
    finally:
        peer.use_tiling = False
    mean, logvar = ours.encode(x, tiled=True, **opts)
    assert mean.shape == mean_p.shape
    assert rel(mean, mean_p) < 1e-5 and rel(logvar, logvar_p) < 1e-5


@pytest.mark.parametrize("opts", TILINGS)
def test_tiled_decode_matches_peer(pair, opts):
    peer, ours, _ = pair
    z = torch.randn(1, 4, 3, 7, 6)  # 2x2 (default) or 3x2 tiles of 6x5 or 4x6 latents, partial ones at the edges
    set_peer_tiling(peer, **opts)
    try:
        ref = peer_decode(peer, z)
    finally:
        peer.use_tiling = False
    out = ours.decode(z, tiled=True, **opts)
    assert out.shape == ref.shape == (1, 3, 9, 56, 48)
    assert rel(out, ref) < 1e-5
    # Tiling changes GroupNorm statistics and edge padding per tile, so it is not exact. With random weights the
    # bound is loose; a misplaced or unblended tile would break it.
    untiled = ours.decode(z)
    assert (out - untiled).abs().mean() < 0.25 * untiled.abs().mean()
    assert torch.corrcoef(torch.stack([out.flatten(), untiled.flatten()]))[0, 1] > 0.95


def test_small_input_does_not_tile(pair):
    _, ours, _ = pair
    z = torch.randn(1, 4, 1, 6, 5)  # exactly one default tile
    assert torch.equal(ours.decode(z, tiled=True), ours.decode(z))


def test_uneven_tile_is_rejected(pair):
    _, ours, _ = pair
    z = torch.randn(1, 4, 1, 9, 9)
    with pytest.raises(ValueError, match="does not tile evenly"):
        ours.decode(z, tiled=True, tile_size=(40, 40))  # stride 4 latents = 32 px, but keeps 40 - 6 = 34 px


def test_bf16_matches_peer_exactly(pair):
    """Same ops in the same order, so bf16 results are bit-identical (no reliance on fp32 slack)."""
    _, _, root = pair
    peer = AutoencoderKLCogVideoX.from_pretrained(root / "vae", dtype=torch.bfloat16).eval()
    ours = load_vae(str(root / "vae"), dtype=torch.bfloat16)
    x = (torch.rand(1, 3, 9, 18, 26) * 2 - 1).bfloat16()
    z = torch.randn(1, 4, 3, 3, 4).bfloat16()
    mean_p, logvar_p = peer_encode(peer, x)
    mean, logvar = ours.encode(x)
    assert torch.equal(mean, mean_p) and torch.equal(logvar, logvar_p)
    assert torch.equal(ours.decode(z), peer_decode(peer, z))


def test_presets_match_peer_on_meta():
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            ours = CogVideoXVAE(cfg)
            peer = AutoencoderKLCogVideoX(scaling_factor=cfg.scaling_factor,
                                          invert_scale_latents=cfg.invert_scale_latents)
        shapes = {k: v.shape for k, v in ours.state_dict().items()}
        assert shapes == {k: v.shape for k, v in peer.state_dict().items()}, name
        assert sum(p.numel() for p in ours.parameters()) == 215_583_907
        for f in dataclasses.fields(VAEConfig):
            want = peer.config[f.name]
            assert (tuple(want) if isinstance(want, list) else want) == getattr(cfg, f.name), (name, f.name)
    assert PRESETS["cogvideox-2b"].scaling_factor == 1.15258426
    assert PRESETS["cogvideox-5b"].scaling_factor == 0.7 and not PRESETS["cogvideox-5b"].invert_scale_latents
    assert PRESETS["cogvideox1.5-5b"].invert_scale_latents


def test_load_errors_are_clear(pair, tmp_path):
    _, _, root = pair
    cfg = json.loads((root / "vae" / "config.json").read_text())
    cfg["latent_channels"] = 8
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    os.symlink(root / "vae" / "diffusion_pytorch_model.safetensors", tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="shape of"):
        load_vae(str(tmp_path))
    cfg["use_quant_conv"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_quant_conv"):
        load_vae(str(tmp_path))


def test_encode_clamps_logvar_like_peer(tmp_path):
    """An encoder whose log-variance leaves [-30, 20] (conv_out bias of the logvar half pushed to +-200): our
    posterior (mean, logvar, and a seeded draw from it) equals the peer's latent_dist, which clamps; the test does not
    clamp anything itself."""
    torch.manual_seed(0)
    peer = AutoencoderKLCogVideoX(**TINY)
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.ndim == 1 else p.std().item() * 0.5 + 0.02))
        bias = peer.encoder.conv_out.conv.bias  # (2 * latent_channels,): mean, then logvar
        bias[4:6] += 200.0
        bias[6:8] -= 200.0
    peer.save_pretrained(tmp_path / "vae")
    ours = load_vae(str(tmp_path))
    x = torch.rand(1, 3, 9, 16, 24) * 2 - 1
    with torch.no_grad():
        dist = peer.eval().encode(x).latent_dist
        raw = dist.parameters  # the encoder's unclamped output (mean, logvar)
        mean, logvar = ours.encode(x)
    assert raw[:, 4:6].min() > 20 and raw[:, 6:8].max() < -30  # the encoder really leaves the range
    assert rel(mean, dist.mean) < 1e-5
    assert torch.equal(logvar, dist.logvar), (  # clamped to exactly 20 and -30, as the peer
        f"logvar in [{logvar.min():.1f}, {logvar.max():.1f}], the peer's in [{dist.logvar.min():.1f}, {dist.logvar.max():.1f}]")
    ref = dist.sample(torch.Generator().manual_seed(7))
    out = sample_posterior(mean, logvar, torch.Generator().manual_seed(7))
    assert rel(out, ref) < 1e-5
