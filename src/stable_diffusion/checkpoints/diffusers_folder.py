"""Diffusers pipeline folders (model_index.json, unet/, vae/, text_encoder[_2]/, tokenizer[_2]/, scheduler/).

Weights are renamed through the key maps generated in ``keymap.py``; configs through ``diffusers_format.py``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from ..models.configs import ModelConfig
from ..models.tokenizer import CLIPTokenizer
from . import diffusers_format as fmt
from .errors import CheckpointError
from .io import read_state_dict, write_json, write_safetensors
from .keymap import invert, rename, unet_module_map, vae_from_diffusers, vae_to_diffusers

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "model.fp16.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin")
CONFIG_KEY = "_stable_diffusion_config"


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (expected in a diffusers folder)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_NAMES:
        if (folder / name).exists():
            return read_state_dict(folder / name)[0]
    for index in sorted(folder.glob("*.index.json")):  # sharded weights
        shards = sorted(set(_json(index)["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(read_state_dict(folder / shard)[0])
        return out
    raise CheckpointError(f"{folder}: no weights file (expected one of {', '.join(WEIGHT_NAMES[:2])})")


def _text_weights(folder: Path) -> dict[str, torch.Tensor]:
    sd = _weights(folder)
    # transformers >= 5.6 saves CLIPTextModel without the "text_model." level; older folders have it
    return {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v for k, v in sd.items()}


def read_folder(folder: str | Path) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]], list[CLIPTokenizer]]:
    """(config, component weights in our names, tokenizers) of a diffusers pipeline folder."""
    folder = Path(folder)
    index = _json(folder / "model_index.json")
    te_dirs = [d for d in ("text_encoder", "text_encoder_2") if index.get(d) and index[d][0] is not None]
    if not te_dirs:
        raise CheckpointError(f"{folder}: model_index.json names no text encoder")
    unet, size_embed, adm_name = fmt.unet_from_diffusers(_json(folder / "unet" / "config.json"))
    vae = fmt.vae_from_diffusers(_json(folder / "vae" / "config.json"))
    te_json = [_json(folder / d / "config.json") for d in te_dirs]
    if te_dirs == ["text_encoder_2"]:  # SDXL's refiner: OpenCLIP-G alone
        family = "sdxl-refiner"
    else:
        family = "sdxl" if len(te_dirs) == 2 else ("sd2" if te_json[0].get("hidden_act") == "gelu" else "sd1")
    xl = family.startswith("sdxl")
    texts = []
    for d, j in zip(te_dirs, te_json, strict=True):
        openclip = family == "sd2" or d == "text_encoder_2"
        texts.append(fmt.text_encoder_from_transformers(
            j, output_layer=-2 if xl else -1, final_norm=not xl,
            pad_token_id=0 if openclip else 49407, layout="openclip" if openclip else "openai"))
    scheduler = _json(folder / "scheduler" / "scheduler_config.json") if (folder / "scheduler").exists() else {}
    down = 2 ** (len(vae.ch_mult) - 1)
    config = ModelConfig(
        family=family, unet=unet, vae=vae, text_encoders=texts, size_embed_dim=size_embed,
        prediction="v" if scheduler.get("prediction_type") == "v_prediction" else "eps",
        image_size=_json(folder / "unet" / "config.json").get("sample_size", 64) * down,
        timesteps=scheduler.get("num_train_timesteps", 1000), beta_schedule=scheduler.get("beta_schedule", "scaled_linear"),
        beta_start=scheduler.get("beta_start", 0.00085), beta_end=scheduler.get("beta_end", 0.012),
        name=folder.name,
    )
    if CONFIG_KEY in index:  # our own export: the exact config, including what diffusers cannot express
        config = ModelConfig.from_dict(index[CONFIG_KEY])
        texts = []
        for tc, j in zip(config.text_encoders, te_json, strict=True):
            dropped = tc.layers - j["num_hidden_layers"]  # see _diffusers_text_layers
            texts.append(dataclasses.replace(tc, layers=tc.layers - dropped, output_layer=tc.output_layer + dropped))
        config = config.replace(text_encoders=texts)
    parts = {
        "unet": rename(_weights(folder / "unet"), invert(unet_module_map(config.unet, adm_name))),
        "vae": vae_from_diffusers(_weights(folder / "vae"), config.vae),
    }
    tokenizers = []
    for i, d in enumerate(te_dirs):
        parts[f"text_encoder_{i}"] = _text_weights(folder / d)
        tok_dir = folder / d.replace("text_encoder", "tokenizer")
        pad = config.text_encoders[i].pad_token_id
        tokenizers.append(CLIPTokenizer.from_folder(tok_dir, pad) if tok_dir.exists() else CLIPTokenizer.builtin(pad))
    return config, parts, tokenizers


def _diffusers_text_layers(tc: Any) -> int:
    """An SD2-style encoder (penultimate layer, final norm, no projection) is exported without its last layer,
    as diffusers' SD2 folders are; every other encoder keeps all layers."""
    if tc.output_layer < -1 and tc.final_norm and not tc.projection_dim:
        return tc.layers + 1 + tc.output_layer
    return tc.layers


def write_folder(folder: str | Path, config: ModelConfig, parts: dict[str, dict[str, torch.Tensor]],
                 tokenizers: list[CLIPTokenizer]) -> None:
    """Write a diffusers folder that ``DiffusionPipeline.from_pretrained`` and our loader both read."""
    folder = Path(folder)
    down = 2 ** (len(config.vae.ch_mult) - 1)
    sdxl = len(config.text_encoders) == 2 or config.is_refiner
    cls = "StableDiffusionXL" if sdxl else "StableDiffusion"
    kind = "Inpaint" if config.is_inpainting else "Img2Img" if config.is_refiner else ""
    index: dict[str, Any] = {
        "_class_name": f"{cls}{kind}Pipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "feature_extractor": [None, None],
        CONFIG_KEY: dataclasses.asdict(config),
    }
    if config.is_refiner:  # OpenCLIP-G only, as text_encoder_2; y carries the aesthetic score
        index.update(text_encoder=[None, None], tokenizer=[None, None], image_encoder=[None, None],
                     requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    elif sdxl:
        index.update(image_encoder=[None, None], force_zeros_for_empty_prompt=True)
    else:
        index.update(safety_checker=[None, None], requires_safety_checker=False)
    write_json(folder / "unet" / "config.json", fmt.unet_to_diffusers(config.unet, config.image_size // down,
                                                                      config.size_embed_dim))
    write_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors",
                      rename(parts["unet"], unet_module_map(config.unet)))
    write_json(folder / "vae" / "config.json", fmt.vae_to_diffusers(config.vae, config.image_size))
    write_safetensors(folder / "vae" / "diffusion_pytorch_model.safetensors", vae_to_diffusers(parts["vae"], config.vae))
    for i, tc in enumerate(config.text_encoders):
        suffix = "" if i == 0 and not config.is_refiner else f"_{i + 1 + config.is_refiner}"
        layers = _diffusers_text_layers(tc)
        cfg = fmt.text_encoder_to_transformers(tc, layers)
        index[f"text_encoder{suffix}"] = ["transformers", cfg["architectures"][0]]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
        weights = {k: v for k, v in parts[f"text_encoder_{i}"].items()
                   if not any(k.startswith(f"text_model.encoder.layers.{n}.") for n in range(layers, tc.layers))}
        write_json(folder / f"text_encoder{suffix}" / "config.json", cfg)
        write_safetensors(folder / f"text_encoder{suffix}" / "model.safetensors", weights)
        tokenizers[i].save(folder / f"tokenizer{suffix}")
    write_json(folder / "scheduler" / "scheduler_config.json", {
        "_class_name": "EulerDiscreteScheduler", "num_train_timesteps": config.timesteps,
        "beta_schedule": config.beta_schedule, "beta_start": config.beta_start, "beta_end": config.beta_end,
        "prediction_type": "v_prediction" if config.prediction == "v" else "epsilon",
        "timestep_spacing": "leading", "steps_offset": 1,
    })
    write_json(folder / "model_index.json", index)
