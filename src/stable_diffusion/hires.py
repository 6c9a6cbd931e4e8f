"""AUTOMATIC1111's hires fix (modules/processing.py, the txt2img class): a first pass at width x height, an
upscale (of the latents by interpolation in one of A1111's latent modes, or of the decoded images by an upscaler,
encoded again), and an img2img pass at the target size. That pass runs ``steps`` (0: the first pass's) of a
schedule stretched to ``int(steps / min(denoising_strength, 0.999))`` steps, A1111's rule when a step count is
given. ``HiresFix`` holds the options; generate.py runs the passes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

LATENT_UPSCALE_MODES = {  # A1111's names -> (torch interpolation mode, antialias)
    "Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}


@dataclass(frozen=True)
class HiresFix:
    """The second pass's options, with A1111's field names without the ``hr_`` prefix."""

    scale: float = 2.0  # used when resize_x and resize_y are both 0
    resize_x: int = 0  # a target width and/or height instead of a scale (the other side keeps the aspect)
    resize_y: int = 0
    upscaler: str | None = None  # None: "Latent" (A1111's default), then not written to the infotext
    steps: int = 0  # 0: the first pass's step count
    sampler: str | None = None  # None: the first pass's
    scheduler: str | None = None
    prompt: str = ""  # "": the first pass's prompt
    negative_prompt: str = ""
    cfg_scale: float | None = None  # None: the first pass's

    @property
    def latent_mode(self) -> tuple[str, bool] | None:
        """(interpolation mode, antialias) for a latent upscaler, None for an image upscaler."""
        return LATENT_UPSCALE_MODES.get(self.upscaler or "Latent")

    def target(self, width: int, height: int, factor: int = 8) -> tuple[int, int, int, int]:
        """A1111's calculate_target_resolution: (upscale_to_x, upscale_to_y, truncate_x, truncate_y). With both
        resize sides given, the image is upscaled to cover them and ``truncate`` latent cells (of ``factor``
        pixels: the VAE's downscale, 8 in SD) are cut, half from each side, to reach them."""
        if self.resize_x == 0 and self.resize_y == 0:
            return int(width * self.scale), int(height * self.scale), 0, 0
        if self.resize_y == 0:
            return self.resize_x, self.resize_x * height // width, 0, 0
        if self.resize_x == 0:
            return self.resize_y * width // height, self.resize_y, 0, 0
        if width / height < self.resize_x / self.resize_y:
            to_x, to_y = self.resize_x, self.resize_x * height // width
        else:
            to_x, to_y = self.resize_y * width // height, self.resize_y
        return to_x, to_y, (to_x - self.resize_x) // factor, (to_y - self.resize_y) // factor

    def final_size(self, width: int, height: int, factor: int = 8) -> tuple[int, int]:
        """The second pass's (and the images') width and height: the target in whole latent cells."""
        to_x, to_y, tx, ty = self.target(width, height, factor)
        return (to_x // factor - tx) * factor, (to_y // factor - ty) * factor

    def check(self, width: int, height: int) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"hr_scale must be a positive number, got {self.scale}")
        if self.resize_x < 0 or self.resize_y < 0 or self.steps < 0:
            raise ValueError("hr_resize_x, hr_resize_y and hr_second_pass_steps must be >= 0")
        if self.cfg_scale is not None and not math.isfinite(self.cfg_scale):
            raise ValueError(f"hr_cfg must be a finite number, got {self.cfg_scale}")
        w, h = self.final_size(width, height)
        if w < 8 or h < 8:
            raise ValueError(f"the hires fix's target {w}x{h} is too small")

    def infotext(self, sampler: str, scheduler_label: str, hires_scheduler_label: str, prompt: str,
                 negative_prompt: str, cfg_scale: float) -> dict[str, Any]:
        """A1111's extra parameters for the hires fix, in its order (None values are left out)."""
        resized = self.resize_x != 0 or self.resize_y != 0
        return {
            "Hires sampler": self.sampler if self.sampler and self.sampler != sampler else None,
            "Hires schedule type": hires_scheduler_label if self.scheduler and hires_scheduler_label != scheduler_label
            else None,
            "Hires prompt": self.prompt if self.prompt and self.prompt != prompt else None,
            "Hires negative prompt": self.negative_prompt if self.negative_prompt and
            self.negative_prompt != negative_prompt else None,
            "Hires CFG Scale": self.cfg_scale if self.cfg_scale is not None and self.cfg_scale != cfg_scale
            else None,
            "Hires upscale": None if resized else self.scale,
            "Hires resize": f"{self.resize_x}x{self.resize_y}" if resized else None,
            "Hires steps": self.steps or None,
            "Hires upscaler": self.upscaler,
        }


def upscale_latents(latents: torch.Tensor, mode: tuple[str, bool], size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *size) by A1111's latent upscale mode."""
    method, antialias = mode
    return F.interpolate(latents, size=size, mode=method, antialias=antialias)


def truncate(latents: torch.Tensor, tx: int, ty: int) -> torch.Tensor:
    """Cut ``tx`` / ``ty`` latent cells, the smaller half from the left / top, as A1111 does."""
    h, w = latents.shape[-2:]
    return latents[..., ty // 2:h - (ty + 1) // 2, tx // 2:w - (tx + 1) // 2]


def second_pass_steps(steps: int, strength: float) -> tuple[int, int]:
    """(schedule length, steps run) of the img2img pass given a step count: A1111's setup_img2img_steps."""
    return int(steps / min(strength, 0.999)), steps
