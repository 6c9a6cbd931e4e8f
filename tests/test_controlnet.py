"""ControlNet (Zhang et al. 2023): our module against diffusers' ControlNetModel on tiny random weights for SD1, SD2
and SDXL (loaded from diffusers' folders and from the cldm layout), and the whole controlled txt2img against
diffusers' StableDiffusionControlNetPipeline, prompt to pixels; the extension's unit semantics (weight,
guidance range, control modes) and the preprocessors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from stable_diffusion import load_pipeline
from stable_diffusion.checkpoints.controlnet import read_controlnet
from stable_diffusion.control import PREPROCESSORS, ControlUnit
from stable_diffusion.generate import generate, initial_noise
from stable_diffusion.models.controlnet import ControlNet
from stable_diffusion.request import GenerationRequest

from .oracle import SIZE_DIM, _randomise, build_diffusers_pipeline, save, size_embedding

STEPS, SEED, PROMPT, NEGATIVE = 10, 3, "a red cat sitting on a blue chair", "blurry, low quality"


def _diffusers_controlnet(unet):
    from diffusers import ControlNetModel

    torch.manual_seed(1)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))  # the tiny VAE: 2x
    _randomise(controlnet)  # its zero convolutions get values, so the control shows
    return controlnet


def _control_image() -> Image.Image:
    image = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(image).ellipse((12, 20, 40, 48), fill="white")
    return image


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_controlnet_module_matches_diffusers(family, tmp_path):
    theirs = _diffusers_controlnet(build_diffusers_pipeline(family).unet)
    theirs.save_pretrained(tmp_path / "cn")
    config, state = read_controlnet(tmp_path / "cn")
    ours = ControlNet(config)
    ours.load_state_dict(state, strict=True)
    if family == "sd1":  # the cldm layout, the config from its keys (the head count is not in the weights: SD1's 8)
        save_file({"control_model." + k: v.contiguous() for k, v in ours.state_dict().items()},
                  tmp_path / "cldm.safetensors")
        again_config, again = read_controlnet(tmp_path / "cldm.safetensors")
        assert replace(again_config.unet, num_heads=config.unet.num_heads) == config.unet
        assert again_config.hint_widths == (16, 32) and again.keys() == state.keys()
    gen = torch.Generator().manual_seed(0)
    x, hint = torch.randn(2, 4, 8, 8, generator=gen), torch.rand(2, 3, 16, 16, generator=gen)
    t, context = torch.tensor([10.0, 500.0]), torch.randn(2, 7, config.unet.context_dim, generator=gen)
    kwargs, y = {}, None
    if family == "sdxl":
        text, time_ids = torch.randn(2, 32, generator=gen), torch.randn(2, 6, generator=gen)
        kwargs = {"added_cond_kwargs": {"text_embeds": text, "time_ids": time_ids}}
        y = torch.cat([text, size_embedding(time_ids, SIZE_DIM)], dim=1)
    with torch.no_grad():
        down, mid = theirs(x, t, context, hint, return_dict=False, **kwargs)
        outs = ours(x, hint, t, context, y)
    for a, b in zip(outs, [*down, mid], strict=True):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@torch.no_grad()
def test_controlled_txt2img_matches_diffusers_pipeline(family, tmp_path):
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    from stable_diffusion.diffusion.denoiser import Denoiser
    from stable_diffusion.diffusion.schedules import make_sigmas

    base = build_diffusers_pipeline(family)
    controlnet = _diffusers_controlnet(base.unet)
    controlnet.save_pretrained(tmp_path / "cn")
    ours = load_pipeline(save(base, tmp_path / family))
    request = dict(negative_prompt=NEGATIVE, steps=STEPS, sampler="Euler", scheduler="uniform", seed=SEED, width=64,
                   height=64)
    unit = ControlUnit(_control_image(), tmp_path / "cn", resize_mode=0)
    image = generate(ours, GenerationRequest(PROMPT, controls=[unit], **request)).images[0]
    sigma_max = make_sigmas("uniform", STEPS, Denoiser.from_config(ours.unet, ours.config).schedule)[0]
    noise, _ = initial_noise([SEED], (4, 32, 32))
    cls = StableDiffusionXLControlNetPipeline if family == "sdxl" else StableDiffusionControlNetPipeline
    pipe = cls(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(PROMPT, image=_control_image(), negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                     guidance_scale=7.0, height=64, width=64,
                     latents=noise * sigma_max / (sigma_max**2 + 1) ** 0.5).images[0]
    diff = np.abs(np.asarray(image, dtype=int) - np.asarray(reference, dtype=int))
    assert diff.max() <= 1, f"max difference {diff.max()} levels"
    plain = generate(ours, GenerationRequest(PROMPT, **request)).images[0]
    assert np.abs(np.asarray(plain, dtype=int) - np.asarray(image, dtype=int)).max() > 3  # the control shows


def test_unit_weight_guidance_range_and_modes(tmp_path):
    base = build_diffusers_pipeline("sd1")
    _diffusers_controlnet(base.unet).save_pretrained(tmp_path / "cn")
    ours = load_pipeline(save(base, tmp_path / "sd1"))

    def run(**unit) -> np.ndarray:
        controls = [ControlUnit(_control_image(), tmp_path / "cn", **unit)] if unit else []
        request = GenerationRequest(PROMPT, steps=6, sampler="Euler", seed=2, width=64, height=64, controls=controls)
        return np.asarray(generate(ours, request).images[0], dtype=int)

    plain, full = run(), run(weight=1.0)
    assert np.array_equal(run(weight=0.0), plain)  # weight 0: no control
    assert np.array_equal(run(guidance_start=0.9, guidance_end=1.0), plain)  # no step at 0.9 or later of 6
    early = run(guidance_end=0.5)
    assert not np.array_equal(early, plain) and not np.array_equal(early, full)
    modes = [run(control_mode=m) for m in (0, 1, 2)]
    assert np.array_equal(modes[0], full) and not np.array_equal(modes[1], full)
    assert not np.array_equal(modes[2], modes[1])  # CFG's unconditional half without control
    with pytest.raises(ValueError, match="control module"):
        run(module="depth_midas")
    with pytest.raises(ValueError, match="guidance_start"):
        run(guidance_start=0.8, guidance_end=0.2)


def test_preprocessors():
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).rectangle((16, 16, 48, 48), fill="black")
    edges = np.asarray(PREPROCESSORS["canny"](image, 100, 200).convert("L"))
    assert edges[14:19, 30].max() == 255 and edges[32, 32] == 0 and edges[2, 2] == 0  # the outline only
    assert np.asarray(PREPROCESSORS["invert"](image, 0, 0))[32, 32].tolist() == [255, 255, 255]
    binary = np.asarray(PREPROCESSORS["binary"](image, 127, 0).convert("L"))
    assert binary[32, 32] == 0 and binary[2, 2] == 255


def test_controlnet_api_as_the_extension(tmp_path):
    """Units in alwayson_scripts (webuiapi's ControlNetUnit fields), the /controlnet endpoints, the infotext."""
    import base64
    import io
    import json

    from fastapi.testclient import TestClient

    from stable_diffusion.models.configs import preset
    from stable_diffusion.pipeline import Pipeline
    from stable_diffusion.server.app import create_app
    from stable_diffusion.server.registry import ModelRegistry

    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    (models / "ControlNet").mkdir()
    pipe = Pipeline.from_config(preset("tiny-sd1"), seed=0)
    pipe.save(models / "Stable-diffusion" / "tiny.safetensors")
    from stable_diffusion.models.controlnet import ControlNet, ControlNetConfig

    torch.manual_seed(3)
    net = ControlNet(ControlNetConfig(preset("tiny-sd1").unet, hint_widths=(16, 32)))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    save_file({"control_model." + k: v.contiguous() for k, v in net.state_dict().items()},
              models / "ControlNet" / "control_tiny_canny.safetensors")
    from stable_diffusion.annotators.lineart import LineartGenerator

    lineart = LineartGenerator()
    with torch.no_grad():
        for p in lineart.parameters():
            p.normal_(0, 0.05)
    (models / "annotators").mkdir()
    torch.save(lineart.state_dict(), models / "annotators" / "sk_model.pth")  # a preprocessor's weights file
    buffer = io.BytesIO()
    _control_image().save(buffer, "PNG")
    unit = {"image": base64.b64encode(buffer.getvalue()).decode(), "mask": None, "module": "canny",
            "model": "control_tiny_canny [00000000]", "weight": 0.8, "resize_mode": "Just Resize", "low_vram": False,
            "processor_res": 64, "threshold_a": 100, "threshold_b": 200, "guidance_start": 0.0, "guidance_end": 1.0,
            "control_mode": "Balanced", "pixel_perfect": False, "hr_option": "Both", "enabled": True}
    body = {"prompt": "a cat", "seed": 5, "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler"}
    with TestClient(create_app(ModelRegistry(models, default="tiny"))) as client:
        assert client.get("/controlnet/version").json() == {"version": 2}
        assert client.get("/controlnet/model_list").json()["model_list"][0].startswith("control_tiny_canny [")
        listed = client.get("/controlnet/module_list").json()
        assert {"canny", "lineart_realistic"} <= set(listed["module_list"]) and "openpose" not in listed["module_list"]
        assert listed["unavailable"]["openpose"] == "needs body_pose_model.pth in annotators/"
        lines = client.post("/controlnet/detect", json={"controlnet_module": "lineart_realistic",
                                                        "controlnet_input_images": [unit["image"]],
                                                        "controlnet_processor_res": 64}).json()["images"][0]
        expected = ControlUnit(_control_image(), "", "lineart_realistic", processor_res=64,
                               annotators=models / "annotators").detect()
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(lines)))), np.asarray(expected))
        r = client.post("/controlnet/detect", json={"controlnet_module": "openpose", "controlnet_input_images": []})
        assert r.status_code == 422 and "body_pose_model.pth" in r.json()["detail"]
        detected = client.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images":
                                                           [unit["image"]], "controlnet_threshold_a": 100,
                                                           "controlnet_threshold_b": 200,
                                                           "controlnet_processor_res": 64}).json()
        edges = Image.open(io.BytesIO(base64.b64decode(detected["images"][0])))
        assert np.array_equal(np.asarray(edges), np.asarray(PREPROCESSORS["canny"](_control_image(), 100, 200)))
        r = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"ControlNet": {"args": [unit]}}})
        assert r.status_code == 200, r.text
        images = r.json()["images"]
        assert len(images) == 2  # the image, then the detected map (as the extension returns it)
        info = json.loads(r.json()["info"])["infotexts"][0]
        assert 'ControlNet 0: "Module: canny, Model: control_tiny_canny, Weight: 0.8, Resize Mode: Just Resize' in info
        plain = client.post("/sdapi/v1/txt2img", json=body).json()["images"][0]
        assert plain != images[0]
        models_dir = models / "ControlNet" / "control_tiny_canny.safetensors"
        direct = generate(load_pipeline(models / "Stable-diffusion" / "tiny.safetensors"), GenerationRequest(
            "a cat", seed=5, steps=3, width=64, height=64, sampler="Euler", controls=[ControlUnit(
                _control_image(), models_dir, "canny", 0.8, resize_mode=0, processor_res=64)]))
        got = Image.open(io.BytesIO(base64.b64decode(images[0]))).convert("RGB")
        assert np.array_equal(np.asarray(got), np.asarray(direct.images[0]))
        for change, text in (({"model": "nope"}, "nope"), ({"module": "depth"}, "control module"),
                             ({"module": "openpose"}, "needs body_pose_model.pth"),
                             ({"control_mode": 7}, "control_mode"), ({"weight": "x"}, "unit 0"),
                             ({"mask": unit["image"]}, "mask")):
            r = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {
                "args": [{**unit, **change}]}}})
            assert r.status_code == 422 and text in r.json()["detail"], (change, r.text)
        disabled = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {
            "args": [{**unit, "enabled": False}]}}}).json()["images"]
        assert disabled == [plain]


def test_cli_control(tmp_path):
    from stable_diffusion.cli import main

    base = build_diffusers_pipeline("sd1")
    _diffusers_controlnet(base.unet).save_pretrained(tmp_path / "cn")
    save(base, tmp_path / "sd1")
    _control_image().save(tmp_path / "control.png")
    out = tmp_path / "out"
    assert main(["txt2img", PROMPT, "--model", str(tmp_path / "sd1"), "--control", str(tmp_path / "control.png"),
                 "--control-model", str(tmp_path / "cn"), "--control-module", "invert", "--control-weight", "0.7",
                 "--steps", "3", "--seed", "1", "--width", "64", "--height", "64", "--out", str(out)]) == 0
    text = Image.open(out / "00000-1.png").text["parameters"]
    assert 'ControlNet 0: "Module: invert, Model: cn, Weight: 0.7, Resize Mode: Crop and Resize' in text
    strip = Image.open(out / "00000-1-control.png")  # the control map as the ControlNet saw it, then the image
    assert strip.size == (256, 128)
    assert main(["txt2img", PROMPT, "--model", str(tmp_path / "sd1"), "--control", str(tmp_path / "control.png"),
                 "--out", str(out)]) == 1  # another model than the built-in one: its ControlNet must be named


def test_full_size_cldm_keys_convert_to_diffusers_key_set():
    """An SD1.5 ControlNet's cldm keys (ours, full size on the meta device) through diffusers' own converter give
    exactly the key set of diffusers' ControlNetModel for SD1.5."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from stable_diffusion.models.configs import preset
    from stable_diffusion.models.controlnet import ControlNetConfig

    with torch.device("meta"):
        ours = ControlNet(ControlNetConfig(preset("sd1").unet))
        theirs = ControlNetModel(cross_attention_dim=768, attention_head_dim=8)
    checkpoint = {"control_model." + k: v for k, v in ours.state_dict().items()}
    converted = convert_controlnet_checkpoint(checkpoint, {"layers_per_block": 2, "down_block_types":
                                                           ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]})
    assert set(converted) == set(theirs.state_dict())


def test_more_preprocessors():
    image = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(image).line((10, 64, 118, 64), fill="black", width=3)
    lines = np.asarray(PREPROCESSORS["scribble_xdog"](image, 32, 0).convert("L"))
    assert lines[64, 64] == 255 and lines[20, 64] == 0  # the drawn line, white on black
    assert PREPROCESSORS["tile_resample"](image, 2.0, 0).size == (64, 64)
    assert PREPROCESSORS["tile_resample"](image, 1.0, 0).size == (128, 128)
    blurred = np.asarray(PREPROCESSORS["blur_gaussian"](image, 4, 0).convert("L"))
    assert 0 < blurred[64, 64] < 255
    grid = np.asarray(PREPROCESSORS["t2ia_color_grid"](image, 0, 0))
    assert grid.shape == (128, 128, 3) and len(np.unique(grid.reshape(-1, 3), axis=0)) <= 4  # 2 x 2 colour cells


def test_controls_in_img2img_inpainting_and_the_hires_pass(tmp_path):
    from stable_diffusion.hires import HiresFix

    base = build_diffusers_pipeline("sd1")
    _diffusers_controlnet(base.unet).save_pretrained(tmp_path / "cn")
    ours = load_pipeline(save(base, tmp_path / "sd1"))
    init = Image.fromarray(np.random.default_rng(4).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))

    def run(hr_option: str | None = None, **fields) -> np.ndarray:
        controls = [ControlUnit(_control_image(), tmp_path / "cn", hr_option=hr_option)] if hr_option else []
        request = GenerationRequest(PROMPT, steps=4, sampler="Euler", seed=2, controls=controls, **fields)
        return np.asarray(generate(ours, request).images[0], dtype=int)

    for fields in ({"init_image": init, "denoising_strength": 0.6},
                   {"init_image": init, "mask": mask, "denoising_strength": 0.8}):
        assert not np.array_equal(run("Both", **fields), run(None, **fields))
    hires = {"width": 64, "height": 64, "hires": HiresFix(scale=1.5), "denoising_strength": 0.5}
    both, low, high, none = (run(o, **hires) for o in ("Both", "Low res only", "High res only", None))
    assert both.shape == (96, 96, 3)
    assert len({a.tobytes() for a in (both, low, high, none)}) == 4  # each pass's control shows
