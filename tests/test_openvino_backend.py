"""The openvino backend (backends/): exact mode. Our UNet and VAE decoder compiled by OpenVINO give diffusers'
outputs within 1e-4 relative (fp32), and whole txt2img images within 1 level of diffusers' pipelines for SD1,
SD2 (eps, v) and SDXL; the converted model is cached on disk by a fingerprint of the weights (a second pipeline
does not convert again; weights changed in place convert anew); what the backend cannot run, or a missing
OpenVINO, runs torch with a one-line notice."""

from __future__ import annotations

import logging

import pytest
import torch

from stable_diffusion import load_pipeline
from stable_diffusion.backends import openvino as ov_backend
from stable_diffusion.backends.weights import weights_fingerprint
from stable_diffusion.generate import initial_noise

from .oracle import assert_close, build_diffusers_pipeline, save
from .test_pipeline_parity import NEGATIVE, PROMPT, SEED, STEPS, VARIANTS, _assert_within_one_level, _sigmas, _theirs

pytest.importorskip("openvino")  # the backend is optional; make test installs it (dev extra)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.getbasetemp() / "openvino-cache"
    monkeypatch.setenv("SD_CACHE_DIR", str(folder))
    return folder


def _conversions(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "converting" in r.getMessage()]


@pytest.mark.parametrize("family,prediction", VARIANTS, ids=[f"{f}-{p or 'default'}" for f, p in VARIANTS])
@torch.no_grad()
def test_txt2img_on_openvino_matches_diffusers(family, prediction, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    theirs = build_diffusers_pipeline(family, prediction=prediction)
    ours = load_pipeline(save(theirs, tmp_path / "model"), backend="openvino")
    assert ours.backend == "openvino"
    image = ours.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=7.0, sampler="Euler",
                         scheduler="uniform", seed=SEED, width=64, height=64)[0]
    noise, _ = initial_noise([SEED], (4, 64 // ours.vae.downscale, 64 // ours.vae.downscale))
    sigma_max = _sigmas(ours)[0]
    latents = noise * sigma_max / (sigma_max**2 + 1) ** 0.5
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    _assert_within_one_level(image, _theirs(cls, theirs, latents=latents, height=64, width=64))
    # the networks themselves, against diffusers' modules on the same inputs
    torch.manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([3.0, 777.0])
    context = torch.randn(2, 77, theirs.unet.config.cross_attention_dim)
    if family == "sdxl":
        pooled, time_ids = torch.randn(2, 32), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
        expected = theirs.unet(x, t, encoder_hidden_states=context,
                               added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        from .oracle import SIZE_DIM, size_embedding

        assert_close(ours.unet(x, t, context, torch.cat([pooled, size_embedding(time_ids, SIZE_DIM)], 1)), expected)
    else:
        assert_close(ours.unet(x, t, context), theirs.unet(x, t, encoder_hidden_states=context).sample)
    z = torch.randn(1, 4, 8, 8)
    assert_close(ours.vae.decode(z), theirs.vae.decode(z).sample)


@torch.no_grad()
def test_the_converted_model_is_cached_by_the_weights(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    pipe = load_pipeline("tiny-sd1", backend="openvino")
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 32)
    reference = load_pipeline("tiny-sd1").unet(x, t, context)
    assert_close(pipe.unet(x, t, context), reference)
    assert_close(pipe.unet(torch.cat([x, x]), t.expand(2), torch.cat([context, context]))[1:], reference)
    assert_close(pipe.unet(x, t, context), reference)
    first = len(_conversions(caplog))
    again = load_pipeline("tiny-sd1", backend="openvino")  # same weights: the cached IR, no conversion
    assert_close(again.unet(x, t, context), reference)
    assert len(_conversions(caplog)) == first
    fingerprint = weights_fingerprint(again.unet)
    with torch.no_grad():  # weights changed in place (as a LoRA merge does): another fingerprint, converted anew
        again.unet.out[2].bias.add_(0.5)
    assert weights_fingerprint(again.unet) != fingerprint
    changed = again.unet(x, t, context)
    assert len(_conversions(caplog)) == first + 1
    assert (changed - reference).abs().max() > 0.1
    again.set_backend("torch")
    assert_close(again.unet(x, t, context), changed)


@torch.no_grad()
def test_what_openvino_cannot_run_runs_in_torch(monkeypatch, caplog, builtin):
    pipe = load_pipeline(backend="openvino")
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), torch.randn(2, 77, 128)
    control = [torch.ones_like(r) for r in _residual_shapes(pipe, x, t, context)]
    eager = builtin.unet(x, t, context, control=control)
    assert_close(pipe.unet(x, t, context, control=control), eager)  # ControlNet residuals: torch
    with torch.enable_grad():
        assert pipe.unet(x, t, context).requires_grad  # training needs gradients: torch
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(ov_backend, "openvino_version", lambda: None)
    assert load_pipeline(backend="openvino").backend == "torch"
    assert any("openvino is not installed" in r.getMessage() for r in caplog.records)


def test_a_compiled_model_leaves_the_torch_weights_mapped_and_releases_their_pages(tmp_path, monkeypatch):
    from stable_diffusion.checkpoints import mapped

    load_pipeline("tiny-sd1").save(tmp_path / "tiny.safetensors")
    released = []  # each weight's pages go once the cache key has read it (and again after each compile)
    monkeypatch.setattr("stable_diffusion.pipeline.release", lambda t: released.append(t) or mapped.release(t))
    pipe = load_pipeline(tmp_path / "tiny.safetensors", backend="openvino")
    convs = [m.weight for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(mapped.is_mapped(w) for w in convs)  # no channels-last copies for a backend that compiles its own
    image = pipe.txt2img("a cat", steps=2, seed=3, width=64, height=64)[0]
    for module in (pipe.unet, pipe.vae):
        weights = [*module.parameters(), *module.buffers()]
        assert {id(t) for t in weights} <= {id(t) for t in released}
    fresh = load_pipeline(tmp_path / "tiny.safetensors")
    for module, again in ((pipe.unet, fresh.unet), (pipe.vae, fresh.vae)):  # released pages read back unchanged
        assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), again.state_dict().values(),
                                                         strict=True))
    reference = fresh.txt2img("a cat", steps=2, seed=3, width=64, height=64)[0]
    assert max(abs(a - b) for a, b in zip(image.tobytes(), reference.tobytes(), strict=True)) <= 1


def _residual_shapes(pipe, x, t, context) -> list[torch.Tensor]:
    """Zero tensors shaped as the UNet's skips and middle output (what a ControlNet adds to)."""
    shapes = []
    hooks = [block.register_forward_hook(lambda m, i, o: shapes.append(torch.zeros_like(o)))
             for block in [*pipe.unet.input_blocks, pipe.unet.middle_block]]
    with torch.no_grad():
        type(pipe.unet).forward(pipe.unet, x, t, context)
    for hook in hooks:
        hook.remove()
    return shapes


def test_a_failing_openvino_falls_back_once_with_a_notice(monkeypatch, caplog, tmp_path):
    pipe = load_pipeline("tiny-sd1", backend="openvino")
    caplog.set_level(logging.WARNING)

    def broken(*args, **kwargs):
        raise RuntimeError("conversion exploded\nsecond line")

    monkeypatch.setattr(ov_backend.OpenVINOComponent, "_convert", broken)
    monkeypatch.setenv("SD_CACHE_DIR", str(tmp_path))  # nothing cached: it must convert
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 32)
    with torch.no_grad():
        out = pipe.unet(x, t, context)
        again = pipe.unet(x, t, context)
    assert torch.equal(out, again)
    notices = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert notices == ["openvino backend: unet failed (conversion exploded); it runs in torch from now on"]


def test_offload_and_slicing_do_not_combine_with_openvino():
    with pytest.raises(ValueError, match="drop offload / attention slicing"):
        load_pipeline("tiny-sd1", backend="openvino", attention_slicing=64)
    with pytest.raises(ValueError, match="backend must be one of torch, openvino"):
        load_pipeline("tiny-sd1", backend="tensorrt")


def test_the_cache_key_releases_each_weight_as_soon_as_it_is_read():
    """The fingerprint reads every weight; releasing each right after it (not all after the compile) keeps a
    memory-mapped UNet's pages from all becoming resident at once (docs/speed.md, Memory)."""
    from stable_diffusion.backends.weights import weights_fingerprint

    unet = load_pipeline("tiny-sd1").unet
    order: list[str] = []
    names = {id(t): name for name, t in unet.state_dict(keep_vars=True).items()}
    fingerprint = weights_fingerprint(unet, lambda t: order.append(names[id(t)]))
    assert order == list(names.values()) and fingerprint == weights_fingerprint(unet)
