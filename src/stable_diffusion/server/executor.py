"""What a generation worker does with a job, whatever carries the job to it: hold one pipeline (swapped when a
job names another model), run ``generate`` with a step callback that reports progress and previews, and honour
Interrupt and Skip at the next sampling step, or at the next block inside the text encoder or the VAE.

The server runs an Executor in its worker process (server/worker.py), so the HTTP process never computes."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..generate import StopGeneration, StopSampling, decode_latents, generate
from ..images import png_bytes
from ..metrics.interrogate import Interrogator
from ..models.clip import CLIPMLP, CLIPAttention
from ..models.vae import AttnBlock, ResnetBlock
from ..pipeline import Pipeline, RunOptions
from ..request import GenerationRequest

Report = Callable[[dict[str, Any]], None]  # gets {"i": step index, "preview": base64 PNG or None}
CHECKED_BLOCKS = (CLIPAttention, CLIPMLP, ResnetBlock, AttnBlock)  # where a stop is honoured outside sampling


@dataclass
class ModelRef:
    """A model a job needs: the file, the name its infotext carries, and a standalone VAE to use instead of its
    own (A1111's sd_vae)."""
    path: Path
    name: str
    vae: Path | None = None


@dataclass
class ModelInfo:
    """What the server needs to know of the loaded model without holding it."""
    name: str
    native_size: int
    inpainting: bool
    text_widths: list[int] = field(default_factory=list)  # its text encoders' widths (which embeddings fit)


@dataclass
class Job:
    """``generate`` a request with a model (and an SDXL refiner), ``load`` a model (a model switch), ``unload``
    the models, ``extras`` (upscale images) or ``interrogate`` (CLIP interrogation)."""
    kind: str
    model: ModelRef | None
    request: GenerationRequest | None = None
    preview_every: int = 5
    extra: dict[str, Any] = field(default_factory=dict)
    refiner: ModelRef | None = None


class Controls:
    """The two stop signals of the running job, as callables (a process Event's ``is_set`` in the worker)."""

    def __init__(self, interrupted: Callable[[], bool], skipped: Callable[[], bool],
                 clear_skip: Callable[[], None]) -> None:
        self.interrupted, self.skipped, self.clear_skip = interrupted, skipped, clear_skip


class _Slot:
    """One loaded model: its ref, pipeline, and the file's stamp when it was loaded."""

    def __init__(self) -> None:
        self.model: ModelRef | None = None
        self.pipe: Pipeline | None = None
        self.stamp: tuple[int, ...] | None = None  # the loaded file's identity, size and modification time

    def clear(self) -> None:
        self.model = self.pipe = self.stamp = None

    def holds(self, model: ModelRef) -> bool:
        return self.model is not None and (self.model.path, self.model.vae) == (model.path, model.vae) \
            and _file_stamp(model.path) == self.stamp


class Executor:
    def __init__(self, options: RunOptions, controls: Controls) -> None:
        self.options, self.controls = options, controls
        self.main, self.second = _Slot(), _Slot()  # the model, and the SDXL refiner a job names
        self.interrogator: tuple[tuple, Interrogator] | None = None
        self.stop_inside = True  # False once sampling was interrupted: the last x0 is still decoded

    @property
    def pipe(self) -> Pipeline | None:
        return self.main.pipe

    def _stop_inside(self, module: torch.nn.Module, args: tuple) -> None:
        if self.stop_inside and self.controls.interrupted():
            raise StopGeneration("interrupted")

    def _load(self, slot: _Slot, model: ModelRef) -> Pipeline:
        """``model`` in ``slot``, loaded unless held; a stop is honoured inside its text encoders and VAE."""
        if not slot.holds(model):
            slot.clear()  # free the old weights before the new ones arrive
            stamp = _file_stamp(model.path)
            pipe = self.options.load(model.path, vae=model.vae)
            pipe.vae_name = model.vae.stem if model.vae else None
            for module in [*pipe.text_encoders, pipe.vae]:
                for block in module.modules():
                    if isinstance(block, CHECKED_BLOCKS):
                        block.register_forward_pre_hook(self._stop_inside)
            slot.model, slot.pipe, slot.stamp = model, pipe, stamp
        slot.pipe.config.name = model.name
        return slot.pipe

    def ensure(self, model: ModelRef) -> ModelInfo:
        """Load ``model`` unless it is the one held."""
        pipe = self._load(self.main, model)
        return ModelInfo(model.name, pipe.config.image_size, pipe.config.is_inpainting,
                         [tc.width for tc in pipe.config.text_encoders])

    def run(self, job: Job, report: Report) -> tuple[ModelInfo | None, Any]:
        if job.kind == "unload":  # A1111's unload-checkpoint: the weights go; the next job loads them again
            self.main.clear()
            self.second.clear()
            return None, None
        if job.kind == "extras":  # A1111's Extras upscale: no diffusion model involved
            spec, folder = job.extra["upscale"], job.extra["models_dir"]
            return None, [spec.apply(image, folder) for image in job.extra["images"]]
        if job.kind == "detect":  # ControlNet's preprocessors (/controlnet/detect)
            return None, [unit.detect() for unit in job.extra["units"]]
        if job.kind == "interrogate":  # CLIP interrogation, the model kept for the next image
            key = (job.extra["clip"], job.extra["categories"])
            if self.interrogator is None or self.interrogator[0] != key:
                self.interrogator = None
                self.interrogator = (key, Interrogator.from_folders(*key))
            with torch.inference_mode():
                return None, self.interrogator[1].interrogate(job.extra["image"], job.extra["ranks"])
        info = self.ensure(job.model)
        if job.kind == "load":
            return info, None
        pipe = self.pipe
        assert pipe is not None and job.request is not None
        refiner = self._load(self.second, job.refiner) if job.refiner is not None else None
        self.stop_inside = True

        def on_step(step: dict) -> None:
            if self.controls.interrupted():
                self.stop_inside = False
                report({"i": step["i"], "preview": None})
                raise StopSampling(step["denoised"])
            if self.controls.skipped():
                self.controls.clear_skip()
                report({"i": step["i"], "preview": None})
                raise StopSampling(step["denoised"], skip=True)
            preview = None
            if job.preview_every and (step["i"] + 1) % job.preview_every == 0:
                with torch.inference_mode():
                    image = decode_latents(pipe, step["denoised"][:1], job.request.vae_tile)[0]
                preview = base64.b64encode(png_bytes(image)).decode()
            report({"i": step["i"], "preview": preview})

        return info, generate(pipe, job.request, on_step, refiner)


def _file_stamp(path: Path) -> tuple[int, ...] | None:
    """A file's inode, size and modification time: the weights are memory-mapped views of the file, so a model
    file replaced or rewritten since it was loaded is loaded again before the next job uses it."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns
