"""The CogVideoX noise schedule, the DDIM and DPM samplers and classifier-free guidance: everything between
noise and clean latents except the network. Legend: B batch, F latent frames, C channels, H/W latent height/width.

The schedule is the one `scheduler/scheduler_config.json` describes: scaled-linear betas, an SNR shift and a
zero-terminal-SNR rescale, in float64. Two solvers share it: DDIM (deterministic, the checkpoints' default) and the
CogVideoX DPM sampler (DPM-Solver++(2M) with a noise term, used by THUDM's 5B demos). Both match diffusers step for
step: 0-d float64 coefficients times the latents (scalar-tensor promotion keeps the latent dtype), and DPM draws
its noise from the caller's generator exactly as diffusers does (one draw on the first and last step, two between).

API
    config = load_scheduler_config(snapshot)            # or PRESETS["cogvideox-2b"] / PRESETS["cogvideox-5b"]
    sampler = make_sampler("dpm", config, 50)           # "ddim" | "dpm"; strength=0.8: last 80% (video-to-video)
    sampler.timesteps                                   # list[int]: [999, 979, ..., 19]
    x = sampler.step(model_output, i, x, generator)     # one update at sampler.timesteps[i]; keeps the x0 estimate
    x = denoise(model, x, sampler, guidance_scale=6.0, dynamic_cfg=False, generator=g)   # the whole loop
    trajectory = invert(model, x0, make_sampler("ddim", config, 50))  # DDIM inversion, the mirror of denoise
    guidance(uncond, cond, scale); dynamic_cfg_scale(scale, t, num_steps)
    add_noise(config, x0, noise, t); v_target(config, x0, noise, t)                       # video-to-video, training
"""
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import CheckpointError, config_from_dict, read_json


@dataclass
class SchedulerConfig:
    """Fields of scheduler_config.json. Defaults are diffusers' code defaults, so a file that omits a key loads as
    diffusers loads it; the official values are in PRESETS."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    clip_sample: bool = True             # kept to mirror the file: the CogVideoX schedulers never clip
    set_alpha_to_one: bool = True        # ᾱ after the last step: 1, else ᾱ[0]
    steps_offset: int = 0                # added to "leading" timesteps only
    prediction_type: str = "epsilon"     # "v_prediction" | "epsilon" | "sample"
    timestep_spacing: str = "leading"    # "trailing" | "leading" | "linspace"
    rescale_betas_zero_snr: bool = False
    snr_shift_scale: float = 3.0

    def __post_init__(self):
        for key, allowed in (("beta_schedule", ("scaled_linear",)),
                             ("prediction_type", ("v_prediction", "epsilon", "sample")),
                             ("timestep_spacing", ("trailing", "leading", "linspace"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"scheduler config: {key}={getattr(self, key)!r} is unsupported, use one of {allowed}")


_OFFICIAL = dict(clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                 timestep_spacing="trailing")
PRESETS = {
    "cogvideox-2b": SchedulerConfig(**_OFFICIAL, snr_shift_scale=3.0),
    "cogvideox-5b": SchedulerConfig(**_OFFICIAL, snr_shift_scale=1.0),  # also 5b-I2V and the 1.5 models
}


def load_scheduler_config(path: str) -> SchedulerConfig:
    """`path`: scheduler_config.json, the `scheduler/` folder or the snapshot root."""
    if os.path.isdir(os.path.join(path, "scheduler")):
        path = os.path.join(path, "scheduler")
    if os.path.isdir(path):
        path = os.path.join(path, "scheduler_config.json")
    d = read_json(path)
    if d.get("trained_betas") is not None:
        raise CheckpointError(f"{path}: trained_betas is not supported; delete it to use beta_start/beta_end")
    try:
        return config_from_dict(SchedulerConfig, d)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def alphas_cumprod(config: SchedulerConfig) -> torch.Tensor:
    """ᾱ_t for t = 0..T-1, (T,) float64. The SNR shift divides SNR(t) = ᾱ/(1−ᾱ) by s, moving every timestep towards
    noise (the CogVideoX paper's answer to high-resolution video); the rescale (Lin et al. 2023, Algorithm 1) makes
    ᾱ_{T-1} exactly 0, so the first step starts from pure noise, which is why the models predict v."""
    betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.num_train_timesteps,
                           dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    s = config.snr_shift_scale
    ac = ac / (s + (1 - s) * ac)
    if config.rescale_betas_zero_snr:
        a = ac.sqrt()
        a0, a_last = a[0], a[-1]
        ac = ((a - a_last) * (a0 / (a0 - a_last))) ** 2
    return ac


def timesteps(config: SchedulerConfig, num_steps: int) -> list[int]:
    """The N timesteps to visit, high noise first (Lin et al. 2023, Table 2). numpy, as diffusers, so that the
    float rounding (and even the length) agrees for every N."""
    T = config.num_train_timesteps
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps={num_steps} must be between 1 and num_train_timesteps={T}")
    if config.timestep_spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / num_steps)) - 1
    elif config.timestep_spacing == "leading":
        ts = np.arange(num_steps)[::-1] * (T // num_steps) + config.steps_offset
    else:  # linspace
        ts = np.round(np.linspace(0, T - 1, num_steps))[::-1]
    return [int(t) for t in ts]


def strength_timesteps(ts: list[int], strength: float) -> list[int]:
    """Video-to-video: skip the noisiest steps and start from the input video noised to ts[start]."""
    keep = min(int(len(ts) * strength), len(ts))
    if keep < 1:
        raise ValueError(f"strength={strength} keeps no step of {len(ts)}; use a strength in (1/{len(ts)}, 1]")
    return ts[len(ts) - keep:]


def _coefficients(config, t, like):
    """√ᾱ_t and √(1−ᾱ_t) broadcastable to `like`; cast to its dtype *before* the sqrt, as diffusers does."""
    a = alphas_cumprod(config).to(like.device, like.dtype)[torch.as_tensor(t, device=like.device)]
    a = a.flatten().view(-1, *[1] * (like.ndim - 1))                             # (B or 1, 1, 1, 1, 1)
    return a ** 0.5, (1 - a) ** 0.5


def add_noise(config, x0, noise, t):
    """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε. x0, noise (B, F, C, H, W); t an int or (B,) int64."""
    sa, s1a = _coefficients(config, t, x0)
    return sa * x0 + s1a * noise


def v_target(config, x0, noise, t):
    """v = √ᾱ_t ε − √(1−ᾱ_t) x0 (Salimans & Ho 2022), the target of v-prediction. Called with (v, x_t) in place of
    (x0, noise) it returns √ᾱ x_t − √(1−ᾱ) v = x0, the estimate the diffusers training scripts compare against."""
    sa, s1a = _coefficients(config, t, x0)
    return sa * noise - s1a * x0


def predict_x0(prediction_type, out, x, a):
    """The clean-latent estimate from the network output at ᾱ_t = a."""
    if prediction_type == "v_prediction":
        return a ** 0.5 * x - (1 - a) ** 0.5 * out   # x0 = √ᾱ x − √(1−ᾱ) v
    if prediction_type == "epsilon":
        return (x - (1 - a) ** 0.5 * out) / a ** 0.5  # x0 = (x − √(1−ᾱ) ε) / √ᾱ
    return out


def ddim_step(x, x0, a, a_prev):
    """DDIM with η = 0 (Song et al. 2021, eq. 12): x_prev = √ᾱ_prev x0 + √(1−ᾱ_prev) ε̂ with ε̂ = (x − √ᾱ x0)/√(1−ᾱ),
    regrouped as c_x·x + c_0·x0 (finite at ᾱ = 0, the first step)."""
    c_x = ((1 - a_prev) / (1 - a)) ** 0.5
    c_0 = a_prev ** 0.5 - a ** 0.5 * c_x
    return c_x * x + c_0 * x0


def predict_eps(prediction_type, out, x, a):
    """The noise estimate from the network output at ᾱ_t = a (what DDIM inversion moves along)."""
    if prediction_type == "v_prediction":
        return a ** 0.5 * out + (1 - a) ** 0.5 * x    # ε = √ᾱ v + √(1−ᾱ) x
    if prediction_type == "epsilon":
        return out
    return (x - a ** 0.5 * out) / (1 - a) ** 0.5      # from x0 = out


def ddim_inverse_step(x0, eps, a_next):
    """DDIM run backwards, towards noise (Song et al. 2021, sec. 4.3: the η = 0 sampler is an ODE, so it encodes too):
    x_next = √ᾱ_next x0 + √(1−ᾱ_next) ε̂, taken from the lower noise level to the higher one. ε̂ comes from the
    network output rather than (x − √ᾱ x0)/√(1−ᾱ), because inversion starts at ᾱ = 1 where that is 0/0."""
    return a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps


def _lam(a):
    return ((a / (1 - a)) ** 0.5).log()  # λ = log(α/σ), half the log-SNR


def _randn(x, generator):
    # drawn where the generator lives (a CPU generator gives the same numbers for latents on any device), as diffusers
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def dpm_step(x, x0, a, a_prev, generator, old_x0=None, a_back=None):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095; SAT's VPSDEDPMPP2MSampler). With h = λ_prev − λ_t:
        x_prev = (σ_prev/σ_t) e^{−h} x + α_prev (1 − e^{−2h}) D + σ_prev √(1 − e^{−2h}) z,
    D = x0 on the first step, else the multistep extrapolation (1 + 1/2r) x0 − (1/2r) old_x0 with r = h_last/h."""
    h = _lam(a_prev) - _lam(a)
    m_x = ((1 - a_prev) / (1 - a)) ** 0.5 * (-h).exp()
    m_0 = (-2 * h).expm1() * a_prev ** 0.5           # = −α_prev (1 − e^{−2h})
    m_z = (1 - a_prev) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
    z = _randn(x, generator)
    if old_x0 is None:
        return m_x * x - m_0 * x0 + m_z * z
    r = (_lam(a) - _lam(a_back)) / h
    d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * old_x0
    z = _randn(x, generator)  # official quirk: a second draw replaces the first, so both are consumed
    return m_x * x - m_0 * d + m_z * z


@dataclass
class Sampler:
    """One sampling run: the timesteps, the schedule and the last x0 estimate (DPM's multistep term uses it)."""
    solver: str                     # "ddim" | "dpm"
    config: SchedulerConfig
    num_steps: int                  # N of the full schedule, before any strength cut
    timesteps: list[int]
    alphas_cumprod: torch.Tensor    # (T,) float64 on CPU: 0-d entries act as scalars for latents on any device
    x0: torch.Tensor | None = None

    def alpha(self, t: int) -> torch.Tensor:
        if t >= 0:
            return self.alphas_cumprod[t]
        return torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]  # float32, as diffusers

    def step(self, out, i, x, generator=None):
        """x at timesteps[i] -> x at the next noise level. out: the network output (guided), x (B, F, C, H, W)."""
        t = self.timesteps[i]
        prev = t - self.config.num_train_timesteps // self.num_steps  # official quirk: t − T//N, not timesteps[i+1]
        a, a_prev = self.alpha(t), self.alpha(prev)
        x0 = predict_x0(self.config.prediction_type, out, x, a)
        if self.solver == "ddim":
            x = ddim_step(x, x0, a, a_prev)
        elif i > 0 and prev >= 0:
            x = dpm_step(x, x0, a, a_prev, generator, self.x0, self.alpha(self.timesteps[i - 1]))
        else:
            x = dpm_step(x, x0, a, a_prev, generator)
        self.x0 = x0
        return x

    def invert_step(self, out, i, x):
        """The mirror of `step` (DDIM only): x at the level step i lands on -> x at timesteps[i]. The network is asked at
        timesteps[i], the level x is heading to, exactly as `step` asks it at the level it leaves: inversion assumes
        the two are close (diffusers' DDIMInverseScheduler, used by the official ddim_inversion.py, does the same)."""
        if self.solver != "ddim":
            raise ValueError(f"inversion needs the deterministic DDIM sampler, not {self.solver!r}")
        t = self.timesteps[i]
        a, a_next = self.alpha(t - self.config.num_train_timesteps // self.num_steps), self.alpha(t)
        x0 = predict_x0(self.config.prediction_type, out, x, a)
        return ddim_inverse_step(x0, predict_eps(self.config.prediction_type, out, x, a), a_next)


SAMPLERS = ("ddim", "dpm")   # the names make_sampler, generate(sampler=...) and --sampler accept


def make_sampler(name: str, config: SchedulerConfig, num_steps: int, strength: float = 1.0,
                 karras: bool = False) -> Sampler:
    """name: one of SAMPLERS. strength < 1 (video-to-video) runs only the last int(N·strength) steps.
    karras: Karras et al. (2022) sigma spacing, for the samplers that take it."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is unknown, use one of {', '.join(SAMPLERS)}")
    if karras:
        raise ValueError(f"sampler {name!r} has no Karras spacing")
    ts = strength_timesteps(timesteps(config, num_steps), strength)
    return Sampler(name, config, num_steps, ts, alphas_cumprod(config))


def guidance(uncond, cond, scale):
    """Classifier-free guidance (Ho & Salimans 2022): push the prediction away from the unconditional one."""
    return uncond + scale * (cond - uncond)


def dynamic_cfg_scale(scale, t, num_steps):
    """1 + scale·(1 − cos(π·((N − t)/N)^5))/2, the CogVideoX dynamic CFG."""
    # official quirk: uses the raw timestep t (0..999), not the step index, so the scale oscillates (diffusers #9641)
    return 1 + scale * ((1 - math.cos(math.pi * ((num_steps - t) / num_steps) ** 5.0)) / 2)


def denoise(model, x, sampler, guidance_scale=1.0, dynamic_cfg=False, generator=None, progress=True):
    """The sampling loop of the diffusers CogVideoX pipelines.
    model(x, t) -> prediction (B', F, C, H, W); x (B', F, C, H, W), t (B',) int64. With guidance_scale > 1,
      B' = 2B and the batch is [uncond; cond], so `model` must hold its text embeddings negative first (and, for I2V,
      concatenate its doubled image latents on C itself).
    x: the starting latents (B, F, C, H, W): noise, or add_noise(config, video, noise, sampler.timesteps[0]).
    Returns the clean latents in x.dtype (the dtype the pipelines keep between steps)."""
    dtype, cfg = x.dtype, guidance_scale > 1
    for i, t in enumerate(tqdm(sampler.timesteps, disable=not progress)):
        x_in = torch.cat([x, x]) if cfg else x                                    # (2B, F, C, H, W)
        out = model(x_in, torch.full((x_in.shape[0],), t, device=x.device)).float()
        if cfg:
            scale = dynamic_cfg_scale(guidance_scale, t, len(sampler.timesteps)) if dynamic_cfg else guidance_scale
            out = guidance(*out.chunk(2), scale)                                  # (B, F, C, H, W)
        x = sampler.step(out, i, x, generator).to(dtype)
    return x


def invert(model, x, sampler, guidance_scale=1.0, progress=True):
    """DDIM inversion, the mirror of `denoise`: from clean latents x up the same timesteps in reverse order, each step
    undoing the `denoise` step of the same index. `model` and `guidance_scale` as in `denoise`.
    Returns the trajectory, a list aligned with sampler.timesteps: trajectory[i] is x at the noise level of
    sampler.timesteps[i], the latent `denoise` holds when it evaluates step i. So trajectory[0] is the fully
    inverted latent, and denoise(model, trajectory[0], sampler) with the same conditioning comes back to x, up to
    the error of evaluating each step at the far end (it shrinks as the number of steps grows)."""
    dtype, cfg = x.dtype, guidance_scale > 1
    trajectory = [None] * len(sampler.timesteps)
    for i in tqdm(reversed(range(len(sampler.timesteps))), total=len(sampler.timesteps), disable=not progress):
        x_in = torch.cat([x, x]) if cfg else x                                    # (2B, F, C, H, W)
        out = model(x_in, torch.full((x_in.shape[0],), sampler.timesteps[i], device=x.device)).float()
        if cfg:
            out = guidance(*out.chunk(2), guidance_scale)                         # (B, F, C, H, W)
        x = trajectory[i] = sampler.invert_step(out, i, x).to(dtype)
    return trajectory
