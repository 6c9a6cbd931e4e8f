"""txt2img / img2img over HTTP: check and translate an A1111 request (every bad field becomes an ApiError
before anything is queued), run it on the worker, and answer A1111's {images, parameters, info}."""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import ValidationError

from .. import __version__
from ..generate import GenerationResult
from ..hires import HiresFix
from ..images import png_bytes, save_png
from ..infotext import guidance_skip_params
from ..inpaint import check_mask
from ..request import GenerationRequest
from ..styles import Style, find_styles
from .protocol import ApiError, non_finite
from .schemas import GenerationFields, Img2ImgRequest, Limits, Options, Txt2ImgRequest
from .scripts import outpaint_settings

VERSION = f"stable_diffusion {__version__}"


def decode_image(data: str, what: str) -> Image.Image:
    """Raw base64 (line-wrapped too) or a ``data:image/...;base64,`` URL -> an RGB(A) PIL image with its PNG text
    chunks; anything else is a 422."""
    if not isinstance(data, str) or not data.strip():
        raise ApiError(422, f"{what}: expected a base64-encoded image")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{what}: invalid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            out = ImageOps.exif_transpose(image).convert("RGBA" if image.mode in ("RGBA", "LA") else "RGB")
            out.info = dict(image.info)  # keep the PNG text chunks (png-info reads "parameters")
            return out
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ApiError(422, f"{what}: not a readable image ({type(error).__name__}: {error})"[:300]) from None


def check_limits(body: GenerationFields, limits: Limits) -> None:
    """The limits a field's schema cannot state: images per request (``--max-images``) and the hires fix's
    target size; the schema built by ``schemas.limited`` holds the others."""
    if body.batch_size * body.n_iter > limits.max_images:
        raise ApiError(422, f"batch_size * n_iter must be at most {limits.max_images}")
    hires = hires_fix(body)
    if hires is not None:
        w, h = hires.final_size(*first_pass_size(body))
        if w > limits.max_width or h > limits.max_height:
            raise ApiError(422, f"the hires fix's target {w}x{h} is over this server's limit of "
                                f"{limits.max_width}x{limits.max_height}")


def first_pass_size(body: GenerationFields) -> tuple[int, int]:
    """width x height, or A1111's old firstphase_width / _height where set."""
    w, h = getattr(body, "firstphase_width", 0), getattr(body, "firstphase_height", 0)
    return (w // 8 * 8 or body.width), (h // 8 * 8 or body.height)


def hires_fix(body: GenerationFields) -> HiresFix | None:
    """The hires fix a txt2img body asks for (``enable_hr``), or None."""
    if not isinstance(body, Txt2ImgRequest) or not body.enable_hr:
        return None
    return HiresFix(scale=body.hr_scale, resize_x=body.hr_resize_x, resize_y=body.hr_resize_y,
                    upscaler=body.hr_upscaler, steps=body.hr_second_pass_steps,
                    sampler=None if body.hr_sampler_name in ("", "Use same sampler") else body.hr_sampler_name,
                    scheduler=None if body.hr_scheduler in ("", "Use same scheduler") else body.hr_scheduler,
                    prompt=body.hr_prompt, negative_prompt=body.hr_negative_prompt,
                    cfg_scale=body.hr_cfg)


def settings_for(options: dict, override: dict | None) -> Options:
    """The server's options with a request's ``override_settings`` on top, checked (a 422 names the bad key)."""
    if non_finite(override):
        raise ApiError(422, "options: NaN and infinities are not values any option takes")
    try:
        return Options.model_validate({**options, **(override or {})})
    except ValidationError as error:
        raise ApiError(422, "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                                      for e in error.errors())) from None


def guidance_skip(settings: Options, body: GenerationFields | None = None) -> dict:
    """A1111's NGMS (``s_min_uncond``, a request field or an option; ``s_min_uncond_all``) and Skip Early CFG."""
    s_min_uncond = body.s_min_uncond if body is not None and body.s_min_uncond is not None else settings.s_min_uncond
    return {"s_min_uncond": s_min_uncond, "s_min_uncond_all": settings.s_min_uncond_all,
            "skip_early_cond": settings.skip_early_cond}


def img2img_fields(body: Img2ImgRequest) -> dict[str, Any]:
    """The init images and the inpainting fields of an img2img body, decoded (generate fits them to width x height
    with the body's resize_mode). A1111's rule for several: one is every image's, up to batch_size are one each."""
    if body.init_images is None:
        raise ApiError(404, "Init image not found")  # A1111's answer
    if not body.init_images:
        raise ApiError(422, "init_images: at least one image is required")
    if len(body.init_images) > body.batch_size:
        raise ApiError(422, f"init_images: {len(body.init_images)} images for a batch of {body.batch_size}; one "
                            f"image (every image's) or up to batch_size (one each), as A1111")
    inits = [decode_image(data, f"init_images[{i}]").convert("RGB") for i, data in enumerate(body.init_images)]
    fields: dict[str, Any] = {"resize_mode": body.resize_mode}
    if body.mask:
        mask = decode_image(body.mask, "mask")
        try:
            for init in inits:
                check_mask(mask, init, body.inpainting_fill)
        except ValueError as error:
            raise ApiError(422, str(error)) from None
        alpha = mask.getchannel("A") if mask.mode == "RGBA" else None
        if body.latent_mask:
            fields["latent_mask"] = decode_image(body.latent_mask, "latent_mask").convert("L")
        fields.update(mask=mask.convert("L") if alpha is None else Image.composite(mask.convert("L"), alpha, alpha),
                      mask_blur=body.mask_blur_x if body.mask_blur_x is not None else body.mask_blur,
                      inpainting_fill=body.inpainting_fill, inpainting_mask_invert=bool(body.inpainting_mask_invert),
                      inpaint_full_res=body.inpaint_full_res, inpaint_full_res_padding=body.inpaint_full_res_padding,
                      mask_round=body.mask_round)
    elif body.latent_mask:
        raise ApiError(422, "latent_mask: it needs a mask (it replaces the mask on the latent side only)")
    if len(inits) == 1:
        fields["init_image"] = inits[0]
    else:
        fields["init_images"] = inits
    return fields


def refiner_name(body: GenerationFields) -> str | None:
    """The refiner a body names (A1111 takes None, "" and "None" for none)."""
    name = body.refiner_checkpoint
    return None if name in (None, "", "None", "none") else name


def build_request(body: GenerationFields, options: dict, models_dir: Path | None, native_size: int,
                  styles: dict[str, Style] | None = None, controls: list | None = None) -> GenerationRequest:
    """The resolved request a body asks for (a 422 for anything wrong, before it is queued); options are the
    server's, with the body's ``override_settings`` on top; LoRAs, embeddings and upscalers come from
    ``models_dir``'s A1111 folders."""
    settings = settings_for(options, body.override_settings)
    width, height = first_pass_size(body)
    lora_dir, embeddings_dir = (models_dir / "Lora", models_dir / "embeddings") if models_dir else (None, None)
    images = img2img_fields(body) if isinstance(body, Img2ImgRequest) else {}
    if isinstance(body, Img2ImgRequest) and (outpaint := outpaint_settings(body)) is not None:
        if body.mask:
            raise ApiError(422, "mask: poor man's outpainting makes its own mask")
        images["outpaint"] = outpaint
    try:
        chosen_styles = find_styles(body.styles or [], styles or {})
    except ValueError as error:
        raise ApiError(422, f"styles: {error}") from None
    request = GenerationRequest(
        prompt=body.prompt, negative_prompt=body.negative_prompt, styles=chosen_styles, steps=body.steps,
        cfg_scale=body.cfg_scale, sampler=body.sampler_name or body.sampler_index or "Euler",
        scheduler=body.scheduler or "automatic",
        seed=body.seed, subseed=body.subseed, subseed_strength=body.subseed_strength,
        seed_resize_from_w=body.seed_resize_from_w, seed_resize_from_h=body.seed_resize_from_h,
        batch_size=body.batch_size, n_iter=body.n_iter, width=width, height=height, hires=hires_fix(body),
        denoising_strength=body.denoising_strength,
        upscalers_dir=str(models_dir) if models_dir else None,
        eta=body.eta, clip_skip=body.clip_skip or settings.CLIP_stop_at_last_layers,
        lora_dir=str(lora_dir) if lora_dir else None, embeddings_dir=str(embeddings_dir) if embeddings_dir else None,
        tiled_vae=body.tiled_vae, vae_tile_size=body.vae_tile_size, **guidance_skip(settings, body), **images,
        refiner_switch_at=body.refiner_switch_at or 0.0, controls=controls or [])
    try:
        return request.resolved(native_size)
    except ValueError as error:
        raise ApiError(422, str(error)) from None


def info_dict(body: GenerationFields, result: GenerationResult, model: tuple[str, str], inpainting: bool,
              timestamp: str, vae: str | None = None) -> dict[str, Any]:
    request = result.request
    seeds = result.seeds or [request.seed]
    subseeds = result.subseeds or [request.subseed]
    n = len(seeds)
    return {
        "prompt": body.prompt,  # as asked; all_prompts with the styles merged, as A1111
        "all_prompts": [request.prompts[0]] * n if len(request.prompts) == 1 else request.prompts,
        "negative_prompt": body.negative_prompt, "all_negative_prompts": [request.negative_prompt] * n,
        "seed": seeds[0], "all_seeds": seeds,
        "subseed": request.subseed, "all_subseeds": subseeds, "subseed_strength": request.subseed_strength,
        "width": request.width, "height": request.height, "sampler_name": request.sampler,
        "cfg_scale": request.cfg_scale, "steps": request.steps, "batch_size": request.batch_size,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": model[0], "sd_model_hash": model[1],
        "sd_vae_name": vae, "sd_vae_hash": None,
        "seed_resize_from_w": request.seed_resize_from_w if request.seed_resize else -1,
        "seed_resize_from_h": request.seed_resize_from_h if request.seed_resize else -1,
        "denoising_strength": request.denoising_strength if request.init_image is not None or request.hires
        else None,
        "extra_generation_params": guidance_skip_params(request), "index_of_first_image": 0,
        "infotexts": result.infotexts, "styles": body.styles or [], "job_timestamp": timestamp,
        "clip_skip": request.clip_skip, "is_using_inpainting_conditioning": inpainting, "version": VERSION,
    }


def respond(body: GenerationFields, result: GenerationResult, model: tuple[str, str], inpainting: bool,
            outputs: Path | None, kind: str, vae: str | None = None,
            extra_images: list[Image.Image] = ()) -> dict[str, Any]:
    """A1111's answer; ``extra_images`` (ControlNet's detected maps, as the extension adds them) follow the images."""
    timestamp = time.strftime("%Y%m%d%H%M%S")
    if body.save_images and outputs is not None:
        folder = outputs / f"{kind}-images"
        folder.mkdir(parents=True, exist_ok=True)
        start = len(list(folder.glob("*.png")))
        for i, (image, seed, text) in enumerate(zip(result.images, result.seeds, result.infotexts)):
            save_png(image, folder / f"{start + i:05d}-{seed}.png", text)
    images = [base64.b64encode(png_bytes(im, text)).decode() for im, text in zip(result.images, result.infotexts)] \
        + [base64.b64encode(png_bytes(im)).decode() for im in extra_images] if body.send_images else []
    info = info_dict(body, result, model, inpainting, timestamp, vae)
    parameters = body.model_dump(exclude={"init_images", "mask"})
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}
