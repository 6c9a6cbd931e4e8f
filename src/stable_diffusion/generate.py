"""The one generation path. The CLI, the HTTP server, ``sd eval``, training's sample grids and the Python API
(``Pipeline.txt2img`` / ``img2img`` / ``inpaint``) all fill a GenerationRequest and call ``generate``:

1. check the request (a resolved copy: sizes, seed, sampler and schedule filled in);
2. merge the LoRAs it names (arguments and ``<lora:name:w>`` tags) for its duration;
3. build the denoiser and the sigma schedule (img2img: the schedule's last steps);
4. prepare the start (img2img / inpainting: the encoded init image, the masks, the 9-channel UNet input);
5. per batch: encode the prompts into the guided denoiser, draw A1111's per-seed noise, sample (an SDXL refiner
   given: its denoiser takes over at the request's refiner_switch_at);
6. decode the latents to pixels, keep the unmasked pixels, write the infotext.

txt2img, img2img and inpainting differ only in step 4 and in the first latent."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image

from .conditioning import guided_denoiser
from .control import add_controls
from .diffusion.denoiser import Denoiser, GuidanceSkip, RefinerSwitch
from .diffusion.noise import BrownianNoise, PerImageNoise, initial_noise
from .diffusion.samplers import SAMPLERS, sampling_sigmas
from .hires import second_pass_steps, truncate, upscale_latents
from .images import to_batch, to_pil
from .infotext import format_infotext, generation_parameters
from .inpaint import (
    BlendedDenoiser,
    ConcatUNet,
    blur_fill,
    composite,
    fit_image,
    latent_blend_mask,
    latent_side_mask,
    latent_size,
    mask_image,
    only_masked_crop,
    paste_back,
    pixel_mask,
    start_latent,
)
from .lora import applied_loras, extract_lora_tags, resolve_lora
from .models.deepcache import deep_cache
from .outpainting import combine as combine_tiles
from .outpainting import plan as outpaint_plan
from .request import GenerationRequest
from .upscalers import get_upscaler, resize_image

if TYPE_CHECKING:
    from .pipeline import Pipeline

logger = logging.getLogger(__name__)
StepCallback = Callable[[dict], None]  # gets {"i", "x", "sigma", "denoised"} after each sampling step


class StopSampling(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a step callback to end sampling early: ``denoised`` (the x0 prediction of that step) is
    decoded as the image. ``skip``: end only this batch (A1111's Skip); otherwise the whole job (Interrupt)."""

    def __init__(self, denoised: torch.Tensor, skip: bool = False) -> None:
        super().__init__("sampling stopped")
        self.denoised, self.skip = denoised, skip


class StopGeneration(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised from inside the text encoder or the VAE (a job's stop hook) to end the job where it is:
    ``generate`` returns the images finished before it."""


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    request: GenerationRequest  # the resolved request that made them (seed, size, sampler and schedule filled in)
    subseeds: list[int] = field(default_factory=list)  # each image's variation seed (A1111's all_subseeds)


def decode_latents(pipe: Pipeline, latents: torch.Tensor, tile: int | None = None) -> list[Image.Image]:
    """Scaled latents (B, C, h, w) -> PIL images through the VAE's decoder, in ``tile``-pixel tiles when given.
    A half-precision VAE whose output overflows (NaN or inf, as SD1.x's VAE does in fp16 on some latents)
    decodes again in fp32, as A1111 does."""
    latents = latents / pipe.config.vae.scaling_factor

    def decode() -> torch.Tensor:
        return pipe.vae.decode(latents) if tile is None else pipe.vae.decode_tiled(latents, tile)

    images = decode()
    if pipe.vae.dtype != torch.float32 and not torch.isfinite(images).all():
        if not getattr(pipe.vae, "warned_fp32_fallback", False):  # said once per model
            logger.warning("the VAE produced NaN/inf in %s; decoding in fp32 instead (A1111's --no-half-vae)",
                           str(pipe.vae.dtype).removeprefix("torch."))
            pipe.vae.warned_fp32_fallback = True
        dtype = pipe.vae.dtype
        try:
            pipe.vae.float()
            latents = latents.float()
            images = decode()
        finally:
            pipe.vae.to(dtype)
    return to_pil(images)


def _encode(pipe: Pipeline, pixels: torch.Tensor, tile: int | None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled fp32 latents (the posterior's mean), whatever the VAE's dtype."""
    pixels = pixels.to(pipe.device)
    posterior = pipe.vae.encode(pixels) if tile is None else pipe.vae.encode_tiled(pixels, tile)
    return posterior.mean.float() * pipe.config.vae.scaling_factor


@dataclass
class _Start:
    """What img2img / inpainting add to txt2img: the init latent, the masks, and the UNet to call."""

    unet: Callable[..., torch.Tensor]
    init_latent: torch.Tensor | None = None
    latent_mask: torch.Tensor | None = None  # (1, 1, h, w), 1 = repaint
    pixel_mask: torch.Tensor | None = None  # (1, 1, H, W)


def _prepare_start(pipe: Pipeline, request: GenerationRequest) -> _Start:
    c, f = pipe.config, pipe.vae.downscale
    hw = (request.height // f, request.width // f)
    start = _Start(pipe.unet)

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return _encode(pipe, pixels, request.vae_tile)

    w, h = request.width, request.height
    inits = request.inits  # several: image k of a batch starts from the k-th (A1111's init_images)
    fitted = [fit_image(im, w, h, request.resize_mode if request.resize_mode != 3 else 0) for im in inits]
    pixels = torch.cat([to_batch(im, w, h) for im in fitted]) if inits else None
    originals = pixels
    if request.mask is not None:
        start.pixel_mask = pixel_mask(request, w, h)
        latent_side = latent_side_mask(request, w, h)  # A1111's latent_mask, else the pixel mask
        start.latent_mask = latent_blend_mask(latent_side, hw, request.mask_round).to(pipe.device)
        if request.inpainting_fill == 0:  # A1111's fill: the kept pixels blurred into the masked part
            fill_mask = mask_image(latent_side)
            pixels = torch.cat([to_batch(blur_fill(im, fill_mask), w, h) for im in fitted])
    if pixels is not None and request.resize_mode == 3:  # A1111: encoded at its own size, the latent resized
        start.init_latent = torch.cat([F.interpolate(encode(to_batch(im, im.width // 8 * 8, im.height // 8 * 8)),
                                                     size=hw, mode="bilinear") for im in inits])
    elif pixels is not None:
        start.init_latent = encode(pixels)
    if c.is_inpainting:  # 9-channel UNet: [x, mask, masked-image latent]; txt2img repaints everything
        binary = (start.pixel_mask >= 0.5).float() if start.pixel_mask is not None else \
            torch.ones(1, 1, request.height, request.width)
        source = originals if originals is not None else torch.zeros(1, 3, request.height, request.width)
        masked = encode(source * (1 - binary))  # (n init images, C, h, w)
        concat = torch.cat([latent_size(binary, hw).to(pipe.device).expand(len(masked), -1, -1, -1), masked], dim=1)
        start.unet = ConcatUNet(pipe.unet, concat)
    return start


def _outpaint(pipe: Pipeline, request: GenerationRequest, callback: StepCallback | None,
              refiner: Pipeline | None) -> GenerationResult:
    """A1111's poor man's outpainting: each tile on the grown border inpainted with its own masks and the next
    seed, the tiles joined again; the result is the one joined image with the first tile's parameters."""
    request = request.resolved(pipe.config.image_size)
    settings = request.outpaint
    grid, work = outpaint_plan(request.init_image, settings, request.width, request.height)
    first = None
    for i, (tile, mask, latent_mask) in enumerate(work):
        part = replace(request, outpaint=None, init_image=tile.image, init_images=[], mask=mask,
                       latent_mask=latent_mask, mask_blur=settings.mask_blur * 2,
                       inpainting_fill=settings.inpainting_fill, inpainting_mask_invert=False, inpaint_full_res=False,
                       resize_mode=0, n_iter=1, batch_size=1, seed=request.seed + i)
        result = generate(pipe, part, callback, refiner)
        if not result.images:  # stopped inside the text encoder or the VAE
            break
        tile.image = result.images[0]
        first = first or result
    if first is None:
        return GenerationResult([], [], [], request)
    return GenerationResult([combine_tiles(grid)], [request.seed], first.infotexts[:1], request, first.subseeds[:1])


def _loras(request: GenerationRequest) -> tuple[list[str], str, list[tuple]]:
    """The prompts and negative prompt without their ``<lora:...>`` tags, and every LoRA to merge."""
    prompts, tagged = [], []
    for text in request.prompts:
        prompt, tags = extract_lora_tags(text, request.lora_dir)
        prompts.append(prompt)
        tagged += [tag for tag in tags if tag not in tagged]
    negative, tagged_negative = extract_lora_tags(request.negative_prompt, request.lora_dir)
    loras = [(resolve_lora(str(name), request.lora_dir), float(w)) for name, w in request.loras]
    return prompts, negative, loras + tagged + tagged_negative


@dataclass
class _Refiner:
    """An SDXL refiner for a request: its pipeline and denoiser, and whether it finished the last batch."""

    pipe: Pipeline
    denoiser: Denoiser
    used: bool = False

    @property
    def title(self) -> str:
        """A1111's short title of the refiner: name [hash]."""
        name, sha = self.pipe.config.name, self.pipe.model_hash
        return f"{name} [{sha}]" if sha else name


def _check_refiner(pipe: Pipeline, refiner: Pipeline) -> None:
    if refiner.config.is_inpainting or refiner.config.vae.embed_dim != pipe.config.vae.embed_dim \
            or refiner.vae.downscale != pipe.vae.downscale:
        raise ValueError("refiner: its latents differ from the model's (a refiner needs the same latent space "
                         "and a 4-channel UNet)")


def generate(pipe: Pipeline, request: GenerationRequest, callback: StepCallback | None = None,
             refiner: Pipeline | None = None) -> GenerationResult:
    """Images for a request: txt2img, img2img (SDEdit, Meng et al. 2022) when it has an init image, inpainting
    when it has a mask too. ``callback`` sees every sampling step and may raise StopSampling. ``refiner``: a
    model (SDXL's refiner) that finishes the trajectory from ``request.refiner_switch_at`` on, as A1111's."""
    if refiner is not None:
        _check_refiner(pipe, refiner)
    if request.outpaint is not None:  # A1111's poor man's outpainting: the border's tiles, one by one
        return _outpaint(pipe, request, callback, refiner)
    if request.mask is not None and request.inpaint_full_res:  # inpaint a crop around the mask, paste it back
        crop, box = only_masked_crop(request, pipe.config.image_size)
        result = generate(pipe, crop, callback, refiner)
        result.images = paste_back(request, result.images, box)
        return result
    request = request.resolved(pipe.config.image_size)  # 1
    prompts, negative, loras = _loras(request)
    if request.hires is not None and sorted(map(str, _loras(request.hires_request())[2])) != sorted(map(str, loras)):
        raise ValueError("hr_prompt: its LoRAs differ from the prompt's (one set of LoRAs is merged per generation)")
    with applied_loras(pipe, loras), torch.inference_mode():  # 2
        try:
            return _sample(pipe, request, prompts, negative, callback, [path for path, _ in loras], refiner)
        finally:
            for model in (pipe, refiner):  # offloaded: every weight goes home between generations
                if model is not None and model.offload is not None:
                    model.offload.unload_all()


def _sample(pipe: Pipeline, request: GenerationRequest, prompts: list[str], negative: str,
            callback: StepCallback | None, loras: list[Path], refiner: Pipeline | None) -> GenerationResult:
    result = GenerationResult([], [], [], request)
    params = {"model": pipe.config.name, "model_hash": pipe.model_hash, "loras": loras,
              "vae": getattr(pipe, "vae_name", None)}
    try:
        start = _prepare_start(pipe, request)  # 4 (before 3: the 9-channel UNet wraps the concat input)
        denoiser = Denoiser.from_config(start.unet, pipe.config)  # 3
        sigmas = sampling_sigmas(request.sampler, request.scheduler, request.steps, denoiser.schedule,
                                 pipe.config.family).to(pipe.device)
        sigmas = sigmas[len(sigmas) - 1 - request.sampling_steps():]  # img2img: the schedule's last steps
        add_controls(pipe, request, denoiser, sigmas)  # ControlNet units, if any
        second = _second_pass(pipe, request)
        expert = _Refiner(refiner, Denoiser.from_config(refiner.unet, refiner.config)) if refiner else None
        for it in range(request.n_iter):  # 5, 6
            stopped = _batch(pipe, request, it, prompts, negative, start, denoiser, sigmas, callback, result, params,
                             second, expert)
            if stopped is not None and not stopped.skip:
                break
    except StopGeneration:  # stopped inside the text encoder or the VAE: what is finished is the result
        pass
    return result


def _batch(pipe: Pipeline, request: GenerationRequest, it: int, prompts: list[str], negative: str, start: _Start,
           denoiser: Denoiser, sigmas: torch.Tensor, callback: StepCallback | None, result: GenerationResult,
           params: dict, second: _SecondPass | None = None, refiner: _Refiner | None = None) -> StopSampling | None:
    """Batch ``it`` of the request, appended to ``result``; returns the StopSampling that ended it early. A
    refiner works on the hires fix's second pass when there is one (A1111's default), else on the only pass."""
    n = request.batch_size
    seeds, subseeds = request.image_seeds(it)
    if refiner is not None:
        refiner.used = False
    x, stopped = _denoise(pipe, request, prompts * (n // len(prompts)), negative, start, denoiser, sigmas, seeds,
                          subseeds, callback, refiner if second is None else None)
    if second is not None and stopped is None:  # stopped: the first pass's images, as A1111
        x, stopped = _hires_pass(pipe, request, second, x, seeds, subseeds, callback, refiner)
    refined = refiner is not None and refiner.used
    images = decode_latents(refiner.pipe if refined else pipe, x, request.vae_tile)  # A1111: the model last used
    if refined:
        params = {**params, "refiner": refiner.title}
    if request.mask is not None:
        images = [composite(fit_image(request.init_of(k), request.width, request.height, request.resize_mode), image,
                            start.pixel_mask) for k, image in enumerate(images)]
    asked = request.prompt if isinstance(request.prompt, list) else [request.prompt] * n
    for seed, subseed, image, text in zip(seeds, subseeds, images, asked, strict=True):
        result.images.append(image)
        result.seeds.append(seed)
        result.subseeds.append(subseed)
        result.infotexts.append(format_infotext(text, request.negative_prompt,
                                                generation_parameters(request, seed, subseed=subseed, **params)))
    return stopped


@dataclass
class _SecondPass:
    """The hires fix's second pass, prepared once per request: its request, start (a 9-channel UNet's input at the
    target size), denoiser, sigmas (none when the strength is 0) and prompts."""

    request: GenerationRequest
    start: _Start
    denoiser: Denoiser
    sigmas: torch.Tensor | None
    prompts: list[str]
    negative: str


def _second_pass(pipe: Pipeline, request: GenerationRequest) -> _SecondPass | None:
    if request.hires is None:
        return None
    second = request.hires_request(pipe.vae.downscale)
    start = _prepare_start(pipe, second)  # txt2img at the target size (a 9-channel UNet's input too)
    denoiser = Denoiser.from_config(start.unet, pipe.config)
    sigmas = None
    if request.denoising_strength > 0:  # 0: nothing to redraw, the upscaled latents are the result
        length, run = second_pass_steps(second.steps, request.denoising_strength)
        sigmas = sampling_sigmas(second.sampler, second.scheduler, length, denoiser.schedule, pipe.config.family)
        sigmas = sigmas[len(sigmas) - 1 - run:].to(pipe.device)
        add_controls(pipe, second, denoiser, sigmas, hires_pass=True)
    prompts, negative, _ = _loras(second)
    return _SecondPass(second, start, denoiser, sigmas, prompts, negative)


def _hires_pass(pipe: Pipeline, request: GenerationRequest, second: _SecondPass, x: torch.Tensor, seeds: list[int],
                subseeds: list[int], callback: StepCallback | None, refiner: _Refiner | None = None
                ) -> tuple[torch.Tensor, StopSampling | None]:
    """A1111's hires fix on a batch's first-pass latents: upscale, then an img2img pass at the target size."""
    f, hr = pipe.vae.downscale, request.hires
    to_x, to_y, tx, ty = hr.target(request.width, request.height, f)
    if hr.latent_mode is not None:
        latents = upscale_latents(x, hr.latent_mode, (to_y // f, to_x // f))
    else:  # decode, upscale the pixels, encode again
        upscaler = get_upscaler(hr.upscaler, request.upscalers_dir)
        images = [resize_image(im, to_x, to_y, upscaler) for im in decode_latents(pipe, x, request.vae_tile)]
        w, h = to_x // f * f, to_y // f * f
        latents = _encode(pipe, torch.cat([to_batch(im.crop((0, 0, w, h)), w, h) for im in images]),
                          request.vae_tile)
    latents = truncate(latents, tx, ty)
    if second.sigmas is None:
        return latents, None
    prompts = second.prompts * (len(seeds) // len(second.prompts))
    return _denoise(pipe, second.request, prompts, second.negative, replace(second.start, init_latent=latents),
                    second.denoiser, second.sigmas, seeds, subseeds, callback, refiner)


def _denoise(pipe: Pipeline, request: GenerationRequest, prompts: list[str], negative: str, start: _Start,
             denoiser: Denoiser, sigmas: torch.Tensor, seeds: list[int], subseeds: list[int],
             callback: StepCallback | None, refiner: _Refiner | None = None
             ) -> tuple[torch.Tensor, StopSampling | None]:
    """One sampling pass of a batch: A1111's noise for its seeds, added to the start latent (img2img) or alone,
    then the sampler down ``sigmas`` (the refiner's denoiser from its switch on). Returns the latents and the
    StopSampling that ended it early."""
    c, f = pipe.config, pipe.vae.downscale
    spec = SAMPLERS[request.sampler]
    takes_eta = "eta" in inspect.signature(spec.fn).parameters  # follows the no_grad wrapper
    options = {**spec.options, **({"eta": request.eta} if request.eta is not None and takes_eta else {})}
    model = guided_denoiser(pipe, request, prompts, negative, denoiser, sigmas)
    switch = None
    if refiner is not None:
        switch = model = RefinerSwitch(
            model, lambda: guided_denoiser(refiner.pipe, request, prompts, negative, refiner.denoiser, sigmas),
            denoiser.schedule.sigmas, request.refiner_switch_at)
    if request.s_min_uncond or request.skip_early_cond:
        model = GuidanceSkip(model, len(sigmas) - 1, request.s_min_uncond, request.s_min_uncond_all,
                             request.skip_early_cond)
    resize = (request.seed_resize_from_h // f, request.seed_resize_from_w // f) if request.seed_resize else None
    noise, generators = initial_noise(seeds, (c.vae.embed_dim, request.height // f, request.width // f), subseeds,
                                      request.subseed_strength, resize)
    x = noise.to(pipe.device) * sigmas[0]
    if start.init_latent is not None:
        first = start.init_latent
        if request.mask is not None:
            first = start_latent(first, start.latent_mask, request.inpainting_fill, generators[0])
            model = BlendedDenoiser(model, start.init_latent, start.latent_mask)
        x = x + first
    noise = BrownianNoise(x, sigmas[sigmas > 0].min(), sigmas.max(), seeds) if spec.brownian \
        else PerImageNoise(generators)
    try:
        with deep_cache(pipe.unet, pipe.deepcache, pipe.deepcache_branch):  # --deepcache N: deep features reused
            return spec.fn(model, x, sigmas, callback=callback, noise=noise, **options), None
    except StopSampling as stop:
        return stop.denoised, stop
    finally:
        if switch is not None:
            refiner.used = switch.switched
