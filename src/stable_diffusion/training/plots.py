"""Pictures of a training run: the loss curves (matplotlib, one panel per stage) and sample grids of fixed
prompts drawn with the run's current (EMA) weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoints.io import atomic_write
from ..images import grid, save_png

if TYPE_CHECKING:
    from ..pipeline import Pipeline


def smoothed(values: list[float], window: int) -> list[float]:
    """The running mean over the last ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curve(records: list[dict], path: Path) -> None:
    """The loss against the step on a log scale, one panel per stage: each logged value faint, and its
    running mean over 2 % of the stage's records."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    stages = list(dict.fromkeys(r["stage"] for r in records))
    if not stages:
        return
    figure = Figure(figsize=(7, 2.6 * len(stages)), layout="constrained")
    for axes, stage in zip(figure.subplots(len(stages), 1, squeeze=False)[:, 0], stages):
        rows = [(r["step"], r["loss"]) for r in records if r["stage"] == stage]
        steps, losses = [s for s, _ in rows], [max(v, 1e-12) for _, v in rows]
        axes.plot(steps, losses, color="C0", alpha=0.25, linewidth=0.8, label="logged")
        axes.plot(steps, smoothed(losses, max(1, len(losses) // 50)), color="C0", label="running mean")
        axes.set(yscale="log", xlabel="step", ylabel="loss (log scale)", title=f"stage {stage}")
        axes.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        if max(losses) < 10 * min(losses):  # within a decade: label the minor ticks too, else they crowd
            axes.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
        axes.grid(alpha=0.3)
        axes.legend(loc="upper right")
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def sample_grid(pipe: Pipeline, prompts: list[str], path: Path, steps: int = 20, seed: int = 0) -> None:
    """One image per prompt (default sampler, fixed seeds), in a row-major grid."""
    images = [pipe.txt2img(p, steps=steps, seed=seed + i)[0] for i, p in enumerate(prompts)]
    save_png(grid(images, min(len(images), 8)), path)
