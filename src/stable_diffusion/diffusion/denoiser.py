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
    """``uncond + scale * (cond - uncond)`` on x0 (equivalent to on eps), both halves in one batched call."""

    def __init__(self, denoiser: Callable[..., torch.Tensor], cond: torch.Tensor, uncond: torch.Tensor,
                 scale: float, y: torch.Tensor | None = None, y_uncond: torch.Tensor | None = None) -> None:
        super().__init__()
        self.denoiser, self.cond, self.uncond, self.scale = denoiser, cond, uncond, scale
        self.y, self.y_uncond = y, y_uncond

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return self.denoiser(x, sigma, self.cond, self.y)
        sigma = sigma.reshape(-1).expand(x.shape[0])
        y = torch.cat([self.y_uncond, self.y]) if self.y is not None else None
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([self.uncond, self.cond]), y)
        uncond, cond = both.chunk(2)
        return uncond + self.scale * (cond - uncond)
