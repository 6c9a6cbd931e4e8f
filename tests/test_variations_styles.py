"""A1111's variation seeds (subseed, subseed_strength, seed resize) and prompt styles (styles.csv), through the
Python API, the CLI and the HTTP API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from stable_diffusion import GenerationRequest, generate
from stable_diffusion.cli import main
from stable_diffusion.diffusion.noise import initial_noise, slerp
from stable_diffusion.images import read_infotext
from stable_diffusion.infotext import parse_infotext
from stable_diffusion.server.app import create_app
from stable_diffusion.server.registry import ModelRegistry
from stable_diffusion.styles import Style, apply_styles, find_styles, merge_prompt, read_styles

from .helpers import pixels


def _randn(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def test_slerp_ends_and_middle():
    low, high = _randn(1, (4, 8, 8)), _randn(2, (4, 8, 8))
    assert torch.allclose(slerp(0.0, low, high), low, atol=1e-6)
    assert torch.allclose(slerp(1.0, low, high), high, atol=1e-5)
    mid = slerp(0.5, low, high)
    # spherical: the halfway noise keeps the noises' scale, where the linear mean would shrink it by ~sqrt(2)
    assert abs(mid.std().item() - 1) < 0.1 and abs((low + high).div(2).std().item() - 0.707) < 0.1
    assert torch.equal(slerp(0.3, low, low), low * 0.3 + low * 0.7)  # parallel: A1111's linear fallback


def test_seed_resize_pastes_the_seeds_noise_centred_as_a1111():
    small, _ = initial_noise([5], (4, 8, 8), resize_from=(4, 4))
    assert torch.equal(small[0, :, 2:6, 2:6], _randn(5, (4, 4, 4)))
    assert torch.equal(small[0, :, 0, :], _randn(5, (4, 8, 8))[:, 0, :])  # around it: the seed's full-size noise
    large, _ = initial_noise([5], (4, 10, 10), resize_from=(13, 13))
    source = _randn(5, (4, 13, 13))  # dx = -2: A1111 keeps 13 - 4 = 9 columns from column 2
    assert torch.equal(large[0, :, :9, :9], source[:, 2:11, 2:11])
    same, _ = initial_noise([5], (4, 8, 8), resize_from=(8, 8))
    assert torch.equal(same, initial_noise([5], (4, 8, 8))[0])


def test_variation_strength_0_is_the_seed_and_1_is_the_subseed(sd1):
    base = {"prompt": "a red circle", "steps": 3, "sampler": "Euler", "width": 64, "height": 64}
    plain = generate(sd1, GenerationRequest(**base, seed=10)).images[0]
    other = generate(sd1, GenerationRequest(**base, seed=77)).images[0]
    zero = generate(sd1, GenerationRequest(**base, seed=10, subseed=77, subseed_strength=0.0)).images[0]
    one = generate(sd1, GenerationRequest(**base, seed=10, subseed=77, subseed_strength=1.0)).images[0]
    half = generate(sd1, GenerationRequest(**base, seed=10, subseed=77, subseed_strength=0.5))
    assert np.array_equal(pixels(zero), pixels(plain))
    assert np.abs(pixels(one) - pixels(other)).max() <= 2  # slerp at 1 is the subseed's noise up to rounding
    assert np.abs(pixels(half.images[0]) - pixels(plain)).mean() > 2
    params = parse_infotext(half.infotexts[0])
    assert params["Variation seed"] == "77" and params["Variation seed strength"] == "0.5"
    assert "Variation seed" not in parse_infotext(generate(sd1, GenerationRequest(**base, seed=10)).infotexts[0])


def test_a_varied_batch_keeps_the_seed_and_counts_the_subseeds(sd1):
    result = generate(sd1, GenerationRequest(prompt="x", steps=2, seed=10, subseed=50, subseed_strength=0.3,
                                             batch_size=2, n_iter=2, width=64, height=64))
    assert result.seeds == [10, 10, 10, 10] and result.subseeds == [50, 51, 52, 53]
    plain = generate(sd1, GenerationRequest(prompt="x", steps=2, seed=10, batch_size=2, width=64, height=64))
    assert plain.seeds == [10, 11]
    resized = generate(sd1, GenerationRequest(prompt="x", steps=2, seed=10, width=64, height=64,
                                              seed_resize_from_w=32, seed_resize_from_h=48))
    assert "Seed resize from: 32x48" in resized.infotexts[0]
    assert parse_infotext(resized.infotexts[0])["Seed resize from-2"] == "48"  # A1111 reads WxH as -1 and -2
    with pytest.raises(ValueError, match="subseed_strength"):
        GenerationRequest(prompt="x", subseed_strength=1.5).resolved(64)


def test_style_merging_follows_a1111():
    assert merge_prompt("oil painting", "a cat") == "a cat, oil painting"
    assert merge_prompt("masterpiece, {prompt}, 4k", "a cat") == "masterpiece, a cat, 4k"
    assert merge_prompt("oil painting", "") == "oil painting" and merge_prompt("", "a cat") == "a cat"
    styles = [Style("a", "{prompt}, sharp", "blurry"), Style("b", "by an artist", "")]
    assert apply_styles("a cat", "ugly", styles) == ("a cat, sharp, by an artist", "ugly, blurry")


def test_styles_file_and_unknown_names(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text('name,prompt,negative_prompt\n"Cinematic","{prompt}, film grain, ""wide""",blurry\nEmpty,,\n',
                    encoding="utf-8")
    styles = read_styles(path)
    assert styles["Cinematic"] == Style("Cinematic", '{prompt}, film grain, "wide"', "blurry")
    assert read_styles(tmp_path / "absent.csv") == {}
    with pytest.raises(ValueError, match="unknown style 'Nope'.*Cinematic, Empty"):
        find_styles(["Nope"], styles)


def _styles_file(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text("name,prompt,negative_prompt\nBold,\"bold {prompt}\",faint\n", encoding="utf-8")
    return path


def test_cli_style_and_variation_flags(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["txt2img", "a cat", "--model", "tiny-sd1", "--steps", "2", "--seed", "3", "--out", str(out),
            "--styles-file", str(_styles_file(tmp_path))]
    assert main([*args, "--style", "Bold", "--subseed", "9", "--subseed-strength", "0.25",
                 "--seed-resize-from", "32x32"]) == 0
    params = parse_infotext(read_infotext(next(out.iterdir())))
    assert params["Prompt"] == "bold a cat" and params["Negative prompt"] == "faint"
    assert params["Variation seed"] == "9" and params["Seed resize from-1"] == "32"
    capsys.readouterr()
    assert main([*args, "--style", "Nope"]) == 1
    err = capsys.readouterr().err
    assert "unknown style 'Nope'" in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--seed-resize-from", "big"]) == 1


def test_api_styles_variations_and_prompt_styles(models_dir, tmp_path):
    registry = ModelRegistry(models_dir, default="tiny", styles_file=_styles_file(tmp_path))
    with TestClient(create_app(registry)) as client:
        assert client.get("/sdapi/v1/prompt-styles").json() == [
            {"name": "Bold", "prompt": "bold {prompt}", "negative_prompt": "faint"}]
        body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 4, "sampler_name": "Euler",
                "styles": ["Bold"], "subseed": 8, "subseed_strength": 1, "batch_size": 2}
        info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
        assert info["all_prompts"] == ["bold a cat"] * 2 and info["all_negative_prompts"] == ["faint"] * 2
        assert info["prompt"] == "a cat" and info["styles"] == ["Bold"]
        assert info["all_seeds"] == [4, 4] and info["all_subseeds"] == [8, 9] and info["subseed_strength"] == 1
        assert "Variation seed: 8, Variation seed strength: 1" in info["infotexts"][0]
        r = client.post("/sdapi/v1/txt2img", json={**body, "styles": ["Nope"]})
        assert r.status_code == 422 and "Nope" in r.json()["detail"]
        r = client.post("/sdapi/v1/txt2img", json={**body, "seed_resize_from_w": 96, "seed_resize_from_h": 64})
        assert json.loads(r.json()["info"])["seed_resize_from_w"] == 96
