"""diffusers / transformers reference models for the tiny presets, configured by hand from their own docs
(not from our converters), so a parity test checks our reading of their formats too."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ["sd1", "sd2", "sdxl"]
SIZE_DIM = 8  # tiny SDXL size-embedding width (256 in SDXL)


def text_config(act: str, projection: bool = False, layers: int = 3):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=layers, num_attention_heads=2,
                          hidden_act=act, vocab_size=49408, max_position_embeddings=77,
                          projection_dim=32 if projection else 512)


def unet_kwargs(family: str, in_channels: int = 4) -> dict:
    common = dict(sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64),
                  layers_per_block=2, norm_num_groups=32)
    if family == "sd1":
        return dict(common, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=2)
    if family == "sd2":
        return dict(common, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                    attention_head_dim=(2, 4), use_linear_projection=True)
    refiner = family == "sdxl-refiner"  # OpenCLIP-G alone (32 wide); y has 5 numbers, the aesthetic score last
    return dict(common, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32 if refiner else 64,
                attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
                addition_embed_type="text_time", addition_time_embed_dim=SIZE_DIM,
                projection_class_embeddings_input_dim=32 + (5 if refiner else 6) * SIZE_DIM)


def vae_kwargs() -> dict:
    return dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, norm_num_groups=32,
                sample_size=64)


def hf_tokenizer(pad: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer as HFTokenizer

    from stable_diffusion.models.tokenizer import CLIPTokenizer

    ours = CLIPTokenizer.builtin()
    return HFTokenizer(vocab=ours.vocab, merges=ours.merges, pad_token=pad, model_max_length=77)


def build_diffusers_pipeline(family: str, seed: int = 0, in_channels: int = 4, prediction: str | None = None):
    """A random-weight diffusers pipeline of the tiny family (SD2: v-prediction unless ``prediction="eps"``;
    "sdxl-refiner": SDXL's refiner as a StableDiffusionXLImg2ImgPipeline)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_kwargs(family, in_channels))
    vae = AutoencoderKL(**vae_kwargs())
    _randomise(unet)
    _randomise(vae)
    pred = "v_prediction" if (prediction or ("v" if family == "sd2" else "eps")) == "v" else "epsilon"
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       prediction_type=pred, steps_offset=1)
    if family == "sdxl-refiner":  # as stabilityai/stable-diffusion-xl-refiner-1.0's model_index.json
        te2 = CLIPTextModelWithProjection(text_config("gelu", projection=True))
        return StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None,
                                                tokenizer_2=hf_tokenizer("!"), unet=unet, scheduler=scheduler,
                                                requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    if family == "sdxl":
        te1 = CLIPTextModel(text_config("quick_gelu"))
        te2 = CLIPTextModelWithProjection(text_config("gelu", projection=True))
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=hf_tokenizer(),
                                         tokenizer_2=hf_tokenizer("!"), unet=unet, scheduler=scheduler)
    te = CLIPTextModel(text_config("quick_gelu" if family == "sd1" else "gelu", layers=3 if family == "sd1" else 2))
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=hf_tokenizer("<|endoftext|>" if family == "sd1"
                                   else "!"), unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _randomise(module: torch.nn.Module) -> None:
    """diffusers zero-initialises some output convolutions; give every weight a non-trivial value."""
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)


def save(pipe, folder: Path) -> Path:
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def size_embedding(time_ids: torch.Tensor, dim: int) -> torch.Tensor:
    """SDXL's size/crop vector: sinusoidal embedding of each of the 6 numbers, concatenated."""
    from stable_diffusion.models.unet import timestep_embedding

    return timestep_embedding(time_ids.flatten(), dim).reshape(time_ids.shape[0], -1)


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, rel: float = 1e-4) -> None:
    """Max abs difference <= rel * max |theirs| (the issue's parity criterion)."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    scale = theirs.abs().max().item()
    diff = (ours - theirs).abs().max().item()
    assert diff <= rel * scale, f"max abs diff {diff:.3g} > {rel} * {scale:.3g}"


def ldm_original_config(config) -> dict:
    """The LDM/SGM yaml (as a dict) that describes ``config``, for diffusers' single-file converters."""
    u, v = config.unet, config.vae
    depth = list(u.transformer_depth)
    depth[-1] = depth[-1] or u.transformer_depth_middle  # diffusers sizes the middle block by the last level
    unet = dict(in_channels=u.in_channels, out_channels=u.out_channels, model_channels=u.model_channels,
                attention_resolutions=list(u.attention_resolutions), num_res_blocks=u.num_res_blocks,
                channel_mult=list(u.channel_mult), transformer_depth=depth,
                context_dim=u.context_dim, use_linear_in_transformer=u.use_linear_in_transformer)
    if u.num_head_channels == -1:
        unet["num_heads"] = u.num_heads
    else:
        unet["num_head_channels"] = u.num_head_channels
    if u.adm_in_channels:
        unet.update(num_classes="sequential", adm_in_channels=u.adm_in_channels)
    ddconfig = dict(double_z=True, z_channels=v.z_channels, resolution=256, in_channels=v.in_channels,
                    out_ch=v.out_ch, ch=v.ch, ch_mult=list(v.ch_mult), num_res_blocks=v.num_res_blocks,
                    attn_resolutions=[], dropout=0.0)
    key = "network_config" if config.family == "sdxl" else "unet_config"
    return {"model": {"params": {key: {"params": unet}, "scale_factor": v.scaling_factor,
                                 "first_stage_config": {"params": {"ddconfig": ddconfig, "embed_dim": v.embed_dim}}}}}
