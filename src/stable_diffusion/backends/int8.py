"""The int8 fast lever (``--int8``, on the openvino backend): the UNet's convolutions and linears in int8 weights
and activations, by NNCF post-training quantization (Nagel et al. 2021, "A White Paper on Neural Network
Quantization": min-max ranges from calibration data, per-channel weights, fast bias correction; SmoothQuant for the
transformer MatMuls, Xiao et al. 2023), run on the CPU's VNNI int8 units.

Calibration data are the UNet's inputs (latents, timesteps, contexts) of real sampling runs: ``record_inputs``
captures them while the caller generates a few images with the fp32 backend. The layers kept in fp32
(``KEEP_FP32``) are the ones whose quantization hurt the built-in model's adherence most, measured one group at a
time (experiments/scripts/int8_keep_sweep.py, experiments/README.md): the timestep embedding MLP and each residual
block's timestep projection, the first and the last convolution, and cross-attention (where the prompt enters);
the convolutions, self-attention and the feed-forward layers, most of the arithmetic, run in int8 (keeping
self-attention too gained a point on the built-in model and cost a third more time on SD1.5's). The quantized IR
is cached like the fp32 one (tag ``int8-...``, which names the recipe); when the weights change (a LoRA merged for
a generation), the same calibration inputs quantize the new weights.

``--int8-vae`` quantizes the VAE decoder the same way, calibrated on the latents that the same generations decode
(``VAE_KEEP_FP32``: its first and last convolutions stay fp32). On SD1.5's decoder at 512 px it runs in a fifth of
the fp32 time (experiments/README.md, int8 VAE decoder).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

logger = logging.getLogger(__name__)
KEEP_FP32 = (  # OpenVINO node-name patterns
    r".*time_embed.*", r".*input_blocks\.0\.0.*", r".*owner\.out\..*",
    r".*emb_layers.*", r".*attn2.*",
)
CALIBRATION_PROMPTS = (
    "a photo of a cat sitting on a sofa, detailed",
    "a small red circle at the top left on a white background",
    "a landscape painting of mountains at sunset",
    "a blue square on the left and a yellow star on the right on a black background",
)
CALIBRATION_STEPS = 4  # 4 prompts x 4 steps: 16 inputs (each a CFG batch); NNCF passes over them twice
RECIPE = hashlib.sha256(repr((CALIBRATION_PROMPTS, KEEP_FP32)).encode()).hexdigest()[:6]
TAG = f"int8-c{len(CALIBRATION_PROMPTS)}x{CALIBRATION_STEPS}-{RECIPE}"  # in the cache key: another recipe, another model
VAE_KEEP_FP32 = (r".*post_quant_conv.*", r".*decoder\.conv_in.*", r".*decoder\.conv_out.*")
VAE_RECIPE = hashlib.sha256(repr((CALIBRATION_PROMPTS, VAE_KEEP_FP32)).encode()).hexdigest()[:6]
VAE_TAG = f"int8-c{len(CALIBRATION_PROMPTS)}-{VAE_RECIPE}"


def nncf_available() -> bool:
    try:
        import nncf  # noqa: F401
    except Exception:  # noqa: BLE001 - any broken install counts as absent
        return False
    return True


def record_inputs(unet: nn.Module, run: Callable[[], Any]) -> list[tuple[np.ndarray, ...]]:
    """The (x, t, context[, y]) of every UNet call while ``run()`` generates, as float32 arrays."""
    recorded: list[tuple[np.ndarray, ...]] = []
    forward = unet.forward

    def recording(x, timesteps, context=None, y=None, **kwargs):
        if context is not None and not kwargs.get("control"):
            t = timesteps.expand(x.shape[0]) if timesteps.dim() == 0 else timesteps
            recorded.append(tuple(a.detach().float().numpy().copy() for a in (x, t, context, y) if a is not None))
        return forward(x, timesteps, context, y, **kwargs)

    unet.forward = recording
    try:
        run()
    finally:
        unet.forward = forward
    return recorded


def record_decodes(vae: nn.Module, run: Callable[[], Any]) -> list[tuple[np.ndarray]]:
    """The latents ``vae.decode`` receives while ``run()`` generates, as float32 arrays."""
    recorded: list[tuple[np.ndarray]] = []
    decode = vae.decode

    def recording(z, *args, **kwargs):
        recorded.append((z.detach().float().numpy().copy(),))
        return decode(z, *args, **kwargs)

    vae.decode = recording
    try:
        run()
    finally:
        vae.decode = decode
    return recorded


def quantizer(samples: Callable[[], list[tuple[np.ndarray, ...]]], keep: tuple[str, ...] = KEEP_FP32,
              transformer: bool = True) -> Callable:
    """The transform an OpenVINOComponent applies to a converted fp32 network (the UNet, or the VAE decoder with
    ``VAE_KEEP_FP32`` and ``transformer=False``): NNCF post-training int8 quantization over ``samples()`` (called
    once, when a quantized model is first made), the node patterns ``keep`` left in fp32."""
    cached: list = []

    def transform(model, component, inputs):
        import nncf

        # its INFO lines list every ignored node; the logger's level only (nncf.set_log_level also sets the level of
        # every handler on its logger, which may be handlers it shares with the application's root logger)
        logging.getLogger(nncf.common.logging.logger.NNCF_LOGGER_NAME).setLevel(logging.ERROR)
        if not cached:
            cached.extend(samples())
        logger.warning("int8: quantizing the %s with NNCF over %d calibration inputs (once per weights)",
                       component.name, len(cached))
        ports = [p.get_any_name() for p in model.inputs]
        dataset = nncf.Dataset([dict(zip(ports, sample)) for sample in cached])
        return nncf.quantize(model, dataset, subset_size=len(cached),
                             model_type=nncf.ModelType.TRANSFORMER if transformer else None,
                             fast_bias_correction=True, preset=nncf.QuantizationPreset.MIXED,
                             ignored_scope=nncf.IgnoredScope(patterns=list(keep), validate=False))
    return transform


def calibration_run(pipe: Any) -> Callable[[], None]:
    """A few short generations at the model's native size (``pipe`` a Pipeline; Euler a, CFG 7), DeepCache off
    (every call a whole UNet pass, recorded)."""
    def run() -> None:
        size = pipe.config.image_size
        deepcache, pipe.deepcache = pipe.deepcache, None
        try:
            for i, prompt in enumerate(CALIBRATION_PROMPTS):
                pipe.txt2img(prompt, steps=CALIBRATION_STEPS, cfg_scale=7.0, sampler="Euler a", seed=1000 + i,
                             width=size, height=size)
        finally:
            pipe.deepcache = deepcache
    return run
