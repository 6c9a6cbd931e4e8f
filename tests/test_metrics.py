"""Metrics: the adherence checker is validated on real dataset images; FID and CLIP score are cross-checked
against torchmetrics with the same feature module / the same CLIP weights; ``sd eval`` writes its report."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from stable_diffusion.checkpoints.io import write_safetensors
from stable_diffusion.images import to_unit
from stable_diffusion.metrics.clip_score import CLIPScorer
from stable_diffusion.metrics.fid import FeatureStatistics, fid, frechet_distance
from stable_diffusion.models.tokenizer import CLIPTokenizer
from stable_diffusion.shapes.adherence import judge, read_image
from stable_diffusion.shapes.scenes import Scene, ShapesDataset, Thing, render


@pytest.mark.parametrize("two", [0.0, 1.0])
def test_adherence_checker_reads_dataset_images(two):
    stream = ShapesDataset(split="train", two_object_fraction=two).scenes(random.Random(11), full_captions=True)
    scenes = [next(stream) for _ in range(200)]
    right = sum(judge(read_image(render(s)), s)["all"] for s in scenes)
    assert right / len(scenes) >= 0.98


def test_adherence_checker_notices_wrong_images():
    asked = Scene((Thing("red", "circle", "large", "top left"),), "white")
    assert judge(read_image(render(asked)), asked)["all"]
    for wrong in [Thing("blue", "circle", "large", "top left"), Thing("red", "square", "large", "top left"),
                  Thing("red", "circle", "small", "top left"), Thing("red", "circle", "large", "bottom right")]:
        verdict = judge(read_image(render(Scene((wrong,), "white"))), asked)
        assert not verdict["all"], wrong
    assert not judge(read_image(render(Scene(asked.objects, "black"))), asked)["all"]
    two = Scene((Thing("red", "circle"), Thing("blue", "star")), "gray", "left of")
    swapped = Scene((Thing("blue", "star"), Thing("red", "circle")), "gray", "left of")
    assert judge(read_image(render(two)), two)["all"] and not judge(read_image(render(swapped)), two)["place"]
    assert not judge(read_image(Image.new("RGB", (64, 64), (128, 128, 128))), asked)["all"]


def _features():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(32, 12))
    with torch.no_grad():
        net[-1].weight.mul_(30)  # features of order 1, so the distance is well above rounding
    return net.eval()


def test_frechet_distance_is_exact_on_known_gaussians():
    mu1, mu2 = torch.zeros(3), torch.tensor([1.0, 2.0, 0.0])
    s1, s2 = torch.diag(torch.tensor([1.0, 4.0, 9.0])), torch.diag(torch.tensor([4.0, 1.0, 9.0]))
    # |mu|^2 + sum (sqrt(a) - sqrt(b))^2 for commuting diagonal covariances
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(5 + 1 + 1 + 0, abs=1e-9)
    a = torch.randn(500, 6, dtype=torch.float64)
    stats = FeatureStatistics()
    stats.update(a[:200])
    stats.update(a[200:])
    mu, cov = stats.mean_cov()
    assert torch.allclose(cov, torch.cov(a.T), atol=1e-10)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0, abs=1e-8)


def test_fid_matches_torchmetrics_with_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = _features()
    rng = random.Random(0)
    stream = ShapesDataset(size=32).scenes(rng)
    real = torch.stack([to_unit([render(next(stream), 32)])[0] for _ in range(96)])
    fake = (real + 0.3 * torch.randn(real.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    ours = fid(net, real.split(32), fake.split(32))
    metric = FrechetInceptionDistance(feature=net, normalize=True, input_img_size=(3, 32, 32))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    theirs = float(metric.compute())
    assert ours > 0.01 and ours == pytest.approx(theirs, rel=1e-3)


@pytest.fixture(scope="module")
def tiny_hf_clip(tmp_path_factory):
    """A small random transformers CLIPModel with a processor, saved as an offline folder."""
    import transformers

    folder = tmp_path_factory.mktemp("clip")
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, vocab_size=49408, eos_token_id=49407, bos_token_id=49406,
                         pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=24)
    torch.manual_seed(0)
    transformers.CLIPModel(config).eval().save_pretrained(folder)
    ours = CLIPTokenizer.builtin()
    tokenizer = transformers.CLIPTokenizer(vocab=ours.vocab, merges=ours.merges, model_max_length=77)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_score_matches_torchmetrics(tiny_hf_clip):
    from torchmetrics.multimodal.clip_score import CLIPScore

    rng = random.Random(4)
    scenes = [next(ShapesDataset(size=32).scenes(rng)) for _ in range(6)]
    images = [render(s, 32) for s in scenes]
    texts = [s.caption for s in scenes]
    ours = CLIPScorer.from_folder(tiny_hf_clip).scores(images, texts)
    import transformers

    class Features(transformers.CLIPModel):
        """transformers 5 returns output objects where torchmetrics 1.9 expects tensors: unwrap them."""

        def get_image_features(self, *args, **kwargs):
            out = super().get_image_features(*args, **kwargs)
            return getattr(out, "pooler_output", out)

        def get_text_features(self, *args, **kwargs):
            out = super().get_text_features(*args, **kwargs)
            return getattr(out, "pooler_output", out)

    def load():  # torchmetrics takes a loader for models outside its list of hub names
        return Features.from_pretrained(tiny_hf_clip), transformers.CLIPProcessor.from_pretrained(tiny_hf_clip)

    metric = CLIPScore(model_name_or_path=load)
    pixels = (to_unit(images) * 255).round().to(torch.uint8)
    theirs = [float(metric(pixels[i:i + 1], texts[i])) for i in range(len(texts))]
    assert ours.tolist() == pytest.approx(theirs, abs=0.05)


def test_our_clip_folders_load_in_transformers(tiny_hf_clip, tmp_path):
    import transformers

    scorer = CLIPScorer.from_folder(tiny_hf_clip)
    scorer.save(tmp_path / "copy")
    theirs = transformers.CLIPModel.from_pretrained(tmp_path / "copy").eval()
    ids = scorer.tokenizer(["a red circle", "a blue square on a white background"])
    with torch.no_grad():
        expected = theirs.get_text_features(input_ids=ids)
        expected = getattr(expected, "pooler_output", expected)
    ours = scorer.model.embed_texts(ids)
    assert torch.allclose(ours, torch.nn.functional.normalize(expected.float(), dim=-1), atol=2e-3)


def test_sd_eval_writes_a_report(tmp_path, inception_weights):
    import tomllib

    from stable_diffusion.cli import main
    from stable_diffusion.training.config import parse_config
    from stable_diffusion.training.train import train

    data = tomllib.loads(open("configs/smoke.toml").read())
    data["train"].update(save_path=str(tmp_path / "run"), stages=["vae", "unet", "clip"])
    data["clip"] = {"image_size": 32, "patch_size": 8, "vision_width": 32, "vision_layers": 1, "text_width": 32,
                    "text_layers": 1, "heads": 2, "projection_dim": 16, "steps": 2, "batch_size": 8}
    model = train(parse_config(data), progress=False)
    code = main(["eval", "--model", str(model), "--samplers", "Euler,DDIM", "--steps", "2,3", "--n", "2",
                 "--clip", str(tmp_path / "run" / "clip"), "--out", str(tmp_path / "eval"), "--batch", "3",
                 "--inception", str(inception_weights)])
    assert code == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [(r["sampler"], r["steps"]) for r in result["rows"]] == [("Euler", 2), ("Euler", 3), ("DDIM", 2), ("DDIM", 3)]
    assert "chance" in result and (tmp_path / "eval" / "plot.png").exists() and result["vae_psnr_db"] > 0
    assert all(r["fid"] >= 0 and r["fid_inception"] > 0 for r in result["rows"]) and result["batch"] == 3
    report = (tmp_path / "eval" / "table.md").read_text()
    assert "| Euler | 2 |" in report and "FID (Inception)" in report and "through the VAE alone" in report
    assert 0 <= result["vae_ceiling"]["one_object"] <= 1


class _BlockVAE(torch.nn.Module):
    """A stand-in VAE that keeps one average colour per ``factor`` x ``factor`` block (factor 1: lossless)."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def encode(self, x: torch.Tensor):
        from types import SimpleNamespace

        return SimpleNamespace(mean=torch.nn.functional.avg_pool2d(x, self.factor))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(z, scale_factor=self.factor, mode="nearest")


def test_vae_ceiling_is_the_adherence_of_reconstructions():
    """A lossless VAE gives back the renders (every attribute right); one that keeps 4x4 blocks loses shapes."""
    from types import SimpleNamespace

    from stable_diffusion.shapes.evaluate import adherence, vae_reconstruct
    from stable_diffusion.shapes.scenes import heldout_scenes, render

    scenes = heldout_scenes(20, seed=1)
    renders = [render(s, 64) for s in scenes]
    results = {}
    for factor in (1, 4):
        pipe = SimpleNamespace(vae=_BlockVAE(factor), device=torch.device("cpu"), dtype=torch.float32)
        psnr, worst, rebuilt = vae_reconstruct(pipe, renders, batch=7)
        results[factor] = (psnr, adherence(rebuilt, scenes)[1]["shape"])
        assert len(rebuilt) == len(renders) and worst <= psnr
    assert results[1][0] > 99 and results[1][1] == 1.0
    assert results[4][0] < 40 and results[4][1] < 1.0


def _torch_fidelity_module(name: str, monkeypatch):
    """A torch-fidelity module, imported without the package's __init__ (which needs torchvision). The wheel
    lives in .venv/oracles (see the Makefile), off the import path so torchmetrics never sees it."""
    import importlib
    import sys
    import types

    root = Path(sys.prefix) / "oracles" / "torch_fidelity"
    assert root.is_dir(), f"{root} is missing: `make venv` installs torch-fidelity there"
    package = types.ModuleType("torch_fidelity")
    package.__path__ = [str(root)]
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    for sub in ("defaults", "deprecations", "helpers", "feature_extractor_base", "interpolate_compat_tensorflow",
                "feature_extractor_inceptionv3"):
        monkeypatch.delitem(sys.modules, f"torch_fidelity.{sub}", raising=False)
    return importlib.import_module(f"torch_fidelity.{name}")


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """Random InceptionV3 weights whose BatchNorm statistics are calibrated on random images (so activations
    stay in range), saved as a plain state-dict .pth like the FID weights files."""
    from stable_diffusion.metrics.inception import InceptionV3Features

    torch.manual_seed(0)
    net = InceptionV3Features()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running stats = the calibration batch's
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.2, 0.2)
    with torch.no_grad():
        net.train()(torch.rand(4, 3, 80, 80))
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-random.pth"
    torch.save({k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    return path


def test_tf1_resize_matches_torch_fidelitys(monkeypatch):
    from stable_diffusion.metrics.inception import resize_like_tf1

    theirs = _torch_fidelity_module("interpolate_compat_tensorflow", monkeypatch)
    x = torch.rand(2, 3, 37, 64) * 255
    expected = theirs.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert torch.allclose(resize_like_tf1(x, 299), expected, atol=1e-3)


def test_inception_features_match_torch_fidelity(inception_weights, monkeypatch):
    from stable_diffusion.metrics.inception import InceptionV3Features

    theirs = _torch_fidelity_module("feature_extractor_inceptionv3", monkeypatch)
    oracle = theirs.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                feature_extractor_weights_path=str(inception_weights))
    ours = InceptionV3Features.from_file(inception_weights)
    images = torch.randint(0, 256, (3, 3, 64, 64), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    with torch.no_grad():
        expected = oracle(images)[0]
        got = ours(images.float() / 255)
    assert expected.std() > 1e-3  # the random network does not collapse
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_inception_refuses_other_weights(tmp_path):
    from stable_diffusion.checkpoints.errors import CheckpointError
    from stable_diffusion.metrics.inception import InceptionV3Features

    path = tmp_path / "other.safetensors"
    write_safetensors(path, {"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)})
    with pytest.raises(CheckpointError, match="not InceptionV3 FID weights"):
        InceptionV3Features.from_file(path)
