"""A1111's hires fix: target sizes, the second pass's schedule and steps, latent and image upscalers, infotext,
interrupts, the CLI and the HTTP API (the live webuiapi client is in tests/test_server_live.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from PIL import Image

from stable_diffusion import GenerationRequest, generate
from stable_diffusion.cli import main
from stable_diffusion.diffusion.denoiser import Denoiser
from stable_diffusion.diffusion.samplers import sampling_sigmas
from stable_diffusion.generate import StopSampling, decode_latents
from stable_diffusion.hires import HiresFix
from stable_diffusion.images import read_infotext, to_batch
from stable_diffusion.infotext import parse_infotext
from stable_diffusion.server.app import create_app
from stable_diffusion.server.registry import ModelRegistry

from .helpers import pixels

BASE = {"prompt": "a red circle", "steps": 4, "seed": 5, "sampler": "Euler", "width": 64, "height": 64}


def test_target_sizes_follow_a1111():
    assert HiresFix(scale=2).target(512, 768) == (1024, 1536, 0, 0)
    assert HiresFix(scale=1.5).target(512, 512) == (768, 768, 0, 0)
    assert HiresFix(resize_x=1024).target(512, 768) == (1024, 1536, 0, 0)  # the other side keeps the aspect
    assert HiresFix(resize_y=1000).target(512, 768) == (666, 1000, 0, 0)
    # both sides: upscale to cover, then cut whole latent cells (A1111's truncate_x / _y)
    assert HiresFix(resize_x=1024, resize_y=600).target(512, 512) == (1024, 1024, 0, 53)
    assert HiresFix(resize_x=1024, resize_y=600).final_size(512, 512) == (1024, 600)
    assert HiresFix(resize_x=120, resize_y=100).final_size(64, 64, factor=4) == (120, 100)
    with pytest.raises(ValueError, match="hr_scale"):
        HiresFix(scale=0).check(64, 64)


def _first_pass_latents(pipe, request: GenerationRequest) -> torch.Tensor:
    seen = []

    def keep(info):
        seen.append(info["denoised"])
        if len(seen) == request.steps:
            raise StopSampling(info["denoised"])

    generate(pipe, request, keep)  # stops at the last step: its x0 is the first pass's result
    return seen[-1]


def test_latent_hires_with_no_denoising_is_the_interpolated_first_pass(sd1):
    first = _first_pass_latents(sd1, GenerationRequest(**BASE))
    request = GenerationRequest(**BASE, denoising_strength=0.0, hires=HiresFix(scale=2, upscaler="Latent (nearest)"))
    result = generate(sd1, request)
    expected = decode_latents(sd1, F.interpolate(first, scale_factor=2, mode="nearest"))[0]
    assert result.images[0].size == (128, 128)
    assert np.abs(pixels(result.images[0]) - pixels(expected)).max() <= 1


def test_image_upscaler_hires_encodes_the_upscaled_pixels(sd1):
    plain = generate(sd1, GenerationRequest(**BASE)).images[0]
    request = GenerationRequest(**BASE, denoising_strength=0.0, hires=HiresFix(scale=2, upscaler="Nearest"))
    upscaled = plain.resize((128, 128), Image.Resampling.NEAREST)
    with torch.inference_mode():
        latents = sd1.vae.encode(to_batch(upscaled, 128, 128)).mean * sd1.config.vae.scaling_factor
    expected = decode_latents(sd1, latents)[0]
    assert np.abs(pixels(generate(sd1, request).images[0]) - pixels(expected)).max() <= 1


def test_the_second_pass_runs_a1111s_steps_of_a_stretched_schedule(sd1):
    sigmas = []
    request = GenerationRequest(**BASE, denoising_strength=0.5,
                                hires=HiresFix(scale=1.5, steps=3, sampler="DPM++ 2M", scheduler="karras"))
    result = generate(sd1, request, lambda info: sigmas.append(float(info["sigma"])))
    assert len(sigmas) == 4 + 3 and result.images[0].size == (96, 96)
    schedule = Denoiser.from_config(sd1.unet, sd1.config).schedule
    stretched = sampling_sigmas("DPM++ 2M", "karras", 6, schedule)  # int(3 / 0.5) steps, the last 3 run
    assert sigmas[4:] == pytest.approx(stretched[3:6].tolist(), rel=1e-5)
    assert request.progress_steps() == 7
    params = parse_infotext(result.infotexts[0])
    assert params["Size-1"] == "64" and params["Denoising strength"] == "0.5"
    assert params["Hires upscale"] == "1.5" and params["Hires steps"] == "3"
    assert params["Hires sampler"] == "DPM++ 2M" and params["Hires schedule type"] == "Karras"
    assert "Hires upscaler" not in params  # A1111 writes it only when one was named


def test_hires_prompt_cfg_and_an_interrupted_first_pass(sd1, builtin):
    hires = HiresFix(scale=2, prompt="a big blue square on a black background", negative_prompt="red", cfg_scale=3.0)
    request = {**BASE, "prompt": "a small red circle on a white background", "denoising_strength": 0.9}
    result = generate(builtin, GenerationRequest(**request, hires=hires))
    params = parse_infotext(result.infotexts[0])
    assert params["Hires prompt"] == hires.prompt and params["Hires negative prompt"] == "red"
    assert params["Hires CFG Scale"] == "3.0"
    same = generate(builtin, GenerationRequest(**request, hires=HiresFix(scale=2)))
    assert np.abs(pixels(result.images[0]) - pixels(same.images[0])).mean() > 10  # the hires prompt is used

    def stop(info):
        if info["i"] == 1:
            raise StopSampling(info["denoised"])

    stopped = generate(sd1, GenerationRequest(**BASE, hires=HiresFix(scale=2)), stop)
    assert stopped.images[0].size == (64, 64)  # as A1111: an interrupted first pass is the result
    with pytest.raises(ValueError, match="unknown upscaler"):
        generate(sd1, GenerationRequest(**BASE, hires=HiresFix(upscaler="4x-Nothing")))
    with pytest.raises(ValueError, match="img2img"):
        generate(sd1, GenerationRequest(**BASE, init_image=result.images[0], hires=HiresFix()))


def test_hires_on_sdxl_and_a_9_channel_model():
    from stable_diffusion import load_pipeline

    for name in ("tiny-sdxl", "tiny-sd1-inpaint"):
        image = load_pipeline(name).txt2img("a cat", steps=2, seed=1, width=64, height=64,
                                            hires=HiresFix(scale=1.5, upscaler="Lanczos"))[0]
        assert image.size == (96, 96)


def test_cli_hires(tmp_path):
    out = tmp_path / "out"
    assert main(["txt2img", "a cat", "--model", "tiny-sd1", "--steps", "2", "--seed", "1", "--out", str(out),
                 "--hires", "2", "--hires-upscaler", "Latent (bicubic antialiased)", "--hires-steps", "2",
                 "--strength", "0.6"]) == 0
    path = next(out.iterdir())
    params = parse_infotext(read_infotext(path))
    assert Image.open(path).size == (128, 128) and params["Hires upscaler"] == "Latent (bicubic antialiased)"
    assert params["Denoising strength"] == "0.6"


def test_api_hires_fields(models_dir):
    with TestClient(create_app(ModelRegistry(models_dir, default="tiny"))) as client:
        body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 2, "enable_hr": True,
                "hr_scale": 2, "hr_upscaler": "Lanczos", "hr_second_pass_steps": 2, "denoising_strength": 0.5,
                "hr_sampler_name": "Use same sampler", "hr_scheduler": "Use same scheduler"}
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200
        info = json.loads(r.json()["info"])
        assert info["denoising_strength"] == 0.5 and "Hires upscaler: Lanczos" in info["infotexts"][0]
        from .test_server import decode

        assert decode(r.json()["images"][0]).size == (128, 128)
        r = client.post("/sdapi/v1/txt2img", json={**body, "hr_resize_x": 96, "hr_resize_y": 80})
        assert decode(r.json()["images"][0]).size == (96, 80)
        r = client.post("/sdapi/v1/txt2img", json={**body, "firstphase_width": 32, "firstphase_height": 32})
        assert decode(r.json()["images"][0]).size == (64, 64)
        r = client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "ESRGAN_4x"})
        assert r.status_code == 422 and "ESRGAN_4x" in r.json()["detail"]
        r = client.post("/sdapi/v1/txt2img", json={**body, "hr_scale": 16, "width": 512, "height": 512})
        assert r.status_code == 422 and "limit" in r.json()["detail"]
