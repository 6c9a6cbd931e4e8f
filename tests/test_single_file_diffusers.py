"""Proof 2: our single-file export, converted by diffusers' own LDM converters, loads strictly into diffusers'
models and gives the same outputs. Proof 3: at full size (meta device) our SD1.5 / SD2.1 / SDXL state dicts,
converted the same way, give exactly diffusers' key sets and shapes."""

from __future__ import annotations

import pytest
import torch

from stable_diffusion.checkpoints.single_file import join_components
from stable_diffusion.models.configs import preset
from stable_diffusion.pipeline import Pipeline

from .oracle import assert_close, ldm_original_config, text_config

su = pytest.importorskip("diffusers.loaders.single_file_utils")


def convert(sd: dict, config, image_size: int):
    """diffusers' converters applied to our single-file state dict -> (unet cfg, unet sd, vae cfg, vae sd)."""
    original = ldm_original_config(config)
    ucfg = su.create_unet_diffusers_config_from_ldm(original, sd, image_size=image_size)
    vcfg = su.create_vae_diffusers_config_from_ldm(original, sd, image_size=image_size)
    return ucfg, su.convert_ldm_unet_checkpoint(sd, ucfg), vcfg, su.convert_ldm_vae_checkpoint(sd, vcfg)


def convert_text(sd: dict, family: str, model, index: int = 0) -> dict:
    if family == "sd1" or (family == "sdxl" and index == 0):
        out = su.convert_ldm_clip_checkpoint(sd)
    else:
        prefix = "cond_stage_model.model." if family == "sd2" else "conditioner.embedders.1.model."
        out = su.convert_open_clip_checkpoint(model, sd, prefix=prefix)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        out = {k.removeprefix("text_model."): v for k, v in out.items()}
    layers = model.config.num_hidden_layers  # diffusers drops SD2's last OpenCLIP layer (penultimate output)
    return {k: v for k, v in out.items() if not any(f"layers.{n}." in k for n in range(layers, 64))}


def text_models(family: str, full: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if not full:
        if family == "sdxl":
            return [CLIPTextModel(text_config("quick_gelu")), CLIPTextModelWithProjection(text_config("gelu", True))]
        return [CLIPTextModel(text_config("quick_gelu" if family == "sd1" else "gelu",
                                          layers=3 if family == "sd1" else 2))]
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            hidden_act="quick_gelu", projection_dim=768)
    if family == "sd1":
        return [CLIPTextModel(clip_l)]
    if family == "sd2":
        return [CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                             num_attention_heads=16, hidden_act="gelu", projection_dim=512))]
    big_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                           hidden_act="gelu", projection_dim=1280)
    return [CLIPTextModel(clip_l), CLIPTextModelWithProjection(big_g)]


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2", "tiny-sdxl", "tiny-sd1-inpaint"])
@torch.no_grad()
def test_single_file_export_loads_in_diffusers(name, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file

    ours = Pipeline.from_config(preset(name), seed=3)
    ours.save(tmp_path / "model.safetensors")
    sd = load_file(tmp_path / "model.safetensors")
    ucfg, unet_sd, vcfg, vae_sd = convert(sd, ours.config, 64)
    unet = UNet2DConditionModel(**ucfg).eval()
    unet.load_state_dict(unet_sd, strict=True)
    vae = AutoencoderKL(**vcfg).eval()
    vae.load_state_dict(vae_sd, strict=True)

    torch.manual_seed(0)
    x = torch.randn(2, ours.config.unet.in_channels, 16, 16)
    t = torch.tensor([1.0, 900.0])
    context = torch.randn(2, 77, ours.config.unet.context_dim)
    y = torch.randn(2, ours.config.unet.adm_in_channels) if ours.config.unet.adm_in_channels else None
    kwargs = {"class_labels": y} if y is not None else {}
    assert_close(ours.unet(x, t, context, y), unet(x, t, encoder_hidden_states=context, **kwargs).sample)
    z = torch.randn(1, 4, 8, 8)
    assert_close(ours.vae.decode(z), vae.decode(z).sample)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    assert_close(ours.vae.encode(image).mean, vae.encode(image).latent_dist.mean)

    family = ours.family
    ids = ours.tokenizer(["a red circle on a white background", "two cats"])
    for i, model in enumerate(text_models(family)):
        model.load_state_dict(convert_text(sd, family, model, i), strict=True)
        context, pooled = ours.text_encoders[i](ids)
        out = model(ids, output_hidden_states=True)
        expected = out.last_hidden_state if family != "sdxl" else out.hidden_states[-2]
        assert_close(context, expected)
        if family == "sdxl" and i == 1:
            assert_close(pooled, out.text_embeds)


FULL = {
    "sd1": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "sd2": dict(sample_size=64, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                use_linear_projection=True),
    "sdxl": dict(sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=[1, 2, 10],
                 attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_keys_match_diffusers(family):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        ours = Pipeline.from_config(preset(family))
        sd = join_components(ours.component_state_dicts(), ours.config)
        unet = UNet2DConditionModel(**FULL[family])
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
        texts = text_models(family, full=True)
    size = 1024 if family == "sdxl" else 512
    ucfg, unet_sd, vcfg, vae_sd = convert(sd, ours.config, size)
    for key in ("block_out_channels", "cross_attention_dim", "attention_head_dim", "use_linear_projection"):
        assert _plain(ucfg[key]) == _plain(unet.config[key]), key
    assert shapes(unet_sd) == shapes(unet.state_dict())
    assert shapes(vae_sd) == shapes(vae.state_dict())
    for i, model in enumerate(texts):
        assert shapes(convert_text(sd, family, model, i)) == shapes(model.state_dict())
