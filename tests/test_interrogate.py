"""CLIP interrogation (A1111's "clip" interrogator's ranking, without its BLIP caption): term lists read as A1111
reads them, the ranking equal to transformers' CLIPModel on the same folder, the project's domain CLIP naming the
colour and background of rendered scenes, and /interrogate and ``sd interrogate``."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from stable_diffusion.metrics.interrogate import Interrogator, clip_crop, read_categories
from stable_diffusion.shapes import DOMAIN_CLIP
from stable_diffusion.shapes.scenes import Scene, Thing, render

COLOURS, SHAPES = ("red", "blue", "green", "yellow"), ("circle", "square", "triangle", "star")


@pytest.fixture(scope="module")
def categories(tmp_path_factory):
    folder = tmp_path_factory.mktemp("interrogate")
    (folder / "objects.txt").write_text("\n".join(f"a {c} {s}" for c in COLOURS for s in SHAPES) + "\n\n")
    (folder / "backgrounds.top2.txt").write_text("on a white background\non a black background\non a gray background\n")
    (folder / "notes.md").write_text("not a term list")
    return folder


def test_term_lists_are_read_as_a1111_reads_them(categories):
    found = read_categories(categories)
    assert [(c.name, c.top, len(c.items)) for c in found] == [("backgrounds", 2, 3), ("objects", 1, 16)]


def test_ranking_matches_transformers_clip(categories):
    from transformers import CLIPModel

    from .oracle import hf_tokenizer

    interrogator = Interrogator.from_folders(DOMAIN_CLIP, categories)
    image = render(Scene((Thing("blue", "square"),), "black"))
    theirs_model = CLIPModel.from_pretrained(DOMAIN_CLIP).float().eval()
    size = theirs_model.config.vision_config.image_size
    crop = torch.from_numpy(np.asarray(clip_crop(image, size), dtype=np.float32)) / 255
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    pixels = ((crop - mean) / std).permute(2, 0, 1)[None]
    tokenizer = hf_tokenizer()
    ours = interrogator.rank(image)
    with torch.no_grad():
        expected = []
        for category in read_categories(categories):
            ids = tokenizer(category.items, padding="max_length", max_length=77, return_tensors="pt").input_ids
            out = theirs_model(input_ids=ids, pixel_values=pixels)  # unit-length image_embeds and text_embeds
            probs = (100 * out.image_embeds @ out.text_embeds.T).softmax(-1)[0]
            top = probs.topk(category.top)
            expected += [(category.items[i], float(p)) for p, i in zip(top.values, top.indices, strict=True)]
    assert [t for t, _ in ours] == [t for t, _ in expected]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(ours, expected, strict=True))


def test_the_domain_clip_names_colour_and_background(categories):
    interrogator = Interrogator.from_folders(DOMAIN_CLIP, categories)
    for colour, background in (("red", "white"), ("blue", "black"), ("green", "white")):
        terms = interrogator.interrogate(render(Scene((Thing(colour, "circle"),), background))).split(", ")
        assert terms[0] == f"on a {background} background" and terms[2].startswith(f"a {colour} ")
    assert interrogator.interrogate(render(Scene((Thing("red", "circle"),), "white")), return_ranks=True)\
        .startswith("(on a white background:")


def test_interrogate_endpoint_and_cli(categories, tmp_path, capsys):
    from stable_diffusion.cli import main
    from stable_diffusion.server.app import create_app
    from stable_diffusion.server.registry import ModelRegistry

    models = tmp_path / "models"
    (models / "interrogate").mkdir(parents=True)
    for path in categories.glob("*.txt"):
        (models / "interrogate" / path.name).write_text(path.read_text())
    image = render(Scene((Thing("red", "circle"),), "white"))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    b64 = base64.b64encode(buffer.getvalue()).decode()
    with TestClient(create_app(ModelRegistry(models, clip=DOMAIN_CLIP))) as client:
        r = client.post("/sdapi/v1/interrogate", json={"image": b64, "model": "clip"})
        assert r.status_code == 200 and r.json()["caption"].startswith("on a white background, ")
        assert client.post("/sdapi/v1/options", json={"interrogate_return_ranks": True}).status_code == 200
        assert client.post("/sdapi/v1/interrogate", json={"image": b64}).json()["caption"].startswith("(on a white")
        r = client.post("/sdapi/v1/interrogate", json={"image": b64, "model": "deepdanbooru"})
        assert r.status_code == 422 and "deepdanbooru" in r.json()["detail"]
        assert client.post("/sdapi/v1/interrogate", json={"image": ""}).status_code == 404
    with TestClient(create_app(ModelRegistry(None))) as client:
        r = client.post("/sdapi/v1/interrogate", json={"image": b64})
        assert r.status_code == 422 and "--clip" in r.json()["detail"]
    path = tmp_path / "red.png"
    image.save(path)
    assert main(["interrogate", str(path), "--clip", str(DOMAIN_CLIP), "--categories",
                 str(models / "interrogate")]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: on a white background, ")
    assert main(["interrogate", str(path), "--clip", str(tmp_path)]) == 1
