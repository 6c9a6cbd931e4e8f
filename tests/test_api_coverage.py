"""The rest of A1111's /sdapi/v1 surface: no field silently ignored (A1111's defaults pass, anything else is a
422 naming the field), sd_vae per request and server-wide, unload / reload-checkpoint, and the small listings."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from stable_diffusion.models.configs import preset
from stable_diffusion.pipeline import Pipeline
from stable_diffusion.server.app import create_app
from stable_diffusion.server.registry import ModelRegistry

BODY = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 1}
WEBUIAPI_DEFAULTS = {  # what the webuiapi client sends with every txt2img
    "restore_faces": False, "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False, "eta": 1.0,
    "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "script_args": [], "script_name": None,
    "alwayson_scripts": {}, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None,
    "firstphase_width": 0, "firstphase_height": 0, "override_settings": {}}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "Stable-diffusion").mkdir()
    (root / "VAE").mkdir()
    Pipeline.from_config(preset("tiny-sd1"), seed=0).save(root / "Stable-diffusion" / "tiny.safetensors")
    vae = Pipeline.from_config(preset("tiny-sd1"), seed=9).component_state_dicts()["vae"]
    save_file(vae, root / "VAE" / "other-vae.safetensors")
    with TestClient(create_app(ModelRegistry(root, default="tiny"))) as c:
        yield c


def _txt2img(client, **fields):
    return client.post("/sdapi/v1/txt2img", json={**BODY, **fields})


def test_defaults_pass_and_unimplemented_values_are_named(client):
    assert _txt2img(client, **WEBUIAPI_DEFAULTS).status_code == 200
    assert _txt2img(client, alwayson_scripts={"controlnet": {"args": []}}).status_code == 200
    for field, value in (("restore_faces", True), ("tiling", True), ("s_churn", 0.5), ("s_noise", 0.9),
                         ("script_name", "prompt matrix"), ("refiner_checkpoint", "sdxl-refiner"),
                         ("hr_checkpoint_name", "other"), ("infotext", "Steps: 5"),
                         ("disable_extra_networks", True),
                         ("alwayson_scripts", {"ADetailer": {"args": [{"enabled": True}]}})):
        r = _txt2img(client, **{field: value})
        assert r.status_code == 422 and field in r.json()["detail"], (field, r.text)
    r = client.post("/sdapi/v1/img2img", json={**BODY, "init_images": [], "initial_noise_multiplier": 0.5})
    assert r.status_code == 422 and "initial_noise_multiplier" in r.json()["detail"]
    from .test_extras import _b64, _image

    r = client.post("/sdapi/v1/img2img", json={**BODY, "init_images": [_b64(_image(0, (64, 64)))] * 2})
    assert r.status_code == 422 and "2 images for a batch of 1" in r.json()["detail"]  # A1111's rule


def test_sd_vae_per_request_and_server_wide(client):
    plain = _txt2img(client).json()
    other = _txt2img(client, override_settings={"sd_vae": "other-vae.safetensors"}).json()
    assert other["images"][0] != plain["images"][0]
    info = json.loads(other["info"])
    assert info["sd_vae_name"] == "other-vae" and "VAE: other-vae" in info["infotexts"][0]
    assert _txt2img(client).json()["images"][0] == plain["images"][0]  # that request only
    r = _txt2img(client, override_settings={"sd_vae": "missing.pt"})
    assert r.status_code == 422 and "missing.pt" in r.json()["detail"]
    assert client.post("/sdapi/v1/options", json={"sd_vae": "nope"}).status_code == 422
    assert client.get("/sdapi/v1/options").json()["sd_vae"] == "Automatic"  # nothing stored
    assert client.post("/sdapi/v1/options", json={"sd_vae": "other-vae"}).status_code == 200
    assert _txt2img(client).json()["images"][0] == other["images"][0]
    assert client.post("/sdapi/v1/options", json={"sd_vae": "Automatic"}).status_code == 200
    assert [v["model_name"] for v in client.get("/sdapi/v1/sd-modules").json()] == ["other-vae"]


def test_unload_reload_and_small_listings(client):
    before = _txt2img(client).json()["images"][0]
    assert client.post("/sdapi/v1/unload-checkpoint").json() == {}
    assert _txt2img(client).json()["images"][0] == before  # the next job loads the model again
    assert client.post("/sdapi/v1/reload-checkpoint").json() == {}
    modes = [m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()]
    assert modes[0] == "Latent" and "Latent (nearest-exact)" in modes and len(modes) == 6
    for path in ("face-restorers", "hypernetworks", "extensions"):
        assert client.get(f"/sdapi/v1/{path}").json() == []
    for path in ("refresh-loras", "refresh-vae", "refresh-embeddings"):
        assert client.post(f"/sdapi/v1/{path}").status_code == 200
    r = client.post("/sdapi/v1/interrogate", json={"image": "", "model": "clip"})
    assert r.status_code == 422 and "--clip" in r.json()["detail"]  # a server started without a CLIP model
