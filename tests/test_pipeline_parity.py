"""Whole paths, prompt to pixels, against diffusers' own pipelines on the same tiny random weights (a diffusers
folder written by diffusers, read by our loader): txt2img, img2img and inpainting for SD1, SD2 (eps and v) and
SDXL, with the same initial noise, sigmas and prompts; every pixel within 1 level of 255.

Matching the two: A1111's Euler on the "uniform" schedule is diffusers' EulerDiscreteScheduler with linspace
spacing (10 steps, so every timestep is an integer); diffusers scales its initial latents by sqrt(sigma^2 + 1)
where k-diffusion uses sigma, so the noise handed to it is pre-scaled; A1111's img2img runs
``int(strength * steps) + 1`` steps where diffusers runs ``int(strength * steps)``, so diffusers gets strength
0.6 for our 0.5; and diffusers' img2img samples the VAE posterior with the generator where A1111 takes its mean,
so its ``retrieve_latents`` is pointed at the mean. Inpainting: diffusers blends the noised original into x_t
for 4-channel models where A1111 blends x0, a different algorithm, so blended inpainting is compared with the
whole image masked (where both are img2img); 9-channel models are compared directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stable_diffusion import load_pipeline
from stable_diffusion.generate import initial_noise

from .oracle import build_diffusers_pipeline, save

STEPS, SEED, PROMPT, NEGATIVE = 10, 3, "a red cat sitting on a blue chair", "blurry, low quality"
VARIANTS = [("sd1", None), ("sd2", "eps"), ("sd2", "v"), ("sdxl", None)]


def _init_image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(7).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{f}-{p or 'default'}" for f, p in VARIANTS])
def pair(request, tmp_path_factory):
    family, prediction = request.param
    theirs = build_diffusers_pipeline(family, prediction=prediction)
    ours = load_pipeline(save(theirs, tmp_path_factory.mktemp(f"{family}-{prediction}")))
    return family, theirs, ours


def _mean_latents(monkeypatch) -> None:
    """diffusers' img2img / inpainting encoders: take the posterior mean, as A1111 does."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as sd_img2img
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as sd_inpaint
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as xl_img2img
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as xl_inpaint

    def mean(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mode()

    for module in (sd_img2img, sd_inpaint, xl_img2img, xl_inpaint):
        monkeypatch.setattr(module, "retrieve_latents", mean)


def _theirs(pipeline_class, theirs, **kwargs) -> Image.Image:
    pipe = pipeline_class(**theirs.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.0, output_type="pil",
                **kwargs).images[0]


def _assert_within_one_level(ours: Image.Image, theirs: Image.Image) -> None:
    diff = np.abs(_pixels(ours) - _pixels(theirs))
    assert diff.max() <= 1, f"max difference {diff.max()} levels, mean {diff.mean():.3f}"


@torch.no_grad()
def test_txt2img_matches_diffusers(pair):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    family, theirs, ours = pair
    image = ours.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=STEPS,
                         cfg_scale=7.0, sampler="Euler", scheduler="uniform", seed=SEED, width=64, height=64)[0]
    noise, _ = initial_noise([SEED], (4, 64 // ours.vae.downscale, 64 // ours.vae.downscale))
    sigma_max = _sigmas(ours)[0]
    latents = noise * sigma_max / (sigma_max**2 + 1) ** 0.5  # diffusers multiplies by sqrt(sigma^2 + 1)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    _assert_within_one_level(image, _theirs(cls, theirs, latents=latents, height=64, width=64))


def _sigmas(ours) -> torch.Tensor:
    from stable_diffusion.diffusion.denoiser import Denoiser
    from stable_diffusion.diffusion.schedules import make_sigmas

    return make_sigmas("uniform", STEPS, Denoiser.from_config(ours.unet, ours.config).schedule)


@torch.no_grad()
def test_img2img_matches_diffusers(pair, monkeypatch):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    family, theirs, ours = pair
    _mean_latents(monkeypatch)
    init = _init_image()
    image = ours.img2img(init, PROMPT, denoising_strength=0.5, negative_prompt=NEGATIVE,
                         steps=STEPS, cfg_scale=7.0, sampler="Euler", scheduler="uniform", seed=SEED)[0]
    cls = StableDiffusionXLImg2ImgPipeline if family == "sdxl" else StableDiffusionImg2ImgPipeline
    reference = _theirs(cls, theirs, image=init, strength=0.6,
                        generator=torch.Generator().manual_seed(SEED))
    _assert_within_one_level(image, reference)


@torch.no_grad()
def test_blended_inpainting_with_everything_masked_is_img2img(pair, monkeypatch):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    family, theirs, ours = pair
    _mean_latents(monkeypatch)
    init, mask = _init_image(), Image.new("L", (64, 64), 255)
    image = ours.inpaint(init, mask, PROMPT, denoising_strength=0.5,
                         negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=7.0, sampler="Euler", scheduler="uniform",
                         seed=SEED, mask_blur=0, inpainting_fill=1)[0]
    cls = StableDiffusionXLImg2ImgPipeline if family == "sdxl" else StableDiffusionImg2ImgPipeline
    reference = _theirs(cls, theirs, image=init, strength=0.6,
                        generator=torch.Generator().manual_seed(SEED))
    _assert_within_one_level(image, reference)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@torch.no_grad()
def test_9_channel_inpainting_matches_diffusers(family, monkeypatch, tmp_path):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    theirs = build_diffusers_pipeline(family, in_channels=9)
    ours = load_pipeline(save(theirs, tmp_path / family))
    assert ours.config.is_inpainting
    _mean_latents(monkeypatch)
    init, mask = _init_image(), Image.new("L", (64, 64), 255)  # everything repainted: no x0 blending on either side
    image = ours.inpaint(init, mask, PROMPT, denoising_strength=0.5,
                         negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=7.0, sampler="Euler", scheduler="uniform",
                         seed=SEED, mask_blur=0, inpainting_fill=1)[0]
    cls = StableDiffusionXLInpaintPipeline if family == "sdxl" else StableDiffusionInpaintPipeline
    reference = _theirs(cls, theirs, image=init, mask_image=mask, strength=0.6, height=64, width=64,
                        generator=torch.Generator().manual_seed(SEED))
    _assert_within_one_level(image, reference)
