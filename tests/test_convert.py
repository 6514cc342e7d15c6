"""convert.py: SAT <-> official layout for the transformer and VAE, SAT LoRA export, and bad inputs.

Official-layout weights come from tiny random diffusers models (save_pretrained); SAT-layout ones are made from them
with hf2sat and checked independently against the SAT key inventory of the spec (official-repo-and-sat.md 1.3, 1.6).
"""
import dataclasses
import json
import os

import pytest
import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel

import convert
from lora import lora_metadata
import model
import vae

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
            text_embed_dim=12, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, max_text_seq_length=6)
FAMILIES = {  # one tiny stand-in per released variant, same switches as the real configs
    "cogvideox-2b": {},
    "cogvideox-5b": dict(use_rotary_positional_embeddings=True),
    "cogvideox-5b-i2v": dict(in_channels=8, use_rotary_positional_embeddings=True,
                             use_learned_positional_embeddings=True),
    "cogvideox1.5-5b": dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False),
    "cogvideox1.5-5b-i2v": dict(in_channels=8, use_rotary_positional_embeddings=True, patch_size_t=2,
                                patch_bias=False, ofs_embed_dim=8),
}
TINY_VAE = dict(block_out_channels=(8, 8, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4)
SAT = convert.SAT


def randomise(net):
    with torch.no_grad():
        for t in net.state_dict().values():  # parameters and persistent buffers (5b-I2V's learned table)
            t.copy_(torch.randn_like(t) * 0.3)
    return net


def official_transformer(variant, folder=None):
    net = randomise(CogVideoXTransformer3DModel(**{**TINY, **FAMILIES[variant]}))
    if folder:
        net.save_pretrained(folder)
    return dict(net.config), {k: t.clone() for k, t in net.state_dict().items()}


def official_vae(folder=None):
    net = randomise(AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 4,
                                           up_block_types=("CogVideoXUpBlock3D",) * 4, **TINY_VAE))
    if folder:
        net.save_pretrained(folder)
    return dict(net.config), {k: t.clone() for k, t in net.state_dict().items()}


@pytest.fixture(autouse=True)
def empty_cwd(tmp_path_factory, monkeypatch):
    """Every test runs in an empty folder that must stay empty: a conversion that writes beside the current folder
    (a path joined wrongly) fails here instead of leaving files that a later test could read."""
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(cwd)
    yield
    assert os.listdir(cwd) == []


@pytest.fixture
def tiny_presets(monkeypatch):
    """Make the CLI's --variant presets tiny, so whole conversions run in milliseconds."""
    for v, extra in FAMILIES.items():
        monkeypatch.setitem(model.PRESETS, v, model.TransformerConfig(**{**TINY, **extra}))
    for v in vae.PRESETS:
        monkeypatch.setitem(vae.PRESETS, v, dataclasses.replace(vae.PRESETS[v], **TINY_VAE))


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---- round trips: official -> SAT -> official, bit for bit --------------------------------------------------

@pytest.mark.parametrize("variant", FAMILIES)
def test_transformer_round_trip(variant):
    config, sd = official_transformer(variant)
    back, unmatched = convert.sat_to_hf(convert.hf_to_sat(sd), config)
    assert unmatched == []
    assert_identical(back, sd)
    assert_identical(convert.check(back, convert.expected_shapes("transformer", config), "x"), sd)


def test_vae_round_trip():
    config, sd = official_vae()
    assert_identical(convert.vae_to_hf(convert.vae_to_hf(sd, reverse=True)), sd)
    assert convert.expected_shapes("vae", config) == {k: tuple(t.shape) for k, t in sd.items()}


# ---- the SAT side matches the spec's inventory (independent of the mapping code) ---------------------------

FULL = {  # official full-size configs (diffusers-cogvideox.md 1.2)
    "cogvideox-2b": dict(num_layers=30, num_attention_heads=30),
    "cogvideox-5b": dict(num_layers=42, num_attention_heads=48, use_rotary_positional_embeddings=True),
    "cogvideox1.5-5b-i2v": dict(num_layers=42, num_attention_heads=48, in_channels=32, sample_height=300,
                                sample_width=300, sample_frames=81, patch_size_t=2, patch_bias=False,
                                use_rotary_positional_embeddings=True, ofs_embed_dim=512),
}


@pytest.mark.parametrize("variant", FULL)
def test_sat_inventory_full_size(variant):
    with torch.device("meta"):  # full size, no memory
        sd = CogVideoXTransformer3DModel(**FULL[variant]).state_dict()
    sat = {k[len(SAT):]: tuple(t.shape) for k, t in convert.hf_to_sat(sd).items()}
    D, L = (1920, 30) if variant == "cogvideox-2b" else (3072, 42)
    # 18 keys per layer + 16 top-level; #244 counts 557 for 2b with the frozen sincos table
    assert len(sat) == 18 * L + 16 + (4 if "i2v" in variant else 0)
    assert sat["transformer.layers.0.attention.query_key_value.weight"] == (3 * D, D)
    assert sat[f"mixins.adaln_layer.adaLN_modulations.{L - 1}.1.weight"] == (12 * D, 512)
    assert sat["mixins.adaln_layer.query_layernorm_list.0.weight"] == (64,)
    assert sat["transformer.layers.0.mlp.dense_h_to_4h.weight"] == (4 * D, D)
    assert sat["mixins.final_layer.adaLN_modulation.1.weight"] == (2 * D, 512)
    assert sat["time_embed.0.weight"] == (512, D) and sat["mixins.patch_embed.text_proj.weight"] == (D, 4096)
    if variant == "cogvideox1.5-5b-i2v":
        assert sat["mixins.patch_embed.proj.weight"] == (D, 32 * 8) and sat["ofs_embed.2.weight"] == (512, 512)
        assert sat["mixins.final_layer.linear.weight"] == (128, D)
    else:
        assert sat["mixins.patch_embed.proj.weight"] == (D, 16, 2, 2)
        assert sat["mixins.final_layer.linear.weight"] == (64, D)
    # and back, checked against this project's model for the real preset
    back, unmatched = convert.sat_to_hf(convert.hf_to_sat(sd), dataclasses.asdict(model.PRESETS[variant]))
    convert.check(back, convert.expected_shapes("transformer", dataclasses.asdict(model.PRESETS[variant])), variant,
                  unmatched, variant=variant)


def test_sat_names_and_adaln_order():
    config, sd = official_transformer("cogvideox-2b")
    sat = convert.hf_to_sat(sd)
    D = 32
    qkv = sat[SAT + "transformer.layers.1.attention.query_key_value.weight"]
    assert torch.equal(qkv[D:2 * D], sd["transformer_blocks.1.attn1.to_k.weight"])
    ada = sat[SAT + "mixins.adaln_layer.adaLN_modulations.0.1.bias"].chunk(12)
    n1 = sd["transformer_blocks.0.norm1.linear.bias"].chunk(6)
    n2 = sd["transformer_blocks.0.norm2.linear.bias"].chunk(6)
    # SAT: shift/scale/gate msa, shift/scale/gate mlp, then the text six; official norm1: msa video then text
    assert torch.equal(ada[0], n1[0]) and torch.equal(ada[5], n2[2]) and torch.equal(ada[6], n1[3])
    assert torch.equal(ada[11], n2[5])
    assert torch.equal(sat[SAT + "mixins.adaln_layer.key_layernorm_list.1.weight"],
                       sd["transformer_blocks.1.attn1.norm_k.weight"])
    assert torch.equal(sat[SAT + "transformer.layers.0.post_attention_layernorm.bias"],
                       sd["transformer_blocks.0.norm2.norm.bias"])
    _, vsd = official_vae()
    vs = convert.vae_to_hf(vsd, reverse=True)
    assert torch.equal(vs["decoder.up.3.block.0.conv1.conv.weight"],  # SAT level 3 = lowest resolution = first
                       vsd["decoder.up_blocks.0.resnets.0.conv1.conv.weight"])
    assert torch.equal(vs["decoder.up.1.upsample.conv.weight"], vsd["decoder.up_blocks.2.upsamplers.0.conv.weight"])
    assert torch.equal(vs["encoder.mid.block_2.norm1.weight"], vsd["encoder.mid_block.resnets.1.norm1.weight"])
    assert torch.equal(vs["encoder.down.2.block.0.nin_shortcut.weight"],
                       vsd["encoder.down_blocks.2.resnets.0.conv_shortcut.weight"])
    assert torch.equal(vs["encoder.down.0.downsample.conv.weight"],
                       vsd["encoder.down_blocks.0.downsamplers.0.conv.weight"])


# ---- SAT checkpoint files -> official folders -> same model outputs --------------------------------------

def sat_file(sd, path, variant):
    """A SAT transformer checkpoint as a fine-tuned SAT run saves it: DeepSpeed extras, the T5 and VAE copies,
    and the positional tables SAT recomputes."""
    sat = convert.hf_to_sat(sd)
    sat["conditioner.embedders.0.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"] = torch.randn(4, 4)
    sat["first_stage_model.encoder.conv_in.conv.weight"] = torch.randn(2, 3, 3, 3, 3)
    if variant == "cogvideox-2b":
        sat[SAT + "mixins.pos_embed.pos_embedding"] = torch.randn(1, 6 + 3 * 4 * 4, 32)
    elif variant == "cogvideox-5b":
        sat[SAT + "mixins.pos_embed.freqs_sin"] = sat[SAT + "mixins.pos_embed.freqs_cos"] = torch.randn(48, 64)
    torch.save({"module": sat, "iteration": 1000, "np_rng_state": __import__("numpy").random.get_state()}, path)


def run_transformer(net, variant, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = net.config
    x = torch.randn(1, 3 if cfg.patch_size_t is None else 2, cfg.in_channels, 8, 8, generator=g)
    text = torch.randn(1, 6, 12, generator=g)
    return net(x, text, torch.tensor([500]), ofs=torch.tensor([2.0]) if cfg.ofs_embed_dim else None)


@pytest.mark.parametrize("variant", FAMILIES)
def test_sat_to_official_same_output(variant, tmp_path, tiny_presets):
    config, sd = official_transformer(variant, tmp_path / "orig" / "transformer")
    sat_file(sd, tmp_path / "sat.pt", variant)
    convert.main(["sat2hf", "--transformer", str(tmp_path / "sat.pt"), "--variant", variant,
                  "--out", str(tmp_path / "conv"), "--max-shard-size", "20KB"])
    folder = tmp_path / "conv" / "transformer"
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").exists()  # sharded above 20KB
    written = json.loads((folder / "config.json").read_text())
    assert written["_class_name"] == "CogVideoXTransformer3DModel" and written["num_layers"] == 2
    ours = model.load_transformer(str(tmp_path / "conv"))
    orig = model.load_transformer(str(tmp_path / "orig"))
    assert_identical(dict(ours.state_dict()), dict(orig.state_dict()))
    for net in (ours, orig):  # tensors read from safetensors sit at arbitrary byte offsets, and CPU matmul kernels
        net.load_state_dict({k: t.clone() for k, t in net.state_dict().items()}, assign=True)  # round by alignment
    with torch.no_grad():
        assert torch.equal(run_transformer(ours, variant), run_transformer(orig, variant))
    assert not [p for p in os.listdir(tmp_path / "conv") if p.startswith(".convert-")]


def test_vae_sat_to_official_same_output(tmp_path, tiny_presets):
    _, vsd = official_vae(tmp_path / "orig" / "vae")
    sat = convert.vae_to_hf(vsd, reverse=True)
    sat["loss.discriminator.main.0.weight"] = torch.randn(3)  # SAT's training loss, dropped
    torch.save({"state_dict": sat}, tmp_path / "3d-vae.pt")
    convert.main(["sat2hf", "--vae", str(tmp_path / "3d-vae.pt"), "--variant", "cogvideox-5b-i2v",
                  "--out", str(tmp_path / "conv")])
    assert json.loads((tmp_path / "conv/vae/config.json").read_text())["scaling_factor"] == 0.7
    ours, orig = vae.load_vae(str(tmp_path / "conv")), vae.load_vae(str(tmp_path / "orig"))
    z = torch.randn(1, 4, 1, 4, 4)
    with torch.no_grad():
        assert torch.equal(ours.decode(z), orig.decode(z))


def test_hf2sat_cli_round_trip(tmp_path, tiny_presets):
    _, sd = official_transformer("cogvideox1.5-5b-i2v", tmp_path / "snap" / "transformer")
    _, vsd = official_vae(tmp_path / "snap" / "vae")
    convert.main(["hf2sat", "--snapshot", str(tmp_path / "snap"), "--out", str(tmp_path / "sat")])
    assert (tmp_path / "sat/transformer/latest").read_text() == "1"
    raw = torch.load(tmp_path / "sat/transformer/1/mp_rank_00_model_states.pt", weights_only=True)
    assert list(raw) == ["module"] and all(k.startswith(SAT) for k in raw["module"])
    assert list(torch.load(tmp_path / "sat/vae/3d-vae.pt", weights_only=True)) == ["state_dict"]
    for _ in range(2):  # the second run replaces the first output in place
        convert.main(["sat2hf", "--transformer", str(tmp_path / "sat/transformer"), "--vae",
                      str(tmp_path / "sat/vae/3d-vae.pt"), "--variant", "cogvideox1.5-5b-i2v",
                      "--out", str(tmp_path / "back"), "--dtype", "bf16"])
    t = model.load_transformer(str(tmp_path / "back"), dtype=None)
    assert all(p.dtype == torch.bfloat16 for p in t.parameters())
    assert_identical({k: v.to(torch.bfloat16) for k, v in sd.items()}, dict(t.state_dict()))
    assert_identical(vae.load_vae(str(tmp_path / "back")).state_dict(), vsd)  # VAE stays fp32


# ---- LoRA ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["cogvideox-2b", "cogvideox-5b"])
def test_lora_export_matches_sat_merge(variant, tmp_path):
    config, sd = official_transformer(variant)
    base = convert.hf_to_sat(sd)
    r, alpha, D = 4, 3.0, 32
    sat_lora, merged = {}, dict(base)
    for i in range(2):
        for name, parts in (("query_key_value", 3), ("dense", 1)):
            pre = f"{SAT}transformer.layers.{i}.attention.{name}."
            A = [torch.randn(r, D) for _ in range(parts)]
            B = [torch.randn(D, r) for _ in range(parts)]
            for wb in ("weight", "bias"):  # SAT's LoraLinear moves the base Linear under `.original.` (#625)
                sat_lora[pre + "original." + wb] = base[pre + wb]
            for k in range(parts):
                sat_lora[f"{pre}matrix_A.{k}"], sat_lora[f"{pre}matrix_B.{k}"] = A[k], B[k]
            # SAT's merge_linear_lora: W + scaling * concat_k(B_k A_k) with scaling = alpha / r
            merged[pre + "weight"] = base[pre + "weight"] + alpha / r * torch.cat([b @ a for a, b in zip(A, B)])
    sat_lora.update({k: v for k, v in base.items() if ".attention." not in k})
    torch.save({"module": sat_lora}, tmp_path / "lora.pt")
    convert.main(["lora", "--lora", str(tmp_path / "lora.pt"), "--alpha", str(alpha), "--out", str(tmp_path / "l")])

    # read back as diffusers reads it; it builds peft's LoraConfig(r, lora_alpha, target_modules) from the metadata
    lora, meta = CogVideoXPipeline.lora_state_dict(str(tmp_path / "l"), return_lora_metadata=True)
    assert meta == {"transformer." + k: v for k, v in lora_metadata(r, alpha).items()}  # all four targets
    assert len(lora) == 8 * 2 and "transformer.transformer_blocks.1.attn1.to_out.0.lora_B.weight" in lora
    scale = meta["transformer.lora_alpha"] / meta["transformer.r"]

    base_hf, unmatched = convert.sat_to_hf(sat_lora, config)  # the `.original.` base converts as the base
    assert unmatched == [] and base_hf.keys() == sd.keys()
    merged_hf, _ = convert.sat_to_hf(merged, config)
    for i in range(2):
        for target in ("to_q", "to_k", "to_v", "to_out.0"):
            pre = f"transformer_blocks.{i}.attn1.{target}"
            A, B = lora[f"transformer.{pre}.lora_A.weight"], lora[f"transformer.{pre}.lora_B.weight"]
            torch.testing.assert_close(base_hf[pre + ".weight"] + scale * B @ A, merged_hf[pre + ".weight"],
                                       rtol=1e-5, atol=1e-5)
            assert torch.equal(base_hf[pre + ".bias"], merged_hf[pre + ".bias"])

    # Output level, through what `generate.py --lora` runs (lora.load_lora on our model): the converted LoRA applied
    # to the converted base equals the model converted from SAT's own merge.
    from lora import load_lora
    from safetensors.torch import save_file
    outs = {}
    for name, weights, lora_path in (("lora", base_hf, tmp_path / "l"), ("merged", merged_hf, None)):
        folder = tmp_path / name / "transformer"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config, default=list))
        save_file({k: v.contiguous() for k, v in weights.items()}, folder / "diffusion_pytorch_model.safetensors")
        net = model.load_transformer(str(folder))
        if lora_path:
            load_lora(net, str(lora_path))
        with torch.no_grad():
            outs[name] = run_transformer(net, variant)
    torch.testing.assert_close(outs["lora"], outs["merged"], rtol=1e-5, atol=1e-5)


# ---- bad inputs ---------------------------------------------------------------------------------------------

@pytest.fixture
def fails(capsys):
    """Run convert.main, which must refuse: exit status 2 and one line on stderr, returned."""
    def run(argv):
        assert convert.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
        return err
    return run


def test_not_a_checkpoint(tmp_path, fails):
    (tmp_path / "notes.pt").write_text("this is not a checkpoint\n")
    msg = fails(["sat2hf", "--transformer", str(tmp_path / "notes.pt"), "--variant", "cogvideox-2b",
                 "--out", str(tmp_path / "o")])
    assert "notes.pt is not a PyTorch checkpoint" in msg
    torch.save({"module": {"a": 1}}, tmp_path / "noweights.pt")
    assert "holds no state dict" in fails(["lora", "--lora", str(tmp_path / "noweights.pt"), "--out", str(tmp_path / "l")])
    assert "not found" in fails(["lora", "--lora", str(tmp_path / "missing.pt"), "--out", str(tmp_path)])
    assert not (tmp_path / "o").exists()


class RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_pickle_needing_code_is_refused(tmp_path, fails):
    torch.save({"module": {SAT + "time_embed.0.weight": torch.zeros(2)}, "x": RunsCode(str(tmp_path / "pwned"))},
               tmp_path / "evil.pt")
    msg = fails(["sat2hf", "--transformer", str(tmp_path / "evil.pt"), "--variant", "cogvideox-2b",
                 "--out", str(tmp_path / "o")])
    assert "needs code execution" in msg and "mkdir" in msg
    assert not (tmp_path / "pwned").exists()


def test_wrong_variant(tmp_path, tiny_presets, fails):
    _, sd = official_transformer("cogvideox-5b-i2v")
    sat_file(sd, tmp_path / "sat.pt", "cogvideox-5b-i2v")
    msg = fails(["sat2hf", "--transformer", str(tmp_path / "sat.pt"), "--variant", "cogvideox-5b",
                 "--out", str(tmp_path / "o")])
    assert "does not look like --variant cogvideox-5b" in msg and "learned positions" in msg
    assert not (tmp_path / "o" / "transformer").exists()


def test_real_preset_rejects_other_size(tmp_path, fails):
    _, sd = official_transformer("cogvideox-2b")
    sat_file(sd, tmp_path / "sat.pt", "cogvideox-2b")
    msg = fails(["sat2hf", "--transformer", str(tmp_path / "sat.pt"), "--variant", "cogvideox-2b",
                 "--out", str(tmp_path / "o")])
    assert "'hidden size': 32" in msg and "'hidden size': 1920" in msg


def test_unmatched_keys(tmp_path, tiny_presets, fails):
    _, sd = official_transformer("cogvideox-5b")
    sat = convert.hf_to_sat(sd)
    del sat[SAT + "transformer.layers.1.mlp.dense_4h_to_h.bias"]
    sat[SAT + "mixins.some_new_mixin.weight"] = torch.zeros(3)
    torch.save({"module": sat}, tmp_path / "sat.pt")
    argv = ["sat2hf", "--transformer", str(tmp_path / "sat.pt"), "--variant", "cogvideox-5b", "--out",
            str(tmp_path / "o")]
    msg = fails(argv)
    assert "transformer_blocks.1.ff.net.2.bias" in msg and "mixins.some_new_mixin.weight" in msg
    assert "--allow-missing" in msg
    convert.main(argv + ["--allow-missing"])
    written = convert.read_tensors(convert.weight_files(str(tmp_path / "o/transformer"), "diffusion_pytorch_model"))
    assert len(written) == len(sd) - 1


# ---- the 12-way adaLN split against the spec, not against convert.py's own table --------------------------------

# official-repo-and-sat.md 1.4/1.5, written out here (not imported from convert.py): SAT's 12 modulation chunks, and
# which of them the official norm1.linear / norm2.linear hold, in CogVideoXLayerNormZero's (shift, scale, gate,
# enc_shift, enc_scale, enc_gate) order.
SAT_ADALN_NAMES = ["shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp", "text_shift_msa",
                   "text_scale_msa", "text_gate_msa", "text_shift_mlp", "text_scale_mlp", "text_gate_mlp"]
SPEC_NORM_CHUNKS = {"norm1": [0, 1, 2, 6, 7, 8], "norm2": [3, 4, 5, 9, 10, 11]}


def labelled_sat(variant="cogvideox-2b"):
    """A SAT state dict whose adaLN rows say where they came from: chunk j of layer i holds 100 i + j (weight and
    bias alike), so every converted row can be traced back to its SAT chunk."""
    config, sd = official_transformer(variant)
    sat = convert.hf_to_sat(sd)
    for key in list(sat):
        if ".adaLN_modulations." in key:
            layer = int(key.split(".adaLN_modulations.")[1].split(".")[0])
            t = sat[key]
            D = t.shape[0] // 12
            label = (100 * layer + torch.arange(12, dtype=t.dtype)).repeat_interleave(D)  # (12D,)
            sat[key] = label if t.ndim == 1 else label[:, None].expand_as(t).clone()
    return config, sat


def test_sat_adaln_split_follows_the_spec():
    """Each converted norm{1,2}.linear row holds the SAT chunk the spec says, weight and bias, every layer."""
    config, sat = labelled_sat()
    hf, unmatched = convert.sat_to_hf(sat, config)
    assert unmatched == []
    D = TINY["num_attention_heads"] * TINY["attention_head_dim"]
    for i in range(TINY["num_layers"]):
        for norm, chunks in SPEC_NORM_CHUNKS.items():
            for kind in ("weight", "bias"):
                t = hf[f"transformer_blocks.{i}.{norm}.linear.{kind}"]
                assert t.shape[0] == 6 * D, (norm, kind, t.shape)
                got = [int(c.flatten()[0]) - 100 * i for c in t.chunk(6)]
                assert all(bool((c == c.flatten()[0]).all()) for c in t.chunk(6))  # one SAT chunk per official chunk
                assert got == chunks, f"layer {i} {norm}.linear.{kind}: SAT chunks {got}, spec says {chunks}"


def test_sat_adaln_semantics_in_diffusers_layernorm_zero():
    """The converted norm1/norm2 Linears, run in diffusers' own CogVideoXLayerNormZero, apply SAT's shift_msa as the
    video shift before attention, text_gate_mlp as the text gate after the MLP, and so on for all 12 (the SAT block
    semantics of the spec: x * (1 + scale) + shift, gated residuals)."""
    from diffusers.models.normalization import CogVideoXLayerNormZero
    config, sd = official_transformer("cogvideox-2b")
    sat = convert.hf_to_sat(sd)
    D, E = TINY["num_attention_heads"] * TINY["attention_head_dim"], TINY["time_embed_dim"]
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(12 * D, E, generator=g), torch.randn(12 * D, generator=g)  # SAT's fused adaLN Linear
    sat[SAT + "mixins.adaln_layer.adaLN_modulations.0.1.weight"] = w
    sat[SAT + "mixins.adaln_layer.adaLN_modulations.0.1.bias"] = b
    hf, _ = convert.sat_to_hf(sat, config)
    temb = torch.randn(2, E, generator=g)
    x, text = torch.randn(2, 5, D, generator=g), torch.randn(2, 3, D, generator=g)
    sat_out = dict(zip(SAT_ADALN_NAMES, (torch.nn.functional.silu(temb) @ w.T + b).chunk(12, dim=1)))  # SAT: 12 vectors
    ln = lambda h: torch.nn.functional.layer_norm(h, (D,), eps=1e-5)
    for norm, stage in (("norm1", "msa"), ("norm2", "mlp")):
        layer = CogVideoXLayerNormZero(E, D, elementwise_affine=False)
        layer.linear.weight.data.copy_(hf[f"transformer_blocks.0.{norm}.linear.weight"])
        layer.linear.bias.data.copy_(hf[f"transformer_blocks.0.{norm}.linear.bias"])
        with torch.no_grad():
            h, enc, gate, enc_gate = layer(x, text, temb)
        s = {k: v[:, None, :] for k, v in sat_out.items()}
        torch.testing.assert_close(h, ln(x) * (1 + s[f"scale_{stage}"]) + s[f"shift_{stage}"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(enc, ln(text) * (1 + s[f"text_scale_{stage}"]) + s[f"text_shift_{stage}"],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gate, s[f"gate_{stage}"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(enc_gate, s[f"text_gate_{stage}"], rtol=1e-6, atol=1e-6)


# ---- found by mutation testing (bench/MUTANTS.md): paths and flags no test above reached ----------------------------

def test_max_shard_size_as_transformers_reads_it():
    """--max-shard-size means what Hugging Face's max_shard_size means (decimal units), checked against transformers'
    own parser; both refuse binary units and other text."""
    from transformers.utils.hub import convert_file_size_to_int
    for text in ("5GB", "500MB", "20KB", "7KB", "3MB", "1GB"):
        assert convert.parse_size(text) == convert_file_size_to_int(text), text
    assert convert.parse_size("1.5gb") == 1.5e9 and convert.parse_size("100B") == 100
    with pytest.raises(convert.ConvertError, match="--max-shard-size '5GiB'"):
        convert.parse_size("5GiB")


@pytest.mark.parametrize("argv,message", [
    ([], "required: command"),
    (["sat2hf", "--transformer", "t.pt", "--out", "o"], "required: --variant"),
    (["sat2hf", "--transformer", "t.pt", "--variant", "cogvideox-7b", "--out", "o"], "invalid choice: 'cogvideox-7b'"),
    (["sat2hf", "--variant", "cogvideox-2b", "--out", "o"], "sat2hf needs --transformer and/or --vae"),
    (["sat2hf", "--vae", "v.pt", "--variant", "cogvideox-2b"], "required: --out"),
    (["hf2sat", "--out", "o"], "required: --snapshot"),
    (["lora", "--out", "o"], "required: --lora"),
    (["lora", "--lora", "l.pt", "--out", "o", "--dtype", "fp8"], "invalid choice: 'fp8'"),
])
def test_command_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        convert.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--transformer", "--vae", "--snapshot", "--lora"])
def test_missing_input_is_refused_before_anything_is_written(flag, tmp_path, fails):
    command = {"--snapshot": ["hf2sat"], "--lora": ["lora"]}.get(flag, ["sat2hf", "--variant", "cogvideox-2b"])
    msg = fails(command + [flag, str(tmp_path / "nothing.pt"), "--out", str(tmp_path / "o")])
    assert f"{flag} {tmp_path / 'nothing.pt'}: file or folder not found" in msg
    assert not (tmp_path / "o").exists()


def test_sat_save_folder_naming_a_missing_iteration(tmp_path, fails):
    (tmp_path / "save").mkdir()
    (tmp_path / "save/latest").write_text("1000\n")
    msg = fails(["lora", "--lora", str(tmp_path / "save"), "--out", str(tmp_path / "o")])
    assert f"checkpoint file not found: {tmp_path / 'save/1000/mp_rank_00_model_states.pt'}" in msg


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")  # the weights-only loader's note on this file
def test_unreadable_pickle_and_empty_state_dict(tmp_path, fails):
    import pickle
    with open(tmp_path / "set.pt", "wb") as f:  # protocol 4 with a set: the weights-only loader has no opcode for it
        pickle.dump({"module": {"x": torch.zeros(1)}, "seen": {1, 2}}, f, protocol=4)
    msg = fails(["lora", "--lora", str(tmp_path / "set.pt"), "--out", str(tmp_path / "o")])
    assert "needs code execution to unpickle (a non-tensor object)" in msg
    torch.save({"module": {}}, tmp_path / "empty.pt")
    assert "holds no state dict" in fails(["lora", "--lora", str(tmp_path / "empty.pt"), "--out", str(tmp_path / "o")])


def sat_lora_file(path, layers=2, rank=4, D=32, drop=(), ranks=None):
    """A SAT LoRA save (lora2.LoraMixin keys of spec 2) with the listed factors left out."""
    sd = {}
    for i in range(layers):
        for name, parts in (("query_key_value", 3), ("dense", 1)):
            for k in range(parts):
                r = (ranks or {}).get((i, name, k), rank)
                for m, shape in (("A", (r, D)), ("B", (D, r))):
                    key = f"{SAT}transformer.layers.{i}.attention.{name}.matrix_{m}.{k}"
                    if key not in drop:
                        sd[key] = torch.randn(shape)
    torch.save({"module": sd}, path)
    return sd


def test_sat_lora_export_defaults_and_dtype(tmp_path):
    """Without --alpha the export records SAT's lora_alpha 1 (spec 2: every official SAT LoRA config), so diffusers
    applies alpha/r = 1/r; --dtype casts the factors, which are kept otherwise."""
    sd = sat_lora_file(tmp_path / "lora.pt", rank=4)
    assert convert.main(["lora", "--lora", str(tmp_path / "lora.pt"), "--out", str(tmp_path / "a")]) == 0
    lora, meta = CogVideoXPipeline.lora_state_dict(str(tmp_path / "a"), return_lora_metadata=True)
    assert meta["transformer.lora_alpha"] / meta["transformer.r"] == 1 / 4
    key = SAT + "transformer.layers.1.attention.query_key_value.matrix_B.2"
    assert lora["transformer.transformer_blocks.1.attn1.to_v.lora_B.weight"].dtype == torch.float32
    assert torch.equal(lora["transformer.transformer_blocks.1.attn1.to_v.lora_B.weight"], sd[key])
    assert convert.main(["lora", "--lora", str(tmp_path / "lora.pt"), "--out", str(tmp_path / "b"),
                         "--dtype", "bf16"]) == 0
    lora = CogVideoXPipeline.lora_state_dict(str(tmp_path / "b"))
    assert all(t.dtype == torch.bfloat16 for t in lora.values())
    assert torch.equal(lora["transformer.transformer_blocks.1.attn1.to_v.lora_B.weight"], sd[key].to(torch.bfloat16))


@pytest.mark.parametrize("case,message", [
    ("missing B", "LoRA factor 'transformer.transformer_blocks.1.attn1.to_k.lora_B.weight' is missing"),
    ("missing A", "LoRA factor 'transformer.transformer_blocks.0.attn1.to_out.0.lora_A.weight' is missing"),
    ("two ranks", "LoRA factors have several ranks [4, 8]; expected one"),
    ("no factors", "no SAT LoRA factors"),
    ("fourth part", "unexpected LoRA factor"),
])
def test_broken_sat_lora_is_refused(case, message, tmp_path, fails):
    pre = SAT + "transformer.layers."
    if case == "missing B":
        sat_lora_file(tmp_path / "l.pt", drop={pre + "1.attention.query_key_value.matrix_B.1"})
    elif case == "missing A":
        sat_lora_file(tmp_path / "l.pt", drop={pre + "0.attention.dense.matrix_A.0"})
    elif case == "two ranks":
        sat_lora_file(tmp_path / "l.pt", ranks={(1, "dense", 0): 8})
    elif case == "no factors":
        torch.save({"module": {pre + "0.attention.dense.weight": torch.zeros(2, 2)}}, tmp_path / "l.pt")
    else:
        sd = sat_lora_file(tmp_path / "l.pt")
        sd[pre + "0.attention.dense.matrix_A.1"] = torch.zeros(4, 32)  # dense has one part only
        torch.save({"module": sd}, tmp_path / "l.pt")
    assert message in fails(["lora", "--lora", str(tmp_path / "l.pt"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o" / "pytorch_lora_weights.safetensors").exists()


def test_key_order_and_containers_do_not_matter(tmp_path, tiny_presets):
    """Keys SAT saves that are skipped (the T5 and VAE copies, the recomputed position table, VAE loss weights) may
    come first in the file; a checkpoint under 'model' (as some trainers save) reads like one under 'module'."""
    config, sd = official_transformer("cogvideox-2b", tmp_path / "orig" / "transformer")
    sat = convert.hf_to_sat(sd)
    first = {"conditioner.embedders.0.transformer.shared.weight": torch.randn(4, 4),
             SAT + "mixins.pos_embed.pos_embedding": torch.randn(1, 6 + 48, 32)}
    torch.save({"model": {**first, **sat}}, tmp_path / "sat.pt")
    _, vsd = official_vae()
    torch.save({"state_dict": {"loss.logvar": torch.zeros(()), **convert.vae_to_hf(vsd, reverse=True)}},
               tmp_path / "vae.pt")
    assert convert.main(["sat2hf", "--transformer", str(tmp_path / "sat.pt"), "--vae", str(tmp_path / "vae.pt"),
                         "--variant", "cogvideox-2b", "--out", str(tmp_path / "conv")]) == 0
    assert_identical(dict(model.load_transformer(str(tmp_path / "conv")).state_dict()), sd)
    assert_identical(vae.load_vae(str(tmp_path / "conv")).state_dict(), vsd)


def test_written_configs_and_shards_are_what_diffusers_writes(tmp_path, tiny_presets):
    """config.json as save_pretrained writes it (_class_name, _diffusers_version) for both components; the VAE is
    sharded by --max-shard-size too, and diffusers loads it back; the old output is replaced without a trace."""
    config, sd = official_transformer("cogvideox-5b", tmp_path / "orig" / "transformer")
    _, vsd = official_vae(tmp_path / "orig" / "vae")
    sat_file(sd, tmp_path / "sat.pt", "cogvideox-5b")
    torch.save({"state_dict": convert.vae_to_hf(vsd, reverse=True)}, tmp_path / "vae.pt")
    argv = ["sat2hf", "--transformer", str(tmp_path / "sat.pt"), "--vae", str(tmp_path / "vae.pt"), "--variant",
            "cogvideox-5b", "--out", str(tmp_path / "conv"), "--max-shard-size", "50KB"]
    for _ in range(2):  # the second run replaces the first output (and leaves nothing in the current folder)
        assert convert.main(argv) == 0
    assert sorted(os.listdir(tmp_path / "conv")) == [".cogvideox-mini.json", "transformer", "vae"]
    for name, cls in (("transformer", CogVideoXTransformer3DModel), ("vae", AutoencoderKLCogVideoX)):
        ours = json.loads((tmp_path / "conv" / name / "config.json").read_text())
        theirs = json.loads((tmp_path / "orig" / name / "config.json").read_text())
        assert ours["_class_name"] == theirs["_class_name"] == cls.__name__
        assert "_diffusers_version" in ours
        assert (tmp_path / "conv" / name / "diffusion_pytorch_model.safetensors.index.json").exists(), name
    back = AutoencoderKLCogVideoX.from_pretrained(str(tmp_path / "conv" / "vae"))
    assert_identical(dict(back.state_dict()), vsd)


def test_hf2sat_dtype_and_partial_snapshots(tmp_path, fails):
    _, sd = official_transformer("cogvideox-2b", tmp_path / "t_only" / "transformer")
    _, vsd = official_vae(tmp_path / "v_only" / "vae")
    assert convert.main(["hf2sat", "--snapshot", str(tmp_path / "t_only"), "--out", str(tmp_path / "a"),
                         "--dtype", "fp16"]) == 0
    raw = torch.load(tmp_path / "a/transformer/1/mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert_identical(raw, {k: t.half() for k, t in convert.hf_to_sat(sd).items()})
    assert not (tmp_path / "a" / "vae").exists()
    assert convert.main(["hf2sat", "--snapshot", str(tmp_path / "v_only"), "--out", str(tmp_path / "b")]) == 0
    assert_identical(torch.load(tmp_path / "b/vae/3d-vae.pt", weights_only=True)["state_dict"],
                     convert.vae_to_hf(vsd, reverse=True))
    assert not (tmp_path / "b" / "transformer").exists()
    (tmp_path / "empty").mkdir()
    assert "has neither transformer/ nor vae/" in fails(["hf2sat", "--snapshot", str(tmp_path / "empty"),
                                                        "--out", str(tmp_path / "c")])


def test_errors_name_the_input(tmp_path, tiny_presets, fails, capsys):
    """A bad component is named in the message: the SAT file, the SAT VAE file, the official folder; --allow-missing
    also covers the VAE."""
    _, sd = official_transformer("cogvideox-5b")
    sat = convert.hf_to_sat(sd)
    del sat[SAT + "time_embed.2.bias"]
    torch.save({"module": sat}, tmp_path / "t.pt")
    msg = fails(["sat2hf", "--transformer", str(tmp_path / "t.pt"), "--variant", "cogvideox-5b",
                 "--out", str(tmp_path / "o")])
    assert msg.startswith(f"error: {tmp_path / 't.pt'}: 1 missing keys ['time_embedding.linear_2.bias']")
    _, vsd = official_vae(tmp_path / "snap" / "vae")
    vs = convert.vae_to_hf(vsd, reverse=True)
    del vs["encoder.conv_in.conv.bias"]
    torch.save({"state_dict": vs}, tmp_path / "v.pt")
    argv = ["sat2hf", "--vae", str(tmp_path / "v.pt"), "--variant", "cogvideox-5b", "--out", str(tmp_path / "o")]
    msg = fails(argv)
    assert msg.startswith(f"error: {tmp_path / 'v.pt'}: 1 missing keys ['encoder.conv_in.conv.bias']")
    assert convert.main(argv + ["--allow-missing"]) == 0
    assert capsys.readouterr().err.startswith(f"warning: {tmp_path / 'v.pt'}: 1 missing keys")
    assert len(convert.read_tensors(convert.weight_files(str(tmp_path / "o/vae"), "diffusion_pytorch_model"))) \
        == len(vsd) - 1
    from safetensors.torch import save_file
    folder = tmp_path / "snap" / "vae"
    save_file({k: v for k, v in vsd.items() if k != "decoder.conv_out.conv.bias"},
              folder / "diffusion_pytorch_model.safetensors")
    msg = fails(["hf2sat", "--snapshot", str(tmp_path / "snap"), "--out", str(tmp_path / "s")])
    assert msg.startswith(f"error: {folder}: 1 missing keys ['decoder.conv_out.conv.bias']")


def test_variant_signature_tells_the_variants_apart():
    """The facts of spec 1.3/1.5 that --variant is checked on: layers, learned positions (5b-I2V only), ofs (1.5-I2V
    only), read from each tiny stand-in."""
    sig = {v: convert.signature(convert.expected_shapes("transformer", {**TINY, **extra}))
           for v, extra in FAMILIES.items()}
    assert all(s["layers"] == TINY["num_layers"] and s["hidden size"] == 32 for s in sig.values())
    assert [v for v, s in sig.items() if s["learned positions"]] == ["cogvideox-5b-i2v"]
    assert [v for v, s in sig.items() if s["ofs embedding"]] == ["cogvideox1.5-5b-i2v"]
    deeper = convert.signature(convert.expected_shapes("transformer", {**TINY, "num_layers": 3}))
    assert deeper["layers"] == 3 and deeper != sig["cogvideox-2b"]


# ---- re-runs ------------------------------------------------------------------------------------------------

def files_below(folder):
    return {os.path.relpath(os.path.join(b, f), folder): open(os.path.join(b, f), "rb").read()
            for b, _, fs in os.walk(folder) for f in fs}


def test_rerun_refuses_a_user_file_inside_a_component_and_keeps_one_beside(tmp_path, tiny_presets, fails, capsys):
    """hf2sat / sat2hf / lora write their components (transformer/, vae/, the LoRA file) into --out and replace them
    on a re-run: a file of the user's at any depth inside one is refused before anything is read or written, and
    the folder is left byte for byte; a user's file beside the components is left alone. Each run says what it
    wrote; every file gets the umask's permissions (safetensors creates its files 0600)."""
    official_transformer("cogvideox-2b", tmp_path / "snap" / "transformer")
    official_vae(tmp_path / "snap" / "vae")
    hf2sat = ["hf2sat", "--snapshot", str(tmp_path / "snap"), "--out", str(tmp_path / "sat")]
    sat2hf = ["sat2hf", "--transformer", str(tmp_path / "sat/transformer"),
              "--vae", str(tmp_path / "sat/vae/3d-vae.pt"), "--variant", "cogvideox-2b", "--out", str(tmp_path / "back")]
    old = os.umask(0o022)
    try:
        for argv, out in ((hf2sat, tmp_path / "sat"), (sat2hf, tmp_path / "back")):
            assert convert.main(argv) == 0
            written = capsys.readouterr().out
            for nested, named in (("transformer/mine.txt", "transformer/mine.txt"), ("vae/mine.txt", "vae/mine.txt"),
                                  ("transformer/sub/mine.txt", "transformer/sub")):  # a new folder is named itself
                (out / nested).parent.mkdir(exist_ok=True)
                (out / nested).write_text("the user's\n")
                before = files_below(out)
                assert repr(named) in fails(argv)
                assert files_below(out) == before
                (out / nested).unlink()
                if named.endswith("sub"):
                    (out / named).rmdir()
            (out / "README.txt").write_text("the user's, beside the components\n")
            assert convert.main(argv) == 0
            assert (out / "README.txt").read_text() == "the user's, beside the components\n"
            assert written.startswith("wrote ") and all(str(out / p) in written for p in files_below(out)
                                                        if not p.startswith(".") and p != "README.txt")
            for base, dirs, fs in os.walk(out):
                for name in dirs + fs:
                    assert os.stat(os.path.join(base, name)).st_mode & 0o777 == (0o755 if name in dirs else 0o644)
            capsys.readouterr()
    finally:
        os.umask(old)
