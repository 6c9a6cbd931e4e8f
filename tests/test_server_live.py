"""A live ``sd serve`` (built-in model) on 127.0.0.1 driven by the real ``webuiapi`` client from PyPI, and a load
test of 32 concurrent txt2img requests on the built-in model (all complete with the right seeds and images;
memory back to its level)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from stable_diffusion.models.configs import preset
from stable_diffusion.pipeline import Pipeline

from .live_server import broker_cluster, live_server, tiny_models


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from .test_extras import esrgan_models

    models = esrgan_models(tiny_models(tmp_path_factory.mktemp("models")))
    for name in ("tiny-sdxl", "tiny-sdxl-refiner"):  # an SDXL base + refiner pair (random weights)
        Pipeline.from_config(preset(name), seed=5).save(models / "Stable-diffusion" / f"{name}.safetensors")
    from .test_browser import _controlnet_file

    _controlnet_file(models / "ControlNet" / "control_tiny.safetensors")  # for the tiny SD1 models
    (models / "interrogate").mkdir()  # A1111's term lists, for the domain CLIP
    (models / "interrogate" / "colours.txt").write_text("a red shape\na blue shape\na green shape\n")
    return models


@pytest.fixture(scope="module", params=["single process", "broker + 3 workers"])
def server(request, models, tmp_path_factory):
    """The same API tests against the single-process server and against a front end with redis-server and three
    ``sd worker`` processes (``sd serve --broker``)."""
    styles = tmp_path_factory.mktemp("styles") / "styles.csv"
    styles.write_text("name,prompt,negative_prompt\nShapes,\"{prompt}, on a black background\",blurry\n")
    from stable_diffusion.shapes import DOMAIN_CLIP

    options = ("--styles-file", str(styles), "--clip", str(DOMAIN_CLIP))
    if request.param == "single process":
        with live_server(models, tmp_path_factory.mktemp("out"), *options) as running:
            yield running
        return
    with broker_cluster(models, tmp_path_factory.mktemp("redis")) as (url, _), \
            live_server(models, tmp_path_factory.mktemp("out"), *options, "--broker", url) as running:
        yield running


def test_webuiapi_hires_fix_variations_styles_and_extras(server):
    """The A1111 features people use daily, through the real client against the built-in model."""
    import numpy as np
    import webuiapi

    port, _ = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=4)
    hires = api.txt2img(prompt="a small red circle", seed=3, width=64, height=64, enable_hr=True, hr_scale=2,
                        hr_upscaler="Latent", denoising_strength=0.5)
    assert hires.images[0].size == (128, 128) and "Hires upscale: 2" in hires.info["infotexts"][0]
    plain = {"prompt": "a blue star", "seed": 8, "width": 64, "height": 64}
    seed_image = np.asarray(api.txt2img(**plain).image, dtype=int)
    subseed_image = np.asarray(api.txt2img(**{**plain, "seed": 99}).image, dtype=int)
    zero = np.asarray(api.txt2img(**plain, subseed=99, subseed_strength=0).image, dtype=int)
    one = api.txt2img(**plain, subseed=99, subseed_strength=1)
    assert np.array_equal(zero, seed_image)
    assert np.abs(np.asarray(one.image, dtype=int) - subseed_image).max() <= 2
    assert "Variation seed: 99, Variation seed strength: 1" in one.info["infotexts"][0]
    assert api.get_prompt_styles() == [{"name": "Shapes", "prompt": "{prompt}, on a black background",
                                        "negative_prompt": "blurry"}]
    styled = api.txt2img(**plain, styles=["Shapes"])
    assert styled.info["all_prompts"] == ["a blue star, on a black background"]
    assert [u["name"] for u in api.get_upscalers()][3] == "4x-Random"
    assert api.get_realesrgan_models()[0]["name"] == "R-ESRGAN General 4xV3"
    upscaled = api.extra_single_image(hires.image, upscaler_1="4x-Random", upscaling_resize=2)
    assert upscaled.image.size == (256, 256)
    batch = api.extra_batch_images([hires.image, styled.image], upscaler_1="Lanczos", upscaling_resize=2)
    assert [im.size for im in batch.images] == [(256, 256), (128, 128)]


def test_webuiapi_xyz_plot(server):
    """A1111's X/Y/Z plot through webuiapi's script_name / script_args: the grid first, then the cells."""
    import webuiapi

    port, _ = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=2)
    args = [4, "1,2", [], 6, "3,7", [], 0, "", [], True, True, False, False, False, False, False, 0, False]
    result = api.txt2img(prompt="a red circle", seed=5, width=64, height=64, script_name="x/y/z plot",
                         script_args=args)
    assert len(result.images) == 5 and result.images[0].width > 128
    assert "Script: X/Y/Z plot, X Type: Steps" in result.info["infotexts"][0]
    assert "Steps: 2" in result.info["infotexts"][2] and "CFG scale: 7.0" in result.info["infotexts"][4]


def test_webuiapi_init_image_batch_outpainting_scripts_and_interrogate(server):
    import numpy as np
    import webuiapi

    from stable_diffusion.shapes.scenes import Scene, Thing, render

    port, _ = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=3)
    red, blue = render(Scene((Thing("red", "circle"),), "white")), render(Scene((Thing("blue", "star"),), "black"))
    batch = api.img2img(images=[red, blue], batch_size=2, seed=4, width=64, height=64, denoising_strength=0.5)
    assert len(batch.images) == 2 and batch.info["all_seeds"] == [4, 5]
    assert np.asarray(batch.images[0])[..., 0].mean() > np.asarray(batch.images[1])[..., 0].mean()  # each its own
    wide = api.img2img(images=[red], seed=4, width=64, height=64, denoising_strength=0.8,
                       script_name="poor man's outpainting", script_args=[16, 4, "fill", ["left", "right"]])
    assert wide.image.size == (128, 64)
    assert api.get_scripts() == {"txt2img": ["x/y/z plot"], "img2img": ["x/y/z plot", "poor man's outpainting"]}
    assert api.interrogate(red).info == "a red shape" and api.interrogate(blue).info == "a blue shape"


def test_webuiapi_controlnet_unit_is_the_python_api_image(server, models):
    import numpy as np
    import webuiapi
    from PIL import ImageDraw

    from stable_diffusion import load_pipeline
    from stable_diffusion.control import ControlUnit
    from stable_diffusion.generate import generate
    from stable_diffusion.request import GenerationRequest

    port, _ = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=3)
    assert api.controlnet_model_list()[0].startswith("control_tiny [")
    control = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(control).ellipse((8, 8, 40, 40), fill="white")
    unit = webuiapi.ControlNetUnit(image=control, module="canny", model="control_tiny", weight=0.9,
                                   resize_mode="Just Resize", processor_res=64, threshold_a=100, threshold_b=200)
    # a fresh alwayson_scripts: webuiapi adds the units to the dict it is given (its default is shared)
    result = api.txt2img(prompt="a cat", seed=6, width=64, height=64, controlnet_units=[unit],
                         override_settings={"sd_model_checkpoint": "tiny"}, alwayson_scripts={})
    assert len(result.images) == 2 and 'ControlNet 0: "Module: canny' in result.info["infotexts"][0]
    direct = generate(load_pipeline(models / "Stable-diffusion" / "tiny.safetensors"), GenerationRequest(
        "a cat", seed=6, steps=3, width=64, height=64, sampler="Euler", eta=1.0, controls=[ControlUnit(
            control, models / "ControlNet" / "control_tiny.safetensors", "canny", 0.9, resize_mode=0,
            processor_res=64)]))
    assert np.array_equal(np.asarray(result.image.convert("RGB")), np.asarray(direct.images[0]))


def test_webuiapi_drives_the_built_in_controlnet(server):
    """The built-in model with its built-in ControlNet through webuiapi's ControlNetUnit: the Python API's image,
    the objects where examples/layout.png draws them."""
    import numpy as np
    import webuiapi

    from stable_diffusion import load_pipeline
    from stable_diffusion.control import ControlUnit
    from stable_diffusion.shapes.control_eval import iou, object_mask
    from stable_diffusion.shapes.scenes import BACKGROUNDS

    port, _ = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=20)
    title = next(m for m in api.controlnet_model_list() if m.startswith("controlnet_layout ["))
    layout = Image.open(Path(__file__).resolve().parents[1] / "examples" / "layout.png").convert("RGB")
    prompt = "a yellow star on the left and a red circle on the right on a navy background"
    unit = webuiapi.ControlNetUnit(image=layout, module="none", model=title)
    result = api.txt2img(prompt=prompt, seed=3, width=64, height=64, controlnet_units=[unit], alwayson_scripts={})
    direct = load_pipeline().txt2img(prompt, seed=3, steps=20, sampler="Euler a",
                                     controls=[ControlUnit(layout, "builtin")])[0]
    assert np.array_equal(np.asarray(result.image.convert("RGB")), np.asarray(direct))
    drawn = np.asarray(layout.convert("L").resize((64, 64), Image.Resampling.BILINEAR)) > 127
    assert iou(object_mask(direct, BACKGROUNDS["navy"]), drawn) >= 0.7


def test_sdxl_refiner_over_http_is_the_python_api_image(server, models):
    """refiner_checkpoint / refiner_switch_at (webuiapi has no arguments for them: its custom_post sends them)."""
    import numpy as np
    import webuiapi

    from stable_diffusion import load_pipeline
    from stable_diffusion.generate import generate
    from stable_diffusion.request import GenerationRequest

    port, _ = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
    payload = {"prompt": "a red circle", "negative_prompt": "blue", "seed": 4, "steps": 6, "width": 64, "height": 64,
               "sampler_name": "DPM++ 2M", "override_settings": {"sd_model_checkpoint": "tiny-sdxl"},
               "refiner_checkpoint": "tiny-sdxl-refiner", "refiner_switch_at": 0.5}
    result = api.custom_post("txt2img", payload, baseurl=True)
    infotext = result.info["infotexts"][0]
    assert "Refiner: tiny-sdxl-refiner [" in infotext and "Refiner switch at: 0.5" in infotext
    unknown = httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json={**payload, "refiner_checkpoint": "nope"})
    assert unknown.status_code == 422 and "nope" in unknown.json()["detail"]
    folder = models / "Stable-diffusion"
    base = load_pipeline(folder / "tiny-sdxl.safetensors")
    refiner = load_pipeline(folder / "tiny-sdxl-refiner.safetensors")
    request = GenerationRequest("a red circle", negative_prompt="blue", seed=4, steps=6, width=64, height=64,
                                sampler="DPM++ 2M", refiner_switch_at=0.5)
    ours = generate(base, request, refiner=refiner).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(result.image.convert("RGB")))


def test_webuiapi_client_txt2img_img2img_progress_interrupt_options(server):
    import webuiapi

    port, _ = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=3)
    result = api.txt2img(prompt="a red circle", negative_prompt="blue", seed=11, width=64, height=64, batch_size=2)
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    assert result.info["all_seeds"] == [11, 12] and "Seed: 11" in result.info["infotexts"][0]
    init = Image.new("RGB", (64, 64), (20, 120, 200))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpainted = api.img2img(images=[init], mask_image=mask, inpainting_fill=1, denoising_strength=0.9, seed=3,
                            width=64, height=64, mask_blur=0, inpaint_full_res=False)
    out = inpainted.images[0].convert("RGB")
    assert out.getpixel((2, 2)) == init.getpixel((2, 2)) and out.getpixel((32, 32)) != init.getpixel((32, 32))
    progress = api.get_progress()
    assert {"progress", "eta_relative", "state", "current_image", "textinfo"} <= set(progress)
    assert api.interrupt() == {} and api.skip() == {}
    names = api.util_get_model_names()
    assert any(n.startswith("other.safetensors [") for n in names)
    api.util_set_model("other")
    assert api.util_get_current_model().startswith("other.safetensors")
    assert api.txt2img(prompt="x", seed=1, width=64, height=64).info["sd_model_name"] == "other"
    api.util_set_model("builtin")
    assert api.util_get_current_model().startswith("builtin [")


def test_32_concurrent_requests_complete_and_memory_settles(server):
    port, proc = server
    url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"

    def one(seed: int) -> tuple[int, dict]:
        r = httpx.post(url, json={"prompt": "a blue square", "seed": seed, "steps": 3, "width": 64, "height": 64},
                       timeout=300)
        return r.status_code, r.json()

    with ThreadPoolExecutor(8) as pool:  # warm-up: allocator pools and caches reach their working size
        list(pool.map(one, range(8)))
    before = _rss_mb(proc.pid)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(1000, 1032)))
    assert all(status == 200 for status, _ in results)
    assert all(json.loads(body["info"])["sd_model_name"] == "builtin" for _, body in results)
    seeds = [json.loads(body["info"])["seed"] for _, body in results]
    assert seeds == list(range(1000, 1032))
    alone = one(1007)[1]["images"][0]
    assert results[7][1]["images"][0] == alone  # a seed gives the same image whatever the load
    time.sleep(1)
    assert httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/progress").json()["state"]["job_count"] == 0
    assert _rss_mb(proc.pid) - before < 100, (before, _rss_mb(proc.pid))
