"""The one parameter struct every front end fills (the CLI's flags, the HTTP API's fields, Python keywords):
``GenerationRequest``, with AUTOMATIC1111's names and defaults. txt2img leaves ``init_image`` unset; img2img
sets it; inpainting sets ``mask`` too. ``resolved()`` checks a request and returns a completed copy."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

from PIL import Image

from .control import ControlUnit
from .diffusion.samplers import resolve_sampler
from .hires import HiresFix
from .inpaint import RESIZE_MODES, check_mask
from .lora import extract_lora_tags, resolve_lora
from .outpainting import Outpaint
from .styles import Style, apply_styles
from .upscalers import get_upscaler


@dataclass
class GenerationRequest:
    """What to generate. Names and defaults as in A1111's /sdapi/v1/txt2img and img2img."""

    prompt: str | list[str] = ""  # a list: one prompt per image of each batch (batch_size = its length)
    negative_prompt: str = ""
    styles: list[Style] = field(default_factory=list)  # A1111 styles, merged into the prompts by resolved()
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "Euler a"
    scheduler: str = "automatic"
    seed: int = -1  # -1: a random seed, chosen by resolved()
    # A1111's variation seeds (diffusion/noise.py initial_noise): the noise slerped toward the subseed's
    subseed: int = -1  # -1: random
    subseed_strength: float = 0.0  # 0: the seed's image, 1: the subseed's
    seed_resize_from_w: int = 0  # > 0 (with h): the seed's noise drawn at this size, centred
    seed_resize_from_h: int = 0
    batch_size: int = 1
    n_iter: int = 1
    width: int | None = None  # None: the model's native size, or the init image's size rounded down to 8
    height: int | None = None
    clip_skip: int = 1
    eta: float | None = None
    # guidance switched off for part of sampling, as A1111's options of these names (diffusion/denoiser.py)
    s_min_uncond: float = 0.0  # "NGMS": no guidance below this sigma, on every other step
    s_min_uncond_all: bool = False  # "NGMS all steps": ... on every step
    skip_early_cond: float = 0.0  # "Skip Early CFG": no guidance on this fraction of the first steps
    loras: list[tuple[str, float]] = field(default_factory=list)  # besides <lora:name:w> in the prompt
    lora_dir: str | None = None
    embeddings_dir: str | None = None  # textual-inversion files, used in prompts by file name
    # img2img (SDEdit): start from this image, noised to the sigma at denoising_strength
    init_image: Image.Image | None = None
    # A1111's several init_images: image k of each batch starts from init_images[k] (batch_size = their number;
    # init_image is the first)
    init_images: list[Image.Image] = field(default_factory=list)
    resize_mode: int = 0  # A1111's: 0 just resize, 1 crop and resize, 2 resize and fill, 3 resize the latent
    denoising_strength: float = 0.75
    # inpainting: repaint the white part of the mask (inpaint.py)
    mask: Image.Image | None = None
    mask_blur: int = 4
    inpainting_fill: int = 1  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpainting_mask_invert: bool = False
    inpaint_full_res: bool = False  # A1111's "only masked": work on a crop around the mask
    inpaint_full_res_padding: int = 32
    latent_mask: Image.Image | None = None  # A1111's: the mask for the latent blending (default: the blurred mask)
    mask_round: bool = True  # A1111's: the latent blending mask rounded to 0 / 1 (off: soft blending)
    # A1111's "Poor man's outpainting" script (outpainting.py): grow the init image; generate paints the border
    outpaint: Outpaint | None = None
    # A1111's hires fix (hires.py): a second, img2img pass at a larger size, at denoising_strength
    hires: HiresFix | None = None
    upscalers_dir: str | None = None  # A1111's models folder: upscaler files in its ESRGAN/ and RealESRGAN/
    # the SDXL refiner (a Pipeline given to generate) takes over at this fraction of the diffusion (A1111's UI
    # default); with the hires fix it refines the second pass
    refiner_switch_at: float = 0.8
    # ControlNet units (control.py): each a control image through its preprocessor and a ControlNet file
    controls: list[ControlUnit] = field(default_factory=list)
    # low memory: the VAE encodes and decodes in tiles of vae_tile_size pixels (models/tiled_vae.py)
    tiled_vae: bool = False
    vae_tile_size: int = 512

    @property
    def vae_tile(self) -> int | None:
        """The VAE's tile size in pixels, or None for the whole image at once."""
        return self.vae_tile_size if self.tiled_vae else None

    @property
    def prompts(self) -> list[str]:
        return list(self.prompt) if isinstance(self.prompt, list) else [self.prompt]

    @property
    def inits(self) -> list[Image.Image]:
        """The init images of a batch's images, in order (one image: every image's)."""
        return list(self.init_images) if self.init_images else [self.init_image] if self.init_image else []

    def init_of(self, k: int) -> Image.Image:
        """The init image of image ``k`` of a batch."""
        inits = self.inits
        return inits[k % len(inits)]

    @property
    def strength(self) -> float:
        """The denoising strength that applies: 1 for txt2img (sampling starts from pure noise)."""
        return self.denoising_strength if self.init_image is not None else 1.0

    @property
    def seed_resize(self) -> bool:
        return self.seed_resize_from_w > 0 and self.seed_resize_from_h > 0

    def image_seeds(self, iteration: int) -> tuple[list[int], list[int]]:
        """(seeds, subseeds) of batch ``iteration``'s images, as A1111 numbers them: image k of the request has
        seed + k (but every image the seed itself when varied, so that the subseeds make the variations) and
        subseed + k."""
        first = iteration * self.batch_size
        indices = range(first, first + self.batch_size)
        return ([self.seed + (k if self.subseed_strength == 0 else 0) for k in indices],
                [self.subseed + k for k in indices])

    def sampling_steps(self) -> int:
        """Steps the sampler runs. img2img runs the last ``int(min(strength, 0.999) * steps) + 1`` steps of a
        ``steps``-step schedule, as A1111 does; txt2img all of them."""
        if self.init_image is None:
            return self.steps
        return int(min(self.denoising_strength, 0.999) * self.steps) + 1

    def hires_request(self, factor: int = 8) -> GenerationRequest:
        """The hires fix's second pass of a resolved request: the same seeds at the target size (in latent cells
        of ``factor`` pixels), with the hires sampler, schedule (A1111: automatic unless given), steps, CFG scale
        and prompts."""
        hr = self.hires
        width, height = hr.final_size(self.width, self.height, factor)
        sampler, scheduler = resolve_sampler(hr.sampler or self.sampler, hr.scheduler or "automatic")
        prompt = self.prompt if not hr.prompt else [hr.prompt] * len(self.prompts) if isinstance(self.prompt, list) \
            else hr.prompt
        return replace(self, width=width, height=height, steps=hr.steps or self.steps, sampler=sampler,
                       scheduler=scheduler, cfg_scale=self.cfg_scale if hr.cfg_scale is None else hr.cfg_scale,
                       prompt=prompt,
                       negative_prompt=hr.negative_prompt or self.negative_prompt, hires=None)

    def progress_steps(self) -> int:
        """Sampler steps per batch, the hires fix's second pass included."""
        second = self.hires is not None and self.denoising_strength > 0
        return self.sampling_steps() + ((self.hires.steps or self.steps) if second else 0)

    def resolved(self, native_size: int) -> GenerationRequest:
        """A checked copy with width, height, seed and (for a prompt list) batch_size filled in, the sampler's
        A1111 label and the schedule it walks ("automatic" resolved); the request itself is left as it is. A
        ValueError names the first bad field."""
        width, height = self.width, self.height
        init_image = self.init_images[0] if self.init_images and self.init_image is None else self.init_image
        if init_image is not None:
            width = init_image.width // 8 * 8 if width is None else width
            height = init_image.height // 8 * 8 if height is None else height
            if not 0.0 <= self.denoising_strength <= 1.0:
                raise ValueError(f"denoising strength must be in [0, 1], got {self.denoising_strength}")
        elif self.mask is not None:
            raise ValueError("inpainting needs an init image")
        width, height = native_size if width is None else width, native_size if height is None else height
        if width % 8 or height % 8 or width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive multiples of 8, got {width}x{height}")
        for text in [*self.prompts, self.negative_prompt]:
            if not isinstance(text, str):
                raise ValueError(f"a prompt must be text, not {type(text).__name__}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("prompt: not valid Unicode text (it holds a lone surrogate)") from None
        batch_size = self.batch_size
        if isinstance(self.prompt, list):
            if not self.prompt or not all(isinstance(p, str) for p in self.prompt):
                raise ValueError("a prompt list must hold at least one string")
            batch_size = len(self.prompt)
        if len(self.init_images) > 1:  # A1111: one image per batch position
            if isinstance(self.prompt, list) and len(self.prompt) != len(self.init_images):
                raise ValueError(f"{len(self.init_images)} init images but {len(self.prompt)} prompts")
            if self.init_image is not None and self.init_image is not self.init_images[0]:
                raise ValueError("give init_image or init_images, not both")
            batch_size = len(self.init_images)
        if self.steps < 1 or batch_size < 1 or self.n_iter < 1:
            raise ValueError("steps, batch_size and n_iter must be at least 1")
        if not math.isfinite(self.cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {self.cfg_scale}")
        for name in ("seed", "subseed"):
            if not -1 <= getattr(self, name) < 2**63:
                raise ValueError(f"{name} must be -1 (random) or from 0 to 2**63 - 1, got {getattr(self, name)}")
        if self.clip_skip < 1:
            raise ValueError(f"clip_skip must be at least 1, got {self.clip_skip}")
        if self.eta is not None and not 0 <= self.eta < math.inf:
            raise ValueError(f"eta must be a number >= 0, got {self.eta}")
        sampler, scheduler = resolve_sampler(self.sampler, self.scheduler)
        if not 0 <= self.s_min_uncond < math.inf:
            raise ValueError(f"s_min_uncond (NGMS) must be a sigma >= 0, got {self.s_min_uncond}")
        if not 0 <= self.skip_early_cond <= 1:
            raise ValueError(f"skip_early_cond must be a fraction of the steps in [0, 1], got {self.skip_early_cond}")
        if not 64 <= self.vae_tile_size <= 4096 or self.vae_tile_size % 8:
            raise ValueError(f"vae_tile_size must be a multiple of 8 from 64 to 4096, got {self.vae_tile_size}")
        if self.latent_mask is not None and self.mask is None:
            raise ValueError("latent_mask: it needs a mask (it replaces the mask on the latent side only)")
        if self.outpaint is not None:
            if init_image is None or len(self.init_images) > 1 or self.mask is not None:
                raise ValueError("outpainting takes one init image and makes its own mask")
            self.outpaint.check(width, height)
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {sorted(RESIZE_MODES)} ({', '.join(RESIZE_MODES.values())})")
        if self.mask is not None:
            for image in self.inits:
                check_mask(self.mask, image, self.inpainting_fill)
            if self.resize_mode == 3 and not self.inpaint_full_res:
                raise ValueError("resize_mode 3 (latent upscale) is for img2img without a mask")
        for text in [*self.prompts, self.negative_prompt]:  # every LoRA it names exists (a CheckpointError if not)
            extract_lora_tags(text, self.lora_dir)
        for name, _ in self.loras:
            resolve_lora(str(name), self.lora_dir)
        if self.hires is not None:
            if init_image is not None:
                raise ValueError("the hires fix is for txt2img; img2img has no second pass")
            self.hires.check(width, height)
            resolve_sampler(self.hires.sampler or sampler, self.hires.scheduler or "automatic")
            if self.hires.latent_mode is None:
                get_upscaler(self.hires.upscaler, self.upscalers_dir)
        for unit in self.controls:
            unit.check()
        if not 0 <= self.refiner_switch_at <= 1:
            raise ValueError(f"refiner_switch_at must be a fraction in [0, 1], got {self.refiner_switch_at}")
        if not 0 <= self.subseed_strength <= 1:
            raise ValueError(f"subseed_strength must be in [0, 1], got {self.subseed_strength}")
        if max(self.seed_resize_from_w, self.seed_resize_from_h) > 8192:
            raise ValueError("seed_resize_from_w and _h must be at most 8192")
        prompt, negative = self.prompt, self.negative_prompt
        if self.styles:  # merged once: the resolved copy has none left
            merged = [apply_styles(p, self.negative_prompt, self.styles) for p in self.prompts]
            prompt = [m[0] for m in merged] if isinstance(self.prompt, list) else merged[0][0]
            negative = merged[0][1]
        seed = random.randrange(2**32) if self.seed == -1 else self.seed
        subseed = random.randrange(2**32) if self.subseed == -1 else self.subseed
        return replace(self, prompt=prompt, negative_prompt=negative, styles=[], width=width, height=height, seed=seed,
                       init_image=init_image,
                       subseed=subseed, batch_size=batch_size, sampler=sampler, scheduler=scheduler)
