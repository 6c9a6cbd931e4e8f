"""ControlNet units as the sd-webui-controlnet extension runs them: each unit's control image goes through its
preprocessor (``module``), is fitted to the generation size (its resize mode), and its ControlNet's residuals
are added to the UNet's, scaled by the unit's weight, between guidance_start and guidance_end (fractions of the
sampling steps). Control modes: Balanced; "My prompt is more important" (soft injection: the residual of
block i of 13 scaled by 0.825^(12 - i)); "ControlNet is more important" (soft injection, and the unconditional
half of CFG gets no control)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch import nn

from .annotators import ANNOTATORS, annotate, availability, check_available
from .checkpoints.controlnet import controlnet_path, read_controlnet
from .inpaint import fit_image
from .models.controlnet import ControlNet

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .request import GenerationRequest

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")  # the extension's names, in its order
HR_OPTIONS = ("Both", "Low res only", "High res only")


def _cv2(module: str):
    try:
        import cv2
    except ImportError:
        raise ValueError(f"the {module} preprocessor needs OpenCV: pip install opencv-python-headless") from None
    return cv2


def _canny(image: Image.Image, low: float, high: float) -> Image.Image:
    edges = _cv2("canny").Canny(np.asarray(image.convert("RGB")), int(low), int(high))
    return Image.fromarray(edges).convert("RGB")


def _scribble_xdog(image: Image.Image, threshold: float) -> Image.Image:
    """Lines by XDoG (a difference of Gaussians, sigma 0.5 and 5), kept where 2 * response > threshold."""
    cv2 = _cv2("scribble_xdog")
    pixels = np.asarray(image.convert("RGB")).astype(np.float32)
    fine, coarse = cv2.GaussianBlur(pixels, (0, 0), 0.5), cv2.GaussianBlur(pixels, (0, 0), 5.0)
    dog = (255 - np.min(coarse - fine, axis=2)).clip(0, 255).astype(np.uint8)
    lines = (2 * (255 - dog.astype(np.int32)) > threshold).astype(np.uint8) * 255
    return Image.fromarray(lines).convert("RGB")


def _tile_resample(image: Image.Image, rate: float) -> Image.Image:
    """The tile model's input: the image shrunk by the down-sampling rate (area average); below 1.1 unchanged."""
    if rate < 1.1:
        return image.convert("RGB")
    w, h = int(image.width / rate), int(image.height / rate)
    return Image.fromarray(_cv2("tile_resample").resize(np.asarray(image.convert("RGB")), (max(w, 1), max(h, 1)),
                                                       interpolation=_cv2("tile_resample").INTER_AREA))


def _color_grid(image: Image.Image) -> Image.Image:
    """T2I-Adapter's colour grid: the image at 1/64 of its size (bicubic), blown back up (nearest)."""
    cv2 = _cv2("t2ia_color_grid")
    pixels = np.asarray(image.convert("RGB"))
    h, w = pixels.shape[:2]
    small = cv2.resize(pixels, (max(w // 64, 1), max(h // 64, 1)), interpolation=cv2.INTER_CUBIC)
    return Image.fromarray(cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST))


def _binary(image: Image.Image, threshold: float) -> Image.Image:
    grey = np.asarray(image.convert("L"))
    return Image.fromarray(((grey > threshold) * 255).astype(np.uint8)).convert("RGB")


# name -> (image, threshold_a, threshold_b) -> control map; the extension's names and threshold meanings
PREPROCESSORS: dict[str, Callable[[Image.Image, float, float], Image.Image]] = {
    "none": lambda image, a, b: image.convert("RGB"),
    "invert": lambda image, a, b: ImageOps.invert(image.convert("RGB")),  # white-background line art -> lines on black
    "canny": _canny,  # threshold_a / threshold_b: the low and high hysteresis thresholds (100, 200)
    "binary": lambda image, a, b: _binary(image, a),  # threshold_a: the grey level above which a pixel is white
    "scribble_xdog": lambda image, a, b: _scribble_xdog(image, a),  # threshold_a: the XDoG threshold (32)
    "tile_resample": lambda image, a, b: _tile_resample(image, a),  # threshold_a: the down-sampling rate (1)
    "blur_gaussian": lambda image, a, b: image.convert("RGB").filter(ImageFilter.GaussianBlur(a)),  # sigma (9)
    "t2ia_color_grid": lambda image, a, b: _color_grid(image),
}


def modules(annotators: str | Path | None = None) -> list[str]:
    """The preprocessors that run here: those without weights, then the annotators whose weights are present."""
    return [*PREPROCESSORS, *availability(annotators)[0]]


@dataclass
class ControlUnit:
    """One ControlNet unit, with the extension's field names and defaults."""

    image: Image.Image
    model: str | Path  # a ControlNet file (cldm or diffusers weights) or diffusers folder
    module: str = "none"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: int = 0  # an index of CONTROL_MODES
    resize_mode: int = 1  # an index of RESIZE_MODES (the extension's default: Crop and Resize)
    processor_res: int = 512  # the preprocessor works at this short side (-1 or 0: the image as it is)
    threshold_a: float = 100.0
    threshold_b: float = 200.0
    pixel_perfect: bool = False  # the preprocessor's resolution from the image and target sizes instead
    hr_option: str = "Both"  # with the hires fix: Both, Low res only, High res only
    annotators: str | Path | None = None  # the folder of preprocessor weights (annotators/ of the models folder)

    def __post_init__(self) -> None:
        self.model = controlnet_path(self.model)  # "builtin": the built-in model's layout ControlNet

    def check(self) -> None:
        if self.hr_option not in HR_OPTIONS:
            raise ValueError(f"control hr_option must be one of {', '.join(HR_OPTIONS)}")
        if self.module in ANNOTATORS:
            check_available(self.module, self.annotators)
        elif self.module not in PREPROCESSORS:
            raise ValueError(f"control module {self.module!r} is not available here; available: "
                             f"{', '.join(modules(self.annotators))}")
        if not math.isfinite(self.weight) or not 0 <= self.weight <= 2:
            raise ValueError(f"control weight must be in [0, 2], got {self.weight}")
        if not 0 <= self.guidance_start <= self.guidance_end <= 1:
            raise ValueError("control guidance_start and guidance_end must satisfy 0 <= start <= end <= 1")
        if self.control_mode not in range(len(CONTROL_MODES)):
            raise ValueError(f"control_mode must be 0-2 ({', '.join(CONTROL_MODES)})")
        if self.resize_mode not in range(len(RESIZE_MODES)):
            raise ValueError(f"control resize_mode must be 0-2 ({', '.join(RESIZE_MODES)})")
        if not Path(self.model).exists():
            raise ValueError(f"control model {Path(self.model).name!r} not found")

    def resolution(self, width: int, height: int) -> int:
        """The preprocessor's short side: processor_res, or with pixel_perfect the extension's estimate (the image
        scaled as the resize mode will scale it to width x height)."""
        if not self.pixel_perfect:
            return self.processor_res
        k = (height / self.image.height, width / self.image.width)
        scale = min(k) if self.resize_mode == 2 else max(k)
        return int(np.round(scale * min(self.image.size)))

    def detect(self, width: int | None = None, height: int | None = None) -> Image.Image:
        """The control map: the image at the preprocessor's resolution, through the preprocessor."""
        image = self.image
        res = self.resolution(width, height) if width and height else self.processor_res
        if self.module != "none" and res > 0 and min(image.size) != res:
            scale = res / min(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
        if self.module in ANNOTATORS:
            return annotate(self.module, image, self.annotators)
        return PREPROCESSORS[self.module](image, self.threshold_a, self.threshold_b)

    def control_map(self, width: int, height: int) -> Image.Image:
        """The control map fitted to the generation size (what the ControlNet sees)."""
        return fit_image(self.detect(width, height), width, height, self.resize_mode).convert("RGB")

    def hint(self, width: int, height: int) -> torch.Tensor:
        """(1, 3, height, width) in [0, 1]: the control map as the ControlNet's input."""
        fitted = self.control_map(width, height)
        return torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def load_control_model(path: str | Path, device: torch.device, dtype: torch.dtype) -> ControlNet:
    config, state = read_controlnet(path)
    with torch.device("meta"):
        model = ControlNet(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.to(device).eval()


class ControlledUNet(nn.Module):
    """A UNet with ControlNet units: ``unet(x, t, context, y)`` as before, each unit's residuals added while the
    sampling step lies in its guidance range. ``step_ts``: each sampling step's timestep (decreasing), which
    tells the step from the t a call gets; ``images``: the batch's image count (CFG calls carry two halves,
    the unconditional first)."""

    def __init__(self, unet: Callable[..., torch.Tensor], units: list[tuple[ControlNet, torch.Tensor, ControlUnit]],
                 step_ts: torch.Tensor, images: int) -> None:
        super().__init__()
        self.unet, self.units, self.step_ts, self.images = unet, units, step_ts.float().cpu(), images

    def fraction(self, t: torch.Tensor) -> float:
        current = float(t.reshape(-1)[0])
        step = int((self.step_ts >= current - 1e-3).sum()) - 1
        return max(step, 0) / max(len(self.step_ts), 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        fraction = self.fraction(t)
        total: list[torch.Tensor] | None = None
        for net, hint, unit in self.units:
            if not unit.guidance_start <= fraction <= unit.guidance_end or unit.weight == 0:
                continue
            outs = net(x, hint.to(x.device).expand(x.shape[0], -1, -1, -1), t, context, y)
            scales = [unit.weight] * len(outs)
            if unit.control_mode != 0:  # soft injection: the deeper the block, the more of its residual
                scales = [unit.weight * 0.825 ** float(12 - i) for i in range(13)][:len(outs)]
            if unit.control_mode == 2 and x.shape[0] == 2 * self.images:  # CFG: the conditional half only
                mark = torch.cat([torch.zeros(self.images), torch.ones(self.images)]).to(x.device)[:, None, None, None]
                scales = [mark * s for s in scales]
            outs = [o * s for o, s in zip(outs, scales, strict=True)]
            total = outs if total is None else [a + b for a, b in zip(total, outs, strict=True)]
        return self.unet(x, t, context, y) if total is None else self.unet(x, t, context, y, control=total)


def add_controls(pipe: Pipeline, request: GenerationRequest, denoiser: nn.Module, sigmas: torch.Tensor,
                 hires_pass: bool = False) -> None:
    """Put the request's ControlNet units between ``denoiser`` and its UNet, for a pass walking ``sigmas`` (the
    hires fix's second when ``hires_pass``: the units whose hr_option says so); each ControlNet file is loaded
    once per pipeline (again if the file changes)."""
    skip = "High res only" if not hires_pass and request.hires is not None else "Low res only" if hires_pass \
        else None
    chosen = [unit for unit in request.controls if unit.hr_option != skip]
    if not chosen:
        return
    cache: dict = pipe.control_models
    units = []
    for unit in chosen:
        path = Path(unit.model)
        key = (str(path.resolve()), path.stat().st_mtime_ns, pipe.device, pipe.dtype)
        if key not in cache:
            cache[key] = load_control_model(path, pipe.device, pipe.dtype)
        net = cache[key]
        c, u = net.control_config.unet, pipe.config.unet
        if net.downscale != pipe.vae.downscale or (c.context_dim, c.adm_in_channels) != (u.context_dim,
                                                                                        u.adm_in_channels):
            raise ValueError(f"control model {path.name!r} is for another model family than {pipe.config.name!r}")
        units.append((net, unit.hint(request.width, request.height), unit))
    step_ts = denoiser.schedule.sigma_to_t(sigmas[:-1].cpu())
    denoiser.unet = ControlledUNet(denoiser.unet, units, step_ts, request.batch_size)
