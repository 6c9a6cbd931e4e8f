"""Training a ControlNet (``stages = ["controlnet"]``): the copy starts as the UNet's encoder with zero
convolutions at zero (so it changes nothing), only the ControlNet learns, the file it writes loads and steers
generation; on shapes (the control image is the scene's layout: filled silhouettes, white on black) and on a
folder of (image, control image, caption) triples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stable_diffusion import load_pipeline
from stable_diffusion.checkpoints.controlnet import read_controlnet
from stable_diffusion.control import ControlUnit
from stable_diffusion.generate import generate
from stable_diffusion.request import GenerationRequest
from stable_diffusion.shapes.control_eval import KINDS, iou, object_mask
from stable_diffusion.shapes.scenes import (
    BACKGROUNDS,
    Scene,
    Thing,
    heldout_scenes,
    nearest_place,
    outline,
    render,
    size_word,
)
from stable_diffusion.training.config import parse_config
from stable_diffusion.training.data import make_batch
from stable_diffusion.training.train import train


def _config(tmp_path, steps: int, lr: float, **data) -> dict:
    return {"train": {"stages": ["controlnet"], "base_model": "tiny-sd1", "save_path": str(tmp_path), "steps": 1,
                      "device": "cpu", "log_every": 1},
            "data": {"size": 64, **data}, "controlnet": {"steps": steps, "batch_size": 2, "learning_rate": lr}}


def _layout() -> Image.Image:
    return render(Scene((Thing("red", "circle", place="left"),), "white"), 64, layout=True)


def test_controlnet_stage_starts_as_the_unet_and_learns_alone(tmp_path):
    base = load_pipeline("tiny-sd1")
    train(parse_config(_config(tmp_path / "start", 1, 1e-9)), progress=False)
    config, state = read_controlnet(tmp_path / "start" / "controlnet.safetensors")
    assert config.hint_widths == (16, 32) and config.unet == base.config.unet  # the stored config, heads too
    unet = base.unet.state_dict()
    assert all(torch.equal(state[k], unet[k].to(torch.float16)) for k in state if k.startswith("input_blocks."))
    assert max(state[k].abs().max() for k in state if k.startswith(("zero_convs.", "middle_block_out."))) < 1e-6
    request = dict(prompt="a red circle", steps=3, sampler="Euler", seed=1, width=64, height=64)
    plain = generate(base, GenerationRequest(**request)).images[0]
    unit = ControlUnit(_layout(), tmp_path / "start" / "controlnet.safetensors")
    start = np.asarray(generate(base, GenerationRequest(**request, controls=[unit])).images[0], dtype=int)
    assert np.abs(start - np.asarray(plain, dtype=int)).max() <= 1  # zero convolutions: no change yet

    train(parse_config(_config(tmp_path / "run", 3, 1e-3)), progress=False)
    trained = read_controlnet(tmp_path / "run" / "controlnet.safetensors")[1]
    assert min(trained[k].abs().max() for k in trained if k.startswith("zero_convs.")) > 0
    assert torch.equal(load_pipeline("tiny-sd1").unet.state_dict()["out.2.weight"], unet["out.2.weight"])
    unit = ControlUnit(_layout(), tmp_path / "run" / "controlnet.safetensors")
    steered = generate(base, GenerationRequest(**request, controls=[unit])).images[0]
    assert not np.array_equal(np.asarray(steered), np.asarray(plain))
    assert '"controlnet"' in (tmp_path / "run" / "loss.jsonl").read_text()


def test_object_weight_counts_the_drawn_latent_positions_more():
    from stable_diffusion.diffusion.denoiser import Denoiser
    from stable_diffusion.training.objectives import ControlNetLoss

    torch.manual_seed(0)
    unet = lambda x, t, context=None, y=None: x * 0.5 + 0.1  # noqa: E731 - a fixed "network"
    denoiser = Denoiser(unet, torch.linspace(0.99, 0.01, 1000), "v")
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    plain = denoiser.loss(x0, noise, t)
    assert torch.allclose(denoiser.loss(x0, noise, t, pixel_weights=torch.full((2, 1, 8, 8), 3.0)), plain)
    weights = torch.ones(2, 1, 8, 8)
    weights[:, :, :2, :2] = 5.0
    error = (denoiser.loss(x0, noise, t, pixel_weights=weights))
    sigma = denoiser.schedule.sigmas[t].reshape(-1, 1, 1, 1)
    skip_div, c_out, c_in = denoiser.scalings(sigma)
    noised = x0 + noise * sigma
    squared = (unet(noised * c_in, t) - (x0 - noised / skip_div) / c_out) ** 2
    assert torch.allclose(error, (squared * weights).sum((1, 2, 3)) / (4 * weights.sum((1, 2, 3))))

    seen = {}
    loss = ControlNetLoss.__new__(ControlNetLoss)
    torch.nn.Module.__init__(loss)
    loss.denoiser = type("D", (), {"unet": type("U", (), {})()})()
    loss.object_weight = 4.0
    hints = torch.zeros(1, 3, 64, 64)
    hints[:, :, 20:28, 40:44] = 1.0  # a drawn shape: latent rows 5-6, columns 10 (of 16 x 16)
    super_forward = lambda self, *a, pixel_weights=None: seen.setdefault("w", pixel_weights)  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("stable_diffusion.training.objectives.DiffusionLoss.forward", super_forward)
        loss(torch.zeros(1, 4, 16, 16), None, None, hints)
    w = seen["w"][0, 0]
    assert set(w.unique().tolist()) == {1.0, 4.0}
    assert torch.equal((w == 4).nonzero()[:, 0].unique(), torch.arange(4, 8))  # rows 5-6, one around
    assert torch.equal((w == 4).nonzero()[:, 1].unique(), torch.arange(9, 12))  # column 10, one around


def test_free_layouts_and_outlines():
    """Free layouts put objects at any position and size (the caption names the nearest place and size, the
    relation the larger offset); outlines are the silhouettes' edges; the shapes batches mix both in."""
    for two in (False, True):
        for scene in heldout_scenes(20, seed=3, two_object=two, free=True):
            assert all(t.box is not None and t.place == nearest_place(*t.box[:2]) and t.size == size_word(t.box[2])
                       for t in scene.objects)
            drawn = np.asarray(render(scene, 64, layout=True).convert("L")) > 127
            assert iou(object_mask(render(scene, 64), BACKGROUNDS[scene.background]), drawn) > 0.85
            if two:
                (xa, ya, _), (xb, yb, _) = (t.box for t in scene.objects)
                assert (xb - xa > abs(yb - ya)) if scene.relation == "left of" else (yb - ya > abs(xb - xa))
    places = {t.box[:2] for s in heldout_scenes(20, seed=3, free=True) for t in s.objects}
    assert len(places) == 20  # not the grid's nine points
    filled = _layout()
    edges = np.asarray(outline(filled).convert("L")) > 127
    inside = np.asarray(filled.convert("L")) > 127
    assert 0 < edges.sum() < inside.sum() / 2 and not (edges & ~inside).any()
    data = parse_config(_config("x", 1, 1e-3)).data
    _, plain, _ = make_batch(data, None, 0, 4, controls=True)
    _, mixed, _ = make_batch(data, None, 0, 4, controls=True, free_fraction=1.0, outline_fraction=1.0)
    assert plain.shape == mixed.shape == (4, 3, 64, 64) and (mixed > 0.5).float().mean() < (plain > 0.5).float().mean()


def test_controlnet_stage_on_a_folder_of_triples(tmp_path):
    images, controls = tmp_path / "images", tmp_path / "controls"
    images.mkdir()
    controls.mkdir()
    for i, colour in enumerate([(250, 20, 20), (20, 20, 250)]):
        Image.new("RGB", (64, 64), colour).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("a square")
        _layout().save(controls / f"{i}.png")
    train(parse_config(_config(tmp_path / "run", 2, 1e-3, kind="folder", path=str(images))
                       | {"controlnet": {"steps": 2, "batch_size": 2, "control_path": str(controls)}}),
          progress=False)
    assert (tmp_path / "run" / "controlnet.safetensors").exists()
    (controls / "1.png").unlink()
    with pytest.raises(ValueError, match="control images missing"):
        train(parse_config(_config(tmp_path / "again", 2, 1e-3, kind="folder", path=str(images))
                           | {"controlnet": {"steps": 2, "control_path": str(controls)}}), progress=False)
    with pytest.raises(ValueError, match="control_path"):
        parse_config(_config(tmp_path / "x", 2, 1e-3, kind="folder", path=str(images)))
    with pytest.raises(ValueError, match="only for shapes data"):
        parse_config(_config(tmp_path / "x", 2, 1e-3, kind="folder", path=str(images))
                     | {"controlnet": {"control_path": str(controls), "free_fraction": 0.5}})


def test_eval_control_measures_placement(tmp_path, capsys, monkeypatch):
    """``sd eval --control``: IoU of the objects with the drawn layouts, per weight (weight 0: the model alone), the
    VAE's ceiling per kind, and A1111's guidance skipping (NGMS) passed to every generation."""
    import json

    from stable_diffusion.cli import main
    from stable_diffusion.pipeline import Pipeline

    calls = []
    txt2img = Pipeline.txt2img

    def spy(self, prompt, *args, **fields):
        calls.append(fields)
        return txt2img(self, prompt, *args, **fields)

    monkeypatch.setattr(Pipeline, "txt2img", spy)

    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    assert iou(mask, mask) == 1.0 and iou(mask, ~mask) == 0.0
    image = render(Scene((Thing("red", "circle"),), "white"), 64)
    layout = np.asarray(render(Scene((Thing("red", "circle"),), "white"), 64, layout=True).convert("L")) > 127
    assert iou(object_mask(image, (245, 245, 245)), layout) > 0.9  # a drawn scene is where its layout says
    train(parse_config(_config(tmp_path / "run", 1, 1e-3)), progress=False)
    out = tmp_path / "eval"
    assert main(["eval", "--model", "tiny-sd1", "--control", str(tmp_path / "run" / "controlnet.safetensors"),
                 "--n", "2", "--steps", "2", "--samplers", "Euler", "--control-weights", "1,0", "--control-end", "0.5",
                 "--ngms", "5", "--ngms-all-steps", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| weight | scenes | placed |" in printed and "| 0 | two objects, free layout |" in printed
    result = json.loads((out / "control.json").read_text())
    rows = result["rows"]
    assert result["guidance_end"] == 0.5 and "guidance end 0.5" in printed
    assert [r["weight"] for r in rows] == [1.0] * 5 + [0.0] * 5
    assert {r["kind"] for r in rows} == set(KINDS) and all(0 <= r["mean_iou"] <= 1 for r in rows)
    assert set(result["vae_ceiling"]) == set(KINDS) and all(0 <= v <= 1 for v in result["vae_ceiling"].values())
    assert result["guidance_skip"] == {"s_min_uncond": 5.0, "s_min_uncond_all": True}
    assert "NGMS 5 (every step)" in printed and "| VAE ceiling |" in printed
    assert len(calls) == 20 and all(c["s_min_uncond"] == 5.0 and c["s_min_uncond_all"] for c in calls)


def test_the_built_in_controlnet_ships_and_weight_0_is_the_model_alone():
    """The built-in ControlNet (configs/builtin_controlnet.toml) is in the package, under 15 MB; at weight 0 the
    built-in model's image is bit for bit its own, at weight 1 the layout changes it."""
    from stable_diffusion.checkpoints.controlnet import BUILTIN_CONTROLNET

    assert BUILTIN_CONTROLNET.stat().st_size <= 15 * 2**20
    config, _ = read_controlnet("builtin")
    pipe = load_pipeline()
    assert config.unet == pipe.config.unet
    scene = heldout_scenes(1, seed=5, free=True)[0]
    layout = render(scene, 64, layout=True)
    plain = pipe.txt2img(scene.caption, seed=1, steps=8)[0]
    zero = pipe.txt2img(scene.caption, seed=1, steps=8, controls=[ControlUnit(layout, "builtin", weight=0)])[0]
    steered = pipe.txt2img(scene.caption, seed=1, steps=8, controls=[ControlUnit(layout, "builtin")])[0]
    assert np.array_equal(np.asarray(plain), np.asarray(zero))
    assert not np.array_equal(np.asarray(plain), np.asarray(steered))
