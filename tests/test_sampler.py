"""sampler.py against diffusers' CogVideoXDDIMScheduler / CogVideoXDPMScheduler, its DDPM, Euler, Euler ancestral and
DPM-Solver++ schedulers on CogVideoX's schedule, and the CogVideoXPipeline loop."""
import contextlib
import copy
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import (CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline,
                       CogVideoXTransformer3DModel, CogVideoXVideoToVideoPipeline, DDPMScheduler,
                       DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler)
from diffusers.schedulers import (scheduling_ddpm, scheduling_dpmsolver_multistep, scheduling_euler_ancestral_discrete,
                                  scheduling_euler_discrete)
from diffusers.utils.torch_utils import randn_tensor

import sampler as S
from checkpoint import CheckpointError

# diffusers' generic schedulers call np.array on a tensor in set_timesteps; numpy 2 warns on every call
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

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
    with pytest.raises(ValueError, match="sampler .heun."):
        S.make_sampler("heun", S.PRESETS["cogvideox-2b"], 50)


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
    ("cogvideox-5b", {"timestep_spacing": "leading"}, 20, 1.0),  # the step before the last lands on prev = 0
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


# ---- ddpm, euler, euler_a and dpm++2m against diffusers' generic schedulers on CogVideoX's schedule
#
# The peers get CogVideoX's schedule as trained_betas, with v-prediction, trailing spacing and rescale_betas_zero_snr
# (whose 2^-24 clamp of ᾱ[999] sampler.py takes over). Two things they add are rounding, not the algorithm, and are
# taken out for the tight comparison ("exact"), then measured on their own:
# 1. trained_betas are cast to float32 and multiplied up in float32: their ᾱ is up to 1.0e-6 (relative) off the
#    float64 schedule of the checkpoints' own schedulers, 1-5e-6 in the latents over a loop.
# 2. Euler and Euler ancestral keep y = x/√ᾱ in fp32. At σ_max ≈ 4096 (the clamp) y is 4096 times the latent, and the
#    first step's cancellation costs 12 bits: up to 1e-4 in the latents after 5 steps.
# "exact": the same scheduler objects and step code, their ᾱ and σ replaced by float64 values from our ᾱ, run on float64
# latents (float64_peers: their `.to(torch.float32)` upcasts become float64; noise still drawn in fp32, then cast).
# Tolerances (max abs): ours in float64 within 1e-6 of the exact peer, step by step over the whole loop, for 5, 20 and
# 50 steps; at fp32 each of our steps within 1e-6 of the exact step, and whole fp32 loops within 5e-6 of the exact
# result (the fp32 floor for 50 steps of random network outputs) and no further from it than diffusers' fp32 loop.

GENERIC = {"ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
           "dpm++2m": DPMSolverMultistepScheduler}


def cogvideox_betas(config):
    """β_t = 1 − ᾱ_t/ᾱ_{t−1} from our float64 ᾱ (the last one is 1: zero terminal SNR)."""
    ac = S.alphas_cumprod(config)
    return (1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])).numpy()


def generic_peer(name, config, karras=False, exact=False):
    sched = GENERIC[name](trained_betas=cogvideox_betas(config), prediction_type="v_prediction",
                          timestep_spacing="trailing", rescale_betas_zero_snr=True,
                          **({"clip_sample": False} if name == "ddpm" else {}),
                          **({"use_karras_sigmas": True} if karras else {}))
    if exact:
        ac = S.alphas_cumprod(config)
        if name != "ddpm":
            ac[-1] = 2 ** -24                          # the peers' own clamp, on the float64 value
        sched.alphas_cumprod = ac
        set_timesteps = sched.set_timesteps

        def set_timesteps64(n, *args, **kwargs):      # set_timesteps ends by casting σ to float32
            set_timesteps(n, *args, **kwargs)
            if name != "ddpm":
                sigma = ((1 - ac) / ac) ** 0.5
                if karras:
                    sigma = torch.from_numpy(sched._convert_to_karras(in_sigmas=sigma.flip(0).numpy(),
                                                                      num_inference_steps=n))
                else:
                    sigma = sigma[sched.timesteps.long()]
                sched.sigmas = torch.cat([sigma, sigma.new_zeros(1)])
        sched.set_timesteps = set_timesteps64
    return sched


class _Torch64:
    def __getattr__(self, name):  # `torch` as the peers' modules see it under float64_peers
        return torch.float64 if name == "float32" else getattr(torch, name)


def _randn32(shape, generator=None, device=None, dtype=None, layout=None):
    return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)


@contextlib.contextmanager
def float64_peers():
    """The peers' step code in float64: their explicit upcasts to float32 become float64; noise is still drawn in fp32
    (and cast), so the random numbers stay those of an fp32 run."""
    with pytest.MonkeyPatch.context() as mp:
        for module in (scheduling_euler_discrete, scheduling_euler_ancestral_discrete, scheduling_dpmsolver_multistep):
            mp.setattr(module, "torch", _Torch64())
        for module in (scheduling_ddpm, scheduling_euler_ancestral_discrete):
            mp.setattr(module, "randn_tensor", _randn32)
        yield


def run_generic_peer(name, config, n, outs, x, karras=False, strength=1.0, exact=False):
    """The pipelines' loop around the peer with a fixed sequence of network outputs. x: the initial noise, or with
    strength < 1 (video latents, noise). Returns the latents the network sees at each later step, then the result."""
    dtype = torch.float64 if exact else torch.float32
    sched = generic_peer(name, config, karras, exact)
    sched.set_timesteps(n)
    ts = CogVideoXVideoToVideoPipeline.get_timesteps(SimpleNamespace(scheduler=sched), n, sched.timesteps,
                                                     strength, "cpu")[0]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(n - len(ts))  # unset, a repeated first timestep breaks Karras (test_karras_peer_...)
    if strength < 1:  # add_noise alone: the video-to-video pipeline also multiplies by init_noise_sigma (test_v2v_...)
        x = sched.add_noise(x[0].to(dtype), x[1].to(dtype), ts[:1])
    else:
        x = x.to(dtype) * sched.init_noise_sigma
    g, seen = torch.Generator().manual_seed(1), []
    with float64_peers() if exact else contextlib.nullcontext():
        for i, t in enumerate(ts):
            x_in = sched.scale_model_input(x, t)
            if i:
                seen.append(x_in)
            x = sched.step(outs[i].to(dtype), t, x, generator=g, return_dict=False)[0]
    return seen + [x], g


def run_generic_ours(name, config, n, outs, x, karras=False, strength=1.0, dtype=torch.float32, start=None):
    """Our loop; start: a reference trajectory to take each step from instead (step-by-step comparison)."""
    sampler = S.make_sampler(name, config, n, strength, karras)
    x = S.add_noise(config, x[0].to(dtype), x[1].to(dtype), sampler.timesteps[0]) if strength < 1 else x.to(dtype)
    g, xs = torch.Generator().manual_seed(1), []
    for i in range(len(sampler.timesteps)):
        x_i = x if start is None or i == 0 else start[i - 1].to(dtype)
        x = sampler.step(outs[i].to(dtype), i, x_i, g).to(dtype)
        xs.append(x)
    return xs, g


def max_err(xs, ref):
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(xs, ref))


GENERIC_CASES = [(name, preset, n, False, 1.0) for name in GENERIC for preset in ("cogvideox-2b", "cogvideox-5b")
                 for n in (5, 20, 50)]
GENERIC_CASES += [("dpm++2m", preset, n, True, 1.0) for preset in ("cogvideox-2b", "cogvideox-5b") for n in (5, 20, 50)]
GENERIC_CASES += [(name, "cogvideox-5b", 20, False, 0.6) for name in GENERIC]       # video-to-video


@pytest.mark.parametrize("case", GENERIC_CASES, ids=lambda c: f"{c[0]}{'-karras' if c[3] else ''}-{c[1][-2:]}-{c[2]}"
                                                             f"{'-v2v' if c[4] < 1 else ''}")
def test_generic_sampler_matches_peer(case):
    name, preset, n, karras, strength = case
    config = S.PRESETS[preset]
    outs = torch.randn(n, *SHAPE)
    x = torch.randn(SHAPE) if strength == 1 else (torch.randn(SHAPE), torch.randn(SHAPE))
    exact, g_exact = run_generic_peer(name, config, n, outs, x, karras, strength, exact=True)
    assert len(exact) == int(n * strength)
    # the algorithm: ours in float64 against the exact peer, at every step, consuming the same random numbers
    ours, g_ours = run_generic_ours(name, config, n, outs, x, karras, strength, torch.float64)
    for i, (a, b) in enumerate(zip(ours, exact, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m: f"step {i}: {m}")
    assert torch.equal(torch.randn(3, generator=g_exact), torch.randn(3, generator=g_ours))
    # fp32: each step, taken from the exact latents, within 1e-6 of the exact step
    steps, _ = run_generic_ours(name, config, n, outs, x, karras, strength, start=exact)
    for i, (a, b) in enumerate(zip(steps, exact, strict=True)):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-6, msg=lambda m: f"step {i}: {m}")
    # fp32 loops: ours within the fp32 floor of the exact result, and no further from it than diffusers' own
    err_ours = max_err(run_generic_ours(name, config, n, outs, x, karras, strength)[0], exact)
    err_peer = max_err(run_generic_peer(name, config, n, outs, x, karras, strength)[0], exact)
    assert err_ours <= 5e-6 and err_ours <= err_peer, (err_ours, err_peer)
    if name.startswith("euler") and n == 5 and strength == 1:
        assert err_peer > 10 * err_ours  # the peer's fp32 y = x/√ᾱ at σ = 4096 (comment above)


@pytest.mark.parametrize("preset", ["cogvideox-2b", "cogvideox-5b"])
def test_generic_timesteps_match_peer(preset):
    """The integer timesteps the network sees, N = 1..100 (for Karras: rounded from the fractional t of each level)."""
    config = S.PRESETS[preset]
    for name, karras in [(name, False) for name in GENERIC] + [("dpm++2m", True)]:
        sched = generic_peer(name, config, karras)
        for n in range(1, 101):
            sched.set_timesteps(n)
            assert S.make_sampler(name, config, n, karras=karras).timesteps == sched.timesteps.tolist(), (name, n)


def test_karras_peer_breaks_on_repeated_first_timestep():
    """Karras levels from σ_max ≈ 4096 round to t = 999 more than once on the 5b schedule from N = 21 on. Run as
    CogVideoXPipeline runs it (no set_begin_index), diffusers' first-step lookup takes the second 999 (meant for a
    video-to-video start), skips the first level and fails on the last step. Ours steps through every level in order,
    as the peer does once its begin index is set (the comparisons above)."""
    config, n = S.PRESETS["cogvideox-5b"], 21
    sampler = S.make_sampler("dpm++2m", config, n, karras=True)
    assert sampler.timesteps[:2] == [999, 999] and len(sampler.timesteps) == n
    assert (sampler.levels.diff() > 0).all()   # distinct levels, noisiest first
    sched = generic_peer("dpm++2m", config, karras=True)
    sched.set_timesteps(n)
    x = torch.randn(SHAPE)
    with pytest.raises(IndexError):
        for t in sched.timesteps:
            x = sched.step(torch.randn(SHAPE), t, x, return_dict=False)[0]


@pytest.mark.parametrize("name", ["euler", "euler_a"])
def test_v2v_peer_pipeline_scales_euler_start_by_sigma_max(name):
    """CogVideoXVideoToVideoPipeline multiplies scheduler.add_noise(video, noise, t) by init_noise_sigma, a no-op for
    its own schedulers (1.0) but ~4096 for Euler on the zero-SNR schedule: the network then sees the noised video 4096
    times too loud. Ours starts from add_noise(config, ...) on the latents as the network sees them, which is what
    add_noise followed by scale_model_input gives in diffusers."""
    config, n = S.PRESETS["cogvideox-5b"], 20
    sched = generic_peer(name, config)
    sched.set_timesteps(n)
    ts = sched.timesteps[n - 12:]
    z = torch.randn(1, 3, 4, 4, 4)                                       # the video's latents (B, F, C, H, W)
    vae = SimpleNamespace(encode=lambda v: SimpleNamespace(latent_dist=SimpleNamespace(
        sample=lambda generator: z.permute(0, 2, 1, 3, 4))))
    fake = SimpleNamespace(vae=vae, vae_scale_factor_temporal=4, vae_scale_factor_spatial=8,
                           vae_scaling_factor_image=1.0, scheduler=sched)
    latents = CogVideoXVideoToVideoPipeline.prepare_latents(
        fake, torch.zeros(1, 3, 9, 32, 32), 1, 4, 32, 32, torch.float32, "cpu", torch.Generator().manual_seed(5),
        None, ts[:1])
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    right = sched.add_noise(z, noise, ts[:1])
    assert float(sched.init_noise_sigma) == pytest.approx(4096, rel=1e-6)
    torch.testing.assert_close(latents, right * sched.init_noise_sigma)
    sched.set_begin_index(n - 12)
    ours = S.add_noise(config, z, noise, S.make_sampler(name, config, n, 0.6).timesteps[0])
    torch.testing.assert_close(ours, sched.scale_model_input(right, ts[0]), rtol=0, atol=1e-6)


def test_euler_is_ddim_and_euler_a_is_ddpm():
    """The docstrings' equivalences, where no zero-SNR clamp separates them (SNR > 0 at t = 999)."""
    config = dataclasses.replace(S.PRESETS["cogvideox-2b"], rescale_betas_zero_snr=False)
    n = 20
    outs, x = torch.randn(n, *SHAPE).double(), torch.randn(SHAPE).double()
    for a, b in (("euler", "ddim"), ("euler_a", "ddpm")):
        xs = {}
        for name in (a, b):
            sampler, g, y = S.make_sampler(name, config, n), torch.Generator().manual_seed(0), x
            for i in range(n):
                y = sampler.step(outs[i], i, y, g)
            xs[name] = y
        torch.testing.assert_close(xs[a], xs[b], rtol=0, atol=1e-10)


def test_karras_only_where_supported():
    for name in S.SAMPLERS:
        if name in S.KARRAS:
            S.make_sampler(name, S.PRESETS["cogvideox-5b"], 10, karras=True)
        else:
            with pytest.raises(ValueError, match=f"sampler '{name}' has no Karras spacing"):
                S.make_sampler(name, S.PRESETS["cogvideox-5b"], 10, karras=True)
    # video-to-video with Karras: the solver starts at the integer timestep's level, where add_noise puts the latents
    sampler = S.make_sampler("dpm++2m", S.PRESETS["cogvideox-5b"], 10, strength=0.5, karras=True)
    assert sampler.levels[0] == S.alphas_cumprod(S.PRESETS["cogvideox-5b"])[sampler.timesteps[0]]


PIPELINE_CASES = [("ddpm", False, 12), ("euler", False, 5), ("euler_a", False, 20), ("dpm++2m", False, 12),
                  ("dpm++2m", True, 12)]


@pytest.mark.parametrize("name,karras,n", PIPELINE_CASES, ids=lambda v: str(v) if not isinstance(v, bool) else
                         ("karras" if v else "plain"))
def test_generic_denoise_matches_pipeline(tiny_transformer, name, karras, n):
    """Each generic peer swapped into CogVideoXPipeline (guidance 6): init_noise_sigma, scale_model_input, Euler's
    float timesteps, the seed's stream (initial noise, then the ancestral draws). In float64 with the exact peer (see
    above) within 1e-6; as configured, at fp32, within 5e-5: the peer's own fp32 rounding (2-4e-5 measured for Euler
    at 5 steps)."""
    config = S.PRESETS["cogvideox-2b"]
    for dtype, exact, tol in ((torch.float64, True, 1e-6), (torch.float32, False, 5e-5)):
        model = copy.deepcopy(tiny_transformer).to(dtype)
        pos, neg = torch.randn(1, 6, 12).to(dtype), torch.randn(1, 6, 12).to(dtype)
        sched = generic_peer(name, config, karras, exact)
        pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        with float64_peers() if exact else contextlib.nullcontext():
            ref = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, height=32, width=32, num_frames=9,
                       num_inference_steps=n, guidance_scale=6.0, output_type="latent",
                       generator=torch.Generator().manual_seed(3)).frames
        text = torch.cat([neg, pos])

        def call(x, t):
            return model(hidden_states=x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]

        g = torch.Generator().manual_seed(3)
        x = torch.randn(1, 3, 4, 4, 4, generator=g, dtype=dtype)
        if exact:  # the pipeline's start as the network sees it: ε σ_max/√(σ_max² + 1) = ε (1 − 3e-8) for Euler
            sigma = torch.as_tensor(sched.init_noise_sigma, dtype=dtype)
            x = x * (sigma / (sigma ** 2 + 1) ** 0.5 if name.startswith("euler") else 1)
        with torch.no_grad():
            ours = S.denoise(call, x, S.make_sampler(name, config, n, karras=karras), 6.0, False, g, progress=False)
        assert ours.dtype == ref.dtype == dtype
        torch.testing.assert_close(ours, ref, rtol=0, atol=tol, msg=lambda m: f"{dtype}: {m}")


def test_karras_peer_pipeline_fails_on_5b(tiny_transformer):
    """test_karras_peer_breaks_on_repeated_first_timestep, as a user meets it: DPM-Solver++ with Karras sigmas swapped
    into CogVideoXPipeline on the 5b schedule stops with an IndexError at 21 steps or more; ours runs."""
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tiny_transformer,
                             scheduler=generic_peer("dpm++2m", S.PRESETS["cogvideox-5b"], karras=True))
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(IndexError):
        pipe(prompt_embeds=torch.randn(1, 6, 12), height=32, width=32, num_frames=9, num_inference_steps=21,
             guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(3))
    x = S.denoise(lambda x, t: tiny_transformer(hidden_states=x, encoder_hidden_states=torch.randn(1, 6, 12),
                                                timestep=t, return_dict=False)[0],
                  torch.randn(1, 3, 4, 4, 4), S.make_sampler("dpm++2m", S.PRESETS["cogvideox-5b"], 21, karras=True),
                  progress=False)
    assert torch.isfinite(x).all()


# ---- found by mutation testing (bench/MUTANTS.md) ----------------------------------------------------------------

def test_trained_betas_are_refused(tmp_path):
    """A schedule given as trained_betas is not one this module can build: refused, not silently replaced by the
    beta_start/beta_end schedule."""
    sched = CogVideoXDDIMScheduler(trained_betas=cogvideox_betas(S.PRESETS["cogvideox-2b"]).tolist())
    sched.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="trained_betas is not supported"):
        S.load_scheduler_config(str(tmp_path))


def pipeline_and_ours(tiny_transformer, name, scale, n, num_videos=1, **ours_kwargs):
    """CogVideoXPipeline's latents with the pipeline's own defaults (no use_dynamic_cfg), and ours from denoise with
    its defaults (no dynamic_cfg argument), for num_videos videos of one prompt (its embeddings repeated, as
    encode_prompt repeats them)."""
    config = S.PRESETS["cogvideox-2b"]
    pos, neg = torch.randn(1, 6, 12).repeat(num_videos, 1, 1), torch.randn(1, 6, 12).repeat(num_videos, 1, 1)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tiny_transformer,
                             scheduler=peer(name, config))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, height=32, width=32, num_frames=9,
               num_inference_steps=n, guidance_scale=scale, output_type="latent",
               generator=torch.Generator().manual_seed(3)).frames
    text = torch.cat([neg, pos]) if scale > 1 else pos

    def call(x, t):
        return tiny_transformer(hidden_states=x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]

    g = torch.Generator().manual_seed(3)
    x = torch.randn(num_videos, 3, 4, 4, 4, generator=g)
    with torch.no_grad():
        ours = S.denoise(call, x, S.make_sampler(name, config, n), scale, generator=g, **ours_kwargs)
    return ours, ref


def test_denoise_defaults_and_small_guidance(tiny_transformer):
    """Guidance 1.5 still guides (the pipelines guide whenever the scale is above 1), and without dynamic_cfg the
    scale is constant, the pipelines' default (edit.py relies on this default)."""
    ours, ref = pipeline_and_ours(tiny_transformer, "ddim", 1.5, 4, progress=False)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    ours, ref = pipeline_and_ours(tiny_transformer, "dpm", 6.0, 4, progress=False)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_denoise_three_videos(tiny_transformer):
    """Three videos at once (B = 3, six network rows under guidance) split back into their unconditional and
    conditional halves as the pipeline splits them."""
    ours, ref = pipeline_and_ours(tiny_transformer, "ddim", 6.0, 3, num_videos=3, progress=False)
    assert ours.shape[0] == 3
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(GENERIC))
def test_generic_samplers_step_in_fp32_for_bf16_latents(name):
    """The generic samplers compute in fp32 at least whatever the latent dtype (as diffusers' Euler and DPM-Solver
    schedulers upcast): a step on bf16 latents is the step on the same values in fp32, bit for bit."""
    config, n = S.PRESETS["cogvideox-5b"], 6
    outs, x = torch.randn(n, *SHAPE), torch.randn(SHAPE).to(torch.bfloat16)
    results = []
    for dtype in (torch.bfloat16, torch.float32):  # the same bf16 values each step, held as bf16 or as fp32
        sampler, g, y, ys = S.make_sampler(name, config, n), torch.Generator().manual_seed(0), x, []
        for i in range(n):
            ys.append(sampler.step(outs[i], i, y.to(dtype), g))
            y = ys[-1].to(torch.bfloat16)  # as denoise keeps bf16 latents between steps
        results.append(ys)
    for i, (a, b) in enumerate(zip(*results)):
        assert a.dtype == b.dtype == torch.float32, i
        assert torch.equal(a, b), i


def test_schedule_bounds():
    """N = T steps is allowed (diffusers allows it), N = 0 or N > T is refused; so is a strength that keeps no step."""
    config = S.PRESETS["cogvideox-2b"]
    sched = peer("ddim", config)
    sched.set_timesteps(1000)
    assert S.timesteps(config, 1000) == sched.timesteps.tolist()
    for n in (0, 1001):
        with pytest.raises(ValueError, match=f"num_steps={n} must be between 1 and num_train_timesteps=1000"):
            S.timesteps(config, n)
    with pytest.raises(ValueError, match=r"strength=0.05 keeps no step of 10; use a strength in \(1/10, 1\]"):
        S.make_sampler("ddim", config, 10, strength=0.05)


@pytest.mark.parametrize("name", S.SAMPLERS)
def test_a_sampler_can_be_run_twice(name):
    """A Sampler keeps the last x0 estimate for the multistep solvers; a second run with the same object starts
    afresh (first order on its first step), exactly as a new sampler does."""
    config, n = S.PRESETS["cogvideox-5b"], 5
    outs, x = torch.randn(n, *SHAPE), torch.randn(SHAPE)

    def run(sampler):
        g, y = torch.Generator().manual_seed(0), x
        for i in range(n):
            y = sampler.step(outs[i], i, y, g)
        return y
    sampler = S.make_sampler(name, config, n)
    first = run(sampler)
    assert torch.equal(run(sampler), first) and torch.equal(run(S.make_sampler(name, config, n)), first)


@pytest.mark.parametrize("zero_snr", [False, True], ids=["snr", "zero-snr"])
@pytest.mark.parametrize("name", S.SAMPLERS)
def test_multistep_history_step_by_step(name, zero_snr):
    """The one piece of state a Sampler carries from step to step is the last x0 estimate, which the multistep DPMs
    extrapolate from. Which one each step uses, worked out from the definitions (dpm_step, dpmpp_2m_step; Sampler.step)
    for 5 steps of the 5b schedule (timesteps 999, 799, 599, 399, 199):
        step 0: first order, no history (D = x0)
        steps 1, 2, 3: second order, with the x0 of the step just before (i - 1) of the same run
        step 4: first order: dpm: prev = 199 - 1000 // 5 < 0 (the official rule); dpm++2m: sigma_next = 0
    except, with the zero terminal SNR of the released models, dpm's step 1: it takes the second-order path (two
    noise draws, the official quirk) but ᾱ(999) = 0 puts λ there at −∞, so r = ∞ and the history's weight 1/2r is 0:
    any history gives the same step, and no history (the first-order path, one draw) does not;
    and a second run with the same Sampler starts afresh (generate.plan makes one Sampler for all the videos of a
    request): steps 0 and 4 first order again, steps 1-3 on the second run's own x0s. The other samplers keep no
    history. Observed with the public step() alone: each step is given its own latents, output and generator, and
    the candidates that reproduce its result bit for bit on a fresh sampler are listed: step i alone (None), or step
    j of either run first, then step i ((run, j)). A step that uses no history is reproduced by every candidate; one
    that extrapolates from step j's x0 by (run, j) alone."""
    config, n = dataclasses.replace(S.PRESETS["cogvideox-5b"], rescale_betas_zero_snr=zero_snr), 5
    runs = [[(torch.randn(SHAPE), torch.randn(SHAPE)) for _ in range(n)] for _ in range(2)]  # (out, x) per step

    def call(sampler, run, i):
        out, x = runs[run][i]
        return sampler.step(out, i, x, torch.Generator().manual_seed(100 * run + i))

    sampler = S.make_sampler(name, config, n)
    assert sampler.timesteps == [999, 799, 599, 399, 199]
    results = [[call(sampler, run, i) for i in range(n)] for run in range(2)]  # two runs, one Sampler

    def used(run, i):
        found = [None] if torch.equal(call(S.make_sampler(name, config, n), run, i), results[run][i]) else []
        for r, j in [(r, j) for r in range(2) for j in range(n)]:
            fresh = S.make_sampler(name, config, n)
            call(fresh, r, j)
            if torch.equal(call(fresh, run, i), results[run][i]):
                found.append((r, j))
        return found

    every = [None] + [(r, j) for r in range(2) for j in range(n)]
    for run in range(2):
        if name in ("dpm", "dpm++2m"):
            expected = [every, every[1:] if zero_snr and name == "dpm" else [(run, 0)], [(run, 1)], [(run, 2)], every]
        else:
            expected = [every] * n
        assert [used(run, i) for i in range(n)] == expected, run


@pytest.mark.parametrize("offset", [0, 1])
def test_ddpm_draws_noise_on_every_step_with_t_above_zero(offset):
    """DDPM adds noise on every step whose t > 0 (DDPMScheduler's rule): with "leading" spacing the run ends at t = 0
    (no draw) or, with steps_offset 1, at t = 1 (a draw). Same latents and the same generator state as the peer."""
    config = dataclasses.replace(S.PRESETS["cogvideox-5b"], timestep_spacing="leading", steps_offset=offset)
    n = 5
    sched = DDPMScheduler(trained_betas=cogvideox_betas(config), prediction_type="v_prediction",
                          timestep_spacing="leading", steps_offset=offset, rescale_betas_zero_snr=True, clip_sample=False)
    sched.set_timesteps(n)
    sampler = S.make_sampler("ddpm", config, n)
    assert sampler.timesteps == sched.timesteps.tolist() and sampler.timesteps[-1] == offset
    outs, x = torch.randn(n, *SHAPE), torch.randn(SHAPE)
    g_ref, g_ours, ref, ours = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1), x, x
    for i, t in enumerate(sched.timesteps):
        ref = sched.step(outs[i], t, ref, generator=g_ref, return_dict=False)[0]
        ours = sampler.step(outs[i], i, ours, g_ours)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)  # the peer's float32 trained_betas (comment above)
    assert torch.equal(torch.randn(3, generator=g_ref), torch.randn(3, generator=g_ours))


@pytest.mark.parametrize("scale", [1.0, 1.5, 6.0])
def test_invert_with_guidance_matches_ddim_inverse_scheduler(scale):
    """invert's guidance branch: above 1 the model sees [x; x] and the two halves are combined as the pipelines
    combine them (uncond + scale (cond - uncond)), at 1 a single branch; each step is DDIMInverseScheduler's.
    The latents keep their dtype."""
    from diffusers import DDIMInverseScheduler
    config = dataclasses.replace(S.PRESETS["cogvideox-5b"], rescale_betas_zero_snr=False)
    w = 0.9 + 0.1 * torch.randn(2, *SHAPE[1:]).double()  # the "network": a different linear map per branch

    def branch(x, j, t):
        return x.double() * w[j] + t / 1000

    def model(x, t):
        assert len(x) == (2 * SHAPE[0] if scale > 1 else SHAPE[0]) and (t == t[0]).all()
        halves = x.chunk(2) if scale > 1 else [x]
        return torch.cat([branch(h, j if scale > 1 else 1, int(t[0])) for j, h in enumerate(halves)]).to(x.dtype)
    sampler = S.make_sampler("ddim", config, 6)
    x0 = torch.randn(SHAPE).double()
    kw = {} if scale == 1 else {"guidance_scale": scale}  # the default is 1 (edit.py relies on it)
    ours = S.invert(model, x0, sampler, progress=False, **kw)
    assert all(x.dtype == torch.float64 for x in ours)
    assert all(x.dtype == torch.bfloat16 for x in S.invert(model, x0.bfloat16(), sampler, scale, progress=False))
    peer = DDIMInverseScheduler(**{k: v for k, v in dataclasses.asdict(config).items() if k != "snr_shift_scale"})
    peer.alphas_cumprod = S.alphas_cumprod(config)
    peer.initial_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    peer.set_timesteps(6)
    x = x0
    for i, t in enumerate(peer.timesteps):
        uncond, cond = branch(x, 0, int(t)), branch(x, 1, int(t))
        out = cond if scale <= 1 else uncond + scale * (cond - uncond)
        x = peer.step(out, int(t), x, return_dict=False)[0]
        torch.testing.assert_close(ours[len(ours) - 1 - i], x, rtol=1e-6, atol=1e-6)
