"""Half precision at run time: the networks run in fp16 or bf16 while latents and sampler state stay fp32; whole
images of the built-in model stay within 30 dB PSNR of fp32; a half-precision VAE that overflows decodes again
in fp32 and says so once (A1111's --no-half-vae fallback)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from stable_diffusion import load_pipeline
from stable_diffusion.cli import main

from .helpers import psnr

PROMPTS = ["a small red circle at the top left on a white background",
           "a blue square on the left and a yellow star on the right on a black background"]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_builtin_model_in_half_precision_is_within_30_db_of_fp32(builtin, dtype):
    half = load_pipeline(dtype=dtype)
    assert half.unet.dtype == half.vae.dtype == half.text_encoder.dtype == {"bf16": torch.bfloat16,
                                                                            "fp16": torch.float16}[dtype]
    exact = builtin.txt2img(PROMPTS, seed=4, steps=20)
    images = half.txt2img(PROMPTS, seed=4, steps=20)
    assert all(psnr(a, b) >= 30 for a, b in zip(exact, images)), [psnr(a, b) for a, b in zip(exact, images)]
    again = half.img2img(exact[0], PROMPTS[0], denoising_strength=0.5, seed=5)[0]  # the VAE encoder in half too
    assert psnr(again, builtin.img2img(exact[0], PROMPTS[0], denoising_strength=0.5, seed=5)[0]) >= 30


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd2-v", "tiny-sd1-inpaint"])
def test_every_family_runs_in_half_precision(name):
    for dtype in ("bf16", "fp16"):
        image = load_pipeline(name, dtype=dtype).txt2img("a cat", steps=2, seed=0)[0]
        assert image.size == (64, 64) and np.asarray(image).std() > 0


def test_an_overflowing_half_vae_decodes_again_in_fp32_and_says_so(caplog):
    pipe = load_pipeline("tiny-sd1", dtype="fp16")
    with torch.no_grad():
        pipe.vae.post_quant_conv.weight.mul_(3e4)  # fp16 tops out at 65504: the decoder's activations overflow
        latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
        assert not torch.isfinite(pipe.vae.decode(latents)).all()
    with caplog.at_level(logging.WARNING):
        images = pipe.txt2img("a cat", steps=1, seed=0, batch_size=1, n_iter=2)
    assert len(images) == 2 and pipe.vae.dtype == torch.float16  # put back after the fp32 decode
    assert caplog.text.count("decoding in fp32 instead") == 1  # said once


def test_cli_dtype_flag(tmp_path):
    assert main(["txt2img", "a cat", "--model", "tiny-sd1", "--dtype", "bf16", "--steps", "2", "--seed", "1",
                 "--out", str(tmp_path)]) == 0
    assert Image.open(tmp_path / "00000-1.png").size == (64, 64)
