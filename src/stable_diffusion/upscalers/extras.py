"""A1111's "Extras" upscale (scripts/postprocessing_upscale.py): upscaler 1 scales the image by a factor (resize
mode 0) or to cover a width x height, optionally centre-cropped to it (mode 1); upscaler 2, when named with a
visibility above 0, upscales the original too and is blended in at that weight. Returns the image and A1111's
"Postprocess ..." parameters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .registry import get_upscaler, upscale


@dataclass(frozen=True)
class ExtrasUpscale:
    resize_mode: int = 0  # 0: by upscaling_resize, 1: to upscaling_resize_w x _h
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    upscaler_2_visibility: float = 0.0

    def scale_for(self, image: Image.Image) -> float:
        if self.resize_mode == 1:
            return max(self.upscaling_resize_w / image.width, self.upscaling_resize_h / image.height)
        return self.upscaling_resize

    def output_size(self, image: Image.Image) -> tuple[int, int]:
        """The size ``apply`` returns for ``image`` (before any work: the server checks it against its limit)."""
        if self.resize_mode == 1 and self.upscaling_crop:
            return self.upscaling_resize_w, self.upscaling_resize_h
        scale = self.scale_for(image)
        return int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8)

    def check(self, models_dir: str | Path | None) -> None:
        """A ValueError for an unknown upscaler name, before any work."""
        for name in (self.upscaler_1, self.upscaler_2):
            if name and name != "None":
                get_upscaler(name, models_dir)

    def apply(self, image: Image.Image, models_dir: str | Path | None) -> tuple[Image.Image, dict[str, Any]]:
        info: dict[str, Any] = {}
        if not self.upscaler_1 or self.upscaler_1 == "None":  # A1111: no upscaler 1, no upscale at all
            return image, info
        first = get_upscaler(self.upscaler_1, models_dir)
        second = get_upscaler(self.upscaler_2, models_dir) if self.upscaler_2 and self.upscaler_2 != "None" \
            else None
        out = self._upscale(image, first, info)
        info["Postprocess upscaler"] = first.name
        if second is not None and self.upscaler_2_visibility > 0:
            other = self._upscale(image, second, info).convert(out.mode)
            out = Image.blend(out, other, self.upscaler_2_visibility)
            info["Postprocess upscaler 2"] = second.name
        return out, info

    def _upscale(self, image: Image.Image, upscaler, info: dict[str, Any]) -> Image.Image:
        scale = self.scale_for(image)
        if self.resize_mode == 1:
            info["Postprocess upscale to"] = f"{self.upscaling_resize_w}x{self.upscaling_resize_h}"
        else:
            info["Postprocess upscale by"] = self.upscaling_resize
        out = upscale(image.convert("RGB"), scale, upscaler)
        if self.resize_mode == 1 and self.upscaling_crop:
            w, h = self.upscaling_resize_w, self.upscaling_resize_h
            cropped = Image.new("RGB", (w, h))
            cropped.paste(out, box=(w // 2 - out.width // 2, h // 2 - out.height // 2))
            out = cropped
            info["Postprocess crop to"] = f"{w}x{h}"
        return out
