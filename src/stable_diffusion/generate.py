"""One generation path: encode prompts -> prepare the first latent -> sample -> decode (txt2img for now;
img2img and inpainting will differ only in the first latent and the denoiser wrapper)."""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from .conditioning import condition
from .diffusion.denoiser import CFGDenoiser, Denoiser, GuidanceSkip
from .diffusion.samplers import SAMPLERS, resolve_sampler
from .diffusion.schedules import alphas_cumprod, make_betas, make_sigmas
from .embeddings import EmbeddingLibrary
from .infotext import format_infotext
from .inpaint import (
    BlendedDenoiser,
    ConcatUNet,
    InpaintSpec,
    composite,
    crop_box,
    fill_masked_pixels,
    latent_size,
    start_latent,
)
from .lora import applied_loras, extract_lora_tags, resolve_lora
from .prompt_editing import prompt_schedule
from .prompts import count_chunks


@dataclass
class GenerationRequest:
    """The A1111 txt2img fields this pipeline understands (names and defaults as in /sdapi/v1/txt2img)."""

    prompt: str | list[str] = ""  # a list: one prompt per image of each batch (batch_size = its length)
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "Euler a"
    scheduler: str = "automatic"
    seed: int = -1
    batch_size: int = 1
    n_iter: int = 1
    width: int | None = None
    height: int | None = None
    clip_skip: int = 1
    eta: float | None = None
    # guidance switched off for part of sampling, as A1111's options of these names (diffusion/denoiser.py)
    s_min_uncond: float = 0.0  # "NGMS": no guidance below this sigma, on every other step
    s_min_uncond_all: bool = False  # "NGMS all steps": ... on every step
    skip_early_cond: float = 0.0  # "Skip Early CFG": no guidance on this fraction of the first steps
    loras: list = field(default_factory=list)  # [(path or name, strength)], besides <lora:name:w> in the prompt
    lora_dir: str | None = None
    embeddings_dir: str | None = None  # textual-inversion files, used in prompts by file name
    extra: dict = field(default_factory=dict)

    def validate(self, native: int) -> None:
        self.width = self.width or native
        self.height = self.height or native
        if self.width % 8 or self.height % 8 or self.width <= 0 or self.height <= 0:
            raise ValueError(f"width and height must be positive multiples of 8, got {self.width}x{self.height}")
        if isinstance(self.prompt, list):
            if not self.prompt or not all(isinstance(p, str) for p in self.prompt):
                raise ValueError("a prompt list must hold at least one string")
            self.batch_size = len(self.prompt)
        if self.steps < 1 or self.batch_size < 1 or self.n_iter < 1:
            raise ValueError("steps, batch_size and n_iter must be at least 1")
        resolve_sampler(self.sampler)
        if not 0 <= self.s_min_uncond < float("inf"):
            raise ValueError(f"s_min_uncond (NGMS) must be a sigma >= 0, got {self.s_min_uncond}")
        if not 0 <= self.skip_early_cond <= 1:
            raise ValueError(f"skip_early_cond must be a fraction of the steps in [0, 1], got {self.skip_early_cond}")
        if self.seed == -1:
            self.seed = random.randrange(2**32)


def guidance_skip_params(request: GenerationRequest) -> dict:
    """The infotext keys A1111 writes for its guidance-skipping options (only those in use)."""
    params = {"NGMS": request.s_min_uncond or None,
              "NGMS all steps": True if request.s_min_uncond and request.s_min_uncond_all else None,
              "Skip Early CFG": request.skip_early_cond or None}
    return {k: v for k, v in params.items() if v is not None}


class StopSampling(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a step callback to end sampling early: ``denoised`` (the x0 prediction of that step) is
    decoded as the image. ``skip``: end only this batch (A1111's Skip); otherwise the whole job (Interrupt)."""

    def __init__(self, denoised: torch.Tensor, skip: bool = False) -> None:
        super().__init__("sampling stopped")
        self.denoised, self.skip = denoised, skip


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """AUTOMATIC1111's noise: image i is ``torch.randn(shape, generator=cpu_generator(seed_i))``, so a seed gives
    the same image on every device and inside any batch. The generators continue for ancestral noise."""
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in generators]), generators


def _per_image_noise(generators: list[torch.Generator]) -> Callable[[torch.Tensor], torch.Tensor]:
    def draw(like: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(like.shape[1:], generator=g) for g in generators]).to(like)
    return draw


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL RGB images."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


class _StepwiseCFG(torch.nn.Module):
    """Prompt editing: the CFG denoiser of the sampling step that ``sigma`` belongs to (no hidden state:
    the step is read off the sigma list, so second-order samplers' midpoints use their step's prompt)."""

    def __init__(self, sigmas: torch.Tensor, per_step: list[CFGDenoiser]) -> None:
        super().__init__()
        self.sigmas, self.per_step = sigmas, per_step

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, skip_uncond: bool = False) -> torch.Tensor:
        step = int((self.sigmas[:-1] >= sigma.reshape(-1)[0] * (1 - 1e-6)).sum().item()) - 1
        return self.per_step[min(max(step, 0), len(self.per_step) - 1)](x, sigma, skip_uncond)


def _scheduled_cfg(pipe, request: GenerationRequest, prompts: list[str], negative: str, denoiser: Denoiser,
                   sigmas: torch.Tensor):
    """CFG with A1111 prompt editing on every image's prompt and the negative; each distinct text is encoded
    once, and the batch's conditioning stacks the texts each image is at."""
    steps = len(sigmas) - 1
    schedules = {text: prompt_schedule(text, steps) for text in {*prompts, negative}}
    texts = {t for schedule in schedules.values() for _, t in schedule}
    # every text pads to the same number of 77-token chunks so cond and uncond share one batched UNet call
    library = EmbeddingLibrary(request.embeddings_dir)
    chunks = max(count_chunks(pipe.tokenizer, t, library) for t in texts)
    encoded = {t: condition(pipe, [t], request.width, request.height, request.clip_skip, chunks, library)
               for t in texts}

    def at(text: str, step: int) -> str:
        return next(part for end, part in schedules[text] if step <= end)

    def stacked(parts: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        context = torch.cat([encoded[p].context for p in parts])  # (n, tokens, width)
        ys = [encoded[p].y for p in parts]
        return context, None if ys[0] is None else torch.cat(ys)

    models: dict[tuple[tuple[str, ...], str], CFGDenoiser] = {}
    per_step = []
    for step in range(1, steps + 1):
        key = (tuple(at(p, step) for p in prompts), at(negative, step))
        if key not in models:
            (cond, cond_y), (uncond, uncond_y) = stacked(key[0]), stacked((key[1],) * len(prompts))
            models[key] = CFGDenoiser(denoiser, cond, uncond, request.cfg_scale, cond_y, uncond_y)
        per_step.append(models[key])
    return per_step[0] if len(models) == 1 else _StepwiseCFG(sigmas, per_step)


def film_strip(pipe, x0s: list[torch.Tensor], height: int = 128) -> Image.Image:
    """The x0 prediction of each step (first image of the batch), decoded and laid side by side."""
    with torch.inference_mode():
        frames = [to_pil(pipe.vae.decode(x0[:1] / pipe.config.vae.scaling_factor))[0] for x0 in x0s]
    width = max(1, round(frames[0].width * height / frames[0].height))
    strip = Image.new("RGB", (width * len(frames), height))
    for i, frame in enumerate(frames):
        strip.paste(frame.resize((width, height), Image.LANCZOS), (i * width, 0))
    return strip


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) in [-1, 1], resized (Lanczos) to width x height ("just resize")."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return (array / 127.5 - 1.0).permute(2, 0, 1)[None]


def inpaint(pipe, request: GenerationRequest, init_image: Image.Image, spec: InpaintSpec,
            denoising_strength: float = 0.75, callback: Callable[[dict], None] | None = None) -> GenerationResult:
    """Repaint the white part of ``spec.mask``; everything outside it keeps the original pixels. With
    ``spec.only_masked`` the work happens on a crop around the mask, resized to width x height, and the result
    is scaled back and pasted in (more detail for small masks on large images)."""
    if not spec.only_masked:
        return generate(pipe, request, init_image, denoising_strength, callback, spec)
    if spec.mask.size != init_image.size:
        raise ValueError(f"mask is {spec.mask.width}x{spec.mask.height} but the image is "
                         f"{init_image.width}x{init_image.height}")
    request.width = request.width or pipe.config.image_size
    request.height = request.height or pipe.config.image_size
    box = crop_box(spec.effective_mask(), spec.padding, request.width, request.height)
    size = (request.width, request.height)
    crop_spec = replace(spec, mask=spec.mask.crop(box).resize(size, Image.LANCZOS), only_masked=False)
    result = generate(pipe, request, init_image.crop(box).resize(size, Image.LANCZOS), denoising_strength,
                      callback, crop_spec)
    full_mask = replace(spec, only_masked=False).pixel_mask(init_image, init_image.width, init_image.height)
    pasted = []
    for image in result.images:
        canvas = init_image.convert("RGB").copy()
        canvas.paste(image.resize((box[2] - box[0], box[3] - box[1]), Image.LANCZOS), box[:2])
        pasted.append(composite(init_image, canvas, full_mask))
    result.images = pasted
    return result


def txt2img(pipe, request: GenerationRequest, callback: Callable[[dict], None] | None = None) -> GenerationResult:
    return generate(pipe, request, callback=callback)


def img2img(pipe, request: GenerationRequest, init_image: Image.Image, denoising_strength: float = 0.75,
            callback: Callable[[dict], None] | None = None) -> GenerationResult:
    """SDEdit (Meng et al. 2022): noise the encoded image to the sigma at ``denoising_strength`` and denoise
    from there, over the last ``int(steps * strength)`` steps of a ``steps``-step schedule (A1111 semantics).
    Width/height default to the init image's size rounded down to multiples of 8."""
    return generate(pipe, request, init_image, denoising_strength, callback)


@dataclass
class _Start:
    """What img2img / inpainting add to txt2img: the init latent, the masks, and the UNet to call."""

    unet: Callable[..., torch.Tensor]
    init_latent: torch.Tensor | None = None
    latent_mask: torch.Tensor | None = None  # (1, 1, h, w), 1 = repaint
    pixel_mask: torch.Tensor | None = None  # (1, 1, H, W)


def _prepare(pipe, request: GenerationRequest, init_image: Image.Image | None, inpaint: InpaintSpec | None) -> _Start:
    c = pipe.config
    f = pipe.vae.downscale
    hw = (request.height // f, request.width // f)
    start = _Start(pipe.unet)

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return pipe.vae.encode(pixels.to(pipe.device)).mean * c.vae.scaling_factor

    pixels = image_to_tensor(init_image, request.width, request.height) if init_image is not None else None
    if inpaint is not None:
        start.pixel_mask = inpaint.pixel_mask(init_image, request.width, request.height)
        start.latent_mask = latent_size(start.pixel_mask, hw).to(pipe.device)
        if inpaint.inpainting_fill == 0:
            pixels = fill_masked_pixels(pixels, start.pixel_mask)
    if pixels is not None:
        start.init_latent = encode(pixels)
    if c.is_inpainting:  # 9-channel UNet: [x, mask, masked-image latent]; txt2img repaints everything
        binary = (start.pixel_mask >= 0.5).float() if start.pixel_mask is not None else \
            torch.ones(1, 1, request.height, request.width)
        source = image_to_tensor(init_image, request.width, request.height) if init_image is not None else \
            torch.zeros(1, 3, request.height, request.width)
        concat = torch.cat([latent_size(binary, hw).to(pipe.device), encode(source * (1 - binary))], dim=1)
        start.unet = ConcatUNet(pipe.unet, concat)
    return start


def generate(pipe, request: GenerationRequest, init_image: Image.Image | None = None, strength: float = 1.0,
             callback: Callable[[dict], None] | None = None, inpaint: InpaintSpec | None = None) -> GenerationResult:
    """The one sampling path: conditioning -> first latent (noise, or noised init image) -> sampler -> decode,
    with the request's LoRAs (and the prompt's ``<lora:name:w>`` tags) merged in for its duration."""
    prompts, tagged = [], []
    for text in request.prompt if isinstance(request.prompt, list) else [request.prompt]:
        prompt, tags = extract_lora_tags(text, request.lora_dir)
        prompts.append(prompt)
        tagged += [tag for tag in tags if tag not in tagged]
    negative, tagged_negative = extract_lora_tags(request.negative_prompt, request.lora_dir)
    loras = [(resolve_lora(str(name), request.lora_dir), float(w)) for name, w in request.loras]
    with applied_loras(pipe, loras + tagged + tagged_negative):
        return _generate(pipe, request, prompts, negative, init_image, strength, callback, inpaint)


def _generate(pipe, request: GenerationRequest, prompts: list[str], negative: str, init_image: Image.Image | None,
              strength: float, callback: Callable[[dict], None] | None, inpaint: InpaintSpec | None) -> GenerationResult:
    c = pipe.config
    if init_image is not None:
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"denoising strength must be in [0, 1], got {strength}")
        request.width = request.width or init_image.width // 8 * 8
        request.height = request.height or init_image.height // 8 * 8
    elif inpaint is not None:
        raise ValueError("inpainting needs an init image")
    request.validate(c.image_size)
    sampler, default_scheduler = resolve_sampler(request.sampler)
    scheduler = default_scheduler if request.scheduler in ("automatic", "", None) else request.scheduler
    label = next(name for name, (fn, _) in SAMPLERS.items() if fn is sampler)  # "DPM++ 2M Karras" -> "DPM++ 2M"
    abar = alphas_cumprod(make_betas(c.beta_schedule, c.timesteps, c.beta_start, c.beta_end))
    with torch.inference_mode():
        start = _prepare(pipe, request, init_image, inpaint)
    denoiser = Denoiser(start.unet, abar, c.prediction)
    sigmas = make_sigmas(scheduler, request.steps, denoiser.schedule).to(pipe.device)
    if init_image is not None:
        t_enc = int(min(strength, 0.999) * request.steps)  # steps actually run
        sigmas = sigmas[request.steps - t_enc - 1:]
    f = pipe.vae.downscale
    latent_shape = (c.vae.embed_dim, request.height // f, request.width // f)
    result = GenerationResult([], [], [])
    with torch.inference_mode():
        for it in range(request.n_iter):
            n = request.batch_size
            seeds = [request.seed + it * n + i for i in range(n)]
            model = _scheduled_cfg(pipe, request, prompts * (n // len(prompts)), negative, denoiser, sigmas)
            if request.s_min_uncond or request.skip_early_cond:
                model = GuidanceSkip(model, len(sigmas) - 1, request.s_min_uncond, request.s_min_uncond_all,
                                     request.skip_early_cond)
            noise, generators = initial_noise(seeds, latent_shape)
            x = noise.to(pipe.device) * sigmas[0]
            if start.init_latent is not None:
                first = start.init_latent
                if inpaint is not None:
                    first = start_latent(first, start.latent_mask, inpaint.inpainting_fill, generators[0])
                    model = BlendedDenoiser(model, start.init_latent, start.latent_mask)
                x = x + first
            takes_eta = "eta" in inspect.signature(sampler).parameters  # follows the no_grad wrapper
            kwargs = {"eta": request.eta} if request.eta is not None and takes_eta else {}
            stopped = None
            try:
                x = sampler(model, x, sigmas, callback=callback, noise=_per_image_noise(generators), **kwargs)
            except StopSampling as stop:
                x, stopped = stop.denoised, stop
            images = to_pil(pipe.vae.decode(x / c.vae.scaling_factor))
            if inpaint is not None:
                images = [composite(init_image, image, start.pixel_mask) for image in images]
            asked = request.prompt if isinstance(request.prompt, list) else [request.prompt] * n
            for seed, image, text in zip(seeds, images, asked, strict=True):
                result.images.append(image)
                result.seeds.append(seed)
                result.infotexts.append(format_infotext(text, request.negative_prompt, {
                    "Steps": request.steps, "Sampler": label, "Schedule type": scheduler.capitalize(),
                    "CFG scale": request.cfg_scale, "Seed": seed, "Size": f"{request.width}x{request.height}",
                    "Model": c.name or None, "Denoising strength": strength if init_image is not None else None,
                    "Mask blur": inpaint.mask_blur if inpaint is not None else None,
                    "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
                    **guidance_skip_params(request),
                    "Version": "stable_diffusion 0.1.0",
                }))
            if stopped is not None and not stopped.skip:
                break
    return result
