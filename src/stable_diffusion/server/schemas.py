"""Request bodies of the AUTOMATIC1111 API (/sdapi/v1), with its field names and defaults. Fields clients send
that we do not use (restore_faces, tiling, script_args, ...) are accepted and ignored, as A1111 does."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class GenerationFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    sampler_name: str | None = None
    sampler_index: str | None = None  # the old name of sampler_name
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    eta: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    s_min_uncond: float | None = None  # NGMS; None: the "s_min_uncond" option
    clip_skip: int | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    denoising_strength: float = 0.75


class Txt2ImgRequest(GenerationFields):
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0


class Img2ImgRequest(GenerationFields):
    init_images: list[str] | None = None
    mask: str | None = None
    resize_mode: int = 0  # 0 just resize, 1 crop and resize, 2 resize and fill
    mask_blur: int = 4
    mask_blur_x: int | None = None
    mask_blur_y: int | None = None
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    image: str = ""


class Limits(BaseModel):
    """What one request may ask for; beyond it is a 422, never an out-of-memory worker."""
    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_images: int = 16  # batch_size * n_iter
    max_batch_size: int = 8
