"""Request bodies of the AUTOMATIC1111 API (/sdapi/v1), with its field names and defaults, and the ranges every
value must lie in (a 422 otherwise; floats must be finite). The server's own limits (largest size, steps, images)
are checked in generation.check_limits. A1111 fields this server does not implement (face restoration, tiling,
the k-diffusion churn settings, scripts other than those it has, ...) are declared with A1111's
defaults, which clients send with every request and which pass; any other value is a 422 naming the field, never
silently ignored. Keys A1111 does not know are ignored, as A1111 does."""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator


class GenerationFields(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)  # the schema's types, no coercion

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = Field(-1, ge=-1, lt=2**63)  # -1: random
    subseed: int = Field(-1, ge=-1, lt=2**63)
    subseed_strength: float = Field(0.0, ge=0, le=1)
    seed_resize_from_w: int = Field(-1, ge=-1, le=8192)  # -1 (or 0): off
    seed_resize_from_h: int = Field(-1, ge=-1, le=8192)
    sampler_name: str | None = None
    sampler_index: str | None = None  # the old name of sampler_name
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = Field(50, ge=1)
    cfg_scale: float = Field(7.0, ge=0, le=100)
    width: int = Field(512, ge=64)  # rounded down to a multiple of 8, as A1111's latent size does
    height: int = Field(512, ge=64)
    eta: float | None = Field(None, ge=0)
    s_churn: float | None = Field(None, ge=0)  # the k-diffusion churn settings: A1111's defaults only (see below)
    s_tmax: float | None = Field(None, ge=0)
    s_tmin: float | None = Field(None, ge=0)
    s_noise: float | None = Field(None, ge=0)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    refiner_checkpoint: str | None = None  # an SDXL refiner by title or name; None, "" and "None": no refiner
    refiner_switch_at: float | None = Field(None, ge=0, le=1)  # None: the refiner from the first step (A1111)
    disable_extra_networks: bool = False
    infotext: str | None = None
    comments: dict[str, Any] | None = None
    s_min_uncond: float | None = Field(None, ge=0)  # NGMS; None: the "s_min_uncond" option
    clip_skip: int | None = Field(None, ge=1, le=12)
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    denoising_strength: float = Field(0.75, ge=0, le=1)
    # this server's own (not in A1111): the VAE in tiles of vae_tile_size pixels, for large images on small memory
    tiled_vae: bool = False
    vae_tile_size: int = Field(512, ge=64, le=4096, multiple_of=8)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, size: int) -> int:
        return size // 8 * 8

    @field_validator("*")
    @classmethod
    def _implemented(cls, value: Any, info: ValidationInfo) -> Any:
        """No silent ignoring: a field this server does not implement takes only A1111's default."""
        allowed = UNIMPLEMENTED.get(info.field_name)
        if allowed is not None and not _is_default(value, allowed):
            shown = " or ".join(json.dumps(a) for a in allowed)
            raise ValueError(f"not implemented by this server; only A1111's default ({shown}) is accepted")
        return value

    @field_validator("alwayson_scripts")
    @classmethod
    def _no_active_scripts(cls, scripts: dict[str, Any]) -> dict[str, Any]:
        """Always-on scripts (extensions) this server does not have pass only when they carry no arguments."""
        for name, entry in scripts.items():
            if name in ("controlnet", "ControlNet") and isinstance(entry, dict):
                if not isinstance(entry.get("args", []), list):
                    raise ValueError(f"{name!r}: args must be a list of ControlNet units")
                continue  # server/controlnet.py reads its units
            if not isinstance(entry, dict) or entry.get("args"):
                raise ValueError(f"{name!r}: always-on scripts are not implemented by this server")
        return scripts


UNIMPLEMENTED: dict[str, tuple] = {  # field -> the values that pass (A1111's defaults as clients send them)
    "s_churn": (None, 0), "s_tmin": (None, 0), "s_tmax": (None, 0, math.inf), "s_noise": (None, 1),
    "restore_faces": (None, False), "tiling": (None, False),
    "disable_extra_networks": (False,),
    "infotext": (None, ""), "hr_checkpoint_name": (None, "", "Use same checkpoint"),
    "initial_noise_multiplier": (None, 1), "firstpass_image": (None, ""),
}


def _is_default(value: Any, allowed: tuple) -> bool:
    return any(value is a or (type(value) is not bool and type(a) is not bool and value == a) for a in allowed)


class Txt2ImgRequest(GenerationFields):
    enable_hr: bool = False  # A1111's hires fix (hires.py); the hr_ fields count only with it
    hr_scale: float = Field(2.0, gt=0, le=16)
    hr_upscaler: str | None = None  # None: "Latent"; GET /latent-upscale-modes and /upscalers list the names
    hr_second_pass_steps: int = Field(0, ge=0)
    hr_resize_x: int = Field(0, ge=0, le=16384)
    hr_resize_y: int = Field(0, ge=0, le=16384)
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_cfg: float | None = Field(None, ge=0, le=100)  # None: cfg_scale
    firstphase_width: int = Field(0, ge=0)  # A1111's old fields: a non-zero value is the first pass's size
    firstphase_height: int = Field(0, ge=0)
    hr_checkpoint_name: str | None = None
    firstpass_image: str | None = None


class Img2ImgRequest(GenerationFields):
    init_images: list[str] | None = None
    mask: str | None = None
    resize_mode: int = Field(0, ge=0, le=3)  # 0 just resize, 1 crop and resize, 2 resize and fill, 3 latent resize
    mask_blur: int = Field(4, ge=0, le=256)
    mask_blur_x: int | None = Field(None, ge=0, le=256)
    mask_blur_y: int | None = Field(None, ge=0, le=256)
    inpainting_fill: int = Field(0, ge=0, le=3)  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = Field(0, ge=0)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    include_init_images: bool = False
    image_cfg_scale: float | None = None  # instruct-pix2pix only: no effect on other models, as in A1111
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None  # a second mask for the latent side (base64 image; with a mask)
    mask_round: bool = True  # A1111's: the latent blending mask rounded to 0 / 1 (False: soft blending)


class InterrogateRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    image: str = ""  # base64, or a data URL
    model: str = "clip"  # A1111: clip or deepdanbooru


class ExtrasFields(BaseModel):
    """A1111's Extras tab: upscale (and face restoration, which this server does not have: visibility 0 only)."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    resize_mode: int = Field(0, ge=0, le=1)  # 0: scale by upscaling_resize, 1: to upscaling_resize_w x _h
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=0)  # face restoration is not implemented: only 0 passes
    codeformer_visibility: float = Field(0, ge=0, le=0)
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2, ge=1, le=8)
    upscaling_resize_w: int = Field(512, ge=1, le=16384)
    upscaling_resize_h: int = Field(512, ge=1, le=16384)
    upscaling_crop: bool = True
    upscaler_1: str | None = "None"
    upscaler_2: str | None = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasFields):
    image: str = ""


class ImageItem(BaseModel):
    model_config = ConfigDict(strict=True)
    data: str
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasFields):
    imageList: list[ImageItem] = Field(default_factory=list, max_length=64)  # noqa: N815 - A1111's field name


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    image: str = ""


class Limits(BaseModel):
    """What one request may ask for; beyond it is a 422, never an out-of-memory worker."""
    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_images: int = 16  # batch_size * n_iter
    max_batch_size: int = 8
    max_upscaled: int = 8192  # the largest side an Extras upscale may produce
    max_plot_cells: int = 64  # cells of an X/Y/Z plot, tiles of a poor man's outpainting


class Options(BaseModel):
    """The server-wide settings (GET / POST /options, and a body's ``override_settings``): those this server
    reads are typed and ranged, so a bad value is a 422 and nothing is stored; other keys (UI settings of A1111
    that clients set) are kept as given."""
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    sd_model_checkpoint: str | None = None
    sd_vae: str = "Automatic"
    CLIP_stop_at_last_layers: int = Field(1, ge=1, le=12)
    samples_save: bool = True
    samples_format: str = "png"
    outdir_samples: str = ""
    live_previews_enable: bool = True
    eta_ddim: float = Field(0.0, ge=0)
    s_min_uncond: float = Field(0.0, ge=0, le=1e4)  # NGMS: no guidance below this sigma
    s_min_uncond_all: bool = False  # NGMS on every step, not every other
    skip_early_cond: float = Field(0.0, ge=0, le=1)  # Skip Early CFG: no guidance on this fraction of steps


class PngInfoResponse(BaseModel):
    info: str = ""
    items: dict[str, Any] = Field(default_factory=dict)
    parameters: dict[str, Any] = Field(default_factory=dict)


def limited(model: type[GenerationFields], limits: Limits) -> type[GenerationFields]:
    """``model`` with this server's limits in its fields, so the OpenAPI schema states them (a width default of
    512 becomes the largest width allowed when that is smaller)."""
    return create_model(
        model.__name__, __base__=model,
        width=(int, Field(min(512, limits.max_width), ge=64, le=limits.max_width)),
        height=(int, Field(min(512, limits.max_height), ge=64, le=limits.max_height)),
        steps=(int, Field(min(50, limits.max_steps), ge=1, le=limits.max_steps)),
        batch_size=(int, Field(1, ge=1, le=min(limits.max_batch_size, limits.max_images))),
        n_iter=(int, Field(1, ge=1, le=limits.max_images)))
