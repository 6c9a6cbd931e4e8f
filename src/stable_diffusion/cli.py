"""The ``sd`` command. Every failure is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .checkpoints.errors import CheckpointError


def _describe(pipe: object, source: str) -> str:
    from .pipeline import Pipeline

    assert isinstance(pipe, Pipeline)
    c = pipe.config
    counts = pipe.parameter_counts()
    lines = [
        f"model:       {source}",
        f"family:      {c.family}{' (inpainting, 9-channel UNet)' if c.is_inpainting else ''}",
        f"prediction:  {c.prediction}",
        f"native size: {c.image_size}x{c.image_size} (latent {c.vae.embed_dim}x{c.image_size // pipe.vae.downscale}"
        f"x{c.image_size // pipe.vae.downscale})",
        f"dtype:       {str(pipe.stored_dtype).removeprefix('torch.')} stored, "
        f"{str(pipe.dtype).removeprefix('torch.')} loaded",
        f"UNet:        {counts['unet'] / 1e6:.1f}M parameters, channels {c.unet.model_channels} x "
        f"{list(c.unet.channel_mult)}, context {c.unet.context_dim}",
        f"VAE:         {counts['vae'] / 1e6:.1f}M parameters, scaling factor {c.vae.scaling_factor}",
    ]
    for i, tc in enumerate(c.text_encoders):
        lines.append(f"text enc {i}:  {counts[f'text_encoder_{i}'] / 1e6:.1f}M parameters, {tc.layers} layers x "
                     f"{tc.width} ({tc.layout}), output layer {tc.output_layer}")
    lines.append(f"total:       {sum(counts.values()) / 1e6:.1f}M parameters")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> None:
    import torch

    from .models.configs import PRESETS, preset
    from .pipeline import Pipeline, load_pipeline

    if args.model in PRESETS and not Path(args.model).exists():
        # presets are described on the meta device: no memory, no random initialisation
        with torch.device("meta"):
            pipe = Pipeline.from_config(preset(args.model))
        print(_describe(pipe, f"preset {args.model}"))
        return
    pipe = load_pipeline(args.model, prediction=args.prediction)
    print(_describe(pipe, args.model))


def cmd_convert(args: argparse.Namespace) -> None:
    from .pipeline import load_pipeline

    dst = Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise CheckpointError(f"{dst}: already exists (use --overwrite)")
    pipe = load_pipeline(args.src, prediction=args.prediction, vae=args.vae)
    pipe.save(dst, format=args.format, dtype=args.dtype)
    print(f"wrote {dst} ({args.format}, {args.dtype or 'fp32'})")


def cmd_bench(args: argparse.Namespace) -> None:
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_components.py"
    if not bench.exists():
        raise CheckpointError(f"{bench}: benchmarks are run from a source checkout")
    import runpy

    sys.argv = [str(bench), *args.rest]
    runpy.run_path(str(bench), run_name="__main__")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd", description="Stable Diffusion: run, convert, train and serve.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="family, sizes and parameter counts of a model")
    p.add_argument("model", help="a .safetensors/.ckpt file, a diffusers folder, or a preset name (sd1, sdxl, ...)")
    p.add_argument("--prediction", choices=["eps", "v"], help="override the prediction type")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert between single-file and diffusers folders, or change dtype")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--format", choices=["single-file", "diffusers"], default="single-file")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--prediction", choices=["eps", "v"])
    p.add_argument("--vae", help="replace the VAE with this standalone VAE file")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("bench", help="time our UNet, VAE and text encoder against diffusers (dev extras)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"sd {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sd {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
