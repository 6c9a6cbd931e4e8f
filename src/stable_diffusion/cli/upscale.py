"""``sd upscale``: A1111's Extras upscale from the command line (upscalers/extras.py), one PNG per input image
with the "Postprocess ..." parameters in its text."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import size_arg


def cmd_upscale(args: argparse.Namespace) -> None:
    from ..images import open_image, save_png
    from ..upscalers.extras import ExtrasUpscale

    resize = size_arg(args.resize, "--resize") if args.resize else (0, 0)
    if args.resize and min(resize) < 1:
        raise ValueError(f"--resize needs a positive width and height, not {args.resize!r}")
    if not 1 <= args.scale <= 8:
        raise ValueError(f"--scale must be from 1 to 8, got {args.scale}")
    if not 0 <= args.visibility <= 1:
        raise ValueError(f"--visibility must be in [0, 1], got {args.visibility}")
    spec = ExtrasUpscale(resize_mode=1 if args.resize else 0, upscaling_resize=args.scale,
                         upscaling_resize_w=resize[0], upscaling_resize_h=resize[1], upscaling_crop=args.crop,
                         upscaler_1=args.upscaler, upscaler_2=args.upscaler_2 or "None",
                         upscaler_2_visibility=args.visibility)
    spec.check(args.models_dir)
    images = [open_image(path) for path in args.images]  # every input read before any work
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for source, image in zip(args.images, images, strict=True):
        result, info = spec.apply(image, args.models_dir)
        path = out / f"{Path(source).stem}-{result.width}x{result.height}.png"
        save_png(result, path, ", ".join(f"{k}: {v}" for k, v in info.items()) or None)
        print(path)


def upscale_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--upscaler", default="Lanczos", help="Lanczos, Nearest, or an ESRGAN / RealESRGAN model name "
                   "in --models-dir (or a model file's path)")
    p.add_argument("--scale", type=float, default=4.0, help="upscale by this factor (1-8)")
    p.add_argument("--resize", metavar="WxH", help="upscale to cover this size instead of --scale")
    p.add_argument("--no-crop", dest="crop", action="store_false", help="with --resize: keep the whole image "
                   "instead of centre-cropping to the size")
    p.add_argument("--upscaler-2", help="a second upscaler blended in at --visibility")
    p.add_argument("--visibility", type=float, default=0.0, help="upscaler 2's weight in [0, 1]")
    p.add_argument("--models-dir", default="models", help="A1111's models folder (ESRGAN/, RealESRGAN/)")
    p.add_argument("--out", default="outputs/extras")
