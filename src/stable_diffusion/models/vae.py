"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, sec. 3; Kingma & Welling 2014).
Module names follow ldm/modules/diffusionmodules/model.py so ``first_stage_model.*`` loads strictly."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .attention import group_norm
from .configs import VAEConfig


class DiagonalGaussian:
    """The encoder's posterior N(mean, diag(exp(logvar))) over latents (B, C, h, w)."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                            device=generator.device if generator is not None else self.mean.device)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dimensions."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1-convolution projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, eps=1e-6)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C); a free view when x is channels-last
        q, k, v = (proj(n).permute(0, 2, 3, 1).reshape(b, 1, h * w, c) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.reshape(b, h, w, c).permute(0, 3, 1, 2)
        if not x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous()
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution with LDM's asymmetric (right/bottom) zero padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks) then ``downsample`` or ``upsample`` when present."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = name if resample is not None else None
        if resample is not None:
            self.add_module(name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return getattr(self, self.resample_name)(x) if self.resample_name else x


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        levels = []
        block_in = c.ch
        for i, mult in enumerate(c.ch_mult):
            blocks = []
            for _ in range(c.num_res_blocks):
                blocks.append(ResnetBlock(block_in, c.ch * mult, c.dropout))
                block_in = c.ch * mult
            down = Downsample(block_in) if i != len(c.ch_mult) - 1 else None
            levels.append(_Level(blocks, down, "downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(block_in, c.dropout)
        self.norm_out = group_norm(block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, 2 * c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig) -> None:
        super().__init__()
        block_in = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, c.dropout)
        levels: list[_Level] = []
        for i in reversed(range(len(c.ch_mult))):
            blocks = []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, c.ch * c.ch_mult[i], c.dropout))
                block_in = c.ch * c.ch_mult[i]
            levels.insert(0, _Level(blocks, Upsample(block_in) if i != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)  # up[0] is the full-resolution level, run last
        self.norm_out = group_norm(block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, c.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """``vae.encode(img)`` -> DiagonalGaussian over latents; ``vae.decode(z)`` -> image in [-1, 1].

    Images are (B, 3, H, W) in [-1, 1]; latents (B, embed_dim, H/f, W/f) with f = 2**(levels-1), unscaled
    (the pipeline multiplies by ``scaling_factor``)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        for norm in self.modules():  # same parameters whatever the grouping, so checkpoints are unaffected
            if isinstance(norm, nn.GroupNorm):
                norm.num_groups = config.norm_groups
        self.to(memory_format=torch.channels_last)  # faster convolutions (oneDNN, tensor cores); same maths

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_conv.weight.is_contiguous(memory_format=torch.channels_last):
            return x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        return x.to(self.dtype)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self._moments(x))

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(self._layout(x.to(self.dtype)))).contiguous()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (any float dtype) -> images in [-1, 1], computed in the VAE's own dtype."""
        return self.decoder(self.post_quant_conv(self._layout(z.to(self.dtype)))).contiguous()

    def encode_tiled(self, x: torch.Tensor, tile: int = 512, overlap: int = 64) -> DiagonalGaussian:
        """``encode`` in overlapping ``tile``-pixel tiles: memory bounded by the tile size (see ``tiled_map``)."""
        with shared_group_norm_stats(self.encoder, lambda: self._moments(_shrink(x, tile))):
            return DiagonalGaussian(tiled_map(self._moments, x, tile, overlap, 1 / self.downscale))

    def decode_tiled(self, z: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
        """``decode`` in overlapping ``tile``-latent tiles: memory bounded by the tile size (see ``tiled_map``)."""
        with shared_group_norm_stats(self.decoder, lambda: self.decode(_shrink(z, tile))):
            return tiled_map(self.decode, z, tile, overlap, self.downscale)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    return [*range(0, size - tile, stride), size - tile]


def _ramp(length: int, overlap: int, first: bool, last: bool) -> torch.Tensor:
    """Blend weights along one axis of a tile: rising over the leading overlap, falling over the trailing one."""
    w = torch.ones(length)
    overlap = min(overlap, length // 2)
    if overlap > 0:
        up = torch.linspace(0, 1, overlap + 2)[1:-1]
        if not first:
            w[:overlap] = up
        if not last:
            w[-overlap:] = up.flip(0)
    return w


def tiled_map(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
              scale: float) -> torch.Tensor:
    """Apply a spatial map ``fn`` (output size = input size * scale) tile by tile over (B, C, H, W) and blend
    the overlapping outputs with linear ramps, so neighbouring tiles fade into each other without seams."""
    b, _, height, width = x.shape
    if height <= tile and width <= tile:
        return fn(x)
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap ({overlap}) must be smaller than the tile ({tile})")
    ys, xs = _starts(height, tile, tile - overlap), _starts(width, tile, tile - overlap)
    out = weight = None
    for y0 in ys:
        for x0 in xs:
            part = fn(x[:, :, y0:y0 + tile, x0:x0 + tile])
            if out is None:
                out = part.new_zeros(b, part.shape[1], round(height * scale), round(width * scale))
                weight = part.new_zeros(1, 1, out.shape[2], out.shape[3])
            oy, ox, ph, pw = round(y0 * scale), round(x0 * scale), part.shape[2], part.shape[3]
            ov = round(overlap * scale)
            mask = (_ramp(ph, ov, y0 == ys[0], y0 == ys[-1])[:, None] * _ramp(pw, ov, x0 == xs[0], x0 == xs[-1])[None])
            mask = mask.to(part)
            out[:, :, oy:oy + ph, ox:ox + pw] += part * mask
            weight[:, :, oy:oy + ph, ox:ox + pw] += mask
    return out / weight


def _shrink(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` resized (area average) so that its longer side is at most ``size``."""
    h, w = x.shape[-2:]
    scale = min(1.0, size / max(h, w))
    return F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")


@contextmanager
def shared_group_norm_stats(module: nn.Module, probe: Callable[[], object]) -> Iterator[None]:
    """Make every GroupNorm in ``module`` normalise with whole-image statistics instead of per-tile ones.

    ``probe`` runs the network once on a downsized copy of the whole input; the mean and variance each
    GroupNorm sees there are then used for every tile, so all tiles share one normalisation (per-tile
    statistics are what makes tiles differ in brightness and colour, i.e. visible seams)."""
    norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
    stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(norm: nn.GroupNorm, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        g = args[0].float().reshape(args[0].shape[0], norm.num_groups, -1)
        stats[id(norm)] = (g.mean(dim=-1), g.var(dim=-1, unbiased=False))

    hooks = [n.register_forward_hook(record) for n in norms]
    try:
        probe()
    finally:
        for hook in hooks:
            hook.remove()

    def frozen(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        mean, var = stats[id(norm)]
        b, c = x.shape[:2]
        scale = (var + norm.eps).rsqrt()
        y = (x.float().reshape(b, norm.num_groups, c // norm.num_groups, -1) - mean[..., None, None]) \
            * scale[..., None, None]
        y = y.reshape(x.shape).to(x.dtype)
        return y * norm.weight[:, None, None] + norm.bias[:, None, None]

    for n in norms:
        n.forward = partial(frozen, n)  # instance attribute shadows the class method
    try:
        yield
    finally:
        for n in norms:
            del n.forward
