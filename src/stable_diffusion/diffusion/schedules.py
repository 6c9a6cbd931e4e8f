"""Noise schedules as pure functions: betas -> alphas_cumprod -> sigmas, and the step schedules (sigma lists)
the samplers walk. Notation of Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based
Generative Models"): x_t = x_0 + sigma * noise in the variance-exploding view, sigma = sqrt((1 - abar) / abar)."""

from __future__ import annotations

import math

import torch


def make_betas(schedule: str, timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """scaled_linear (SD: linear in sqrt(beta)), linear (Ho et al. 2020), cosine (Nichol & Dhariwal 2021)."""
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if schedule in ("cosine", "squaredcos_cap_v2"):
        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - abar((i + 1) / timesteps) / abar(i / timesteps), 0.999) for i in range(timesteps)],
                            dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {schedule!r} (scaled_linear, linear, cosine)")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas, dim=0)


def model_alphas_cumprod(config) -> torch.Tensor:
    """The noise schedule a model was trained with, from its config's ``beta_schedule``, ``timesteps``,
    ``beta_start`` and ``beta_end`` (a ModelConfig): float64 alphas_cumprod, one per training timestep."""
    return alphas_cumprod(make_betas(config.beta_schedule, config.timesteps, config.beta_start, config.beta_end))


def sigmas_from_alphas_cumprod(abar: torch.Tensor) -> torch.Tensor:
    return ((1 - abar) / abar).sqrt()


class DiscreteSigmas:
    """The model's 1000 training sigmas, with k-diffusion's conversions between sigma and (fractional) t,
    interpolating in log sigma."""

    def __init__(self, abar: torch.Tensor) -> None:
        self.sigmas = sigmas_from_alphas_cumprod(abar).float()
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.float().log().to(self.log_sigmas.device)
        dists = log_sigma[..., None] - self.log_sigmas  # (..., 1000)
        low = dists.ge(0).cumsum(dim=-1).argmax(dim=-1).clamp(max=len(self.sigmas) - 2)
        high = low + 1
        w = ((self.log_sigmas[low] - log_sigma) / (self.log_sigmas[low] - self.log_sigmas[high])).clamp(0, 1)
        return ((1 - w) * low + w * high).to(sigma.device)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float().to(self.log_sigmas.device)
        low, high = t.floor().long(), t.ceil().long()
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: evenly spaced in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Evenly spaced in log sigma."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def uniform(n: int, model: DiscreteSigmas) -> torch.Tensor:
    """k-diffusion's default: timesteps evenly spaced from the last to 0, mapped to sigmas ("normal" too)."""
    t = torch.linspace(len(model.sigmas) - 1, 0, n)
    return _append_zero(model.t_to_sigma(t))


def sgm_uniform(n: int, model: DiscreteSigmas) -> torch.Tensor:
    """SGM's discretisation: n+1 evenly spaced timesteps from the last to 0, the final one dropped."""
    t = torch.linspace(len(model.sigmas) - 1, 0, n + 1)[:-1]
    return _append_zero(model.t_to_sigma(t))


def simple(n: int, model: DiscreteSigmas) -> torch.Tensor:
    """ComfyUI's "simple": every (1000/n)-th training sigma, from the largest down."""
    stride = len(model.sigmas) / n
    return _append_zero(torch.stack([model.sigmas[-(1 + int(i * stride))] for i in range(n)]))


def ddim_uniform(n: int, model: DiscreteSigmas) -> torch.Tensor:
    """The DDIM paper's "uniform" timesteps 1, 1 + c, 1 + 2c, ... (c = 1000 // n), largest first."""
    c = max(len(model.sigmas) // n, 1)
    ts = list(range(1, len(model.sigmas), c))
    return _append_zero(torch.stack([model.sigmas[t] for t in reversed(ts)]))


SCHEDULERS = {"uniform": uniform, "normal": uniform, "karras": None, "exponential": None, "sgm_uniform": sgm_uniform,
              "simple": simple, "ddim_uniform": ddim_uniform}


def make_sigmas(scheduler: str, n: int, model: DiscreteSigmas) -> torch.Tensor:
    """n steps of a named schedule (A1111/ComfyUI names), as n+1 decreasing sigmas ending in 0."""
    name = scheduler.lower()
    if n < 1:
        raise ValueError("steps must be at least 1")
    if name == "karras":
        return karras(n, model.sigma_min, model.sigma_max)
    if name == "exponential":
        return exponential(n, model.sigma_min, model.sigma_max)
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; known: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](n, model)
