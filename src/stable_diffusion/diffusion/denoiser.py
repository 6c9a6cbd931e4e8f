"""The k-diffusion view of a noise predictor (Karras et al. 2022): ``D(x, sigma) -> x0``, with classifier-free
guidance (Ho & Salimans 2022) batched into one network call."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .schedules import DiscreteSigmas, model_alphas_cumprod


class Denoiser(nn.Module):
    """Wraps ``unet(x, t, context, y)`` trained on discrete timesteps as the denoiser of Karras et al. 2022
    (eq. 7): ``D(x, sigma) = c_skip x + c_out F(c_in x, t(sigma))``, and gives training its objective from the same
    scalings (k-diffusion's ``Denoiser.loss``), so sampling and training cannot drift apart.

    eps-prediction: c_skip = 1, c_out = -sigma; v-prediction (Salimans & Ho 2022): c_skip = 1 / (sigma^2 + 1),
    c_out = -sigma / sqrt(sigma^2 + 1); both c_in = 1 / sqrt(sigma^2 + 1), which turns the variance-exploding
    x = x0 + sigma * noise into the network's x_t = sqrt(abar) x0 + sqrt(1 - abar) noise."""

    def __init__(self, unet: Callable[..., torch.Tensor], abar: torch.Tensor, prediction: str = "eps") -> None:
        super().__init__()
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', not {prediction!r}")
        self.unet = unet
        self.schedule = DiscreteSigmas(abar)
        self.prediction = prediction

    @classmethod
    def from_config(cls, unet: Callable[..., torch.Tensor], config) -> Denoiser:
        """The denoiser of a model (a ModelConfig): its noise schedule and prediction type."""
        return cls(unet, model_alphas_cumprod(config), config.prediction)

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(1 / c_skip, c_out, c_in) for ``sigma`` (any shape, float32). c_skip comes as its reciprocal so that
        ``x / (sigma^2 + 1)`` rounds exactly as LDM's and A1111's v-prediction arithmetic does."""
        c_in = (sigma**2 + 1).rsqrt()
        if self.prediction == "eps":
            return torch.ones_like(sigma), -sigma, c_in
        return sigma**2 + 1, -sigma * c_in, c_in

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        sigma = sigma.reshape(-1).expand(x.shape[0]).to(x.device, torch.float32)
        skip_div, c_out, c_in = self.scalings(sigma.reshape(-1, *([1] * (x.dim() - 1))))  # (B, 1, 1, 1)
        out = self.unet((x * c_in).to(x.dtype), self.schedule.sigma_to_t(sigma), context, y).float()
        return x.float() / skip_div + c_out * out

    def loss(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
             y: torch.Tensor | None = None, pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample mean squared error (B,) of the network's output at integer timesteps ``t`` against the
        target the scalings imply, ``(x0 - c_skip x) / c_out`` with x = x0 + sigma * noise: the noise for eps,
        ``sqrt(abar) noise - sqrt(1 - abar) x0`` for v (Ho et al. 2020, Algorithm 1; Salimans & Ho 2022).
        ``pixel_weights`` (B, 1, h, w): a weighted mean over the latent's positions instead."""
        sigma = self.schedule.sigmas.to(t.device)[t].reshape(-1, *([1] * (x0.dim() - 1)))
        skip_div, c_out, c_in = self.scalings(sigma)
        noised = x0 + noise * sigma
        target = (x0 - noised / skip_div) / c_out
        output = self.unet((noised * c_in).to(x0.dtype), t, context, y)
        error = (output.float() - target.float()).pow(2)
        if pixel_weights is None:
            return error.flatten(1).mean(1)
        weights = pixel_weights.to(error).expand_as(error)
        return (error * weights).flatten(1).sum(1) / weights.flatten(1).sum(1)


class CFGDenoiser(nn.Module):
    """``uncond + scale * (cond - uncond)`` on x0 (equivalent to on eps), both halves in one batched call.
    ``skip_uncond``: the conditional prediction alone, at half the batch (what guidance skipping uses)."""

    def __init__(self, denoiser: Callable[..., torch.Tensor], cond: torch.Tensor, uncond: torch.Tensor,
                 scale: float, y: torch.Tensor | None = None, y_uncond: torch.Tensor | None = None) -> None:
        super().__init__()
        self.denoiser, self.cond, self.uncond, self.scale = denoiser, cond, uncond, scale
        self.y, self.y_uncond = y, y_uncond

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, skip_uncond: bool = False,
                cfg_pp: float | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The guided x0; with ``cfg_pp`` (CFG++'s factor on the scale) the pair (guided x0, unconditional x0)."""
        if skip_uncond or (self.scale == 1.0 and cfg_pp is None):
            cond = self.denoiser(x, sigma, self.cond, self.y)
            return cond if cfg_pp is None else (cond, cond)
        sigma = sigma.reshape(-1).expand(x.shape[0])
        y = torch.cat([self.y_uncond, self.y]) if self.y is not None else None
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([self.uncond, self.cond]), y)
        uncond, cond = both.chunk(2)
        if cfg_pp is not None:
            return uncond + self.scale * cfg_pp * (cond - uncond), uncond
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

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **options: object) -> torch.Tensor:
        skip = self.skips(float(sigma.reshape(-1)[0]))
        self.calls += 1
        return self.model(x, sigma, skip_uncond=skip, **options)


class RefinerSwitch(nn.Module):
    """SDXL's ensemble of expert denoisers (Podell et al. 2023) as A1111 runs it: the base model's denoiser until
    ``switch_at`` of the diffusion is done, then the refiner's for the rest of the same trajectory (the sampler and
    its history carry on). Done is A1111's ``(999 - t) / 1000`` with t the training timestep nearest the call's
    sigma; the switch is one way. The refiner's denoiser is built at the switch (``make_refiner``), so a request
    that never reaches it never encodes its prompts."""

    def __init__(self, base: Callable[..., torch.Tensor], make_refiner: Callable[[], Callable[..., torch.Tensor]],
                 training_sigmas: torch.Tensor, switch_at: float) -> None:
        super().__init__()
        self.base, self.make_refiner, self.switch_at = base, make_refiner, switch_at
        self.training_sigmas = training_sigmas.float()
        self.refiner: Callable[..., torch.Tensor] | None = None

    @property
    def switched(self) -> bool:
        return self.refiner is not None

    def done(self, sigma: torch.Tensor) -> float:
        """The fraction of the diffusion done at ``sigma`` (A1111's completed_ratio)."""
        n = len(self.training_sigmas)
        t = int(torch.argmin((self.training_sigmas - sigma.float().max().cpu()).abs()))
        return (n - 1 - t) / n

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, *args: object, **options: object) -> torch.Tensor:
        if self.refiner is None and self.done(sigma) >= self.switch_at:
            self.refiner = self.make_refiner()
        return (self.refiner or self.base)(x, sigma, *args, **options)
