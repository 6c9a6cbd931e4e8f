"""Samplers as pure functions ``sample_x(model, x, sigmas, *, callback, noise) -> x`` over a decreasing sigma
list ending in 0, where ``model(x, sigma) -> x0`` (the k-diffusion convention; Karras et al. 2022). No hidden
state survives a call. Registered under AUTOMATIC1111's names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .common import Callback, Model, Noise, ancestral_step, default_noise, denoise, to_d
from .extra_samplers import sample_ddim_cfgpp, sample_dpm_adaptive, sample_dpm_fast, sample_restart
from .multistep import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde, sample_lms, sample_plms, sample_unipc
from .schedules import DiscreteSigmas, make_sigmas, scheduler_name

__all__ = ["SAMPLERS", "default_noise", "resolve_sampler", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_lms",
           "sample_plms", "sample_unipc"]

Step = Callable[[Model, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _ancestral(step: Step, model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback,
               noise: Noise | None, eta: float) -> torch.Tensor:
    """The ancestral frame: a deterministic ``step`` from sigma down to sigma_down, then fresh noise up to
    sigma_next (eta = 0: no noise, sigma_down = sigma_next, the plain ODE solver)."""
    noise = noise or default_noise()
    for i in range(len(sigmas) - 1):
        x0 = denoise(model, x, sigmas, i, callback)
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = step(model, x, sigmas[i], down, x0)
        if up > 0:
            x = x + noise(x) * up
    return x


def _euler_step(model: Model, x: torch.Tensor, sigma: torch.Tensor, down: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    return x + to_d(x, sigma, x0) * (down - sigma)


def _dpm2_step(model: Model, x: torch.Tensor, sigma: torch.Tensor, down: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """DPM-Solver-2 in Karras et al.'s form: the derivative at the midpoint (in log sigma) of the step."""
    if down == 0:
        return _euler_step(model, x, sigma, down, x0)
    mid = (0.5 * (sigma.log() + down.log())).exp()
    x_mid = x + to_d(x, sigma, x0) * (mid - sigma)
    return x + to_d(x_mid, mid, model(x_mid, mid)) * (down - sigma)


def _dpmpp_2s_step(model: Model, x: torch.Tensor, sigma: torch.Tensor, down: torch.Tensor,
                   x0: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2S): single-step second order in log-SNR time, data prediction at the half step."""
    if down == 0:
        return _euler_step(model, x, sigma, down, x0)
    h = sigma.log() - down.log()
    mid = sigma * torch.exp(-0.5 * h)
    x_mid = (mid / sigma) * x - torch.expm1(-0.5 * h) * x0
    return (down / sigma) * x - torch.expm1(-h) * model(x_mid, mid)


@torch.no_grad()
def sample_euler_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                           noise: Noise | None = None, eta: float = 1.0) -> torch.Tensor:
    """Euler ancestral; eta = 0 is Euler on the probability-flow ODE (Karras et al. 2022, Alg. 2, no churn)."""
    return _ancestral(_euler_step, model, x, sigmas, callback, noise, eta)


@torch.no_grad()
def sample_dpm_2_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                           noise: Noise | None = None, eta: float = 1.0) -> torch.Tensor:
    """DPM2 a (Lu et al. 2022, DPM-Solver-2 with ancestral noise)."""
    return _ancestral(_dpm2_step, model, x, sigmas, callback, noise, eta)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                              noise: Noise | None = None, eta: float = 1.0) -> torch.Tensor:
    """DPM++ 2S a (Lu et al. 2022, DPM-Solver++(2S) with ancestral noise)."""
    return _ancestral(_dpmpp_2s_step, model, x, sigmas, callback, noise, eta)


def _without_noise(ancestral: Callable[..., torch.Tensor], doc: str) -> Callable[..., torch.Tensor]:
    """The deterministic solver inside an ancestral sampler: eta = 0, so no noise is put back."""

    @torch.no_grad()
    def sample(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
               noise: Noise | None = None) -> torch.Tensor:
        return ancestral(model, x, sigmas, callback=callback, eta=0.0)

    sample.__doc__ = doc
    return sample


sample_euler = _without_noise(sample_euler_ancestral, "Euler's method on the probability-flow ODE.")
sample_dpm_2 = _without_noise(sample_dpm_2_ancestral, "DPM2: DPM-Solver-2's midpoint steps, no noise put back.")


@torch.no_grad()
def sample_heun(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                noise: Noise | None = None) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1); Euler on the last step to sigma 0."""
    for i in range(len(sigmas) - 1):
        x0 = denoise(model, x, sigmas, i, callback)
        d = to_d(x, sigmas[i], x0)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_next = x + d * dt
            d_next = to_d(x_next, sigmas[i + 1], model(x_next, sigmas[i + 1]))
            x = x + (d + d_next) / 2 * dt
    return x


@torch.no_grad()
def sample_dpmpp_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                     noise: Noise | None = None, eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver++ SDE (Lu et al. 2022): single-step second order on the reverse SDE, the intermediate point at
    the log-SNR midpoint (r = 1/2), each sub-step an ancestral one that puts fresh noise back, drawn for its
    sigma interval (A1111 draws it from a Brownian tree: noise.BrownianNoise)."""
    noise = noise or default_noise()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(model, x, sigmas, i, callback)
        if sigma_next == 0:
            x = x0
            continue
        mid = (sigma * sigma_next).sqrt()
        down, up = ancestral_step(sigma, mid, eta)
        x_mid = _euler_step(model, x, sigma, down, x0)  # = DPM-Solver++(1) in the sigma parameterisation
        if up > 0:
            x_mid = x_mid + noise(x, sigma, mid) * up
        down, up = ancestral_step(sigma, sigma_next, eta)
        x = _euler_step(model, x, sigma, down, model(x_mid, mid))
        if up > 0:
            x = x + noise(x, sigma, sigma_next) * up
    return x


@torch.no_grad()
def sample_ddim(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                noise: Noise | None = None, eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021). With eta = 0 its update x_next = x0 + sigma_next * eps is exactly an Euler step
    of the probability-flow ODE in the sigma parameterisation (Karras et al. 2022, sec. 4); eta > 0 re-injects
    noise as the DDIM paper's sigma_t(eta) does."""
    return sample_euler_ancestral(model, x, sigmas, callback=callback, noise=noise, eta=eta)


@torch.no_grad()
def sample_ddpm(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                noise: Noise | None = None) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x0) (Ho et al. 2020, Algorithm 2 with
    the predicted x0), written for x in the sigma parameterisation: x_vp = x / sqrt(sigma^2 + 1)."""
    noise = noise or default_noise()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(model, x, sigmas, i, callback)
        abar, abar_prev = 1 / (sigma**2 + 1), 1 / (sigma_next**2 + 1)
        alpha = abar / abar_prev
        x_vp = x * abar.sqrt()
        # posterior mean (eq. 7) from x0 and x_t, then its variance beta_tilde
        mean = (abar_prev.sqrt() * (1 - alpha) * x0 + alpha.sqrt() * (1 - abar_prev) * x_vp) / (1 - abar)
        if sigma_next > 0:
            mean = mean + ((1 - alpha) * (1 - abar_prev) / (1 - abar)).sqrt() * noise(x)
        x = mean / abar_prev.sqrt()
    return x


@torch.no_grad()
def sample_lcm(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
               noise: Noise | None = None) -> torch.Tensor:
    """Latent Consistency Model sampling (Luo et al. 2023): jump to the x0 prediction, then re-noise to the
    next sigma with fresh noise. Meant for LCM-distilled models and LCM LoRAs, in 2-8 steps."""
    noise = noise or default_noise()
    for i in range(len(sigmas) - 1):
        x0 = denoise(model, x, sigmas, i, callback)
        x = x0
        if sigmas[i + 1] > 0:
            x = x + noise(x) * sigmas[i + 1]
    return x


@dataclass(frozen=True)
class Sampler:
    """An A1111 sampler: its function, the schedule "automatic" picks, and how A1111 runs it."""
    fn: Callable[..., torch.Tensor]
    scheduler: str
    discard_next_to_last_sigma: bool = False  # A1111: schedule steps + 1 sigmas and drop the second-to-last
    brownian: bool = False  # its noise comes from per-image Brownian trees (noise.BrownianNoise)
    options: dict = field(default_factory=dict)  # extra keywords for ``fn``
    cfg_pp: bool = False  # needs the CFG model's unconditional prediction too (CFG++)


# A1111 labels (modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py, sd_samplers_lcm.py)
SAMPLERS = {
    "DPM++ 2M": Sampler(sample_dpmpp_2m, "karras"),
    "DPM++ SDE": Sampler(sample_dpmpp_sde, "karras", brownian=True),
    "DPM++ 2M SDE": Sampler(sample_dpmpp_2m_sde, "exponential", brownian=True),
    "DPM++ 2M SDE Heun": Sampler(sample_dpmpp_2m_sde, "exponential", brownian=True, options={"solver_type": "heun"}),
    "DPM++ 2S a": Sampler(sample_dpmpp_2s_ancestral, "karras"),
    "DPM++ 3M SDE": Sampler(sample_dpmpp_3m_sde, "exponential", discard_next_to_last_sigma=True, brownian=True),
    "Euler a": Sampler(sample_euler_ancestral, "uniform"),
    "Euler": Sampler(sample_euler, "uniform"),
    "LMS": Sampler(sample_lms, "uniform"),
    "Heun": Sampler(sample_heun, "uniform"),
    "DPM2": Sampler(sample_dpm_2, "karras", discard_next_to_last_sigma=True),
    "DPM2 a": Sampler(sample_dpm_2_ancestral, "karras", discard_next_to_last_sigma=True),
    "DPM fast": Sampler(sample_dpm_fast, "uniform"),
    "DPM adaptive": Sampler(sample_dpm_adaptive, "uniform"),
    "Restart": Sampler(sample_restart, "karras"),
    "DDIM": Sampler(sample_ddim, "ddim"),
    "DDIM CFG++": Sampler(sample_ddim_cfgpp, "ddim", cfg_pp=True),
    "PLMS": Sampler(sample_plms, "uniform"),
    "UniPC": Sampler(sample_unipc, "uniform"),
    "LCM": Sampler(sample_lcm, "sgm_uniform"),
    "DDPM": Sampler(sample_ddpm, "uniform"),
}


def sampling_sigmas(sampler: str, scheduler: str, steps: int, schedule: DiscreteSigmas,
                    family: str = "sd1") -> torch.Tensor:
    """The sigmas a sampler walks for ``steps`` steps of a schedule, with A1111's rule for the samplers that
    discard the next-to-last sigma (DPM2, DPM2 a, DPM++ 3M SDE)."""
    if not SAMPLERS[sampler].discard_next_to_last_sigma:
        return make_sigmas(scheduler, steps, schedule, family)
    sigmas = make_sigmas(scheduler, steps + 1, schedule, family)
    return torch.cat([sigmas[:-2], sigmas[-1:]])


def resolve_sampler(name: str, scheduler: str = "automatic") -> tuple[str, str]:
    """(A1111 sampler label, schedule name) for the names a request gives: "automatic" (or "") picks the
    sampler's own schedule, and a legacy name such as "DPM++ 2M Karras" names both. A ValueError for unknown
    names."""
    label, implied = name, None
    for suffix, schedule in ((" Karras", "karras"), (" Exponential", "exponential")):
        if name not in SAMPLERS and name.endswith(suffix) and name[: -len(suffix)] in SAMPLERS:
            label, implied = name[: -len(suffix)], schedule
    if label not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    if (scheduler or "automatic").strip().lower() == "automatic":
        return label, implied or SAMPLERS[label].scheduler
    return label, scheduler_name(scheduler)
