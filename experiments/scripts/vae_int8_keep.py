"""Experiment (issue 34, --int8-vae): the SD1.5-size VAE decoder's fp32 IR quantized by NNCF with some layers kept
fp32; time and PSNR against fp32 (log: experiments/logs/vae-int8-keep.txt).

    python experiments/scripts/vae_int8_keep.py MODEL_XML "PATTERN,PATTERN"

MODEL_XML: the openvino backend's cached fp32 decoder (``~/.cache/stable_diffusion/openvino/ov*/vae-decoder-*-fp32-*``).
"""

from __future__ import annotations

import logging
import sys
import time

import nncf
import numpy as np
import openvino as ov

CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 2}


def timed(core: ov.Core, model: ov.Model, latent: np.ndarray) -> tuple[np.ndarray, float]:
    """(output, best of 2 timed runs after a warm-up)."""
    model.reshape({model.inputs[0]: list(latent.shape)})
    compiled = core.compile_model(model, "CPU", CONFIG)
    compiled([latent])
    times = []
    for _ in range(2):
        start = time.time()
        out = compiled([latent])[0]
        times.append(time.time() - start)
    return out, min(times)


def main() -> None:
    nncf.set_log_level(logging.ERROR)
    xml = sys.argv[1]
    keep = sys.argv[2].split(",") if len(sys.argv) > 2 and sys.argv[2] else []
    core = ov.Core()
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((1, 4, 64, 64)).astype(np.float32) for _ in range(4)]
    test = rng.standard_normal((1, 4, 64, 64)).astype(np.float32)
    model = core.read_model(xml)
    start = time.time()
    port = model.inputs[0].get_any_name()
    quantized = nncf.quantize(model, nncf.Dataset([{port: c} for c in calibration]), subset_size=4,
                              fast_bias_correction=True, preset=nncf.QuantizationPreset.MIXED,
                              ignored_scope=nncf.IgnoredScope(patterns=keep, validate=False))
    print("quantize s", time.time() - start)
    exact, exact_s = timed(core, core.read_model(xml), test)
    approx, approx_s = timed(core, quantized, test)

    def pixels(x: np.ndarray) -> np.ndarray:
        return np.clip((x + 1) * 127.5, 0, 255).round()
    mse = ((pixels(exact) - pixels(approx)) ** 2).mean()
    print(f"fp32 {exact_s:.2f} s, int8 {approx_s:.2f} s, ratio {approx_s / exact_s:.2f}, "
          f"PSNR {10 * np.log10(255**2 / mse):.1f} dB, out range {exact.min():.2f}..{exact.max():.2f}")


if __name__ == "__main__":
    main()
