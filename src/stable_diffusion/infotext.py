"""AUTOMATIC1111's generation-parameters text ("infotext"), stored in PNGs as the "parameters" tEXt chunk."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .checkpoints.hashes import lora_hash
from .control import CONTROL_MODES, RESIZE_MODES
from .diffusion.schedules import SCHEDULERS

if TYPE_CHECKING:
    from .request import GenerationRequest

_KEY = re.compile(r"\w[\w \-/]+")
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(ch in text for ch in ",\n:") else text


def format_infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """``prompt``, an optional ``Negative prompt:`` line, then ``k: v`` pairs (None values left out)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(_params_line(params))
    return "\n".join(lines)


def _params_line(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)


def append_params(infotext: str, params: dict[str, Any]) -> str:
    """An infotext with more ``k: v`` pairs at the end of its parameters line (as A1111's scripts add theirs)."""
    extra = _params_line(params)
    if not extra:
        return infotext
    return f"{infotext}, {extra}" if infotext else extra


def _pairs(line: str) -> list[tuple[str, str]]:
    """The ``key: value`` pairs of a parameters line (values JSON-quoted when they hold a comma), read in one
    pass: A1111's regex for this backtracks quadratically on a long line without colons."""
    pairs, i = [], 0
    while i < len(line):
        colon = line.find(":", i)
        if colon < 0:
            break
        key = line[i:colon].strip()
        value_start = colon + 1
        while value_start < len(line) and line[value_start] == " ":
            value_start += 1
        if line.startswith('"', value_start):  # a quoted value runs to its closing quote
            end = value_start + 1
            while end < len(line) and line[end] != '"':
                end += 2 if line[end] == "\\" else 1
            end = min(end + 1, len(line))
            try:
                value = json.loads(line[value_start:end])
            except ValueError:
                value = line[value_start:end]
            comma = line.find(",", end)
        else:
            comma = line.find(",", value_start)
            value = line[value_start:comma if comma >= 0 else len(line)].strip()
        if _KEY.fullmatch(key):
            pairs.append((key, value))
        i = len(line) if comma < 0 else comma + 1
    return pairs


def parse_infotext(text: str) -> dict[str, Any]:
    """Inverse of ``format_infotext``, as A1111 reads it back: {"Prompt", "Negative prompt", each parameter as a
    string; a WxH value such as Size as "Size-1" and "Size-2"}."""
    lines = text.strip().split("\n")
    params: dict[str, Any] = {}
    pairs = _pairs(lines[-1]) if lines else []
    if len(pairs) >= 3:
        lines.pop()
        for key, value in pairs:
            size = _IMAGE_SIZE.match(value)
            if size:  # A1111 reads "Size: 512x768" as Size-1 = 512 and Size-2 = 768
                params[f"{key.strip()}-1"], params[f"{key.strip()}-2"] = size.groups()
            else:
                params[key.strip()] = value
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **params}


def guidance_skip_params(request: GenerationRequest) -> dict[str, Any]:
    """The keys A1111 writes for its guidance-skipping options (only those in use)."""
    params = {"NGMS": request.s_min_uncond or None,
              "NGMS all steps": True if request.s_min_uncond and request.s_min_uncond_all else None,
              "Skip Early CFG": request.skip_early_cond or None}
    return {k: v for k, v in params.items() if v is not None}


def hires_params(request: GenerationRequest) -> dict[str, Any]:
    """The hires fix's keys of a resolved request (hires.py), those that apply."""
    if request.hires is None:
        return {}
    second = request.hires_request()
    params = request.hires.infotext(request.sampler, SCHEDULERS[request.scheduler].label,
                                    SCHEDULERS[second.scheduler].label, request.prompts[0], request.negative_prompt,
                                    request.cfg_scale)
    return {k: v for k, v in params.items() if v is not None}


def control_params(request: GenerationRequest) -> dict[str, str]:
    """The sd-webui-controlnet extension's keys: ``ControlNet i`` with each unit's settings."""
    out = {}
    for i, u in enumerate(request.controls):
        fields = (("Module", u.module), ("Model", Path(u.model).stem), ("Weight", u.weight),
                  ("Resize Mode", RESIZE_MODES[u.resize_mode]), ("Processor Res", u.processor_res),
                  ("Threshold A", u.threshold_a), ("Threshold B", u.threshold_b), ("Guidance Start", u.guidance_start),
                  ("Guidance End", u.guidance_end), ("Pixel Perfect", u.pixel_perfect),
                  ("Control Mode", CONTROL_MODES[u.control_mode]))
        out[f"ControlNet {i}"] = ", ".join(f"{k}: {v}" for k, v in fields)
    return out


def generation_parameters(request: GenerationRequest, seed: int, model: str | None, model_hash: str | None = None,
                          loras: list[Path] = (), subseed: int | None = None, vae: str | None = None,
                          refiner: str | None = None) -> dict[str, Any]:
    """The ``k: v`` pairs A1111 writes for one image of a resolved request, in its order (None values are left
    out): the model's short hash, and the LoRAs used with their hashes, among them; ``refiner``: the title of the
    SDXL refiner that finished the image."""
    return {
        "Steps": request.steps, "Sampler": request.sampler, "Schedule type": SCHEDULERS[request.scheduler].label,
        "CFG scale": request.cfg_scale, "Seed": seed, "Size": f"{request.width}x{request.height}",
        "Model hash": model_hash, "Model": model or None, "VAE": vae,
        "Variation seed": subseed if request.subseed_strength else None,
        "Variation seed strength": request.subseed_strength or None,
        "Seed resize from": f"{request.seed_resize_from_w}x{request.seed_resize_from_h}" if request.seed_resize
        else None,
        "Denoising strength": request.denoising_strength if request.init_image is not None or request.hires
        else None,
        "Mask blur": request.mask_blur if request.mask is not None else None,
        "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
        **guidance_skip_params(request),
        **hires_params(request),
        "Refiner": refiner, "Refiner switch at": request.refiner_switch_at if refiner else None,
        **control_params(request),
        "Eta": request.eta if request.eta is not None and request.eta != 1.0 else None,
        "Lora hashes": ", ".join(f"{path.stem}: {lora_hash(path)}" for path in loras) or None,
        "Version": f"stable_diffusion {__version__}",
    }
