"""Samplers beyond the step-by-step family, as A1111 offers them: DPM fast and DPM adaptive (DPM-Solver, Lu et al.
2022, with fixed or PID-controlled step sizes), Restart (Xu et al. 2023) and DDIM CFG++ (Chung et al. 2024).

DPM fast and adaptive walk log-SNR time between the schedule's first and last positive sigma on their own
steps, as A1111 calls them (its defaults: eta 1, ancestral); they end at that last sigma, not at 0."""

from __future__ import annotations

import math

import torch

from .common import Callback, Model, Noise, ancestral_step, default_noise, report, to_d
from .schedules import karras


class _DPMSolver:
    """DPM-Solver's 1-, 2- and 3-stage steps in t = -log(sigma), each stage's noise prediction cached."""

    def __init__(self, model: Model) -> None:
        self.model = model

    @staticmethod
    def sigma(t: torch.Tensor) -> torch.Tensor:
        return t.neg().exp()

    def eps(self, cache: dict, key: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if key not in cache:
            cache[key] = (x - self.model(x, self.sigma(t))) / self.sigma(t)
        return cache[key]

    def step_1(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cache: dict) -> torch.Tensor:
        return x - self.sigma(t_next) * (t_next - t).expm1() * self.eps(cache, "eps", x, t)

    def step_2(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cache: dict,
               r1: float = 0.5) -> torch.Tensor:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        eps_r1 = self.eps(cache, "eps_r1", x - self.sigma(s1) * (r1 * h).expm1() * eps, s1)
        return x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)

    def step_3(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cache: dict,
               r1: float = 1 / 3, r2: float = 2 / 3) -> torch.Tensor:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        eps_r1 = self.eps(cache, "eps_r1", x - self.sigma(s1) * (r1 * h).expm1() * eps, s1)
        u2 = (x - self.sigma(s2) * (r2 * h).expm1() * eps
              - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)

    def ancestral(self, t: torch.Tensor, t_next: torch.Tensor, t_end: torch.Tensor,
                  eta: float) -> tuple[torch.Tensor, torch.Tensor | float]:
        """(the deterministic target time, the noise to add) of an ancestral step from t to t_next."""
        if not eta:
            return t_next, 0.0
        down, _ = ancestral_step(self.sigma(t), self.sigma(t_next), eta)
        target = torch.minimum(t_end, -down.log())
        return target, (self.sigma(t_next) ** 2 - self.sigma(target) ** 2) ** 0.5


def _range(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    positive = sigmas[sigmas > 0]
    return -positive.max().log(), -positive.min().log()  # t_start, t_end


@torch.no_grad()
def sample_dpm_fast(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                    noise: Noise | None = None, eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver-Fast: ``len(sigmas) - 1`` model calls spent on equal steps in log-SNR time, third-order steps
    and a second- or first-order last one."""
    noise, solver = noise or default_noise(), _DPMSolver(model)
    t_start, t_end = _range(sigmas)
    nfe = len(sigmas) - 1
    m = nfe // 3 + 1
    ts = torch.linspace(float(t_start), float(t_end), m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        cache: dict = {}
        t, t_next = ts[i], ts[i + 1]
        target, up = solver.ancestral(t, t_next, t_end, eta)
        report(callback, i, x, solver.sigma(t), x - solver.sigma(t) * solver.eps(cache, "eps", x, t))
        x = (solver.step_1, solver.step_2, solver.step_3)[order - 1](x, t, target, cache)
        x = x + up * noise(x, solver.sigma(t), solver.sigma(t_next))
    return x


@torch.no_grad()
def sample_dpm_adaptive(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                        noise: Noise | None = None, eta: float = 1.0, order: int = 3, rtol: float = 0.05,
                        atol: float = 0.0078, h_init: float = 0.05) -> torch.Tensor:
    """DPM-Solver-23: embedded second/third-order steps whose difference sets the next step size (an I
    controller, k-diffusion's defaults); as many model calls as the error tolerance needs."""
    noise, solver = noise or default_noise(), _DPMSolver(model)
    s, t_end = _range(sigmas)
    x_prev, h, errors, steps = x, h_init, [], 0
    atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
    while s < t_end - 1e-5:
        cache: dict = {}
        t = torch.minimum(t_end, s + h)
        target, up = solver.ancestral(s, t, t_end, eta)
        report(callback, steps, x, solver.sigma(s), x - solver.sigma(s) * solver.eps(cache, "eps", x, s))
        if order == 2:
            x_low, x_high = solver.step_1(x, s, target, cache), solver.step_2(x, s, target, cache)
        else:
            x_low, x_high = solver.step_2(x, s, target, cache, r1=1 / 3), solver.step_3(x, s, target, cache)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        inverse = 1 / (float(error) + 1e-8)
        errors = errors or [inverse] * 3
        errors[0] = inverse
        factor = 1 + math.atan(errors[0] ** (1 / (1.5 if eta else order)) - 1)  # the controller, limited
        if factor >= 0.81:  # accepted
            errors[2], errors[1] = errors[1], errors[0]
            x_prev = x_low
            x = x_high + up * noise(x, solver.sigma(s), solver.sigma(t))
            s = t
        h *= factor
        steps += 1
    return x


@torch.no_grad()
def sample_restart(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                   noise: Noise | None = None) -> torch.Tensor:
    """Restart sampling (Xu et al. 2023) as A1111 sets it up: from 20 steps on, Heun steps on a Karras schedule
    with 9 (from 36 steps: steps / 4, twice) of the steps spent going back up from sigma 0.1 to sigma 2 by
    adding noise and down again; below 20 steps, Heun's method on the given schedule."""
    noise = noise or default_noise()
    steps = len(sigmas) - 1
    restarts: dict[float, tuple[int, int, float]] = {}
    if steps >= 20:
        restart_steps, times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = karras(steps - restart_steps * times, float(sigmas[-2]), float(sigmas[0])).to(sigmas)
        restarts = {0.1: (restart_steps + 1, times, 2.0)}
    at = {int(torch.argmin((sigmas - key).abs())): value for key, value in restarts.items()}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in at:
            count, times, top = at[i + 1]
            high = int(torch.argmin((sigmas - top).abs()))
            if high < i + 1:
                segment = karras(count, float(sigmas[i + 1]), float(sigmas[high])).to(sigmas)[:-1]
                pairs += list(zip(segment[:-1], segment[1:])) * times
    last = None
    for k, (sigma, sigma_next) in enumerate(pairs):
        if last is not None and last < sigma:  # back up the noise levels: fresh noise makes up the difference
            x = x + noise(x, last, sigma) * (sigma**2 - last**2) ** 0.5
        x0 = model(x, sigma)
        report(callback, k, x, sigma, x0)
        d = to_d(x, sigma, x0)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            x_next = x + d * (sigma_next - sigma)
            x = x + (d + to_d(x_next, sigma_next, model(x_next, sigma_next))) / 2 * (sigma_next - sigma)
        last = sigma_next
    return x


CFG_PP_SCALE = 1 / 12.5  # CFG++ maps A1111's CFG scale 0..12.5 onto its own guidance 0..1


@torch.no_grad()
def sample_ddim_cfgpp(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                      noise: Noise | None = None) -> torch.Tensor:
    """DDIM with CFG++ (Chung et al. 2024, "Manifold-constrained classifier free guidance"): x0 is the guided
    prediction at a twelfth-and-a-half of the CFG scale, and the step back up to the next noise level uses the
    unconditional noise prediction: x_next = x0 + sigma_next * (x - x0_uncond) / sigma. Needs a CFG model that
    answers ``model(x, sigma, cfg_pp=CFG_PP_SCALE)`` with (guided x0, unconditional x0)."""
    for i in range(len(sigmas) - 1):
        x0, x0_uncond = model(x, sigmas[i], cfg_pp=CFG_PP_SCALE)
        report(callback, i, x, sigmas[i], x0)
        x = x0 + sigmas[i + 1] * (x - x0_uncond) / sigmas[i]
    return x

