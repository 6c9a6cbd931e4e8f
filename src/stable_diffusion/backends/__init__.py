"""Compiled backends for the networks (``--backend``): ``torch`` (eager, the default) or ``openvino`` (openvino.py,
the optional ``pip install ".[openvino]"``), installed on a loaded UNet and VAE by ``use_backend``.

A backend replaces the instance's ``unet.forward`` and ``vae.decode`` with a runner that keeps the eager function
for what it cannot run; ``use_backend(..., "torch")`` puts the eager ones back. An absent backend gives a
one-line notice and leaves torch in place."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

BACKENDS = ("torch", "openvino")
logger = logging.getLogger(__name__)


def use_backend(unet: nn.Module, vae: nn.Module, name: str, device: torch.device, int8: bool = False,
                calibrate: Callable[[], Any] | None = None, release: Callable[[torch.Tensor], Any] | None = None,
                int8_vae: bool = False) -> str:
    """Run ``unet`` and ``vae.decode`` on backend ``name``; returns the backend in effect ("torch" when the asked
    one is absent or cannot run on ``device``, with a one-line notice). ``int8`` / ``int8_vae`` (openvino only;
    int8.py) quantize the UNet / the VAE decoder, calibrated on their inputs in ``calibrate()`` (a few
    generations). ``release(tensor)`` hands a torch weight's (memory-mapped) pages back: each one once the cache
    key has read it, and all of a module's after each compile (the compiled model holds its own weights)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    if (int8 or int8_vae) and name != "openvino":
        raise ValueError("int8 runs on the openvino backend")
    for module, attr in ((unet, "forward"), (vae, "decode"), (unet, "deepcache_parts")):
        module.__dict__.pop(attr, None)  # back to the class's eager method
    if name == "torch":
        return name
    from .int8 import nncf_available
    from .openvino import openvino_version

    if openvino_version() is None:
        logger.warning("openvino backend: openvino is not installed (pip install \".[openvino]\"); running torch")
        return "torch"
    if device.type != "cpu":
        logger.warning("openvino backend: runs on the CPU, not %s; running torch", device)
        return "torch"
    from .unet_parts import install_openvino

    quantizable = nncf_available()
    install_openvino(unet, vae, _installed, int8 and quantizable, calibrate, release, int8_vae and quantizable)
    if (int8 or int8_vae) and not quantizable:
        logger.warning("int8: nncf is not installed (pip install \".[openvino]\"); the networks run in fp32")
    return name


def _installed(module: nn.Module, name: str, make):
    """The module's runner for backend ``name``, made once and kept on the module (switching back and forth
    compiles nothing again)."""
    runners = module.__dict__.setdefault("_backend_runners", {})
    if name not in runners:
        runners[name] = make()
    return runners[name]
