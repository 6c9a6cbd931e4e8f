"""A1111's selectable scripts over HTTP (``script_name`` + ``script_args``): the X/Y/Z plot (xyz.py) and, for
img2img, poor man's outpainting (outpainting.py, which ``generate`` runs). Every plot cell is planned and checked
before anything is queued (a 422 names the problem), then runs as an ordinary generation job on the worker, one
after another inside the request's queue slot; an Interrupt ends the plot after the cell it stops (the cells not
run stay black, as A1111's)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..generate import GenerationResult
from ..inpaint import FILL_MODES
from ..outpainting import DIRECTIONS, Outpaint
from ..outpainting import TITLE as OUTPAINT
from ..request import GenerationRequest
from ..styles import Style
from ..xyz import SCRIPT_NAMES, TITLE, Cell, Plot, assemble, axes, from_script_args, plan
from .executor import Job, ModelRef
from .protocol import ApiError
from .registry import ModelRegistry
from .schemas import Limits

SCRIPTS = {"txt2img": [TITLE.lower()], "img2img": [TITLE.lower(), OUTPAINT.lower()]}  # GET /scripts


def script_info() -> list[dict[str, Any]]:
    """GET /script-info: the X/Y/Z plot's arguments, as A1111 describes a script's inputs."""
    def arg(label: str, value: Any, choices: list[str] | None = None) -> dict[str, Any]:
        return {"label": label, "value": value, "minimum": None, "maximum": None, "step": None, "choices": choices}

    out = []
    for mode in ("txt2img", "img2img"):
        labels = [a.label for a in axes(mode)]
        axis_args = [item for name in "XYZ" for item in (arg(f"{name} type", labels[1 if name == "X" else 0], labels),
                                                           arg(f"{name} values", ""), arg(f"{name} values", []))]
        flags = [arg("Draw legend", True), arg("Include Sub Images", False), arg("Include Sub Grids", False),
                 arg("Keep -1 for seeds", False), arg("Vary seeds for X", False), arg("Vary seeds for Y", False),
                 arg("Vary seeds for Z", False), arg("Grid margins (px)", 0),
                 arg("Use text inputs instead of dropdowns", False)]
        out.append({"name": TITLE.lower(), "is_alwayson": False, "is_img2img": mode == "img2img",
                    "args": axis_args + flags})
    out.append({"name": OUTPAINT.lower(), "is_alwayson": False, "is_img2img": True, "args": [
        {**arg("Pixels to expand", 128), "minimum": 8, "maximum": 256, "step": 8},
        {**arg("Mask blur", 4), "minimum": 0, "maximum": 64, "step": 1},
        arg("Masked content", "fill", list(FILL_MODES.values())),
        arg("Outpainting direction", list(DIRECTIONS), list(DIRECTIONS))]})
    return out


def outpaint_settings(body: Any) -> Outpaint | None:
    """A1111's poor man's outpainting from an img2img body's script_args [pixels, mask_blur, masked content (its
    index or name), directions], or None when the body names another script."""
    if (body.script_name or "").strip().lower() != OUTPAINT.lower():
        return None
    args = list(body.script_args) + [None] * (4 - len(body.script_args))
    if len(body.script_args) > 4:
        raise ApiError(422, "script_args: poor man's outpainting takes [pixels, mask_blur, inpainting_fill, "
                            "direction]")
    pixels, blur, fill, directions = (128 if args[0] is None else args[0], 4 if args[1] is None else args[1],
                                      0 if args[2] is None else args[2], DIRECTIONS if args[3] is None else args[3])
    names = {name: index for index, name in FILL_MODES.items()}
    fill = names.get(fill, fill) if isinstance(fill, str) else fill
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (pixels, blur, fill)) and \
        isinstance(directions, list | tuple) and all(isinstance(d, str) for d in directions)
    if not ok or fill not in FILL_MODES:
        raise ApiError(422, "script_args: poor man's outpainting takes [pixels (int), mask_blur (int), "
                            "inpainting_fill (0-3 or its name), direction (a list of left, right, up, down)]")
    return Outpaint(pixels, blur, fill, tuple(directions))


@dataclass
class PlannedCell:
    cell: Cell
    model: ModelRef | None  # None: the request's model (chosen when the job runs, as for any request)
    refiner: ModelRef | None
    sets_vae: bool = False  # the cell names its VAE (else the request's)
    vae: Path | None = None


def plan_plot(body: Any, request: GenerationRequest, mode: str, registry: ModelRegistry, refiner: ModelRef | None,
              limits: Limits, native_size: int, styles: dict[str, Style]) -> tuple[Plot, list[PlannedCell]] | None:
    """The plot a body asks for (None: no script), every cell resolved and within the limits."""
    name = (body.script_name or "").strip().lower()
    if name == OUTPAINT.lower() and mode == "img2img":
        return None  # generate runs it (outpaint_settings)
    if not name:
        if body.script_args:
            raise ApiError(422, "script_args: given without a script_name")
        return None
    if name not in SCRIPT_NAMES:
        raise ApiError(422, f"script_name: no script {body.script_name!r} here; GET /sdapi/v1/scripts lists them")
    try:
        plot = from_script_args(body.script_args, mode)
        if plot.size > limits.max_plot_cells:
            raise ValueError(f"the plot has {plot.size} cells, over this server's limit of {limits.max_plot_cells}")
        cells = plan(plot, request, styles)
    except ValueError as error:
        raise ApiError(422, str(error)) from None
    planned = []
    for cell in cells:
        try:
            model = registry.find(cell.models["model"]).ref() if "model" in cell.models else None
            vae = registry.vae(cell.models["vae"]) if "vae" in cell.models else None
            ref = refiner
            if "refiner" in cell.models:
                chosen = cell.models["refiner"]
                ref = None if chosen in ("", "None", "none") else registry.find(chosen).ref()
        except KeyError as error:
            raise ApiError(422, f"X/Y/Z plot: {error.args[0]}") from None
        r = cell.request
        if (r.width or 0) > limits.max_width or (r.height or 0) > limits.max_height or r.steps > limits.max_steps:
            raise ApiError(422, f"X/Y/Z plot: a cell asks for {r.width}x{r.height} at {r.steps} steps, over this "
                                f"server's limits")
        try:
            cell.request = r.resolved(native_size)
        except ValueError as error:
            raise ApiError(422, f"X/Y/Z plot: {error}") from None
        planned.append(PlannedCell(cell, model, ref, "vae" in cell.models, vae))
    return plot, planned


def run_plot(plot: Plot, planned: list[PlannedCell], run_job: Callable[[Job], Any], interrupted: Callable[[], bool],
             base: GenerationRequest, default: ModelRef) -> GenerationResult:
    """Each cell through the worker (``default``: the request's model and VAE), then A1111's grid answer as one
    result (grid first)."""
    results: list[GenerationResult | None] = []
    for item in planned:
        if interrupted():
            results.append(None)
            continue
        model = replace(item.model or default, vae=item.vae if item.sets_vae else default.vae)
        _, result = run_job(Job("generate", model, item.cell.request, refiner=item.refiner))
        results.append(result)
    made = assemble(plot, [p.cell for p in planned], results)
    return GenerationResult(made.images, made.seeds, made.infotexts, base, [base.subseed] * len(made.seeds))
