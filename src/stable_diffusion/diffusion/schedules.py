"""Noise schedules as pure functions: betas -> alphas_cumprod -> sigmas, and the step schedules (sigma lists)
the samplers walk. Notation of Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based
Generative Models"): x_t = x_0 + sigma * noise in the variance-exploding view, sigma = sqrt((1 - abar) / abar)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
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


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """k-diffusion's polyexponential: log sigma interpolated along a ramp raised to ``rho`` (1: exponential)."""
    ramp = torch.linspace(1, 0, n) ** rho
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """The KL-optimal schedule (Sabour et al. 2024, "Align Your Steps"' appendix): evenly spaced in arctan
    sigma. As in A1111 it ends at sigma_min, not 0: the last step leaves that much noise."""
    alpha_min, alpha_max = math.atan(sigma_min), math.atan(sigma_max)
    steps = torch.arange(n + 1, dtype=torch.float32) / n
    return torch.tan(steps * alpha_min + (1.0 - steps) * alpha_max)


# NVIDIA's Align Your Steps tables (Sabour et al. 2024) for 10 steps, as A1111 ships them
AYS_SIGMAS = {"sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
              "sd1": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]}


def align_your_steps(n: int, family: str) -> torch.Tensor:
    """Align Your Steps: the family's 10-step table (SD1.5's for every non-SDXL model, as A1111), log-linearly
    interpolated to n steps."""
    table = AYS_SIGMAS["sdxl" if family.startswith("sdxl") else "sd1"]
    if n + 1 == len(table):
        return torch.tensor([*table, 0.0], dtype=torch.float32)
    xs = np.linspace(0, 1, len(table))
    ys = np.log(table[::-1])
    interpolated = np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy()
    return torch.tensor(np.append(interpolated, 0.0), dtype=torch.float32)


def _beta_cdf(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function I_x(a, b) by its continued fraction (modified Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean: use the symmetry there
        return 1.0 - _beta_cdf(1.0 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            numerator = 1.0
        elif i % 2 == 0:
            numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            numerator = -((a + m) * (a + b + m) * x) / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1.0 + numerator / (c if abs(c) > 1e-300 else 1e-300)
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return front * (f - 1.0)


def beta_ppf(q: float, a: float, b: float) -> float:
    """The inverse of the Beta(a, b) distribution function, by bisection (the CDF is monotone)."""
    low, high = 0.0, 1.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if _beta_cdf(mid, a, b) < q else (low, mid)
    return (low + high) / 2


def beta_schedule(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """"Beta Sampling is All You Need" (Lee et al. 2024): steps placed at the quantiles of Beta(alpha, beta)
    between sigma_min and sigma_max (A1111's defaults 0.6, 0.6: more steps at both ends)."""
    quantiles = [beta_ppf(1 - q, alpha, beta) for q in np.linspace(0, 1, n)]
    return torch.tensor([sigma_min + q * (sigma_max - sigma_min) for q in quantiles] + [0.0], dtype=torch.float32)


@dataclass(frozen=True)
class Schedule:
    label: str  # A1111's label, written in the infotext ("Schedule type")
    needs: str  # what it is built from: "model" (the training sigmas), "range" (sigma_min, sigma_max), "family"


# A1111's names -> schedules (uniform and normal are the same discretisation in k-diffusion's terms)
SCHEDULERS = {
    "uniform": Schedule("Uniform", "model"), "karras": Schedule("Karras", "range"),
    "exponential": Schedule("Exponential", "range"), "polyexponential": Schedule("Polyexponential", "range"),
    "sgm_uniform": Schedule("SGM Uniform", "model"), "kl_optimal": Schedule("KL Optimal", "range"),
    "align_your_steps": Schedule("Align Your Steps", "family"), "simple": Schedule("Simple", "model"),
    "normal": Schedule("Normal", "model"), "ddim": Schedule("DDIM", "model"), "beta": Schedule("Beta", "range"),
}
ALIASES = {"ddim_uniform": "ddim", "sgmuniform": "sgm_uniform", **{s.label.lower(): name for name, s in SCHEDULERS.items()}}


def scheduler_name(name: str) -> str:
    """The A1111 name of a schedule given by name, label or alias (any case); a ValueError otherwise."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: automatic, {', '.join(SCHEDULERS)}")
    return key


def make_sigmas(scheduler: str, n: int, model: DiscreteSigmas, family: str = "sd1") -> torch.Tensor:
    """n steps of a named schedule (A1111's names, labels or aliases) as decreasing sigmas, ending in 0 (KL
    Optimal: in sigma_min)."""
    if n < 1:
        raise ValueError("steps must be at least 1")
    name = scheduler_name(scheduler)
    low, high = model.sigma_min, model.sigma_max
    builders = {
        "uniform": lambda: uniform(n, model), "normal": lambda: uniform(n, model),
        "karras": lambda: karras(n, low, high), "exponential": lambda: exponential(n, low, high),
        "polyexponential": lambda: polyexponential(n, low, high), "sgm_uniform": lambda: sgm_uniform(n, model),
        "kl_optimal": lambda: kl_optimal(n, low, high), "align_your_steps": lambda: align_your_steps(n, family),
        "simple": lambda: simple(n, model), "ddim": lambda: ddim_uniform(n, model),
        "beta": lambda: beta_schedule(n, low, high),
    }
    return builders[name]()
