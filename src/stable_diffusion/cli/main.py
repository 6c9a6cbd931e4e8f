"""The ``sd`` command's parser and its non-generation commands (info, convert, train, eval, serve, pnginfo, bench).
Every failure is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoints.errors import CheckpointError
from .generation import cmd_generate, generation_arguments
from .grid import cmd_grid, grid_arguments
from .options import device_arguments, guidance_arguments, guidance_skip, run_options
from .upscale import cmd_upscale, upscale_arguments

if TYPE_CHECKING:
    from ..pipeline import Pipeline


def _describe(pipe: Pipeline, source: str) -> str:
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

    from ..models.configs import PRESETS, preset
    from ..pipeline import Pipeline

    if args.model in PRESETS and not Path(args.model).exists():
        # presets are described on the meta device: no memory, no random initialisation
        with torch.device("meta"):
            pipe = Pipeline.from_config(preset(args.model))
        print(_describe(pipe, f"preset {args.model}"))
        return
    pipe = run_options(args).load(args.model, prediction=args.prediction)
    print(_describe(pipe, args.model or "built-in model"))


def cmd_convert(args: argparse.Namespace) -> None:
    from ..pipeline import load_pipeline

    dst = Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise CheckpointError(f"{dst}: already exists (use --overwrite)")
    pipe = load_pipeline(args.src, prediction=args.prediction, vae=args.vae)
    pipe.save(dst, format=args.format, dtype=args.dtype)
    print(f"wrote {dst} ({args.format}, {args.dtype or 'fp32'})")


def cmd_pnginfo(args: argparse.Namespace) -> None:
    from ..images import read_infotext

    text = read_infotext(args.image)
    if text is None:
        raise ValueError(f"{args.image}: no generation parameters in this PNG")
    print(text)


def cmd_bench(args: argparse.Namespace) -> None:
    bench = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_components.py"
    if not bench.exists():
        raise CheckpointError(f"{bench}: benchmarks are run from a source checkout")
    import runpy

    sys.argv = [str(bench), *args.rest]
    runpy.run_path(str(bench), run_name="__main__")


def cmd_train(args: argparse.Namespace) -> None:
    from ..training.config import load_config
    from ..training.train import train

    config = load_config(args.config)
    if args.save_path:
        config.train.save_path = args.save_path
    if args.steps is not None:
        config.train.steps = args.steps
    path = train(config, resume=args.resume, progress=not args.quiet)
    print(f"trained: {path.parent}")


def cmd_eval(args: argparse.Namespace) -> None:
    from ..shapes import DOMAIN_CLIP
    from ..shapes.evaluate import evaluate, table, write_report

    pipe = run_options(args).load(args.model)
    if args.control:  # where a ControlNet puts the objects: IoU with the drawn layouts, per weight
        from ..checkpoints.io import write_json
        from ..shapes.control_eval import control_evaluate, control_table

        try:
            weights = [float(w) for w in args.control_weights.split(",")]
            steps = int(args.steps.split(",")[0])
        except ValueError:
            raise ValueError("--control-weights takes comma-separated numbers, --steps an integer") from None
        result = control_evaluate(pipe, args.control, weights, n=args.n, seed=args.seed, steps=steps,
                                  sampler=args.samplers.split(",")[0].strip(), cfg=args.cfg,
                                  guidance_end=args.control_end, guidance=guidance_skip(args))
        write_json(Path(args.out) / "control.json", result)
        print(control_table(result), end="")
        print(f"written: {args.out}/control.json")
        return
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    try:
        steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        raise ValueError(f"--steps takes comma-separated integers, not {args.steps!r}") from None
    result = evaluate(pipe, samplers, steps, n=args.n, cfg=args.cfg, seed=args.seed, clip_path=args.clip or DOMAIN_CLIP,
                      batch=args.batch, inception=args.inception, guidance=guidance_skip(args))
    write_report(result, Path(args.out))
    print(table(result), end="")
    print(f"written: {args.out}/results.json, table.md, plot.png")


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from ..pipeline import resolve_device
    from ..server.app import create_app
    from ..server.registry import ModelRegistry
    from ..server.schemas import Limits

    resolve_device(args.device)
    if args.broker:
        require_broker()
    try:
        registry = ModelRegistry(args.models_dir, run_options(args), default=args.model, styles_file=args.styles_file,
                                 clip=args.clip)
    except KeyError as error:
        raise ValueError(error.args[0]) from None
    limits = Limits(max_width=args.max_size, max_height=args.max_size, max_steps=args.max_steps,
                    max_images=args.max_images, max_plot_cells=args.max_plot_cells)
    app = create_app(registry, limits, max_queue=args.queue, outputs=args.outputs, api_auth=args.api_auth,
                     api_token=args.api_token, max_body=args.max_body_mb * 2**20,
                     max_prompt_chars=args.max_prompt_chars, listen=args.listen, broker=args.broker)
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    print(f"sd serve: {registry.current_entry.title} on http://{host}:{args.port}/ (API docs at /docs)")
    uvicorn.run(app, host=host, port=args.port, log_level="warning")


def require_broker() -> None:
    """--broker needs RQ and redis-py (the broker extra): a one-line error without them."""
    import importlib.util

    if not all(importlib.util.find_spec(name) for name in ("rq", "redis")):
        raise ValueError("--broker needs RQ and redis-py: pip install \".[broker]\"")


def cmd_worker(args: argparse.Namespace) -> None:
    require_broker()
    from ..pipeline import resolve_device
    from ..server.broker import connect
    from ..server.broker_worker import serve_worker
    from ..server.executor import Controls, Executor

    resolve_device(args.device)
    if args.threads < 0:
        raise ValueError("--threads must be >= 0")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    redis = connect(args.broker)
    executor = Executor(run_options(args), Controls(lambda: False, lambda: False, lambda: None))
    print(f"sd worker: taking jobs from {args.broker}", flush=True)
    serve_worker(redis, executor, args.models_dir, args.name, args.lease, args.burst)


def cmd_interrogate(args: argparse.Namespace) -> None:
    from ..images import open_image
    from ..metrics.interrogate import Interrogator

    images = [open_image(path) for path in args.images]
    interrogator = Interrogator.from_folders(args.clip, args.categories)
    for path, image in zip(args.images, images, strict=True):
        print(f"{path}: {interrogator.interrogate(image, args.ranks)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd", description="Stable Diffusion: run, convert, train and serve.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="family, sizes and parameter counts of a model")
    p.add_argument("model", nargs="?", help="a .safetensors/.ckpt file, a diffusers folder, or a preset name "
                   "(sd1, sdxl, ...); default: the built-in model")
    p.add_argument("--prediction", choices=["eps", "v"], help="override the prediction type")
    device_arguments(p)
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

    helps = {"txt2img": "generate images from a prompt", "img2img": "redraw an image guided by a prompt (SDEdit)",
             "inpaint": "repaint the masked part of an image"}
    for mode, text in helps.items():
        p = sub.add_parser(mode, help=text)
        generation_arguments(p, mode)
        p.set_defaults(func=cmd_generate)

    p = sub.add_parser("grid", help="A1111's X/Y/Z plot: one prompt varied along axes, laid out with a legend")
    grid_arguments(p)
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("upscale", help="upscale images with Lanczos, Nearest or an ESRGAN-family model (A1111's "
                       "Extras)")
    upscale_arguments(p)
    p.set_defaults(func=cmd_upscale)

    p = sub.add_parser("interrogate", help="CLIP interrogation: rank A1111's term lists against images")
    p.add_argument("images", nargs="+")
    p.add_argument("--clip", required=True, help="a CLIP model folder (transformers' layout)")
    p.add_argument("--categories", default="models/interrogate", help="A1111's term lists (*.txt; name.topN.txt "
                   "keeps N terms)")
    p.add_argument("--ranks", action="store_true", help="write each term's probability, (term:0.123)")
    p.set_defaults(func=cmd_interrogate)

    p = sub.add_parser("train", help="train a model, a VAE or a LoRA from a TOML config (torchrun for several)")
    p.add_argument("config", help="the TOML config ([train], [data], [unet], [diffusion], [vae], ...)")
    p.add_argument("--resume", action="store_true", help="continue from the stage checkpoints in save_path")
    p.add_argument("--save-path", help="override [train] save_path")
    p.add_argument("--steps", type=int, help="override [train] steps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="prompt adherence, FID and CLIP score of a shapes-domain model per sampler/steps")
    p.add_argument("--model", help="model file (default: the built-in model)")
    p.add_argument("--samplers", default="Euler a,DPM++ 2M,DDIM,DDPM")
    p.add_argument("--steps", default="5,10,20,50", help="comma-separated step counts")
    p.add_argument("--n", type=int, default=50, help="held-out prompts per kind (one-object, two-object)")
    p.add_argument("--cfg", type=float, default=7.0)
    guidance_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8, help="prompts per generation batch")
    p.add_argument("--inception", help="InceptionV3 FID weights (.pth/.safetensors, pytorch-fid/torch-fidelity "
                   "layout): adds FID with Inception features")
    p.add_argument("--clip", help="CLIP folder for FID features and CLIP score (default: the domain CLIP)")
    p.add_argument("--control", metavar="FILE", help="evaluate this ControlNet instead: objects placed where the "
                   "layout draws them (IoU >= 0.7), per --control-weights, with the first sampler and step count")
    p.add_argument("--control-weights", default="1,0", help="ControlNet weights to compare (0: the model alone)")
    p.add_argument("--control-end", type=float, default=1.0, help="the ControlNet acts until this fraction of the "
                   "steps (its guidance_end)")
    device_arguments(p)
    p.add_argument("--out", default="outputs/eval")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="the AUTOMATIC1111 HTTP API (/sdapi/v1) and the web UI")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--listen", action="store_true", help="bind 0.0.0.0 (all interfaces) instead of 127.0.0.1")
    p.add_argument("--models-dir", default="models", help="A1111 layout: Stable-diffusion/, VAE/, Lora/, embeddings/")
    p.add_argument("--styles-file", default="styles.csv", help="A1111's prompt styles (name,prompt,negative_prompt)")
    p.add_argument("--model", help="the model to start with (a listed name; default: the built-in model)")
    p.add_argument("--clip", help="a CLIP model folder (transformers' layout) for /interrogate, with A1111's term "
                   "lists in MODELS_DIR/interrogate/*.txt")
    p.add_argument("--api-auth", help="user:pass[,user2:pass2] for HTTP basic auth")
    p.add_argument("--api-token", help="a bearer token accepted instead of basic auth")
    p.add_argument("--outputs", default="outputs", help="where save_images writes")
    p.add_argument("--queue", type=int, default=16, help="jobs that may wait; more get 503 + Retry-After")
    p.add_argument("--max-size", type=int, default=2048, help="largest width/height a request may ask for")
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--max-images", type=int, default=16, help="largest batch_size * n_iter")
    p.add_argument("--max-plot-cells", type=int, default=64, help="largest X/Y/Z plot (cells)")
    p.add_argument("--max-body-mb", type=int, default=50)
    p.add_argument("--max-prompt-chars", type=int, default=20_000, help="longest prompt a request may send")
    p.add_argument("--broker", metavar="URL", help="redis://HOST:6379/0: put jobs on this Redis queue for `sd worker` "
                   "processes instead of running them here")
    device_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="a generation worker for `sd serve --broker`: takes jobs from the Redis queue")
    p.add_argument("--broker", metavar="URL", required=True, help="the front end's redis://HOST:6379/0")
    p.add_argument("--models-dir", default="models", help="this machine's copy of the front end's models folder")
    p.add_argument("--name", help="this worker's name (default: host-pid)")
    p.add_argument("--lease", type=int, default=30, help="seconds after which a job of a dead worker goes back to "
                   "the queue (heartbeats come every third of it)")
    p.add_argument("--burst", action="store_true", help="stop when the queue is empty")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); several workers "
                   "on one CPU share its cores")
    device_arguments(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("pnginfo", help="print the generation parameters stored in a PNG")
    p.add_argument("image")
    p.set_defaults(func=cmd_pnginfo)

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
