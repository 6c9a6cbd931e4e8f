"""Model family and config from a single-file state dict's keys and shapes (the approach ComfyUI takes).

Works on tensors of any device, ``meta`` and ``torch.empty`` fakes included: only names and shapes are read.
Our own files also carry their exact config in the safetensors metadata, which wins when present."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch

from ..models.configs import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from .errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# (prefix, layout) of each text encoder, per family
TEXT_PREFIXES = {
    "sd1": [("cond_stage_model.transformer.", "openai")],
    "sd2": [("cond_stage_model.model.", "openclip")],
    "sdxl": [("conditioner.embedders.0.transformer.", "openai"), ("conditioner.embedders.1.model.", "openclip")],
    "sdxl-refiner": [("conditioner.embedders.0.model.", "openclip")],
}

Shapes = Mapping[str, torch.Tensor]


def _indices(keys: list[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def detect_family(sd: Shapes) -> str:
    keys = sd.keys()
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "sdxl-refiner"  # OpenCLIP-G alone
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise CheckpointError("no text encoder keys (cond_stage_model.* or conditioner.embedders.*): "
                          "not a Stable Diffusion single-file checkpoint")


def detect_unet(sd: Shapes, prefix: str = UNET_PREFIX, given_heads: dict[str, int] | None = None) -> UNetConfig:
    keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]
    if "input_blocks.0.0.weight" not in keys:
        raise CheckpointError(f"no UNet found (expected {prefix}input_blocks.0.0.weight)")

    def shape(name: str) -> tuple[int, ...]:
        return tuple(sd[prefix + name].shape)

    mc, in_channels = shape("input_blocks.0.0.weight")[:2]
    blocks = _indices(keys, r"input_blocks\.(\d+)\.")[1:]
    levels: list[list[int]] = [[]]
    for n in blocks:
        if f"input_blocks.{n}.0.op.weight" in keys:
            levels.append([])
        else:
            levels[-1].append(n)
    num_res_blocks = len(levels[0])
    channel_mult, depths, attn_res = [], [], []
    context_dim = None
    linear = False
    for level, members in enumerate(levels):
        channel_mult.append(shape(f"input_blocks.{members[0]}.0.out_layers.3.weight")[0] // mc)
        depth = len(_indices(keys, rf"input_blocks\.{members[0]}\.1\.transformer_blocks\.(\d+)\."))
        depths.append(depth)
        if depth:
            attn_res.append(2**level)
            block = f"input_blocks.{members[0]}.1"
            context_dim = shape(f"{block}.transformer_blocks.0.attn2.to_k.weight")[1]
            linear = len(shape(f"{block}.proj_in.weight")) == 2
    middle_depth = len(_indices(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    if middle_depth and context_dim is None:
        context_dim = shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
        linear = len(shape("middle_block.1.proj_in.weight")) == 2
    emb_out = shape(f"input_blocks.{levels[0][0]}.0.emb_layers.1.weight")[0]
    adm = shape("label_emb.0.0.weight")[1] if "label_emb.0.0.weight" in keys else None
    # Heads cannot be read from weights: SD1 uses 8 heads, SD2/SDXL 64-channel heads (as LDM configs say),
    # unless the model.yaml beside the file says otherwise (``heads``)
    heads = dict(num_heads=-1, num_head_channels=64) if linear else dict(num_heads=8, num_head_channels=-1)
    if given_heads:
        heads = {"num_heads": given_heads.get("num_heads", -1),
                 "num_head_channels": given_heads.get("num_head_channels", -1)}
    widths = [mc * m for m, d in zip(channel_mult, depths) if d] + ([mc * channel_mult[-1]] if middle_depth else [])
    head_width = heads["num_head_channels"]
    if head_width > 0 and any(w % head_width for w in widths):
        raise CheckpointError(
            f"its attention layers are {sorted(set(widths))} channels wide, which {head_width}-channel heads "
            f"do not divide, and the head count is not stored in the weights: put a model.yaml beside the file "
            f"with num_head_channels (or num_heads), as A1111 does, or load it from a diffusers folder")
    return UNetConfig(
        in_channels=in_channels, model_channels=mc,
        out_channels=shape("out.2.weight")[0] if "out.2.weight" in keys else in_channels,  # ControlNet: no out
        channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks, attention_resolutions=tuple(attn_res),
        transformer_depth=tuple(depths), transformer_depth_middle=middle_depth, context_dim=context_dim,
        use_linear_in_transformer=linear, adm_in_channels=adm,
        use_scale_shift_norm=emb_out == 2 * shape(f"input_blocks.{levels[0][0]}.0.out_layers.3.weight")[0],
        **heads,
    )


def detect_vae(sd: Shapes, prefix: str = VAE_PREFIX) -> VAEConfig:
    if prefix + "encoder.conv_in.weight" not in sd:
        raise CheckpointError(f"no VAE found (expected {prefix}encoder.conv_in.weight)")
    keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]
    ch, in_channels = sd[prefix + "encoder.conv_in.weight"].shape[:2]
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    ch_mult = tuple(sd[f"{prefix}encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
    return VAEConfig(
        in_channels=in_channels, out_ch=sd[prefix + "decoder.conv_out.weight"].shape[0], ch=ch, ch_mult=ch_mult,
        num_res_blocks=len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")),
        z_channels=sd[prefix + "decoder.conv_in.weight"].shape[1],
        embed_dim=sd[prefix + "post_quant_conv.weight"].shape[1],
    )


# Where each text-encoder layout keeps the tensors whose shapes give the config.
_TEXT_NAMES = {
    "openai": dict(token="text_model.embeddings.token_embedding.weight",
                   position="text_model.embeddings.position_embedding.weight",
                   layer=r"text_model\.encoder\.layers\.(\d+)\.", fc1="text_model.encoder.layers.0.mlp.fc1.weight",
                   projection="text_projection.weight", projection_axis=0, activation="quick_gelu", pad=49407),
    "openclip": dict(token="token_embedding.weight", position="positional_embedding",
                     layer=r"transformer\.resblocks\.(\d+)\.", fc1="transformer.resblocks.0.mlp.c_fc.weight",
                     projection="text_projection", projection_axis=1, activation="gelu", pad=0),
}


def detect_text_encoder(sd: Shapes, prefix: str, layout: str) -> TextEncoderConfig:
    names = _TEXT_NAMES[layout]
    keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]
    vocab, width = sd[prefix + names["token"]].shape
    projection = sd.get(prefix + names["projection"])
    return TextEncoderConfig(
        vocab_size=vocab, max_positions=sd[prefix + names["position"]].shape[0], width=width,
        layers=len(_indices(keys, names["layer"])), heads=max(width // 64, 1),
        intermediate=sd[prefix + names["fc1"]].shape[0], activation=names["activation"],
        projection_dim=projection.shape[names["projection_axis"]] if projection is not None else None,
        layout=layout, pad_token_id=names["pad"],
    )


def detect_config(sd: Shapes, heads: dict[str, int] | None = None) -> ModelConfig:
    """The full ModelConfig of an LDM/SGM single-file state dict."""
    family = detect_family(sd)
    unet = detect_unet(sd, given_heads=heads)
    texts = [detect_text_encoder(sd, p, layout) for p, layout in TEXT_PREFIXES[family]]
    vae = detect_vae(sd) if VAE_PREFIX + "encoder.conv_in.weight" in sd else VAEConfig()
    size_embed = 0
    if family == "sd2":
        # SD2 (FrozenOpenCLIPEmbedder, layer="penultimate") keeps the final norm; the projection is unused
        texts = [dataclasses.replace(texts[0], output_layer=-2, projection_dim=None)]
    elif family in ("sdxl", "sdxl-refiner"):
        texts = [dataclasses.replace(t, output_layer=-2, final_norm=False) for t in texts]
        vae = dataclasses.replace(vae, scaling_factor=0.13025)
        pooled = texts[-1].projection_dim or texts[-1].width
        numbers = 5 if family == "sdxl-refiner" else 6  # (h, w, top, left, aesthetic score) or (..., h, w)
        size_embed = ((unet.adm_in_channels or pooled) - pooled) // numbers
    image_size = {"sd1": 512, "sd2": 512}.get(family, 1024)
    return ModelConfig(family=family, unet=unet, vae=vae, text_encoders=texts, image_size=image_size,
                       size_embed_dim=size_embed)
