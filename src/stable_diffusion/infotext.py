"""AUTOMATIC1111's generation-parameters text ("infotext"), stored in PNGs as the "parameters" tEXt chunk."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from .request import GenerationRequest

_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(ch in text for ch in ",\n:") else text


def format_infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """``prompt``, an optional ``Negative prompt:`` line, then ``k: v`` pairs (None values left out)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None))
    return "\n".join(lines)


def parse_infotext(text: str) -> dict[str, Any]:
    """Inverse of ``format_infotext``: {"Prompt", "Negative prompt", and each parameter as a string}."""
    lines = text.strip().split("\n")
    params: dict[str, Any] = {}
    if lines and len(_PAIR.findall(lines[-1])) >= 3:
        for key, value in _PAIR.findall(lines.pop()):
            value = value.strip()
            if value.startswith('"') and value.endswith('"'):
                value = json.loads(value)
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


def generation_parameters(request: GenerationRequest, seed: int, model: str | None) -> dict[str, Any]:
    """The ``k: v`` pairs A1111 writes for one image of a resolved request (None values are left out)."""
    return {
        "Steps": request.steps, "Sampler": request.sampler, "Schedule type": request.scheduler.capitalize(),
        "CFG scale": request.cfg_scale, "Seed": seed, "Size": f"{request.width}x{request.height}",
        "Model": model or None,
        "Denoising strength": request.denoising_strength if request.init_image is not None else None,
        "Mask blur": request.mask_blur if request.mask is not None else None,
        "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
        **guidance_skip_params(request),
        "Version": f"stable_diffusion {__version__}",
    }
