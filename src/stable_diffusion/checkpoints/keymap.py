"""Key maps between our (LDM/SGM) names and diffusers / OpenCLIP names, generated from the config.

Each ``*_module_map`` walks the network's block structure the way the model builds it and returns
``{our_module_prefix: their_module_prefix}``; ``rename`` then translates whole state-dict keys by their longest
mapped prefix. Nothing here is a hand-written list of keys."""

from __future__ import annotations

import torch

from ..models.configs import TextEncoderConfig, UNetConfig, VAEConfig

_RESBLOCK_UNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                  "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_RESBLOCK_VAE = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _add_block(out: dict[str, str], ours: str, theirs: str, inner: dict[str, str]) -> None:
    for a, b in inner.items():
        out[f"{ours}.{a}"] = f"{theirs}.{b}"
    out[ours] = theirs


def unet_module_map(c: UNetConfig, adm_name: str = "add_embedding") -> dict[str, str]:
    """LDM UNetModel module prefixes -> diffusers UNet2DConditionModel prefixes."""
    if c.resblock_updown:
        raise ValueError("diffusers' UNet2DConditionModel has no resblock_updown variant; save as single-file")
    m: dict[str, str] = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
                         "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    if c.adm_in_channels:
        m["label_emb.0.0"] = f"{adm_name}.linear_1"
        m["label_emb.0.2"] = f"{adm_name}.linear_2"
    nrb = c.num_res_blocks
    n = 1
    for level in range(len(c.channel_mult)):
        for r in range(nrb):
            _add_block(m, f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{r}", _RESBLOCK_UNET)
            if c.depth_at(level):
                m[f"input_blocks.{n}.1"] = f"down_blocks.{level}.attentions.{r}"
            n += 1
        if level != len(c.channel_mult) - 1:
            m[f"input_blocks.{n}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            n += 1
    _add_block(m, "middle_block.0", "mid_block.resnets.0", _RESBLOCK_UNET)
    if c.transformer_depth_middle:
        m["middle_block.1"] = "mid_block.attentions.0"
    _add_block(m, f"middle_block.{2 if c.transformer_depth_middle else 1}", "mid_block.resnets.1", _RESBLOCK_UNET)
    i = 0
    for up, level in enumerate(reversed(range(len(c.channel_mult)))):
        for r in range(nrb + 1):
            _add_block(m, f"output_blocks.{i}.0", f"up_blocks.{up}.resnets.{r}", _RESBLOCK_UNET)
            j = 1
            if c.depth_at(level):
                m[f"output_blocks.{i}.1"] = f"up_blocks.{up}.attentions.{r}"
                j = 2
            if level and r == nrb:
                m[f"output_blocks.{i}.{j}.conv"] = f"up_blocks.{up}.upsamplers.0.conv"
            i += 1
    return m


def vae_module_map(c: VAEConfig) -> dict[str, str]:
    """LDM AutoencoderKL module prefixes -> diffusers AutoencoderKL prefixes."""
    m: dict[str, str] = {"encoder.norm_out": "encoder.conv_norm_out", "decoder.norm_out": "decoder.conv_norm_out"}
    levels = len(c.ch_mult)
    for part in ("encoder", "decoder"):
        _add_block(m, f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _RESBLOCK_VAE)
        _add_block(m, f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _RESBLOCK_VAE)
        _add_block(m, f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTN)
    for i in range(levels):
        for j in range(c.num_res_blocks):
            _add_block(m, f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _RESBLOCK_VAE)
        if i != levels - 1:
            m[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        up = levels - 1 - i  # decoder.up[i] runs at resolution level i; diffusers counts from the bottom
        for j in range(c.num_res_blocks + 1):
            _add_block(m, f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", _RESBLOCK_VAE)
        if i != 0:
            m[f"decoder.up.{i}.upsample.conv"] = f"decoder.up_blocks.{up}.upsamplers.0.conv"
    return m


def openclip_module_map(c: TextEncoderConfig) -> dict[str, str]:
    """HF CLIPTextModel prefixes -> OpenCLIP text-tower prefixes (q/k/v are handled by ``to_openclip``)."""
    m = {"text_model.embeddings.token_embedding": "token_embedding", "text_model.final_layer_norm": "ln_final"}
    for i in range(c.layers):
        ours, theirs = f"text_model.encoder.layers.{i}", f"transformer.resblocks.{i}"
        _add_block(m, ours, theirs, {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                                     "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"})
    return m


def rename(state: dict[str, torch.Tensor], module_map: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename keys by the longest module prefix in ``module_map`` (unmapped keys pass through)."""
    prefixes = sorted(module_map, key=len, reverse=True)
    out = {}
    for key, value in state.items():
        for p in prefixes:
            if key.startswith(p + "."):
                key = module_map[p] + key[len(p):]
                break
        out[key] = value
    return out


def invert(module_map: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in module_map.items()}


def vae_to_diffusers(state: dict[str, torch.Tensor], c: VAEConfig) -> dict[str, torch.Tensor]:
    """Our VAE state dict -> diffusers names; the mid attention's 1x1 convs become linear weights."""
    out = rename(state, vae_module_map(c))
    return {k: (v[:, :, 0, 0] if ".attentions." in k and k.endswith("weight") and v.dim() == 4 else v)
            for k, v in out.items()}


def vae_from_diffusers(state: dict[str, torch.Tensor], c: VAEConfig) -> dict[str, torch.Tensor]:
    out = rename(state, invert(vae_module_map(c)))
    attn = (".mid.attn_1.q.", ".mid.attn_1.k.", ".mid.attn_1.v.", ".mid.attn_1.proj_out.")
    return {k: (v[:, :, None, None] if any(a in k for a in attn) and k.endswith("weight") and v.dim() == 2 else v)
            for k, v in out.items()}


def to_openclip(state: dict[str, torch.Tensor], c: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """Our text encoder -> OpenCLIP names: q/k/v fused into ``attn.in_proj_*``, projection transposed."""
    state = dict(state)
    fused = {}
    for i in range(c.layers):
        base = f"text_model.encoder.layers.{i}.self_attn"
        for kind in ("weight", "bias"):
            parts = [state.pop(f"{base}.{p}_proj.{kind}") for p in "qkv"]
            fused[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    out = rename(state, openclip_module_map(c))
    out.update(fused)
    out["positional_embedding"] = out.pop("text_model.embeddings.position_embedding.weight")
    if "text_projection.weight" in out:
        out["text_projection"] = out.pop("text_projection.weight").T.contiguous()
    return out


def from_openclip(state: dict[str, torch.Tensor], c: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower names -> ours (split ``in_proj`` into q/k/v, transpose the projection)."""
    state = dict(state)
    for i in range(c.layers):
        base = f"transformer.resblocks.{i}.attn"
        for kind in ("weight", "bias"):
            fused = state.pop(f"{base}.in_proj_{kind}", None)
            if fused is None:
                continue
            for p, part in zip("qkv", fused.chunk(3, dim=0), strict=True):
                state[f"text_model.encoder.layers.{i}.self_attn.{p}_proj.{kind}"] = part
    if "positional_embedding" in state:
        state["text_model.embeddings.position_embedding.weight"] = state.pop("positional_embedding")
    if "text_projection" in state:
        state["text_projection.weight"] = state.pop("text_projection").T.contiguous()
    return rename(state, invert(openclip_module_map(c)))
