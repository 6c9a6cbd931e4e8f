"""Infotext as AUTOMATIC1111 writes and reads it: its sampler and schedule labels, "Model hash" (10 hex digits of
the file's sha256), "Lora hashes" (12 of the addnet hash), Clip skip, Denoising strength, Mask blur, Eta; A1111's
own strings read back by `sd pnginfo` and /png-info."""

from __future__ import annotations

import hashlib
import struct

import torch
from PIL import Image
from safetensors.torch import save_file

from stable_diffusion import GenerationRequest, generate
from stable_diffusion.cli import main
from stable_diffusion.images import read_infotext
from stable_diffusion.infotext import parse_infotext
from stable_diffusion.models.configs import preset
from stable_diffusion.pipeline import Pipeline, load_pipeline

A1111_TEXT = ("a cat, (masterpiece:1.2)\nNegative prompt: ugly, blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: "
              "Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
              "Denoising strength: 0.5, Clip skip: 2, Lora hashes: \"add_detail: 7c6bad76eb54, film: 0123456789ab\", "
              "Version: v1.10.1")


def test_a1111_strings_read_back():
    p = parse_infotext(A1111_TEXT)
    assert p["Prompt"] == "a cat, (masterpiece:1.2)" and p["Negative prompt"] == "ugly, blurry"
    assert (p["Sampler"], p["Schedule type"], p["Size-1"], p["Size-2"]) == ("DPM++ 2M", "Karras", "512", "768")
    assert p["Model hash"] == "6ce0161689" and p["Clip skip"] == "2" and p["Denoising strength"] == "0.5"
    assert p["Lora hashes"] == "add_detail: 7c6bad76eb54, film: 0123456789ab" and p["Version"] == "v1.10.1"


def test_model_and_lora_hashes_and_labels(tmp_path):
    model = tmp_path / "mine.safetensors"
    Pipeline.from_config(preset("tiny-sd1")).save(model)
    lora = tmp_path / "Lora" / "style.safetensors"
    lora.parent.mkdir()
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{key}.lora_down.weight": torch.zeros(2, 32), f"{key}.lora_up.weight": torch.zeros(32, 2)}, lora)
    data = lora.read_bytes()
    addnet = hashlib.sha256(data[8 + struct.unpack("<Q", data[:8])[0]:]).hexdigest()[:12]
    pipe = load_pipeline(model)
    result = generate(pipe, GenerationRequest(prompt="a cat <lora:style:0.5>", steps=2, seed=1, clip_skip=2,
                                              scheduler="SGM Uniform", sampler="DPM++ 2M", eta=0.5,
                                              lora_dir=str(lora.parent)))
    text = result.infotexts[0]
    params = parse_infotext(text)
    assert params["Model hash"] == hashlib.sha256(model.read_bytes()).hexdigest()[:10]
    assert params["Lora hashes"] == f"style: {addnet}" and params["Schedule type"] == "SGM Uniform"
    assert params["Clip skip"] == "2" and params["Eta"] == "0.5"
    keys = list(params)
    assert keys.index("Schedule type") < keys.index("Model hash") < keys.index("Model") < keys.index("Version")


def test_cli_pnginfo_reads_an_a1111_png(tmp_path, capsys):
    from stable_diffusion.images import save_png

    save_png(Image.new("RGB", (8, 8)), tmp_path / "a1111.png", A1111_TEXT)
    assert main(["pnginfo", str(tmp_path / "a1111.png")]) == 0
    assert capsys.readouterr().out.strip() == A1111_TEXT
    assert parse_infotext(read_infotext(tmp_path / "a1111.png"))["Model hash"] == "6ce0161689"
