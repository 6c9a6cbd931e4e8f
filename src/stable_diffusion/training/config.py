"""The training config: one TOML file for data, model sizes and optimisation. Sections mirror a classic
from-scratch LDM config ([train], [unet], [diffusion], [vae], [text_encoder]) plus [data] and [lora].
Unknown sections or keys are errors, so a typo never silently trains the wrong model."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.configs import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig


@dataclass
class TrainSection:
    stages: list[str] = field(default_factory=lambda: ["vae", "unet"])  # vae | unet | refine | lora | clip, in order
    steps: int = 1000  # optimiser steps of the UNet (or LoRA) stage; 0 with epochs > 0: derived from epochs
    epochs: int = 0  # folder datasets: passes over the data (overrides steps when > 0)
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's (beta1, beta2), every stage
    warmup_steps: int = 100
    grad_accum: int = 1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 on CUDA only)
    train_text_encoder: bool = True  # jointly with the UNet
    save_path: str = "runs/model"
    save_every: int = 500
    sample_every: int = 0  # 0: never
    sample_prompts: list[str] = field(default_factory=list)
    log_every: int = 10
    seed: int = 0
    threads: int = 0  # torch threads per process; 0 = torch's default
    device: str = "auto"  # auto | cpu | cuda
    base_model: str = ""  # fine-tune: a checkpoint path or preset; "" = train from scratch
    export_dtype: str = "fp16"


@dataclass
class DataSection:
    kind: str = "shapes"  # shapes | folder
    path: str = ""  # folder datasets: images with same-name .txt captions
    size: int = 64
    two_object_fraction: float = 0.4
    small_fraction: float = 0.5  # the share of single objects drawn small
    caption_dropout: float = 0.1  # empty captions, for classifier-free guidance
    random_crop: bool = False
    flip: bool = False
    seed: int = 0


@dataclass
class DiffusionSection:
    timesteps: int = 1000
    beta_schedule: str = "linear"  # linear | scaled_linear | cosine
    beta_range: list[float] = field(default_factory=lambda: [1e-4, 0.02])
    prediction: str = "eps"  # eps | v
    loss_weighting: str = "none"  # none | min_snr | truncated_snr (see training/objectives.py)
    snr_gamma: float = 5.0  # min_snr: Hang et al.'s gamma
    snr_floor: float = 1.0  # truncated_snr: the x0 error's weight is max(SNR, snr_floor)
    snr_weight_cap: float = 0.0  # truncated_snr: > 0 caps the noise error's weight (the clean end's is 1)
    # a sample whose caption contains the word or phrase KEY weighs VALUE in the batch's mean loss (the largest
    # match; others 1), e.g. {small = 2.0}: kohya's dataset repeats, chosen by caption
    caption_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class VAESection:
    ch: int = 32
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    z_channels: int = 4
    norm_groups: int = 32
    dropout: float = 0.0
    steps: int = 2000  # the VAE stage's own optimisation
    batch_size: int = 16
    learning_rate: float = 1e-3
    kl_weight: float = 1e-6
    object_weight: float = 1.0  # > 1: reconstruction weight of pixels unlike the background (top-left) colour
    object_contrast: float = 0.0  # > 0: object pixels closer than this to the background count up to 4x more
    object_margin: int = 0  # > 0: background pixels this close (in pixels) to an object get object_weight too
    disc_weight: float = 0.0  # > 0: a PatchGAN discriminator's hinge loss, at this weight (0 = off)
    disc_start: int = 0  # VAE step from which the discriminator plays
    disc_channels: int = 64
    disc_layers: int = 3
    checkpoint: str = ""  # reuse a trained VAE (a model file) instead of the VAE stage
    # > 0: fit the scaling factor so the scaled latents have this std (larger: every noise level is cleaner
    # for the image); 0: 1 (LDM's) for a VAE trained here, a base model's or reused VAE's own factor kept
    latent_std: float = 0.0


@dataclass
class RefineSection:
    """The "refine" stage: after "unet", Algorithm 1 again from its EMA weights with a fresh optimiser, a lower
    learning rate and optionally a refitted latent scale: a curriculum in one run (train at LDM's unit latent
    variance, then refine at a larger one, where every noise level shows the image more clearly)."""
    steps: int = 1000
    learning_rate: float = 2e-4
    warmup_steps: int = 100
    latent_std: float = 0.0  # > 0: refit the scaling factor to this std first; 0: keep the factor
    batch_size: int = 0  # 0: [train] batch_size


@dataclass
class TextEncoderSection:
    width: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 512


@dataclass
class LoraSection:
    rank: int = 8
    alpha: float = 8.0
    targets: list[str] = field(default_factory=lambda: ["attn1", "attn2"])  # module-name fragments in the UNet
    output: str = "lora.safetensors"


@dataclass
class ClipSection:
    """The "clip" stage: a small CLIP (ViT image tower + text tower) trained contrastively on the data; the
    domain model behind the CLIP score and the FID features of the shapes domain."""
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 2
    text_width: int = 64
    text_layers: int = 2
    heads: int = 4
    projection_dim: int = 64
    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 1e-3
    output: str = "clip"  # folder under save_path (transformers' CLIPModel layout)


UNET_KEYS = ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads",
             "num_head_channels", "transformer_depth", "transformer_depth_middle", "context_dim", "dropout",
             "use_scale_shift_norm", "resblock_updown", "use_linear_in_transformer")


@dataclass
class TrainConfig:
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    vae: VAESection = field(default_factory=VAESection)
    text_encoder: TextEncoderSection = field(default_factory=TextEncoderSection)
    unet: dict[str, Any] = field(default_factory=dict)
    lora: LoraSection = field(default_factory=LoraSection)
    clip: ClipSection = field(default_factory=ClipSection)
    refine: RefineSection = field(default_factory=RefineSection)

    def model_config(self) -> ModelConfig:
        """The ModelConfig of a from-scratch model: a single CLIP-style text encoder (the SD1 layout)."""
        text = TextEncoderConfig(width=self.text_encoder.width, layers=self.text_encoder.layers,
                                 heads=self.text_encoder.heads, intermediate=self.text_encoder.intermediate)
        unet = UNetConfig(**{"context_dim": text.width, **self.unet})
        if unet.context_dim != text.width:
            raise ValueError(f"[unet] context_dim {unet.context_dim} must equal [text_encoder] width {text.width}")
        vae = VAEConfig(ch=self.vae.ch, ch_mult=tuple(self.vae.ch_mult), num_res_blocks=self.vae.num_res_blocks,
                        z_channels=self.vae.z_channels, embed_dim=self.vae.z_channels, dropout=self.vae.dropout,
                        norm_groups=self.vae.norm_groups,
                        scaling_factor=1.0)
        low, high = self.diffusion.beta_range
        return ModelConfig(family="sd1", unet=unet, vae=vae, text_encoders=[text],
                           prediction=self.diffusion.prediction, image_size=self.data.size,
                           timesteps=self.diffusion.timesteps, beta_schedule=self.diffusion.beta_schedule,
                           beta_start=low, beta_end=high, name=Path(self.train.save_path).name)


def _section(cls: type, name: str, data: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown key(s) in [{name}]: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**data)


def parse_config(data: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from parsed TOML, refusing unknown sections and keys."""
    sections = {"train": TrainSection, "data": DataSection, "diffusion": DiffusionSection, "vae": VAESection,
                "text_encoder": TextEncoderSection, "lora": LoraSection, "clip": ClipSection, "refine": RefineSection}
    unknown = sorted(set(data) - set(sections) - {"unet"})
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; known: {sorted([*sections, 'unet'])}")
    unet = dict(data.get("unet", {}))
    bad = sorted(set(unet) - set(UNET_KEYS))
    if bad:
        raise ValueError(f"unknown key(s) in [unet]: {', '.join(bad)}; known: {', '.join(UNET_KEYS)}")
    config = TrainConfig(unet=unet, **{k: _section(cls, k, data.get(k, {})) for k, cls in sections.items()})
    for stage in config.train.stages:
        if stage not in ("vae", "unet", "refine", "lora", "clip"):
            raise ValueError(f"unknown stage {stage!r} in [train] stages (vae, unet, refine, lora, clip)")
    if not config.refine.latent_std >= 0 or config.refine.steps < 1:
        raise ValueError(f"[refine] needs steps >= 1 and latent_std >= 0 (0 = keep the scale), not "
                         f"{config.refine.steps} and {config.refine.latent_std}")
    if config.refine.batch_size < 0:
        raise ValueError(f"[refine] batch_size must be >= 0 (0 = [train] batch_size), not {config.refine.batch_size}")
    if config.data.kind not in ("shapes", "folder"):
        raise ValueError(f"unknown [data] kind {config.data.kind!r} (shapes or folder)")
    if config.diffusion.loss_weighting not in ("none", "min_snr", "truncated_snr"):
        raise ValueError(f"[diffusion] loss_weighting must be none, min_snr or truncated_snr, "
                         f"not {config.diffusion.loss_weighting!r}")
    for key, weight in config.diffusion.caption_weights.items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0 or not key.strip():
            raise ValueError(f"[diffusion] caption_weights: {key!r} = {weight!r}; need a word and a number > 0")
    for key in ("two_object_fraction", "small_fraction", "caption_dropout"):
        if not 0 <= getattr(config.data, key) <= 1:
            raise ValueError(f"[data] {key} must be between 0 and 1, not {getattr(config.data, key)}")
    if config.vae.object_weight < 1:
        raise ValueError(f"[vae] object_weight must be >= 1 (1 = every pixel alike), not {config.vae.object_weight}")
    if config.vae.object_contrast < 0:
        raise ValueError(f"[vae] object_contrast must be >= 0 (0 = off), not {config.vae.object_contrast}")
    if config.vae.object_margin < 0:
        raise ValueError(f"[vae] object_margin must be >= 0 pixels (0 = off), not {config.vae.object_margin}")
    if not config.vae.latent_std >= 0:
        raise ValueError(f"[vae] latent_std must be >= 0 (0 = LDM's unit variance, or a base model's own scale), "
                         f"not {config.vae.latent_std}")
    betas = config.train.adam_betas
    numbers = isinstance(betas, list) and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)
    if not numbers or len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"[train] adam_betas must be two numbers in [0, 1), not {betas!r}")
    if config.train.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"[train] mixed_precision must be no, bf16 or fp16, not {config.train.mixed_precision!r}")
    return config


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"cannot read config {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from None
    return parse_config(data)
