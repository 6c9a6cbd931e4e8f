"""Exact and fast mode on the CPU, each lever alone and all together (``--fast``), against diffusers in one run.

Speed and memory: one 512x512 image from an SD1.5-size model with seeded random weights (written once as a
.safetensors file and a diffusers folder), 20 Euler steps, CFG 7, a negative prompt. Each configuration runs in a
fresh process: load from disk, a 2-step warm-up image (compiles what the configuration needs; a first run also
converts, quantizes and caches), then the timed image; the process's peak RSS (VmHWM) covers all of it. PSNR is
against our exact-mode (openvino, fp32) image of the same seed: what the lever changes on the full-size network (random
weights, so a measure of numerical drift, not of beauty).

Quality on a trained model: the built-in model's prompt adherence (`sd eval`'s one-object and two-object rates
on held-out prompts, Euler a, 20 steps) with each configuration, and the difference in points from exact.

    python benchmarks/bench_fast.py [--steps 20] [--n 100] [--keep DIR] [--configs NAME,...]

A configuration named more than once (alternate them: ``--configs "diffusers,--fast,diffusers,--fast"``) reports
its best time, the spread of its times, and its lowest peak RSS (a later run finds the conversion cached); each
ratio is a best time over diffusers' best time in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench_memory import NEGATIVE, PROMPT, peak_rss, write_models
from stable_diffusion.cli.options import FAST

CONFIGS: dict[str, dict | None] = {  # name -> load_pipeline options and request fields (None: diffusers)
    "diffusers": None,
    "exact (torch)": {},  # the same image as exact openvino within a level; its speed is bench_components'
    "exact --backend openvino": {"backend": "openvino"},
    "--int8": {"int8": True},
    "--int8-vae": {"int8_vae": True},
    "--deepcache 3": {"backend": "openvino", "deepcache": 3},
    "--tome 0.5": {"backend": "openvino", "tome": 0.5},
    "--ngms 1": {"backend": "openvino", "fields": {"s_min_uncond": 1.0}},
    "--fast": dict(FAST),  # DeepCache's cached steps redo the whole first level: what keeps Euler a's adherence
    # the paper's branch (--fast until 2026-12-07 was this without --int8-vae)
    "--fast --deepcache-branch 0": {**FAST, "deepcache_branch": 0},
    "--fast --ngms 1": {**FAST, "fields": {"s_min_uncond": 1.0}},  # and guidance truncation
    "--fast --deepcache 4": {**FAST, "deepcache": 4},  # longer cache intervals
    "--fast --deepcache 5": {**FAST, "deepcache": 5},
    "--fast --tome 0.75": {**FAST, "tome": 0.75},  # more tokens merged
}


def run_config(folder: Path, name: str, steps: int) -> dict:
    """One configuration in this (fresh) process: load, warm up, time one image, save it."""
    import torch

    options = dict(CONFIGS[name] or {})
    fields = options.pop("fields", {})
    t0 = time.perf_counter()
    if CONFIGS[name] is None:
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(folder / "sd15-diffusers", torch_dtype=torch.float32,
                                                       local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)

        def image(n: int) -> Image.Image:
            return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=n, guidance_scale=7.0, height=512,
                        width=512, generator=torch.Generator().manual_seed(1)).images[0]
    else:
        from stable_diffusion.pipeline import load_pipeline

        pipe = load_pipeline(folder / "sd15.safetensors", **options)

        def image(n: int) -> Image.Image:
            return pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=n, cfg_scale=7.0, sampler="Euler", seed=1,
                                width=512, height=512, **fields)[0]
    loaded = time.perf_counter()
    image(2)
    warmed = time.perf_counter()
    picture = image(steps)
    done = time.perf_counter()
    picture.save(folder / f"{name.replace(' ', '_').replace('-', '')}.png")
    return {"seconds": done - warmed, "warmup_s": warmed - loaded, "load_s": loaded - t0, "peak_rss": peak_rss()}


def psnr(a: Path, b: Path) -> float:
    x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in (a, b))
    mse = ((x - y) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def adherence_rows(names: list[str], n: int) -> dict[str, tuple[float, float]]:
    """The built-in model's one- and two-object adherence per configuration (Euler a, 20 steps, CFG 7)."""
    from stable_diffusion.pipeline import load_pipeline
    from stable_diffusion.shapes.evaluate import evaluate

    rows = {}
    for name in names:
        options = dict(CONFIGS[name])
        fields = options.pop("fields", {})
        result = evaluate(load_pipeline(**options), ["Euler a"], [20], n=n, chance=False, guidance=fields)
        rows[name] = (result["rows"][0]["one_object"], result["rows"][0]["two_object"])
        print(f"  adherence {name}: one {rows[name][0]:.1%}, two {rows[name][1]:.1%}", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n", type=int, default=100, help="held-out prompts per kind for the adherence columns")
    parser.add_argument("--keep", help="write (or reuse) the SD1.5-size models in this folder")
    parser.add_argument("--configs", default=",".join(n for n in CONFIGS if n != "exact (torch)"))
    parser.add_argument("--config", help=argparse.SUPPRESS)  # internal: run one configuration in this process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.config:
        print(json.dumps(run_config(Path(args.folder), args.config, args.steps)))
        return
    names = args.configs.split(",")
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configurations {unknown}")
    temp = tempfile.TemporaryDirectory()
    folder = Path(args.keep or temp.name)
    if not (folder / "sd15.safetensors").exists():
        folder.mkdir(parents=True, exist_ok=True)
        write_models(folder)
    results: dict[str, list[dict]] = {}
    for name in names:
        run = subprocess.run([sys.executable, __file__, f"--config={name}", "--folder", str(folder), "--steps",
                              str(args.steps)], capture_output=True, text=True)
        if run.returncode != 0:
            print(f"{name}: failed: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}")
            continue
        results.setdefault(name, []).append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(f"  {name}: {results[name][-1]}", file=sys.stderr, flush=True)
    unique = list(dict.fromkeys(names))
    adherence = adherence_rows([n for n in unique if CONFIGS[n] is not None], args.n) if args.n else {}
    base = min((r["seconds"] for r in results.get("diffusers", [])), default=None)
    exact_png = folder / "exact_backend_openvino.png"
    print(f"SD1.5-size 512x512, {args.steps} Euler steps, CFG 7, CPU; each a fresh process; PSNR vs exact (openvino); "
          f"built-in adherence at n={args.n} per kind (Euler a, 20 steps); repeated runs: best, spread, lowest RSS")
    print(f"{'configuration':<26}{'s / image':>11}{'spread':>14}{'vs diffusers':>14}{'peak RSS MB':>13}{'PSNR dB':>9}"
          f"{'one-object':>12}{'two-object':>12}")
    exact_adherence = adherence.get("exact --backend openvino")
    for name in unique:
        if name not in results:
            continue
        times = [r["seconds"] for r in results[name]]
        spread = f"{min(times):.1f}-{max(times):.1f}" if len(times) > 1 else "-"
        png = folder / f"{name.replace(' ', '_').replace('-', '')}.png"
        db = f"{psnr(png, exact_png):.1f}" if CONFIGS[name] is not None and exact_png.exists() else "-"
        ratio = f"{min(times) / base:.3f}" if base else "-"
        rss = min(r["peak_rss"] for r in results[name]) / 2**20
        cells = ["-", "-"]
        if name in adherence:
            cells = [f"{v:.0%}" + (f" ({(v - e) * 100:+.0f})" if exact_adherence else "")
                     for v, e in zip(adherence[name], exact_adherence or (0, 0))]
        print(f"{name:<26}{min(times):>11.1f}{spread:>14}{ratio:>14}{rss:>13.0f}{db:>9}{cells[0]:>12}{cells[1]:>12}",
              flush=True)


if __name__ == "__main__":
    main()
