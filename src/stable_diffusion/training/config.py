"""The training config: one TOML file for data, model sizes and optimisation, validated as a whole by pydantic
before anything runs. Sections mirror a classic from-scratch LDM config ([train], [unet], [diffusion], [vae],
[text_encoder]) plus [data], [refine], [lora] and [clip]. Unknown sections or keys, wrong types and values out
of range are one-line errors, so a typo never silently trains the wrong model.

A config may start from another (nanoGPT's fine-tune configs): ``base = "builtin.toml"`` (a path relative to the
file) takes that config's keys, and the file states only what it changes; sections merge key by key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..models.configs import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig

Stage = Literal["vae", "decoder", "unet", "refine", "lora", "clip", "controlnet"]
Fraction = Field(ge=0.0, le=1.0)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, allow_inf_nan=False)


class TrainSection(_Section):
    stages: list[Stage] = Field(default_factory=lambda: ["vae", "unet"], min_length=1)  # run in this order
    steps: int = Field(1000, ge=0)  # optimiser steps of the UNet (or LoRA) stage; 0 with epochs > 0: from epochs
    epochs: int = Field(0, ge=0)  # folder datasets: passes over the data (overrides steps when > 0)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    # AdamW's (beta1, beta2), every stage
    adam_betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2)
    warmup_steps: int = Field(100, ge=0)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, ge=0)  # 0: no clipping
    ema_decay: float = Field(0.999, ge=0, lt=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # fp16 on CUDA only
    train_text_encoder: bool = True  # jointly with the UNet
    save_path: str = Field("runs/model", min_length=1)
    save_every: int = Field(500, ge=1)
    sample_every: int = Field(0, ge=0)  # 0: never
    sample_prompts: list[str] = Field(default_factory=list)
    log_every: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)
    threads: int = Field(0, ge=0)  # torch threads per process; 0 = torch's default
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    base_model: str = ""  # fine-tune: a checkpoint path or preset; "" = train from scratch
    export_dtype: Literal["fp32", "fp16", "bf16"] = "fp16"
    gradient_checkpointing: bool = False  # recompute UNet / ControlNet block activations in backward: less memory
    strategy: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: the unet / refine stages DDP or FSDP-sharded

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, betas: list[float]) -> list[float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError("must be two numbers in [0, 1)")
        return betas

    @model_validator(mode="after")
    def _length(self) -> TrainSection:
        if self.steps == 0 and self.epochs == 0:
            raise ValueError("steps must be at least 1 (or give epochs for a folder dataset)")
        return self


class DataSection(_Section):
    kind: Literal["shapes", "folder"] = "shapes"
    path: str = ""  # folder datasets: images with same-name .txt captions
    size: int = Field(64, ge=8, multiple_of=8)
    two_object_fraction: float = Field(0.4, ge=0, le=1)
    small_fraction: float = Field(0.5, ge=0, le=1)  # the share of single objects drawn small
    caption_dropout: float = Field(0.1, ge=0, le=1)  # empty captions, for classifier-free guidance
    random_crop: bool = False
    flip: bool = False
    seed: int = Field(0, ge=0)


class DiffusionSection(_Section):
    timesteps: int = Field(1000, ge=2)
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "linear"
    beta_range: list[float] = Field(default_factory=lambda: [1e-4, 0.02], min_length=2, max_length=2)
    prediction: Literal["eps", "v"] = "eps"
    loss_weighting: Literal["none", "min_snr", "truncated_snr"] = "none"  # see training/objectives.py
    snr_gamma: float = Field(5.0, gt=0)  # min_snr: Hang et al.'s gamma
    snr_floor: float = Field(1.0, gt=0)  # truncated_snr: the x0 error's weight is max(SNR, snr_floor)
    snr_weight_cap: float = Field(0.0, ge=0)  # truncated_snr: > 0 caps the noise error's weight
    # a sample whose caption contains the word or phrase KEY weighs VALUE in the batch's mean loss (the largest
    # match; others 1), e.g. {small = 2.0}: kohya's dataset repeats, chosen by caption
    caption_weights: dict[str, float] = Field(default_factory=dict)

    @field_validator("beta_range")
    @classmethod
    def _range(cls, betas: list[float]) -> list[float]:
        if not 0 < betas[0] < betas[1] < 1:
            raise ValueError("must be two numbers 0 < low < high < 1")
        return betas

    @field_validator("caption_weights")
    @classmethod
    def _weights(cls, weights: dict[str, float]) -> dict[str, float]:
        for key, weight in weights.items():
            if not weight > 0 or not key.strip():
                raise ValueError(f"{key!r} = {weight!r}; need a word and a number > 0")
        return weights


class VAESection(_Section):
    ch: int = Field(32, ge=1)
    ch_mult: list[int] = Field(default_factory=lambda: [1, 2, 2], min_length=1)
    num_res_blocks: int = Field(1, ge=1)
    z_channels: int = Field(4, ge=1)
    norm_groups: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    steps: int = Field(2000, ge=1)  # the VAE stage's own optimisation
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    kl_weight: float = Field(1e-6, ge=0)
    object_weight: float = Field(1.0, ge=1)  # > 1: weight of pixels unlike the background (top-left) colour
    object_contrast: float = Field(0.0, ge=0)  # > 0: object pixels this close to the background count up to 4x
    object_margin: int = Field(0, ge=0)  # > 0: background pixels this close to an object get object_weight too
    disc_weight: float = Field(0.0, ge=0)  # > 0: a PatchGAN discriminator's hinge loss, at this weight
    disc_start: int = Field(0, ge=0)  # VAE step from which the discriminator plays
    disc_channels: int = Field(64, ge=1)
    disc_layers: int = Field(3, ge=1)
    checkpoint: str = ""  # reuse a trained VAE (a model file) instead of the VAE stage
    # > 0: fit the scaling factor so the scaled latents have this std (larger: every noise level is cleaner
    # for the image); 0: 1 (LDM's) for a VAE trained here, a base model's or reused VAE's own factor kept
    latent_std: float = Field(0.0, ge=0)


class DecoderSection(_Section):
    """The "decoder" stage: the VAE's decoder fine-tuned with its encoder frozen, as Stability's ft-EMA / ft-MSE
    decoders for SD1.x: the latents stay the same, so the UNet and every ControlNet trained on them still fit. The
    loss is the VAE stage's ([vae] kl_weight aside: object_weight, object_contrast, object_margin, disc_*)."""
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    free_fraction: float = Field(0.0, ge=0, le=1)  # shapes: scenes at free positions and sizes (as layouts place them)


class RefineSection(_Section):
    """The "refine" stage: after "unet", Algorithm 1 again from its EMA weights with a fresh optimiser, a lower
    learning rate and optionally a refitted latent scale: a curriculum in one run (train at LDM's unit latent
    variance, then refine at a larger one, where every noise level shows the image more clearly)."""
    steps: int = Field(1000, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    latent_std: float = Field(0.0, ge=0)  # > 0: refit the scaling factor to this std first; 0: keep the factor
    batch_size: int = Field(0, ge=0)  # 0: [train] batch_size


class TextEncoderSection(_Section):
    width: int = Field(128, ge=1)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    intermediate: int = Field(512, ge=1)


class UNetSection(_Section):
    """Overrides of ``UNetConfig`` (LDM names); unset keys keep its defaults."""
    model_channels: int | None = Field(None, ge=1)
    channel_mult: list[int] | None = Field(None, min_length=1)
    num_res_blocks: int | None = Field(None, ge=1)
    attention_resolutions: list[int] | None = None
    num_heads: int | None = Field(None, ge=1)
    num_head_channels: int | None = None
    transformer_depth: int | list[int] | None = None
    transformer_depth_middle: int | None = Field(None, ge=0)
    context_dim: int | None = Field(None, ge=1)
    dropout: float | None = Field(None, ge=0, lt=1)
    use_scale_shift_norm: bool | None = None
    resblock_updown: bool | None = None
    use_linear_in_transformer: bool | None = None


class LoraSection(_Section):
    rank: int = Field(8, ge=1)
    alpha: float = Field(8.0, gt=0)
    targets: list[str] = Field(default_factory=lambda: ["attn1", "attn2"], min_length=1)  # UNet name fragments
    output: str = Field("lora.safetensors", min_length=1)


class ClipSection(_Section):
    """The "clip" stage: a small CLIP (ViT image tower + text tower) trained contrastively on the data; the
    domain model behind the CLIP score and the FID features of the shapes domain."""
    image_size: int = Field(64, ge=8)
    patch_size: int = Field(8, ge=1)
    vision_width: int = Field(64, ge=1)
    vision_layers: int = Field(2, ge=1)
    text_width: int = Field(64, ge=1)
    text_layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    projection_dim: int = Field(64, ge=1)
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    output: str = Field("clip", min_length=1)  # folder under save_path (transformers' CLIPModel layout)


class ControlNetSection(_Section):
    """The "controlnet" stage (Zhang et al. 2023): a ControlNet for the (frozen) model, its encoder copied from the
    UNet, its zero convolutions at zero; the control image of a shapes scene is its layout (the objects' filled
    silhouettes, white on black); of a folder dataset, the same-named file under ``control_path``."""
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    control_path: str = ""  # folder datasets: the control images, at the images' relative paths
    free_fraction: float = Field(0.0, ge=0, le=1)  # shapes: scenes at free positions and sizes (free_layout)
    outline_fraction: float = Field(0.0, ge=0, le=1)  # shapes: layouts drawn as outlines instead of filled
    object_weight: float = Field(1.0, ge=1)  # > 1: latent positions under the drawn layout weigh this much more
    output: str = Field("controlnet.safetensors", min_length=1)


class TrainConfig(_Section):
    train: TrainSection = Field(default_factory=TrainSection)
    data: DataSection = Field(default_factory=DataSection)
    diffusion: DiffusionSection = Field(default_factory=DiffusionSection)
    vae: VAESection = Field(default_factory=VAESection)
    text_encoder: TextEncoderSection = Field(default_factory=TextEncoderSection)
    unet: UNetSection = Field(default_factory=UNetSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    clip: ClipSection = Field(default_factory=ClipSection)
    refine: RefineSection = Field(default_factory=RefineSection)
    controlnet: ControlNetSection = Field(default_factory=ControlNetSection)
    decoder: DecoderSection = Field(default_factory=DecoderSection)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.data.kind == "folder" and not self.data.path:
            raise ValueError("[data] kind = \"folder\" needs [data] path")
        if "controlnet" in self.train.stages and self.data.kind == "folder" and not self.controlnet.control_path:
            raise ValueError("[controlnet] control_path: a folder dataset needs its control images")
        if self.data.kind == "folder" and (self.controlnet.free_fraction or self.controlnet.outline_fraction):
            raise ValueError("[controlnet] free_fraction, outline_fraction: only for shapes data (a folder dataset "
                             "brings its own control images)")
        if self.data.kind == "folder" and self.decoder.free_fraction:
            raise ValueError("[decoder] free_fraction: only for shapes data")
        if "decoder" in self.train.stages and not (self.train.base_model or self.vae.checkpoint) and \
                "vae" not in self.train.stages[:self.train.stages.index("decoder")]:
            raise ValueError("[train] stages: \"decoder\" needs a VAE: base_model, [vae] checkpoint, or the \"vae\" "
                             "stage before")
        if "controlnet" in self.train.stages and not self.train.base_model and \
                "unet" not in self.train.stages[:self.train.stages.index("controlnet")]:
            raise ValueError("[train] stages: \"controlnet\" needs a model: base_model, or the \"unet\" stage before")
        if "refine" in self.train.stages and "unet" not in self.train.stages[:self.train.stages.index("refine")]:
            raise ValueError("[train] stages: \"refine\" continues the \"unet\" stage, so it must come after it")
        if not self.train.base_model and ({"unet", "refine"} & set(self.train.stages)):
            self.new_model_config()  # a from-scratch model must be buildable: sizes that fit together
        return self

    def new_model_config(self) -> ModelConfig:
        """The ModelConfig of a from-scratch model: a single CLIP-style text encoder (the SD1 layout)."""
        text = TextEncoderConfig(width=self.text_encoder.width, layers=self.text_encoder.layers,
                                 heads=self.text_encoder.heads, intermediate=self.text_encoder.intermediate)
        unet = UNetConfig(**{"context_dim": text.width, **self.unet.model_dump(exclude_none=True)})
        if unet.context_dim != text.width:
            raise ValueError(f"[unet] context_dim {unet.context_dim} must equal [text_encoder] width {text.width}")
        vae = VAEConfig(ch=self.vae.ch, ch_mult=tuple(self.vae.ch_mult), num_res_blocks=self.vae.num_res_blocks,
                        z_channels=self.vae.z_channels, embed_dim=self.vae.z_channels, dropout=self.vae.dropout,
                        norm_groups=self.vae.norm_groups, scaling_factor=1.0)
        down = 2 ** (len(vae.ch_mult) - 1) * 2 ** (len(unet.channel_mult) - 1)
        if self.data.size % down:
            raise ValueError(f"[data] size {self.data.size} must be a multiple of {down} (the VAE's and the UNet's "
                             f"downsampling together)")
        low, high = self.diffusion.beta_range
        return ModelConfig(family="sd1", unet=unet, vae=vae, text_encoders=[text],
                           prediction=self.diffusion.prediction, image_size=self.data.size,
                           timesteps=self.diffusion.timesteps, beta_schedule=self.diffusion.beta_schedule,
                           beta_start=low, beta_end=high, name=Path(self.train.save_path).name)


def _one_line(error: ValidationError) -> str:
    """pydantic's report as one line: ``[section] key: what is wrong (got value)``."""
    parts = []
    for e in error.errors():
        loc = [str(p) for p in e["loc"]]
        where = f"[{loc[0]}] {'.'.join(loc[1:])}".strip() if loc else ""
        if e["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown {'key' if len(loc) > 1 else 'section'}")
            continue
        message = e["msg"].removeprefix("Value error, ")
        got = f" (got {e['input']!r})" if len(loc) > 1 and e["type"] != "missing" else ""
        parts.append(f"{where}: {message}{got}" if loc else message)
    return "; ".join(parts)


def parse_config(data: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from parsed TOML (``base`` already merged), every key checked."""
    if not data:
        raise ValueError("the config is empty: it needs at least [train] stages")
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        raise ValueError(_one_line(error)) from None


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) \
            else value
    return merged


def read_toml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The TOML of ``path`` with its ``base`` chain merged in (the file's own keys win)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f"config {path}: its base chain comes back to itself")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"cannot read config {path}: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from None
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ValueError(f"config {path}: base must be a path to another config, not {base!r}")
    return _merge(read_toml(path.parent / base, (*_seen, path)), data)


def load_config(path: str | Path) -> TrainConfig:
    data = read_toml(path)
    try:
        return parse_config(data)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
