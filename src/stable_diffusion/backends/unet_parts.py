"""The openvino backend on a UNet and VAE: the runners that replace ``unet.forward`` and ``vae.decode``, DeepCache's
two parts (models/deepcache.py) as compiled components, and, with int8, the quantized variants of each, calibrated
on recorded sampling inputs (for DeepCache's shallow part, with the deep feature that the fp32 deep part computes
for each recorded input)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .int8 import TAG, VAE_KEEP_FP32, VAE_TAG, quantizer, record_decodes, record_inputs
from .openvino import OpenVINOComponent


def _unet_shape_class(levels: int):
    """The UNet's traced graph holds for latent sides its levels divide (else it traces a resize for that size)."""
    def shape_class(inputs) -> str:
        h, w = inputs[0].shape[-2:]
        return "any" if h % 2**levels == 0 and w % 2**levels == 0 else f"{h}x{w}"
    return shape_class


def _timesteps(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    return (timesteps.expand(x.shape[0]) if timesteps.dim() == 0 else timesteps).float()


def _deepcache_parts(unet: nn.Module, make_component):
    """DeepCache's two parts of the UNet (models/deepcache.py) as compiled components, per branch."""
    parts: dict[int, tuple] = {}

    def for_branch(branch: int) -> tuple:
        if branch not in parts:
            def deep_eager(x, t, context, *y):
                return unet.forward_deep(x, t, context, y[0] if y else None, branch=branch)

            def shallow_eager(x, t, context, feature, *y):
                return unet.forward_shallow(x, t, context, feature, y[0] if y else None, branch=branch)

            deep_part = make_component(deep_eager, f"unet-deep{branch}", "deep", branch)
            shallow_part = make_component(shallow_eager, f"unet-shallow{branch}", "shallow", branch)

            def deep(x, timesteps, context, y):
                out, feature = deep_part(x, _timesteps(x, timesteps), context, *([] if y is None else [y]))
                return out.to(unet.dtype), feature

            def shallow(x, timesteps, context, feature, y):
                return shallow_part(x, _timesteps(x, timesteps), context, feature,
                                    *([] if y is None else [y])).to(unet.dtype)
            parts[branch] = (deep, shallow)
        return parts[branch]
    return for_branch


def _unet_runner(unet: nn.Module, eager, component):
    def forward(x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, control: Any = None, **kwargs: Any) -> torch.Tensor:
        if control is not None or kwargs or context is None:
            return eager(x, timesteps, context, y, control=control, **kwargs)
        t = _timesteps(x, timesteps)
        inputs = (x, t, context) if y is None else (x, t, context, y)
        return component(*inputs).to(unet.dtype)
    return forward


def install_openvino(unet: nn.Module, vae: nn.Module, installed: Callable, int8: bool,
                     calibrate: Callable[[], Any] | None, release: Callable[[torch.Tensor], Any] | None = None,
                     int8_vae: bool = False) -> None:
    """Set ``unet.forward``, ``unet.deepcache_parts`` and ``vae.decode`` to OpenVINO runners (``installed(module,
    key, make)`` keeps each made runner on its module); ``int8``: the UNet's runners quantized; ``int8_vae``: the
    VAE decoder's; ``release(tensor)`` on the torch weights (their pages) once read for the cache key and after
    each compile."""
    component = functools.partial(OpenVINOComponent, release=release)
    eager, decode = unet.forward, vae.decode
    shape_class = _unet_shape_class(len(unet.config.channel_mult) - 1)
    made: dict[str, OpenVINOComponent] = installed(unet, "openvino-components", dict)  # fp32, by part name

    def fp32_component(fn, part: str, kind: str = "", branch: int = 0) -> OpenVINOComponent:
        made[part] = component(unet, fn, part, shape_class)
        return made[part]

    fp32 = installed(unet, "openvino", lambda: _unet_runner(unet, eager, fp32_component(eager, "unet")))
    fp32_parts = installed(unet, "openvino-deepcache", lambda: _deepcache_parts(unet, fp32_component))
    unet.forward, unet.deepcache_parts = fp32, fp32_parts
    fp32_decode = installed(vae, "openvino", lambda: component(vae, decode, "vae-decoder"))
    vae.decode = fp32_decode
    recorded: dict[str, list] = {}

    def record() -> None:
        """The UNet's and the decoder's inputs in ``calibrate()``'s generations, run in fp32 (recorded once)."""
        if not recorded:
            current = unet.forward, vae.decode
            unet.forward, vae.decode = fp32, fp32_decode
            try:
                decodes: list = []
                unet_inputs = record_inputs(unet, lambda: decodes.extend(
                    record_decodes(vae, calibrate or (lambda: None))))
                recorded.update(unet=unet_inputs, vae=decodes)
            finally:
                unet.forward, vae.decode = current

    def samples() -> list:
        record()
        return recorded["unet"]

    def decoder_samples() -> list:
        record()
        return recorded["vae"]

    if int8_vae:
        vae.decode = installed(vae, "openvino-int8", lambda: component(
            vae, decode, "vae-decoder", transform=quantizer(decoder_samples, VAE_KEEP_FP32, transformer=False),
            tag=VAE_TAG, source=fp32_decode))
    if not int8:
        return

    def with_features(branch: int) -> Callable[[], list]:
        """Calibration inputs of DeepCache's shallow part: each recorded input with its deep feature."""
        def make() -> list:
            deep, _ = fp32_parts(branch)
            out = []
            for sample in samples():
                x, t, context, *y = (torch.from_numpy(a) for a in sample)
                _, feature = deep(x, t, context, y[0] if y else None)
                out.append((*sample[:3], feature.float().numpy(), *sample[3:]))
            return out
        return make

    def int8_part(fn, part: str, kind: str, branch: int) -> OpenVINOComponent:
        fp32_parts(branch)  # the fp32 parts exist: their IR is what gets quantized
        data = with_features(branch) if kind == "shallow" else samples
        return component(unet, fn, part, shape_class, transform=quantizer(data), tag=TAG, source=made[part])

    unet.forward = installed(unet, "openvino-int8", lambda: _unet_runner(unet, eager, component(
        unet, eager, "unet", shape_class, transform=quantizer(samples), tag=TAG, source=made["unet"])))
    unet.deepcache_parts = installed(unet, "openvino-int8-deepcache", lambda: _deepcache_parts(unet, int8_part))
