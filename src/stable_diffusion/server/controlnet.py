"""The sd-webui-controlnet extension's API: units in ``alwayson_scripts: {"controlnet": {"args": [unit, ...]}}``
(the fields webuiapi's ControlNetUnit sends), ControlNet files in the models folder's ``ControlNet/``, and its
endpoints /controlnet/model_list, module_list, version and detect (the preprocessors run in the worker)."""

from __future__ import annotations

import base64
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from ..annotators import availability
from ..checkpoints.controlnet import BUILTIN_CONTROLNET
from ..checkpoints.hashes import model_hash
from ..control import CONTROL_MODES, RESIZE_MODES, ControlUnit, modules
from ..images import png_bytes
from .executor import Job
from .generation import decode_image
from .protocol import ApiError
from .registry import ModelRegistry

SUFFIXES = {".safetensors", ".pth", ".ckpt", ".pt", ".bin"}
SCRIPT_KEYS = ("controlnet", "ControlNet")  # the extension's name; webuiapi sends the second
_HASH = re.compile(r"\s*\[[0-9a-fA-F]+\]$")


class DetectRequest(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False)  # the schema's types, no coercion
    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_processor_res: int = Field(512, ge=-1, le=2048)
    controlnet_threshold_a: float = 64
    controlnet_threshold_b: float = 64


def control_models(registry: ModelRegistry) -> list[Path]:
    """The models folder's ControlNet/ files, then the built-in ControlNet (for the built-in model)."""
    return registry.files("ControlNet", SUFFIXES) + ([BUILTIN_CONTROLNET] if BUILTIN_CONTROLNET.exists() else [])


def find_control_model(registry: ModelRegistry, name: str) -> Path:
    """A ControlNet file by the extension's title (``name [hash]``), file name or stem."""
    stem = _HASH.sub("", name)
    for path in control_models(registry):
        if stem in (path.name, path.stem):
            return path
    names = ", ".join(p.stem for p in control_models(registry)) or "none"
    raise ApiError(422, f"controlnet: no model {name!r} in the models folder's ControlNet/ (models: {names})")


def _index(value: Any, names: tuple[str, ...], field: str) -> int:
    """An option given as its index or its name (the extension takes both)."""
    if isinstance(value, str) and value in names:
        return names.index(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value
    raise ApiError(422, f"controlnet: {field} must be one of {', '.join(names)} (or 0-{len(names) - 1})")


def control_units(body: Any, registry: ModelRegistry) -> list[ControlUnit]:
    """The enabled units of a body's alwayson_scripts, checked (a 422 names the first bad field)."""
    scripts = body.alwayson_scripts or {}
    units: list[ControlUnit] = []
    for key in SCRIPT_KEYS:
        for i, raw in enumerate((scripts.get(key) or {}).get("args") or []):
            if not isinstance(raw, dict):
                raise ApiError(422, f"controlnet: unit {i} must be an object with the extension's fields")
            if not raw.get("enabled", True):
                continue
            if raw.get("mask") or raw.get("mask_image"):
                raise ApiError(422, "controlnet: a unit's own mask is not implemented by this server")
            image = raw.get("image") or raw.get("input_image")
            if isinstance(image, dict):  # the extension also takes {"image": ..., "mask": ...}
                image = image.get("image")
            if not image:
                raise ApiError(422, f"controlnet: unit {i} has no image")
            try:
                unit = ControlUnit(
                    image=decode_image(image, f"controlnet unit {i} image").convert("RGB"),
                    model=find_control_model(registry, str(raw.get("model", "None"))),
                    module=str(raw.get("module", "none")), weight=float(raw.get("weight", 1.0)),
                    guidance_start=float(raw.get("guidance_start", 0.0)),
                    guidance_end=float(raw.get("guidance_end", 1.0)),
                    control_mode=_index(raw.get("control_mode", 0), CONTROL_MODES, "control_mode"),
                    resize_mode=_index(raw.get("resize_mode", 1), RESIZE_MODES, "resize_mode"),
                    processor_res=int(raw.get("processor_res", 512)),
                    threshold_a=float(raw.get("threshold_a", 100)), threshold_b=float(raw.get("threshold_b", 200)),
                    pixel_perfect=bool(raw.get("pixel_perfect", False)), hr_option=str(raw.get("hr_option", "Both")),
                    annotators=_annotators(registry))
                _thresholds(unit)
                unit.check()
            except (TypeError, ValueError) as error:
                raise ApiError(422, f"controlnet unit {i}: {error}") from None
            units.append(unit)
    return units


DEFAULT_THRESHOLDS = {"canny": (100.0, 200.0), "binary": (127.0, 0.0), "scribble_xdog": (32.0, 0.0),
                      "tile_resample": (1.0, 0.0), "blur_gaussian": (9.0, 0.0)}


def _thresholds(unit: ControlUnit) -> None:
    """The extension's -1: the module's own default thresholds."""
    a, b = DEFAULT_THRESHOLDS.get(unit.module, (0.0, 0.0))
    unit.threshold_a = a if unit.threshold_a < 0 else unit.threshold_a
    unit.threshold_b = b if unit.threshold_b < 0 else unit.threshold_b
    if not (0 <= unit.threshold_a <= 255 and 0 <= unit.threshold_b <= 255 and -1 <= unit.processor_res <= 2048):
        raise ValueError("thresholds must be 0-255 and processor_res -1 to 2048")


def _annotators(registry: ModelRegistry) -> Path | None:
    """The models folder's annotators/ (absolute, so a broker worker finds it under its own models folder)."""
    folder = registry.folder("annotators")
    return folder.resolve() if folder is not None else None


def controlnet_router(registry: ModelRegistry, queued: Callable[..., Awaitable[Any]],
                      run_job: Callable[[Job], Any]) -> APIRouter:
    router = APIRouter(prefix="/controlnet")

    @router.get("/version")
    async def version():
        return {"version": 2}

    @router.get("/model_list")
    async def model_list():
        return {"model_list": [f"{p.stem} [{model_hash(p)}]" for p in control_models(registry)]}

    @router.get("/module_list")
    async def module_list(alias_names: bool = False):
        """The modules that run here; under ``unavailable`` those whose weights file (named) is not in the models
        folder's annotators/."""
        names = modules(_annotators(registry))
        return {"module_list": names, "module_detail": {name: {} for name in names},
                "unavailable": {name: f"needs {file} in annotators/"
                                for name, file in availability(_annotators(registry))[1].items()}}

    @router.post("/detect")
    async def detect(body: DetectRequest):
        folder = _annotators(registry)
        if body.controlnet_module not in modules(folder):
            file = availability(folder)[1].get(body.controlnet_module)
            why = f"needs {file} in the models folder's annotators/" if file else "is not a module of this server"
            raise ApiError(422, f"controlnet_module {body.controlnet_module!r} {why}; available: "
                                f"{', '.join(modules(folder))}")
        images = [decode_image(d, f"controlnet_input_images[{i}]") for i, d in enumerate(body.controlnet_input_images)]
        units = [ControlUnit(image, "", body.controlnet_module, processor_res=body.controlnet_processor_res,
                             threshold_a=body.controlnet_threshold_a, threshold_b=body.controlnet_threshold_b,
                             annotators=folder) for image in images]
        try:
            for unit in units:
                _thresholds(unit)
        except ValueError as error:
            raise ApiError(422, f"controlnet: {error}") from None
        job = Job("detect", None, extra={"units": units})
        maps = await queued(lambda report: run_job(job)[1], 1, 1, "detect") if units else []
        return {"images": [base64.b64encode(png_bytes(m)).decode() for m in maps], "info": "Success"}

    return router
