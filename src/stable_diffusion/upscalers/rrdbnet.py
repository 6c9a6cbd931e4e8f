"""ESRGAN's generator (Wang et al. 2018, "ESRGAN: Enhanced Super-Resolution Generative Adversarial Networks"):
residual-in-residual dense blocks (RRDB) at the input's size, then nearest 2x upsampling + conv stages. Real-ESRGAN
(Wang et al. 2021) keeps the net and makes its 2x and 1x models by pixel-unshuffling the input first. Module names
are BasicSR's (conv_first, body.N.rdbK.convJ, conv_body, conv_upK, conv_hr, conv_last); files in the original
ESRGAN layout (model.0, model.1.sub.N.RDBK.convJ.0, ...; 4x-UltraSharp and most community models) are renamed on
load. Hyper-parameters and the scale are read from the weights."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn


class DenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block input and every earlier conv's output; residual scaled by 0.2."""

    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        for i in range(5):
            out = features if i == 4 else growth
            setattr(self, f"conv{i + 1}", nn.Conv2d(features + i * growth, out, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen = [x]
        for i in range(4):
            seen.append(F.leaky_relu(getattr(self, f"conv{i + 1}")(torch.cat(seen, 1)), 0.2))
        return self.conv5(torch.cat(seen, 1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (DenseBlock(features, growth) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """(B, C, H, W) in [0, 1] -> (B, C, H * scale, W * scale); scale = 2 ** upsamples / unshuffle."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, features: int = 64, blocks: int = 23,
                 growth: int = 32, upsamples: int = 2, unshuffle: int = 1) -> None:
        super().__init__()
        self.unshuffle = unshuffle
        self.conv_first = nn.Conv2d(in_channels * unshuffle**2, features, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(features, growth) for _ in range(blocks)))
        self.conv_body = nn.Conv2d(features, features, 3, 1, 1)
        for i in range(upsamples):
            setattr(self, f"conv_up{i + 1}", nn.Conv2d(features, features, 3, 1, 1))
        self.upsamples = upsamples
        self.conv_hr = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_last = nn.Conv2d(features, out_channels, 3, 1, 1)

    @property
    def scale(self) -> float:
        return 2**self.upsamples / self.unshuffle

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of this (the pixel-unshuffle factor)."""
        return self.unshuffle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)  # (B, C * u * u, H / u, W / u)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(self.upsamples):
            up = getattr(self, f"conv_up{i + 1}")
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


def _from_esrgan_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-ESRGAN key names -> BasicSR's: model.0 first conv, model.1.sub.N the blocks and (last N) the body
    conv, then one conv per 2x upsampling and the two output convs (every third / second index in between are
    the parameter-free upsample and activation layers)."""
    out, tail = {}, {}
    for key, value in state.items():
        block = re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key)
        body = re.fullmatch(r"model\.1\.sub\.(\d+)\.(weight|bias)", key)
        other = re.fullmatch(r"model\.(\d+)\.(weight|bias)", key)
        if block:
            n, k, j, kind = block.groups()
            out[f"body.{n}.rdb{k}.conv{j}.{kind}"] = value
        elif body:
            out[f"conv_body.{body.group(2)}"] = value
        elif other and other.group(1) == "0":
            out[f"conv_first.{other.group(2)}"] = value
        elif other:
            tail.setdefault(int(other.group(1)), {})[other.group(2)] = value
        else:
            raise ValueError(f"not an ESRGAN (RRDBNet) file: unexpected key {key!r}")
    indices = sorted(tail)
    if len(indices) < 2:
        raise ValueError("not an ESRGAN (RRDBNet) file: no output convolutions")
    names = [f"conv_up{i + 1}" for i in range(len(indices) - 2)] + ["conv_hr", "conv_last"]
    for name, index in zip(names, indices, strict=True):
        out.update({f"{name}.{kind}": v for kind, v in tail[index].items()})
    return out


def rrdbnet_from_state_dict(state: dict[str, torch.Tensor]) -> RRDBNet:
    """An RRDBNet shaped by (and loaded with) a state dict in either layout."""
    if "conv_first.weight" not in state:
        state = _from_esrgan_layout(state)
    try:
        features, first_in = state["conv_first.weight"].shape[:2]
        growth = state["body.0.rdb1.conv1.weight"].shape[0]
        out_channels = state["conv_last.weight"].shape[0]
    except KeyError as missing:
        raise ValueError(f"not an ESRGAN (RRDBNet) file: no {missing.args[0]}") from None
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    upsamples = sum(1 for k in state if re.fullmatch(r"conv_up\d+\.weight", k))
    unshuffle = {1: 1, 4: 2, 16: 4}.get(first_in // out_channels) if first_in % out_channels == 0 else None
    if unshuffle is None:
        raise ValueError(f"ESRGAN file with {first_in} input channels for {out_channels} output channels")
    net = RRDBNet(first_in // unshuffle**2, out_channels, features, blocks, growth, upsamples, unshuffle)
    net.load_state_dict(state, strict=True)
    return net
