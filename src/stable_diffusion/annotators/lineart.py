"""The lineart preprocessors (``lineart_realistic``: ``sk_model.pth``, ``lineart_coarse``: ``sk_model2.pth``): the
line-drawing generator of "Learning to generate line drawings that convey geometry and semantics" (Chan, Durand &
Isola 2022) as ControlNet 1.1's annotator runs it: a ResNet-style image-to-image network (7x7 stem, two stride-2
convolutions, three residual blocks, two transposed convolutions, a 7x7 head and a sigmoid), instance norms without
parameters, reflection padding. Module names (``model0`` ... ``model4``) as in those files, so they load strictly."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _norm_relu(channels: int) -> list[nn.Module]:
    return [nn.InstanceNorm2d(channels), nn.ReLU(inplace=True)]


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), *_norm_relu(channels),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineartGenerator(nn.Module):
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) in [0, 1]: dark lines on white (H, W multiples of 4)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, residual_blocks: int = 3) -> None:
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(in_channels, 64, 7), *_norm_relu(64))
        self.model1 = nn.Sequential(nn.Conv2d(64, 128, 3, stride=2, padding=1), *_norm_relu(128),
                                    nn.Conv2d(128, 256, 3, stride=2, padding=1), *_norm_relu(256))
        self.model2 = nn.Sequential(*[ResidualBlock(256) for _ in range(residual_blocks)])
        self.model3 = nn.Sequential(
            nn.ConvTranspose2d(256, 128, 3, stride=2, padding=1, output_padding=1), *_norm_relu(128),
            nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=1), *_norm_relu(64))
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, out_channels, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


def lineart(net: LineartGenerator, pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8: white lines on black (the extension inverts the generator's drawing)."""
    x = torch.from_numpy(pixels).float().div(255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        drawing = net(x)[0, 0].numpy()
    return 255 - (drawing * 255.0).clip(0, 255).astype(np.uint8)
