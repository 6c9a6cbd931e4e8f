"""Proof 1: a diffusers folder written by diffusers' own save_pretrained loads into our Pipeline, and our UNet,
VAE and text encoders give diffusers' / transformers' outputs on the same inputs (fp32, rel. 1e-4)."""

from __future__ import annotations

import pytest
import torch

from stable_diffusion import load_pipeline

from .oracle import FAMILIES, SIZE_DIM, assert_close, build_diffusers_pipeline, save, size_embedding

PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon, highly detailed"]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    family = request.param
    theirs = build_diffusers_pipeline(family)
    folder = save(theirs, tmp_path_factory.mktemp(f"diffusers-{family}"))
    return family, theirs, load_pipeline(folder)


@torch.no_grad()
def test_text_encoders_match_transformers(pair):
    family, theirs, ours = pair
    ids = theirs.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours.tokenizer(PROMPTS), ids)
    if family == "sdxl":
        ids2 = theirs.tokenizer_2(PROMPTS, padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids
        assert torch.equal(ours.tokenizers[1](PROMPTS), ids2)
        out1 = theirs.text_encoder(ids, output_hidden_states=True)
        out2 = theirs.text_encoder_2(ids2, output_hidden_states=True)
        ctx1, _ = ours.text_encoders[0](ids)
        ctx2, pooled = ours.text_encoders[1](ids2)
        assert_close(ctx1, out1.hidden_states[-2])
        assert_close(ctx2, out2.hidden_states[-2])
        assert_close(pooled, out2.text_embeds)
    else:
        ctx, _ = ours.text_encoder(ids)
        assert_close(ctx, theirs.text_encoder(ids).last_hidden_state)


@torch.no_grad()
def test_unet_matches_diffusers(pair):
    family, theirs, ours = pair
    torch.manual_seed(1)
    ctx_dim = theirs.unet.config.cross_attention_dim
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([3.0, 777.0])
    context = torch.randn(2, 77, ctx_dim)
    kwargs, y = {}, None
    if family == "sdxl":
        pooled = torch.randn(2, 32)
        time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 80, 8, 0, 64, 64]])
        kwargs = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        y = torch.cat([pooled, size_embedding(time_ids, SIZE_DIM)], dim=1)
    expected = theirs.unet(x, t, encoder_hidden_states=context, **kwargs).sample
    assert_close(ours.unet(x, t, context, y), expected)


@torch.no_grad()
def test_vae_matches_diffusers(pair):
    _, theirs, ours = pair
    torch.manual_seed(2)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    assert_close(ours.vae.encode(image).mean, theirs.vae.encode(image).latent_dist.mean)
    assert_close(ours.vae.encode(image).std, theirs.vae.encode(image).latent_dist.std)
    z = torch.randn(1, 4, 8, 8)
    assert_close(ours.vae.decode(z), theirs.vae.decode(z).sample)
    assert ours.vae.scaling_factor == theirs.vae.config.scaling_factor


def test_family_and_prediction_from_folder(pair):
    family, _, ours = pair
    assert ours.family == family
    assert ours.config.prediction == ("v" if family == "sd2" else "eps")  # from scheduler_config.json


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
@torch.no_grad()
def test_diffusers_loads_our_exported_folder(name, tmp_path):
    from diffusers import DiffusionPipeline

    from stable_diffusion.models.configs import preset
    from stable_diffusion.pipeline import Pipeline

    ours = Pipeline.from_config(preset(name), seed=7)
    ours.save(tmp_path / "export", format="diffusers")
    theirs = DiffusionPipeline.from_pretrained(tmp_path / "export")
    ids = ours.tokenizer(PROMPTS)
    assert torch.equal(theirs.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                                        return_tensors="pt").input_ids, ids)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([5.0, 600.0])
    context = torch.randn(2, 77, ours.config.unet.context_dim)
    kwargs, y = {}, None
    if ours.family == "sdxl":
        pooled, time_ids = torch.randn(2, 32), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
        kwargs = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        y = torch.cat([pooled, size_embedding(time_ids, SIZE_DIM)], dim=1)
    assert_close(ours.unet(x, t, context, y), theirs.unet(x, t, encoder_hidden_states=context, **kwargs).sample)
    z = torch.randn(1, 4, 8, 8)
    assert_close(ours.vae.decode(z), theirs.vae.decode(z).sample)
    hidden = theirs.text_encoder(ids, output_hidden_states=True)
    expected = hidden.hidden_states[-2] if ours.family == "sdxl" else hidden.last_hidden_state
    assert_close(ours.text_encoder(ids)[0], expected)
