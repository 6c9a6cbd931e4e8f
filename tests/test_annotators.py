"""The preprocessors that need weights (lineart_realistic / lineart_coarse, openpose) against controlnet_aux, the
annotators' reference code (installed off the import path in .venv/oracles without its dependencies, see the
Makefile; its modules are loaded alone, as its package __init__ wants torchvision): the networks load the files'
names strictly and compute the same maps; the whole OpenPose parsing (peaks, limbs, people) and drawing give the
same picture. Random weights, since none can be downloaded here; files absent -> listed unavailable, one-line
error."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from stable_diffusion.annotators import annotate, availability
from stable_diffusion.annotators.lineart import LineartGenerator
from stable_diffusion.annotators.openpose import BodyPoseNet, detect_people, draw_people
from stable_diffusion.control import ControlUnit, modules

pytest.importorskip("cv2")
pytest.importorskip("scipy")


def controlnet_aux(module: str):
    for name in ("controlnet_aux", "controlnet_aux.open_pose"):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(Path(sys.prefix) / "oracles" / Path(*name.split(".")))]
            sys.modules[name] = package
    if module.startswith("open_pose"):
        importlib.import_module("controlnet_aux.open_pose.util")  # first: util and body import each other
    return importlib.import_module(f"controlnet_aux.{module}")


def _random_weights(net: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


def test_lineart_generator_loads_the_annotator_file_names_and_matches_it():
    theirs = controlnet_aux("lineart").Generator(3, 1, 3).eval()
    _random_weights(theirs, 0)
    ours = LineartGenerator().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)


def _person(size: tuple[int, int] = (200, 168)) -> Image.Image:
    image = Image.new("RGB", size, (90, 120, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse((80, 20, 120, 60), fill=(230, 190, 160))
    draw.rectangle((85, 60, 115, 120), fill=(200, 40, 40))
    draw.line((85, 70, 50, 110), fill=(230, 190, 160), width=8)
    draw.line((115, 70, 150, 110), fill=(230, 190, 160), width=8)
    return image


def _body_oracle(seed: int):
    """controlnet_aux's Body with our random weights, written as the flat-named file the annotator loads."""
    body = controlnet_aux("open_pose.body")
    model = body.bodypose_model().eval()
    _random_weights(model, seed, 0.02)
    flat = {k.split(".", 1)[1]: v for k, v in model.state_dict().items()}
    oracle = body.Body.__new__(body.Body)
    oracle.model = model
    return oracle, flat


def test_body_net_loads_the_flat_file_names_and_matches_the_annotator():
    oracle, flat = _body_oracle(2)
    ours = BodyPoseNet().eval()
    ours.load_flat(flat)
    x = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(3)) - 0.5
    with torch.no_grad():
        for a, b in zip(ours(x), oracle.model(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="not an OpenPose body model"):
        BodyPoseNet().load_flat({k: v for k, v in flat.items() if not k.startswith("conv1_1")})


SKELETON = [(0.50, 0.15), (0.50, 0.30), (0.38, 0.30), (0.30, 0.48), (0.26, 0.64), (0.62, 0.30), (0.70, 0.48),
            (0.74, 0.64), (0.43, 0.60), (0.42, 0.78), (0.41, 0.95), (0.57, 0.60), (0.58, 0.78), (0.59, 0.95),
            (0.47, 0.12), (0.53, 0.12), (0.44, 0.14), (0.56, 0.14)]  # 18 joints (x, y) as fractions, COCO order


class PosedNet(torch.nn.Module):
    """Stands in for the body net: heatmaps with a Gaussian at each joint of one or two people, affinity fields
    pointing along each limb near it; so the parsing has real structure to find (random weights give none)."""

    def __init__(self, people: list[tuple[float, float, float]]) -> None:
        super().__init__()
        self.people = people  # (x offset, y offset, scale) of SKELETON
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the annotator asks the net for its device

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from stable_diffusion.annotators.openpose import AFFINITY, LIMBS

        h, w = x.shape[2] // 8, x.shape[3] // 8
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
        heat, fields = torch.zeros(19, h, w, dtype=torch.float64), torch.zeros(38, h, w, dtype=torch.float64)
        for dx, dy, scale in self.people:
            joints = [((jx * scale + dx) * w, (jy * scale + dy) * h) for jx, jy in SKELETON]
            for j, (jx, jy) in enumerate(joints):
                heat[j] = torch.maximum(heat[j], torch.exp(-((xs - jx) ** 2 + (ys - jy) ** 2) / 2.0))
            for (a, b), (ca, cb) in zip(LIMBS, AFFINITY, strict=True):
                (ax, ay), (bx, by) = joints[a - 1], joints[b - 1]
                length = max(((bx - ax) ** 2 + (by - ay) ** 2) ** 0.5, 1e-6)
                ux, uy = (bx - ax) / length, (by - ay) / length
                along = (xs - ax) * ux + (ys - ay) * uy
                across = ((xs - ax) * uy - (ys - ay) * ux).abs()
                near = (along >= -1) & (along <= length + 1) & (across <= 1.5)
                fields[ca - 19][near], fields[cb - 19][near] = ux, uy
        return fields[None].float(), heat[None].float()


@pytest.mark.parametrize("people", [[(0.0, 0.0, 1.0)], [(-0.22, 0.05, 0.5), (0.25, 0.0, 0.6)]])
def test_openpose_parsing_and_drawing_equal_the_annotators(people):
    body, util = controlnet_aux("open_pose.body"), controlnet_aux("open_pose.util")
    net = PosedNet(people)
    oracle = body.Body.__new__(body.Body)
    oracle.model = net
    pixels = np.asarray(_person())
    with torch.no_grad():
        candidate, subset = oracle(np.ascontiguousarray(pixels[:, :, ::-1]))
    h, w = pixels.shape[:2]
    theirs = oracle.format_body_result(candidate, subset)
    expected = np.zeros((h, w, 3), np.uint8)
    for person in theirs:
        keypoints = [None if k is None else type(k)(k.x / w, k.y / h) for k in person.keypoints]
        expected = util.draw_bodypose(expected, keypoints)

    found = detect_people(net, pixels)
    assert len(found) == len(theirs) == len(people)
    for mine, person in zip(found, theirs, strict=True):
        assert mine == [None if k is None else (k.x, k.y) for k in person.keypoints]
        assert sum(j is not None for j in mine) >= 15
    drawn = draw_people(found, h, w)
    assert drawn.any() and np.array_equal(drawn, expected)


def _write(path: Path, state: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def test_missing_weights_are_listed_unavailable_and_a_unit_says_which_file(tmp_path, monkeypatch):
    monkeypatch.delenv("SD_ANNOTATORS_DIR", raising=False)
    found, missing = availability(tmp_path)
    assert found == [] and set(missing) == {"lineart_realistic", "lineart_coarse", "openpose", "depth_midas", "depth"}
    assert "openpose" not in modules(tmp_path) and "canny" in modules(tmp_path)
    unit = ControlUnit(_person(), "builtin", module="openpose", annotators=tmp_path)
    with pytest.raises(ValueError, match="body_pose_model.pth"):
        unit.check()


def test_units_run_the_annotators_from_the_folder_padded_to_64(tmp_path, monkeypatch):
    monkeypatch.delenv("SD_ANNOTATORS_DIR", raising=False)
    theirs = controlnet_aux("lineart").Generator(3, 1, 3).eval()
    _random_weights(theirs, 6)
    _write(tmp_path / "downloads" / "lineart" / "sk_model.pth", theirs.state_dict())  # the extension's layout
    _write(tmp_path / "body_pose_model.pth", _body_oracle(4)[1])
    assert availability(tmp_path)[0] == ["lineart_realistic", "openpose"]
    assert modules(tmp_path)[-2:] == ["lineart_realistic", "openpose"]

    image = _person((100, 84))  # not multiples of 64: padded with edge pixels, cropped back
    unit = ControlUnit(image, "builtin", module="lineart_realistic", annotators=tmp_path, processor_res=-1)
    unit.check()
    lines = np.asarray(unit.detect())
    padded = np.pad(np.asarray(image), ((0, 44), (0, 28), (0, 0)), mode="edge")
    with torch.no_grad():
        drawing = theirs(torch.from_numpy(padded).float().div(255).permute(2, 0, 1)[None])[0, 0].numpy()
    expected = 255 - (drawing * 255.0).clip(0, 255).astype(np.uint8)[:84, :100]
    assert lines.shape == (84, 100, 3) and np.array_equal(lines[:, :, 0], expected)

    monkeypatch.setenv("SD_ANNOTATORS_DIR", str(tmp_path))  # the variable wins over the folder given
    pose = np.asarray(annotate("openpose", _person(), "/nonexistent"))  # random weights: no one found, all black
    assert pose.shape == (168, 200, 3) and not pose.any()


def test_a_file_of_another_network_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("SD_ANNOTATORS_DIR", raising=False)
    _write(tmp_path / "sk_model2.pth", {"conv.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="sk_model2.pth is not the lineart_coarse model"):
        annotate("lineart_coarse", _person(), tmp_path)


def _midas_to_transformers(name: str) -> list[str]:
    """An original MiDaS DPT-Hybrid tensor name -> transformers' DPTForDepthEstimation name(s) (the rules of its
    convert_dpt_hybrid_to_pytorch.py; timm's fused qkv becomes three tensors)."""
    import re

    rules = [(r"^pretrained\.model\.cls_token$", "dpt.embeddings.cls_token"),
             (r"^pretrained\.model\.pos_embed$", "dpt.embeddings.position_embeddings"),
             (r"^pretrained\.model\.patch_embed\.proj\.", "dpt.embeddings.projection."),
             (r"^pretrained\.model\.patch_embed\.backbone\.stem\.(conv|norm)\.",
              lambda m: f"dpt.embeddings.backbone.bit.embedder.{'convolution' if m[1] == 'conv' else 'norm'}."),
             (r"^pretrained\.model\.patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.",
              r"dpt.embeddings.backbone.bit.encoder.stages.\1.layers.\2."),
             (r"^pretrained\.model\.norm\.", "dpt.layernorm."),
             (r"^pretrained\.model\.blocks\.(\d+)\.norm1\.", r"dpt.encoder.layer.\1.layernorm_before."),
             (r"^pretrained\.model\.blocks\.(\d+)\.norm2\.", r"dpt.encoder.layer.\1.layernorm_after."),
             (r"^pretrained\.model\.blocks\.(\d+)\.attn\.proj\.", r"dpt.encoder.layer.\1.attention.output.dense."),
             (r"^pretrained\.model\.blocks\.(\d+)\.mlp\.fc1\.", r"dpt.encoder.layer.\1.intermediate.dense."),
             (r"^pretrained\.model\.blocks\.(\d+)\.mlp\.fc2\.", r"dpt.encoder.layer.\1.output.dense."),
             (r"^pretrained\.act_postprocess([34])\.0\.project\.0\.", lambda m: f"neck.reassemble_stage.readout_projects."
                                                                            f"{int(m[1]) - 1}.0."),
             (r"^pretrained\.act_postprocess([34])\.3\.",
              lambda m: f"neck.reassemble_stage.layers.{int(m[1]) - 1}.projection."),
             (r"^pretrained\.act_postprocess4\.4\.", "neck.reassemble_stage.layers.3.resize."),
             (r"^scratch\.layer(\d)_rn\.", lambda m: f"neck.convs.{int(m[1]) - 1}."),
             (r"^scratch\.output_conv\.", "head.head.")]
    qkv = re.match(r"^pretrained\.model\.blocks\.(\d+)\.attn\.qkv\.(\w+)$", name)
    if qkv:
        return [f"dpt.encoder.layer.{qkv[1]}.attention.attention.{p}.{qkv[2]}" for p in ("query", "key", "value")]
    fusion = re.match(r"^scratch\.refinenet(\d)\.(.*)$", name)
    if fusion:
        rest = fusion[2].replace("out_conv", "projection").replace("resConfUnit", "residual_layer")
        return [f"neck.fusion_stage.layers.{4 - int(fusion[1])}." + rest.replace("conv1", "convolution1").replace(
            "conv2", "convolution2")]
    for pattern, replacement in rules:
        if re.search(pattern, name):
            return [re.sub(pattern, replacement, name)]
    raise AssertionError(f"no rule for {name}")


@pytest.mark.slow
def test_midas_dpt_hybrid_has_the_file_names_and_equals_transformers_dpt_hybrid(tmp_path, monkeypatch):
    from transformers import DPTConfig, DPTForDepthEstimation

    from stable_diffusion.annotators.midas import DPTDepth

    config = DPTConfig(is_hybrid=True, hidden_size=768, reassemble_factors=[1, 1, 1, 0.5], layer_norm_eps=1e-6,
                       neck_hidden_sizes=[256, 512, 768, 768], readout_type="project", patch_size=16)
    theirs = DPTForDepthEstimation(config).eval()
    _random_weights(theirs, 7, 0.02)
    hf = theirs.state_dict()
    ours = DPTDepth().eval()
    mapped = {k: _midas_to_transformers(k) for k in ours.state_dict()}
    assert sorted(n for names in mapped.values() for n in names) == sorted(hf)  # the converter's names, one to one
    state = {k: torch.cat([hf[n] for n in names]) for k, names in mapped.items()}
    state["pretrained.model.head.weight"] = torch.zeros(1000, 768)  # in the file, dropped on load
    state["pretrained.model.head.bias"] = torch.zeros(1000)
    ours.load_file(state)
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(8)) * 2 - 1  # its neck wants square grids
    theirs.dpt.embeddings.image_size = (96, 96)  # its size check; the 24 x 24 position grid is resized as ours
    with torch.no_grad():
        expected = theirs(pixel_values=x).predicted_depth
        assert (expected > 0).float().mean() > 0.2 and expected.std() > 0  # not a dead ReLU
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-5)
        assert ours(x[:, :, :64]).shape == (1, 64, 96)  # and any multiple of 32

    monkeypatch.delenv("SD_ANNOTATORS_DIR", raising=False)  # the whole preprocessor, from the file, as the annotator
    torch.save({k: v.half() for k, v in state.items()}, tmp_path / "dpt_hybrid-midas-501f0c75.pt")
    image = _person((64, 64))
    theirs.dpt.embeddings.image_size = (64, 64)
    with torch.no_grad():
        for p in theirs.parameters():  # the weights as the file holds them
            p.copy_(p.half().float())
        pixels = torch.from_numpy(np.array(image)).float().div(127.5).sub(1).permute(2, 0, 1)[None]
        depth = theirs(pixel_values=pixels).predicted_depth[0]
    depth = depth - depth.min()
    expected = (depth / depth.max() * 255.0).clip(0, 255).numpy().astype(np.uint8)
    for module in ("depth_midas", "depth"):
        got = np.asarray(annotate(module, image, tmp_path))[:, :, 0]
        assert got.min() == 0 and got.max() == 255 and np.abs(got.astype(int) - expected).max() <= 1


def test_a_broker_worker_finds_the_annotators_under_its_own_models_folder(tmp_path):
    from stable_diffusion.request import GenerationRequest
    from stable_diffusion.server.broker_worker import relocate
    from stable_diffusion.server.executor import Job

    front, worker = tmp_path / "front", tmp_path / "worker"
    unit = ControlUnit(_person(), "builtin", module="openpose", annotators=front / "annotators")
    moved = relocate(Job("generate", None, GenerationRequest("a", controls=[unit])), str(front), str(worker))
    assert moved.request.controls[0].annotators == worker / "annotators"
    detect = relocate(Job("detect", None, extra={"units": [unit]}), str(front), str(worker))
    assert detect.extra["units"][0].annotators == worker / "annotators" and unit.annotators == front / "annotators"
