"""Behaviour of our networks beyond parity: options of the LDM UNet config, clip skip, the VAE posterior."""

from __future__ import annotations

import pytest
import torch

from stable_diffusion.models.clip import CLIPTextModel
from stable_diffusion.models.configs import UNetConfig, preset
from stable_diffusion.models.tiled_vae import tiled_apply
from stable_diffusion.models.tokenizer import CLIPTokenizer
from stable_diffusion.models.unet import UNetModel, timestep_embedding
from stable_diffusion.models.vae import AutoencoderKL

from .oracle import assert_close, text_config


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0, 10.0]), 8)
    assert emb.shape == (2, 8)
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    assert torch.allclose(emb[1, 0], torch.cos(torch.tensor(10.0)))


@pytest.mark.parametrize("options", [
    dict(use_scale_shift_norm=True, resblock_updown=True, context_dim=None),
    dict(num_res_blocks=1, channel_mult=(1, 2, 2), attention_resolutions=(2, 4), transformer_depth=2, dropout=0.1),
])
def test_from_scratch_unet_options_run_and_learn(options):
    config = UNetConfig(**{**dict(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2),
                                  attention_resolutions=(2,), num_heads=-1, num_head_channels=16,
                                  transformer_depth=1, context_dim=16), **options})
    unet = UNetModel(config)
    x = torch.randn(2, 3, 16, 16)
    context = torch.randn(2, 5, 16) if config.context_dim else None
    out = unet(x, torch.tensor([1, 999]), context)
    assert out.shape == x.shape
    out.pow(2).mean().backward()
    assert all(p.grad is not None for p in unet.parameters())


def test_sdxl_unet_requires_vector_conditioning():
    config = preset("tiny-sdxl")
    unet = UNetModel(config.unet)
    with pytest.raises(ValueError, match="vector conditioning"):
        unet(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 77, 64))


@torch.no_grad()
def test_clip_skip_selects_earlier_hidden_states():
    from transformers import CLIPTextModel as HFText

    torch.manual_seed(0)
    theirs = HFText(text_config("quick_gelu")).eval()
    config = preset("tiny-sd1").text_encoders[0]
    ours = CLIPTextModel(config).eval()
    ours.load_state_dict({("text_model." + k): v for k, v in theirs.state_dict().items()})
    ids = CLIPTokenizer.builtin()(["a cat on a mat"])
    hidden = theirs(ids, output_hidden_states=True).hidden_states
    norm = theirs.final_layer_norm
    for skip in (1, 2, 3):
        assert_close(ours(ids, clip_skip=skip)[0], norm(hidden[-skip]))
    with pytest.raises(ValueError, match="clip_skip"):
        ours(ids, clip_skip=10)


def test_vae_shapes_and_seeded_posterior_sampling():
    vae = AutoencoderKL(preset("tiny-sd1").vae)
    image = torch.rand(2, 3, 32, 48) * 2 - 1
    posterior = vae.encode(image)
    assert posterior.mean.shape == (2, 4, 16, 24)
    a = posterior.sample(torch.Generator().manual_seed(1))
    b = posterior.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, posterior.mode())
    assert vae.decode(a).shape == image.shape
    assert posterior.kl().shape == (2,)


@torch.no_grad()
def test_tiled_vae_has_no_seams_and_shares_normalisation():
    torch.manual_seed(0)
    vae = AutoencoderKL(preset("tiny-sd1").vae).eval()
    # a smooth latent, as latents of real images are; 96x96 latent in 64-latent tiles, as for SD at 768px
    z = torch.nn.functional.interpolate(torch.randn(1, 4, 12, 12), size=(96, 96), mode="bicubic")
    full, f = vae.decode(z), vae.downscale
    tiled = vae.decode_tiled(z, tile=64 * f, margin=8 * f)
    per_tile_stats = tiled_apply(vae.decode, z, 64, 8, f)
    assert tiled.shape == full.shape

    def error(x):
        return ((x - full).abs().mean() / full.abs().mean()).item()

    # whole-image GroupNorm statistics bring the tiles closer to the untiled decode (the rest is the
    # middle attention, global in one pass and per tile here)
    assert error(tiled) < error(per_tile_stats)

    def seaminess(x):  # the largest column-to-column jump relative to the typical one
        dx = (x[..., 1:] - x[..., :-1]).abs().mean(dim=(0, 1, 2))
        return (dx.max() / dx.median()).item()

    assert seaminess(tiled) <= 1.1 * seaminess(full)
    image = full.clamp(-1, 1)
    mean_full = vae.encode(image).mean
    mean_tiled = vae.encode_tiled(image, tile=128, margin=32).mean
    assert mean_tiled.shape == mean_full.shape
    assert ((mean_tiled - mean_full).abs().mean() / mean_full.abs().mean()) < 0.25
