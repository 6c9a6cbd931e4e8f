"""``sd txt2img`` / ``img2img`` / ``inpaint``: the flags, the GenerationRequest they ask for, and the run that
writes numbered PNGs with their parameters."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from .options import device_arguments, guidance_arguments, guidance_skip, run_options, size_arg

if TYPE_CHECKING:
    from ..request import GenerationRequest


def _next_index(out: Path) -> int:
    numbers = [int(p.name.split("-")[0]) for p in out.glob("*.png") if p.name.split("-")[0].isdigit()]
    return max(numbers, default=-1) + 1


def _lora_arg(text: str) -> tuple[str, float]:
    name, _, weight = text.rpartition(":") if ":" in text else (text, "", "1")
    try:
        return name, float(weight)
    except ValueError:
        raise ValueError(f"--lora expects NAME_OR_PATH[:WEIGHT], got {text!r}") from None


def _seed_resize(text: str | None) -> dict:
    if text is None:
        return {}
    w, h = size_arg(text, "--seed-resize-from")
    return {"seed_resize_from_w": w, "seed_resize_from_h": h}


def _inits(args: argparse.Namespace) -> dict:
    """--init (one image, or several: one per batch image, as A1111's init_images) and --resize-mode."""
    from ..images import open_image

    paths = getattr(args, "init", None) or []
    images = [open_image(path) for path in paths]
    if not images:
        return {}
    chosen = {"init_image": images[0]} if len(images) == 1 else {"init_images": images}
    if getattr(args, "outpaint", None):
        from ..outpainting import Outpaint

        chosen["outpaint"] = Outpaint(args.outpaint, args.outpaint_blur, args.outpaint_fill,
                                      tuple(d.strip() for d in args.outpaint_directions.split(",") if d.strip()))
    return {**chosen, "resize_mode": args.resize_mode}


def _controls(args: argparse.Namespace) -> list:
    """ControlNet units: the n-th --control image with the n-th of each --control-* flag (the last one given
    repeats for later units)."""
    from ..control import ControlUnit
    from ..images import open_image

    images = getattr(args, "control", None) or []
    if images and not args.control_model:
        if args.model:
            raise ValueError("--control needs --control-model (a ControlNet file or folder)")
        args.control_model = ["builtin"]  # the built-in model's own: shapes where the layout draws them

    def nth(values: list, i: int, default: object) -> object:
        return values[min(i, len(values) - 1)] if values else default

    return [ControlUnit(open_image(path).convert("RGB"), nth(args.control_model, i, None),
                        nth(args.control_module, i, "none"), nth(args.control_weight, i, 1.0),
                        nth(args.control_start, i, 0.0), nth(args.control_end, i, 1.0), nth(args.control_mode, i, 0),
                        nth(args.control_resize, i, 1), nth(args.control_res, i, 512),
                        nth(args.control_threshold_a, i, 100.0), nth(args.control_threshold_b, i, 200.0),
                        annotators=Path(args.models_dir) / "annotators")
            for i, path in enumerate(images)]


def _control_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", action="append", metavar="IMAGE", help="a ControlNet control image (repeatable: "
                   "one unit each)")
    p.add_argument("--control-model", action="append", metavar="PATH", help="its ControlNet (cldm or diffusers; "
                   "with the built-in model the default is its layout ControlNet, \"builtin\")")
    p.add_argument("--control-module", action="append", help="its preprocessor: none, invert, binary, canny, "
                   "scribble_xdog, tile_resample, blur_gaussian, t2ia_color_grid; with their weights in "
                   "--models-dir's annotators/: lineart_realistic, lineart_coarse, openpose, depth_midas")
    p.add_argument("--control-weight", action="append", type=float, help="its weight (1)")
    p.add_argument("--control-start", action="append", type=float, help="from this fraction of the steps (0)")
    p.add_argument("--control-end", action="append", type=float, help="until this fraction of the steps (1)")
    p.add_argument("--control-mode", action="append", type=int, choices=[0, 1, 2],
                   help="0 Balanced, 1 My prompt is more important, 2 ControlNet is more important")
    p.add_argument("--control-resize", action="append", type=int, choices=[0, 1, 2],
                   help="0 just resize, 1 crop and resize (default), 2 resize and fill")
    p.add_argument("--control-res", action="append", type=int, help="the preprocessor's resolution (512)")
    p.add_argument("--control-threshold-a", action="append", type=float, help="canny low / binary threshold")
    p.add_argument("--control-threshold-b", action="append", type=float, help="canny high threshold")


def _hires(args: argparse.Namespace):
    """The HiresFix that --hires / --hires-resize and the other --hires-* flags ask for (txt2img), or None."""
    from ..hires import HiresFix

    if getattr(args, "hires", None) is None and getattr(args, "hires_resize", None) is None:
        return None
    resize = size_arg(args.hires_resize, "--hires-resize") if args.hires_resize else (0, 0)
    return HiresFix(scale=args.hires or 2.0, resize_x=resize[0], resize_y=resize[1], upscaler=args.hires_upscaler,
                    steps=args.hires_steps, sampler=args.hires_sampler, scheduler=args.hires_scheduler,
                    prompt=args.hires_prompt, negative_prompt=args.hires_negative, cfg_scale=args.hires_cfg)


def _hires_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hires", type=float, metavar="SCALE", help="A1111's hires fix: sample, upscale by SCALE, then "
                   "an img2img pass at the larger size with --strength")
    p.add_argument("--hires-resize", metavar="WxH", help="hires fix to this size instead of a scale (0 for a side: "
                   "keep the aspect)")
    p.add_argument("--hires-upscaler", help="Latent (default), Latent (antialiased|bicubic|bicubic antialiased|"
                   "nearest|nearest-exact), Lanczos, Nearest, None, or an ESRGAN/RealESRGAN model in --models-dir")
    p.add_argument("--hires-steps", type=int, default=0, help="the second pass's steps (0: --steps)")
    p.add_argument("--hires-sampler", help="the second pass's sampler (default: --sampler)")
    p.add_argument("--hires-scheduler", help="the second pass's schedule (default: the sampler's own)")
    p.add_argument("--hires-prompt", default="", help="the second pass's prompt (default: the prompt)")
    p.add_argument("--hires-negative", default="", help="the second pass's negative prompt")
    p.add_argument("--hires-cfg", type=float, help="the second pass's CFG scale (default: --cfg)")


def generation_request(args: argparse.Namespace) -> GenerationRequest:
    """The GenerationRequest the flags of txt2img / img2img / inpaint ask for."""
    from ..images import open_image
    from ..request import GenerationRequest
    from ..styles import find_styles, read_styles

    inpainting = getattr(args, "mask", None) is not None
    return GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative, steps=args.steps, cfg_scale=args.cfg,
        sampler=args.sampler, scheduler=args.scheduler, seed=args.seed, batch_size=args.batch, n_iter=args.n_iter,
        subseed=args.subseed, subseed_strength=args.subseed_strength, **_seed_resize(args.seed_resize_from),
        styles=find_styles(args.style, read_styles(args.styles_file)) if args.style else [],
        width=args.width, height=args.height, clip_skip=args.clip_skip, lora_dir=args.lora_dir,
        embeddings_dir=args.embeddings_dir, loras=[_lora_arg(text) for text in args.lora], **guidance_skip(args),
        tiled_vae=args.tiled_vae is not None, vae_tile_size=args.tiled_vae or 512,
        hires=_hires(args), upscalers_dir=args.models_dir, refiner_switch_at=args.refiner_switch_at,
        controls=_controls(args),
        **_inits(args),
        denoising_strength=getattr(args, "strength", 0.75),
        mask=open_image(args.mask) if inpainting else None,
        **({"mask_blur": args.mask_blur, "inpainting_fill": args.fill, "inpainting_mask_invert": args.invert,
            "inpaint_full_res": args.only_masked, "inpaint_full_res_padding": args.padding,
            "mask_round": not args.soft_mask} if inpainting else {}))


def cmd_generate(args: argparse.Namespace) -> None:
    """txt2img, img2img (--init) and inpaint (--init, --mask): one request through generate.generate."""
    import torch
    from tqdm import tqdm

    from ..generate import decode_latents, generate
    from ..images import film_strip, save_png

    options = run_options(args)
    pipe = options.load(args.model)
    request = generation_request(args).resolved(pipe.config.image_size)  # a bad value: one line, before any work
    refiner = options.load(args.refiner) if args.refiner else None
    steps = request.progress_steps()
    batches = request.n_iter
    if request.outpaint is not None:  # one batch per border tile
        from ..outpainting import plan

        batches = len(plan(request.init_image, request.outpaint, request.width, request.height)[1])
    x0s = []

    def on_step(info: dict) -> None:
        bar.update(1)
        if args.preview and len(x0s) < steps:  # the first image's x0 predictions of the first iteration
            x0s.append(info["denoised"][:1].detach().clone())

    with tqdm(total=steps * batches, desc="sampling", unit="step") as bar:
        result = generate(pipe, request, on_step, refiner)  # checks the request before any work
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = _next_index(out)
    for image, seed, info in zip(result.images, result.seeds, result.infotexts, strict=True):
        path = out / f"{index:05d}-{seed}.png"
        save_png(image, path, info)
        print(path)
        index += 1
    first = index - len(result.images)
    if request.controls:  # each unit's control map as the ControlNet saw it, beside the first image
        maps = [unit.control_map(request.width, request.height) for unit in request.controls]
        path = out / f"{first:05d}-{result.seeds[0]}-control.png"
        save_png(film_strip([*maps, result.images[0]], height=max(128, request.height)), path)
        print(path)
    if args.preview:
        with torch.inference_mode():
            frames = [decode_latents(pipe, x0, request.vae_tile)[0] for x0 in x0s]
        path = out / f"{first:05d}-{result.seeds[0]}-preview.png"
        save_png(film_strip(frames), path)
        print(path)


def generation_arguments(p: argparse.ArgumentParser, mode: str) -> None:
    p.add_argument("prompt")
    p.add_argument("--negative", default="", help="negative prompt (the unconditional side of CFG)")
    p.add_argument("--model", help="checkpoint file, diffusers folder or preset (default: the built-in model)")
    p.add_argument("--sampler", default="Euler a", help='A1111 name, e.g. "DPM++ 2M" or "DPM++ 2M Karras"')
    p.add_argument("--scheduler", default="automatic", help="automatic, uniform, karras, exponential, ...")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0)
    guidance_arguments(p)
    p.add_argument("--seed", type=int, default=-1)
    p.add_argument("--subseed", type=int, default=-1, help="A1111's variation seed (-1: random)")
    p.add_argument("--subseed-strength", type=float, default=0.0,
                   help="how far toward --subseed's noise: 0 keeps --seed's image, 1 gives --subseed's")
    p.add_argument("--seed-resize-from", metavar="WxH",
                   help="draw the seed's noise at this size, centred, to keep a composition at another size")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--n-iter", type=int, default=1)
    p.add_argument("--clip-skip", type=int, default=1)
    device_arguments(p)
    p.add_argument("--out", default=f"outputs/{mode}")
    p.add_argument("--lora", action="append", default=[], metavar="NAME[:WEIGHT]",
                   help="apply a LoRA (file path, or name in --lora-dir); also <lora:name:0.8> in the prompt")
    p.add_argument("--lora-dir", default="models/Lora")
    p.add_argument("--embeddings-dir", default="embeddings", help="textual-inversion files, used by file name")
    p.add_argument("--preview", action="store_true", help="also write a film strip of each step's x0 prediction")
    p.add_argument("--style", action="append", default=[], metavar="NAME",
                   help="apply an A1111 prompt style from --styles-file (repeatable, in order)")
    p.add_argument("--styles-file", default="styles.csv", help="A1111's styles.csv (name,prompt,negative_prompt)")
    p.add_argument("--tiled-vae", type=int, nargs="?", const=512, default=None, metavar="PX",
                   help="low memory: the VAE encodes and decodes in tiles of PX pixels (default 512)")
    p.add_argument("--models-dir", default="models", help="A1111's models folder (upscalers in ESRGAN/, RealESRGAN/)")
    _control_arguments(p)
    p.add_argument("--refiner", metavar="MODEL", help="an SDXL refiner (file or folder) that finishes the image: "
                   "it takes over at --refiner-switch-at (with --hires: in the second pass)")
    p.add_argument("--refiner-switch-at", type=float, default=0.8, metavar="FRACTION",
                   help="the fraction of the diffusion after which the refiner takes over (default 0.8)")
    if mode == "txt2img":
        _hires_arguments(p)
        p.add_argument("--strength", type=float, default=0.75, help="the hires fix's denoising strength")
    if mode in ("img2img", "inpaint"):
        p.add_argument("--init", required=True, nargs="+", help="the starting image (several: one per batch image)")
        p.add_argument("--resize-mode", type=int, default=0, choices=[0, 1, 2, 3],
                       help="fitting --init to --width x --height: 0 just resize, 1 crop and resize, 2 resize and "
                       "fill (edges stretched), 3 resize the latent")
    if mode == "img2img":
        p.add_argument("--outpaint", type=int, metavar="PIXELS", help="A1111's poor man's outpainting: grow --init "
                       "by PIXELS and paint the border tile by tile (tiles of --width x --height)")
        p.add_argument("--outpaint-directions", default="left,right,up,down", help="which sides to grow")
        p.add_argument("--outpaint-blur", type=int, default=4, help="the outpainting mask's blur")
        p.add_argument("--outpaint-fill", type=int, default=0, choices=[0, 1, 2, 3],
                       help="the border starts as: 0 fill, 1 original, 2 latent noise, 3 latent nothing")
        p.add_argument("--strength", type=float, default=0.75, help="denoising strength: 0 keeps, 1 repaints")
    if mode == "inpaint":
        p.add_argument("--mask", required=True, help="same size as --init; white = repaint, black = keep")
        p.add_argument("--mask-blur", type=int, default=4)
        p.add_argument("--fill", type=int, default=1, choices=[0, 1, 2, 3],
                       help="masked area starts as: 0 fill, 1 original, 2 latent noise, 3 latent nothing")
        p.add_argument("--invert", action="store_true", help="repaint the black part instead")
        p.add_argument("--only-masked", action="store_true", help="work on a crop around the mask at full size")
        p.add_argument("--padding", type=int, default=32, help="context pixels around the mask with --only-masked")
        p.add_argument("--soft-mask", action="store_true", help="blend the latents through the blurred mask as it "
                       "is (A1111's mask_round off) instead of rounding it to 0 / 1")
