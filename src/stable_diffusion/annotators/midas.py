"""The ``depth_midas`` preprocessor (``dpt_hybrid-midas-501f0c75.pt``): MiDaS's DPT-Hybrid ("Vision transformers for
dense prediction", Ranftl, Bochkovskiy & Koltun 2021) as ControlNet's annotator runs it. A BiT ResNet-50 stem
(weight-standardised convolutions with TensorFlow's "same" padding, group norms; stages of 3, 4 and 9 bottlenecks)
feeds a ViT-B/16 on its 1/16 features; the first two ResNet stages and ViT blocks 8 and 11 (the latter read out
with the class token through a projection) are reassembled into a four-level pyramid and fused coarse to fine by
residual convolution units into a full-resolution relative inverse depth. Module names as the file's
(``pretrained.model.*``, ``pretrained.act_postprocess*``, ``scratch.*``), so it loads strictly."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

UNUSED = ("pretrained.model.head.weight", "pretrained.model.head.bias")  # timm's ImageNet classifier, never run


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "same" padding (more on the bottom / right when odd)."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - 1 + 1 - size, 0)
    return total // 2, total - total // 2


class StdConv2d(nn.Conv2d):
    """A convolution whose weights are standardised per output channel (eps 1e-8) first, "same" padding."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (top, bottom), (left, right) = (_same_padding(s, self.kernel_size[0], self.stride[0]) for s in x.shape[-2:])
        x = F.pad(x, (left, right, top, bottom))
        w = self.weight
        mean, var = w.mean(dim=(1, 2, 3), keepdim=True), w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        return F.conv2d(x, (w - mean) / torch.sqrt(var + 1e-8), None, self.stride)


class GroupNormAct(nn.GroupNorm):
    def __init__(self, channels: int, act: bool = True) -> None:
        super().__init__(32, channels, eps=1e-5)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return torch.relu(x) if self.act else x


class Downsample(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv, self.norm = StdConv2d(cin, cout, 1, stride), GroupNormAct(cout, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """ResNet's bottleneck (not pre-activated): 1x1, 3x3 (strided), 1x1 to 4x the width, added to the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, first: bool) -> None:
        super().__init__()
        mid = cout // 4
        self.downsample = Downsample(cin, cout, stride) if first else None
        self.conv1, self.norm1 = StdConv2d(cin, mid, 1), GroupNormAct(mid)
        self.conv2, self.norm2 = StdConv2d(mid, mid, 3, stride), GroupNormAct(mid)
        self.conv3, self.norm3 = StdConv2d(mid, cout, 1), GroupNormAct(cout, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x) if self.downsample is not None else x
        y = self.norm3(self.conv3(self.norm2(self.conv2(self.norm1(self.conv1(x))))))
        return torch.relu(y + shortcut)


class Stage(nn.Module):
    def __init__(self, cin: int, cout: int, depth: int, stride: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Bottleneck(cin if i == 0 else cout, cout, stride if i == 0 else 1, i == 0)
                                      for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = StdConv2d(3, 64, 7, 2), GroupNormAct(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        (top, bottom), (left, right) = (_same_padding(s, 3, 2) for s in x.shape[-2:])
        return F.max_pool2d(F.pad(x, (left, right, top, bottom), value=0.0), 3, 2)  # x >= 0 after the ReLU


class ResNetBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = Stem()
        self.stages = nn.ModuleList([Stage(64, 256, 3, 1), Stage(256, 512, 4, 2), Stage(512, 1024, 9, 2)])


class PatchEmbed(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.backbone, self.proj = ResNetBackbone(), nn.Conv2d(1024, width, 1)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width, eps=1e-6), Attention(width, heads)
        self.norm2, self.mlp = nn.LayerNorm(width, eps=1e-6), Mlp(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HybridViT(nn.Module):
    """ViT-B/16 on the ResNet's 1/16 features; the position embedding (24 x 24 at 384 px) resized bilinearly."""

    def __init__(self, width: int = 768, depth: int = 12, heads: int = 12, grid: int = 24) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, width))
        self.patch_embed = PatchEmbed(width)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)  # in the file; its output is not used for depth


class ProjectReadout(nn.Module):
    """Tokens concatenated with the class token, projected back to the width (DPT's "project" readout)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * width, width), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x[:, 1:]
        return self.project(torch.cat([tokens, x[:, :1].expand_as(tokens)], -1))


class Pretrained(nn.Module):
    """The encoder: ``model`` (the hybrid ViT) and the reassembly of ViT blocks 8 and 11 (``act_postprocess3/4``:
    readout, [transpose, unflatten], 1x1 convolution, and for the coarsest a stride-2 3x3 convolution)."""

    def __init__(self, width: int = 768) -> None:
        super().__init__()
        self.model = HybridViT(width)
        self.act_postprocess3 = nn.Sequential(ProjectReadout(width), nn.Identity(), nn.Identity(),
                                              nn.Conv2d(width, width, 1))
        self.act_postprocess4 = nn.Sequential(ProjectReadout(width), nn.Identity(), nn.Identity(),
                                              nn.Conv2d(width, width, 1), nn.Conv2d(width, width, 3, 2, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        m, (h, w) = self.model, (x.shape[2] // 16, x.shape[3] // 16)
        grid = m.pos_embed[0, 1:]
        old = int(math.sqrt(grid.shape[0]))
        grid = F.interpolate(grid.reshape(1, old, old, -1).permute(0, 3, 1, 2), size=(h, w), mode="bilinear")
        pos = torch.cat([m.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], 1)
        features = m.patch_embed.backbone.stem(x)
        pyramid = []
        for stage in m.patch_embed.backbone.stages:
            features = stage(features)
            pyramid.append(features)
        tokens = m.patch_embed.proj(features).flatten(2).transpose(1, 2)  # (B, h * w, width)
        tokens = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), tokens], 1) + pos
        for i, block in enumerate(m.blocks):
            tokens = block(tokens)
            if i in (8, 11):
                post = self.act_postprocess3 if i == 8 else self.act_postprocess4
                grid_tokens = post[0](tokens).transpose(1, 2).unflatten(2, (h, w))  # (B, width, h, w)
                pyramid.append(post[3:](grid_tokens))
        return [pyramid[0], pyramid[1], pyramid[3], pyramid[4]]  # 1/4, 1/8, 1/16, 1/32


class ResidualConvUnit(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1), nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(torch.relu(x))))


class FusionBlock(nn.Module):
    """Adds the skip level (through a residual unit), refines, doubles the size (bilinear, corners aligned)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(channels, channels, 1)
        self.resConfUnit1, self.resConfUnit2 = ResidualConvUnit(channels), ResidualConvUnit(channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = F.interpolate(self.resConfUnit2(x), scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Scratch(nn.Module):
    def __init__(self, features: int = 256) -> None:
        super().__init__()
        for i, cin in enumerate((256, 512, 768, 768), 1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(cin, features, 3, 1, 1, bias=False))
            setattr(self, f"refinenet{i}", FusionBlock(features))
        self.output_conv = nn.Sequential(
            nn.Conv2d(features, features // 2, 3, 1, 1), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(features // 2, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 1, 1), nn.ReLU(), nn.Identity())


class DPTDepth(nn.Module):
    """(B, 3, H, W) RGB in [-1, 1] (H, W multiples of 32) -> (B, H, W) relative inverse depth (>= 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.pretrained, self.scratch = Pretrained(), Scratch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scratch
        l1, l2, l3, l4 = (getattr(s, f"layer{i}_rn")(f) for i, f in enumerate(self.pretrained(x), 1))
        path = s.refinenet1(s.refinenet2(s.refinenet3(s.refinenet4(l4), l3), l2), l1)
        return s.output_conv(path).squeeze(1)

    def load_file(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict({k: v for k, v in state.items() if k not in UNUSED}, strict=True)


def depth_map(net: DPTDepth, pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8: near is bright (the prediction rescaled to 0-255, as the annotator)."""
    x = torch.from_numpy(pixels).float().div(127.5).sub(1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        depth = net(x)[0]
    depth = depth - depth.min()
    top = depth.max()
    depth = depth / top if top > 0 else depth
    return (depth.numpy() * 255.0).clip(0, 255).astype(np.uint8)
