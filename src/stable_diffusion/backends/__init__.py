"""Compiled backends for the networks (``--backend``): ``torch`` (eager, the default) or ``openvino`` (openvino.py,
the optional ``pip install ".[openvino]"``), installed on a loaded UNet and VAE by ``use_backend``.

A backend replaces the instance's ``unet.forward`` and ``vae.decode`` with a runner that keeps the eager function
for what it cannot run; ``use_backend(..., "torch")`` puts the eager ones back. An absent backend gives a
one-line notice and leaves torch in place."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

BACKENDS = ("torch", "openvino")
logger = logging.getLogger(__name__)


def _unet_shape_class(levels: int):
    """The UNet's traced graph holds for latent sides its levels divide (else it traces a resize for that size)."""
    def shape_class(inputs) -> str:
        h, w = inputs[0].shape[-2:]
        return "any" if h % 2**levels == 0 and w % 2**levels == 0 else f"{h}x{w}"
    return shape_class


def _unet_runner(unet: nn.Module, eager, component):
    def forward(x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, control: Any = None, **kwargs: Any) -> torch.Tensor:
        if control is not None or kwargs or context is None:
            return eager(x, timesteps, context, y, control=control, **kwargs)
        t = timesteps.expand(x.shape[0]) if timesteps.dim() == 0 else timesteps
        inputs = (x, t.float(), context) if y is None else (x, t.float(), context, y)
        return component(*inputs).to(unet.dtype)
    return forward


def use_backend(unet: nn.Module, vae: nn.Module, name: str, device: torch.device) -> str:
    """Run ``unet`` and ``vae.decode`` on backend ``name``; returns the backend in effect (``torch`` when the
    asked one is absent or cannot run on ``device``, with a one-line notice)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    for module, attr in ((unet, "forward"), (vae, "decode")):
        module.__dict__.pop(attr, None)  # back to the class's eager method
    if name == "torch":
        return name
    from .openvino import OpenVINOComponent, openvino_version

    if openvino_version() is None:
        logger.warning("openvino backend: openvino is not installed (pip install \".[openvino]\"); running torch")
        return "torch"
    if device.type != "cpu":
        logger.warning("openvino backend: runs on the CPU, not %s; running torch", device)
        return "torch"
    unet.forward = _installed(unet, name, lambda: _unet_runner(unet, unet.forward, OpenVINOComponent(
        unet, unet.forward, "unet", _unet_shape_class(len(unet.config.channel_mult) - 1))))
    vae.decode = _installed(vae, name, lambda: OpenVINOComponent(vae, vae.decode, "vae-decoder"))
    return name


def _installed(module: nn.Module, name: str, make):
    """The module's runner for backend ``name``, made once and kept on the module (switching back and forth
    compiles nothing again)."""
    runners = module.__dict__.setdefault("_backend_runners", {})
    if name not in runners:
        runners[name] = make()
    return runners[name]
