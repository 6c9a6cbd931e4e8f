"""Reading an upscaler model file weights-only (.pth / .pt / .ckpt through ``torch.load(weights_only=True)``, or
.safetensors) and building the net its keys describe: RRDBNet (ESRGAN, Real-ESRGAN x4plus / x2plus, 4x-UltraSharp
and the like) or SRVGGNetCompact (Real-ESRGAN's compact models)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .compact import compact_from_state_dict
from .rrdbnet import rrdbnet_from_state_dict

MODEL_SUFFIXES = {".pth", ".pt", ".ckpt", ".safetensors"}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and safetensors errors have no common base
        raise ValueError(f"{path.name}: not a readable upscaler model ({type(error).__name__}: {error})") from None
    for wrapper in ("params_ema", "params", "state_dict"):  # BasicSR and Lightning wrappers
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path.name}: not an upscaler state dict")
    return state


def net_from_state_dict(state: dict[str, torch.Tensor]) -> nn.Module:
    """The upscaler net whose architecture the keys name, weights loaded, in eval mode; a ValueError otherwise."""
    if "body.0.weight" in state and not any(".rdb1." in k for k in state):
        net = compact_from_state_dict(state)
    elif "conv_first.weight" in state or "model.0.weight" in state:
        net = rrdbnet_from_state_dict(state)
    else:
        raise ValueError("not an ESRGAN (RRDBNet) or Real-ESRGAN compact model")
    return net.eval().requires_grad_(False)


def load_upscaler_net(path: str | Path) -> nn.Module:
    try:
        return net_from_state_dict(read_state_dict(path))
    except (ValueError, RuntimeError) as error:  # RuntimeError: shapes that do not fit the architecture
        raise ValueError(f"{Path(path).name}: {error}".splitlines()[0]) from None
