"""lora.py and train_lora.py on a tiny random 2b snapshot and four tiny videos made here.

Parity: a LoRA file we write, loaded by the peer (`CogVideoXPipeline.load_lora_weights`, peft), gives the frames our
`generate` gives with that LoRA, within 1e-4 max abs in [0, 1] (the issue's bound); the transformer outputs agree
within 1e-5 relative (fp32 CPU). Training: 30 steps lower a fixed evaluation loss, resuming is bitwise exact, and
`torchrun --nproc_per_node 2` (gloo) matches one process with the same global batch."""
import json
import os
import shutil
import subprocess
import sys

import imageio
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import cli
import generate as gen
import train_lora
from lora import TARGETS, LoRALinear, add_lora, load_lora, lora_state_dict, read_lora, save_lora
from media import resize, to_uint8
from model import load_transformer
from pipeline import read_model_info
from tiny import MAX_TEXT, make_snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a red square moving right"
CAPTIONS = ["a red square moving right", "a green square moving down", "a blue square moving left",
            "a yellow square moving up"]
RANK, ALPHA = 4, 2.0  # alpha != rank: the recorded alpha (scale 0.5) must reach the peer


@pytest.fixture(autouse=True)
def _one_thread():
    # the ops here are tiny: one thread avoids OpenMP spin-waits on a busy 2-core machine (measured 100x faster)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_videos(folder, frames=20, h=48, w=64):
    """Four clips of a coloured square moving in four directions; 48x64 so the crop to 32x32 is exercised."""
    os.makedirs(folder, exist_ok=True)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for i, caption in enumerate(CAPTIONS):
        arr = np.zeros((frames, h, w, 3), np.uint8)
        for f in range(frames):
            x, y = [(2 * f, 10), (20, f), (50 - 2 * f, 20), (30, 30 - f)][i]
            arr[f, y:y + 12, x:x + 12] = colours[i]
        imageio.mimwrite(os.path.join(folder, f"clip{i}.mp4"), list(arr), fps=8, format="FFMPEG", macro_block_size=16)
        with open(os.path.join(folder, f"clip{i}.txt"), "w") as f:
            f.write(caption)
    return folder


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    return make_snapshot(str(tmp_path_factory.mktemp("snap")), "2b")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_videos(str(tmp_path_factory.mktemp("data")))


def train_args(snap, data, out, *extra):
    return ["--model", snap, "--data", data, "--output", str(out), "--cache-dir", os.path.join(os.path.dirname(data),
            "cache"), "--rank", str(RANK), "--alpha", str(ALPHA), "--lr", "3e-2", "--warmup", "3", "--batch-size", "2",
            "--no-gradient-checkpointing", *extra]


def lora_gap(a, b):
    """(largest difference between two read_lora() weight sets, largest weight of the first)."""
    err = max((a[k][i] - b[k][i]).abs().max().item() for k in a for i in (0, 1))
    return err, max(a[k][i].abs().max().item() for k in a for i in (0, 1))


@pytest.fixture(scope="module")
def trained(snap, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train_lora.main(train_args(snap, data, out, "--steps", "30", "--checkpoint-every", "15",
                                      "--validation-prompt", PROMPT, "--validate-every", "15")) == 0
    return str(out)


# ---------------------------------------------------------------- lora.py


def test_lora_linear_forward_and_merge():
    base = torch.nn.Linear(12, 10)
    layer = LoRALinear(base, 3, scale=0.5)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 12)
    want = base(x) + 0.5 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)
    merged = layer.merged()
    assert isinstance(merged, torch.nn.Linear)
    torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-6)


def random_lora_file(snap, folder, rank, alpha=None, seed=0):
    """A LoRA with random A and B for every projection; alpha None: no metadata, as the official trainers write."""
    model = load_transformer(snap)
    torch.manual_seed(seed)
    add_lora(model, rank, alpha or rank)
    for n, p in model.named_parameters():
        if ".lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "pytorch_lora_weights.safetensors")
    if alpha is None:
        save_file(lora_state_dict(model), path, metadata={"format": "pt"})
    else:
        save_lora(path, lora_state_dict(model), rank, alpha)
    return folder


def peer_transformer_output(snap, lora_folder, scale, inputs):
    from diffusers import CogVideoXPipeline
    from diffusers.utils import logging
    logging.set_verbosity_error()
    pipe = CogVideoXPipeline.from_pretrained(snap)
    pipe.load_lora_weights(lora_folder, adapter_name="x")
    pipe.set_adapters(["x"], [scale])
    x, text, t = inputs
    with torch.no_grad():
        return pipe.transformer(hidden_states=x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]


@pytest.mark.parametrize("alpha,scale", [(3.0, 1.0), (None, 0.5)],
                         ids=["ours-with-metadata", "no-metadata-thudm-scale-0.5"])
def test_transformer_with_lora_matches_peer(snap, tmp_path, alpha, scale):
    folder = random_lora_file(snap, str(tmp_path / "lora"), rank=6, alpha=alpha)
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 3, 4, 4, 4, generator=g), torch.randn(2, MAX_TEXT, 32, generator=g),
              torch.tensor([10, 700]))
    ref = peer_transformer_output(snap, folder, scale, inputs)
    base = load_transformer(snap)
    with torch.no_grad():
        plain = base(*inputs)
        for fuse in (True, False):
            model = load_transformer(snap)
            summary = load_lora(model, folder, scale, fuse=fuse)
            ours = model(*inputs)
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert (ref - plain).abs().max() > 1e-2  # the LoRA matters at this scale
    assert ("alpha 3.0 recorded" in summary) if alpha else ("no alpha recorded" in summary)


def test_fuse_folds_into_plain_linears_and_unfused_keeps_the_base_weights(snap, tmp_path):
    """Found by mutation testing (bench/MUTANTS.md): the default (what generate uses) folds the LoRA into plain
    nn.Linear layers, no wrapper left; fuse=False wraps each target in a LoRALinear whose base weight is exactly the
    loaded one and whose factors are frozen (inference must not make them trainable)."""
    folder = random_lora_file(snap, str(tmp_path / "lora"), rank=2, alpha=1.0)
    base = dict(load_transformer(snap).named_parameters())
    model = load_transformer(snap)
    fused = load_lora(model, folder)  # the default
    targets = [n for n, _ in model.named_modules() if any(n.endswith("." + t) for t in TARGETS)]
    assert targets and all(type(model.get_submodule(n)) is torch.nn.Linear for n in targets)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert any(not torch.equal(p, base[n]) for n, p in model.named_parameters())  # folded in
    unfused = load_transformer(snap)
    assert fused == load_lora(unfused, folder, fuse=False)
    wrapped = {n: m for n, m in unfused.named_modules() if isinstance(m, LoRALinear)}
    assert set(wrapped) == set(targets)
    for n, p in unfused.named_parameters():
        assert not p.requires_grad or ".lora_" not in n, n
        if ".lora_" not in n:
            assert torch.equal(p, base[n.replace(".base.", ".")]), n


def test_metadata_is_what_diffusers_reads(tmp_path):
    from diffusers.utils.state_dict_utils import _load_sft_state_dict_metadata
    path = str(tmp_path / "l.safetensors")
    save_lora(path, {"transformer.a.to_q.lora_A.weight": torch.zeros(2, 3),
                     "transformer.a.to_q.lora_B.weight": torch.zeros(5, 2)}, rank=2, alpha=1.0)
    meta = _load_sft_state_dict_metadata(path)
    assert meta["transformer.r"] == 2 and meta["transformer.lora_alpha"] == 1.0
    assert meta["transformer.target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]
    pairs, ours = read_lora(path)
    assert list(pairs) == ["a.to_q"] and ours["lora_alpha"] == 1.0


def refused(call, *names):
    """call() raises ValueError whose message names each of `names` (what is refused, or the fix)."""
    with pytest.raises(ValueError) as e:
        call()
    assert all(name in str(e.value) for name in names), (names, str(e.value))


def test_lora_for_another_model_is_refused(snap, tmp_path):
    """Each refusal names the file and the key or module it cannot take."""
    path = str(tmp_path / "l.safetensors")
    save_file({"transformer.transformer_blocks.7.attn1.to_q.lora_A.weight": torch.zeros(2, 32),
               "transformer.transformer_blocks.7.attn1.to_q.lora_B.weight": torch.zeros(32, 2)}, path)
    refused(lambda: load_lora(load_transformer(snap), path), path, "transformer_blocks.7.attn1.to_q")
    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora_down.weight": torch.zeros(2, 32)}, path)  # kohya
    refused(lambda: load_lora(load_transformer(snap), path), path, "lora_down.weight")
    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora.down.weight": torch.zeros(2, 32)}, path)  # no up
    refused(lambda: load_lora(load_transformer(snap), path), path, "transformer_blocks.0.attn1.to_q", "lora_B")


def test_older_layout_keys_are_renamed_as_diffusers_renames_them():
    """peft_key against the function diffusers' load_lora_adapter applies to files without lora_A keys."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from lora import peft_key
    keys = [f"transformer_blocks.{i}.attn1.{m}.{ab}.weight" for i in (0, 11) for m in ("to_q", "to_k", "to_v", "to_out.0")
            for ab in ("lora.down", "lora.up")]
    keys += [f"transformer_blocks.3.attn1.processor.{p}_lora.{d}.weight" for p in ("to_q", "to_k", "to_v", "to_out")
             for d in ("down", "up")]
    theirs = list(convert_unet_state_dict_to_peft(dict.fromkeys(keys)))
    assert [peft_key(k) for k in keys] == theirs
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in theirs)
    peft = "transformer_blocks.0.attn1.to_out.0.lora_B.weight"
    assert peft_key(peft) == peft


def frames_with_lora(snap, lora_folder):
    """9 frames of 32x32, 4 DDIM steps, seed 7: (the peer pipeline with load_lora_weights(lora_folder), ours without
    the LoRA, ours with load_lora, load_lora's summary)."""
    from diffusers import CogVideoXPipeline
    kw = dict(num_frames=9, height=32, width=32, num_inference_steps=4, guidance_scale=6.0)
    pipe = CogVideoXPipeline.from_pretrained(snap)
    pipe.load_lora_weights(lora_folder)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=PROMPT, negative_prompt="", generator=torch.Generator().manual_seed(7), output_type="pt",
               max_sequence_length=MAX_TEXT, **kw).frames
    ours = gen.load_pipeline(snap)
    plain = gen.generate(ours, PROMPT, seed=7, max_sequence_length=MAX_TEXT, progress=False, **kw)
    summary = load_lora(ours.transformer, lora_folder)
    with_lora = gen.generate(ours, PROMPT, seed=7, max_sequence_length=MAX_TEXT, progress=False, **kw)
    return ref, plain, with_lora, summary


def test_older_layout_file_gives_the_peers_frames(snap, tmp_path):
    """A LoRA in diffusers' older key layout, made by the peers: a random peft adapter on diffusers' transformer,
    get_peft_model_state_dict -> convert_state_dict_to_diffusers (keys .lora.down/.lora.up.weight) ->
    CogVideoXPipeline.save_lora_weights (no alpha metadata), as diffusers' older training scripts saved LoRAs. Loaded
    by the peer's load_lora_weights and by ours: the same frames (fp32 CPU, within 1e-5 of the frames' range)."""
    from diffusers import CogVideoXPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors import safe_open
    maker = CogVideoXPipeline.from_pretrained(snap)
    maker.transformer.add_adapter(LoraConfig(r=3, lora_alpha=3, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in maker.transformer.named_parameters():
            if ".lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(maker.transformer))
    folder = str(tmp_path / "old")
    CogVideoXPipeline.save_lora_weights(folder, transformer_lora_layers=layers)
    with safe_open(os.path.join(folder, "pytorch_lora_weights.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * 4 * 2 and all(k.endswith((".lora.down.weight", ".lora.up.weight")) for k in keys), keys

    ref, plain, with_lora, summary = frames_with_lora(snap, folder)
    err, change = (with_lora - ref).abs().max().item(), (with_lora - plain).abs().max().item()
    span = (ref.max() - ref.min()).item()
    print(f"older layout, ours vs peer: max abs {err:.2e} ({err / span:.2e} of the frames' range {span:.3f}); "
          f"the LoRA changes frames by up to {change:.3f}")
    assert err <= 1e-5 * span and change > 0.02
    assert "8 layers, rank 3, no alpha recorded" in summary, summary


# lora.py, found by mutation testing (bench/MUTANTS.md)


class Attn(torch.nn.Module):
    """The smallest module with LoRA targets: one attention's four projections, named as in the transformer."""
    def __init__(self, d=8):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(d, d) for _ in range(3))
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(d, d)])


def test_add_lora_checks_and_freezes():
    """rank >= 1 and alpha > 0 (peft's LoraConfig accepts rank 1 and any positive alpha); afterwards only A and B
    train, as after peft's add_adapter."""
    from peft import LoraConfig, inject_adapter_in_model
    for rank, alpha in ((0, 1.0), (2, 0.0), (2, -1.0)):
        refused(lambda: add_lora(Attn(), rank, alpha), f"rank={rank}", f"alpha={alpha}")
    refused(lambda: add_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), 2, 2.0), "to_q")
    ours, peer = Attn(), Attn()
    trainable = add_lora(ours, 1, 0.5)
    inject_adapter_in_model(LoraConfig(r=1, lora_alpha=0.5, target_modules=list(TARGETS)), peer)
    peer.requires_grad_(False)  # as diffusers' training script freezes the transformer, then adds the adapter
    for n, p in peer.named_parameters():
        p.requires_grad_(".lora_" in n)
    assert {id(p) for p in trainable} == {id(p) for p in ours.parameters() if p.requires_grad}
    assert sorted(n.replace(".default", "").replace(".base_layer", ".base") for n, p in peer.named_parameters()
                  if p.requires_grad) == sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert all(m.scale == 0.5 for m in ours.modules() if isinstance(m, LoRALinear))


def test_bf16_base_keeps_its_dtype_and_fp32_factors():
    """A bf16 base Linear with fp32 A and B (training a LoRA on a bf16 model): the input goes to A and B in fp32 and the
    update comes back in bf16, as peft's lora.Linear does (its output has the base layer's dtype)."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig, inject_adapter_in_model
    base = torch.nn.Linear(8, 6).to(torch.bfloat16)
    layer = LoRALinear(base, 2, scale=0.5)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 8).to(torch.bfloat16)
    y = layer(x)
    peer = torch.nn.Module()
    peer.to_q = copy_linear = torch.nn.Linear(8, 6).to(torch.bfloat16)
    copy_linear.load_state_dict(base.state_dict())
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=1, target_modules=["to_q"]), peer)
    cast_training_params(peer, dtype=torch.float32)  # as diffusers' LoRA training scripts keep the adapter
    with torch.no_grad():
        peer.to_q.lora_A["default"].weight.copy_(layer.lora_A.weight)
        peer.to_q.lora_B["default"].weight.copy_(layer.lora_B.weight)
    ref = peer.to_q(x)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)  # peft adds in fp32 before its cast, we after: bf16 ulps


def test_training_scale_is_the_scale_diffusers_loads(snap, tmp_path):
    """The model as add_lora trains it (scale alpha/r, LoRALinear wrappers), saved with save_lora, then loaded by
    diffusers from the file alone: the same transformer output. The metadata must say plain alpha/r (not rsLoRA)."""
    model = load_transformer(snap)
    torch.manual_seed(5)
    add_lora(model, 4, 3.0)
    for n, p in model.named_parameters():
        if ".lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    folder = str(tmp_path / "lora")
    os.makedirs(folder)
    save_lora(os.path.join(folder, "pytorch_lora_weights.safetensors"), lora_state_dict(model), 4, 3.0)
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, 3, 4, 4, 4, generator=g), torch.randn(1, MAX_TEXT, 32, generator=g), torch.tensor([400]))
    with torch.no_grad():
        ours = model(*inputs)
    torch.testing.assert_close(ours, peer_transformer_output(snap, folder, 1.0, inputs), rtol=1e-5, atol=1e-5)


def test_metadata_scales_as_peft_builds_them(tmp_path):
    """alpha/r from the metadata as peft's LoraConfig turns it into a layer scale: rsLoRA alpha/sqrt(r), a missing
    lora_alpha peft's default; DoRA and per-module patterns are refused, and so is an r the factors contradict."""
    import json as _json
    from peft import LoraConfig, inject_adapter_in_model
    from lora import lora_scales
    pairs = {"blocks.0.to_q": (torch.zeros(4, 8), torch.zeros(8, 4))}
    for meta in ({"r": 4, "lora_alpha": 2.0, "use_rslora": True}, {"r": 4}, {"r": 4, "lora_alpha": 6}):
        peer = torch.nn.Module()
        peer.to_q = torch.nn.Linear(8, 8)
        inject_adapter_in_model(LoraConfig(target_modules=["to_q"], **meta), peer)
        assert lora_scales(pairs, meta, "f") == {"blocks.0.to_q": peer.to_q.scaling["default"]}, meta
    for meta, names in (({"r": 4, "use_dora": True}, ["DoRA"]), ({"r": 4, "rank_pattern": {"to_q": 8}}, ["rank_pattern"]),
                        ({"r": 4, "alpha_pattern": {"to_q": 8}}, ["alpha_pattern"]), ({"r": 8}, ["r=8", "4"])):
        refused(lambda: lora_scales(pairs, meta, "f"), "f", *names)
    path = str(tmp_path / "l.safetensors")  # keys of other components in the metadata are not ours
    save_file({"transformer.blocks.0.to_q.lora_A.weight": torch.zeros(4, 8),
               "transformer.blocks.0.to_q.lora_B.weight": torch.zeros(8, 4)}, path,
              metadata={"lora_adapter_metadata": _json.dumps({"text_encoder.r": 16})})
    assert read_lora(path)[1] is None


def test_dora_magnitudes_are_dropped_as_diffusers_drops_them(tmp_path):
    """A file with DoRA's `dora_scale` tensors but no metadata: diffusers' lora_state_dict drops them and keeps the
    pairs; so does read_lora (the magnitude key sorts before the pairs it belongs to)."""
    from diffusers import CogVideoXPipeline
    path = str(tmp_path / "pytorch_lora_weights.safetensors")
    pre = "transformer.transformer_blocks.0.attn1."
    save_file({pre + "to_q.dora_scale": torch.ones(1, 32), pre + "to_q.lora_A.weight": torch.randn(2, 32),
               pre + "to_q.lora_B.weight": torch.randn(32, 2), pre + "to_k.lora_A.weight": torch.randn(2, 32),
               pre + "to_k.lora_B.weight": torch.randn(32, 2)}, path)
    theirs = CogVideoXPipeline.lora_state_dict(str(tmp_path))
    pairs, meta = read_lora(path)
    assert meta is None
    assert sorted(f"transformer.{m}.lora_{ab}.weight" for m in pairs for ab in "AB") == sorted(theirs)


def test_resume_with_other_lora_keys_names_one_that_differs():
    from lora import set_lora_state
    model = Attn()
    add_lora(model, 2, 2.0)
    state = lora_state_dict(model)
    state["transformer.to_x.lora_A.weight"] = torch.zeros(2, 8)
    refused(lambda: set_lora_state(model, state), "'to_x.lora_A.weight'")
    del state["transformer.to_x.lora_A.weight"], state["transformer.to_v.lora_B.weight"]
    refused(lambda: set_lora_state(model, state), "'to_v.lora_B.weight'")


# ---------------------------------------------------------------- train_lora.py


def eval_loss(snap, data, lora_folder=None):
    """The training loss on a fixed set: every clip at 4 fixed timesteps and noises (positions outside training's)."""
    model = load_transformer(snap)
    if lora_folder:
        load_lora(model, lora_folder)
    cache = os.path.join(os.path.dirname(data), "cache")
    settings = train_lora.cache_settings(snap, 9, 32, 32, MAX_TEXT, torch.float32)
    good, problems = train_lora.validate(*train_lora.find_samples(data), cache, settings, 9)
    assert not problems and len(good) == 4
    info = read_model_info(snap)
    scheduler, vae = info.scheduler, info.vae
    positions = [(12345, p) for p in range(16)]  # another seed than training's
    x0, text, t, noise, _ = train_lora.make_batch(good * 4, positions, cache, vae.scaling_factor, 1000, None)
    with torch.no_grad():
        return train_lora.diffusion_loss(model, scheduler, x0, text, t, noise, torch.float32).item()


def test_training_lowers_the_loss_and_writes_its_files(snap, data, trained):
    before, after = eval_loss(snap, data), eval_loss(snap, data, trained)
    print(f"eval loss before {before:.4f}, after 30 steps {after:.4f}")
    assert after < 0.9 * before, (before, after)
    rows = [json.loads(line) for line in open(os.path.join(trained, "loss.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, 31)) and all(np.isfinite(r["loss"]) for r in rows)
    assert sorted(os.listdir(trained)) == [".cogvideox-mini.json", "checkpoint-000015", "checkpoint-000030",
                                           "loss.jsonl", "pytorch_lora_weights.safetensors", "validation"]
    assert sorted(os.listdir(os.path.join(trained, "validation"))) == [
        "step-000015.mp4", "step-000015.png", "step-000030.mp4", "step-000030.png"]
    assert imageio.v3.imread(os.path.join(trained, "validation", "step-000030.mp4"), index=None).shape == (9, 32, 32, 3)


def test_trained_lora_changes_generate_and_matches_peer(snap, trained, tmp_path):
    ref, plain, with_lora, _ = frames_with_lora(snap, trained)
    err, change = (with_lora - ref).abs().max().item(), (with_lora - plain).abs().max().item()
    print(f"ours vs peer with LoRA: max abs {err:.2e}; LoRA changes frames by up to {change:.3f}")
    assert err <= 1e-4 and change > 0.02
    # generate.py --lora: the same frames through the command line (PNG folder, uint8 like to_uint8)
    rc = gen.main(["--model", snap, "--prompt", PROMPT, "--num-frames", "9", "--height", "32", "--width", "32",
                   "--steps", "4", "--seed", "7", "--lora", trained, "--output", str(tmp_path / "frames")])
    assert rc == 0
    png = np.stack([imageio.v3.imread(tmp_path / "frames" / f"{i:04d}.png") for i in range(9)])
    assert np.array_equal(png, to_uint8(with_lora[0]))


def test_resume_is_exact(snap, data, trained, tmp_path, capsys):
    """Continue the run from its step-15 checkpoint in a copy of its folder: same weights, same loss log."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns("checkpoint-000030", "validation", "*.safetensors"))
    shutil.copytree(os.path.join(trained, "checkpoint-000015"), copy / "checkpoint-000015", dirs_exist_ok=True)
    assert train_lora.main(train_args(snap, data, copy, "--steps", "30", "--checkpoint-every", "15",
                                      "--resume", "latest")) == 0
    assert str(copy / "checkpoint-000015") in capsys.readouterr().out  # the run says where it resumed
    a, _ = read_lora(trained)
    b, _ = read_lora(str(copy))
    assert all(torch.equal(a[k][i], b[k][i]) for k in a for i in (0, 1))
    assert open(copy / "loss.jsonl").read() == open(os.path.join(trained, "loss.jsonl")).read()
    # a different setting is refused, naming it
    assert train_lora.main(train_args(snap, data, copy, "--steps", "30", "--resume", "latest", "--seed", "1")) == 2


def test_torchrun_two_processes_match_one(snap, data, tmp_path):
    """Global batch 2: one process with 2 samples vs torchrun with 2 gloo processes of 1 sample each, 4 steps."""
    steps = ["--steps", "4", "--checkpoint-every", "4", "--grad-accum", "2"]
    assert train_lora.main(train_args(snap, data, tmp_path / "one", *steps)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "train_lora.py"), *train_args(snap, data, tmp_path / "two", *steps),
                        "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, _ = read_lora(str(tmp_path / "one"))
    b, _ = read_lora(str(tmp_path / "two"))
    err, scale = lora_gap(a, b)
    print(f"torchrun x2 vs one process: max abs diff {err:.2e} (weights up to {scale:.2f})")
    assert err <= 1e-5 * max(1.0, scale)
    la = [json.loads(x)["loss"] for x in open(tmp_path / "one" / "loss.jsonl")]
    lb = [json.loads(x)["loss"] for x in open(tmp_path / "two" / "loss.jsonl")]
    np.testing.assert_allclose(la, lb, rtol=1e-5)


def test_cache_is_keyed_on_content_and_settings(snap, data, tmp_path):
    """A renamed copy of a clip hits the cache; a changed clip, caption or size gets new keys."""
    settings = train_lora.cache_settings(snap, 9, 32, 32, MAX_TEXT, torch.float32)
    s = train_lora.Sample("clip0.mp4", os.path.join(data, "clip0.mp4"), CAPTIONS[0])
    keys = train_lora.cache_keys(s, train_lora.sha256_file(s.video), settings)
    copy = tmp_path / "renamed.mp4"
    shutil.copy(s.video, copy)
    assert train_lora.cache_keys(s, train_lora.sha256_file(str(copy)), settings) == keys
    with open(copy, "ab") as f:
        f.write(b"\0")
    assert train_lora.cache_keys(s, train_lora.sha256_file(str(copy)), settings)[0] != keys[0]
    other = train_lora.cache_settings(snap, 9, 32, 48, MAX_TEXT, torch.float32)
    assert train_lora.cache_keys(s, train_lora.sha256_file(s.video), other)[0] != keys[0]
    s.caption = "another caption"
    assert train_lora.cache_keys(s, train_lora.sha256_file(s.video), settings)[1] != keys[1]
    s.caption = CAPTIONS[0]
    # the text key follows the text length and dtype, and each key its own component's files (a config edited in
    # place, same length, counts): a new VAE re-encodes the clips only, a new T5 or tokenizer the captions only
    video_hash = train_lora.sha256_file(s.video)
    for changed, which in [(train_lora.cache_settings(snap, 9, 32, 32, MAX_TEXT + 1, torch.float32), (1,)),
                           (train_lora.cache_settings(snap, 9, 32, 32, MAX_TEXT, torch.bfloat16), (0, 1))]:
        new = train_lora.cache_keys(s, video_hash, changed)
        assert [i for i in (0, 1) if new[i] != keys[i]] == list(which), which
    copy = tmp_path / "snap"
    shutil.copytree(snap, copy)
    for component, which in (("vae", 0), ("text_encoder", 1), ("tokenizer", 1)):
        config = copy / component / ("tokenizer_config.json" if component == "tokenizer" else "config.json")
        before = train_lora.cache_keys(s, video_hash, train_lora.cache_settings(str(copy), 9, 32, 32, MAX_TEXT,
                                                                                torch.float32))
        text = config.read_text()
        config.write_text(text.replace("{", "{ ", 1).replace(": ", ":", 1))  # same length, other bytes
        after = train_lora.cache_keys(s, video_hash, train_lora.cache_settings(str(copy), 9, 32, 32, MAX_TEXT,
                                                                               torch.float32))
        assert [i for i in (0, 1) if after[i] != before[i]] == [which], component


def test_frame_selection_is_an_even_stride():
    assert train_lora.frame_indices(20, 9) == [0, 2, 4, 6, 8, 10, 12, 14, 16]  # official range(0, N, N // F)[:F]
    assert train_lora.frame_indices(9, 9) == list(range(9))
    assert train_lora.frame_indices(100, 49) == list(range(0, 98, 2))


def test_bad_dataset_lists_every_problem(snap, data, tmp_path, capsys):
    """Official layout: one good clip, a missing file, an unreadable video, an empty caption, a too-short clip."""
    folder = tmp_path / "bad"
    (folder / "videos").mkdir(parents=True)
    shutil.copy(os.path.join(data, "clip0.mp4"), folder / "videos" / "good.mp4")
    shutil.copy(os.path.join(data, "clip1.mp4"), folder / "videos" / "quiet.mp4")
    (folder / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    imageio.mimwrite(folder / "videos" / "short.mp4", [np.zeros((48, 64, 3), np.uint8)] * 5, fps=8, format="FFMPEG",
                     macro_block_size=16)
    (folder / "videos.txt").write_text("videos/good.mp4\nvideos/missing.mp4\nvideos/broken.mp4\nvideos/quiet.mp4\n"
                                       "videos/short.mp4\n")
    (folder / "prompts.txt").write_text("a red square\na cat\na dog\n   \na black screen\n\n")
    rc = train_lora.main(train_args(snap, str(folder), tmp_path / "out", "--steps", "1"))
    err = capsys.readouterr().err
    assert rc == 2
    for name in ("videos/missing.mp4 (line 2)", "videos/broken.mp4 (line 3)", "videos/quiet.mp4 (line 4)",
                 "videos/short.mp4 (line 5)"):  # each problem named once, on a line of its own
        assert sum(name in line for line in err.splitlines()) == 1, (name, err)
    assert "good.mp4" not in err
    assert sum(line.startswith("error:") for line in err.splitlines()) == 1, err  # the report is the only error: no work after it
    assert not os.path.exists(tmp_path / "out")  # nothing written: no output folder, no cache


def test_bad_pairs_dataset_lists_every_problem(snap, data, tmp_path, capsys):
    """name.mp4 + name.txt layout: a video without caption, a caption without video, an empty caption, bad bytes."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    for name in ("good", "nocaption", "empty"):
        shutil.copy(os.path.join(data, "clip2.mp4"), folder / f"{name}.mp4")
    (folder / "good.txt").write_text("a blue square")
    (folder / "empty.txt").write_text("\n  \n")
    (folder / "orphan.txt").write_text("a caption without its video")
    (folder / "garbage.gif").write_bytes(b"GIF89a garbage")
    (folder / "garbage.txt").write_text("a broken gif")
    rc = train_lora.main(train_args(snap, str(folder), tmp_path / "out", "--steps", "1"))
    err = capsys.readouterr().err
    assert rc == 2
    for name in ("nocaption.mp4", "orphan.txt", "empty.mp4", "garbage.gif"):  # each problem on a line of its own
        assert sum(line.strip().startswith(name) for line in err.splitlines()) == 1, (name, err)


# ---------------------------------------------------------------- train_lora.py against the official recipe


def official_lora_steps(snap, data, seed, batch, lrs, rank=RANK, alpha=ALPHA):
    """The official recipe (diffusers examples/cogvideo/train_cogvideox_lora.py), recomputed here from the cache files
    and the peers: the peer transformer with a peft LoRA (lora_alpha/r scaling), scaled posterior latents, DDPM noise
    at the sampled timestep, x0-prediction via the velocity x̂0 = √ᾱ x_t − √(1−ᾱ) v̂, weights 1/(1 − ᾱ_t), mean per
    sample then over the batch; clipping at 1.0 and AdamW(0.9, 0.95, 1e-4) as THUDM's trainer. Only the data order
    (dataset_index), each sample's generator (sample_generator) and the LR of each step are taken from train_lora.
    -> ([(loss, grad_norm)] per step, {file key: weight} after the steps)."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from peft import LoraConfig
    from safetensors.torch import load_file
    cache = os.path.join(os.path.dirname(data), "cache")
    settings = train_lora.cache_settings(snap, 9, 32, 32, MAX_TEXT, torch.float32)
    good, problems = train_lora.validate(*train_lora.find_samples(data), cache, settings, 9)
    assert not problems and len(good) == 4
    sf = json.load(open(os.path.join(snap, "vae", "config.json")))["scaling_factor"]
    alphas_cumprod = CogVideoXDDIMScheduler.from_pretrained(snap, subfolder="scheduler").alphas_cumprod  # (1000,)

    net = CogVideoXTransformer3DModel.from_pretrained(snap, subfolder="transformer").train()
    net.requires_grad_(False)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    net.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True))
    # the start train_lora documents: torch.manual_seed(seed), then per projection A = nn.Linear(in, r)'s default
    # init and B = zero (an nn.Linear(r, out) drawn and zeroed), in module order
    torch.manual_seed(seed)
    lora = {}
    for name, m in net.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            a = torch.nn.Linear(m.base_layer.in_features, rank, bias=False)
            torch.nn.Linear(rank, m.base_layer.out_features, bias=False)
            with torch.no_grad():
                m.lora_A["default"].weight.copy_(a.weight)
                m.lora_B["default"].weight.zero_()
            assert m.scaling["default"] == alpha / rank
            lora[f"transformer.{name}.lora_A.weight"] = m.lora_A["default"].weight
            lora[f"transformer.{name}.lora_B.weight"] = m.lora_B["default"].weight
    params = list(lora.values())
    assert len(params) == 2 * 4 * 2 and all(p.requires_grad for p in params)
    opt = torch.optim.AdamW(params, lr=lrs[0], betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4)

    logs = []
    for step, lr in enumerate(lrs):
        x0, text, ts, eps = [], [], [], []
        for p in range(step * batch, (step + 1) * batch):
            _, lat_key, txt_key = good[train_lora.dataset_index(seed, p, len(good))]
            g = train_lora.sample_generator(seed, p)
            lat = load_file(os.path.join(cache, "latents", lat_key + ".safetensors"))   # (F, C, H, W) each
            mean, logvar = lat["mean"].float(), lat["logvar"].float()
            draw = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)  # latent_dist.sample()
            x0.append(draw * sf)                                                        # * vae scaling_factor
            text.append(load_file(os.path.join(cache, "text", txt_key + ".safetensors"))["embedding"])
            ts.append(torch.randint(0, 1000, (1,), generator=g))
            eps.append(torch.randn(draw.shape, generator=g))
        x0, text, t, eps = torch.stack(x0), torch.stack(text), torch.cat(ts), torch.stack(eps)
        a = alphas_cumprod[t].float().reshape(-1, 1, 1, 1, 1)  # the peer casts ᾱ to the latents' dtype
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps                                      # scheduler.add_noise
        v_hat = net(hidden_states=x_t, encoder_hidden_states=text, timestep=t, return_dict=False)[0]
        a64, x_t64 = a.double(), x_t.double()  # the loss in float64: no fp32 cancellation in x̂0 − x0 at small t
        x0_hat = a64.sqrt() * x_t64 - (1 - a64).sqrt() * v_hat.double()                # scheduler.get_velocity
        weights = 1 / (1 - a64)
        loss = torch.mean((weights * (x0_hat - x0.double()) ** 2).reshape(len(t), -1), dim=1).mean()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        logs.append((loss.item(), norm.item()))
    return logs, {k: v.detach().clone() for k, v in lora.items()}


def test_training_steps_match_the_official_recipe(snap, data, tmp_path):
    """Two optimizer steps of train_lora.py (batch 2, no warm-up: LR 3e-2 then 1.5e-2 on its cosine) give the losses,
    gradient norms and LoRA weights of the official recipe recomputed with the peers (official_lora_steps). Step 1's
    gradient norm is proportional to the LoRA scale; step 2 runs with B != 0, so the scale also enters the forward."""
    from safetensors.torch import load_file
    out = tmp_path / "run"
    assert train_lora.main(train_args(snap, data, out, "--steps", "2", "--warmup", "0", "--checkpoint-every", "1",
                                      "--seed", "42")) == 0
    rows = [json.loads(line) for line in open(out / "loss.jsonl")]
    assert [r["lr"] for r in rows] == [3e-2, 1.5e-2]
    logs, weights = official_lora_steps(snap, data, seed=42, batch=2, lrs=[3e-2, 1.5e-2])
    for r, (loss, norm) in zip(rows, logs):
        assert r["loss"] == pytest.approx(loss, rel=1e-5), f"step {r['step']}: loss {r['loss']}, official {loss}"
        assert r["grad_norm"] == pytest.approx(norm, rel=1e-5), \
            f"step {r['step']}: grad norm {r['grad_norm']}, official {norm}"
    ours = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert ours.keys() == weights.keys()
    for k, w in weights.items():
        torch.testing.assert_close(ours[k], w, rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert max(w.abs().max().item() for k, w in weights.items() if "lora_B" in k) > 1e-2  # B moved: a real step


@pytest.mark.parametrize("warmup,total", [(3, 10), (5, 30), (3, 4), (1, 7)])
def test_learning_rate_is_diffusers_cosine_with_warmup(warmup, total):
    """Found by mutation testing (bench/MUTANTS.md): the schedule of diffusers' get_cosine_schedule_with_warmup (what
    the official LoRA trainers use), except that the warm-up is taken one step ahead so that the first step does not
    run at lr 0 (diffusers' LambdaLR gives step 0 the factor 0): step s < warmup gets diffusers' factor of s + 1."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    factor = get_cosine_schedule_with_warmup(opt, warmup, total).lr_lambdas[0]
    for step in range(total + 1):
        want = 2e-4 * factor(step + 1 if step < warmup else step)
        assert train_lora.learning_rate(step, 2e-4, warmup, total) == pytest.approx(want, rel=1e-12, abs=1e-20), step


def test_make_batch_pads_odd_latent_counts_for_v15(tmp_path):
    """Found by mutation testing: with patch_size_t = 2 (CogVideoX 1.5) a clip of 3 latent frames trains on 4, the
    first repeated in front, as generation pads them (generate.pad_front, whose frames test_generate checks against
    the 1.5 pipeline); the sampled x0 is the posterior draw times the scaling factor, from the sample's own generator."""
    from vae import sample_posterior
    for sub in ("latents", "text"):
        (tmp_path / sub).mkdir()
    mean, logvar = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2) * 0.1 - 2
    save_file({"mean": mean, "logvar": logvar}, tmp_path / "latents" / "z.safetensors")
    save_file({"embedding": torch.randn(5, 8)}, tmp_path / "text" / "c.safetensors")
    for patch_size_t, frames in ((None, 3), (2, 4)):
        x0, text, t, noise, _ = train_lora.make_batch([(None, "z", "c")], [(7, 11)], str(tmp_path), 0.7, 1000,
                                                   patch_size_t)
        want = sample_posterior(mean, logvar, train_lora.sample_generator(7, 11)) * 0.7
        assert x0.shape == (1, frames, 4, 2, 2)
        assert torch.equal(x0[0, frames - 3:], want) and torch.equal(x0[0, 0], want[0])


def test_v15_batch_noise_has_the_shape_of_x0(tmp_path):
    """Found by mutation testing: make_batch drew the noise at the unpadded latent shape, so a 1.5 clip with an odd
    latent count (81 frames: 21) failed in diffusion_loss."""
    for sub in ("latents", "text"):
        (tmp_path / sub).mkdir()
    save_file({"mean": torch.zeros(3, 4, 2, 2), "logvar": torch.zeros(3, 4, 2, 2)}, tmp_path / "latents/z.safetensors")
    save_file({"embedding": torch.zeros(5, 8)}, tmp_path / "text" / "c.safetensors")
    x0, text, t, noise, _ = train_lora.make_batch([(None, "z", "c")], [(7, 11)], str(tmp_path), 0.7, 1000, 2)
    assert noise.shape == x0.shape


def test_caption_dropout_swaps_in_the_empty_caption_and_draws_nothing_else(tmp_path):
    """--caption-dropout: a dropped sample trains on the empty caption's embedding (what guidance's unconditional
    branch is); latents, timesteps and noise are the ones a run without it draws, and with 0 nothing changes."""
    for sub in ("latents", "text"):
        (tmp_path / sub).mkdir()
    save_file({"mean": torch.randn(3, 4, 2, 2), "logvar": torch.full((3, 4, 2, 2), -4.0)}, tmp_path / "latents/z.safetensors")
    own, empty = torch.randn(5, 8), torch.randn(5, 8)
    save_file({"embedding": own}, tmp_path / "text" / "c.safetensors")
    save_file({"embedding": empty}, tmp_path / "text" / "e.safetensors")
    items, positions = [(None, "z", "c")] * 64, [(7, p) for p in range(64)]
    batch = lambda p: train_lora.make_batch(items, positions, str(tmp_path), 0.7, 1000, None, caption_dropout=p,
                                            empty_key="e")
    plain, none, every, half = train_lora.make_batch(items, positions, str(tmp_path), 0.7, 1000, None), batch(0.0), \
        batch(1.0), batch(0.5)
    for b in (none, every, half):
        assert all(torch.equal(b[i], plain[i]) for i in (0, 2, 3))  # x0, t, noise
    assert torch.equal(none[1], plain[1]) and (plain[1] == own).all()
    assert (every[1] == empty).all()
    dropped = [torch.equal(x, empty) for x in half[1]]
    assert all(d or torch.equal(x, own) for d, x in zip(dropped, half[1])) and 16 <= sum(dropped) <= 48


def test_a_run_with_caption_dropout_caches_the_empty_caption(snap, data, tmp_path, capsys):
    """The empty caption is encoded once into the cache (listed as ours), the LoRA differs from a run without dropout,
    a resume with another --caption-dropout is refused naming it, and a value outside [0, 1] is refused by the
    parser."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    common = ["--model", snap, "--data", data, "--cache-dir", str(cache), "--rank", str(RANK), "--alpha", str(ALPHA),
              "--lr", "3e-2", "--warmup", "1", "--steps", "4", "--checkpoint-every", "2", "--batch-size", "2",
              "--no-gradient-checkpointing"]
    def recorded_exactly():  # after a finished run the cache's marker lists what the cache holds, nothing more
        return sorted(json.load(open(cache / cli.MARKER_FILE))["tree"]) == cli.listing(str(cache))

    assert train_lora.main([*common, "--output", str(tmp_path / "plain")]) == 0
    assert len(os.listdir(cache / "text")) == len(CAPTIONS) and recorded_exactly()
    assert train_lora.main([*common, "--output", str(out), "--caption-dropout", "0.5"]) == 0
    assert len(os.listdir(cache / "text")) == len(CAPTIONS) + 1 and recorded_exactly()
    empty = train_lora.empty_caption_key(train_lora.cache_settings(snap, 9, 32, 32, MAX_TEXT, torch.float32))
    assert os.path.isfile(cache / "text" / f"{empty}.safetensors")
    a, _ = read_lora(str(tmp_path / "plain"))
    b, _ = read_lora(str(out))
    assert lora_gap(a, b)[0] > 0
    capsys.readouterr()
    assert train_lora.main([*common, "--output", str(out), "--resume", "latest", "--steps", "6"]) == 2
    assert "--caption-dropout" in capsys.readouterr().err
    for bad in ("1.5", "-0.1", "x"):
        with pytest.raises(SystemExit) as e:
            train_lora.parse_args([*common, "--output", str(out), "--caption-dropout", bad])
        assert e.value.code == 2 and "--caption-dropout" in capsys.readouterr().err


def test_diffusion_loss_feeds_the_model_in_the_training_dtype():
    """The network gets x_t and the text embeddings in the training dtype (the official trainer casts latents and
    prompt embeddings to weight_dtype); the loss is still taken in fp32 against v."""
    from sampler import PRESETS, add_noise, v_target
    config, g = PRESETS["cogvideox-5b"], torch.Generator().manual_seed(0)
    x0, noise, text = torch.randn(2, 3, 4, 2, 2, generator=g), torch.randn(2, 3, 4, 2, 2, generator=g), torch.randn(2, 5, 8)
    t = torch.tensor([10, 900])
    seen = {}

    def model(x, text, t):
        seen.update(x=x.dtype, text=text.dtype)
        return (x * 0.5).to(torch.bfloat16)
    loss = train_lora.diffusion_loss(model, config, x0, text, t, noise, torch.bfloat16)
    assert seen == {"x": torch.bfloat16, "text": torch.bfloat16} and loss.dtype == torch.float32
    x_t = add_noise(config, x0, noise, t)
    want = ((x_t.to(torch.bfloat16) * 0.5).float() - v_target(config, x0, noise, t)).pow(2).mean()
    assert torch.equal(loss, want)


def test_v15_trains_end_to_end(snapshots, data, tmp_path):
    """A CogVideoX 1.5 snapshot (patch_size_t 2: 17 frames are 5 latent frames, trained as 6) runs two steps and
    writes its LoRA; before the noise took x0's padded shape, the first step failed."""
    out = tmp_path / "out"
    assert train_lora.main(train_args(snapshots("1.5"), data, out, "--steps", "2", "--num-frames", "17")) == 0
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors")


# train_lora.py's command line, found by mutation testing (bench/MUTANTS.md)

def test_command_line_defaults_are_the_documented_recipe():
    """The defaults the module docstring and README promise: THUDM's rank 128 / alpha 64, weight decay 1e-4, clipping
    at 1.0; our LR 1e-4 with 100 warm-up steps; 1000 steps of batch 1; seed 42; gradient checkpointing on; a
    checkpoint every 200 steps; runs/lora; fp32 on CPU / bf16 on GPU decided later (dtype None)."""
    a = train_lora.parse_args(["--model", "m", "--data", "d"])
    assert (a.rank, a.alpha, a.weight_decay, a.max_grad_norm) == (128, 64.0, 1e-4, 1.0)
    assert (a.lr, a.warmup, a.steps, a.batch_size, a.grad_accum, a.seed) == (1e-4, 100, 1000, 1, 1, 42)
    assert (a.gradient_checkpointing, a.checkpoint_every, a.output, a.cache_dir) == (True, 200, "runs/lora", None)
    assert (a.dtype, a.resume, a.validation_prompt, a.validate_every) == (None, None, None, 0)
    assert (a.num_frames, a.height, a.width) == (None, None, None)
    assert not train_lora.parse_args(["--model", "m", "--data", "d", "--no-gradient-checkpointing"]).gradient_checkpointing


def test_check_args_names_each_bad_argument(snap, data, tmp_path):
    """Each refusal of check_args names its flag (in process: tests/test_cli.py runs the same checks in subprocesses,
    which mutation testing cannot follow)."""
    info = read_model_info(snap)

    def args(*extra):
        a = train_lora.parse_args(["--model", snap, "--data", data, "--output", str(tmp_path / "out"), *extra])
        a.num_frames, a.height, a.width = 9, 32, 32
        return a
    train_lora.check_args(args(), info, 1)  # all good
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    for extra, world, names in [
            (["--batch-size", "3"], 2, ["--batch-size 3", "2"]),
            (["--validate-every", "5"], 1, ["--validate-every", "--validation-prompt"]),
            (["--validation-prompt", "x"], 1, ["--validation-prompt", "--validate-every"]),
            (["--data", str(tmp_path / "nope")], 1, [f"--data {tmp_path / 'nope'}"]),
            (["--data", str(tmp_path / "file")], 1, [f"--data {tmp_path / 'file'}"]),
            (["--resume", str(tmp_path / "nope")], 1, [f"--resume {tmp_path / 'nope'}"]),
            (["--resume", str(tmp_path / "file")], 1, [f"--resume {tmp_path / 'file'}"]),
            (["--output", str(tmp_path / "full")], 1, ["--output"]),
            (["--cache-dir", str(tmp_path / "full")], 1, ["--cache-dir"])]:
        refused(lambda: train_lora.check_args(args(*extra), info, world), *names)
    train_lora.check_args(args("--resume", "latest", "--batch-size", "4"), info, 2)  # 'latest' is looked up later
    bad = args()
    bad.num_frames = 8
    refused(lambda: train_lora.check_args(bad, info, 1), "num_frames=8")


def test_check_args_plans_the_validation_render_and_keeps_what_it_parsed(snapshots, data, tmp_path):
    """What check_args hands on: the validation render's plan (its prompt, seed, size: --buckets' first bucket or
    the flags'), the parsed --freeze patterns and --buckets sizes; and, on an I2V model, the first frame: the
    validation image, or a blank one when nothing is rendered. The flags that only go together are refused in
    process, each naming what to add or leave out."""
    png = str(tmp_path / "first.png")
    image = torch.rand(3, 24, 40, generator=torch.Generator().manual_seed(1))
    imageio.v3.imwrite(png, to_uint8(image[None])[0])

    def args(snap, *extra, size=(17, 48, 64)):  # the tiny models' own size is 9 x 32 x 32
        a = train_lora.parse_args(["--model", snap, "--data", data, "--output", str(tmp_path / "out"), "--seed", "7",
                                   *extra])
        a.num_frames, a.height, a.width = size
        return a
    t2v = snapshots("2b")
    info = read_model_info(t2v)
    a = args(t2v, "--validation-prompt", "a red circle", "--validate-every", "2")
    r = train_lora.check_args(a, info, 1)
    assert (r.num_frames, r.height, r.width, r.image) == (17, 48, 64, None) and a.freeze_patterns == []
    assert [(j.prompts, j.seed) for j in r.jobs] == [(["a red circle"], 7)]
    assert [j.prompts for j in train_lora.check_args(args(t2v), info, 1).jobs] == [[""]]
    a = args(t2v, "--full", "--freeze", "patch_embed, *.norm1.*")
    train_lora.check_args(a, info, 1)
    assert a.freeze_patterns == ["patch_embed", "*.norm1.*"]
    a = args(t2v, "--buckets", "48X64x17, 64x48x9", size=(None, None, None))
    r = train_lora.check_args(a, info, 1)
    assert (a.bucket_sizes, a.buckets) == ([(48, 64, 17), (64, 48, 9)], "48x64x17,64x48x9")
    assert (r.num_frames, r.height, r.width) == (17, 48, 64)  # the first bucket's
    for extra, names in [(["--validation-image", png], ["--validation-image"]),
                         (["--freeze", "patch_embed"], ["--freeze", "--full"]),
                         (["--buckets", "32x48x9"], ["--buckets", "--num-frames"])]:
        refused(lambda: train_lora.check_args(args(t2v, *extra), info, 1), *names)

    i2v = snapshots("5b-i2v")
    info = read_model_info(i2v)
    blank = train_lora.check_args(args(i2v, size=(9, 32, 32)), info, 1).image  # no render: a blank first frame
    assert blank.dim() == 3 and blank.shape[0] == 3 and not blank.any()
    r = train_lora.check_args(args(i2v, "--validation-prompt", "x", "--validate-every", "2", "--validation-image", png,
                                   size=(9, 32, 32)), info, 1)
    assert torch.equal(r.image, torch.from_numpy(imageio.v3.imread(png)).permute(2, 0, 1).float() / 255)
    for extra, names in [(["--validation-prompt", "x", "--validate-every", "2"], ["--validation-image"]),
                         (["--validation-image", png], ["--validation-prompt"])]:
        refused(lambda: train_lora.check_args(args(i2v, *extra, size=(9, 32, 32)), info, 1), *names)


def test_clips_are_read_as_the_vae_reads_pixels(data):
    """load_clip: the frames at the official stride, covered and centre-cropped to the size (generate.resize), as
    (3, F, H, W) in [-1, 1] (x * 2 - 1), against the clip decoded here with imageio; a clip with exactly
    --num-frames frames is enough, one fewer is refused."""
    path = os.path.join(data, "clip0.mp4")
    frames = np.stack(imageio.mimread(path, memtest=False)).astype(np.float32) / 255  # (N, 48, 64, 3)
    picked = torch.from_numpy(frames[list(range(0, len(frames), len(frames) // 9))[:9]]).permute(0, 3, 1, 2)
    ref = resize(picked, 32, 32).permute(1, 0, 2, 3) * 2 - 1  # (3, 9, 32, 32)
    clip = train_lora.load_clip(path, 9, 32, 32)
    assert clip.shape == (3, 9, 32, 32) and clip.min() >= -1 and clip.max() <= 1 and clip.std() > 0.1
    assert (clip - ref).abs().max() < 1e-6
    exact = torch.zeros(9, 3, 4, 4)
    assert train_lora.select_frames(exact, 9).shape == (9, 3, 4, 4)
    refused(lambda: train_lora.select_frames(exact[:8], 9), "8", "9", "--num-frames")


def test_cache_is_built_once_and_reused(snap, data, tmp_path, monkeypatch):
    """A second run over the same clips finds every latent and embedding in the cache: no VAE or T5 is loaded and
    no video is decoded again (validate skips cached clips)."""
    args = train_lora.parse_args(["--model", snap, "--data", data])
    args.num_frames, args.height, args.width, args.max_text_len, args.i2v = 9, 32, 32, MAX_TEXT, False
    settings = train_lora.cache_settings(snap, 9, 32, 32, MAX_TEXT, torch.float32)
    cache = str(tmp_path / "cache")
    good, problems = train_lora.validate(*train_lora.find_samples(data), cache, settings, 9)
    assert len(good) == 4 and not problems
    train_lora.build_cache(args, good, cache, torch.device("cpu"), torch.float32)
    assert sorted(os.listdir(cache)) == ["latents", "text"]
    assert len(os.listdir(os.path.join(cache, "latents"))) == len(os.listdir(os.path.join(cache, "text"))) == 4
    calls = []
    for name in ("load_vae", "load_text_encoder", "read_video"):
        monkeypatch.setattr(train_lora, name, lambda *a, _n=name, **k: calls.append(_n))
    again, _ = train_lora.validate(*train_lora.find_samples(data), cache, settings, 9)
    train_lora.build_cache(args, again, cache, torch.device("cpu"), torch.float32)
    assert [g[1:] for g in again] == [g[1:] for g in good] and calls == []


def test_checkpoints_record_the_lora_shape_and_refuse_pickled_code(trained, tmp_path):
    """A checkpoint's LoRA file records its rank and alpha (so --lora checkpoint-N loads at the trained scale), and
    its training_state.pt is read with weights_only: a state holding an arbitrary object is refused, not run."""
    from lora import read_lora
    ckpt = os.path.join(trained, "checkpoint-000015")
    _, meta = read_lora(ckpt)
    assert (meta["r"], meta["lora_alpha"]) == (RANK, ALPHA), meta
    bad = tmp_path / "checkpoint-000001"
    bad.mkdir()
    torch.save({"step": 1, "optimizer": {}, "args": {"seed": print}}, bad / "training_state.pt")  # a function object
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        train_lora.load_checkpoint(str(bad), None, None, None)


def test_a_run_reads_each_model_config_once(snap, data, tmp_path, monkeypatch):
    """The checks, the cache's VAE and the validation render share one parse of the transformer, VAE and scheduler
    configs (ModelInfo carries them), so a file changed mid-run cannot give the checks and the models different
    shapes. (T5's config is read by each load of T5, with the weights it describes.)"""
    import builtins
    reads, real_open = [], builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: reads.append(str(f)) or real_open(f, *a, **k))
    out = tmp_path / "run"
    assert train_lora.main(["--model", snap, "--data", data, "--output", str(out), "--rank", str(RANK), "--steps", "1",
                            "--num-frames", "9", "--height", "32", "--width", "32", "--no-gradient-checkpointing",
                            "--validation-prompt", PROMPT, "--validate-every", "1"]) == 0
    assert os.listdir(out / "cache" / "latents") and os.listdir(out / "validation")  # encoded and rendered
    # the VAE's: parsed once, and its text hashed once into the cache keys (train_lora.fingerprint)
    for config, n in (("transformer/config.json", 1), ("vae/config.json", 2), ("scheduler/scheduler_config.json", 1)):
        assert reads.count(os.path.join(snap, *config.split("/"))) == n, config


def test_default_run_checkpoints_caches_under_output_and_renders_at_the_training_size(snap, data, tmp_path,
                                                                                       monkeypatch, capsys):
    """What every other training test here turns off or overrides: gradient checkpointing on (the default) sends each
    block through torch.utils.checkpoint on every step and gives the same LoRA as a run without it; the cache
    defaults to <output>/cache; a validation render at a size other than the model's is generate() at the training
    frames, size and seed with that step's LoRA (read back from its contact sheet, a PNG: lossless), saved at the
    model's fps."""
    import model as model_module
    from media import contact_sheet
    calls = []
    real_checkpoint = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    common = ["--model", snap, "--data", data, "--rank", str(RANK), "--alpha", str(ALPHA), "--lr", "3e-2",
              "--warmup", "1", "--steps", "2", "--num-frames", "17", "--height", "48", "--width", "48", "--seed", "3"]
    out = tmp_path / "run"
    assert train_lora.main([*common, "--output", str(out), "--validation-prompt", PROMPT, "--validate-every", "2"]) == 0
    blocks = len(load_transformer(snap).transformer_blocks)
    assert len(calls) == 2 * blocks, calls  # 2 steps of batch 1; the render runs without gradients
    assert sorted(os.listdir(out / "cache")) == ["latents", "text"]
    assert len(os.listdir(out / "cache" / "latents")) == len(os.listdir(out / "cache" / "text")) == 4

    path = os.path.join(str(out), "validation", "step-000002.mp4")
    assert imageio.v3.imread(path, index=None).shape == (17, 48, 48, 3)
    assert imageio.v3.immeta(path)["fps"] == pytest.approx(read_model_info(snap).fps)
    assert path in capsys.readouterr().out  # the run says where the render went
    sheet = imageio.v3.imread(os.path.join(str(out), "validation", "step-000002.png"))[..., :3].astype(int)
    pipe = gen.load_pipeline(snap)
    plain = gen.generate(pipe, PROMPT, num_frames=17, height=48, width=48, seed=3, progress=False)[0]
    load_lora(pipe.transformer, str(out))
    ref = gen.generate(pipe, PROMPT, num_frames=17, height=48, width=48, seed=3, progress=False)[0]
    err = np.abs(sheet - contact_sheet(to_uint8(ref))).max()
    change = np.abs(contact_sheet(to_uint8(plain)).astype(int) - contact_sheet(to_uint8(ref))).max()
    print(f"validation render vs generate with the step's LoRA: max {err} of 255; the LoRA changes it by {change}")
    assert err <= 1 and change > 20  # the LoRA is folded into the weights here, unfused in training: rounding

    calls.clear()
    assert train_lora.main([*common, "--output", str(tmp_path / "plain"), "--no-gradient-checkpointing"]) == 0
    assert calls == []
    a, _ = read_lora(str(out))
    b, _ = read_lora(str(tmp_path / "plain"))
    assert all(torch.equal(a[k][i], b[k][i]) for k in a for i in (0, 1))


def named(problems, *names):
    """One problem per entry of `names`, in order, each naming every one of its names (files, lines, counts)."""
    assert len(problems) == len(names), problems
    for problem, words in zip(problems, names):
        assert all(w in problem for w in words), (words, problem)


def test_unequal_caption_and_video_lists_report_each_gap(tmp_path):
    """prompts.txt (or prompt.txt, as some official examples spell it) and videos.txt of different lengths: one
    problem for the counts, and every unmatched line becomes a sample that validate() then reports (an empty caption
    or '(no video)'), so the user sees each gap by line number."""
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "prompt.txt").write_text("a cat\na dog\n\n")  # trailing blank lines are not samples
    (folder / "videos.txt").write_text("v1.mp4\nv2.mp4\nv3.mp4\n")
    samples, problems = train_lora.find_samples(str(folder))
    named(problems, ["prompt.txt", "2", "videos.txt", "3"])
    assert [(s.name, s.video, s.caption) for s in samples] == [
        ("v1.mp4 (line 1)", str(folder / "v1.mp4"), "a cat"), ("v2.mp4 (line 2)", str(folder / "v2.mp4"), "a dog"),
        ("v3.mp4 (line 3)", str(folder / "v3.mp4"), "")]
    (folder / "videos.txt").write_text("v1.mp4\n")
    samples, problems = train_lora.find_samples(str(folder))
    named(problems, ["prompt.txt", "2", "videos.txt", "1"])
    assert [(s.name, s.video, s.caption) for s in samples] == [
        ("v1.mp4 (line 1)", str(folder / "v1.mp4"), "a cat"), ("(no video) (line 2)", "", "a dog")]
    _, problems = train_lora.validate(samples, [], str(tmp_path / "cache"), {"video": [], "text": []}, 9)
    named(problems, ["v1.mp4 (line 1)", str(folder / "v1.mp4")], ["(no video) (line 2)"])
    (folder / "prompts.txt").write_text("x\n")  # both spellings: prompts.txt is read
    assert train_lora.find_samples(str(folder))[1] == []
    empty = tmp_path / "empty"
    empty.mkdir()
    samples, problems = train_lora.find_samples(str(empty))
    assert samples == []
    named(problems, [str(empty), "prompts.txt", "videos.txt", "name.txt"])
    samples, problems = train_lora.find_samples(str(tmp_path / "nope"))
    assert samples == []
    named(problems, [str(tmp_path / "nope")])
    # half of the official layout is named as such (before: "prompts.txt: no video named prompts.mp4")
    for have, lack in (("prompts.txt", "videos.txt"), ("videos.txt", "prompts.txt")):
        half = tmp_path / f"half-{have}"
        half.mkdir()
        (half / have).write_text("x\n")
        samples, problems = train_lora.find_samples(str(half))
        assert samples == []
        named(problems, [str(half), have, lack])
    # ... unless that file is the caption of a pair named like it; an orphan caption names every video extension
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "videos.gif").write_bytes(b"GIF89a")
    (pairs / "videos.txt").write_text("a clip that happens to be called videos")
    (pairs / "orphan.txt").write_text("no clip")
    samples, problems = train_lora.find_samples(str(pairs))
    assert [(s.name, s.caption) for s in samples] == [("videos.gif", "a clip that happens to be called videos")]
    named(problems, ["orphan.txt", "orphan.mp4", ".mov", ".avi", ".mkv", ".webm", ".gif"])  # every extension



def test_accumulation_equals_a_bigger_batch_and_the_run_reports_itself(snap, data, tmp_path, capsys):
    """--grad-accum 2 of batch 1 takes the same samples, in the same order, as one batch of 2 and gives the same
    LoRA and logged losses (the loss of each micro-batch divided by 2, summed); a run prints its sample count and
    cache, the LoRA size and batch layout, and what it wrote (loss.png only where matplotlib is installed)."""
    import importlib.util
    steps = ["--steps", "3", "--checkpoint-every", "3"]
    assert train_lora.main(train_args(snap, data, tmp_path / "batch", *steps)) == 0
    out = capsys.readouterr().out
    assert train_lora.main(train_args(snap, data, tmp_path / "accum", *steps, "--batch-size", "1",
                                      "--grad-accum", "2")) == 0
    a, _ = read_lora(str(tmp_path / "batch"))
    b, _ = read_lora(str(tmp_path / "accum"))
    err, scale = lora_gap(a, b)
    assert err <= 1e-5 * max(1.0, scale), err
    la = [json.loads(x)["loss"] for x in open(tmp_path / "batch" / "loss.jsonl")]
    lb = [json.loads(x)["loss"] for x in open(tmp_path / "accum" / "loss.jsonl")]
    np.testing.assert_allclose(la, lb, rtol=1e-5)

    cache = os.path.join(os.path.dirname(data), "cache")
    trainable = sum(t.numel() for pair in a.values() for t in pair)
    run = tmp_path / "batch"
    plotted = importlib.util.find_spec("matplotlib") is not None
    for line in (f"4 samples, cache {cache}",
                 f"LoRA rank {RANK}, alpha {ALPHA:g}: {trainable / 1e6:.2f}M trainable parameters; 1 process(es), "
                 f"global batch 2 x 1 accumulation",
                 f"wrote {run / 'pytorch_lora_weights.safetensors'} and {run / 'loss.jsonl'}"
                 + (f" and {run / 'loss.png'}" if plotted else "")):
        assert line in out.splitlines(), (line, out)
    assert os.path.isfile(run / "loss.png") == plotted


def test_dtype_reaches_the_cache_and_the_training(snap, data, tmp_path):
    """--dtype bf16 on the CPU: the clips and captions are encoded again in bf16 (the dtype is part of the cache
    keys, so the fp32 entries are not reused), and training under bf16 autocast gives losses within 5% of the fp32
    run's and a different LoRA (fp32 factors either way). Adam's first updates are about lr * sign(gradient), so a
    bf16 rounding that flips a small gradient's sign moves that entry by a full step: measured 15% of the largest
    entry after 2 steps, bounded at 30% here."""
    cache = str(tmp_path / "cache")
    steps = ["--steps", "2", "--checkpoint-every", "2", "--cache-dir", cache]
    assert train_lora.main(train_args(snap, data, tmp_path / "fp32", *steps)) == 0
    assert train_lora.main(train_args(snap, data, tmp_path / "bf16", *steps, "--dtype", "bf16")) == 0
    assert len(os.listdir(os.path.join(cache, "latents"))) == len(os.listdir(os.path.join(cache, "text"))) == 8
    a, _ = read_lora(str(tmp_path / "fp32"))
    b, _ = read_lora(str(tmp_path / "bf16"))
    diff, scale = lora_gap(a, b)
    la = [json.loads(x)["loss"] for x in open(tmp_path / "fp32" / "loss.jsonl")]
    lb = [json.loads(x)["loss"] for x in open(tmp_path / "bf16" / "loss.jsonl")]
    print(f"bf16 vs fp32: LoRA max abs diff {diff:.2e} of {scale:.2e}; losses {la} vs {lb}")
    assert 0 < diff <= 0.3 * scale and all(b[k][0].dtype == torch.float32 for k in b)
    np.testing.assert_allclose(la, lb, rtol=0.05)



def test_a_scheduler_that_is_not_v_prediction_is_refused_before_any_work(snap, data, tmp_path, capsys):
    """The trainer's loss is v-prediction's: a snapshot whose scheduler predicts epsilon is refused by name before
    the dataset is encoded or anything is written (the check used to run after the cache was filled)."""
    copy = tmp_path / "snap"
    shutil.copytree(snap, copy)
    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"v_prediction"', '"epsilon"'))
    out = tmp_path / "out"
    assert train_lora.main(train_args(str(copy), data, out, "--steps", "1", "--cache-dir", str(tmp_path / "cache"))) == 2
    err = capsys.readouterr().err
    assert str(copy) in err and "'epsilon'" in err and "'v_prediction'" in err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_resume_latest_needs_a_checkpoint(tmp_path):
    """--resume latest in an output folder that does not exist yet, or holds no checkpoint-* folder, is refused by
    name; otherwise the last checkpoint in name order (zero-padded steps) is picked, and a path is taken as given."""
    (tmp_path / "empty").mkdir()
    for output in (tmp_path / "missing", tmp_path / "empty"):
        refused(lambda: train_lora.find_resume(str(output), "latest"), "--resume latest", str(output))
    for step in (200, 1000, 400):
        (tmp_path / "empty" / f"checkpoint-{step:06d}").mkdir()
    assert train_lora.find_resume(str(tmp_path / "empty"), "latest") == str(tmp_path / "empty" / "checkpoint-001000")
    assert train_lora.find_resume(str(tmp_path / "empty"), "elsewhere/checkpoint-7") == "elsewhere/checkpoint-7"


def run_files(folder):
    return {os.path.relpath(os.path.join(b, f), folder): open(os.path.join(b, f), "rb").read()
            for b, _, fs in os.walk(folder) for f in fs}


def test_a_rerun_starts_clean_or_resumes_and_never_touches_a_users_file(snap, data, trained, tmp_path, capsys):
    """Without --resume a run starts clean, and only in a folder holding nothing but an earlier run's files: a file
    of the user's at the top or inside a checkpoint is refused before any work (the folder byte for byte as it was,
    loss.jsonl included); otherwise the earlier run's checkpoints, log and renders are removed, so `--resume latest`
    can only pick up this run's. With --resume the run continues, and a user's file beside its own is left alone
    (one inside a checkpoint it may replace is refused). Every file is written with the umask's permissions."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for user, resume in (("notes.txt", ()), ("checkpoint-000015/notes.txt", ()),
                         ("checkpoint-000015/notes.txt", ("--resume", "latest"))):
        (run / user).write_text("the user's\n")
        before = run_files(run)
        assert train_lora.main(train_args(snap, data, run, "--steps", "2", *resume)) == 2, (user, resume)
        assert run_files(run) == before, (user, resume)
        (run / user).unlink()
    earlier = [n for n in sorted(os.listdir(run)) if n not in ("cache", cli.MARKER_FILE)]
    capsys.readouterr()
    old = os.umask(0o022)
    try:
        assert train_lora.main(train_args(snap, data, run, "--steps", "4", "--checkpoint-every", "2")) == 0
        said = capsys.readouterr().out.splitlines()
        assert any(all(n in line for n in earlier) for line in said), (earlier, said)  # says what it removed
        assert sorted(os.listdir(run)) == [".cogvideox-mini.json", "checkpoint-000002", "checkpoint-000004",
                                           "loss.jsonl", "pytorch_lora_weights.safetensors"]
        assert [json.loads(line)["step"] for line in open(run / "loss.jsonl")] == [1, 2, 3, 4]
        for base, dirs, files in os.walk(run):
            for name in dirs + files:
                mode = os.stat(os.path.join(base, name)).st_mode & 0o777
                assert mode == (0o755 if name in dirs else 0o644), (os.path.join(base, name), oct(mode))
        (run / "notes.txt").write_text("the user's\n")
        assert train_lora.main(train_args(snap, data, run, "--steps", "6", "--checkpoint-every", "2",
                                          "--resume", "latest")) == 0
    finally:
        os.umask(old)
    assert (run / "notes.txt").read_text() == "the user's\n"
    assert "checkpoint-000006" in os.listdir(run)
    assert [json.loads(line)["step"] for line in open(run / "loss.jsonl")] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- image-to-video LoRA (issue 36, item 1)

I2V_FRAMES = {"5b-i2v": 9, "1.5-i2v": 17}  # each tiny model's sample_frames: 3 latent frames, and 5 (trained as 6)


def test_first_frame_noise_is_lognormal_pixel_noise():
    """noise_first_frame: the clip's frame 0 plus N(0, sigma²) pixel noise, log sigma ~ N(-3, 0.5), drawn from the
    generator given (sigma first, then the noise: the order of diffusers' script)."""
    clip = torch.rand(3, 5, 8, 8) * 2 - 1
    noisy = train_lora.noise_first_frame(clip, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    sigma = torch.exp(torch.normal(-3.0, 0.5, (1,), generator=g))
    assert torch.equal(noisy, clip[:, :1] + torch.randn(3, 1, 8, 8, generator=g) * sigma)
    logs = []
    for seed in range(400):
        noisy = train_lora.noise_first_frame(torch.zeros(3, 1, 32, 32), torch.Generator().manual_seed(seed))
        logs.append(noisy.std().log().item())
    assert abs(np.mean(logs) + 3.0) < 0.08 and abs(np.std(logs) - 0.5) < 0.06


def test_condition_helpers():
    """condition_latents: the image at index 0, zero latents after; drop_condition zeroes all of it with probability
    p (one uniform draw); condition_scale multiplies, or divides for 1.5 (invert_scale_latents); training_ofs: 2.0."""
    z = torch.randn(4, 2, 3)
    c = train_lora.condition_latents(z, 6)
    assert c.shape == (6, 4, 2, 3) and torch.equal(c[0], z) and not c[1:].any()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(train_lora.drop_condition(c, g, 0.0), c) and not train_lora.drop_condition(c, g, 1.0).any()
    dropped = sum(not train_lora.drop_condition(c, torch.Generator().manual_seed(s)).any() for s in range(2000))
    assert 60 <= dropped <= 140  # 5% of 2000
    assert torch.equal(train_lora.condition_scale(z, 0.7, False), z * 0.7)
    assert torch.equal(train_lora.condition_scale(z, 0.7, True), z / 0.7)
    assert train_lora.training_ofs(None, 2) is None and torch.equal(train_lora.training_ofs(8, 2), torch.full((2,), 2.0))


def diffusers_i2v_step(snap, data, cache, good, positions, num_frames, dropout):
    """One I2V training step recomputed with diffusers' modules and the formulas of diffusers'
    examples/cogvideo/train_cogvideox_image_to_video_lora.py (and, for 1.5, THUDM's I2V trainer): the first frame
    noised in pixels with sigma = exp(N(-3, 0.5)) and encoded by the diffusers VAE, latent_dist.sample() times the
    scaling factor (1.5: divided, as its pipeline does), zero latents after it, dropped with probability `dropout`,
    concatenated to x_t on channels, ofs 2.0 for 1.5, RoPE from the I2V pipeline, v̂ -> x̂0 by get_velocity and the
    1/(1-ᾱ)-weighted loss. The same generators as train_lora. -> (loss, the transformer, with its gradients)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXImageToVideoPipeline
    from safetensors.torch import load_file
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(snap)
    vae, net, sched = pipe.vae, pipe.transformer.train().requires_grad_(True), pipe.scheduler
    assert isinstance(vae, AutoencoderKLCogVideoX)
    sf, invert, pt = vae.config.scaling_factor, vae.config.invert_scale_latents, net.config.patch_size_t
    x0, text, ts, eps, conds = [], [], [], [], []
    for (seed, p), (s, lat_key, txt_key) in zip(positions, good):
        clip = train_lora.load_clip(s.video, num_frames, 32, 32)[None]                   # (1, 3, F, H, W)
        with torch.no_grad():
            latent_dist = vae.encode(clip).latent_dist
            image = clip[:, :, :1].clone()
            gi = train_lora.frame_generator(lat_key)
            image_noise_sigma = torch.exp(torch.normal(mean=-3.0, std=0.5, size=(1,), generator=gi))
            noisy_image = image + torch.randn(image.shape, generator=gi) * image_noise_sigma[:, None, None, None, None]
            image_latent_dist = vae.encode(noisy_image).latent_dist
        g = train_lora.sample_generator(seed, p)
        mean, std = latent_dist.mean[0].transpose(0, 1), latent_dist.std[0].transpose(0, 1)  # (F, C, h, w)
        video_latents = (mean + std * torch.randn(mean.shape, generator=g)) * sf
        if pt:  # THUDM: the first latent frame copied in front up to a multiple of patch_size_t
            video_latents = torch.cat([video_latents[:1].repeat(len(video_latents) % pt, 1, 1, 1), video_latents])
        x0.append(video_latents)
        text.append(load_file(os.path.join(cache, "text", txt_key + ".safetensors"))["embedding"])
        ts.append(torch.randint(0, 1000, (1,), generator=g))
        eps.append(torch.randn(video_latents.shape, generator=g))
        image_latents = image_latent_dist.sample(generator=g)
        image_latents = (image_latents / sf if invert else image_latents * sf).permute(0, 2, 1, 3, 4)  # (1, 1, C, h, w)
        padding_shape = (1, len(video_latents) - 1, *video_latents.shape[1:])
        image_latents = torch.cat([image_latents, image_latents.new_zeros(padding_shape)], dim=1)
        if torch.rand((), generator=g) < dropout:
            image_latents = torch.zeros_like(image_latents)
        conds.append(image_latents[0])
    video_latents, text, t, noise, image_latents = map(torch.stack, (x0, text, ts, eps, conds))
    t = torch.cat(ts)
    noisy_video_latents = sched.add_noise(video_latents, noise, t)
    noisy_model_input = torch.cat([noisy_video_latents, image_latents], dim=2)
    rope = pipe._prepare_rotary_positional_embeddings(32, 32, video_latents.shape[1], torch.device("cpu"))
    ofs = None if net.config.ofs_embed_dim is None else video_latents.new_full((1,), fill_value=2.0)
    model_output = net(hidden_states=noisy_model_input, encoder_hidden_states=text, timestep=t, ofs=ofs,
                       image_rotary_emb=rope, return_dict=False)[0]
    a = sched.alphas_cumprod[t].double().reshape(-1, 1, 1, 1, 1)
    model_pred = a.sqrt() * noisy_video_latents.double() - (1 - a).sqrt() * model_output.double()  # get_velocity
    loss = torch.mean((1 / (1 - a) * (model_pred - video_latents.double()) ** 2).reshape(len(t), -1), dim=1).mean()
    loss.backward()
    return loss.item(), net, image_latents


def test_a_1_5_i2v_run_scales_the_condition_as_its_vae_config_says(snapshots, data, tmp_path):
    """1.5-I2V divides the image latent by the scaling factor (its VAE config's invert_scale_latents) where 1.0
    multiplies: the first loss a train_lora.py run logs (the LoRA's B starts at zero, so the model is the base one)
    is the loss of its first batch built with the snapshot's flag, not of the same batch built without it."""
    snap, frames, seed = snapshots("1.5-i2v"), I2V_FRAMES["1.5-i2v"], 7
    info = read_model_info(snap)
    assert info.vae.invert_scale_latents
    out, cache = tmp_path / "run", str(tmp_path / "cache")
    assert train_lora.main(["--model", snap, "--data", data, "--output", str(out), "--cache-dir", cache,
                            "--num-frames", str(frames), "--height", "32", "--width", "32", "--batch-size", "4",
                            "--steps", "1", "--seed", str(seed), "--no-gradient-checkpointing"]) == 0
    logged = json.loads(open(out / "loss.jsonl").readline())["loss"]
    settings = train_lora.cache_settings(snap, frames, 32, 32, MAX_TEXT, torch.float32, i2v=True)
    good, problems = train_lora.validate(*train_lora.find_samples(data), cache, settings, frames)
    items = [good[i] for i in train_lora.micro_batch(seed, 0, 4, [list(range(len(good)))])]
    model = load_transformer(os.path.join(snap, "transformer"))
    losses = []
    for invert in (True, False):
        x0, text, t, noise, cond = train_lora.make_batch(items, [(seed, p) for p in range(4)], cache,
                                                         info.vae.scaling_factor, 1000, info.transformer.patch_size_t,
                                                         True, invert)
        with torch.no_grad():
            losses.append(train_lora.diffusion_loss(model, info.scheduler, x0, text, t, noise, torch.float32, cond,
                                                    train_lora.training_ofs(info.transformer.ofs_embed_dim, 4)).item())
    # the two differ by ~1.5e-5 relative here (a random tiny model barely reads its condition): the bounds are 10x
    # tighter than that, and the logged loss matched the flagged batch's to every digit
    assert not problems and logged == pytest.approx(losses[0], rel=1e-6), (logged, losses)
    assert losses[1] != pytest.approx(losses[0], rel=1e-6), (logged, losses)


@pytest.mark.parametrize("family", ["5b-i2v", "1.5-i2v"])
def test_i2v_training_step_matches_diffusers_script(snapshots, data, tmp_path, family):
    """One I2V step of train_lora (build_cache, make_batch, diffusion_loss, with our transformer) gives the loss and
    every transformer gradient of diffusers_i2v_step, batch 4 with dropout 0.5 so that both a kept and a dropped
    image are in it. (All transformer weights train here, so every input path is checked; LoRA's own math is tested
    against peft above.)"""
    import types
    snap, frames = snapshots(family), I2V_FRAMES[family]
    info = read_model_info(snap)
    cache = str(tmp_path / "cache")
    settings = train_lora.cache_settings(snap, frames, 32, 32, MAX_TEXT, torch.float32, i2v=True)
    good, problems = train_lora.validate(*train_lora.find_samples(data), cache, settings, frames)
    assert not problems and len(good) == 4
    args = types.SimpleNamespace(model=snap, num_frames=frames, height=32, width=32, max_text_len=MAX_TEXT, i2v=True)
    train_lora.build_cache(args, good, cache, torch.device("cpu"), torch.float32)
    for seed in range(5, 50):  # the first seed whose batch has both a kept and a dropped image
        positions = [(seed, p) for p in range(4)]
        x0, text, t, noise, cond = train_lora.make_batch(good, positions, cache, info.vae.scaling_factor, 1000,
                                                         info.transformer.patch_size_t, True,
                                                         info.vae.invert_scale_latents, dropout=0.5)
        if len({bool(c.any()) for c in cond}) == 2:
            break
    assert len({bool(c.any()) for c in cond}) == 2
    model = load_transformer(os.path.join(snap, "transformer")).train().requires_grad_(True)
    loss = train_lora.diffusion_loss(model, info.scheduler, x0, text, t, noise, torch.float32, cond,
                                     train_lora.training_ofs(info.transformer.ofs_embed_dim, len(x0)))
    loss.backward()
    ref_loss, net, ref_cond = diffusers_i2v_step(snap, data, cache, good, positions, frames, dropout=0.5)
    cond_err = (cond - ref_cond).abs().max().item()
    ours = dict(model.named_parameters())
    grad_err = max((ours[n].grad - p.grad).abs().max().item() for n, p in net.named_parameters())
    grad_max = max(p.grad.abs().max().item() for p in net.parameters())
    print(f"{family}: loss {loss.item():.6f} vs {ref_loss:.6f} (abs diff {abs(loss.item() - ref_loss):.2e}); "
          f"condition max abs diff {cond_err:.2e}; grads max abs diff {grad_err:.2e} (largest grad {grad_max:.2e})")
    assert ours.keys() == dict(net.named_parameters()).keys()
    assert cond_err <= 1e-5
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    assert grad_err <= 1e-4 * grad_max


@pytest.mark.parametrize("family", ["5b-i2v", "1.5-i2v"])
def test_i2v_lora_trains_and_diffusers_i2v_pipeline_gives_our_frames(snapshots, data, tmp_path, family):
    """train_lora.py takes I2V checkpoints (issue 36, items 1 and 5): four steps render the validation prompt from
    --validation-image and write a LoRA that diffusers' CogVideoXImageToVideoPipeline.load_lora_weights reads and
    renders, from an image, into our frames with load_lora (fp32 CPU, within 1e-4), frames the LoRA changes.
    --validation-image is required with a validation prompt on an I2V model, and refused on a T2V one."""
    from diffusers import CogVideoXImageToVideoPipeline
    snap, out, n = snapshots(family), tmp_path / "out", I2V_FRAMES[family]
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(5))
    png = str(tmp_path / "first.png")
    imageio.v3.imwrite(png, to_uint8(image[None])[0])
    frames = ["--num-frames", str(n)]
    assert train_lora.main(train_args(snap, data, out, "--steps", "4", *frames, "--validation-prompt", PROMPT,
                                      "--validation-image", png, "--validate-every", "4")) == 0
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors")
    assert imageio.v3.imread(out / "validation" / "step-000004.mp4", index=None).shape == (n, 32, 32, 3)

    kw = dict(num_frames=n, height=32, width=32, num_inference_steps=3, guidance_scale=5.0)
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(snap)
    pipe.load_lora_weights(str(out))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=PROMPT, negative_prompt="", image=image[None], generator=torch.Generator().manual_seed(7),
               output_type="pt", max_sequence_length=MAX_TEXT, **kw).frames
    ours = gen.load_pipeline(snap)
    plain = gen.generate(ours, PROMPT, image=image, seed=7, max_sequence_length=MAX_TEXT, progress=False, **kw)
    load_lora(ours.transformer, str(out))
    with_lora = gen.generate(ours, PROMPT, image=image, seed=7, max_sequence_length=MAX_TEXT, progress=False, **kw)
    err, change = (with_lora - ref).abs().max().item(), (with_lora - plain).abs().max().item()
    print(f"{family}: ours vs diffusers I2V pipeline with the LoRA: max abs {err:.2e}; the LoRA changes frames by "
          f"up to {change:.3f}")
    assert err <= 1e-4 and change > 0.02

    for bad, extra in ((tmp_path / "bad", ["--validation-prompt", PROMPT, "--validate-every", "1"]),
                       (tmp_path / "bad2", ["--validation-image", png])):
        assert train_lora.main(train_args(snap, data, bad, "--steps", "2", *frames, *extra)) == 2
        assert not bad.exists()
    assert train_lora.main(train_args(snapshots("5b"), data, tmp_path / "bad3", "--steps", "2", "--validation-image",
                                      png)) == 2


def test_widened_text_to_video_model_starts_as_itself_and_loads_as_i2v(snapshots, tmp_path, monkeypatch):
    """bench/i2v_lesson.widen (how 5b-I2V was made from 5b): the widened transformer reads [video; image] latents
    and, with the new half of its patch embedding at zero, predicts exactly what the text-to-video model predicts
    for the video latents, whatever the image; our loader sees an I2V model, and diffusers'
    CogVideoXImageToVideoPipeline loads the folder and gives our frames."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import i2v_lesson
    from pipeline import load_pipeline
    base, wide = snapshots("5b"), str(tmp_path / "wide")
    i2v_lesson.widen(base, wide)
    info = read_model_info(wide)
    assert info.is_i2v and not read_model_info(base).is_i2v
    t2v = load_transformer(base).to(torch.bfloat16).float()  # the widened weights are stored in bf16
    i2v = load_transformer(wide)
    g = torch.Generator().manual_seed(0)
    x, image = torch.randn(2, 3, 4, 4, 4, generator=g), torch.randn(2, 3, 4, 4, 4, generator=g)  # (B, F, C, H, W)
    text, t = torch.randn(2, MAX_TEXT, t2v.config.text_embed_dim, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        # equal but for the order of a matmul's sums: the zero half still adds its 0 * image terms
        torch.testing.assert_close(i2v(torch.cat([x, image], 2), text, t), t2v(x, text, t), rtol=1e-6, atol=1e-6)
    peer = peer_i2v_frames(wide)
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = gen.generate(load_pipeline(wide), "a red circle moving right", image=image, num_frames=9, height=32, width=32,
                    num_inference_steps=3, max_sequence_length=MAX_TEXT, progress=False, seed=5)
    torch.testing.assert_close(ours, peer(image), rtol=0, atol=1e-5)


def peer_i2v_frames(folder):
    from diffusers import CogVideoXImageToVideoPipeline
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return lambda image: pipe(image=image[None], prompt="a red circle moving right", negative_prompt="", num_frames=9,
                              height=32, width=32, num_inference_steps=3, max_sequence_length=MAX_TEXT,
                              generator=torch.Generator().manual_seed(5), output_type="pt").frames
