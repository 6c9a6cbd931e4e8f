"""LoRA files in the kohya/A1111 and diffusers/PEFT formats, merged for a generation and then undone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from stable_diffusion import load_pipeline
from stable_diffusion.checkpoints.errors import CheckpointError
from stable_diffusion.lora import applied_loras, extract_lora_tags


def _kohya_file(path, pipe, names, rank=2, alpha=1.0, seed=0):
    """A kohya-format LoRA for the named (kohya-style) modules; returns {module: expected delta at strength 1}."""
    g = torch.Generator().manual_seed(seed)
    from stable_diffusion.lora import _targets

    targets = _targets(pipe)
    sd, expected = {}, {}
    for name in names:
        module = targets[name]
        out_f, in_f = module.weight.shape[:2]
        if module.weight.dim() == 4:
            k = module.weight.shape[2]
            down, up = torch.randn(rank, in_f, k, k, generator=g), torch.randn(out_f, rank, 1, 1, generator=g)
            delta = (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)
        else:
            down, up = torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g)
            delta = up @ down
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        sd[f"{name}.alpha"] = torch.tensor(alpha)
        expected[module] = delta * alpha / rank
    save_file(sd, path)
    return expected


def test_kohya_lora_merges_and_is_undone(tmp_path):
    pipe = load_pipeline("tiny-sd1")
    names = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",  # diffusers-style UNet name
             "lora_unet_input_blocks_1_0_in_layers_2",  # LDM-style, a 3x3 conv (LoCon)
             "lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    expected = _kohya_file(tmp_path / "style.safetensors", pipe, names)
    before = {m: m.weight.detach().clone() for m in expected}
    with applied_loras(pipe, [(tmp_path / "style.safetensors", 0.5)]):
        for module, delta in expected.items():
            assert torch.allclose(module.weight, before[module] + 0.5 * delta, atol=1e-5)
    for module in expected:
        assert torch.equal(module.weight, before[module])


def test_peft_format_and_sdxl_second_encoder(tmp_path):
    pipe = load_pipeline("tiny-sdxl")
    g = torch.Generator().manual_seed(1)
    q = pipe.text_encoders[1].text_model.encoder.layers[0].self_attn.q_proj
    sd = {"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 32, generator=g),
          "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 2, generator=g)}
    save_file(sd, tmp_path / "peft.safetensors")
    before = q.weight.detach().clone()
    with applied_loras(pipe, [(tmp_path / "peft.safetensors", 1.0)]):
        expected = before + sd[next(k for k in sd if "lora_B" in k)] @ sd[next(k for k in sd if "lora_A" in k)]
        assert torch.allclose(q.weight, expected, atol=1e-5)
    assert torch.equal(q.weight, before)


def test_prompt_tags_change_the_image_and_are_removed_from_the_text(tmp_path):
    pipe = load_pipeline("tiny-sd1")
    _kohya_file(tmp_path / "style.safetensors", pipe,
                ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"], alpha=2.0)
    text, found = extract_lora_tags("a cat <lora:style:0.8>, sitting", tmp_path)
    assert text == "a cat , sitting" and found == [(tmp_path / "style.safetensors", 0.8)]
    plain = np.asarray(pipe.txt2img("a cat", steps=2, seed=0)[0])
    tagged = np.asarray(pipe.txt2img("a cat<lora:style:1.5>", steps=2, seed=0, lora_dir=str(tmp_path))[0])
    again = np.asarray(pipe.txt2img("a cat", steps=2, seed=0)[0])
    assert not np.array_equal(plain, tagged) and np.array_equal(plain, again)


def test_bad_loras_give_clear_errors(tmp_path):
    pipe = load_pipeline("tiny-sd1")
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_nothing_here.lora_up.weight": torch.zeros(4, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="match nothing"):
        pipe.txt2img("x", steps=1, loras=[(str(tmp_path / "other.safetensors"), 1.0)])
    with pytest.raises(CheckpointError, match="not found"):
        pipe.txt2img("x <lora:missing:1>", steps=1, lora_dir=str(tmp_path))
    with pytest.raises(CheckpointError, match="not found"):
        pipe.txt2img("x <lora:../secret:1>", steps=1, lora_dir=str(tmp_path))
