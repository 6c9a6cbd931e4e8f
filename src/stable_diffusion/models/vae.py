"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, sec. 3; Kingma & Welling 2014).
Module names follow ldm/modules/diffusionmodules/model.py so ``first_stage_model.*`` loads strictly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention, group_norm
from .configs import VAEConfig
from .tiled_vae import image_wide_group_norms, tiled_apply


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

    max_bytes: int | None = None  # attention slicing's budget for the score matrix (None: never slice)

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
        out = attention(q, k, v, self.max_bytes)
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
        return self.__dict__.get("compute_dtype") or self.quant_conv.weight.dtype  # as UNet.dtype

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self._moments(x))

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(self._layout(x.to(self.dtype)))).contiguous()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (any float dtype) -> images in [-1, 1], computed in the VAE's own dtype."""
        return self.decoder(self.post_quant_conv(self._layout(z.to(self.dtype)))).contiguous()

    def encode_tiled(self, x: torch.Tensor, tile: int = 512, margin: int = 32) -> DiagonalGaussian:
        """``encode`` in ``tile``-pixel tiles with ``margin`` pixels of context (see tiled_vae.py)."""
        f = self.downscale
        if max(x.shape[-2:]) <= tile:
            return self.encode(x)
        with image_wide_group_norms(self.encoder, self._moments, x, tile, margin, align=f):
            return DiagonalGaussian(tiled_apply(self._moments, x, tile, margin, 1 / f, align=f))

    def decode_tiled(self, z: torch.Tensor, tile: int = 512, margin: int = 32) -> torch.Tensor:
        """``decode`` in tiles of ``tile`` output pixels with ``margin`` pixels of context (see tiled_vae.py)."""
        f = self.downscale
        core, context = max(1, tile // f), -(-margin // f)
        if max(z.shape[-2:]) <= core:
            return self.decode(z)
        with image_wide_group_norms(self.decoder, self.decode, z, core, context):
            return tiled_apply(self.decode, z, core, context, f)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior
