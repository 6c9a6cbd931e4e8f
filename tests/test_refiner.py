"""SDXL's refiner: the family (OpenCLIP-G only, y with an aesthetic score) against diffusers'
StableDiffusionXLImg2ImgPipeline, and A1111's base-then-refiner switch against diffusers' ensemble of expert
denoisers (base with ``denoising_end``, refiner with ``denoising_start``), prompt to pixels, on tiny random
weights. With integer timesteps (Euler on the uniform schedule, 10 steps) A1111's switch rule, "(999 - t) / 1000
>= switch_at", and diffusers' cutoff, "t < 1000 - 1000 * denoising_end", pick the same step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stable_diffusion import load_pipeline
from stable_diffusion.generate import generate, initial_noise
from stable_diffusion.infotext import parse_infotext
from stable_diffusion.request import GenerationRequest

from .oracle import build_diffusers_pipeline, save

STEPS, SEED, PROMPT, NEGATIVE = 10, 3, "a red cat sitting on a blue chair", "blurry, low quality"
EULER = dict(steps=STEPS, cfg_scale=7.0, sampler="Euler", scheduler="uniform", seed=SEED)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def _within_one_level(ours: Image.Image, theirs: Image.Image) -> None:
    diff = np.abs(_pixels(ours) - _pixels(theirs))
    assert diff.max() <= 1, f"max difference {diff.max()} levels, mean {diff.mean():.3f}"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(diffusers base, diffusers refiner, our base, our refiner); the two share one VAE, as SDXL's do."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    base = build_diffusers_pipeline("sdxl", seed=0)
    refiner = build_diffusers_pipeline("sdxl-refiner", seed=1)
    refiner = StableDiffusionXLImg2ImgPipeline(**{**refiner.components, "vae": base.vae},
                                               requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("xl")
    ours_base, ours_refiner = load_pipeline(save(base, folder / "base")), load_pipeline(save(refiner, folder / "ref"))
    return base, refiner, ours_base, ours_refiner


def _mean_latents(monkeypatch) -> None:
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as xl_img2img

    monkeypatch.setattr(xl_img2img, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())


def test_refiner_family_is_detected_from_diffusers_folder_and_single_file(pair, tmp_path):
    ours = pair[3]
    assert ours.config.family == "sdxl-refiner" and ours.config.is_refiner
    assert [tc.layout for tc in ours.config.text_encoders] == ["openclip"]
    ours.save(tmp_path / "refiner.safetensors")  # conditioner.embedders.0.model.*, as sd_xl_refiner_1.0
    again = load_pipeline(tmp_path / "refiner.safetensors")
    assert again.config.family == "sdxl-refiner" and again.config.size_embed_dim == ours.config.size_embed_dim
    # full-size refiner keys: tests/test_checkpoints.py detects the preset from them


@torch.no_grad()
def test_refiner_img2img_matches_diffusers(pair, monkeypatch):
    """The refiner alone: OpenCLIP-G's penultimate layer, pooled text + (h, w, 0, 0, 6.0) / (..., 2.5)."""
    _, theirs, _, ours = pair
    _mean_latents(monkeypatch)
    init = Image.fromarray(np.random.default_rng(7).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    image = ours.img2img(init, PROMPT, denoising_strength=0.5, negative_prompt=NEGATIVE, **EULER)[0]
    reference = theirs(prompt=PROMPT, negative_prompt=NEGATIVE, image=init, strength=0.6, num_inference_steps=STEPS,
                       guidance_scale=7.0, generator=torch.Generator().manual_seed(SEED)).images[0]
    _within_one_level(image, reference)


@torch.no_grad()
def test_base_then_refiner_matches_diffusers_ensemble_of_experts(pair):
    base, refiner, ours, ours_refiner = pair
    result = generate(ours, GenerationRequest(PROMPT, negative_prompt=NEGATIVE, width=64, height=64,
                                              refiner_switch_at=0.5, **EULER), refiner=ours_refiner)
    from stable_diffusion.diffusion.denoiser import Denoiser
    from stable_diffusion.diffusion.schedules import make_sigmas

    sigma_max = make_sigmas("uniform", STEPS, Denoiser.from_config(ours.unet, ours.config).schedule)[0]
    size = 64 // ours.vae.downscale
    noise, _ = initial_noise([SEED], (4, size, size))
    latents = base(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.0,
                   denoising_end=0.5, output_type="latent", height=64, width=64,
                   latents=noise * sigma_max / (sigma_max**2 + 1) ** 0.5).images
    reference = refiner(prompt=PROMPT, negative_prompt=NEGATIVE, image=latents, num_inference_steps=STEPS,
                        guidance_scale=7.0, denoising_start=0.5).images[0]
    _within_one_level(result.images[0], reference)
    params = parse_infotext(result.infotexts[0])
    assert params["Refiner"] == ours_refiner.config.name and params["Refiner switch at"] == "0.5"
    # the refiner changed the image: the base alone differs by more than the parity tolerance
    alone = generate(ours, GenerationRequest(PROMPT, negative_prompt=NEGATIVE, width=64, height=64, **EULER))
    assert np.abs(_pixels(alone.images[0]) - _pixels(result.images[0])).max() > 3


@torch.no_grad()
def test_switch_at_one_never_refines_and_zero_refines_throughout(pair):
    _, _, ours, ours_refiner = pair
    request = GenerationRequest(PROMPT, negative_prompt=NEGATIVE, width=64, height=64, **EULER)
    alone = generate(ours, request)
    never = generate(ours, GenerationRequest(**{**vars(request), "refiner_switch_at": 1.0}), refiner=ours_refiner)
    assert np.array_equal(_pixels(never.images[0]), _pixels(alone.images[0]))
    assert "Refiner" not in parse_infotext(never.infotexts[0])
    # switch at 0: the refiner from the first step is the refiner's own txt2img from the same noise
    always = generate(ours, GenerationRequest(**{**vars(request), "refiner_switch_at": 0.0}), refiner=ours_refiner)
    own = generate(ours_refiner, request)
    assert np.abs(_pixels(always.images[0]) - _pixels(own.images[0])).max() <= 1


def test_a_refiner_from_another_latent_space_is_refused(pair):
    ours = pair[2]
    sd1 = load_pipeline("tiny-sd1-inpaint")
    with pytest.raises(ValueError, match="refiner"):
        generate(ours, GenerationRequest(PROMPT, width=64, height=64, steps=2), refiner=sd1)


@torch.no_grad()
def test_with_the_hires_fix_the_refiner_works_on_the_second_pass(pair):
    from stable_diffusion.hires import HiresFix

    _, _, ours, ours_refiner = pair
    request = GenerationRequest(PROMPT, negative_prompt=NEGATIVE, width=64, height=64, hires=HiresFix(scale=1.5),
                                refiner_switch_at=0.0, **{**EULER, "steps": 4})
    untouched = GenerationRequest(**{**vars(request), "denoising_strength": 0.0})  # no second pass: no refiner
    plain = generate(ours, untouched)
    refined = generate(ours, untouched, refiner=ours_refiner)
    assert np.array_equal(_pixels(plain.images[0]), _pixels(refined.images[0]))
    assert "Refiner" not in parse_infotext(refined.infotexts[0])
    second = generate(ours, request, refiner=ours_refiner)
    assert parse_infotext(second.infotexts[0])["Refiner"] == ours_refiner.config.name
    assert second.images[0].size == (96, 96)


def test_cli_refiner(tmp_path):
    from stable_diffusion.cli import main

    out = tmp_path / "out"
    assert main(["txt2img", "a cat", "--model", "tiny-sdxl", "--refiner", "tiny-sdxl-refiner", "--refiner-switch-at",
                 "0.5", "--steps", "4", "--seed", "1", "--out", str(out)]) in (None, 0)
    text = Image.open(next(out.glob("*.png"))).text["parameters"]
    assert "Refiner: tiny-sdxl-refiner, Refiner switch at: 0.5" in text
