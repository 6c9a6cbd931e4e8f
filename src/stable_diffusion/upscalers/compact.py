"""Real-ESRGAN's compact net SRVGGNetCompact (Wang et al. 2021; realesr-general-x4v3, realesr-animevideov3): a plain
stack of 3x3 convs with PReLU at the input's size, a pixel shuffle to the output size, and the nearest-upsampled
input added as a residual. Module names are Real-ESRGAN's (body.N); size and scale are read from the weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SRVGGNetCompact(nn.Module):
    """(B, C, H, W) in [0, 1] -> (B, C, H * scale, W * scale)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, features: int = 64, convs: int = 16,
                 scale: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, features, 3, 1, 1), nn.PReLU(features)]
        for _ in range(convs):
            layers += [nn.Conv2d(features, features, 3, 1, 1), nn.PReLU(features)]
        layers.append(nn.Conv2d(features, out_channels * scale * scale, 3, 1, 1))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(scale)
        self.scale = scale
        self.multiple = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        return self.upsampler(out) + F.interpolate(x, scale_factor=self.scale, mode="nearest")


def compact_from_state_dict(state: dict[str, torch.Tensor]) -> SRVGGNetCompact:
    indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("body.")})
    if not indices or "body.1.weight" not in state:
        raise ValueError("not a Real-ESRGAN compact (SRVGGNetCompact with PReLU) file")
    last = indices[-1]
    features, in_channels = state["body.0.weight"].shape[:2]
    shuffled = state[f"body.{last}.weight"].shape[0]
    scale = math.isqrt(shuffled // in_channels)
    if scale * scale * in_channels != shuffled:
        raise ValueError(f"compact net with {shuffled} output channels for {in_channels} input channels")
    net = SRVGGNetCompact(in_channels, in_channels, features, (last - 2) // 2, scale)
    net.load_state_dict(state, strict=True)
    return net
