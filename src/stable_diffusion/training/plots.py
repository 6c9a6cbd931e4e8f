"""Pictures of a training run, drawn with PIL (no plotting library needed): the loss curve per stage and
sample grids of fixed prompts."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from ..checkpoints.io import atomic_write

STAGE_COLOURS = {"vae": (200, 60, 40), "unet": (40, 90, 200), "refine": (120, 60, 180), "lora": (40, 160, 80)}


def loss_curve(records: list[dict], path: Path, width: int = 640, height: int = 360) -> None:
    """Log10 of the loss against the step, one panel per stage, smoothed over a sliding window."""
    stages = list(dict.fromkeys(r["stage"] for r in records))
    if not stages:
        return
    image = Image.new("RGB", (width, height * len(stages)), "white")
    draw = ImageDraw.Draw(image)
    for k, stage in enumerate(stages):
        rows = [(r["step"], math.log10(max(r["loss"], 1e-12))) for r in records if r["stage"] == stage]
        window = max(1, len(rows) // 50)
        smooth = []
        for i in range(len(rows)):
            recent = [v for _, v in rows[max(0, i - window + 1): i + 1]]
            smooth.append((rows[i][0], sum(recent) / len(recent)))
        top, left, w, h = k * height + 30, 60, width - 80, height - 60
        lo, hi = min(v for _, v in smooth), max(v for _, v in smooth)
        hi = hi if hi > lo else lo + 1
        last = max(s for s, _ in smooth) or 1
        draw.rectangle((left, top, left + w, top + h), outline=(160, 160, 160))
        draw.text((left, top - 20), f"{stage}: log10 loss {10**hi:.3g} .. {10**lo:.3g}, steps 0 .. {last}", fill="black")
        points = [(left + w * s / last, top + h * (hi - v) / (hi - lo)) for s, v in smooth]
        if len(points) > 1:
            draw.line(points, fill=STAGE_COLOURS.get(stage, (0, 0, 0)), width=2)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    w, h = images[0].size
    rows = -(-len(images) // columns)
    out = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        out.paste(im, ((i % columns) * w, (i // columns) * h))
    return out


def sample_grid(pipe, prompts: list[str], path: Path, steps: int = 20, seed: int = 0) -> None:
    """One image per prompt (default sampler, fixed seeds), in a row-major grid."""
    images = [pipe.txt2img(p, steps=steps, seed=seed + i)[0] for i, p in enumerate(prompts)]
    atomic_write(path, lambda tmp: grid(images, min(len(images), 8)).save(tmp, format="PNG"))
