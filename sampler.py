"""The CogVideoX noise schedule, its samplers and classifier-free guidance: everything between noise and clean latents
except the network. Legend: B batch, F latent frames, C channels, H/W latent height/width.

The schedule is the one `scheduler/scheduler_config.json` describes: scaled-linear betas, an SNR shift and a
zero-terminal-SNR rescale, in float64. Six solvers share it, each one small function below with its update equation:
  ddim     DDIM, η = 0 (Song et al. 2021, arXiv:2010.02502), deterministic, the checkpoints' default
  dpm      CogVideoX's DPM sampler, DPM-Solver++(2M) with a noise term (Lu et al. 2022, arXiv:2211.01095): 5B demos
  ddpm     ancestral DDPM posterior sampling (Ho et al. 2020, arXiv:2006.11239)
  euler    Euler on the probability-flow ODE in sigma space (Karras et al. 2022, arXiv:2206.00364, Algorithm 1)
  euler_a  Euler ancestral: an Euler step to a lower sigma, then fresh noise back up to the next one
  dpm++2m  DPM-Solver++(2M), deterministic (Lu et al. 2022, Algorithm 2); karras=True: Karras et al.'s sigma spacing
All of them work on the latents as the model sees them (x = √ᾱ x0 + √(1−ᾱ) ε), so a caller needs no input scaling and
video-to-video starts every one of them from add_noise(...). They match diffusers step for step: ddim and dpm the
CogVideoX schedulers bit for bit (0-d float64 coefficients times the latents; scalar-tensor promotion keeps the latent
dtype); the other four DDPMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler and
DPMSolverMultistepScheduler (tests/test_sampler.py says how closely, and where those lose precision on this schedule),
drawing their noise from the caller's generator in the same order. Two equivalences worth knowing: on the latents x,
an Euler step is exactly a DDIM step between the same two noise levels (Song et al. 2021, sec. 4.3), and an Euler
ancestral step exactly a DDPM step (the same algebra; tests/test_sampler.py checks both).

API
    config = load_scheduler_config(snapshot)            # or PRESETS["cogvideox-2b"] / PRESETS["cogvideox-5b"]
    sampler = make_sampler("dpm", config, 50)           # a name from SAMPLERS; strength=0.8: last 80% (video-to-video)
    make_sampler("dpm++2m", config, 20, karras=True)    # Karras sigma spacing (dpm++2m only)
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

from checkpoint import CheckpointError, component_folder, config_from_dict, read_json


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
    path = component_folder(path, "scheduler")
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


def _randn(x, generator, dtype=None):
    # drawn where the generator lives (a CPU generator gives the same numbers for latents on any device), as diffusers;
    # in x.dtype, or in `dtype` and then cast to x.dtype
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=dtype or x.dtype).to(x.device, x.dtype)


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


# The four samplers below take the noise level as σ = √((1−ᾱ)/ᾱ) (the noise-to-signal ratio; 0 when clean) or as ᾱ.
# With x = √ᾱ x0 + √(1−ᾱ) ε, the variable y = x/√ᾱ = x0 + σ ε is the "variance exploding" form Karras et al. write
# their samplers in; α = √ᾱ = 1/√(1+σ²) converts between the two. The steps take and return x, with every
# coefficient a 0-d float64 tensor, so no tensor ever holds y: at σ = 4096 (see ZERO_SNR_ALPHA) y is 4096 times
# larger than x, and an fp32 y would lose 12 bits to cancellation on the first step.

def _sigma(a):
    return ((1 - a) / a) ** 0.5


def ddpm_step(x, x0, a, a_prev, z=None):
    """Ancestral DDPM (Ho et al. 2020, eq. 6-7, Algorithm 2), over a stride of the schedule: with α = ᾱ/ᾱ_prev the
    stride's own signal fraction, sample the forward process's posterior q(x_prev | x, x0):
        x_prev = √ᾱ_prev (1−α)/(1−ᾱ) · x0 + √α (1−ᾱ_prev)/(1−ᾱ) · x + √β̃ z,   β̃ = (1−ᾱ_prev)/(1−ᾱ) · (1−α).
    This is DDIM with η = 1 (Song et al. 2021, eq. 16). Finite at ᾱ = 0 (then x_prev = √ᾱ_prev x0 + √(1−ᾱ_prev) z), so
    DDPM needs no zero-SNR clamp; β̃ = 0 on the last step (ᾱ_prev = 1), which returns x0."""
    alpha = a / a_prev
    c_0 = a_prev ** 0.5 * (1 - alpha) / (1 - a)
    c_x = alpha ** 0.5 * (1 - a_prev) / (1 - a)
    x = c_0 * x0 + c_x * x
    if z is None:
        return x
    return x + ((1 - a_prev) / (1 - a) * (1 - alpha)) ** 0.5 * z


def euler_step(x, x0, a, a_next):
    """Euler (Karras et al. 2022, eq. 4 with σ(t) = t; their Algorithm 1 without its second-order correction) on the
    probability-flow ODE in σ:
        dy/dσ = (y − x0)/σ,   y_next = y + (σ_next − σ) (y − x0)/σ,   y = x/α.
    On x: x_next = (α_next σ_next)/(α σ) · x + α_next (1 − σ_next/σ) · x0, which is ddim_step between the same
    two levels."""
    s, s_next = _sigma(a), _sigma(a_next)
    return (a_next / a) ** 0.5 * (s_next / s) * x + a_next ** 0.5 * (1 - s_next / s) * x0


def euler_ancestral_step(x, x0, a, a_next, z):
    """Euler ancestral (DDPM's ancestral sampling written in σ, as Karras et al. 2022 write samplers): split σ_next²
    into a part reached deterministically and fresh noise, σ_up = σ_next √(1 − σ_next²/σ²) and
    σ_down = √(σ_next² − σ_up²) = σ_next²/σ; take an Euler step to σ_down, then add σ_up z:
        y_next = y + (σ_down − σ) (y − x0)/σ + σ_up z,   y = x/α.
    σ_up² is the DDPM posterior variance in y, and the mean is DDPM's too: this is ddpm_step, with the noise drawn
    on every step (the last one has σ_up = 0)."""
    s, s_next = _sigma(a), _sigma(a_next)
    down = s_next ** 2 / s
    up = s_next * (1 - (s_next / s) ** 2) ** 0.5
    return (a_next / a) ** 0.5 * (down / s) * x + a_next ** 0.5 * (1 - down / s) * x0 + a_next ** 0.5 * up * z


def dpmpp_2m_step(x, x0, a, a_next, old_x0=None, a_back=None):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2; "midpoint" form), the deterministic multistep
    solver of the data-prediction ODE. With λ = log(α/√(1−ᾱ)) = −log σ and h = λ_next − λ:
        x_next = √(1−ᾱ_next)/√(1−ᾱ) · x − α_next (e^{−h} − 1) · D,
    D = x0 on the first step and on the last (σ_next = 0, h = ∞), else D = (1 + 1/2r) x0 − (1/2r) old_x0 with
    r = h_last/h, the slope of x0 in λ extrapolated from the previous step. The first-order case is euler_step."""
    s, s_next = _sigma(a), _sigma(a_next)
    c_x = ((1 - a_next) / (1 - a)) ** 0.5
    c_0 = a_next ** 0.5 * (1 - s_next / s)                      # = −α_next (e^{−h} − 1), as e^{−h} = σ_next/σ
    if old_x0 is None or s_next == 0:
        return c_x * x + c_0 * x0
    r = (_sigma(a_back) / s).log() / (s / s_next).log()
    return c_x * x + c_0 * (1 + 1 / (2 * r)) * x0 - c_0 / (2 * r) * old_x0


# Zero terminal SNR (ᾱ[T−1] = 0) puts the first step at σ = ∞. For the sigma-space samplers (euler, euler_a, dpm++2m)
# we do what diffusers does (rescale_betas_zero_snr in its Euler and DPM-Solver schedulers): replace that ᾱ by 2^−24,
# the smallest positive fp16 subnormal, so σ_max = √(2^24 − 1) ≈ 4096. The network still sees t = 999; only the
# solver's coefficients move, and the first x0 estimate becomes 2^−12 x − √(1 − 2^−24) v instead of −v.
# (diffusers' text-to-video also scales the initial noise by σ_max in y, i.e. by σ_max/√(σ_max² + 1) = 1 − 3e−8 in x:
# below fp32 resolution, so we pass the noise through unscaled.) DDPM is finite at ᾱ = 0 and keeps it.
ZERO_SNR_ALPHA = 2.0 ** -24


def karras_sigmas(sigma_min, sigma_max, n, rho=7.0):
    """Karras et al. (2022), eq. 5: σ_i = (σ_max^{1/ρ} + i/(n−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0..n−1, ρ = 7:
    the n noise levels spaced evenly in σ^{1/ρ}, so the steps crowd towards small σ. float64. Designed for σ_max ≈ 80;
    with the clamp's σ_max ≈ 4096 half of them land at t ≥ 979 here (bench/RESULTS.md, section 7)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _karras_schedule(ac: torch.Tensor, n: int) -> tuple[list[int], torch.Tensor]:
    """Karras levels between the schedule's end points, and for each the timestep the network is evaluated at: the
    fractional t where log σ(t) (linear between integer t) reaches it, rounded (numpy's half-to-even, as diffusers)."""
    log_sigmas = _sigma(ac).log().numpy()                                 # increasing in t
    sig = karras_sigmas(_sigma(ac[0]).item(), _sigma(ac[-1]).item(), n)
    ts = np.round(np.interp(sig.log().numpy(), log_sigmas, np.arange(len(ac))))
    return [int(t) for t in ts], 1 / (1 + sig ** 2)                      # ᾱ = 1/(1 + σ²)


@dataclass
class Sampler:
    """One sampling run: the timesteps, the schedule and the last x0 estimate (the multistep DPMs use it)."""
    solver: str                     # one of SAMPLERS
    config: SchedulerConfig
    num_steps: int                  # N of the full schedule, before any strength cut
    timesteps: list[int]
    alphas_cumprod: torch.Tensor    # (T,) float64 on CPU: 0-d entries act as scalars for latents on any device
    x0: torch.Tensor | None = None
    levels: torch.Tensor | None = None  # ddpm/euler/euler_a/dpm++2m: ᾱ at step i, and 1.0 after the last, float64

    def alpha(self, t: int) -> torch.Tensor:
        if t >= 0:
            return self.alphas_cumprod[t]
        return torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]  # float32, as diffusers

    def step(self, out, i, x, generator=None):
        """x at timesteps[i] -> x at the next noise level. out: the network output (guided), x (B, F, C, H, W)."""
        if self.levels is not None:
            return self._step_from_levels(out, i, x, generator)
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

    def _step_from_levels(self, out, i, x, generator):
        """The four samplers that step from one entry of `levels` to the next, in fp32 at least whatever the latent
        dtype (as diffusers' Euler and DPM-Solver schedulers upcast). Noise is drawn in fp32 as diffusers draws it:
        DDPM on every step with t > 0 (its rule; the last step's variance is 0 here), Euler ancestral on every step."""
        a, a_next = self.levels[i], self.levels[i + 1]
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        x0 = predict_x0(self.config.prediction_type, out, x, a)
        if self.solver == "ddpm":
            x = ddpm_step(x, x0, a, a_next, _randn(x, generator, torch.float32) if self.timesteps[i] > 0 else None)
        elif self.solver == "euler":
            x = euler_step(x, x0, a, a_next)
        elif self.solver == "euler_a":
            x = euler_ancestral_step(x, x0, a, a_next, _randn(x, generator, torch.float32))
        else:  # dpm++2m: first order on the first step of the run (also a video-to-video one) and on the last
            old = (self.x0, self.levels[i - 1]) if i > 0 else (None, None)
            x = dpmpp_2m_step(x, x0, a, a_next, *old)
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


SAMPLERS = ("ddim", "dpm", "ddpm", "euler", "euler_a", "dpm++2m")  # make_sampler, generate(sampler=) and --sampler
KARRAS = ("dpm++2m",)                                               # the ones that take karras=True


def make_sampler(name: str, config: SchedulerConfig, num_steps: int, strength: float = 1.0,
                 karras: bool = False) -> Sampler:
    """name: one of SAMPLERS. strength < 1 (video-to-video) runs only the last int(N·strength) steps.
    karras: Karras et al. (2022) sigma spacing (KARRAS only); the network is evaluated at the nearest integer t."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is unknown, use one of {', '.join(SAMPLERS)}")
    if karras and name not in KARRAS:
        raise ValueError(f"sampler {name!r} has no Karras spacing; karras=True needs one of {', '.join(KARRAS)}")
    ac = alphas_cumprod(config)
    if name in ("ddim", "dpm"):
        ts = strength_timesteps(timesteps(config, num_steps), strength)
        return Sampler(name, config, num_steps, ts, ac)
    if name != "ddpm" and ac[-1] == 0:
        ac = ac.clone()
        ac[-1] = ZERO_SNR_ALPHA          # σ = ∞ -> ~4096, as diffusers (see ZERO_SNR_ALPHA)
    if karras:
        ts, levels = _karras_schedule(ac, num_steps)
    else:
        ts = timesteps(config, num_steps)
        levels = ac[ts]
    levels = torch.cat([levels, levels.new_ones(1)])   # the clean end, σ = 0 (diffusers' final_sigmas_type "zero")
    cut = strength_timesteps(ts, strength)
    levels = levels[len(ts) - len(cut):]
    if karras and strength < 1:
        # video-to-video starts from add_noise(config, x0, noise, timesteps[0]), at ᾱ of that integer t: start the
        # solver there too, not at the Karras level it was rounded from (diffusers noises to the Karras level)
        levels[0] = ac[cut[0]]
    return Sampler(name, config, num_steps, cut, ac, levels=levels)


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
