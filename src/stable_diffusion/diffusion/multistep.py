"""Multistep samplers: they reuse the model's earlier x0 predictions instead of extra model calls
(DPM-Solver++(2M), linear multistep, PLMS, UniPC). Same convention as samplers.py: ``model(x, sigma) -> x0``."""

from __future__ import annotations

import math

import numpy as np
import torch

from .common import Callback, Model, Noise, default_noise, denoise, to_d


@torch.no_grad()
def sample_dpmpp_2m(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                    noise: Noise | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): multistep second order in log-SNR time, data prediction."""
    old_x0 = None
    for i in range(len(sigmas) - 1):
        x0 = denoise(model, x, sigmas, i, callback)
        if sigmas[i + 1] == 0:
            x = x0
            continue
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_x0 is None:
            guess = x0
        else:
            r = (t - (-sigmas[i - 1].log())) / h
            guess = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
        x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * guess
        old_x0 = x0
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                        noise: Noise | None = None, eta: float = 1.0, solver_type: str = "midpoint") -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022): the 2M update on the reverse SDE, which re-injects
    ``sigma_next * sqrt(1 - exp(-2 eta h))`` of fresh noise each step; the second-order correction of the
    ``midpoint`` or the ``heun`` variant (A1111's "DPM++ 2M SDE" and "DPM++ 2M SDE Heun")."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be midpoint or heun, not {solver_type!r}")
    noise = noise or default_noise()
    old_x0 = h_last = None
    for i in range(len(sigmas) - 1):
        x0 = denoise(model, x, sigmas, i, callback)
        if sigmas[i + 1] == 0:
            x = x0
            continue
        h = sigmas[i].log() - sigmas[i + 1].log()  # step in log-SNR time -log(sigma)
        eta_h = eta * h
        decay = -torch.expm1(-h - eta_h)  # 1 - exp(-(1 + eta) h)
        x = sigmas[i + 1] / sigmas[i] * torch.exp(-eta_h) * x + decay * x0
        if old_x0 is not None and solver_type == "midpoint":
            x = x + 0.5 * decay * (h / h_last) * (x0 - old_x0)
        elif old_x0 is not None:
            x = x + (decay / (-h - eta_h) + 1) * (h / h_last) * (x0 - old_x0)
        if eta:
            x = x + noise(x, sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-torch.expm1(-2 * eta_h)).sqrt()
        old_x0, h_last = x0, h
    return x


def _lms_coefficient(order: int, sigmas: list[float], i: int, j: int) -> float:
    """Integral over [sigma_i, sigma_i+1] of the Lagrange basis polynomial through sigma_i, ..., sigma_i-order+1
    that is 1 at sigma_(i-j) (exactly, as a polynomial)."""
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly *= np.polynomial.Polynomial([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
    antiderivative = poly.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


@torch.no_grad()
def sample_lms(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
               noise: Noise | None = None, order: int = 4) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth on non-uniform sigma steps, Karras et al. 2022's k-diffusion LMS)."""
    s = sigmas.double().cpu().tolist()
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        x0 = denoise(model, x, sigmas, i, callback)
        ds.append(to_d(x, sigmas[i], x0))
        ds = ds[-order:]
        current = min(i + 1, order)
        for j, d in enumerate(reversed(ds)):
            x = x + _lms_coefficient(current, s, i, j) * d
    return x




PLMS_COEFFICIENTS = {1: (3 / 2, -1 / 2), 2: (23 / 12, -16 / 12, 5 / 12), 3: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@torch.no_grad()
def sample_plms(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                noise: Noise | None = None) -> torch.Tensor:
    """PLMS, the pseudo linear multistep method (Liu et al. 2022, PNDM) as LDM and A1111 run it: DDIM steps
    driven by an Adams-Bashforth combination of the last four noise predictions. The first step starts the
    history with the mean of the noise predicted at both of its ends (a Heun step). In the sigma
    parameterisation the noise prediction is exactly the ODE derivative (x - x0) / sigma."""
    history: list[torch.Tensor] = []  # noise predictions of earlier steps, oldest first
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(model, x, sigmas, i, callback)
        eps = to_d(x, sigma, x0)
        if history:
            recent = [eps, *reversed(history)]
            combined = sum(c * e for c, e in zip(PLMS_COEFFICIENTS[len(history)], recent))
        elif sigma_next > 0:
            x_next = x + eps * (sigma_next - sigma)
            combined = (eps + to_d(x_next, sigma_next, model(x_next, sigma_next))) / 2
        else:
            combined = eps
        history = [*history, eps][-3:]
        x = x + combined * (sigma_next - sigma)
    return x


def _unipc_update(x: torch.Tensor, x0s: list[torch.Tensor], lambdas: list[float], i: int, order: int, variant: str,
                  x0_next: torch.Tensor | None = None) -> torch.Tensor:
    """One UniPC update of ``order`` from step i to i + 1 in log-SNR time lambda = -log sigma (Zhao et al. 2023,
    data prediction): the predictor UniP from the x0 history ``x0s`` (newest last, x0s[-1] at step i), or, given
    the model's x0 at the predicted point, the corrector UniC."""
    h = lambdas[i + 1] - lambdas[i]
    hh = -h
    m0 = x0s[-1]
    rks = [(lambdas[i - k] - lambdas[i]) / h for k in range(1, order)] + [1.0]
    differences = [(x0s[-(k + 1)] - m0) / rks[k - 1] for k in range(1, order)]
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    # b_k = h phi_(k+1)(h) k! / B(h), phi by their recurrence; R: Vandermonde rows of rks
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    vandermonde = np.array([[rk ** (k - 1) for rk in rks] for k in range(1, order + 1)])
    x_next = (math.exp(-h) if math.isfinite(h) else 0.0) * x - h_phi_1 * m0
    if x0_next is None:
        if order == 1:
            return x_next
        rhos = [0.5] if order == 2 else np.linalg.solve(vandermonde[:-1, :-1], b[:-1]).tolist()
        return x_next - b_h * sum(r * d for r, d in zip(rhos, differences))
    rhos = [0.5] if order == 1 else np.linalg.solve(vandermonde, b).tolist()
    correction = sum((r * d for r, d in zip(rhos[:-1], differences)), rhos[-1] * (x0_next - m0))
    return x_next - b_h * correction


@torch.no_grad()
def sample_unipc(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                 noise: Noise | None = None, order: int = 3, variant: str = "bh1") -> torch.Tensor:
    """UniPC (Zhao et al. 2023): a multistep predictor (UniP) whose result is corrected (UniC) with the model
    call the next step makes anyway, so order + 1 accuracy at one call per step. A1111's defaults: order 3,
    variant bh1 (bh2 is recommended for strong guidance), lower orders at the start and on the last steps."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unknown UniPC variant {variant!r}; known: bh1, bh2")
    lambdas = [-math.log(s) if s > 0 else math.inf for s in sigmas.double().cpu().tolist()]
    steps = len(sigmas) - 1
    x0s: list[torch.Tensor] = []
    last_x, last_order = None, 0
    for i in range(steps):
        x0 = denoise(model, x, sigmas, i, callback)
        if last_x is not None:
            x = _unipc_update(last_x, x0s, lambdas, i - 1, last_order, variant, x0_next=x0)
        x0s = [*x0s, x0][-order:]
        last_x, last_order = x, min(order, steps - i, len(x0s))
        x = _unipc_update(x, x0s, lambdas, i, last_order, variant)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                        noise: Noise | None = None, eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (Lu et al. 2022, third-order multistep on the reverse SDE): the exponential
    integrator's phi_2 and phi_3 terms from the last three x0 predictions, with fresh noise each step."""
    noise = noise or default_noise()
    x0_1 = x0_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        x0 = denoise(model, x, sigmas, i, callback)
        if sigmas[i + 1] == 0:
            x = x0
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()  # step in log-SNR time -log(sigma)
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x - torch.expm1(-h_eta) * x0
            phi_2 = torch.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:  # third order: first and second differences of x0 over the last three steps
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (x0 - x0_1) / r0, (x0_1 - x0_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:  # second order on the second step
                x = x + phi_2 * (x0 - x0_1) / (h_1 / h)
            if eta:
                x = x + noise(x, sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-torch.expm1(-2 * h * eta)).sqrt()
            h_1, h_2 = h, h_1
        x0_1, x0_2 = x0, x0_1
    return x
