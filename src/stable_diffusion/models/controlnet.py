"""ControlNet (Zhang, Rao & Agrawala 2023): a trainable copy of the UNet's encoder and middle block that reads the
noisy latent plus a control image (edges, a scribble, a layout) and returns one residual per skip connection
and one for the middle block, each through a zero-initialised 1x1 convolution, for the frozen UNet to add.
Module names are those of the original cldm checkpoints (``input_hint_block``, ``zero_convs``,
``middle_block_out``), so ``control_v11p_sd15_canny`` and the like load with ``strict=True``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .configs import UNetConfig
from .unet import Encoder


@dataclass
class ControlNetConfig:
    """The UNet config of the copied encoder, and the hint encoder: the control image's channels and the widths
    of its convolution stages (each stage after the first halves the size: (16, 32, 96, 256) maps pixels to
    SD's 8x smaller latent)."""

    unet: UNetConfig
    hint_channels: int = 3
    hint_widths: tuple[int, ...] = field(default=(16, 32, 96, 256))

    def to_dict(self) -> dict:
        return {"unet": asdict(self.unet), "hint_channels": self.hint_channels, "hint_widths": list(self.hint_widths)}

    @classmethod
    def from_dict(cls, data: dict) -> ControlNetConfig:
        return cls(UNetConfig(**data["unet"]), data["hint_channels"], tuple(data["hint_widths"]))


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class HintBlock(nn.Sequential):
    """The control image -> the first block's width at the latent's size: 3x3 convolutions with SiLU, a stride-2
    one between widths, the last one zero-initialised (LDM's ``input_hint_block`` indices)."""

    def __init__(self, channels: int, widths: tuple[int, ...], out_channels: int) -> None:
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, padding=1), nn.SiLU()]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Conv2d(a, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, b, 3, padding=1, stride=2), nn.SiLU()]
        layers.append(_zero(nn.Conv2d(widths[-1], out_channels, 3, padding=1)))
        super().__init__(*layers)


class ControlNet(Encoder):
    """``controlnet(x, hint, timesteps, context, y)`` -> residuals for the UNet (``unet(..., control=...)``): one
    per input block, then the middle block's.

    x: the UNet's input latent (B, C, h, w); hint: the control image (B, hint_channels, H, W) in [0, 1], H = h
    times the hint encoder's downscale."""

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__(config.unet)
        self.control_config = config
        mc = config.unet.model_channels
        self.input_hint_block = HintBlock(config.hint_channels, tuple(config.hint_widths), mc)
        self.zero_convs = nn.ModuleList([nn.Sequential(_zero(nn.Conv2d(ch, ch, 1))) for ch in self.skip_channels])
        self.middle_block_out = nn.Sequential(_zero(nn.Conv2d(self.middle_channels, self.middle_channels, 1)))

    @property
    def dtype(self) -> torch.dtype:
        return self.input_hint_block[0].weight.dtype

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.control_config.hint_widths) - 1)

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor | None = None, y: torch.Tensor | None = None) -> list[torch.Tensor]:
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        x, hint = x.to(self.dtype), hint.to(self.dtype)
        emb = self.embed(timesteps, y, x.dtype)
        context = context.to(x.dtype) if context is not None else None
        guided = self.input_hint_block(hint)  # (B, model_channels, h, w)
        outs, h = [], x
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs, strict=True)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided
            outs.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h))
        return outs
