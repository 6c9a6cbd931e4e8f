"""The web UI in headless Chromium (Debian's chromium driven by Playwright): type a prompt and generate; paint
a mask and inpaint, and see the painted region change while the rest stays; the hires fix, variation seed,
styles, refiner, Extras upscale, the X/Y/Z plot and poor man's outpainting from their controls. Skipped, saying
why, only where no Chromium can be found or installed (.ci/run installs Debian's package when it can)."""

from __future__ import annotations

import base64
import io
import shutil

import pytest
from PIL import Image

from .live_server import live_server, tiny_models

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    from stable_diffusion.models.configs import preset
    from stable_diffusion.pipeline import Pipeline

    models = tiny_models(tmp_path_factory.mktemp("models"))
    Pipeline.from_config(preset("tiny-sdxl-refiner"), seed=2).save(models / "Stable-diffusion" / "refiner.safetensors")
    _controlnet_file(models / "ControlNet" / "control_tiny.safetensors")
    styles = tmp_path_factory.mktemp("styles") / "styles.csv"
    styles.write_text("name,prompt,negative_prompt\nNight,\"{prompt}, at night\",day\n")
    with live_server(models, tmp_path_factory.mktemp("out"), "--styles-file", str(styles)) as (port, _), \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function("document.getElementById('sampler_name').options.length > 0")
        yield page
        browser.close()


def _image(data_url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")


def test_type_a_prompt_generate_and_see_the_image(page):
    page.fill("#prompt", "a red circle on a white background")
    page.fill("#steps", "3")
    page.fill("#seed", "5")
    page.click("#generate")
    page.wait_for_selector("#gallery img.result", timeout=60_000)
    image = _image(page.get_attribute("#gallery img.result", "src"))
    assert image.size == (64, 64)
    assert "Seed: 5" in page.inner_text("#params") and "done: seeds 5" in page.inner_text("#status")


def test_guidance_skip_fields_reach_the_image(page):
    page.fill("#s_min_uncond", "2")
    page.check("#s_min_uncond_all")
    page.evaluate("document.getElementById('gallery').innerHTML = ''")
    page.click("#generate")
    page.wait_for_selector("#gallery img.result", timeout=60_000)
    assert "NGMS: 2.0, NGMS all steps: True" in page.inner_text("#params")
    page.fill("#s_min_uncond", "0")
    page.uncheck("#s_min_uncond_all")
    # a server-wide NGMS set through the API is the form's starting value after a reload
    options = page.url + "sdapi/v1/options"
    assert page.request.post(options, data={"s_min_uncond": 1.5, "s_min_uncond_all": True}).ok
    page.reload()
    page.wait_for_function("document.getElementById('sampler_name').options.length > 0")
    assert page.input_value("#s_min_uncond") == "1.5" and page.is_checked("#s_min_uncond_all")
    assert page.request.post(options, data={"s_min_uncond": 0, "s_min_uncond_all": False}).ok
    page.reload()
    page.wait_for_function("document.getElementById('sampler_name').options.length > 0")


def test_paint_a_mask_inpaint_and_only_the_mask_changes(page, tmp_path):
    init = Image.new("RGB", (64, 64), (30, 160, 60))
    path = tmp_path / "init.png"
    init.save(path)
    page.click("button[data-tab=inpaint]")
    page.set_input_files("#file", str(path))
    page.wait_for_function("document.getElementById('mask').width === 64")
    page.fill("#mask_blur", "0")
    page.fill("#denoising_strength", "1")
    page.select_option("#inpainting_fill", "2")
    page.fill("#brush_size", "64")
    box = page.locator("#mask").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.15, box["y"] + box["height"] * 0.1)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.15, box["y"] + box["height"] * 0.9, steps=10)
    page.mouse.up()
    page.evaluate("document.getElementById('gallery').innerHTML = ''")
    page.click("#generate")
    page.wait_for_selector("#gallery img.result", timeout=60_000)
    out = _image(page.get_attribute("#gallery img.result", "src"))
    assert out.crop((48, 0, 64, 64)).tobytes() == init.crop((48, 0, 64, 64)).tobytes()  # unpainted: kept
    assert out.crop((2, 8, 16, 56)).tobytes() != init.crop((2, 8, 16, 56)).tobytes()  # painted: repainted


def _generate(page) -> Image.Image:
    page.evaluate("document.getElementById('gallery').innerHTML = ''")
    page.click("#generate")
    page.wait_for_selector("#gallery img.result", timeout=120_000)
    return _image(page.get_attribute("#gallery img.result", "src"))


def test_hires_variation_styles_refiner_and_upscale_controls(page):
    page.click("button[data-tab=txt2img]")
    page.fill("#prompt", "a blue square")
    page.fill("#steps", "2")
    page.fill("#seed", "7")
    page.click("#hires summary")
    page.check("#enable_hr")
    page.select_option("#hr_upscaler", "Latent (nearest)")
    page.fill("#hr_scale", "2")
    page.click("#variation summary")
    page.fill("#subseed", "9")
    page.fill("#subseed_strength", "0.5")
    page.select_option("#styles", ["Night"])
    image = _generate(page)
    params = page.inner_text("#params")
    assert image.size == (128, 128) and "Hires upscale: 2" in params and "Hires upscaler: Latent (nearest)" in params
    assert "Variation seed: 9, Variation seed strength: 0.5" in params
    assert params.startswith("a blue square, at night") and "Negative prompt: day" in params
    page.uncheck("#enable_hr")
    page.fill("#subseed_strength", "0")
    page.select_option("#styles", [])
    # the refiner (a tiny SDXL refiner file) on a tiny SD1 model: same latent space
    page.select_option("#model", index=[o.startswith("tiny.safetensors") for o in page.eval_on_selector_all(
        "#model option", "os => os.map(o => o.value)")].index(True))
    page.wait_for_function("document.getElementById('status').textContent === ''", timeout=60_000)
    page.click("#refiner summary")
    refiner = page.eval_on_selector_all("#refiner_checkpoint option", "os => os.map(o => o.value)")
    page.select_option("#refiner_checkpoint", next(v for v in refiner if v.startswith("refiner.safetensors")))
    page.fill("#refiner_switch_at", "0.5")
    _generate(page)
    assert "Refiner: refiner [" in page.inner_text("#params")
    page.select_option("#refiner_checkpoint", "")
    # Extras: the chosen image upscaled by Lanczos
    page.select_option("#upscaler_1", "Lanczos")
    page.fill("#upscaling_resize", "2")
    page.click("#upscale")
    page.wait_for_function("document.querySelectorAll('#gallery img.result').length === 2", timeout=60_000)
    assert _image(page.get_attribute("#big", "src")).size == (128, 128)


def test_xyz_plot_and_outpainting_scripts(page, tmp_path):
    page.click("button[data-tab=txt2img]")
    page.fill("#steps", "2")
    page.click("#script summary")
    page.select_option("#script_name", "x/y/z plot")
    page.select_option("#x_type", label="Steps")
    page.fill("#x_values", "1,2")
    page.select_option("#y_type", label="CFG Scale")
    page.fill("#y_values", "3,7")
    grid = _generate(page)
    assert grid.width > 128 and grid.height > 128  # 2 x 2 cells of 64 px and the legend
    assert "X Type: Steps" in page.inner_text("#params")
    page.select_option("#script_name", "")
    path = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(path)
    page.click("button[data-tab=img2img]")
    page.set_input_files("#file", str(path))
    page.wait_for_function("document.getElementById('init').naturalWidth === 64")
    page.select_option("#script_name", "poor man's outpainting")
    page.fill("#outpaint_pixels", "16")
    page.uncheck("#outpaint_directions input[value=up]")
    page.uncheck("#outpaint_directions input[value=down]")
    out = _generate(page)
    assert out.size == (128, 64)  # 64 + 2 * 16, rounded up to a multiple of 64
    page.select_option("#script_name", "")


def _controlnet_file(path) -> None:
    """A random-weight ControlNet for the tiny SD1 models (2x hint encoder, as their VAE)."""
    import torch
    from safetensors.torch import save_file

    from stable_diffusion.models.configs import preset
    from stable_diffusion.models.controlnet import ControlNet, ControlNetConfig

    torch.manual_seed(3)
    net = ControlNet(ControlNetConfig(preset("tiny-sd1").unet, hint_widths=(16, 32)))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)


def test_controlnet_panel(page, tmp_path):
    from PIL import ImageDraw

    control = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(control).rectangle((10, 10, 40, 40), outline="white", width=3)
    path = tmp_path / "control.png"
    control.save(path)
    page.click("button[data-tab=txt2img]")
    models = page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    page.select_option("#model", next(v for v in models if v.startswith("tiny.safetensors")))
    page.wait_for_function("document.getElementById('status').textContent === ''", timeout=60_000)
    page.fill("#steps", "3")
    page.fill("#seed", "4")
    plain = _generate(page)
    page.click("#controlnet summary")
    page.set_input_files("#cn_file", str(path))
    page.wait_for_function("document.getElementById('cn_image').naturalWidth === 64")
    page.select_option("#cn_module", "invert")
    page.click("#cn_preview")
    page.wait_for_function("document.getElementById('cn_map').naturalWidth > 0", timeout=60_000)
    assert _image(page.get_attribute("#cn_map", "src")).getpixel((0, 0)) == (255, 255, 255)  # inverted
    page.check("#cn_enabled")
    controlled = _generate(page)
    assert 'ControlNet 0: "Module: invert, Model: control_tiny' in page.inner_text("#params")
    assert controlled.tobytes() != plain.tobytes()
    assert len(page.query_selector_all("#gallery img.result")) == 2  # the image and the detected map
    page.uncheck("#cn_enabled")
