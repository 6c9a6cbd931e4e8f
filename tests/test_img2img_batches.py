"""img2img as A1111 takes its init images: several spread over the batch (image k from the k-th), and its four
resize modes (just resize, crop and resize, resize and fill with the edges stretched, and resize in latent
space)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from stable_diffusion.generate import generate
from stable_diffusion.inpaint import fit_image
from stable_diffusion.request import GenerationRequest

PLAIN = dict(prompt="a circle", steps=6, sampler="Euler", denoising_strength=0.6)


def _noise_image(seed: int, size=(64, 64)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=int)


def test_several_init_images_are_one_per_batch_image(builtin):
    a, b = _noise_image(1), Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for extra in ({}, {"mask": mask}, {"mask": mask, "inpaint_full_res": True}):
        both = generate(builtin, GenerationRequest(init_images=[a, b], seed=5, **PLAIN, **extra))
        assert both.request.batch_size == 2 and both.seeds == [5, 6]
        for k, init in enumerate((a, b)):  # the same as each alone, with its seed (batched arithmetic: 1 level)
            alone = generate(builtin, GenerationRequest(init_image=init, seed=5 + k, **PLAIN, **extra))
            assert np.abs(_px(alone.images[0]) - _px(both.images[k])).max() <= 1, (extra.keys(), k)
    with pytest.raises(ValueError, match="2 init images but 3 prompts"):
        GenerationRequest(prompt=["a", "b", "c"], init_images=[a, b]).resolved(64)


def test_resize_modes_follow_a1111():
    wide = Image.new("RGB", (128, 64), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 128, 1))  # a red top row, a green bottom row
    wide.paste((0, 255, 0), (0, 63, 128, 64))
    wide.paste((255, 255, 0), (0, 0, 32, 64))  # the left quarter yellow
    assert fit_image(wide, 64, 64, 0).size == (64, 64)
    crop = _px(fit_image(wide, 64, 64, 1))  # cover 64 high (128x64), keep the centre: no yellow left
    yellow = (crop[:, :, 0] > 200) & (crop[:, :, 1] > 200)
    assert crop.shape == (64, 64, 3) and not yellow[:, 2:].any()
    fill = _px(fit_image(wide, 64, 64, 2))  # fit 64 wide (64x32) in the middle; bands of the stretched edges
    assert fill.shape == (64, 64, 3)
    middle = _px(wide.resize((64, 32), Image.Resampling.LANCZOS))
    assert np.array_equal(fill[16:48], middle)  # the image, scaled to fit, in the middle
    # the bands: the edge row stretched (PIL samples a zero-height box with its filter: within a few levels)
    assert (np.abs(fill[:16] - middle[0]) <= 20).all() and (np.abs(fill[48:] - middle[-1]) <= 20).all()


def test_latent_resize_mode(builtin):
    init = _noise_image(3)
    same = [generate(builtin, GenerationRequest(init_image=init, seed=2, resize_mode=m, width=64, height=64,
                                                **PLAIN)).images[0] for m in (0, 3)]
    assert np.array_equal(_px(same[0]), _px(same[1]))  # at the target size there is nothing to resize
    big = _noise_image(4, (128, 128))
    latent = generate(builtin, GenerationRequest(init_image=big, seed=2, resize_mode=3, width=64, height=64, **PLAIN))
    pixels = generate(builtin, GenerationRequest(init_image=big, seed=2, resize_mode=0, width=64, height=64, **PLAIN))
    assert latent.images[0].size == (64, 64) and not np.array_equal(_px(latent.images[0]), _px(pixels.images[0]))
    with pytest.raises(ValueError, match="resize_mode"):
        GenerationRequest(init_image=init, resize_mode=5).resolved(64)


def test_api_init_images_batch_and_resize_mode(models_dir, builtin):
    from stable_diffusion.server.app import create_app
    from stable_diffusion.server.registry import ModelRegistry

    def b64(image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    a, b = _noise_image(1), _noise_image(2)
    body = {"prompt": "a circle", "steps": 6, "sampler_name": "Euler", "denoising_strength": 0.6, "seed": 9,
            "width": 64, "height": 64}
    with TestClient(create_app(ModelRegistry(None))) as client:
        r = client.post("/sdapi/v1/img2img", json={**body, "init_images": [b64(a), b64(b)], "batch_size": 2})
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["info"])["all_seeds"] == [9, 10]
        for k, init in enumerate((a, b)):
            alone = generate(builtin, GenerationRequest(init_image=init, seed=9 + k, **PLAIN))
            got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][k])))
            assert np.abs(_px(alone.images[0]) - _px(got)).max() <= 1
        r = client.post("/sdapi/v1/img2img", json={**body, "init_images": [b64(_noise_image(5, (128, 64)))],
                                                  "resize_mode": 2})
        filled = generate(builtin, GenerationRequest(init_image=_noise_image(5, (128, 64)), seed=9, resize_mode=2,
                                                     width=64, height=64, **PLAIN))
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert np.array_equal(_px(filled.images[0]), _px(got))


def test_cli_several_inits_and_resize_mode(tmp_path, builtin):
    from stable_diffusion.cli import main

    paths = []
    for seed in (1, 2):
        paths.append(tmp_path / f"in{seed}.png")
        _noise_image(seed, (96, 64)).save(paths[-1])
    out = tmp_path / "out"
    assert main(["img2img", "a circle", "--init", *map(str, paths), "--resize-mode", "1", "--width", "64",
                 "--height", "64", "--steps", "6", "--sampler", "Euler", "--strength", "0.6", "--seed", "3",
                 "--out", str(out)]) == 0
    made = sorted(out.glob("*.png"))
    assert [p.name for p in made] == ["00000-3.png", "00001-4.png"]
    second = generate(builtin, GenerationRequest(init_image=_noise_image(2, (96, 64)), resize_mode=1, width=64,
                                                 height=64, seed=4, **PLAIN))
    assert np.abs(_px(Image.open(made[1])) - _px(second.images[0])).max() <= 1


def test_latent_mask_is_the_latent_side_only(builtin, models_dir):
    """A1111's latent_mask: the latent blending follows it (unblurred); the final paste follows the mask."""
    init = _noise_image(6)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    wider = Image.new("L", (64, 64), 0)
    wider.paste(255, (8, 8, 56, 56))
    fields = dict(init_image=init, mask=mask, seed=4, mask_blur=0, inpainting_fill=1, **PLAIN)
    plain = generate(builtin, GenerationRequest(**fields)).images[0]
    latent = generate(builtin, GenerationRequest(**fields, latent_mask=wider)).images[0]
    same = generate(builtin, GenerationRequest(**fields, latent_mask=mask)).images[0]
    assert np.array_equal(_px(plain), _px(same))  # unblurred, the latent mask is the mask itself
    assert not np.array_equal(_px(plain), _px(latent))
    assert np.array_equal(_px(latent)[:4], _px(init)[:4])  # outside the mask: the original pixels
    with pytest.raises(ValueError, match="latent_mask"):
        GenerationRequest(init_image=init, latent_mask=wider).resolved(64)


def test_latent_blend_mask_is_a1111s_rounded_bicubic_mask(builtin):
    from stable_diffusion.inpaint import latent_blend_mask, latent_size, mask_tensor

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (10, 10, 40, 40))
    soft = mask_tensor(mask.resize((16, 16), Image.Resampling.BICUBIC))  # A1111: PIL's resize, /255, np.around
    assert torch.equal(latent_blend_mask(mask_tensor(mask), (16, 16)), soft.round())
    assert torch.equal(latent_blend_mask(mask_tensor(mask), (16, 16), round_mask=False), soft)
    assert set(latent_size(mask_tensor(mask), (16, 16)).unique().tolist()) == {0.0, 1.0}  # nearest: the 9-ch input
    fields = dict(init_image=_noise_image(8), mask=mask, seed=2, mask_blur=6, **PLAIN)
    hard = generate(builtin, GenerationRequest(**fields)).images[0]
    soft_image = generate(builtin, GenerationRequest(**fields, mask_round=False)).images[0]
    assert not np.array_equal(_px(hard), _px(soft_image))
