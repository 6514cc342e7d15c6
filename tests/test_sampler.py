"""sampler.py against diffusers' CogVideoXDDIMScheduler / CogVideoXDPMScheduler and the CogVideoXPipeline loop."""
import copy
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import (CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline,
                       CogVideoXTransformer3DModel, CogVideoXVideoToVideoPipeline)

import sampler as S
from checkpoint import CheckpointError

PEERS = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}
SHAPE = (2, 3, 4, 6, 8)  # (B, F, C, H, W)


def peer(name, config, **overrides):
    return PEERS[name](**{**dataclasses.asdict(config), **overrides})


# ---- config

@pytest.mark.parametrize("preset,snr", [("cogvideox-2b", 3.0), ("cogvideox-5b", 1.0)])
def test_load_scheduler_config(tmp_path, preset, snr):
    sched = CogVideoXDDIMScheduler(clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                   timestep_spacing="trailing", snr_shift_scale=snr)
    sched.save_pretrained(tmp_path / "scheduler")
    file = tmp_path / "scheduler" / "scheduler_config.json"
    assert json.loads(file.read_text())["_class_name"] == "CogVideoXDDIMScheduler"
    for path in (tmp_path, tmp_path / "scheduler", file):
        assert S.load_scheduler_config(str(path)) == S.PRESETS[preset]


def test_load_scheduler_config_errors(tmp_path):
    with pytest.raises(CheckpointError, match="missing file"):
        S.load_scheduler_config(str(tmp_path))
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"prediction_type": "flow"}))
    with pytest.raises(CheckpointError, match="prediction_type='flow'"):
        S.load_scheduler_config(str(tmp_path))
    with pytest.raises(ValueError, match="sampler 'euler'"):
        S.make_sampler("euler", S.PRESETS["cogvideox-2b"], 50)


# ---- schedule

@pytest.mark.parametrize("preset", ["cogvideox-2b", "cogvideox-5b"])
@pytest.mark.parametrize("rescale", [True, False])
def test_alphas_cumprod(preset, rescale):
    config = dataclasses.replace(S.PRESETS[preset], rescale_betas_zero_snr=rescale)
    ours = S.alphas_cumprod(config)
    assert ours.dtype == torch.float64
    for name in PEERS:
        assert torch.equal(ours, peer(name, config).alphas_cumprod)
    assert (ours[-1] == 0) == rescale


@pytest.mark.parametrize("preset", ["cogvideox-2b", "cogvideox-5b"])
@pytest.mark.parametrize("spacing,offset", [("trailing", 0), ("leading", 0), ("leading", 1), ("linspace", 0)])
def test_timesteps(preset, spacing, offset):
    config = dataclasses.replace(S.PRESETS[preset], timestep_spacing=spacing, steps_offset=offset)
    for name in PEERS:
        sched = peer(name, config)
        for n in range(1, 101):
            sched.set_timesteps(n)
            assert S.timesteps(config, n) == sched.timesteps.tolist(), (name, n)


@pytest.mark.parametrize("n,strength", [(10, 0.5), (50, 0.8), (30, 0.35), (7, 1.0)])
def test_strength_timesteps(n, strength):
    config = S.PRESETS["cogvideox-5b"]
    sched = peer("ddim", config)
    sched.set_timesteps(n)
    ref, n_eff = CogVideoXVideoToVideoPipeline.get_timesteps(SimpleNamespace(scheduler=sched), n, sched.timesteps,
                                                             strength, "cpu")
    sampler = S.make_sampler("ddim", config, n, strength)
    assert sampler.timesteps == ref.tolist() and len(sampler.timesteps) == n_eff


# ---- steps

def run_peer(name, config, n, outs, x, dtype, seed, strength=1.0):
    """The diffusers pipeline's loop body around scheduler.step, with a fixed sequence of model outputs."""
    sched = peer(name, config)
    sched.set_timesteps(n)
    ts = CogVideoXVideoToVideoPipeline.get_timesteps(SimpleNamespace(scheduler=sched), n, sched.timesteps,
                                                     strength, "cpu")[0]
    g, old, xs = torch.Generator().manual_seed(seed), None, []
    for i, t in enumerate(ts):
        if name == "ddim":
            x = sched.step(outs[i], t, x, generator=g, return_dict=False)[0]
        else:
            x, old = sched.step(outs[i], old, t, ts[i - 1] if i > 0 else None, x, generator=g, return_dict=False)
        xs.append(x.to(dtype))
        x = xs[-1]
    return xs, g


def run_ours(name, config, n, outs, x, dtype, seed, strength=1.0):
    sampler = S.make_sampler(name, config, n, strength)
    g, xs = torch.Generator().manual_seed(seed), []
    for i in range(len(sampler.timesteps)):
        xs.append(sampler.step(outs[i], i, x, g).to(dtype))
        x = xs[-1]
    return xs, g


CASES = [  # (preset, overrides, N, strength)
    ("cogvideox-2b", {}, 50, 1.0),
    ("cogvideox-5b", {}, 50, 1.0),
    ("cogvideox-5b", {}, 30, 1.0),                               # 1000 % 30 != 0: prev = t - 33, not the next entry
    ("cogvideox-2b", {}, 30, 0.6),                               # video-to-video: prev still uses the full N
    ("cogvideox-2b", {"prediction_type": "sample"}, 50, 1.0),
    ("cogvideox-5b", {"prediction_type": "epsilon", "rescale_betas_zero_snr": False}, 50, 1.0),
    ("cogvideox-2b", {"prediction_type": "epsilon", "rescale_betas_zero_snr": False,
                      "set_alpha_to_one": False, "timestep_spacing": "leading", "steps_offset": 1}, 30, 1.0),
]


@pytest.mark.parametrize("name", ["ddim", "dpm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'-'.join(map(str, c[1].values()))}-{c[2]}-{c[3]}")
def test_step_matches_peer(name, dtype, case):
    preset, overrides, n, strength = case
    config = dataclasses.replace(S.PRESETS[preset], **overrides)
    outs = torch.randn(n, *SHAPE)                     # fp32, as the pipeline's noise_pred.float()
    x = torch.randn(SHAPE).to(dtype)
    ref, g_ref = run_peer(name, config, n, outs, x, dtype, seed=1, strength=strength)
    ours, g_ours = run_ours(name, config, n, outs, x, dtype, seed=1, strength=strength)
    assert len(ours) == len(ref) == int(n * strength)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.dtype == b.dtype == dtype
        assert torch.isfinite(a).all(), i
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m: f"step {i}: {m}")
    # the generators must have been consumed identically (DPM: one draw on the first and last step, two otherwise)
    assert torch.equal(torch.randn(3, generator=g_ref), torch.randn(3, generator=g_ours))


# ---- forward process, guidance

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t", [999, 500, 0, torch.tensor([999, 17]), torch.tensor(321)])
def test_add_noise_and_v_target(dtype, t):
    config = S.PRESETS["cogvideox-2b"]
    sched = peer("ddim", config)
    x0, noise = torch.randn(SHAPE).to(dtype), torch.randn(SHAPE).to(dtype)
    tt = torch.as_tensor(t)
    assert torch.equal(S.add_noise(config, x0, noise, t), sched.add_noise(x0, noise, tt))
    assert torch.equal(S.v_target(config, x0, noise, t), sched.get_velocity(x0, noise, tt))


def test_guidance():
    u, c = torch.randn(SHAPE), torch.randn(SHAPE)
    assert torch.equal(S.guidance(u, c, 0.0), u)
    torch.testing.assert_close(S.guidance(u, c, 1.0), c)  # bit parity with the pipeline: test_denoise_matches_pipeline


# ---- the whole loop against CogVideoXPipeline

@pytest.fixture(scope="module")
def tiny_transformer():
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                        time_embed_dim=8, text_embed_dim=12, num_layers=1, sample_width=4,
                                        sample_height=4, sample_frames=9, patch_size=2, max_text_seq_length=6)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("name,dtype,scale,dynamic,n", [("dpm", torch.float32, 6.0, True, 50),
                                                        ("ddim", torch.float32, 6.0, True, 15),
                                                        ("dpm", torch.bfloat16, 5.0, False, 12),
                                                        ("ddim", torch.bfloat16, 1.0, False, 12)],
                         ids=["dpm-fp32-dynamic50", "ddim-fp32-dynamic15", "dpm-bf16-cfg12", "ddim-bf16-nocfg12"])
def test_denoise_matches_pipeline(tiny_transformer, name, dtype, scale, dynamic, n):
    config = S.PRESETS["cogvideox-2b"]
    model = copy.deepcopy(tiny_transformer).to(dtype)
    pos, neg = torch.randn(1, 6, 12).to(dtype), torch.randn(1, 6, 12).to(dtype)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                             scheduler=peer(name, config))
    pipe.set_progress_bar_config(disable=True)
    scales = []
    ref = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, height=32, width=32, num_frames=9,
               num_inference_steps=n, guidance_scale=scale, use_dynamic_cfg=dynamic, output_type="latent",
               generator=torch.Generator().manual_seed(3),
               callback_on_step_end=lambda p, i, t, kw: scales.append(p.guidance_scale) or {}).frames

    text = torch.cat([neg, pos]) if scale > 1 else pos

    def call(x, t):
        return model(hidden_states=x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 4, 4, 4, generator=g, dtype=dtype)                   # (B, F, C, H, W) as prepare_latents
    with torch.no_grad():
        ours = S.denoise(call, x, S.make_sampler(name, config, n), scale, dynamic, g, progress=False)
    assert ours.dtype == ref.dtype == dtype
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    ts = S.timesteps(config, n)
    expected = [S.dynamic_cfg_scale(scale, t, n) for t in ts] if dynamic else [scale] * n
    assert scales == expected  # the scale the pipeline used at each step, read back from the pipeline itself
    if n == 50:  # N = 50: the oscillating sequence of spec 4.1 (2.29, 2.54, 6.97, ...)
        assert scales[:2] == pytest.approx([2.2915, 2.5435], abs=1e-4) and len(set(scales)) == n
