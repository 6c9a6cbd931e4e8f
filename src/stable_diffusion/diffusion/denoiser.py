"""The k-diffusion view of a noise predictor (Karras et al. 2022): ``D(x, sigma) -> x0``, with classifier-free
guidance (Ho & Salimans 2022) batched into one network call."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .schedules import DiscreteSigmas


class Denoiser(nn.Module):
    """Wraps ``unet(x, t, context, y)`` trained on discrete timesteps as ``x0 = D(x, sigma, context, y)``.

    eps-prediction: x0 = x - sigma * eps(x / sqrt(sigma^2 + 1), t(sigma)).
    v-prediction (Salimans & Ho 2022): x0 = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v(...)."""

    def __init__(self, unet: Callable[..., torch.Tensor], abar: torch.Tensor, prediction: str = "eps") -> None:
        super().__init__()
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', not {prediction!r}")
        self.unet = unet
        self.schedule = DiscreteSigmas(abar)
        self.prediction = prediction

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        sigma = sigma.reshape(-1).expand(x.shape[0]).to(x.device, torch.float32)
        s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        c_in = (s**2 + 1).rsqrt()
        out = self.unet((x * c_in).to(x.dtype), self.schedule.sigma_to_t(sigma), context, y).float()
        if self.prediction == "eps":
            return x.float() - s * out
        return x.float() / (s**2 + 1) - s * c_in * out


class CFGDenoiser(nn.Module):
    """``uncond + scale * (cond - uncond)`` on x0 (equivalent to on eps), both halves in one batched call.
    ``skip_uncond``: the conditional prediction alone, at half the batch (what guidance skipping uses)."""

    def __init__(self, denoiser: Callable[..., torch.Tensor], cond: torch.Tensor, uncond: torch.Tensor,
                 scale: float, y: torch.Tensor | None = None, y_uncond: torch.Tensor | None = None) -> None:
        super().__init__()
        self.denoiser, self.cond, self.uncond, self.scale = denoiser, cond, uncond, scale
        self.y, self.y_uncond = y, y_uncond

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, skip_uncond: bool = False) -> torch.Tensor:
        if self.scale == 1.0 or skip_uncond:
            return self.denoiser(x, sigma, self.cond, self.y)
        sigma = sigma.reshape(-1).expand(x.shape[0])
        y = torch.cat([self.y_uncond, self.y]) if self.y is not None else None
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([self.uncond, self.cond]), y)
        uncond, cond = both.chunk(2)
        return uncond + self.scale * (cond - uncond)


class GuidanceSkip(nn.Module):
    """AUTOMATIC1111's two ways of switching guidance off for part of sampling (the conditional prediction
    alone, as at CFG 1): "Skip Early CFG" on the first ``skip_early`` fraction of steps, and "NGMS" (negative
    guidance minimum sigma) below sigma ``s_min_uncond``, on every other model call or, with ``all_steps``, on
    all. Guidance at low noise mostly sharpens what the prompt has already placed and can overshoot it;
    Kynkaanniemi et al. 2024 ("Applying guidance in a limited interval") measure the same for both ends."""

    def __init__(self, model: Callable[..., torch.Tensor], steps: int, s_min_uncond: float = 0.0,
                 all_steps: bool = False, skip_early: float = 0.0) -> None:
        super().__init__()
        self.model, self.steps, self.s_min_uncond = model, steps, s_min_uncond
        self.all_steps, self.skip_early = all_steps, skip_early
        self.calls = 0  # model calls so far, as A1111 counts them (a second-order step makes two)

    def skips(self, sigma: float) -> bool:
        if self.skip_early and self.calls / self.steps <= self.skip_early:
            return True
        return (self.all_steps or self.calls % 2 == 1) and sigma < self.s_min_uncond

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        skip = self.skips(float(sigma.reshape(-1)[0]))
        self.calls += 1
        return self.model(x, sigma, skip_uncond=skip)
