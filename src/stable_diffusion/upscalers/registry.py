"""The upscalers a user can name, as A1111 lists them: None, Lanczos and Nearest, then the model files found in
``models/ESRGAN`` (named by file stem) and ``models/RealESRGAN`` (A1111's names for Real-ESRGAN's released files,
the stem for others). ``upscale`` is A1111's Upscaler.upscale; ``resize_image`` its "just resize" with an
upscaler (hires fix, img2img)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch import nn

from .nets import MODEL_SUFFIXES, load_upscaler_net, read_state_dict
from .run import LANCZOS, NEAREST, run_net

REALESRGAN_NAMES = {  # A1111's names for Real-ESRGAN's released files (modules/realesrgan_model.py)
    "RealESRGAN_x4plus": "R-ESRGAN 4x+", "RealESRGAN_x4plus_anime_6B": "R-ESRGAN 4x+ Anime6B",
    "realesr-general-x4v3": "R-ESRGAN General 4xV3", "realesr-general-wdn-x4v3": "R-ESRGAN General WDN 4xV3",
    "realesr-animevideov3": "R-ESRGAN AnimeVideo", "RealESRGAN_x2plus": "R-ESRGAN 2x+"}
FOLDERS = {"ESRGAN": "ESRGAN", "RealESRGAN": "RealESRGAN"}  # folder -> A1111's model_name


@dataclass
class Upscaler:
    """One named upscaler: a PIL resampling filter, nothing ("None": Lanczos to the final size), or a net."""

    name: str
    kind: str  # "none", "lanczos", "nearest" or the folder of a model ("ESRGAN", "RealESRGAN")
    path: Path | None = None
    scale: float = 4.0

    def net(self) -> nn.Module:
        """The loaded net; the last file used stays loaded, so that hires batches and repeated Extras requests
        read it once (a rewritten file is read again)."""
        key = (str(self.path), self.path.stat().st_mtime_ns)
        if _LOADED.get("key") != key:
            _LOADED.clear()  # free the old weights first
            _LOADED.update(key=key, net=load_upscaler_net(self.path))
        return _LOADED["net"]

    def listing(self) -> dict:
        """The entry of A1111's GET /sdapi/v1/upscalers."""
        return {"name": self.name, "model_name": FOLDERS.get(self.kind), "model_path": str(self.path) if self.path
                else None, "model_url": None, "scale": float(self.scale)}

    def do_upscale(self, image: Image.Image, scale: float) -> Image.Image:
        """One pass: a filter resizes by ``scale``; a net multiplies the size by its own scale."""
        if self.kind == "none":
            return image
        if self.kind in ("lanczos", "nearest"):
            size = (int(image.width * scale), int(image.height * scale))
            return image.resize(size, LANCZOS if self.kind == "lanczos" else NEAREST)
        return run_net(self.net(), image)


BUILTIN = ("None", "Lanczos", "Nearest")
_LOADED: dict = {}  # {"key": (path, mtime), "net": the net}: the last upscaler file used


def _model_scale(path: Path) -> float:
    """The scale a model file's weights give (the net is built on the meta device: no memory, no compute)."""
    import torch

    from .nets import net_from_state_dict

    state = read_state_dict(path)
    with torch.device("meta"):
        return float(net_from_state_dict({k: v.to("meta") for k, v in state.items()}).scale)


_SCALES: dict[tuple[str, int], float] = {}  # (path, mtime) -> scale: listings read each file once


def _scale_of(path: Path) -> float:
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _SCALES:
        _SCALES[key] = _model_scale(path)
    return _SCALES[key]


def find_upscalers(models_dir: str | Path | None) -> list[Upscaler]:
    """Every upscaler available: the three built in, then each readable model file (unreadable ones are left
    out of the list; naming one gives its error)."""
    found = [Upscaler("None", "none"), Upscaler("Lanczos", "lanczos"), Upscaler("Nearest", "nearest")]
    if models_dir is None:
        return found
    for folder in FOLDERS:
        directory = Path(models_dir) / folder
        if not directory.is_dir():
            continue
        for path in sorted(p for p in directory.iterdir() if p.suffix in MODEL_SUFFIXES and p.is_file()):
            try:
                scale = _scale_of(path)
            except (ValueError, RuntimeError):
                continue
            name = REALESRGAN_NAMES.get(path.stem, path.stem) if folder == "RealESRGAN" else path.stem
            found.append(Upscaler(name, folder, path, scale))
    return found


def get_upscaler(name: str, models_dir: str | Path | None) -> Upscaler:
    """The upscaler called ``name`` (or the model file at that path); a ValueError listing the names otherwise."""
    if Path(name).suffix in MODEL_SUFFIXES and Path(name).is_file():
        path = Path(name)
        return Upscaler(path.stem, "ESRGAN", path, _scale_of(path))
    available = find_upscalers(models_dir)
    for upscaler in available:
        if upscaler.name == name:
            return upscaler
    raise ValueError(f"unknown upscaler {name!r} (available: {', '.join(u.name for u in available)})")


def upscale(image: Image.Image, scale: float, upscaler: Upscaler) -> Image.Image:
    """A1111's Upscaler.upscale: passes until the image reaches ``scale`` x its size (rounded down to 8), at most
    3, stopping when a pass changes nothing; then a Lanczos resize to exactly that size."""
    dest_w, dest_h = int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8)
    for i in range(3):
        if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
            break
        size = image.size
        image = upscaler.do_upscale(image, scale)
        if image.size == size:
            break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), LANCZOS)
    return image


def resize_image(image: Image.Image, width: int, height: int, upscaler: Upscaler | None) -> Image.Image:
    """A1111's resize mode 0 ("just resize") with an upscaler: upscale when growing, then Lanczos to the size."""
    if upscaler is None or upscaler.kind == "none" or image.mode == "L":
        return image.resize((width, height), LANCZOS)
    scale = max(width / image.width, height / image.height)
    if scale > 1:
        image = upscale(image, scale, upscaler)
    if image.size != (width, height):
        image = image.resize((width, height), LANCZOS)
    return image
