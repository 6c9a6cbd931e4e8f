"""Textual-inversion embeddings used in prompts by file name."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import save_file

from stable_diffusion import load_pipeline
from stable_diffusion.embeddings import EmbeddingLibrary
from stable_diffusion.prompts import chunk_tokens, encode_weighted


@torch.no_grad()
def test_a1111_pt_embedding_replaces_its_name_with_its_vectors(tmp_path):
    pipe = load_pipeline("tiny-sd1")
    vectors = torch.randn(3, 32)
    torch.save({"string_to_param": {"*": vectors}, "name": "mystyle", "step": 100}, tmp_path / "mystyle.pt")
    library = EmbeddingLibrary(tmp_path)
    chunk = chunk_tokens(pipe.tokenizer, "a cat, mystyle", library)[0][0]
    a_cat_comma = pipe.tokenizer.encode("a cat,")
    assert chunk[:6] == [*a_cat_comma, ("mystyle", 0), ("mystyle", 1), ("mystyle", 2)]
    context, _ = encode_weighted(pipe.tokenizer, pipe.text_encoder, ["a cat, mystyle"], pipe.device, library=library)
    # the same through the encoder by hand: token embeddings with the vectors placed after "a cat,"
    ids = pipe.tokenizer(["a cat, mystyle"])
    n = len(a_cat_comma)
    ids = torch.cat([ids[:, :1 + n], torch.full((1, 3), pipe.tokenizer.pad_token_id), ids[:, 1 + n:74]], dim=1)
    ids[0, 1 + n + 3] = pipe.tokenizer.eos_token_id
    ids[0, 1 + n + 4:] = pipe.tokenizer.pad_token_id
    embeds = pipe.text_encoder.text_model.embeddings.token_embedding(ids).clone()
    embeds[0, 1 + n:1 + n + 3] = vectors
    expected, _ = pipe.text_encoder(ids, token_embeds=embeds)
    assert torch.allclose(context, expected, atol=1e-6)


def test_sdxl_safetensors_embedding_and_generation(tmp_path):
    pipe = load_pipeline("tiny-sdxl")
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 32) * 3}, tmp_path / "glow.safetensors")
    plain = np.asarray(pipe.txt2img("a glow cat", steps=2, seed=0)[0])
    styled = np.asarray(pipe.txt2img("a glow cat", steps=2, seed=0, embeddings_dir=str(tmp_path))[0])
    assert not np.array_equal(plain, styled)


def test_an_embedding_that_does_not_fit_is_skipped_with_a_warning(tmp_path, caplog):
    """As A1111: an embedding of another width than the model's encoder, or an unreadable one, is skipped (its
    name stays plain text) with a warning, instead of blocking every prompt that names it."""
    pipe = load_pipeline("tiny-sd1")
    save_file({"emb_params": torch.randn(1, 768)}, tmp_path / "big.safetensors")
    torch.save({"string_to_param": {}}, tmp_path / "empty.pt")
    torch.save({"emb": torch.tensor(3.0)}, tmp_path / "scalar.pt")
    plain = np.asarray(pipe.txt2img("a big empty scalar cat", steps=1, seed=0)[0])
    with caplog.at_level("WARNING"):
        skipped = np.asarray(pipe.txt2img("a big empty scalar cat", steps=1, seed=0, embeddings_dir=str(tmp_path))[0])
    assert np.array_equal(plain, skipped)
    assert "embedding big skipped" in caplog.text and "width [768]" in caplog.text
    assert "embedding empty skipped" in caplog.text and "embedding scalar skipped" in caplog.text


def test_the_api_lists_embeddings_with_shape_vectors_and_step_and_skips_misfits(tmp_path):
    from fastapi.testclient import TestClient

    from stable_diffusion.models.configs import preset
    from stable_diffusion.pipeline import Pipeline
    from stable_diffusion.server.app import create_app
    from stable_diffusion.server.registry import ModelRegistry

    (tmp_path / "Stable-diffusion").mkdir()
    (tmp_path / "embeddings").mkdir()
    Pipeline.from_config(preset("tiny-sd1")).save(tmp_path / "Stable-diffusion" / "tiny.safetensors")
    torch.save({"string_to_param": {"*": torch.randn(3, 32)}, "step": 500, "sd_checkpoint": "a1b2c3d4",
                "sd_checkpoint_name": "v1-5"}, tmp_path / "embeddings" / "fits.pt")
    save_file({"emb_params": torch.randn(2, 768)}, tmp_path / "embeddings" / "wide.safetensors")
    (tmp_path / "embeddings" / "broken.pt").write_bytes(b"nope")
    with TestClient(create_app(ModelRegistry(tmp_path, default="tiny"), outputs=None)) as client:
        listing = client.get("/sdapi/v1/embeddings").json()
    assert listing["loaded"] == {"fits": {"step": 500, "sd_checkpoint": "a1b2c3d4", "sd_checkpoint_name": "v1-5",
                                          "shape": 32, "vectors": 3}}
    assert set(listing["skipped"]) == {"wide", "broken"} and listing["skipped"]["wide"]["vectors"] == 2
