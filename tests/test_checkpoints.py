"""Detection from keys and shapes, safe and strict loading, clear errors, save/convert round trips."""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from stable_diffusion import load_pipeline
from stable_diffusion.checkpoints.detect import detect_config
from stable_diffusion.checkpoints.errors import CheckpointError
from stable_diffusion.checkpoints.single_file import join_components
from stable_diffusion.models.configs import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig, preset
from stable_diffusion.pipeline import Pipeline

# Leftovers official files carry beside the weights: LDM buffers, EMA copies, HF position ids, OpenCLIP extras.
LEFTOVERS = {
    "betas": (1000,), "alphas_cumprod": (1000,), "model_ema.decay": (), "model_ema.num_updates": (),
    "model_ema.diffusion_modelinput_blocks00weight": (320, 4, 3, 3),
}


def fake_state_dict(name: str, leftovers: bool = True) -> dict[str, torch.Tensor]:
    """A full-size state dict of torch.empty tensors on the meta device (no memory)."""
    with torch.device("meta"):
        pipe = Pipeline.from_config(preset(name))
        sd = join_components(pipe.component_state_dicts(), pipe.config)
        if leftovers:
            sd.update({k: torch.empty(s) for k, s in LEFTOVERS.items()})
            if pipe.family == "sd1":
                sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.empty(1, 77)
            if pipe.family == "sd2":
                sd["cond_stage_model.model.text_projection"] = torch.empty(1024, 1024)
                sd["cond_stage_model.model.logit_scale"] = torch.empty(())
    return sd


@pytest.mark.parametrize("name", ["sd1", "sd1-inpaint", "sd2", "sd2-inpaint", "sdxl", "sdxl-inpaint",
                                  "sdxl-refiner"])
def test_detects_family_and_config_of_fake_full_size_state_dicts(name):
    detected = detect_config(fake_state_dict(name))
    expected = preset(name)
    assert detected.family == expected.family
    assert detected.unet == expected.unet
    assert detected.vae == expected.vae
    assert detected.text_encoders == expected.text_encoders
    assert detected.size_embed_dim == expected.size_embed_dim
    assert detected.is_inpainting == name.endswith("inpaint")


def test_sd2_v_checkpoint_looks_like_sd2_and_needs_a_hint():
    assert detect_config(fake_state_dict("sd2-v")).unet == preset("sd2-v").unet


def test_non_sd_state_dict_is_refused():
    with pytest.raises(CheckpointError, match="not a Stable Diffusion"):
        detect_config({"foo.weight": torch.empty(3)})


def _detectable_tiny() -> ModelConfig:
    """A tiny SD2-shaped model whose heads follow the rules detection assumes (64-channel heads)."""
    unet = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                      num_heads=-1, num_head_channels=64, transformer_depth=(1, 1), context_dim=64,
                      use_linear_in_transformer=True)
    text = TextEncoderConfig(width=64, layers=3, heads=1, intermediate=96, activation="gelu", output_layer=-2,
                             layout="openclip", pad_token_id=0)
    return ModelConfig(family="sd2", unet=unet, vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
                       text_encoders=[text], image_size=64)


@torch.no_grad()
def test_file_without_our_metadata_loads_by_detection(tmp_path):
    pipe = Pipeline.from_config(_detectable_tiny(), seed=1)
    sd = join_components(pipe.component_state_dicts(), pipe.config)
    sd.update({k: torch.zeros(s) for k, s in LEFTOVERS.items() if k != "model_ema.diffusion_modelinput_blocks00weight"})
    sd["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    save_file(sd, tmp_path / "plain.safetensors")  # no metadata: config must come from keys and shapes
    loaded = load_pipeline(tmp_path / "plain.safetensors")
    assert loaded.config.unet == pipe.config.unet
    ids = pipe.tokenizer(["a cat"])
    assert torch.equal(loaded.text_encoder(ids)[0], pipe.text_encoder(ids)[0])
    ours, theirs = pipe.unet.state_dict(), loaded.unet.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # the weights come back bit for bit
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 77, 64)
    # Same weights; the two forward passes may still differ in the last float bit (thread-split reductions).
    torch.testing.assert_close(loaded.unet(x, t, ctx), pipe.unet(x, t, ctx), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_files_round_trip(tmp_path, dtype):
    pipe = Pipeline.from_config(preset("tiny-sd1"))
    pipe.save(tmp_path / "half.safetensors", dtype=dtype)
    raw = load_file(tmp_path / "half.safetensors")
    assert {v.dtype for v in raw.values()} == {torch.float16 if dtype == "fp16" else torch.bfloat16}
    loaded = load_pipeline(tmp_path / "half.safetensors")
    assert loaded.dtype == torch.float32
    w0 = pipe.unet.input_blocks[0][0].weight
    w1 = loaded.unet.input_blocks[0][0].weight
    assert torch.allclose(w0, w1, atol=1e-2) and not torch.equal(w0, w1)


def test_ckpt_with_lightning_leftovers_loads_weights_only(tmp_path):
    pipe = Pipeline.from_config(_detectable_tiny(), seed=4)
    sd = join_components(pipe.component_state_dicts(), pipe.config)
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:  # stands in for Lightning's callback, pickled by reference
        def __init__(self):
            self.best = 1.0

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", module.__name__]
    for name in names[:-1]:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[module.__name__] = module
    path = tmp_path / "m.ckpt"
    try:
        torch.save({"state_dict": sd, "global_step": 12, "callbacks": {"cb": ModelCheckpoint()}}, path)
    finally:
        for name in names:
            del sys.modules[name]
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    loaded = load_pipeline(path)
    assert loaded.config.prediction == "v"
    assert torch.equal(loaded.unet.out[2].weight, pipe.unet.out[2].weight)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": _Evil(str(marker))}}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_pipeline(path)
    assert not marker.exists()


def test_corrupt_and_unknown_files_give_one_clear_error(tmp_path):
    pipe = Pipeline.from_config(preset("tiny-sd1"))
    good = tmp_path / "good.safetensors"
    pipe.save(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(1000))
    cases = {truncated: "corrupt", garbage: "safetensors", tmp_path / "missing.safetensors": "no such",
             tmp_path / "model.onnx": "unknown checkpoint type"}
    (tmp_path / "model.onnx").write_bytes(b"x")
    for path, words in cases.items():
        with pytest.raises(CheckpointError, match=words) as info:
            load_pipeline(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_shape_mismatch_names_the_key(tmp_path):
    pipe = Pipeline.from_config(preset("tiny-sd1"))
    path = tmp_path / "m.safetensors"
    pipe.save(path)
    sd = load_file(path)
    sd["model.diffusion_model.out.2.bias"] = torch.zeros(5)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file(sd, path, metadata=metadata)
    with pytest.raises(CheckpointError, match=r"out\.2\.bias has shape \(5,\)"):
        load_pipeline(path)


def test_prediction_hints(tmp_path):
    pipe = Pipeline.from_config(preset("tiny-sd2"))
    path = tmp_path / "m.safetensors"
    pipe.save(path)
    assert load_pipeline(path).config.prediction == "eps"
    assert load_pipeline(path, prediction="v").config.prediction == "v"
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert load_pipeline(path).config.prediction == "v"


@torch.no_grad()
def test_separate_vae_file_replaces_the_vae(tmp_path):
    pipe = Pipeline.from_config(preset("tiny-sd1"), seed=0)
    other = Pipeline.from_config(preset("tiny-sd1"), seed=9)
    pipe.save(tmp_path / "m.safetensors")
    vae_sd = other.component_state_dicts()["vae"]
    save_file({"first_stage_model." + k: v for k, v in vae_sd.items()}, tmp_path / "vae.safetensors")
    save_file(vae_sd, tmp_path / "bare_vae.safetensors")
    z = torch.randn(1, 4, 8, 8)
    for vae in ("vae.safetensors", "bare_vae.safetensors"):
        loaded = load_pipeline(tmp_path / "m.safetensors", vae=tmp_path / vae)
        assert torch.equal(loaded.vae.decode(z), other.vae.decode(z))


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2", "tiny-sdxl", "tiny-sdxl-inpaint"])
def test_single_file_and_diffusers_round_trips_keep_every_weight(tmp_path, name):
    pipe = Pipeline.from_config(preset(name), seed=2)
    pipe.save(tmp_path / "m.safetensors")
    pipe.save(tmp_path / "folder", format="diffusers")
    for path in (tmp_path / "m.safetensors", tmp_path / "folder"):
        loaded = load_pipeline(path)
        assert loaded.family == pipe.family
        for module_name, sd in pipe.component_state_dicts().items():
            theirs = loaded.component_state_dicts()[module_name]
            if path.is_dir() and module_name.startswith("text") and pipe.family == "sd2":
                sd = {k: v for k, v in sd.items() if ".layers.2." not in k}  # SD2's unused last layer is dropped
            assert sd.keys() == theirs.keys()
            assert all(torch.equal(sd[k], theirs[k]) for k in sd), module_name


def test_config_json_rejects_unknown_keys():
    data = dataclasses.asdict(preset("tiny-sd1"))
    data["unet"]["bogus"] = 1
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict(data)


def test_random_presets_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = Pipeline.from_config(preset("tiny-sd1"), seed=4)
    assert torch.equal(torch.rand(3), expected)
    b = Pipeline.from_config(preset("tiny-sd1"), seed=4)
    assert torch.equal(a.unet.out[2].weight, b.unet.out[2].weight)


def test_sd2_head_width_prediction_size_and_the_sd2_inpaint_preset(tmp_path):
    from stable_diffusion.checkpoints.io import read_state_dict, write_safetensors

    Pipeline.from_config(preset("tiny-sd2")).save(tmp_path / "full.safetensors")
    sd, _ = read_state_dict(tmp_path / "full.safetensors")
    write_safetensors(tmp_path / "bare.safetensors", sd)  # no config metadata: detected from keys alone
    with pytest.raises(CheckpointError, match="16|num_head_channels.*model.yaml|model.yaml"):
        load_pipeline(tmp_path / "bare.safetensors")  # 32-wide attention: not 64-channel heads
    (tmp_path / "bare.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n    unet_config:\n"
                                        "      params:\n        num_head_channels: 16\n")
    bare = load_pipeline(tmp_path / "bare.safetensors")
    assert bare.config.unet.num_head_channels == 16 and bare.config.prediction == "v"
    assert bare.config.image_size == 512  # --prediction v on a model that is not SD 2.x at full size keeps its size
    assert load_pipeline(tmp_path / "full.safetensors", prediction="v").config.image_size == 64
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    full = load_pipeline(tmp_path / "full.safetensors")
    assert torch.equal(bare.unet(x, torch.tensor([10]), context), full.unet(x, torch.tensor([10]), context))
    inpaint = load_pipeline("tiny-sd2-inpaint")
    assert inpaint.config.family == "sd2" and inpaint.config.is_inpainting
