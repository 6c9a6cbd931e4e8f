"""``sd eval --control FILE``: does a ControlNet put the objects where its control image draws them? For held-out
one- and two-object scenes, at the grid's places and sizes and at free ones, the control image is the scene's
layout (the filled silhouettes, white on black, or their outlines) and the prompt its caption; an object lands
where drawn when the generated image's object pixels (those far from the scene's background colour) overlap the
silhouettes with IoU >= 0.7. Each ControlNet weight and kind of scene is a row (weight 0: the model alone), with
the adherence checker's verdicts beside it, and the share that the VAE's reconstruction of the true scene places: the
ceiling, since every generated image comes through that decoder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..control import ControlUnit
from .adherence import judge, read_image
from .evaluate import vae_reconstruct
from .scenes import BACKGROUNDS, heldout_scenes, outline, render

if TYPE_CHECKING:
    from ..pipeline import Pipeline

IOU_TARGET = 0.7


def object_mask(image: Image.Image, background: tuple[int, int, int], tolerance: int = 60) -> np.ndarray:
    """Pixels whose colour is more than ``tolerance`` away from the background's in some channel."""
    pixels = np.asarray(image.convert("RGB"), dtype=int)
    return (np.abs(pixels - np.array(background)).max(axis=-1) > tolerance)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


KINDS = {  # name: (two objects, free layout, drawn as outlines)
    "one object": (False, False, False), "two objects": (True, False, False),
    "one object, free layout": (False, True, False), "two objects, free layout": (True, True, False),
    "one object, free outline": (False, True, True),
}


def control_evaluate(pipe: Pipeline, control: str | Path, weights: list[float], n: int = 50, seed: int = 0,
                     steps: int = 20, sampler: str = "Euler a", cfg: float = 7.0, guidance_end: float = 1.0,
                     guidance: dict | None = None) -> dict:
    """One row per ControlNet weight and kind of scene (grid places and sizes, which the prompt can say; free
    positions and sizes, which only the layout can; a free layout drawn as outlines): the share placed with
    IoU >= 0.7, the mean IoU, and the adherence checker's verdicts (colours, shapes, relations) on the same images.
    ``guidance_end``: the ControlNet acts on this first fraction of the steps (the unit's guidance_end);
    ``guidance``: where CFG is switched off (GenerationRequest's s_min_uncond, s_min_uncond_all, skip_early_cond)."""
    guidance = {k: v for k, v in (guidance or {}).items() if v}
    size = pipe.config.image_size
    kinds = {kind: heldout_scenes(n, seed=seed + 1 + i, two_object=two, free=free)
             for i, (kind, (two, free, _)) in enumerate(KINDS.items())}
    drawings = {kind: [render(s, size, layout=True) for s in scenes] for kind, scenes in kinds.items()}
    silhouettes = {kind: [np.asarray(d.convert("L")) > 127 for d in drawn] for kind, drawn in drawings.items()}
    ceiling = {}
    for kind, scenes in kinds.items():
        rebuilt = vae_reconstruct(pipe, [render(s, size) for s in scenes])[2]
        ceiling[kind] = float(np.mean([iou(object_mask(im, BACKGROUNDS[s.background]), d) >= IOU_TARGET
                                       for im, s, d in zip(rebuilt, scenes, silhouettes[kind], strict=True)]))
    rows = []
    for weight in weights:
        for kind, scenes in kinds.items():
            ious, verdicts = [], []
            for i, scene in enumerate(scenes):
                drawn = drawings[kind][i]
                layout = outline(drawn) if KINDS[kind][2] else drawn
                unit = ControlUnit(layout, control, weight=weight, resize_mode=0, guidance_end=guidance_end)
                image = pipe.txt2img(scene.caption, steps=steps, sampler=sampler, cfg_scale=cfg, seed=seed + i,
                                     width=size, height=size, controls=[unit], **guidance)[0]
                ious.append(iou(object_mask(image, BACKGROUNDS[scene.background]), silhouettes[kind][i]))
                verdicts.append(judge(read_image(image), scene)["all"])
            rows.append({"weight": weight, "kind": kind, "placed": float(np.mean([v >= IOU_TARGET for v in ious])),
                         "mean_iou": float(np.mean(ious)), "adherence": float(np.mean(verdicts))})
    return {"n_per_kind": n, "steps": steps, "sampler": sampler, "cfg": cfg, "control": Path(control).name,
            "guidance_end": guidance_end, "guidance_skip": guidance, "iou_target": IOU_TARGET, "vae_ceiling": ceiling,
            "rows": rows}


def control_table(result: dict) -> str:
    lines = [f"ControlNet {result['control']}: objects placed where drawn (IoU >= {result['iou_target']}), "
             f"{result['n_per_kind']} held-out scenes per kind, {result['sampler']} {result['steps']} steps, "
             f"CFG {result['cfg']}{_skips(result.get('guidance_skip') or {})}, guidance end "
             f"{result.get('guidance_end', 1.0):g}", "",
             "| weight | scenes | placed | mean IoU | adherence | VAE ceiling |", "|---|---|---|---|---|---|"]
    ceiling = result.get("vae_ceiling", {})
    for r in result["rows"]:
        top = f"{ceiling[r['kind']]:.0%}" if r["kind"] in ceiling else ""
        lines.append(f"| {r['weight']:g} | {r['kind']} | {r['placed']:.0%} | {r['mean_iou']:.2f} | "
                     f"{r['adherence']:.0%} | {top} |")
    return "\n".join(lines) + "\n"


def _skips(guidance: dict) -> str:
    """The guidance skipping in words, as A1111's settings name it."""
    words = []
    if guidance.get("s_min_uncond"):
        every = "every step" if guidance.get("s_min_uncond_all") else "every other step"
        words.append(f"NGMS {guidance['s_min_uncond']:g} ({every})")
    if guidance.get("skip_early_cond"):
        words.append(f"Skip Early CFG {guidance['skip_early_cond']:g}")
    return "".join(f", {w}" for w in words)
