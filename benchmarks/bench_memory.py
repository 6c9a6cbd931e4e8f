"""Peak memory of a whole SD1.5-size txt2img: ours in each low-memory mode against diffusers, same run.

An SD1.5-size model with random weights (fp32) is written once as a single .safetensors file (ours) and as a
diffusers folder (theirs). Each case then runs in a fresh process: load the model from disk, make one 512x512
image (2 Euler steps, CFG 7, a negative prompt), and report the process's peak resident set (``VmHWM``:
weights, activations, the Python runtime, everything) and the seconds to load and to generate. Ratios are
against diffusers' default pipeline; diffusers' own CPU-capable savings (attention slicing, VAE tiling) are
measured too. The last case is every saving at once: sequential offload, attention slices of at most 64 MiB
of scores, and the VAE in tiles of half the image's side. Sequential offload on the CPU keeps only the running
layer's mapped pages resident (stable_diffusion/offload.py). The openvino cases (exact, and int8) are measured
after an unmeasured run has converted (and quantized) the model into the cache, as every later run finds it.
The "(fp16 file)" cases load the same weights stored in fp16 (most shared checkpoints are), run in fp32 (the CPU's
dtype: diffusers upcasts at load), and compare with diffusers loading that fp16 folder.

    python benchmarks/bench_memory.py [--device cpu] [--size 512] [--keep DIR] [--cases "ours,ours --int8"]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT, NEGATIVE = "a photo of an astronaut riding a horse on mars", "blurry, low quality"

CASES = {  # name -> (who, options)
    "diffusers": ("theirs", {}),
    "diffusers sliced+tiled": ("theirs", {"attention_slicing": True, "vae_tiling": True}),
    "ours": ("ours", {}),
    "ours offload model": ("ours", {"offload": "model"}),
    "ours offload sequential": ("ours", {"offload": "sequential"}),
    "ours sequential+sliced+tiled": ("ours", {"offload": "sequential", "attention_slicing": 64,
                                              "tiled_vae": True}),
    "ours --backend openvino": ("ours", {"backend": "openvino"}),  # the IR cached by a warm-up run first
    "ours --int8": ("ours", {"backend": "openvino", "int8": True}),
    "diffusers (fp16 file)": ("theirs", {"file": "fp16"}),
    "ours (fp16 file)": ("ours", {"file": "fp16"}),
    "ours offload model (fp16 file)": ("ours", {"offload": "model", "file": "fp16"}),
    "ours offload sequential (fp16 file)": ("ours", {"offload": "sequential", "file": "fp16"}),
}
FILES = {None: ("sd15.safetensors", "sd15-diffusers"), "fp16": ("sd15-fp16.safetensors", "sd15-fp16-diffusers")}


def write_models(folder: Path) -> None:
    """The SD1.5-size model with seeded random weights, as a single file and as a diffusers folder."""
    from stable_diffusion.models.configs import preset
    from stable_diffusion.pipeline import Pipeline

    pipe = Pipeline.from_config(preset("sd1"), seed=0)
    pipe.save(folder / "sd15.safetensors")
    pipe.save(folder / "sd15-diffusers", format="diffusers")


def write_fp16_models(folder: Path) -> None:
    """The same model stored in fp16, as a single file and as a diffusers folder."""
    from stable_diffusion.pipeline import load_pipeline

    pipe = load_pipeline(folder / "sd15.safetensors")
    pipe.save(folder / "sd15-fp16.safetensors", dtype="fp16")
    pipe.save(folder / "sd15-fp16-diffusers", format="diffusers", dtype="fp16")


def run_case(folder: Path, who: str, options: dict, device: str, size: int) -> dict:
    """One case in this (fresh) process: load, generate, measure."""
    import torch

    t0 = time.perf_counter()
    if who == "ours":
        from stable_diffusion.pipeline import load_pipeline

        pipe = load_pipeline(folder / FILES[options.get("file")][0], device=device, dtype="fp32",
                             offload=options.get("offload"), attention_slicing=options.get("attention_slicing"),
                             backend=options.get("backend"), int8=options.get("int8", False))
        loaded = time.perf_counter()
        pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=2, cfg_scale=7.0, sampler="Euler", seed=1,
                     width=size, height=size, tiled_vae=options.get("tiled_vae", False), vae_tile_size=size // 2)
    else:
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(folder / FILES[options.get("file")][1], torch_dtype=torch.float32,
                                                       local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False).to(device)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if options.get("attention_slicing"):
            pipe.enable_attention_slicing()
        if options.get("vae_tiling"):
            pipe.vae.enable_tiling()
        loaded = time.perf_counter()
        pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=2, guidance_scale=7.0, height=size, width=size,
             generator=torch.Generator().manual_seed(1))
    done = time.perf_counter()
    result = {"peak_rss": peak_rss(), "load_s": loaded - t0, "generate_s": done - loaded}
    if device.startswith("cuda"):
        result["peak_cuda"] = torch.cuda.max_memory_allocated()
    return result


def peak_rss() -> int:
    """This process's peak resident set in bytes: VmHWM, which starts afresh at exec (ru_maxrss would carry
    the parent's peak over into the child)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--keep", help="write (or reuse) the models in this folder instead of a temporary one")
    parser.add_argument("--cases", help="comma-separated case names (default: all; diffusers' is always the baseline)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        who, options = CASES[args.case]
        print(json.dumps(run_case(Path(args.folder), who, options, args.device, args.size)))
        return
    temp = tempfile.TemporaryDirectory()
    folder = Path(args.keep or temp.name)
    if not (folder / "sd15.safetensors").exists():
        folder.mkdir(parents=True, exist_ok=True)
        write_models(folder)
    chosen = ["diffusers", *[c for c in args.cases.split(",") if c != "diffusers"]] if args.cases else list(CASES)
    if any(CASES[c][1].get("file") for c in chosen):  # the fp16 file's own baseline, before its cases
        baselines = ["diffusers", "diffusers (fp16 file)"]
        chosen = [*baselines, *[c for c in chosen if c not in baselines]]
        if not (folder / FILES["fp16"][0]).exists():
            write_fp16_models(folder)
    print(f"SD1.5-size txt2img {args.size}x{args.size}, 2 Euler steps, CFG 7, fp32, device {args.device}; "
          "each case a fresh process loading from disk")
    print(f"{'case':<36}{'peak RSS MB':>13}{'vs diffusers':>14}{'load s':>9}{'generate s':>12}"
          + (f"{'peak CUDA MB':>14}" if args.device.startswith("cuda") else ""))
    baselines: dict[str | None, int] = {}  # each file's diffusers peak: the ratios' denominators
    for name in chosen:
        command = [sys.executable, __file__, "--case", name, "--folder", str(folder), "--device", args.device,
                   "--size", str(args.size)]
        if CASES[name][1].get("backend"):  # fill the cache first (conversion, quantization: once per weights)
            subprocess.run(command, capture_output=True, text=True)
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0:
            print(f"{name:<36} failed: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}")
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        baseline = baselines.setdefault(CASES[name][1].get("file"), r["peak_rss"])
        print(f"{name:<36}{r['peak_rss'] / 2**20:>13.0f}{r['peak_rss'] / baseline:>14.2f}{r['load_s']:>9.1f}"
              f"{r['generate_s']:>12.1f}" + (f"{r['peak_cuda'] / 2**20:>14.0f}" if "peak_cuda" in r else ""),
              flush=True)


if __name__ == "__main__":
    main()
