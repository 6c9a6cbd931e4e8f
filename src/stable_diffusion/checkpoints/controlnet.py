"""ControlNet files: the original cldm layout (``control_model.*`` or unprefixed, as ``control_v11p_sd15_canny.pth``
and its ``.safetensors`` copies), read weights-only with the config detected from key names and shapes; and
diffusers' ControlNetModel (a folder with config.json, or its weights file beside one), renamed to cldm's names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..models.controlnet import ControlNetConfig
from . import diffusers_format as fmt
from .detect import detect_unet
from .errors import CheckpointError
from .io import read_state_dict
from .keymap import invert, rename, unet_module_map

PREFIX = "control_model."
CONFIG_KEY = "stable_diffusion.controlnet"  # our files' safetensors metadata: the exact config
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# the built-in model's ControlNet (configs/builtin_controlnet.toml): shapes placed where a layout draws them
BUILTIN_CONTROLNET = Path(__file__).resolve().parents[1] / "assets" / "controlnet_layout.safetensors"


def controlnet_path(name: str | Path) -> Path:
    """A ControlNet's path; "builtin" or "controlnet_layout" (when no such file is here) is the built-in one."""
    if str(name) in ("builtin", BUILTIN_CONTROLNET.stem) and not Path(name).exists():
        return BUILTIN_CONTROLNET
    return Path(name)


def _hint_widths(sd: dict[str, torch.Tensor]) -> tuple[int, tuple[int, ...]]:
    """(control image channels, stage widths) from ``input_hint_block.N.weight``: conv_in at 0, then per stage a
    3x3 at 2 + 4j and a stride-2 one at 4 + 4j, conv_out last."""
    indices = sorted(int(m.group(1)) for k in sd if (m := re.match(r"input_hint_block\.(\d+)\.weight$", k)))
    if not indices:
        raise CheckpointError("no ControlNet hint encoder (input_hint_block.*): not a ControlNet")
    first = sd["input_hint_block.0.weight"]
    widths = [first.shape[0]] + [sd[f"input_hint_block.{i}.weight"].shape[0] for i in indices[1:-1] if i % 4 == 0]
    return first.shape[1], tuple(widths)


def _diffusers_map(config: ControlNetConfig) -> dict[str, str]:
    """cldm module prefixes -> diffusers ControlNetModel prefixes."""
    m = {k: v for k, v in unet_module_map(config.unet).items()
         if k.startswith(("time_embed", "label_emb", "input_blocks", "middle_block"))}
    m["input_hint_block.0"] = "controlnet_cond_embedding.conv_in"
    stages = len(config.hint_widths) - 1
    for j in range(stages):
        m[f"input_hint_block.{2 + 4 * j}"] = f"controlnet_cond_embedding.blocks.{2 * j}"
        m[f"input_hint_block.{4 + 4 * j}"] = f"controlnet_cond_embedding.blocks.{2 * j + 1}"
    m[f"input_hint_block.{2 + 4 * stages}"] = "controlnet_cond_embedding.conv_out"
    blocks = 1 + len(config.unet.channel_mult) * config.unet.num_res_blocks + len(config.unet.channel_mult) - 1
    for n in range(blocks):
        m[f"zero_convs.{n}.0"] = f"controlnet_down_blocks.{n}"
    m["middle_block_out.0"] = "controlnet_mid_block"
    return m


def _from_diffusers(folder: Path, weights: Path) -> tuple[ControlNetConfig, dict[str, torch.Tensor]]:
    d = json.loads((folder / "config.json").read_text())
    unet, _, _ = fmt.unet_from_diffusers({**d, "out_channels": d.get("in_channels", 4)})
    config = ControlNetConfig(unet, d.get("conditioning_channels", 3),
                              tuple(d.get("conditioning_embedding_out_channels", (16, 32, 96, 256))))
    return config, rename(read_state_dict(weights)[0], invert(_diffusers_map(config)))


def read_controlnet(path: str | Path) -> tuple[ControlNetConfig, dict[str, torch.Tensor]]:
    """(config, weights in cldm's names) of a ControlNet file or diffusers folder (or "builtin")."""
    path = controlnet_path(path)
    if path.is_dir():
        weights = next((path / n for n in DIFFUSERS_WEIGHTS if (path / n).exists()), None)
        if weights is None or not (path / "config.json").exists():
            raise CheckpointError(f"{path.name}: not a diffusers ControlNet folder (config.json + "
                                  f"{DIFFUSERS_WEIGHTS[0]})")
        return _from_diffusers(path, weights)
    sd, metadata = read_state_dict(path)
    if metadata and CONFIG_KEY in metadata:  # trained here: the config is stored, heads included
        return ControlNetConfig.from_dict(json.loads(metadata[CONFIG_KEY])), sd
    if any(k.startswith("controlnet_cond_embedding.") for k in sd):  # diffusers' names: its config sits beside
        if not (path.parent / "config.json").exists():
            raise CheckpointError(f"{path.name}: diffusers ControlNet weights without their config.json beside them")
        return _from_diffusers(path.parent, path)
    if any(k.startswith(PREFIX) for k in sd):  # a whole cldm checkpoint: its control model alone
        sd = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
    channels, widths = _hint_widths(sd)
    unet = detect_unet(sd, prefix="")
    return ControlNetConfig(unet, channels, widths), sd
