"""Config translation between our dataclasses and the diffusers / transformers ``config.json`` files."""

from __future__ import annotations

from typing import Any

from ..models.configs import TextEncoderConfig, UNetConfig, VAEConfig
from .errors import CheckpointError


def unet_to_diffusers(c: UNetConfig, sample_size: int, size_embed_dim: int) -> dict[str, Any]:
    levels = range(len(c.channel_mult))
    channels = [c.model_channels * m for m in c.channel_mult]
    depths = [c.depth_at(level) or 1 for level in levels]
    if c.transformer_depth_middle:
        if c.depth_at(levels[-1]) and c.depth_at(levels[-1]) != c.transformer_depth_middle:
            raise CheckpointError("diffusers ties the middle transformer depth to the last level's depth")
        depths[-1] = c.transformer_depth_middle
    config: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": c.in_channels, "out_channels": c.out_channels, "sample_size": sample_size,
        "block_out_channels": channels, "layers_per_block": c.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if c.depth_at(lv) else "DownBlock2D" for lv in levels],
        "up_block_types": ["CrossAttnUpBlock2D" if c.depth_at(lv) else "UpBlock2D" for lv in reversed(levels)],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if c.transformer_depth_middle else "UNetMidBlock2D",
        "cross_attention_dim": c.context_dim or channels[-1],
        "attention_head_dim": [c.heads_for(ch)[0] for ch in channels],
        "use_linear_projection": c.use_linear_in_transformer,
        "transformer_layers_per_block": depths,
        "resnet_time_scale_shift": "scale_shift" if c.use_scale_shift_norm else "default",
        "dropout": c.dropout, "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu",
        "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "center_input_sample": False,
    }
    if c.adm_in_channels:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=size_embed_dim,
                      projection_class_embeddings_input_dim=c.adm_in_channels)
    return config


def unet_from_diffusers(d: dict[str, Any]) -> tuple[UNetConfig, int, str]:
    """(UNetConfig, size_embed_dim, name of the vector-conditioning module) from a diffusers unet config."""
    if d.get("resnet_time_scale_shift", "default") not in ("default", "scale_shift"):
        raise CheckpointError(f"unsupported resnet_time_scale_shift {d['resnet_time_scale_shift']!r}")
    channels = list(d["block_out_channels"])
    mc = channels[0]
    n = len(channels)
    down = d.get("down_block_types", ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"])
    attn_levels = [i for i, t in enumerate(down) if t.startswith("CrossAttn")]
    depth = d.get("transformer_layers_per_block", 1)
    depth = [depth] * n if isinstance(depth, int) else list(depth)
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    heads = [heads] * n if isinstance(heads, int) else list(heads)
    if len(set(heads)) == 1:
        head_kw = dict(num_heads=heads[0], num_head_channels=-1)
    else:
        dims = {ch // h for ch, h in zip(channels, heads, strict=True)}
        if len(dims) != 1:
            raise CheckpointError(f"attention heads {heads} fit neither a fixed head count nor a fixed head width")
        head_kw = dict(num_heads=-1, num_head_channels=dims.pop())
    adm = None
    adm_name = "add_embedding"
    if d.get("addition_embed_type") == "text_time" or d.get("class_embed_type") == "projection":
        adm = d["projection_class_embeddings_input_dim"]
        adm_name = "add_embedding" if d.get("addition_embed_type") == "text_time" else "class_embedding"
    mid = d.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    config = UNetConfig(
        in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4), model_channels=mc,
        channel_mult=tuple(ch // mc for ch in channels), num_res_blocks=d.get("layers_per_block", 2),
        attention_resolutions=tuple(2**i for i in attn_levels), transformer_depth=tuple(depth),
        transformer_depth_middle=depth[-1] if mid == "UNetMidBlock2DCrossAttn" else 0,
        context_dim=d.get("cross_attention_dim", 768), use_linear_in_transformer=d.get("use_linear_projection", False),
        adm_in_channels=adm, use_scale_shift_norm=d.get("resnet_time_scale_shift") == "scale_shift",
        dropout=d.get("dropout", 0.0), **head_kw,
    )
    return config, d.get("addition_time_embed_dim") or 0, adm_name


def vae_to_diffusers(c: VAEConfig, sample_size: int) -> dict[str, Any]:
    if c.embed_dim != c.z_channels:
        raise CheckpointError("diffusers' AutoencoderKL needs embed_dim == z_channels")
    n = len(c.ch_mult)
    return {
        "_class_name": "AutoencoderKL", "in_channels": c.in_channels, "out_channels": c.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [c.ch * m for m in c.ch_mult], "layers_per_block": c.num_res_blocks,
        "act_fn": "silu", "latent_channels": c.z_channels, "norm_num_groups": c.norm_groups, "sample_size": sample_size,
        "scaling_factor": c.scaling_factor,
    }


def vae_from_diffusers(d: dict[str, Any]) -> VAEConfig:
    channels = list(d["block_out_channels"])
    z = d.get("latent_channels", 4)
    return VAEConfig(in_channels=d.get("in_channels", 3), out_ch=d.get("out_channels", 3), ch=channels[0],
                     ch_mult=tuple(ch // channels[0] for ch in channels), num_res_blocks=d.get("layers_per_block", 2),
                     z_channels=z, embed_dim=z, scaling_factor=d.get("scaling_factor", 0.18215),
                     norm_groups=d.get("norm_num_groups", 32))


def text_encoder_to_transformers(c: TextEncoderConfig, layers: int) -> dict[str, Any]:
    arch = "CLIPTextModelWithProjection" if c.projection_dim else "CLIPTextModel"
    return {
        "architectures": [arch], "model_type": "clip_text_model", "hidden_size": c.width,
        "intermediate_size": c.intermediate, "num_hidden_layers": layers, "num_attention_heads": c.heads,
        "max_position_embeddings": c.max_positions, "vocab_size": c.vocab_size, "hidden_act": c.activation,
        "projection_dim": c.projection_dim or c.width, "layer_norm_eps": 1e-5, "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id, "pad_token_id": 1, "attention_dropout": 0.0, "dropout": 0.0,
        "initializer_factor": 1.0, "initializer_range": 0.02,
    }


def text_encoder_from_transformers(d: dict[str, Any], output_layer: int, final_norm: bool, pad_token_id: int,
                                   layout: str) -> TextEncoderConfig:
    with_projection = "CLIPTextModelWithProjection" in d.get("architectures", [])
    eos = d.get("eos_token_id", 49407)
    eos = 49407 if eos == 2 else eos  # legacy configs say 2 and mean "the highest id", which is <|endoftext|>
    return TextEncoderConfig(
        vocab_size=d.get("vocab_size", 49408), max_positions=d.get("max_position_embeddings", 77),
        width=d["hidden_size"], layers=d["num_hidden_layers"], heads=d["num_attention_heads"],
        intermediate=d["intermediate_size"], activation=d.get("hidden_act", "quick_gelu"),
        projection_dim=d.get("projection_dim") if with_projection else None, output_layer=output_layer,
        final_norm=final_norm, layout=layout, pad_token_id=pad_token_id,
        bos_token_id=49406 if d.get("bos_token_id", 0) == 0 else d["bos_token_id"], eos_token_id=eos,
    )
