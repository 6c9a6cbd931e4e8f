"""A1111's Extras upscale: the endpoints (extra-single-image, extra-batch-images, upscalers, realesrgan-models)
with a random-weight RRDBNet file in models/ESRGAN, and ``sd upscale``."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from stable_diffusion.cli import main
from stable_diffusion.images import read_infotext
from stable_diffusion.models.configs import preset
from stable_diffusion.pipeline import Pipeline
from stable_diffusion.server.app import create_app
from stable_diffusion.server.registry import ModelRegistry
from stable_diffusion.server.schemas import Limits
from stable_diffusion.upscalers import get_upscaler, upscale
from stable_diffusion.upscalers.compact import SRVGGNetCompact
from stable_diffusion.upscalers.rrdbnet import RRDBNet


def esrgan_models(root):
    """models/ESRGAN/4x-Random.safetensors (RRDBNet) and models/RealESRGAN/realesr-general-x4v3.pth (compact)."""
    torch.manual_seed(0)
    (root / "ESRGAN").mkdir(parents=True, exist_ok=True)
    (root / "RealESRGAN").mkdir(parents=True, exist_ok=True)
    save_file(RRDBNet(features=8, blocks=1, growth=8).state_dict(), root / "ESRGAN" / "4x-Random.safetensors")
    torch.save({"params": SRVGGNetCompact(features=8, convs=2).state_dict()},
               root / "RealESRGAN" / "realesr-general-x4v3.pth")
    return root


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = esrgan_models(tmp_path_factory.mktemp("models"))
    (root / "Stable-diffusion").mkdir()
    Pipeline.from_config(preset("tiny-sd1"), seed=0).save(root / "Stable-diffusion" / "tiny.safetensors")
    app = create_app(ModelRegistry(root, default="tiny"), Limits(max_upscaled=300))
    with TestClient(app) as c:
        yield c, root


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _image(seed: int = 0, size=(24, 16)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _decoded(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def test_listings_show_what_exists(client):
    c, _ = client
    names = [u["name"] for u in c.get("/sdapi/v1/upscalers").json()]
    assert names == ["None", "Lanczos", "Nearest", "4x-Random", "R-ESRGAN General 4xV3"]
    entry = c.get("/sdapi/v1/upscalers").json()[3]
    assert entry["model_path"] == "ESRGAN/4x-Random.safetensors" and entry["scale"] == 4.0
    assert c.get("/sdapi/v1/realesrgan-models").json() == [
        {"name": "R-ESRGAN General 4xV3", "path": "RealESRGAN/realesr-general-x4v3.pth", "scale": 4}]


def test_single_image_with_a_model_and_a_blended_second_upscaler(client):
    c, root = client
    image = _image()
    r = c.post("/sdapi/v1/extra-single-image", json={"image": _b64(image), "upscaler_1": "4x-Random",
                                                      "upscaling_resize": 2})
    assert r.status_code == 200, r.text
    got = _decoded(r.json()["image"])
    expected = upscale(image, 2, get_upscaler("4x-Random", root))  # one 4x pass, then Lanczos to 2x
    assert got.size == (48, 32) and np.array_equal(np.asarray(got), np.asarray(expected))
    assert "Postprocess upscaler: 4x-Random" in r.json()["html_info"]
    body = {"image": _b64(image), "upscaler_1": "Nearest", "upscaler_2": "Lanczos",
            "extras_upscaler_2_visibility": 0.5, "resize_mode": 1, "upscaling_resize_w": 64,
            "upscaling_resize_h": 64}
    blended = _decoded(c.post("/sdapi/v1/extra-single-image", json=body).json()["image"])
    assert blended.size == (64, 64)  # covered, then centre-cropped


def test_batch_and_bad_requests(client):
    c, _ = client
    body = {"imageList": [{"data": _b64(_image(1)), "name": "a"}, {"data": _b64(_image(2)), "name": "b"}],
            "upscaler_1": "R-ESRGAN General 4xV3", "upscaling_resize": 4}
    r = c.post("/sdapi/v1/extra-batch-images", json=body)
    assert r.status_code == 200 and [_decoded(d).size for d in r.json()["images"]] == [(96, 64), (96, 64)]
    for bad, word in (({"upscaler_1": "ESRGAN_4x"}, "unknown upscaler"), ({"gfpgan_visibility": 0.5}, "gfpgan"),
                      ({"upscaling_resize": 8, "image": _b64(_image(3, (64, 64)))}, "limit"),
                      ({"upscaling_resize": "2"}, "upscaling_resize")):
        r = c.post("/sdapi/v1/extra-single-image", json={"image": _b64(_image()), "upscaler_1": "Lanczos", **bad})
        assert r.status_code == 422 and word in r.text, (bad, r.text)
    assert c.post("/sdapi/v1/extra-single-image", json={"upscaler_1": "Lanczos"}).status_code == 404


def test_cli_upscale(tmp_path, capsys):
    root = esrgan_models(tmp_path / "models")
    _image().save(tmp_path / "in.png")
    out = tmp_path / "out"
    assert main(["upscale", str(tmp_path / "in.png"), "--upscaler", "4x-Random", "--scale", "4", "--models-dir",
                 str(root), "--out", str(out)]) == 0
    path = out / "in-96x64.png"
    assert Image.open(path).size == (96, 64)
    assert read_infotext(path) == "Postprocess upscale by: 4.0, Postprocess upscaler: 4x-Random"
    assert main(["upscale", str(tmp_path / "in.png"), "--upscaler", "nope", "--models-dir", str(root)]) == 1
    assert "unknown upscaler 'nope'" in capsys.readouterr().err
    assert main(["upscale", str(tmp_path / "missing.png")]) == 1
