"""The LDM/SGM single-file layout: one state dict holding every component under its prefix.

SD1: model.diffusion_model.* / first_stage_model.* / cond_stage_model.transformer.* (HF CLIP names)
SD2: ... / cond_stage_model.model.* (OpenCLIP names)
SDXL: ... / conditioner.embedders.0.transformer.* (HF) and conditioner.embedders.1.model.* (OpenCLIP)
SDXL refiner: ... / conditioner.embedders.0.model.* (OpenCLIP-G alone)"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..models.configs import ModelConfig, TextEncoderConfig
from .detect import TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX
from .errors import CheckpointError
from .keymap import from_openclip, to_openclip

CONFIG_METADATA_KEY = "stable_diffusion.config"

# Keys that official checkpoints carry beside the weights we use; dropped on load.
_TEXT_LEFTOVERS = ("text_model.embeddings.position_ids", "logit_scale", "attn_mask")


def text_prefixes(config: ModelConfig) -> list[tuple[str, str]]:
    """(prefix, layout) for each text encoder of ``config``."""
    if config.family in TEXT_PREFIXES and len(TEXT_PREFIXES[config.family]) == len(config.text_encoders):
        return TEXT_PREFIXES[config.family]
    if len(config.text_encoders) == 2:
        return TEXT_PREFIXES["sdxl"]
    return TEXT_PREFIXES["sd2" if config.text_encoders[0].layout == "openclip" else "sd1"]


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def text_encoder_from_layout(sd: dict[str, torch.Tensor], config: TextEncoderConfig, layout: str) -> dict[str, torch.Tensor]:
    """A text encoder's own-prefix-stripped weights, in our (HF CLIP) names."""
    sd = {k: v for k, v in sd.items() if k not in _TEXT_LEFTOVERS}
    if layout == "openclip":
        sd = from_openclip(sd, config)
    if not config.projection_dim:
        sd.pop("text_projection.weight", None)  # SD2 ships OpenCLIP's projection; SD never uses it
    # keep the first config.layers layers; a diffusers SD2 encoder (23 of 24) needs nothing more
    return sd


def split_components(sd: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, dict[str, torch.Tensor]]:
    """{"unet": ..., "vae": ..., "text_encoder_0": ..., ...} in our module names, leftovers removed."""
    parts = {"unet": _strip(sd, UNET_PREFIX), "vae": _strip(sd, VAE_PREFIX)}
    parts["vae"] = {k: v for k, v in parts["vae"].items() if not k.startswith("loss.")}  # LDM discriminator
    for i, ((prefix, layout), tc) in enumerate(zip(text_prefixes(config), config.text_encoders, strict=True)):
        part = _strip(sd, prefix)
        if not part:
            raise CheckpointError(f"no text encoder weights under {prefix}*")
        parts[f"text_encoder_{i}"] = text_encoder_from_layout(part, tc, layout)
    return parts


def join_components(parts: Mapping[str, Mapping[str, torch.Tensor]], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of ``split_components``: one state dict in the official single-file layout."""
    out = {UNET_PREFIX + k: v for k, v in parts["unet"].items()}
    out.update({VAE_PREFIX + k: v for k, v in parts["vae"].items()})
    for i, ((prefix, layout), tc) in enumerate(zip(text_prefixes(config), config.text_encoders, strict=True)):
        part = dict(parts[f"text_encoder_{i}"])
        if layout == "openclip":
            part = to_openclip(part, tc)
        out.update({prefix + k: v for k, v in part.items()})
    return out
