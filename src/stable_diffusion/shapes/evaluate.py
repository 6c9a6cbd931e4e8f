"""``sd eval``: how well a shapes-domain model follows prompts, across samplers and step counts.

For each (sampler, steps): images for held-out one-object and two-object prompts (attribute combinations that
training never saw), judged by the adherence checker; FID against renders of the same held-out scenes and the
CLIP score, both with the domain CLIP; seconds per image. The unconditional model (empty prompt) judged against
the same scenes gives the chance level. Writes results.json, table.md and plot.png."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..checkpoints.io import atomic_write
from ..images import to_pil, to_unit
from ..metrics.clip_score import CLIPScorer
from ..metrics.fid import Features, FeatureStatistics, frechet_distance
from ..metrics.inception import InceptionV3Features
from . import DOMAIN_CLIP
from .adherence import judge, read_image
from .scenes import Scene, heldout_scenes, render

if TYPE_CHECKING:
    from ..pipeline import Pipeline


@dataclass
class Row:
    sampler: str
    steps: int
    one_object: float  # fraction of one-object prompts with every attribute right
    two_object: float  # fraction of two-object prompts with both objects and their relation right
    attributes: dict  # per-attribute accuracy on one-object prompts
    fid: float
    clip_score: float
    seconds_per_image: float
    fid_inception: float | None = None  # with InceptionV3 features, when a weights file was given


def _generate(pipe: Pipeline, scenes: list[Scene], sampler: str, steps: int, cfg: float, seed: int, batch: int = 8,
              prompt_override: str | None = None, guidance: dict | None = None) -> tuple[list[Image.Image], float]:
    """Scene i's image with seed ``seed + i``, ``batch`` prompts per call (the same images as one at a time,
    up to float rounding); returns the images and the wall seconds per image. ``guidance``: GenerationRequest's
    guidance-skipping fields (s_min_uncond, s_min_uncond_all, skip_early_cond)."""
    images, start = [], time.perf_counter()
    for k in range(0, len(scenes), batch):
        prompts = [s.caption if prompt_override is None else prompt_override for s in scenes[k:k + batch]]
        images += pipe.txt2img(prompts, steps=steps, sampler=sampler, cfg_scale=cfg, seed=seed + k, **(guidance or {}))
    return images, (time.perf_counter() - start) / max(1, len(scenes))


def _stats(features: Features, images: list[Image.Image], batch: int = 64) -> FeatureStatistics:
    stats = FeatureStatistics()
    with torch.no_grad():
        for k in range(0, len(images), batch):
            stats.update(features(to_unit(images[k:k + batch])))
    return stats


@torch.no_grad()
def vae_reconstruct(pipe: Pipeline, images: list[Image.Image], batch: int = 64) -> tuple[float, float, list[Image.Image]]:
    """Mean and worst PSNR (dB, pixels in [0, 1]) of the VAE's reconstruction (encode -> mean -> decode), and
    the reconstructions: what the decoder can draw at best, so their adherence caps the generator's."""
    psnrs, out_images = [], []
    for k in range(0, len(images), batch):
        x = (to_unit(images[k:k + batch]) * 2 - 1).to(pipe.device, pipe.dtype)
        out = pipe.vae.decode(pipe.vae.encode(x).mean).float().clamp(-1, 1)
        mse = ((out - x.float()) / 2).pow(2).mean(dim=(1, 2, 3))
        psnrs.append(10 * torch.log10(1 / mse.clamp(min=1e-10)))
        out_images += to_pil(out)
    psnr = torch.cat(psnrs)
    return float(psnr.mean()), float(psnr.min()), out_images


def adherence(images: list[Image.Image], scenes: list[Scene]) -> tuple[float, dict]:
    verdicts = [judge(read_image(im), s) for im, s in zip(images, scenes)]
    keys = verdicts[0].keys() if verdicts else []
    per_key = {k: sum(v[k] for v in verdicts) / len(verdicts) for k in keys}
    return per_key.get("all", 0.0), per_key


def evaluate(pipe: Pipeline, samplers: list[str], step_counts: list[int], n: int = 50, cfg: float = 7.0, seed: int = 0,
             clip_path: str | Path = DOMAIN_CLIP, chance: bool = True, batch: int = 8,
             inception: str | Path | None = None, guidance: dict | None = None) -> dict:
    """``inception``: an InceptionV3 FID weights file; adds FID with its pool features beside the domain one.
    ``guidance``: where CFG is switched off (GenerationRequest's s_min_uncond, s_min_uncond_all,
    skip_early_cond); the chance row is CFG 1, so it is unaffected."""
    guidance = {k: v for k, v in (guidance or {}).items() if v}
    scorer = CLIPScorer.from_folder(clip_path)
    extractors: dict[str, Features] = {"domain": scorer.model.image_features}
    if inception is not None:
        extractors["inception"] = InceptionV3Features.from_file(inception)
    one, two = heldout_scenes(n, seed=seed + 1), heldout_scenes(n, seed=seed + 2, two_object=True)
    scenes = one + two
    renders = [render(s, pipe.config.image_size) for s in scenes]
    real = {name: _stats(fn, renders).mean_cov() for name, fn in extractors.items()}
    rows = []
    for sampler in samplers:
        for steps in step_counts:
            images, seconds = _generate(pipe, scenes, sampler, steps, cfg, seed, batch, guidance=guidance)
            one_rate, per_attribute = adherence(images[:n], one)
            two_rate, _ = adherence(images[n:], two)
            fids = {name: frechet_distance(*real[name], *_stats(fn, images).mean_cov())
                    for name, fn in extractors.items()}
            rows.append(Row(sampler, steps, one_rate, two_rate, per_attribute, fids["domain"],
                            scorer.score(images, [s.caption for s in scenes]), seconds, fids.get("inception")))
    psnr_mean, psnr_min, rebuilt = vae_reconstruct(pipe, renders)
    result = {"n_per_kind": n, "cfg": cfg, "guidance_skip": guidance, "batch": batch, "vae_psnr_db": psnr_mean,
              "vae_psnr_min_db": psnr_min,
              "vae_ceiling": _judged(rebuilt, one, two), "rows": [asdict(r) for r in rows]}
    if chance:
        images, _ = _generate(pipe, scenes, samplers[0], 20, 1.0, seed, batch, prompt_override="")
        result["chance"] = _judged(images, one, two)
    return result


def _judged(images: list[Image.Image], one: list[Scene], two: list[Scene]) -> dict:
    """Adherence of images for the one-object scenes followed by the two-object ones."""
    one_rate, per_attribute = adherence(images[:len(one)], one)
    return {"one_object": one_rate, "two_object": adherence(images[len(one):], two)[0], "attributes": per_attribute}


def table(result: dict) -> str:
    inception = any(r.get("fid_inception") is not None for r in result["rows"])
    extra = " FID (Inception) |" if inception else ""
    lines = ["| sampler | steps | one-object all right | two-object right | colour | shape | size | place | "
             f"background | FID (domain) |{extra} CLIP score | s / image |", "|" + "---|" * (12 + inception)]
    for r in result["rows"]:
        a = r["attributes"]
        cell = f" {r['fid_inception']:.2f} |" if inception else ""
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['one_object']:.1%} | {r['two_object']:.1%} | "
                     f"{a.get('colour', 0):.0%} | {a.get('shape', 0):.0%} | {a.get('size', 0):.0%} | "
                     f"{a.get('place', 0):.0%} | {a.get('background', 0):.0%} | {r['fid']:.2f} |{cell} "
                     f"{r['clip_score']:.1f} | {r['seconds_per_image']:.3f} |")
    if "chance" in result:
        c = result["chance"]
        lines.append(f"| unconditional (chance) | | {c['one_object']:.1%} | {c['two_object']:.1%} |"
                     + " |" * (8 + inception))
    if result.get("guidance_skip"):
        lines.append(f"\nCFG {result['cfg']:g}, switched off where A1111's options say: {result['guidance_skip']}.")
    lines.append(f"\nSeconds per image: wall time of the whole run over its images, {result.get('batch', 1)} "
                 "prompts per batch.")
    lines.append(f"VAE reconstruction of the {2 * result['n_per_kind']} held-out images: PSNR "
                 f"{result['vae_psnr_db']:.1f} dB mean, {result['vae_psnr_min_db']:.1f} dB worst.")
    if "vae_ceiling" in result:
        v = result["vae_ceiling"]
        lines.append(f"The same images through the VAE alone (encode -> decode; what the decoder draws at best, so a "
                     f"ceiling for generation): one-object {v['one_object']:.1%} (shape {v['attributes']['shape']:.0%}),"
                     f" two-object {v['two_object']:.1%}.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Adherence (one-object solid, two-object dashed) and FID against steps, a line per sampler."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    rows = result["rows"]
    steps = sorted({r["steps"] for r in rows})
    figure = Figure(figsize=(10, 4), layout="constrained")
    adherence_axes, fid_axes = figure.subplots(1, 2)
    for i, sampler in enumerate(dict.fromkeys(r["sampler"] for r in rows)):
        mine = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["steps"])
        x, style = [r["steps"] for r in mine], {"color": f"C{i}", "marker": "osD^vP"[i % 6], "alpha": 0.85}
        adherence_axes.plot(x, [100 * r["one_object"] for r in mine], "-", label=sampler, **style)
        adherence_axes.plot(x, [100 * r["two_object"] for r in mine], "--", **style)
        fid_axes.plot(x, [r["fid"] for r in mine], "-", label=sampler, **style)
    adherence_axes.set(ylabel="prompts drawn right (%)", ylim=(0, 101),
                       title="adherence: one object (solid), two objects (dashed)")
    fid_axes.set(ylabel="FID (domain CLIP features)", title="FID against renders of the same scenes",
                 ylim=(0, None))
    for axes in (adherence_axes, fid_axes):
        axes.set_xscale("log")
        axes.xaxis.set_minor_locator(NullLocator())
        axes.set_xticks(steps, labels=[str(s) for s in steps])
        axes.set_xlabel("sampling steps")
        axes.grid(alpha=0.3)
        axes.legend()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    atomic_write(out / "table.md", lambda tmp: tmp.write_text(table(result)))
    plot(result, out / "plot.png")
