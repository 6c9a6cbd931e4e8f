"""Shared pieces of the samplers: the k-diffusion calling convention ``model(x, sigma) -> x0`` over a
decreasing sigma list, the ODE derivative, ancestral step sizes and the noise source."""

from __future__ import annotations

from collections.abc import Callable

import torch

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None] | None
Noise = Callable[..., torch.Tensor]  # noise(like, sigma, sigma_next): N(0, I) shaped like ``like`` (noise.py)


def default_noise(generator: torch.Generator | None = None) -> Noise:
    """Fresh N(0, I) noise per call, drawn on the generator's device (CPU by default) for reproducibility."""
    def draw(like: torch.Tensor, sigma: torch.Tensor | None = None, sigma_next: torch.Tensor | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else like.device
        return torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32).to(like)
    return draw


def to_d(x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - x0) / sigma."""
    return (x - x0) / sigma


def report(callback: Callback, i: int, x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": x0})


def denoise(model: Model, x: torch.Tensor, sigmas: torch.Tensor, i: int, callback: Callback) -> torch.Tensor:
    """Step i's x0 prediction ``model(x, sigmas[i])``, reported to the callback (which may stop sampling)."""
    x0 = model(x, sigmas[i])
    report(callback, i, x, sigmas[i], x0)
    return x0


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up): the deterministic target and the noise to add back for an ancestral step."""
    if not eta or sigma_next == 0:
        return sigma_next, sigma_next * 0
    up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt())
    return (sigma_next**2 - up**2).sqrt(), up
