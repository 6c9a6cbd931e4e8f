"""A1111's X/Y/Z plot: its value syntax and axis numbering, the cells' requests and processing order, and the whole
path (API script_args and ``sd grid``): every cell of the grid is, pixel for pixel, the image the same request
gives alone, placed under its legend."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from stable_diffusion.generate import generate
from stable_diffusion.models.configs import preset
from stable_diffusion.pipeline import Pipeline, load_pipeline
from stable_diffusion.request import GenerationRequest
from stable_diffusion.server.app import create_app
from stable_diffusion.server.registry import ModelRegistry
from stable_diffusion.styles import Style
from stable_diffusion.xyz import Plot, assemble, axis_values, find_axis, parse_values, plan

BASE = {"prompt": "a red circle, blue", "negative_prompt": "green", "seed": 3, "steps": 3, "width": 64, "height": 64,
        "sampler_name": "Euler"}


def _xyz_args(x=(0, ""), y=(0, ""), z=(0, ""), legend=True, lone=True, sub=False, margin=0) -> list:
    """A1111 1.10's 18 script_args."""
    return [x[0], x[1], [], y[0], y[1], [], z[0], z[1], [], legend, lone, sub, False, False, False, False, margin,
            False]


def test_values_ranges_and_types_follow_a1111():
    steps = find_axis("Steps", "txt2img")
    assert parse_values(steps, "1-5") == [1, 2, 3, 4, 5]
    assert parse_values(steps, "1-10 (+3)") == [1, 4, 7, 10]
    assert parse_values(steps, "1-10 [4]") == [1, 4, 7, 10]
    assert parse_values(steps, "8, 12,20") == [8, 12, 20]
    cfg = find_axis("cfg", "txt2img")
    assert parse_values(cfg, "0.5-1 (+0.25)") == [0.5, 0.75, 1.0]
    assert parse_values(cfg, "5-7 [3]") == [5.0, 6.0, 7.0]
    sr = find_axis("Prompt S/R", "txt2img")
    assert parse_values(sr, 'red,"blue, dark", green') == ["red", "blue, dark", "green"]  # csv, as A1111
    assert len(parse_values(find_axis("Prompt order", "txt2img"), "a, b, c")) == 6
    with pytest.raises(ValueError, match="not an integer"):
        parse_values(steps, "ten")
    with pytest.raises(ValueError, match="too many"):
        parse_values(steps, "1-100000")


def test_axes_are_numbered_as_a1111_numbers_them_per_tab():
    assert [find_axis(i, "txt2img").label for i in (0, 1, 4, 5, 6, 7, 9, 10, 11, 17, 26, 29, 31, 38, 39, 42)] == [
        "Nothing", "Seed", "Steps", "Hires steps", "CFG Scale", "Prompt S/R", "Sampler", "Hires sampler",
        "Checkpoint name", "Schedule type", "Denoising", "Hires upscaler", "Styles", "Refiner checkpoint",
        "Refiner switch at", "Size"]
    assert [find_axis(i, "img2img").label for i in (5, 9, 10, 25)] == ["CFG Scale", "Sampler", "Checkpoint name",
                                                                      "Denoising"]
    with pytest.raises(ValueError, match="Sigma Churn.*not implemented"):
        find_axis(13, "txt2img")


def test_plan_applies_each_axis_and_runs_the_costliest_outermost():
    request = GenerationRequest("a red circle", negative_prompt="red sky", seed=5, width=64, height=64)
    plot = Plot(axis_values("Prompt S/R", "red, blue", "txt2img"), axis_values("Checkpoint name", "a, b", "txt2img"),
                axis_values("Styles", "Dark", "txt2img"))
    cells = plan(plot, request, {"Dark": Style("Dark", "{prompt}, at night", "")})
    assert [(c.ix, c.iy) for c in cells] == [(0, 0), (1, 0), (0, 1), (1, 1)]  # the checkpoint axis outermost
    assert cells[1].request.prompt == "a blue circle" and cells[1].request.negative_prompt == "blue sky"
    assert cells[2].models == {"model": "b"} and cells[2].request.styles[0].prompt == "{prompt}, at night"
    with pytest.raises(ValueError, match="did not find"):
        plan(Plot(axis_values("sr", "purple, x", "txt2img"), *(axis_values("Nothing", "", "txt2img"),) * 2),
             request)
    order = plan(Plot(axis_values("order", "red, circle", "txt2img"), *(axis_values("Nothing", "", "txt2img"),) * 2),
                 request)
    assert [c.request.prompt for c in order] == ["a red circle", "a circle red"]


def _cells_of(grid: Image.Image, columns: int, rows: int, size: int) -> list[np.ndarray]:
    """The cell pictures of a legend grid (the legend band is on the top and the left)."""
    left, top = grid.width - columns * size, grid.height - rows * size
    return [np.asarray(grid.crop((left + c * size, top + r * size, left + (c + 1) * size, top + (r + 1) * size)))
            for r in range(rows) for c in range(columns)]


def test_assemble_places_each_cell_under_its_legend(builtin):
    request = GenerationRequest("a red circle", seed=2, steps=2, sampler="Euler", width=64, height=64)
    plot = Plot(axis_values("steps", "1,2", "txt2img"), axis_values("cfg", "3,8", "txt2img"),
                axis_values("Nothing", "", "txt2img"), include_lone_images=True)
    cells = plan(plot, request)
    results = [generate(builtin, c.request) for c in cells]
    made = assemble(plot, cells, results)
    assert len(made.images) == 5 and made.images[0].width > 128 and made.images[0].height > 128
    expected = [np.asarray(r.images[0]) for r in results]  # cells run x fastest: (1,3) (2,3) (1,8) (2,8)
    assert all(np.array_equal(a, b) for a, b in zip(_cells_of(made.images[0], 2, 2, 64), expected, strict=True))
    assert "Script: X/Y/Z plot, X Type: Steps, X Values: \"1,2\", Y Type: CFG Scale" in made.infotexts[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "Stable-diffusion").mkdir()
    for seed, name in ((0, "one"), (1, "two")):
        Pipeline.from_config(preset("tiny-sd1"), seed=seed).save(root / "Stable-diffusion" / f"{name}.safetensors")
    return root


@pytest.fixture(scope="module")
def client(models):
    with TestClient(create_app(ModelRegistry(models, default="one"))) as c:
        yield c


def _decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def test_api_xyz_plot_cells_are_the_requests_alone(client, models):
    args = _xyz_args(x=(6, "4, 9"), y=(11, "one.safetensors, two"))  # CFG Scale x Checkpoint name
    r = client.post("/sdapi/v1/txt2img", json={**BASE, "script_name": "X/Y/Z plot", "script_args": args})
    assert r.status_code == 200, r.text
    body = r.json()
    info = json.loads(body["info"])
    assert len(body["images"]) == 5 and len(info["infotexts"]) == 5
    assert "X Type: CFG Scale, X Values: \"4, 9\", Y Type: Checkpoint name" in info["infotexts"][0]
    grid = _decode(body["images"][0])
    for i, (name, cfg) in enumerate([("one", 4.0), ("one", 9.0), ("two", 4.0), ("two", 9.0)]):
        pipe = load_pipeline(models / "Stable-diffusion" / f"{name}.safetensors")
        alone = generate(pipe, GenerationRequest(BASE["prompt"], negative_prompt=BASE["negative_prompt"], seed=3,
                                                 steps=3, width=64, height=64, sampler="Euler", cfg_scale=cfg))
        expected = np.asarray(alone.images[0])
        assert np.array_equal(np.asarray(_decode(body["images"][1 + i])), expected), (name, cfg)
        assert np.array_equal(_cells_of(grid, 2, 2, 64)[i], expected)
        assert f"Model: {name}" in info["infotexts"][1 + i] and f"CFG scale: {cfg}" in info["infotexts"][1 + i]


def test_api_xyz_plot_options_and_errors(client):
    def post(**fields):
        return client.post("/sdapi/v1/txt2img", json={**BASE, "script_name": "x/y/z plot", **fields})

    old = post(script_args=_xyz_args(x=("Seed", "7, 8"), lone=False)[:13] + [4])  # A1111 < 1.7: 14 arguments
    assert old.status_code == 200 and len(old.json()["images"]) == 1
    assert "Fixed X Values: \"7, 8\"" in json.loads(old.json()["info"])["infotexts"][0]
    z = post(script_args=_xyz_args(x=(4, "1,2"), z=(6, "3,6"), lone=False, sub=True))
    assert z.status_code == 200 and len(z.json()["images"]) == 3  # the Z grid and its two sub-grids
    for fields, text in (({"script_args": _xyz_args(x=(13, "0.1"))}, "Sigma Churn"),
                         ({"script_args": _xyz_args(x=(7, "purple, x"))}, "did not find"),
                         ({"script_args": _xyz_args(x=(4, "1-9"), y=(6, "1-9"))}, "over this server's limit"),
                         ({"script_args": _xyz_args(x=(11, "nope"))}, "nope"),
                         ({"script_args": _xyz_args(x=(4, "200"))}, "over this server's limits"),
                         ({"script_args": [1, 2]}, "13 to 18"),
                         ({"script_name": "prompt matrix"}, "script_name"),
                         ({"script_name": "", "script_args": [1]}, "script_args")):
        r = post(**fields)
        assert r.status_code == 422 and text in r.json()["detail"], (fields, r.text)
    scripts = client.get("/sdapi/v1/scripts").json()
    assert scripts == {"txt2img": ["x/y/z plot"], "img2img": ["x/y/z plot", "poor man's outpainting"]}
    info = client.get("/sdapi/v1/script-info").json()
    assert [s["is_img2img"] for s in info] == [False, True, True] and len(info[0]["args"]) == 18


def test_cli_grid(tmp_path, builtin):
    from stable_diffusion.cli import main

    out = tmp_path / "grids"
    assert main(["grid", "a red circle", "--x", "steps=1,2", "--y", "sampler=Euler,DDIM", "--seed", "4",
                 "--steps", "2", "--include-images", "--out", str(out)]) == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files][-1] == "xyz_grid-00000-4.png" and len(files) == 5
    text = Image.open(out / "xyz_grid-00000-4.png").text["parameters"]
    assert "X Type: Steps, X Values: \"1,2\", Y Type: Sampler, Y Values: \"Euler,DDIM\"" in text
    ddim = generate(builtin, replace(GenerationRequest("a red circle", seed=4, steps=2, sampler="DDIM")))
    assert np.array_equal(np.asarray(Image.open(out / "00000-4-4.png").convert("RGB")), np.asarray(ddim.images[0]))
    assert main(["grid", "x", "--x", "churn=1"]) == 1
