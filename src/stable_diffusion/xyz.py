"""A1111's X/Y/Z plot (scripts/xyz_grid.py): one request varied along up to three axes, one image per cell, laid
out as a grid with a legend. The axes are A1111's, in A1111's order (API clients name an axis by its index in
that order, which differs between txt2img and img2img); values are A1111's comma-separated lists with its ranges
(``1-5``, ``1-10 (+2)``, ``1-10 [4]``). Cells run in A1111's order: the costliest axis (a checkpoint) outermost.

Planning (``plan``) and drawing (``assemble``) live here; the front ends (CLI, server) run each cell's request
through the one generation path and load the models a cell names."""

from __future__ import annotations

import csv
import io
import itertools
import random
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .images import grid, labelled_grid
from .infotext import append_params
from .request import GenerationRequest
from .styles import Style, find_styles

if TYPE_CHECKING:
    from .generate import GenerationResult

TITLE = "X/Y/Z plot"
SCRIPT_NAMES = ("x/y/z plot", "xyz plot", "x/y plot")  # A1111 matches script titles case-insensitively


@dataclass(frozen=True)
class Axis:
    """An A1111 axis: its label, value type, what it sets, how its legend reads, and where it is offered."""

    label: str
    kind: str  # int | float | str | permutations
    target: str | None  # a GenerationRequest field, a special target, or None: not implemented here
    legend: str = "label"  # label ("Label: v"), value, join, basename, nothing
    cost: float = 0.0
    mode: str = "both"  # both | txt2img | img2img


_AXES = [
    Axis("Nothing", "str", "nothing", "nothing"), Axis("Seed", "int", "seed"), Axis("Var. seed", "int", "subseed"),
    Axis("Var. strength", "float", "subseed_strength"), Axis("Steps", "int", "steps"),
    Axis("Hires steps", "int", "hires.steps", mode="txt2img"), Axis("CFG Scale", "float", "cfg_scale"),
    Axis("Image CFG Scale", "float", None, mode="img2img"), Axis("Prompt S/R", "str", "prompt_sr", "value"),
    Axis("Prompt order", "permutations", "prompt_order", "join"),
    Axis("Sampler", "str", "sampler", "value", mode="txt2img"),
    Axis("Hires sampler", "str", "hires.sampler", mode="txt2img"),
    Axis("Sampler", "str", "sampler", "value", mode="img2img"),
    Axis("Checkpoint name", "str", "model", "basename", cost=1.0),
    Axis("Negative Guidance minimum sigma", "float", "s_min_uncond"), Axis("Sigma Churn", "float", None),
    Axis("Sigma min", "float", None), Axis("Sigma max", "float", None), Axis("Sigma noise", "float", None),
    Axis("Schedule type", "str", "scheduler"), Axis("Schedule min sigma", "float", None),
    Axis("Schedule max sigma", "float", None), Axis("Schedule rho", "float", None),
    Axis("Skip Early CFG", "float", "skip_early_cond"), Axis("Beta schedule alpha", "float", None),
    Axis("Beta schedule beta", "float", None), Axis("Eta", "float", "eta"), Axis("Clip skip", "int", "clip_skip"),
    Axis("Denoising", "float", "denoising_strength"), Axis("Initial noise multiplier", "float", None),
    Axis("Extra noise", "float", None), Axis("Hires upscaler", "str", "hires.upscaler", mode="txt2img"),
    Axis("Cond. Image Mask Weight", "float", None, mode="img2img"), Axis("VAE", "str", "vae", cost=0.7),
    Axis("Styles", "str", "styles"), Axis("UniPC Order", "int", None, cost=0.5), Axis("Face restore", "str", None),
    Axis("Token merging ratio", "float", None), Axis("Token merging ratio high-res", "float", None),
    Axis("Always discard next-to-last sigma", "str", None), Axis("SGM noise multiplier", "str", None),
    Axis("Refiner checkpoint", "str", "refiner", "basename", cost=1.0),
    Axis("Refiner switch at", "float", "refiner_switch_at"), Axis("RNG source", "str", None),
    Axis("FP8 mode", "str", None, cost=0.9), Axis("Size", "str", "size"),
]
# CLI names for the axes (besides A1111's labels, any case)
ALIASES = {"seed": "Seed", "subseed": "Var. seed", "subseed-strength": "Var. strength", "steps": "Steps",
           "hires-steps": "Hires steps", "cfg": "CFG Scale", "prompt": "Prompt S/R", "sr": "Prompt S/R",
           "order": "Prompt order", "sampler": "Sampler", "hires-sampler": "Hires sampler",
           "checkpoint": "Checkpoint name", "model": "Checkpoint name", "ngms": "Negative Guidance minimum sigma",
           "scheduler": "Schedule type", "schedule": "Schedule type", "skip-early-cfg": "Skip Early CFG",
           "eta": "Eta", "clip-skip": "Clip skip", "denoising": "Denoising", "strength": "Denoising",
           "hires-upscaler": "Hires upscaler", "vae": "VAE", "style": "Styles", "styles": "Styles",
           "refiner": "Refiner checkpoint", "refiner-switch-at": "Refiner switch at", "size": "Size"}


def axes(mode: str) -> list[Axis]:
    """The axes A1111 offers for ``mode`` (txt2img | img2img), in its order: an API axis index counts in this."""
    return [a for a in _AXES if a.mode in ("both", mode)]


def find_axis(key: int | str, mode: str) -> Axis:
    """An axis by A1111's index for the mode, its label, or a CLI alias; a ValueError otherwise."""
    offered = axes(mode)
    if isinstance(key, int) and not isinstance(key, bool):
        if not 0 <= key < len(offered):
            raise ValueError(f"axis type {key}: A1111's {mode} axes are numbered 0 to {len(offered) - 1}")
        axis = offered[key]
    else:
        name = ALIASES.get(str(key).strip().lower(), str(key).strip())
        axis = next((a for a in offered if a.label.lower() == name.lower()), None)
        if axis is None:
            raise ValueError(f"unknown axis {key!r}; axes: {', '.join(a.label for a in offered if a.target)}")
    if axis.target is None:
        raise ValueError(f"the {axis.label!r} axis is not implemented by this server")
    return axis


_INT_RANGE = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
_INT_COUNT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*])?\s*")
_FLOAT_RANGE = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*")
_FLOAT_COUNT = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\[(\d+(?:.\d*)?)\s*])?\s*")
MAX_VALUES = 256  # per axis: a range cannot ask for millions of cells


def parse_values(axis: Axis, text: str | list[str]) -> list[Any]:
    """An axis's values from A1111's comma-separated text (or a dropdown's list), ranges expanded, typed."""
    if axis.target == "nothing":
        return [0]
    items = [str(v).strip() for v in text] if isinstance(text, list) else \
        [v.strip() for v in itertools.chain.from_iterable(csv.reader(io.StringIO(text or "")))]
    items = [v for v in items if v != "" or axis.kind == "str"]
    values: list[Any] = []
    for item in items:
        if axis.kind in ("int", "float"):
            values += _expand(item, axis.kind == "int")
        else:
            values.append(item)
        if len(values) > MAX_VALUES:
            raise ValueError(f"{axis.label}: more than {MAX_VALUES} values")
    if axis.kind == "permutations":
        values = [list(p) for p in itertools.permutations(values)][:MAX_VALUES + 1]
    if not values:
        raise ValueError(f"{axis.label}: no values")
    if len(values) > MAX_VALUES:
        raise ValueError(f"{axis.label}: more than {MAX_VALUES} values")
    return values


def _expand(item: str, integer: bool) -> list[int | float]:
    """A1111's ranges: ``a-b`` (integers: every one), ``a-b (+s)`` by steps of s, ``a-b [n]`` n evenly spaced."""
    span, count = (_INT_RANGE, _INT_COUNT) if integer else (_FLOAT_RANGE, _FLOAT_COUNT)

    def number(text: str) -> int | float:
        try:
            return (int if integer else float)(text.replace(" ", ""))
        except ValueError:
            raise ValueError(f"{item!r} is not {'an integer' if integer else 'a number'} or a range") from None

    if m := span.fullmatch(item):
        start, end, step = number(m.group(1)), number(m.group(2)), number(m.group(3)) if m.group(3) else 1
        if step == 0 or abs((end - start) / step) > MAX_VALUES:
            raise ValueError(f"range {item!r} has too many values")
        return list(range(start, end + 1, step)) if integer else np.arange(start, end + step, step).tolist()
    if m := count.fullmatch(item):
        n = int(float(m.group(3))) if m.group(3) else 1
        if not 0 < n <= MAX_VALUES:
            raise ValueError(f"range {item!r}: the count must be 1 to {MAX_VALUES}")
        spaced = np.linspace(number(m.group(1)), number(m.group(2)), n).tolist()
        return [int(v) for v in spaced] if integer else spaced
    return [number(item)]


@dataclass
class AxisValues:
    axis: Axis
    values: list[Any]
    text: str  # as given (the infotext's "X Values")

    @property
    def active(self) -> bool:
        return self.axis.target != "nothing"

    def legend(self, value: Any) -> str:
        shown = round(value, 8) if isinstance(value, float) else value
        return {"label": lambda: f"{self.axis.label}: {shown}", "value": lambda: str(shown),
                "join": lambda: ", ".join(shown), "basename": lambda: str(shown).replace("\\", "/").split("/")[-1],
                "nothing": lambda: ""}[self.axis.legend]()


@dataclass
class Plot:
    """The script's settings (A1111's run() arguments)."""

    x: AxisValues
    y: AxisValues
    z: AxisValues
    draw_legend: bool = True
    include_lone_images: bool = False
    include_sub_grids: bool = False
    no_fixed_seeds: bool = False
    vary_seeds: tuple[bool, bool, bool] = (False, False, False)
    margin_size: int = 0

    @property
    def size(self) -> int:
        return len(self.x.values) * len(self.y.values) * len(self.z.values)


def axis_values(key: int | str, text: str | list[str], mode: str) -> AxisValues:
    axis = find_axis(key, mode)
    return AxisValues(axis, parse_values(axis, text), text if isinstance(text, str) else ", ".join(text))


def from_script_args(args: list[Any], mode: str) -> Plot:
    """A1111's script_args for the X/Y/Z plot: [x_type, x_values, x_values_dropdown, (y...), (z...), draw_legend,
    include_lone_images, include_sub_grids, no_fixed_seeds, then vary_seeds_x/y/z, margin_size, csv_mode (1.7+)
    or margin_size (older)]. An axis with a dropdown takes its list unless csv_mode; types are indices or labels."""
    if len(args) < 13 or len(args) > 18:
        raise ValueError(f"script_args: the X/Y/Z plot takes 13 to 18 arguments, got {len(args)}")
    rest = list(args[13:])
    vary = (False, False, False)
    if len(rest) >= 4:  # A1111 1.7+: vary_seeds_x, _y, _z, margin_size, csv_mode
        vary, rest = tuple(bool(v) for v in rest[:3]), rest[3:]
    margin = rest[0] if rest else 0
    if not isinstance(margin, int | float) or isinstance(margin, bool) or not 0 <= margin <= 500:
        raise ValueError("script_args: margin_size must be 0 to 500 pixels")
    csv_mode = bool(rest[1]) if len(rest) > 1 else False
    parsed = []
    for i in range(3):
        kind, text, dropdown = args[3 * i: 3 * i + 3]
        use_list = isinstance(dropdown, list) and dropdown and not csv_mode
        if not isinstance(text, str | type(None)) or not isinstance(kind, int | str):
            raise ValueError(f"script_args: axis {'XYZ'[i]} needs a type and a text of values")
        try:
            parsed.append(axis_values(kind, dropdown if use_list else (text or ""), mode))
        except ValueError as error:
            raise ValueError(f"script_args: {'XYZ'[i]} axis: {error}") from None
    flags = [bool(v) for v in args[9:13]]
    return Plot(*parsed, draw_legend=flags[0], include_lone_images=flags[1], include_sub_grids=flags[2],
                no_fixed_seeds=flags[3], vary_seeds=vary, margin_size=int(margin))


@dataclass
class Cell:
    """One cell: its position, its request, and the models it names (None: the plot's own)."""

    ix: int
    iy: int
    iz: int
    request: GenerationRequest
    models: dict[str, str] = field(default_factory=dict)  # "model", "vae", "refiner" -> a name or path


def _apply(cell: Cell, axis: Axis, value: Any, values: list[Any], styles: dict[str, Style]) -> None:
    r, target = cell.request, axis.target
    if target == "nothing":
        return
    if target in ("model", "vae", "refiner"):
        cell.models[target] = value
    elif target.startswith("hires."):
        if r.hires is None:
            raise ValueError(f"the {axis.label!r} axis needs the hires fix (enable_hr)")
        cell.request = replace(r, hires=replace(r.hires, **{target[6:]: value}))
    elif target == "prompt_sr":
        search = values[0]
        if not any(search in p for p in [*r.prompts, r.negative_prompt]):
            raise ValueError(f"Prompt S/R did not find {search!r} in the prompt or negative prompt")
        prompt = [p.replace(search, value) for p in r.prompt] if isinstance(r.prompt, list) else \
            r.prompt.replace(search, value)
        cell.request = replace(r, prompt=prompt, negative_prompt=r.negative_prompt.replace(search, value))
    elif target == "prompt_order":
        cell.request = replace(r, prompt=_reorder(r.prompt, value) if isinstance(r.prompt, str) else
                               [_reorder(p, value) for p in r.prompt])
    elif target == "styles":
        cell.request = replace(r, styles=[*r.styles, *find_styles(value.split(","), styles)])
    elif target == "size":
        w, _, h = value.partition("x")
        try:
            cell.request = replace(r, width=int(w.strip()), height=int(h.strip()))
        except ValueError:
            raise ValueError(f"Size: {value!r} is not WIDTHxHEIGHT") from None
    else:
        cell.request = replace(r, **{target: value})


def _reorder(prompt: str, tokens: list[str]) -> str:
    """A1111's Prompt order: the tokens, where they occur in the prompt, put back in the order given."""
    parts, rest = [], prompt
    for _, token in sorted((rest.find(t), t) for t in tokens):
        at = rest.find(token)
        if at < 0:
            raise ValueError(f"Prompt order: {token!r} is not in the prompt")
        parts.append(rest[:at])
        rest = rest[at + len(token):]
    return "".join(part + token for part, token in zip(parts, tokens, strict=True)) + rest


def plan(plot: Plot, request: GenerationRequest, styles: dict[str, Style] | None = None) -> list[Cell]:
    """Every cell's request, in A1111's processing order (the costliest axis outermost). Seeds are fixed first
    (a -1 seed, subseed or seed-axis value drawn once), unless ``no_fixed_seeds``."""
    if not plot.no_fixed_seeds:
        request = replace(request, seed=random.randrange(2**32) if request.seed == -1 else request.seed,
                          subseed=random.randrange(2**32) if request.subseed == -1 else request.subseed)
        for ax in (plot.x, plot.y, plot.z):
            if ax.axis.target in ("seed", "subseed"):
                ax.values = [random.randrange(4294967294) if v == -1 else v for v in ax.values]
    xs, ys, zs = plot.x.values, plot.y.values, plot.z.values
    order = _processing_order(plot.x.axis.cost, plot.y.axis.cost, plot.z.axis.cost)
    ranges = {"x": range(len(xs)), "y": range(len(ys)), "z": range(len(zs))}
    cells = []
    for combo in itertools.product(*(ranges[a] for a in order)):
        at = dict(zip(order, combo, strict=True))
        ix, iy, iz = at["x"], at["y"], at["z"]
        seed = request.seed + (ix if plot.vary_seeds[0] else 0) + (iy * len(xs) if plot.vary_seeds[1] else 0) \
            + (iz * len(xs) * len(ys) if plot.vary_seeds[2] else 0)
        cell = Cell(ix, iy, iz, replace(request, seed=seed, styles=list(request.styles)))
        for ax, value in ((plot.x, xs[ix]), (plot.y, ys[iy]), (plot.z, zs[iz])):
            _apply(cell, ax.axis, value, ax.values, styles or {})
        cells.append(cell)
    return cells


def _processing_order(x: float, y: float, z: float) -> str:
    """A1111's loop nesting, outermost first: an axis costlier than both others goes outermost and the costlier
    of the rest next; otherwise z, y, x."""
    cost = {"x": x, "y": y, "z": z}
    for first in "xyz":
        a, b = (axis for axis in "xyz" if axis != first)
        if cost[first] > cost[a] and cost[first] > cost[b]:
            return first + (a + b if cost[a] > cost[b] else b + a)
    return "zyx"


@dataclass
class PlotResult:
    images: list[Image.Image]  # the grid, then the sub-grids and cell images asked for
    infotexts: list[str]
    seeds: list[int]
    prompts: list[str]


def _cell_image(result: GenerationResult | None, size: tuple[int, int]) -> Image.Image:
    """A cell's picture: its image (several: their grid, as A1111 returns a batch), or black if it failed."""
    if result is None or not result.images:
        return Image.new("RGB", size)
    if len(result.images) == 1:
        return result.images[0]
    return grid(result.images, max(1, round(len(result.images) ** 0.5)))


def assemble(plot: Plot, cells: list[Cell], results: list[GenerationResult | None]) -> PlotResult:
    """The grids and A1111's answer: [main grid, sub-grids (include_sub_grids), cells (include_lone_images)],
    with infotexts (the grids': their first cell's, plus the script's keys)."""
    first = next((r for r in results if r is not None and r.images), None)
    if first is None:
        raise ValueError("X/Y/Z plot: no cell produced an image")
    size = first.images[0].size
    nx, ny, nz = len(plot.x.values), len(plot.y.values), len(plot.z.values)
    by_place = {(c.ix, c.iy, c.iz): (c, r) for c, r in zip(cells, results, strict=True)}
    ordered = [by_place[ix, iy, iz] for iz in range(nz) for iy in range(ny) for ix in range(nx)]
    pictures = [_cell_image(r, size) for _, r in ordered]
    texts = [r.infotexts[0] if r is not None and r.infotexts else "" for _, r in ordered]
    seeds = [r.seeds[0] if r is not None and r.seeds else c.request.seed for c, r in ordered]
    prompts = [c.request.prompts[0] for c, _ in ordered]
    xl = [plot.x.legend(v) for v in plot.x.values] if plot.draw_legend else [""] * nx
    yl = [plot.y.legend(v) for v in plot.y.values] if plot.draw_legend else [""] * ny
    subs, sub_texts = [], []
    for iz in range(nz):
        block = pictures[iz * nx * ny:(iz + 1) * nx * ny]
        subs.append(labelled_grid(block, nx, xl, yl, plot.margin_size) if plot.draw_legend else grid(block, nx))
        sub_texts.append(append_params(texts[iz * nx * ny], _script_params(plot, z=False)))
    main = subs[0]
    if plot.z.active:
        zl = [plot.z.legend(v) for v in plot.z.values] if plot.draw_legend else [""] * nz
        main = labelled_grid(subs, nz, zl, [""]) if plot.draw_legend else grid(subs, nz)
    images, infotexts = [main], [append_params(texts[0], _script_params(plot, z=True))]
    out_seeds, out_prompts = [seeds[0]], [prompts[0]]
    if plot.include_sub_grids:
        images, infotexts = images + subs, infotexts + sub_texts
        out_seeds += [seeds[iz * nx * ny] for iz in range(nz)]
        out_prompts += [prompts[iz * nx * ny] for iz in range(nz)]
    if plot.include_lone_images:
        images, infotexts, out_seeds, out_prompts = images + pictures, infotexts + texts, out_seeds + seeds, \
            out_prompts + prompts
    return PlotResult(images, infotexts, out_seeds, out_prompts)


def _script_params(plot: Plot, z: bool) -> dict[str, Any]:
    """The infotext keys A1111's script adds to a grid's parameters (Z only on the main grid)."""
    params: dict[str, Any] = {"Script": TITLE}
    for name, ax in (("X", plot.x), ("Y", plot.y), *((("Z", plot.z),) if z else ())):
        if ax.active:
            params[f"{name} Type"], params[f"{name} Values"] = ax.axis.label, ax.text
            if ax.axis.target in ("seed", "subseed") and not plot.no_fixed_seeds:
                params[f"Fixed {name} Values"] = ", ".join(str(v) for v in ax.values)
    return params
