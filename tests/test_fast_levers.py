"""The fast mode's levers, each within its stated tolerance: DeepCache (models/deepcache.py) is the UNet exactly
when its cached feature comes from the same inputs, runs whole every N calls and shallow between, and costs the
built-in model's image little; int8 (backends/int8.py) quantizes the UNet once per weights, calibrated on real
sampling runs, and stays close to the exact image. Speed is in `make bench`, not here."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from stable_diffusion import load_pipeline
from stable_diffusion.backends.int8 import KEEP_FP32, TAG, VAE_TAG
from stable_diffusion.cli import main
from stable_diffusion.cli.options import FAST, device_arguments, run_options
from stable_diffusion.models.deepcache import deep_cache, resolve_branch

from .helpers import psnr
from .oracle import assert_close

PROMPT = "a blue square on the left and a yellow star on the right on a black background"


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "openvino-cache"))


def _inputs(pipe, batch: int = 2, side: int = 8):
    torch.manual_seed(0)
    c = pipe.config.unet
    y = torch.randn(batch, c.adm_in_channels) if c.adm_in_channels else None
    return torch.randn(batch, c.in_channels, side, side), torch.tensor([20.0, 700.0][:batch]), \
        torch.randn(batch, 77, c.context_dim), y


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
@pytest.mark.parametrize("branch", [0, 1])
@torch.no_grad()
def test_deepcache_parts_are_the_unet_on_the_same_inputs(model, branch):
    pipe = load_pipeline(model)
    x, t, context, y = _inputs(pipe)
    whole = pipe.unet(x, t, context, y)
    out, feature = pipe.unet.forward_deep(x, t, context, y, branch=branch)
    assert torch.equal(out, whole)
    assert_close(pipe.unet.forward_shallow(x, t, context, feature, y, branch=branch), whole, rel=1e-6)


@torch.no_grad()
def test_deepcache_runs_whole_every_n_calls_and_costs_the_image_little(builtin):
    exact = builtin.txt2img(PROMPT, steps=12, seed=5, sampler="Euler")[0]
    with deep_cache(builtin.unet, 1) as runner:  # interval 1: off
        assert runner is None
    builtin.deepcache = 3
    try:
        cached = builtin.txt2img(PROMPT, steps=12, seed=5, sampler="Euler")[0]
    finally:
        builtin.deepcache = None
    with deep_cache(builtin.unet, 3) as runner:
        assert np.array_equal(np.asarray(builtin.txt2img(PROMPT, steps=12, seed=5, sampler="Euler")[0]),
                              np.asarray(cached))
    assert "forward" not in builtin.unet.__dict__  # the eager forward is back
    assert (runner.full_calls, runner.shallow_calls) == (4, 8)  # calls 0, 3, 6, 9 whole
    assert np.abs(np.asarray(cached, int) - np.asarray(exact, int)).max() > 0  # it is an approximation
    assert psnr(cached, exact) > 20, psnr(cached, exact)
    again = builtin.txt2img(PROMPT, steps=12, seed=5, sampler="Euler")[0]
    assert np.array_equal(np.asarray(again), np.asarray(exact))


@torch.no_grad()
def test_deepcache_branch_reaches_the_cache_and_a_deeper_one_stays_closer(builtin, tmp_path):
    """--deepcache-branch B: a cached step runs input blocks 0..B and the last B + 1 output blocks, so a deeper
    branch stays closer to the whole UNet (under Euler a, branch 2 keeps the built-in model's adherence where 0
    loses a third of it: experiments/README.md); the CLI flag reaches the same generation."""
    exact = builtin.txt2img(PROMPT, steps=12, seed=5, sampler="Euler a")[0]
    images = {}
    for branch in (0, 2):
        builtin.deepcache, builtin.deepcache_branch = 3, branch
        try:
            images[branch] = builtin.txt2img(PROMPT, steps=12, seed=5, sampler="Euler a")[0]
        finally:
            builtin.deepcache, builtin.deepcache_branch = None, 0
    assert psnr(images[2], exact) > psnr(images[0], exact) + 3, (psnr(images[2], exact), psnr(images[0], exact))
    assert main(["txt2img", PROMPT, "--steps", "12", "--seed", "5", "--sampler", "Euler a", "--deepcache", "3",
                 "--deepcache-branch", "2", "--out", str(tmp_path)]) == 0
    from PIL import Image

    (written,) = tmp_path.glob("*.png")
    assert np.array_equal(np.asarray(Image.open(written).convert("RGB")), np.asarray(images[2]))


@torch.no_grad()
def test_deepcache_on_openvino_equals_torch_parts():
    pytest.importorskip("openvino")
    pipe = load_pipeline("tiny-sdxl", backend="openvino")
    x, t, context, y = _inputs(pipe)
    deep, shallow = pipe.unet.deepcache_parts(0)
    out, feature = deep(x, t, context, y)
    ref_out, ref_feature = pipe.unet.forward_deep(x, t, context, y, branch=0)
    assert_close(out, ref_out)
    assert_close(feature, ref_feature)
    assert_close(shallow(x, t, context, feature, y), ref_out)


def test_int8_is_calibrated_once_per_weights_and_stays_close(caplog):
    pytest.importorskip("nncf")
    caplog.set_level(logging.WARNING)
    exact = load_pipeline(backend="openvino")
    fast = load_pipeline(int8=True)
    assert fast.backend == "openvino"
    reference = exact.txt2img(PROMPT, steps=20, seed=5)[0]
    image = fast.txt2img(PROMPT, steps=20, seed=5)[0]
    quantized = [r.getMessage() for r in caplog.records if "int8: quantizing" in r.getMessage()]
    assert len(quantized) == 1 and "calibration inputs" in quantized[0]
    assert psnr(image, reference) > 20, psnr(image, reference)
    assert not np.array_equal(np.asarray(image), np.asarray(reference))
    again = load_pipeline(int8=True).txt2img(PROMPT, steps=20, seed=5)[0]  # the cached int8 model
    assert len([r for r in caplog.records if "int8: quantizing" in r.getMessage()]) == 1
    assert np.array_equal(np.asarray(again), np.asarray(image))
    _assert_kept_in_fp32(next(Path(os.environ["SD_CACHE_DIR"]).glob(f"openvino/ov*/unet-*-{TAG}-*/model.xml")))


def test_int8_vae_quantizes_the_decoder_alone_once_and_stays_close(caplog):
    """--int8-vae: the VAE decoder in int8, calibrated on the latents of the calibration generations; the UNet
    stays fp32; a second load reads the cached int8 decoder; the decoded image stays close to the fp32 decoder's."""
    pytest.importorskip("nncf")
    caplog.set_level(logging.WARNING)
    cached = Path(os.environ["SD_CACHE_DIR"]) / "openvino"
    exact = load_pipeline(backend="openvino")
    fast = load_pipeline(int8_vae=True)
    assert fast.backend == "openvino"
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 2
    with torch.no_grad():
        reference, decoded = exact.vae.decode(latents), fast.vae.decode(latents)
    quantized = [r.getMessage() for r in caplog.records if "int8: quantizing" in r.getMessage()]
    assert len(quantized) == 1 and "vae-decoder" in quantized[0] and "4 calibration inputs" in quantized[0]
    assert list(cached.glob(f"ov*/vae-decoder-*-{VAE_TAG}-*"))
    x, t, context = _inputs(fast)[:3]
    with torch.no_grad():  # the UNet stays the exact one
        assert_close(fast.unet(x, t, context), exact.unet(x, t, context))
    error = (decoded - reference).abs().max().item()  # decoded pixels in [-1, 1]: RMS 0.03 is ~4 levels of 255
    assert 0 < error < 0.5 and (decoded - reference).pow(2).mean().sqrt() < 0.03, error
    image, again = (p.txt2img(PROMPT, steps=8, seed=5)[0] for p in (fast, load_pipeline(int8_vae=True)))
    assert len([r for r in caplog.records if "int8: quantizing" in r.getMessage()]) == 1  # the cached decoder
    assert np.array_equal(np.asarray(again), np.asarray(image))
    assert psnr(image, exact.txt2img(PROMPT, steps=8, seed=5)[0]) > 25


def _assert_kept_in_fp32(xml: Path) -> None:
    """In the int8 IR, the layers KEEP_FP32 names get no FakeQuantize on their inputs; every other convolution and
    MatMul (the convolutions and feed-forward layers) does."""
    import openvino as ov

    def quantized(op, hops: int = 3) -> bool:  # a FakeQuantize feeds it, perhaps through a weight's decompression
        for port in op.inputs():
            source = port.get_source_output().get_node()
            if source.get_type_name() == "FakeQuantize":
                return True
            if hops and source.get_type_name() in ("Convert", "Reshape", "Transpose", "Multiply", "Subtract") \
                    and quantized(source, hops - 1):
                return True
        return False

    keep = [re.compile(pattern) for pattern in KEEP_FP32]
    layers = {op.get_friendly_name(): quantized(op) for op in ov.Core().read_model(xml).get_ops()
              if op.get_type_name() in ("Convolution", "MatMul")}
    kept = {name for name in layers if any(p.fullmatch(name) for p in keep)}
    assert kept and not any(layers[name] for name in kept)
    assert any("attn2" in name for name in kept) and any("emb_layers" in name for name in kept)
    rest = set(layers) - kept
    assert rest and all(layers[name] for name in rest), sorted(name for name in rest if not layers[name])
    assert any(".ff." in name for name in rest) and any("attn1" in name for name in rest)


@pytest.mark.parametrize("flags,words", [
    (["--deepcache", "0"], "deepcache takes a whole number of steps >= 1"),
    (["--deepcache", "3", "--deepcache-branch", "6"], "deepcache branch must be a whole number in [0, 5]"),
    (["--deepcache", "3", "--deepcache-branch", "first"], "for this model or 'level', not"),
    (["--int8", "--backend", "torch"], "int8 runs on the openvino backend"),
    (["--int8-vae", "--backend", "torch"], "int8 runs on the openvino backend"),
    (["--tome", "1.5"], "token merging ratio must be in [0, 1)"),
    (["--tome", "nan"], "token merging ratio must be in [0, 1)"),
    (["--fast", "--attention-slicing", "64"], "drop offload / attention slicing"),
])
def test_bad_lever_flags_are_one_line(tmp_path, capsys, flags, words):
    assert main(["txt2img", "x", "--model", "tiny-sd1", "--out", str(tmp_path), *flags]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], lines


def test_token_merging_merges_similar_tokens_and_gives_them_their_destination_back():
    from stable_diffusion.models.tome import bipartite_soft_matching

    torch.manual_seed(0)
    x = torch.randn(2, 8 * 6, 16)
    merge, unmerge = bipartite_soft_matching(x, 8, 6, 0.0)
    assert torch.equal(unmerge(merge(x)), x)  # nothing merged: the identity
    x[:, 1] = x[:, 0] * 3  # token 1 points where its window's destination (token 0) does: merged first
    merge, unmerge = bipartite_soft_matching(x, 8, 6, 1 / 48)  # one pair merged: the closest, tokens 1 and 0
    merged = merge(x)
    assert merged.shape == (2, 47, 16)
    back = unmerge(merged)
    assert torch.allclose(back[:, 1], (x[:, 0] + x[:, 1]) / 2) and torch.equal(back[:, 0], back[:, 1])
    assert torch.equal(back[:, 2:], x[:, 2:])  # every other token untouched
    merge, unmerge = bipartite_soft_matching(x, 8, 6, 0.5)
    assert merge(x).shape == (2, 24, 16) and unmerge(merge(x)).shape == x.shape


def test_token_merging_averages_each_destination_with_the_sources_closest_to_it():
    """Against ToMe's bipartite soft matching spelled out token by token: each non-destination token's most
    cosine-similar destination, the r best-matched of them averaged into it, the rest kept."""
    from stable_diffusion.models.tome import bipartite_soft_matching

    torch.manual_seed(1)
    height, width, ratio = 6, 5, 0.4
    x, values = torch.randn(1, 30, 8), torch.randn(1, 30, 8)
    dst = [p for p in range(30) if (p // width) % 2 == 0 and (p % width) % 2 == 0 and p % width < 4]
    src = [p for p in range(30) if p not in dst]
    cosine = lambda p, q: float(x[0, p] @ x[0, q] / (x[0, p].norm() * x[0, q].norm()))  # noqa: E731
    best = {p: max(dst, key=lambda q: cosine(p, q)) for p in src}
    merged = sorted(src, key=lambda p: -cosine(p, best[p]))[: int(30 * ratio)]
    expected = values[0].clone()
    for d in dst:
        group = [d, *(p for p in merged if best[p] == d)]
        expected[group] = values[0, group].mean(0)
    merge, unmerge = bipartite_soft_matching(x, height, width, ratio)
    assert merge(values).shape == (1, 30 - int(30 * ratio), 8)
    assert torch.allclose(unmerge(merge(values))[0], expected, atol=1e-6)


@torch.no_grad()
def test_token_merging_costs_the_image_little_and_runs_on_openvino(builtin, caplog):
    from stable_diffusion.models.tome import set_token_merging, top_transformers

    assert top_transformers(builtin.unet), "the built-in model has attention"
    exact = builtin.txt2img(PROMPT, steps=12, seed=5, sampler="Euler")[0]
    merged_pipe = load_pipeline(tome=0.5)
    merged = merged_pipe.txt2img(PROMPT, steps=12, seed=5, sampler="Euler")[0]
    assert not np.array_equal(np.asarray(merged), np.asarray(exact))
    assert psnr(merged, exact) > 20, psnr(merged, exact)
    x, t, context, _ = _inputs(builtin)
    reference = merged_pipe.unet(x, t, context)
    pytest.importorskip("openvino")
    merged_pipe.set_backend("openvino")
    caplog.set_level(logging.WARNING)
    assert_close(merged_pipe.unet(x, t, context), reference)
    assert not any("failed" in r.getMessage() for r in caplog.records), caplog.text  # compiled, not torch's fallback
    set_token_merging(merged_pipe.unet, 0.0)  # another graph: converted anew, the exact UNet again
    assert_close(merged_pipe.unet(x, t, context), builtin.unet(x, t, context))


@torch.no_grad()
def test_token_merging_of_every_source_token_runs_on_openvino(caplog):
    """From ratio 0.75 every non-destination token of an even-sided map merges; the compiled graph has no empty
    part (it failed to compile, and fell back to torch, until 2026-12-07)."""
    from stable_diffusion.models.tome import bipartite_soft_matching

    tokens = torch.randn(2, 64, 8)
    merge, unmerge = bipartite_soft_matching(tokens, 8, 8, 0.9)
    assert merge(tokens).shape == (2, 16, 8) and unmerge(merge(tokens)).shape == (2, 64, 8)
    pytest.importorskip("openvino")
    caplog.set_level(logging.WARNING)
    pipe = load_pipeline(tome=0.75)
    x, t, context, _ = _inputs(pipe)
    reference = pipe.unet(x, t, context)
    pipe.set_backend("openvino")
    assert_close(pipe.unet(x, t, context), reference)
    messages = [r.getMessage() for r in caplog.records]
    assert any("converting the unet" in m for m in messages) and not any("failed" in m for m in messages), messages


def test_fast_quantizes_deepcache_parts_and_stays_close():
    pytest.importorskip("nncf")
    import os
    from pathlib import Path

    exact = load_pipeline(backend="openvino").txt2img(PROMPT, steps=12, seed=5, sampler="Euler")[0]
    fast = load_pipeline(**FAST)  # --fast's levers
    assert fast.deepcache_branch == 2  # "level": the built-in model's first level is a residual block and a downsample
    image = fast.txt2img(PROMPT, steps=12, seed=5, sampler="Euler")[0]
    cached = Path(os.environ["SD_CACHE_DIR"]) / "openvino"
    for part in ("unet-deep2tome0.5", "unet-shallow2tome0.5", "vae-decoder"):  # each DeepCache part and the decoder
        assert list(cached.glob(f"ov*/{part}-*-int8-*/model.xml")), sorted(p.name for p in cached.glob("*/*"))
    assert psnr(image, exact) > 15, psnr(image, exact)


def test_fast_takes_deepcache_on_the_branch_after_the_first_level():
    """--fast's DeepCache redoes the whole highest-resolution level on a cached step (SD1.x / SD2.x / SDXL: two
    residual blocks and a downsample, branch 3); --deepcache alone keeps the paper's branch 0; a flag given wins."""
    import argparse
    from types import SimpleNamespace

    def options(*flags: str):
        parser = argparse.ArgumentParser()
        device_arguments(parser)
        return run_options(parser.parse_args(flags))

    assert (options("--fast").deepcache, options("--fast").deepcache_branch) == (3, "level")
    assert options("--fast", "--deepcache-branch", "0").deepcache_branch == 0
    assert options("--deepcache", "3").deepcache_branch == 0
    assert options("--deepcache", "3", "--deepcache-branch", "level").deepcache_branch == "level"
    sd15_like = SimpleNamespace(input_blocks=[None] * 12, config=SimpleNamespace(num_res_blocks=2))
    assert resolve_branch(sd15_like, 3, "level") == 3 and resolve_branch(sd15_like, 3, 5) == 5
    assert resolve_branch(load_pipeline("tiny-sd1").unet, 3, "level") == 3
