"""The LDM UNet noise predictor (Ho et al. 2020 UNet with BigGAN ResBlocks, plus the cross-attention of
Rombach et al. 2022). Module names are those of ldm/modules/diffusionmodules/openaimodel.py and SGM, so
``model.diffusion_model.*`` of an official checkpoint loads with ``strict=True``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .attention import SpatialTransformer, group_norm
from .configs import UNetConfig


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): ``[cos(t f), sin(t f)]`` with ``f = max_period^(-i/half)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3x3 convolution (``op``), or average pooling without a convolution."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour interpolation, then (optionally) a 3x3 convolution."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding (added, or FiLM scale/shift when
    ``use_scale_shift_norm``); ``up``/``down`` resample inside the block (BigGAN style)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            group_norm(out_channels), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]  # (B, C, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class TimestepEmbedSequential(nn.Sequential):
    """Runs its layers in order, giving each the inputs it takes (emb for ResBlocks, context for attention).
    ``checkpointing``: while gradients are on, keep only the block's inputs and recompute its activations in the
    backward pass (gradient checkpointing, Chen et al. 2016: less memory for one more forward)."""

    checkpointing = False

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._layers, x, emb, context, use_reentrant=False)
        return self._layers(x, emb, context)

    def _layers(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def set_gradient_checkpointing(module: nn.Module, enabled: bool = True) -> None:
    """Gradient checkpointing on (or off) for every UNet / ControlNet block inside ``module``."""
    for block in module.modules():
        if isinstance(block, TimestepEmbedSequential):
            block.checkpointing = enabled


class Encoder(nn.Module):
    """The UNet's timestep (and SDXL vector) embedding, input blocks and middle block, with LDM's names; the
    UNet adds the output blocks, ControlNet (models/controlnet.py) its hint encoder and zero convolutions."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = c = config
        mc = c.model_channels
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if c.adm_in_channels:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(c.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(c.in_channels, mc, 3, padding=1))])
        self.skip_channels = [mc]  # each input block's output width, in order
        ch = mc
        last = len(c.channel_mult) - 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [self.res(ch, mc * mult)]
                ch = mc * mult
                if c.depth_at(level):
                    layers.append(self.attn(ch, c.depth_at(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.skip_channels.append(ch)
            if level != last:
                down = self.res(ch, ch, down=True) if c.resblock_updown else Downsample(ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                self.skip_channels.append(ch)
        middle: list[nn.Module] = [self.res(ch, ch)]
        if c.transformer_depth_middle:
            middle.append(self.attn(ch, c.transformer_depth_middle))
        middle.append(self.res(ch, ch))
        self.middle_block = TimestepEmbedSequential(*middle)
        self.middle_channels = ch

    def res(self, ch_in: int, ch_out: int, **kw: bool) -> ResBlock:
        c = self.config
        return ResBlock(ch_in, c.model_channels * 4, ch_out, c.dropout, c.use_scale_shift_norm, **kw)

    def attn(self, ch: int, depth: int) -> SpatialTransformer:
        c = self.config
        heads, dim_head = c.heads_for(ch)
        return SpatialTransformer(ch, heads, dim_head, depth, c.context_dim, c.use_linear_in_transformer, c.dropout)

    def embed(self, timesteps: torch.Tensor, y: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The timestep embedding, plus SDXL's vector y through label_emb."""
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        if self.config.adm_in_channels:
            if y is None:
                raise ValueError("this UNet needs the SDXL vector conditioning y (pooled text + size embedding)")
            emb = emb + self.label_emb(y.to(emb.dtype))
        return emb


class UNetModel(Encoder):
    """``unet(x, timesteps, context, y=None)`` -> the eps (or v) prediction, shaped like ``x``.

    x: (B, in_channels, H, W) latent; timesteps: (B,) in [0, 1000); context: (B, T, context_dim) text
    tokens; y: (B, adm_in_channels) SDXL pooled-text + size embedding."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__(config)
        c, mc = config, config.model_channels
        res, attn = self.res, self.attn
        skip_channels, ch = list(self.skip_channels), self.middle_channels
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mc * mult)]
                ch = mc * mult
                if c.depth_at(level):
                    layers.append(attn(ch, c.depth_at(level)))
                if level and i == c.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if c.resblock_updown else Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(mc, c.out_channels, 3, padding=1))
        self.to(memory_format=torch.channels_last)

    @property
    def channels_last(self) -> bool:
        """Whether the convolution weights are stored channels-last (NHWC), the faster layout for oneDNN and
        tensor cores; the forward pass then runs channels-last throughout. ``.to(memory_format=...)`` switches."""
        return self.out[2].weight.is_contiguous(memory_format=torch.channels_last)

    @property
    def dtype(self) -> torch.dtype:
        return self.__dict__.get("compute_dtype") or self.out[2].weight.dtype  # offload.py: weights may rest in another

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, control: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``control``: ControlNet's residuals, one per input block and the middle's last (Zhang et al. 2023),
        added to the middle block's output and to each skip connection."""
        return self._run(x, timesteps, context, y, control)[0]

    def forward_deep(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                     y: torch.Tensor | None = None, branch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward``, and DeepCache's cache (Ma et al. 2023): the feature that output block ``-(branch + 1)``
        receives from the deeper layers (before its skip is concatenated)."""
        return self._run(x, timesteps, context, y, branch=branch)

    def forward_shallow(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None,
                        feature: torch.Tensor, y: torch.Tensor | None = None, branch: int = 0) -> torch.Tensor:
        """DeepCache's cheap step: input blocks ``0..branch`` and the last ``branch + 1`` output blocks, with
        ``feature`` (forward_deep's, from an earlier step) in place of everything deeper."""
        return self._run(x, timesteps, context, y, branch=branch, feature=feature)[0]

    def _run(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None, y: torch.Tensor | None,
             control: list[torch.Tensor] | None = None, branch: int | None = None,
             feature: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        x = x.to(self.dtype)  # latents may come in fp32 while the network runs in half precision
        emb = self.embed(timesteps, y, x.dtype)
        if context is not None:
            context = context.to(x.dtype)
        skips = []
        h = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        shallow = feature is not None and branch is not None
        for block in self.input_blocks[: branch + 1] if shallow else self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        first = len(self.output_blocks) - 1 - branch if branch is not None else -1  # DeepCache's cache point
        if shallow:
            h = feature.to(h.dtype)
        else:
            h = self.middle_block(h, emb, context)
            if control is not None:
                control = list(control)
                h = h + control.pop().to(h.dtype)
                skips = [s + c.to(s.dtype) for s, c in zip(skips, control, strict=True)]
        cached = None
        for i, block in enumerate(self.output_blocks):
            if shallow and i < first:
                continue
            if i == first:
                cached = h
            skip = skips.pop()
            if h.shape[-2:] != skip.shape[-2:]:  # a latent side not divisible by 2^levels: match the skip, as A1111
                h = F.interpolate(h, skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h).contiguous(), cached
