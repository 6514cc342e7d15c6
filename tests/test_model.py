"""model.py against diffusers' CogVideoXTransformer3DModel: tiny random models of every variant family,
saved by the peer in the official layout and loaded by our loader; official presets checked on meta."""
import dataclasses
import json
import os
from types import SimpleNamespace

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline, get_resize_crop_region_for_grid
from safetensors.torch import load_file, save_file

import model as M
from checkpoint import CheckpointError

TINY = dict(num_attention_heads=2, attention_head_dim=16, time_embed_dim=16, text_embed_dim=24, num_layers=2,
            max_text_seq_length=6, in_channels=4, out_channels=4, sample_height=8, sample_width=12, sample_frames=9)
TINY15 = dict(TINY, sample_height=16, sample_width=16, patch_size_t=2, patch_bias=False,
              use_rotary_positional_embeddings=True)
VARIANTS = {  # name: (peer config, latent (F, H, W), text length)
    "sincos": (dict(TINY), (2, 10, 6), 6),  # H, W, F all differ from the sample size: table recomputed
    "rope": (dict(TINY, use_rotary_positional_embeddings=True), (3, 16, 4), 6),  # crop region, banker's round
    "learned": (dict(TINY, in_channels=8, use_rotary_positional_embeddings=True,
                     use_learned_positional_embeddings=True), (3, 8, 12), 6),  # sample size: learned table used
    "learned-other-frames": (dict(TINY, in_channels=8, use_rotary_positional_embeddings=True,
                                  use_learned_positional_embeddings=True), (2, 8, 12), 6),  # sincos fallback
    "v1.5": (dict(TINY15), (4, 6, 10), 5),
    "v1.5-i2v": (dict(TINY15, in_channels=8, ofs_embed_dim=16), (4, 6, 10), 5),
}
OFFICIAL_PARAMS = {"cogvideox-2b": 1_693_783_872, "cogvideox-5b": 5_570_283_072, "cogvideox-5b-i2v": 5_570_479_680,
                   "cogvideox1.5-5b": 5_570_676_352, "cogvideox1.5-5b-i2v": 5_571_594_880}


def rel_err(a, b):
    """max |a - b| / max |b|"""
    return ((a - b).abs().max() / b.abs().max()).item()


def random_peer(cfg):
    peer = CogVideoXTransformer3DModel(**cfg)
    with torch.no_grad():
        for t in peer.state_dict().values():  # all parameters and the persistent learned table
            t.normal_(0.0, 0.3)
        for m in peer.modules():  # LayerNorm scales around 1 (random, not the init's exact 1)
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(1.0)
    return peer.eval()


def inputs(cfg, shape, L):
    F_, H, W = shape
    x = torch.randn(2, F_, cfg["in_channels"], H, W)
    text = torch.randn(2, L, cfg["text_embed_dim"])
    t = torch.tensor([999, 321])
    ofs = torch.tensor([2.0]) if cfg.get("ofs_embed_dim") else None
    return x, text, t, ofs


def peer_forward(peer, x, text, t, ofs):
    rope = None
    if peer.config.use_rotary_positional_embeddings:  # the pipeline builds RoPE; borrow its method
        fake = SimpleNamespace(vae_scale_factor_spatial=8, transformer=peer)
        rope = CogVideoXPipeline._prepare_rotary_positional_embeddings(fake, x.shape[3] * 8, x.shape[4] * 8,
                                                                       x.shape[1], x.device)
    return peer(x, text, t, ofs=ofs, image_rotary_emb=rope, return_dict=False)[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (peer, folder) for each variant family, saved once per test run."""
    out = {}
    for name, (cfg, _, _) in VARIANTS.items():
        torch.manual_seed(len(out))
        peer = random_peer(cfg)
        folder = str(tmp_path_factory.mktemp(name))
        peer.save_pretrained(folder)
        out[name] = (peer, folder)
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parity_with_peer(saved, name):
    cfg, shape, L = VARIANTS[name]
    peer, folder = saved[name]
    ours = M.load_transformer(folder)
    x, text, t, ofs = inputs(cfg, shape, L)
    with torch.no_grad():
        ref = peer_forward(peer, x, text, t, ofs)
        out = ours(x, text, t, ofs)
        out_cached = ours(x, text, t.float(), ofs)  # second call: cached tables; float timesteps
    assert out.shape == ref.shape == (2, shape[0], cfg["out_channels"], shape[1], shape[2])
    assert ref.abs().max() > 0.1 and (ref[0] - ref[1]).abs().max() > 1e-3  # non-trivial, batch rows differ
    err = rel_err(out, ref)
    print(f"{name}: rel err {err:.2e}")
    assert err < 1e-5
    assert torch.equal(out, out_cached)


def test_learned_positions_refuse_other_resolution(saved):
    peer, folder = saved["learned"]
    ours = M.load_transformer(folder)
    x, text, t, _ = inputs(VARIANTS["learned"][0], (3, 10, 12), 6)
    with pytest.raises(ValueError):
        peer_forward(peer, x, text, t, None)
    with pytest.raises(ValueError, match="8 x 12"):
        ours(x, text, t)


def test_crop_region_matches_pipeline():
    for base in [(30, 45), (4, 6)]:
        for gh in range(1, 41):
            for gw in range(1, 41):
                assert M.crop_region(gh, gw, *base) == get_resize_crop_region_for_grid((gh, gw), base[1], base[0])


@pytest.mark.parametrize("name", list(OFFICIAL_PARAMS))
def test_presets_match_peer_on_meta(name):
    cfg = M.PRESETS[name]
    with torch.device("meta"):
        ours = M.CogVideoXTransformer(cfg)
        peer = CogVideoXTransformer3DModel(**dataclasses.asdict(cfg))  # also checks our field names are official
    ours_sd, peer_sd = ours.state_dict(), peer.state_dict()
    assert list(ours_sd) == list(peer_sd)
    assert all(ours_sd[k].shape == peer_sd[k].shape for k in peer_sd)
    n_ours, n_peer = (sum(p.numel() for p in m.parameters()) for m in (ours, peer))
    assert n_ours == n_peer == OFFICIAL_PARAMS[name]
    assert [b.shape for b in ours.buffers()] == [peer_sd[k].shape for k in peer_sd if k.endswith("pos_embedding")]


def test_gradient_checkpointing_same_gradients(saved):
    cfg, shape, L = VARIANTS["rope"]
    ours = M.load_transformer(saved["rope"][1]).requires_grad_(True)
    x, text, t, _ = inputs(cfg, shape, L)
    x.requires_grad_(True)
    grads = []
    for ckpt in (False, True):
        ours.gradient_checkpointing = ckpt
        ours.zero_grad(set_to_none=True)
        x.grad = None
        ours(x, text, t).square().mean().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in ours.parameters()])
    assert len(grads[0]) == len(list(ours.parameters())) + 1
    for g0, g1 in zip(*grads):
        assert g0.abs().max() > 0
        assert torch.allclose(g0, g1, rtol=0, atol=1e-7 * g0.abs().max().item())


def test_sharded_checkpoint_and_snapshot_root(saved, tmp_path):
    peer, folder = saved["v1.5-i2v"]
    peer.save_pretrained(str(tmp_path / "snap" / "transformer"), max_shard_size="50KB")
    shards = [f for f in os.listdir(tmp_path / "snap" / "transformer") if f.endswith(".safetensors")]
    assert len(shards) > 2
    sharded, single = M.load_transformer(str(tmp_path / "snap")), M.load_transformer(folder)
    a, b = sharded.state_dict(), single.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_checkpoint_errors_name_the_key(saved, tmp_path):
    _, folder = saved["rope"]
    sd = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    sd["proj_out.weights"] = sd.pop("proj_out.weight")
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'proj_out.weight'"):
        M.load_transformer(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(config, num_layers=3)))
    sd["proj_out.weight"] = sd.pop("proj_out.weights")
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="transformer_blocks.2"):
        M.load_transformer(str(tmp_path))
    with pytest.raises(ValueError, match="use_learned_positional_embeddings"):
        M.TransformerConfig(use_learned_positional_embeddings=True)


def test_input_errors(saved):
    ours = M.load_transformer(saved["v1.5-i2v"][1])
    x, text, t, ofs = inputs(VARIANTS["v1.5-i2v"][0], (3, 6, 10), 5)
    with pytest.raises(ValueError, match="F divisible by 2"):
        ours(x, text, t, ofs)
    with pytest.raises(ValueError, match="ofs"):
        ours(x[:, :2], text, t)
    sincos = M.load_transformer(saved["sincos"][1])
    x, text, t, _ = inputs(VARIANTS["sincos"][0], (2, 10, 6), 5)
    with pytest.raises(ValueError, match="max_text_seq_length=6"):
        sincos(x, text, t)


def test_compiles_without_graph_breaks_and_attention_is_swappable(saved, monkeypatch, fresh_dynamo):
    cfg, shape, L = VARIANTS["rope"]
    ours = M.load_transformer(saved["rope"][1])
    x, text, t, _ = inputs(cfg, shape, L)
    with torch.no_grad():
        compiled = torch.compile(ours, fullgraph=True, backend="eager")  # fullgraph: any graph break raises
        assert torch.equal(compiled(x, text, t), ours(x, text, t))
        calls = []
        monkeypatch.setattr(M, "attention", lambda q, k, v: calls.append(q.shape) or
                            torch.nn.functional.scaled_dot_product_attention(q, k, v))
        ours(x, text, t)
    assert len(calls) == cfg["num_layers"]


def test_flops_per_forward():
    # performance-anchors section 6: 2B at 49x480x720 (17,550 video + 226 text tokens) is 47.2 + 72.8 TF
    f2b = M.flops_per_forward(M.PRESETS["cogvideox-2b"], 17550)
    f5b = M.flops_per_forward(M.PRESETS["cogvideox-5b"], 17550)
    assert abs(f2b / 120.0e12 - 1) < 1e-3 and abs(f5b / 332.2e12 - 1) < 1e-3
    S, D = 17776, 1920
    assert f2b == 30 * (24 * D * D * S + 4 * S * S * D)
