"""A1111's selectable scripts over HTTP (``script_name`` + ``script_args``): the X/Y/Z plot (xyz.py). Every cell
is planned and checked before anything is queued (a 422 names the problem), then runs as an ordinary generation
job on the worker, one after another inside the request's queue slot; an Interrupt ends the plot after the cell
it stops (the cells not run stay black, as A1111's)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..generate import GenerationResult
from ..request import GenerationRequest
from ..styles import Style
from ..xyz import SCRIPT_NAMES, TITLE, Cell, Plot, assemble, axes, from_script_args, plan
from .executor import Job, ModelRef
from .protocol import ApiError
from .registry import ModelRegistry
from .schemas import Limits

SCRIPTS = {"txt2img": [TITLE.lower()], "img2img": [TITLE.lower()]}  # GET /scripts


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
    return out


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
