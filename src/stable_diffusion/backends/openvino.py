"""OpenVINO as an optional CPU backend (``--backend openvino``): our own UNet and VAE decoder, converted to
OpenVINO's IR by ``openvino.convert_model`` (TorchScript trace of these modules), compiled for the CPU at fp32
(``INFERENCE_PRECISION_HINT=f32``, so outputs stay within ~1e-5 of the torch modules), one compiled model per
input shape (static shapes let the CPU plugin pick its kernels; ~5 % faster than a dynamic-shaped one).

The converted IR is cached on disk (``$SD_CACHE_DIR`` or ``~/.cache/stable_diffusion``, folder ``openvino``),
keyed by a fingerprint of the weights (weights.py), the component, its input signature, the shape class and the
OpenVINO version: only the first run with given weights pays the conversion (about a minute at SD1.5 size);
compiling the IR for a shape takes seconds and is not cached. Weights changed in place (a LoRA merged for one
generation) give another fingerprint, hence another IR. A call this backend cannot run (ControlNet residuals,
gradients, a non-CPU tensor, a dtype other than fp32), or any failure of OpenVINO, runs the torch module; a
failure says so once, in one line.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .file_pages import released_while
from .weights import WeightsWatch

logger = logging.getLogger(__name__)
COMPILED_PER_COMPONENT = 2  # compiled shapes kept per component (LRU): each holds its own copy of the weights


def cache_root() -> Path:
    """Where converted models live: ``$SD_CACHE_DIR/openvino`` or ``~/.cache/stable_diffusion/openvino``."""
    base = os.environ.get("SD_CACHE_DIR") or Path.home() / ".cache" / "stable_diffusion"
    return Path(base) / "openvino"


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None when it cannot be imported."""
    try:
        import openvino
    except Exception:  # noqa: BLE001 - any broken install counts as absent
        return None
    return openvino.get_version().split("-")[0]


class _Traced(nn.Module):
    """The module the converter traces: positional tensors in, one tensor out, through the eager function."""

    def __init__(self, owner: nn.Module, eager: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.owner = owner  # registers the weights, so the converter sees them as constants
        self.eager = eager

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.eager(*inputs)


class OpenVINOComponent:
    """Runs ``eager(*inputs)`` of ``owner`` through OpenVINO where it can (see the module docstring).

    ``name`` names the component in the cache and in notices; ``shape_class(inputs)`` says which inputs share one
    traced graph (the UNet traces a shape-dependent branch for latent sides that its levels do not divide)."""

    def __init__(self, owner: nn.Module, eager: Callable[..., torch.Tensor], name: str,
                 shape_class: Callable[[Sequence[torch.Tensor]], str] = lambda inputs: "any",
                 config: dict | None = None, transform: Callable | None = None, tag: str = "fp32",
                 source: OpenVINOComponent | None = None, release: Callable[[torch.Tensor], Any] | None = None) -> None:
        import openvino as ov

        self.ov = ov
        self.core = ov.Core()  # no CACHE_DIR: a compiled blob per shape is the model's size again on disk
        self.owner, self.eager, self.name, self.shape_class = owner, eager, name, shape_class
        self.config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", **(config or {})}
        # transform(model, component, inputs) -> model (int8 quantization) applied to the IR of ``source`` (the
        # same component in fp32, converted first if need be) instead of a trace of its own
        self.transform, self.tag, self.source = transform, tag, source
        self.release = release  # hands a torch weight's (memory-mapped) pages back to the kernel
        self.watch = WeightsWatch(owner, release)  # each weight's pages released once hashed: never all resident
        self.failed = False
        self.compiled: OrderedDict[tuple, object] = OrderedDict()

    def runnable(self, inputs: Sequence[torch.Tensor]) -> bool:
        return (not self.failed and not torch.is_grad_enabled() and self.owner.dtype == torch.float32
                and all(t.device.type == "cpu" for t in inputs))

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not self.runnable(inputs):
            return self.eager(*inputs)
        try:
            compiled = self._compiled(inputs)
            results = compiled([t.detach().float().contiguous().numpy() for t in inputs])
        except Exception as error:  # noqa: BLE001 - any OpenVINO failure falls back to torch, said once
            self.failed = True
            logger.warning("openvino backend: %s failed (%s); it runs in torch from now on", self.name,
                           str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
            return self.eager(*inputs)
        outputs = tuple(torch.from_numpy(results[i].copy()) for i in range(len(compiled.outputs)))
        return outputs[0] if len(outputs) == 1 else outputs

    def ir_path(self, inputs: Sequence[torch.Tensor]) -> Path:
        signature = "-".join(str(t.dim()) for t in inputs)
        variant = getattr(self.owner, "graph_variant", "")  # a changed graph (token merging) is another model
        key = f"{self.name}{variant}-{self.watch.fingerprint()}-{self.tag}-in{signature}-{self.shape_class(inputs)}"
        return cache_root() / f"ov{openvino_version()}" / key / "model.xml"

    def _compiled(self, inputs: Sequence[torch.Tensor]):
        path = self.ir_path(inputs)
        key = (path, tuple(tuple(t.shape) for t in inputs))
        if key in self.compiled:
            self.compiled.move_to_end(key)
            return self.compiled[key]
        if not path.exists():
            self._convert(inputs, path)
        model = self.core.read_model(path)
        model.reshape({port: self.ov.PartialShape(list(t.shape)) for port, t in zip(model.inputs, inputs)})
        config = {**self.config, "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        with released_while(path.with_suffix(".bin")):  # the compiled model runs on its own copy (file_pages.py)
            self.compiled[key] = self.core.compile_model(model, "CPU", config)
            del model
        while len(self.compiled) > COMPILED_PER_COMPONENT:
            self.compiled.popitem(last=False)
        if self.release is not None:  # the compiled model holds its own weights; torch's reload if ever needed
            for tensor in [*self.owner.parameters(), *self.owner.buffers()]:
                self.release(tensor)
        return self.compiled[key]

    def _convert(self, inputs: Sequence[torch.Tensor], path: Path) -> None:
        """Trace and convert the component (or read its source's IR), transform it; write the IR atomically (a
        folder renamed into place)."""
        if self.source is not None:
            source_path = self.source.ir_path(inputs)
            if not source_path.exists():
                self.source._convert(inputs, source_path)
            model = self.core.read_model(source_path)
        else:
            logger.warning("openvino backend: converting the %s for these weights (once; cached in %s)", self.name,
                           cache_root())
            example = tuple(t.detach().float() for t in inputs)
            with torch.no_grad():
                model = self.ov.convert_model(_Traced(self.owner, self.eager), example_input=example)
            gc.collect()  # the trace's copies of the weights
        if self.transform is not None:
            model = self.transform(model, self, inputs)
        path.parent.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent.parent, prefix=".staging-"))
        try:
            self.ov.save_model(model, staging / path.name, compress_to_fp16=False)
            try:
                staging.rename(path.parent)
            except OSError:  # another process wrote the same IR first: use theirs
                if not path.exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
