"""Switching CFG off for part of sampling, as A1111's NGMS (``s_min_uncond``, ``s_min_uncond_all``) and Skip
Early CFG (``skip_early_cond``) do: which model calls skip, that a skipped call is the conditional prediction
alone at half the batch, and the request, infotext, CLI and API that carry it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from stable_diffusion import GenerationRequest, generate
from stable_diffusion.cli import main
from stable_diffusion.diffusion.denoiser import CFGDenoiser, GuidanceSkip
from stable_diffusion.images import read_infotext
from stable_diffusion.infotext import parse_infotext

from .helpers import pixels


class Recorder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.skipped: list[bool] = []

    def forward(self, x, sigma, skip_uncond=False):
        self.skipped.append(skip_uncond)
        return x


def skips(sigmas: list[float], **kwargs) -> list[bool]:
    recorder = Recorder()
    model = GuidanceSkip(recorder, steps=len(sigmas), **kwargs)
    for sigma in sigmas:
        model(torch.zeros(1), torch.tensor(sigma))
    return recorder.skipped


def test_which_calls_skip_guidance():
    sigmas = [14.0, 8.0, 4.0, 2.0, 1.0, 0.5]
    assert skips(sigmas) == [False] * 6
    # NGMS: below the sigma, on odd calls (A1111 counts calls from 0), or on all with s_min_uncond_all
    assert skips(sigmas, s_min_uncond=3.0) == [False, False, False, True, False, True]
    assert skips(sigmas, s_min_uncond=3.0, all_steps=True) == [False, False, False, True, True, True]
    assert skips(sigmas, all_steps=True) == [False] * 6  # s_min_uncond 0 is off
    # Skip Early CFG: calls / steps <= the fraction
    assert skips(sigmas, skip_early=0.34) == [True, True, True, False, False, False]
    assert skips(sigmas, skip_early=0.34, s_min_uncond=1.5, all_steps=True) == [True, True, True, False, True, True]


def test_a_skipped_call_is_the_conditional_prediction_alone_in_one_half_batch():
    batches = []

    def denoiser(x, sigma, context, y):
        batches.append(x.shape[0])
        return x * 0 + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)

    cfg = CFGDenoiser(denoiser, torch.ones(1, 3, 2), torch.zeros(1, 3, 2), scale=7.5)
    x, sigma = torch.randn(1, 4, 2, 2), torch.tensor(1.0)
    assert torch.allclose(cfg(x, sigma), torch.full_like(x, 7.5))
    assert torch.allclose(cfg(x, sigma, skip_uncond=True), torch.ones_like(x))
    assert batches == [2, 1]


def test_guidance_off_everywhere_is_cfg_1_and_the_infotext_says_so(sd1):
    common = {"prompt": "a cat", "steps": 4, "seed": 3, "sampler": "Euler"}
    guided = generate(sd1, GenerationRequest(**common)).images[0]
    plain = generate(sd1, GenerationRequest(**common, cfg_scale=1.0)).images[0]
    batch_sizes = []
    hook = sd1.unet.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    try:
        off = generate(sd1, GenerationRequest(**common, s_min_uncond=1e4, s_min_uncond_all=True))
    finally:
        hook.remove()
    assert np.array_equal(pixels(off.images[0]), pixels(plain)) and batch_sizes == [1] * 4
    assert not np.array_equal(pixels(guided), pixels(plain))
    params = parse_infotext(off.infotexts[0])
    assert params["NGMS"] == "10000.0" and params["NGMS all steps"] == "True"
    half = generate(sd1, GenerationRequest(**common, s_min_uncond=1e4))  # every other step guided
    assert not np.array_equal(pixels(half.images[0]), pixels(plain))
    assert "NGMS all steps" not in parse_infotext(half.infotexts[0])
    early = generate(sd1, GenerationRequest(**common, skip_early_cond=1.0))
    assert np.array_equal(pixels(early.images[0]), pixels(plain))
    assert parse_infotext(early.infotexts[0])["Skip Early CFG"] == "1.0"
    assert "NGMS" not in parse_infotext(generate(sd1, GenerationRequest(**common)).infotexts[0])


def test_bad_values_fail_before_work(sd1):
    with pytest.raises(ValueError, match="s_min_uncond"):
        sd1.txt2img("x", s_min_uncond=-1.0)
    with pytest.raises(ValueError, match="skip_early_cond"):
        sd1.txt2img("x", skip_early_cond=1.5)


def test_cli_flags(tmp_path):
    out = tmp_path / "out"
    assert main(["txt2img", "a cat", "--model", "tiny-sd1", "--steps", "2", "--seed", "1", "--ngms", "2.5",
                 "--ngms-all-steps", "--skip-early-cfg", "0.25", "--out", str(out)]) == 0
    params = parse_infotext(read_infotext(out / "00000-1.png"))
    assert (params["NGMS"], params["NGMS all steps"], params["Skip Early CFG"]) == ("2.5", "True", "0.25")


def test_api_field_and_override_settings(tmp_path):
    from stable_diffusion.models.configs import preset
    from stable_diffusion.pipeline import Pipeline
    from stable_diffusion.server.app import create_app
    from stable_diffusion.server.registry import ModelRegistry

    (tmp_path / "Stable-diffusion").mkdir()
    Pipeline.from_config(preset("tiny-sd1"), seed=0).save(tmp_path / "Stable-diffusion" / "tiny.safetensors")
    app = create_app(ModelRegistry(tmp_path, default="tiny"), outputs=tmp_path / "outputs")
    base = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 1}
    with TestClient(app) as client:
        r = client.post("/sdapi/v1/txt2img", json={**base, "s_min_uncond": 1.5,
                                                   "override_settings": {"s_min_uncond_all": True}})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert "NGMS: 1.5, NGMS all steps: True" in info["infotexts"][0]
        assert info["extra_generation_params"] == {"NGMS": 1.5, "NGMS all steps": True}
        r = client.post("/sdapi/v1/txt2img", json={**base, "override_settings": {"skip_early_cond": 0.5}})
        assert "Skip Early CFG: 0.5" in json.loads(r.json()["info"])["infotexts"][0]
        for bad, name in (({"s_min_uncond": -2}, "s_min_uncond"),
                          ({"override_settings": {"skip_early_cond": "lots"}}, "skip_early_cond: Input should be"),
                          ({"override_settings": {"s_min_uncond_all": None}}, "s_min_uncond_all: Input should be")):
            r = client.post("/sdapi/v1/txt2img", json={**base, **bad})
            assert r.status_code == 422 and name in r.json()["detail"], r.text
        # server-wide, as A1111's options: listed, settable, checked
        assert client.get("/sdapi/v1/options").json()["s_min_uncond"] == 0.0
        assert client.post("/sdapi/v1/options", json={"s_min_uncond": "high"}).status_code == 422
        assert client.post("/sdapi/v1/options", json={"s_min_uncond": 3.0}).status_code == 200
        r = client.post("/sdapi/v1/txt2img", json=base)
        assert "NGMS: 3.0" in json.loads(r.json()["info"])["infotexts"][0]


@pytest.mark.parametrize("sampler", ["Heun", "DPM++ 2M"])
def test_prompt_editing_inpainting_and_second_order_samplers_honour_it(sd1, sampler):
    from PIL import Image

    edit = {"prompt": "a [cat:dog:2]", "steps": 3, "seed": 4, "sampler": sampler}
    off = generate(sd1, GenerationRequest(**edit, s_min_uncond=1e4, s_min_uncond_all=True)).images[0]
    plain = generate(sd1, GenerationRequest(**edit, cfg_scale=1.0)).images[0]
    assert np.array_equal(pixels(off), pixels(plain))
    init, mask = Image.new("RGB", (64, 64), (20, 120, 200)), Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    inpainting = {"init_image": init, "mask": mask, "mask_blur": 0, "inpainting_fill": 1, "denoising_strength": 1.0}
    request = GenerationRequest(prompt="a cat", steps=3, seed=4, sampler=sampler, s_min_uncond=1e4,
                                s_min_uncond_all=True, **inpainting)
    out = pixels(generate(sd1, request).images[0])
    assert np.array_equal(out[:, 40:], pixels(init)[:, 40:])  # outside the mask: kept
    plain = pixels(generate(sd1, GenerationRequest(prompt="a cat", steps=3, seed=4, sampler=sampler, cfg_scale=1.0,
                                                   **inpainting)).images[0])
    assert np.array_equal(out, plain)
