"""A1111's poor man's outpainting: its canvas and masks, its tiles (split and joined back without a seam), and
the whole path (Python, CLI, the img2img script over HTTP): the original stays where the mask keeps it, the
border is painted tile by tile with the next seed each, and the joined image has the first tile's parameters."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from stable_diffusion.generate import generate
from stable_diffusion.outpainting import Outpaint, canvas, combine, plan, split
from stable_diffusion.request import GenerationRequest


def _init(size=(64, 64)) -> Image.Image:
    image = Image.new("RGB", size, (250, 250, 250))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(220, 20, 20))
    return image


def test_canvas_and_masks_follow_a1111():
    image, mask, latent, grow = canvas(_init((100, 60)), Outpaint(pixels=32, mask_blur=4, directions=("left", "up")))
    assert image.size == (192, 128) and grow == (92, 0, 68, 0)  # 100 + 32 -> 192 (multiples of 64), all on the left
    assert np.array_equal(np.asarray(image)[68:, 92:], np.asarray(_init((100, 60))))
    m, lm = np.asarray(mask), np.asarray(latent)
    assert m[0, 0] == 255 and m[68 + 8, 92 + 8] == 0 and m[68 + 7, 92 + 30] == 255  # the edge moved in by 2 * blur
    assert lm[68 + 2, 92 + 2] == 0 and lm[68 + 1, 92 + 30] == 255  # the latent mask's by blur // 2


def test_tiles_split_and_join_without_a_seam():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))
    grid = split(image, 128, 96, 32)
    assert [t.x for t in grid.rows[0]] == [0, 86, 172] and [r[0].y for r in grid.rows] == [0, 52, 104]
    assert np.array_equal(np.asarray(combine(grid)), np.asarray(image))


def test_outpainting_paints_the_border_and_keeps_the_middle(builtin):
    settings = Outpaint(pixels=32, mask_blur=4, inpainting_fill=0, directions=("left", "right"))
    request = GenerationRequest("a red circle", init_image=_init(), seed=3, steps=6, sampler="Euler",
                                denoising_strength=0.9, outpaint=settings)
    result = generate(builtin, request)
    assert result.images[0].size == (128, 64) and result.seeds == [3]
    out = np.asarray(result.images[0], dtype=int)
    middle = np.asarray(_init(), dtype=int)[:, 26:38]  # beyond the (twice) blurred mask's reach: the original
    assert np.abs(out[:, 58:70] - middle).max() <= 1
    assert np.abs(out[:, :16] - 0).max() > 20  # the black border was painted
    assert "Mask blur: 8" in result.infotexts[0]  # the tiles use twice the blur, as A1111's
    _, work = plan(_init(), settings, 64, 64)
    assert len(work) == 2  # the left and right tiles; none lies inside the original
    with pytest.raises(ValueError, match="less than the tile size"):
        generate(builtin, GenerationRequest("x", init_image=_init(), outpaint=Outpaint(pixels=64)))
    with pytest.raises(ValueError, match="makes its own mask"):
        GenerationRequest("x", init_image=_init(), mask=Image.new("L", (64, 64)), outpaint=settings).resolved(64)


def test_outpainting_over_http_and_the_cli(builtin, tmp_path):
    from stable_diffusion.cli import main
    from stable_diffusion.server.app import create_app
    from stable_diffusion.server.registry import ModelRegistry

    buffer = io.BytesIO()
    _init().save(buffer, "PNG")
    body = {"prompt": "a red circle", "seed": 3, "steps": 6, "sampler_name": "Euler", "denoising_strength": 0.9,
            "width": 64, "height": 64, "init_images": [base64.b64encode(buffer.getvalue()).decode()],
            "script_name": "poor man's outpainting", "script_args": [32, 4, "fill", ["left", "right"]]}
    direct = generate(builtin, GenerationRequest("a red circle", init_image=_init(), seed=3, steps=6, sampler="Euler",
                                                 denoising_strength=0.9, width=64, height=64,
                                                 outpaint=Outpaint(32, 4, 0, ("left", "right"))))
    with TestClient(create_app(ModelRegistry(None))) as client:
        r = client.post("/sdapi/v1/img2img", json=body)
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(direct.images[0]))
        assert json.loads(r.json()["info"])["all_seeds"] == [3]
        assert "poor man's outpainting" in client.get("/sdapi/v1/scripts").json()["img2img"]
        for args, text in (([32, 4, 9, ["left"]], "inpainting_fill"), ([32, 4, 0, ["sideways"]], "directions"),
                           ([64, 4, 0, ["left"]], "tile size"), ([1, 2, 3, 4, 5], "takes")):
            r = client.post("/sdapi/v1/img2img", json={**body, "script_args": args})
            assert r.status_code == 422 and text in r.json()["detail"], (args, r.text)
        r = client.post("/sdapi/v1/txt2img", json={**body, "init_images": None})
        assert r.status_code == 422  # an img2img script
    path = tmp_path / "in.png"
    _init().save(path)
    out = tmp_path / "out"
    assert main(["img2img", "a red circle", "--init", str(path), "--outpaint", "32", "--outpaint-directions",
                 "left,right", "--steps", "6", "--sampler", "Euler", "--strength", "0.9", "--seed", "3",
                 "--out", str(out)]) == 0
    made = Image.open(next(out.glob("*.png"))).convert("RGB")
    assert np.array_equal(np.asarray(made), np.asarray(direct.images[0]))
