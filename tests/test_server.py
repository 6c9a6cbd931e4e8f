"""The A1111 API in-process (FastAPI's TestClient): response shapes, PNG parameters, seeds, inpainting, every
kind of bad request as a 4xx in A1111's error shape, auth, the queue bound, interrupt; each with the server's own
worker process and with redis-server and two ``sd worker`` processes behind it."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from stable_diffusion.models.configs import preset
from stable_diffusion.pipeline import Pipeline
from stable_diffusion.server.app import create_app
from stable_diffusion.server.jobs import JobQueue, QueueFull
from stable_diffusion.server.registry import ModelRegistry
from stable_diffusion.server.schemas import Limits

INFO_KEYS = {"prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
             "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps",
             "batch_size", "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash",
             "sd_vae_name", "sd_vae_hash", "seed_resize_from_w", "seed_resize_from_h", "denoising_strength",
             "extra_generation_params", "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip",
             "is_using_inpainting_conditioning", "version"}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "Stable-diffusion").mkdir()
    Pipeline.from_config(preset("tiny-sd1"), seed=0).save(root / "Stable-diffusion" / "tiny.safetensors")
    Pipeline.from_config(preset("tiny-sd1"), seed=1).save(root / "Stable-diffusion" / "other.safetensors")
    return root


@pytest.fixture(scope="module", params=["single process", "broker + 2 workers"])
def broker(request, models_dir, tmp_path_factory):
    """Every test of the app runs twice: against its own worker process, and as a front end whose jobs go through
    redis-server to two ``sd worker`` processes (``--broker``)."""
    if request.param == "single process":
        yield None
        return
    from .live_server import broker_cluster

    with broker_cluster(models_dir, tmp_path_factory.mktemp("redis"), workers=2) as (url, _):
        yield url


def app_for(models_dir, broker, **options):
    return create_app(ModelRegistry(models_dir, default="tiny"), broker=broker, **options)


@pytest.fixture(scope="module")
def client(models_dir, broker, tmp_path_factory):
    app = app_for(models_dir, broker, limits=Limits(max_width=256, max_height=256, max_steps=60, max_images=8),
                  outputs=tmp_path_factory.mktemp("outputs"), max_body=2 * 2**20)
    with TestClient(app) as c:
        yield c


def b64png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_txt2img_answers_like_a1111(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "negative_prompt": "blue", "seed": 42,
                                               "steps": 3, "width": 64, "height": 64, "batch_size": 2,
                                               "sampler_name": "DPM++ 2M", "scheduler": "karras",
                                               "restore_faces": False, "script_args": []})
    assert r.status_code == 200, r.text
    body = r.json()
    info = json.loads(body["info"])
    assert INFO_KEYS <= set(info) and info["all_seeds"] == [42, 43] and info["sampler_name"] == "DPM++ 2M"
    assert all(isinstance(info[k], str) for k in ("version", "sd_model_name", "sd_model_hash", "job_timestamp"))
    images = [decode(d) for d in body["images"]]
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    text = images[0].info["parameters"]
    assert text.split("\n")[-1].startswith("Steps: 3") and "Seed: 42" in text and "Negative prompt: blue" in text
    assert body["parameters"]["prompt"] == "a red circle"
    again = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "negative_prompt": "blue", "seed": 43,
                                                   "steps": 3, "width": 64, "height": 64,
                                                   "sampler_name": "DPM++ 2M", "scheduler": "karras"}).json()
    assert decode(again["images"][0]).tobytes() == images[1].tobytes()  # a batch image equals its seed alone


def test_img2img_inpaints_inside_the_mask_only(client):
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    r = client.post("/sdapi/v1/img2img", json={"init_images": ["data:image/png;base64," + b64png(init)],
                                               "mask": b64png(mask), "denoising_strength": 1.0, "steps": 4,
                                               "width": 64, "height": 64, "mask_blur": 0, "inpainting_fill": 2,
                                               "seed": 5, "inpaint_full_res": False})
    assert r.status_code == 200, r.text
    out = decode(r.json()["images"][0]).convert("RGB")
    assert out.crop((40, 0, 64, 64)).tobytes() == init.crop((40, 0, 64, 64)).tobytes()
    assert out.crop((0, 0, 24, 64)).tobytes() != init.crop((0, 0, 24, 64)).tobytes()
    assert json.loads(r.json()["info"])["denoising_strength"] == 1.0


@pytest.mark.parametrize("path,body,status,words", [
    ("txt2img", {"width": 8}, 422, "greater than or equal to 64"),
    ("txt2img", {"width": 1024, "height": 64}, 422, "width: Input should be less than or equal to 256"),
    ("txt2img", {"steps": 500}, 422, "steps: Input should be less than or equal to 60"),
    ("txt2img", {"batch_size": 8, "n_iter": 4}, 422, "at most 8"),
    ("txt2img", {"sampler_name": "Magic"}, 422, "unknown sampler"),
    ("txt2img", {"scheduler": "wobbly"}, 422, "unknown scheduler"),
    ("txt2img", {"steps": "many"}, 422, "steps"),
    ("img2img", {"init_images": ["%%%not base64"]}, 422, "invalid base64"),
    ("img2img", {"init_images": [base64.b64encode(b"hello").decode()]}, 422, "not a readable image"),
    ("img2img", {}, 404, "Init image not found"),
    ("img2img", {"init_images": []}, 422, "init_images"),
    ("png-info", {"image": "AAAA"}, 422, "not a readable image"),
])
def test_bad_requests_get_a1111_error_bodies(client, path, body, status, words):
    r = client.post(f"/sdapi/v1/{path}", json={"width": 64, "height": 64, "steps": 2, **body})
    assert r.status_code == status, r.text
    error = r.json()
    assert set(error) == {"error", "detail", "body", "errors"} and words in error["detail"]


def test_wrong_size_mask_and_unknown_model_and_huge_body(client):
    init = b64png(Image.new("RGB", (64, 64)))
    r = client.post("/sdapi/v1/img2img", json={"init_images": [init], "mask": b64png(Image.new("L", (32, 32))),
                                               "width": 64, "height": 64, "steps": 2})
    assert r.status_code == 422 and "mask is 32x32" in r.json()["detail"]
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "../../etc/passwd"})
    assert r.status_code == 404 and "not found" in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", content=b"{" + b" " * (3 * 2**20) + b"}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_listings_options_and_model_switch(client):
    models = client.get("/sdapi/v1/sd-models").json()
    titles = {m["model_name"]: m["title"] for m in models}
    assert {"tiny", "other"} <= set(titles) and all(len(m["hash"]) == 10 for m in models)
    assert {s["name"] for s in client.get("/sdapi/v1/samplers").json()} >= {"Euler a", "DPM++ 2M", "UniPC", "PLMS"}
    assert "karras" in {s["name"] for s in client.get("/sdapi/v1/schedulers").json()}
    assert all(isinstance(u["scale"], float) for u in client.get("/sdapi/v1/upscalers").json())
    for path in ("loras", "embeddings", "memory", "scripts", "sd-vae", "cmd-flags"):
        assert client.get(f"/sdapi/v1/{path}").status_code == 200, path
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other"}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == titles["other"]
    info = json.loads(client.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64}).json()["info"])
    assert info["sd_model_name"] == "other"
    client.post("/sdapi/v1/options", json={"sd_model_checkpoint": titles["tiny"]})
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_png_info_reads_our_parameters(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "seed": 7, "steps": 2, "width": 64, "height": 64})
    r = client.post("/sdapi/v1/png-info", json={"image": r.json()["images"][0]})
    assert r.status_code == 200 and r.json()["parameters"]["Seed"] == "7" and "a cat" in r.json()["info"]


def test_interrupt_stops_at_the_next_step_and_returns_an_image(client):
    result = {}

    def post():
        result["r"] = client.post("/sdapi/v1/txt2img", json={"steps": 60, "width": 256, "height": 256, "seed": 1})

    thread = threading.Thread(target=post)
    started = time.time()
    thread.start()
    while client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 2:
        assert time.time() - started < 60
        time.sleep(0.05)
    progress = client.get("/sdapi/v1/progress").json()
    assert 0 < progress["progress"] < 1 and {"current_image", "textinfo"} <= set(progress)
    client.post("/sdapi/v1/interrupt")
    thread.join(60)
    assert result["r"].status_code == 200 and len(result["r"].json()["images"]) == 1


def test_skip_ends_the_current_batch_and_the_job_goes_on(client):
    """Skip stops the running batch at its next step (its image is that step's x0) and the next batch runs whole."""
    body = {"prompt": "a cat", "steps": 40, "width": 128, "height": 128, "seed": 4, "n_iter": 2}
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=client.post("/sdapi/v1/txt2img", json=body)))
    started = time.time()
    thread.start()
    while client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 2:
        assert time.time() - started < 60
        time.sleep(0.05)
    client.post("/sdapi/v1/skip")
    thread.join(120)
    skipped = result["r"].json()["images"]
    whole = client.post("/sdapi/v1/txt2img", json=body).json()["images"]
    assert len(skipped) == len(whole) == 2
    assert skipped[0] != whole[0] and skipped[1] == whole[1]


def test_a_full_queue_answers_503_with_retry_after():
    jobs = JobQueue(max_queue=1)
    gate = threading.Event()
    first = jobs.submit(lambda cb: gate.wait(10), 1, 1, "block")
    time.sleep(0.1)  # the worker has taken the first job; one more may wait
    second = jobs.submit(lambda cb: 2, 1, 1, "wait")
    with pytest.raises(QueueFull):
        jobs.submit(lambda cb: 3, 1, 1, "refused")
    gate.set()
    assert first.result(10) and second.result(10) == 2
    failing = jobs.submit(lambda cb: 1 / 0, 1, 1, "fails")
    with pytest.raises(ZeroDivisionError):
        failing.result(10)
    assert jobs.submit(lambda cb: "alive", 1, 1, "after").result(10) == "alive"  # the worker survived


def test_concurrent_jobs_progress_and_stops_are_per_caller():
    """With several slots (a broker's front end): jobs run at once, each caller's progress and Interrupt / Skip
    reach their own job, and the broker's waiting jobs count against the queue bound."""
    stopped: list[tuple[str, str]] = []
    backlog = {"n": 0}
    jobs = JobQueue(max_queue=2, on_interrupt=lambda task: stopped.append(("interrupt", task)),
                    on_skip=lambda task: stopped.append(("skip", task)), concurrency=2, backlog=lambda: backlog["n"])
    gates = {name: threading.Event() for name in ("ann", "bob")}

    def run(name: str):
        def job(callback):
            callback({"i": 0, "preview": f"{name}-preview"})
            callback({"i": 1, "preview": None})
            gates[name].wait(10)
            return jobs.interrupted()
        return job

    futures = {name: jobs.submit(run(name), 4, 1, name, owner=name) for name in gates}
    time.sleep(0.2)
    for name in gates:
        state = jobs.state(owner=name)
        assert state["state"]["job"] == name and state["current_image"] == f"{name}-preview"
        assert state["state"]["sampling_step"] == 2 and state["state"]["job_count"] == 2
    jobs.interrupt("ann")
    jobs.skip("bob")
    assert [kind for kind, _ in stopped] == ["interrupt", "skip"] and stopped[0][1] != stopped[1][1]
    jobs.interrupt("carol")  # nobody's job: with several slots, nothing stops
    assert len(stopped) == 2
    backlog["n"] = 2  # two jobs wait in the broker for a worker
    with pytest.raises(QueueFull):
        jobs.submit(lambda cb: 0, 1, 1, "refused")
    for gate in gates.values():
        gate.set()
    assert futures["ann"].result(10) is True and futures["bob"].result(10) is False


def test_basic_auth_and_bearer_token(models_dir, broker):
    app = app_for(models_dir, broker, api_auth="ann:secret", api_token="t0ken")
    with TestClient(app) as c:
        assert c.get("/sdapi/v1/options").status_code == 401
        assert c.get("/sdapi/v1/options", auth=("ann", "wrong")).status_code == 401
        assert c.get("/sdapi/v1/options", auth=("ann", "secret")).status_code == 200
        assert c.get("/sdapi/v1/options", headers={"Authorization": "Bearer t0ken"}).status_code == 200


def test_save_images_writes_numbered_pngs_and_send_images_false_sends_none(models_dir, broker, tmp_path):
    app = app_for(models_dir, broker, outputs=tmp_path)
    with TestClient(app) as c:
        r = c.post("/sdapi/v1/txt2img", json={"seed": 9, "steps": 1, "width": 64, "height": 64, "batch_size": 2,
                                             "save_images": True, "send_images": False})
        assert r.status_code == 200 and r.json()["images"] == []
    saved = sorted(p.name for p in (tmp_path / "txt2img-images").glob("*.png"))
    assert saved == ["00000-9.png", "00001-10.png"]
    assert "Seed: 10" in Image.open(tmp_path / "txt2img-images" / "00001-10.png").info["parameters"]


def test_override_settings_apply_to_that_request_only(client):
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 3}
    r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert r.status_code == 200 and "Clip skip: 2" in json.loads(r.json()["info"])["infotexts"][0]
    assert "Clip skip" not in json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])["infotexts"][0]
    r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"CLIP_stop_at_last_layers": "two"}})
    assert r.status_code == 422 and "CLIP_stop_at_last_layers" in r.json()["detail"]
