"""AUTOMATIC1111's generation-parameters text ("infotext"), stored in PNGs as the "parameters" tEXt chunk."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

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


def save_png(image: Image.Image, path: str | Path, infotext: str) -> None:
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", infotext)
    image.save(path, format="PNG", pnginfo=meta)


def read_png_infotext(path: str | Path) -> str | None:
    with Image.open(path) as image:
        return image.info.get("parameters")
