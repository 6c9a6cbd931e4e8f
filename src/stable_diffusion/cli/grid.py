"""``sd grid``: A1111's X/Y/Z plot from the command line (xyz.py): ``--x "steps=10,20,30" --y "cfg=5,7"``, every
txt2img flag for the rest, one grid PNG with a legend (and the cell images with ``--include-images``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .generation import _next_index, generation_arguments, generation_request
from .options import run_options


def _axis(spec: str | None, mode: str):
    from ..xyz import axis_values

    if not spec:
        return axis_values("Nothing", "", mode)
    name, sep, values = spec.partition("=")
    if not sep:
        raise ValueError(f"an axis is NAME=VALUES (e.g. steps=10,20,30), got {spec!r}")
    return axis_values(name, values, mode)


def cmd_grid(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from ..generate import generate
    from ..images import save_png
    from ..styles import read_styles
    from ..xyz import Plot, assemble, plan

    plot = Plot(_axis(args.x, "txt2img"), _axis(args.y, "txt2img"), _axis(args.z, "txt2img"),
                draw_legend=not args.no_legend, include_lone_images=args.include_images,
                include_sub_grids=args.sub_grids, vary_seeds=tuple(a in args.vary_seeds for a in "xyz"),
                margin_size=args.margin)
    if plot.size > args.max_cells:
        raise ValueError(f"the plot has {plot.size} cells, over --max-cells {args.max_cells}")
    options = run_options(args)
    base = generation_request(args)
    styles = read_styles(args.styles_file) if Path(args.styles_file).exists() else {}
    cells = plan(plot, base, styles)
    loaded: dict[str, tuple] = {}  # "model" / "refiner" -> ((path, vae), pipeline): the last of each kept

    def pipeline(slot: str, path: str | None, vae: str | None = None):
        """The cell's model (None: the built-in) or refiner (None: none); the last of each stays loaded, and the
        checkpoint axis is the outermost loop, so each model loads once."""
        if slot == "refiner" and path is None:
            return None
        if slot not in loaded or loaded[slot][0] != (path, vae):
            loaded.pop(slot, None)  # free the last one first
            loaded[slot] = ((path, vae), options.load(path, vae=vae))
        return loaded[slot][1]

    for cell in cells:  # every cell's request checked before any work (a bad value: one line)
        cell.request.resolved(512)
    results = []
    steps = sum(c.request.progress_steps() * c.request.n_iter for c in cells)
    with tqdm(total=steps, desc=f"{plot.size} cells", unit="step") as bar:
        for cell in cells:
            pipe = pipeline("model", cell.models.get("model", args.model), cell.models.get("vae"))
            refiner = pipeline("refiner", cell.models.get("refiner", args.refiner))
            cell.request = cell.request.resolved(pipe.config.image_size)
            results.append(generate(pipe, cell.request, lambda _: bar.update(1), refiner))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = _next_index(out)
    made = assemble(plot, cells, results)
    for i, (image, text, seed) in enumerate(zip(made.images, made.infotexts, made.seeds, strict=True)):
        path = out / (f"xyz_grid-{index:05d}-{seed}.png" if i == 0 else f"{index:05d}-{i}-{seed}.png")
        save_png(image, path, text)
        print(path)


def grid_arguments(p: argparse.ArgumentParser) -> None:
    generation_arguments(p, "txt2img")
    p.set_defaults(out="outputs/txt2img-grids")
    for axis in "xyz":
        p.add_argument(f"--{axis}", metavar="AXIS=VALUES", help=f"the {axis.upper()} axis: steps, cfg, seed, "
                       "sampler, scheduler, checkpoint, prompt (S/R: the first value is replaced by each), order, "
                       "denoising, hires-steps, hires-sampler, hires-upscaler, vae, styles, clip-skip, eta, size, "
                       "refiner, refiner-switch-at (or an A1111 label); values comma-separated, ranges 1-5, "
                       "1-10 (+2), 1-10 [4]" if axis == "x" else None)
    p.add_argument("--no-legend", action="store_true", help="no labels around the grid")
    p.add_argument("--include-images", action="store_true", help="also write every cell's image")
    p.add_argument("--sub-grids", action="store_true", help="also write each Z value's grid")
    p.add_argument("--vary-seeds", default="", metavar="AXES", help="e.g. xy: each cell along these axes gets "
                   "the next seed")
    p.add_argument("--margin", type=int, default=0, help="pixels between cells")
    p.add_argument("--max-cells", type=int, default=256, help="refuse larger plots")
