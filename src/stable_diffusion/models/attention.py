"""Cross-attention transformer blocks of the LDM UNet (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", sec. 3.3). Module names follow ldm/modules/attention.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .tome import Merge, bipartite_soft_matching


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """The 32-group normalisation used throughout LDM."""
    return nn.GroupNorm(32, channels, eps=eps, affine=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_bytes: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, N, d) tensors (Vaswani et al. 2017). With ``max_bytes``, when
    the (B, heads, N, M) score matrix would exceed it, the queries go in slices whose scores fit (attention
    slicing): each query row's softmax is independent of the others, so the result is the same up to the
    kernel's rounding (bit-identical images on the built-in model, tests/test_low_memory.py)."""
    b, h, n, _ = q.shape
    row = b * h * k.shape[-2] * q.element_size()  # score bytes of one query position
    if max_bytes is None or n * row <= max_bytes:
        return F.scaled_dot_product_attention(q, k, v)
    rows = max(1, max_bytes // row)
    out = q.new_empty(b, h, n, v.shape[-1])
    for i in range(0, n, rows):
        out[:, :, i:i + rows] = F.scaled_dot_product_attention(q[:, :, i:i + rows], k, v)
    return out


class CrossAttention(nn.Module):
    """Multi-head attention; keys/values come from ``context`` (text tokens) or from ``x`` itself."""

    max_bytes: int | None = None  # attention slicing's budget for the score matrix (None: never slice)

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        h = self.heads
        # (B, N, h*d) -> (B, h, N, d)
        q = self.to_q(x).view(b, n, h, -1).transpose(1, 2)
        k = self.to_k(context).view(b, context.shape[1], h, -1).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], h, -1).transpose(1, 2)
        out = attention(q, k, v, self.max_bytes)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """Gated GELU feed-forward input (Shazeer 2020): ``a * gelu(b)`` for ``a, b = proj(x).chunk(2)``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            a, gate = self.proj(x).chunk(2, dim=-1)
            return a * F.gelu(gate)
        # inference: two half-width matmuls give contiguous halves that can be combined in place
        half = self.proj.out_features // 2
        w, b = self.proj.weight, self.proj.bias
        a = F.linear(x, w[:half], b[:half])
        gate = F.linear(x, w[half:], b[half:])
        return a.mul_(F.gelu(gate))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the context, then a GEGLU feed-forward; pre-norm residuals."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                merging: tuple[Merge, Merge] | None = None) -> torch.Tensor:
        """``merging``: token merging's (merge, unmerge) around the self-attention (models/tome.py)."""
        if merging is None:
            x = self.attn1(self.norm1(x)) + x
        else:
            merge, unmerge = merging
            x = unmerge(self.attn1(merge(self.norm1(x)))) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Feature map (B, C, H, W) -> tokens (B, H*W, C) -> transformer blocks -> feature map, plus residual.

    ``use_linear`` selects the SD2/SDXL linear proj_in/proj_out instead of SD1's 1x1 convolutions;
    ``token_merge_ratio`` > 0 merges that share of the tokens in the self-attention (models/tome.py)."""

    token_merge_ratio: float = 0.0

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int | None,
                 use_linear: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(b, height * width, -1)  # (B, H*W, C), contiguous
        if self.use_linear:
            h = self.proj_in(h)
        ratio = self.token_merge_ratio
        merging = bipartite_soft_matching(h, height, width, ratio) if ratio else None
        for block in self.transformer_blocks:
            h = block(h, context, merging)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.reshape(b, height, width, -1).permute(0, 3, 1, 2)  # back to (B, C, H, W), channels-last in memory
        if not x.is_contiguous(memory_format=torch.channels_last):
            h = h.contiguous()
        if not self.use_linear:
            h = self.proj_out(h)
        return h + x
