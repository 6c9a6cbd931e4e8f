"""Token merging for Stable Diffusion (Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion"): before
the self-attention of the highest-resolution transformer blocks, ``ratio`` of the tokens are merged into similar
ones (bipartite soft matching: one destination token per 2x2 window, its top-left; every other token is matched to
its most similar destination by cosine similarity and the ``ratio * N`` closest pairs are averaged), attention runs
on the rest, and the merged tokens get their destination's output back (unmerging). As ToMe-SD's defaults: the
self-attention only, the highest-resolution level with attention only; deterministic windows.

``set_token_merging(unet, ratio)`` sets it on those transformers of a UNet.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Merge = Callable[[torch.Tensor], torch.Tensor]


def bipartite_soft_matching(x: torch.Tensor, height: int, width: int, ratio: float) -> tuple[Merge, Merge]:
    """``merge`` (B, N, C) -> (B, N - r, C) and ``unmerge`` back, for the tokens ``x`` of an ``height x width``
    map (N = height * width), r = ratio * N (at most the non-destination tokens)."""
    b, n, _ = x.shape
    hd, wd = height // 2, width // 2
    # destination tokens: the top-left of each whole 2x2 window (a boolean mask over the N positions)
    is_dst = torch.zeros(height, width, dtype=torch.bool, device=x.device)
    is_dst[: hd * 2: 2, : wd * 2: 2] = True
    is_dst = is_dst.reshape(n)
    dst_pos, src_pos = is_dst.nonzero().squeeze(1), (~is_dst).nonzero().squeeze(1)
    r = min(int(n * ratio), src_pos.numel())
    with torch.no_grad():
        metric = x / x.norm(dim=-1, keepdim=True)
        scores = metric[:, src_pos] @ metric[:, dst_pos].transpose(1, 2)  # (B, Ns, Nd) cosine similarities
        best, best_dst = scores.max(dim=-1)  # each source token's closest destination
        order = best.argsort(dim=-1, descending=True)
        merged, kept = order[:, :r], order[:, r:]  # (B, r) sources merged away; (B, Ns - r) sources kept
        merged_into = best_dst.gather(1, merged)  # (B, r) their destinations

    def take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

    def merge(t: torch.Tensor) -> torch.Tensor:
        src, dst = t[:, src_pos], t[:, dst_pos]
        dst = dst.scatter_reduce(1, merged_into.unsqueeze(-1).expand(-1, -1, t.shape[-1]), take(src, merged),
                                 reduce="mean", include_self=True)
        # every source merged (ratio >= 0.75 with 2x2 windows): no empty part, which a compiled graph cannot hold
        return torch.cat([take(src, kept), dst], dim=1) if kept.shape[1] else dst

    def unmerge(t: torch.Tensor) -> torch.Tensor:
        kept_out, dst_out = t[:, : kept.shape[1]], t[:, kept.shape[1]:]
        src_out = torch.empty(b, src_pos.numel(), t.shape[-1], dtype=t.dtype, device=t.device)
        if kept.shape[1]:
            src_out.scatter_(1, kept.unsqueeze(-1).expand_as(kept_out), kept_out)
        src_out.scatter_(1, merged.unsqueeze(-1).expand(-1, -1, t.shape[-1]), take(dst_out, merged_into))
        out = torch.empty(b, n, t.shape[-1], dtype=t.dtype, device=t.device)
        out[:, src_pos] = src_out
        out[:, dst_pos] = dst_out
        return out

    return merge, unmerge


def top_transformers(unet: nn.Module) -> list[nn.Module]:
    """The SpatialTransformers of the highest-resolution level that has attention (SD1/SD2: the full latent
    resolution; SDXL and the built-in model: half of it), in its input and output blocks."""
    from .attention import SpatialTransformer

    c = unet.config
    n, levels = c.num_res_blocks, len(c.channel_mult)
    level = next((i for i in range(levels) if c.depth_at(i)), None)
    if level is None:
        return []
    start = 1 + level * (n + 1)
    out = (levels - 1 - level) * (n + 1)
    blocks = [*unet.input_blocks[start:start + n], *unet.output_blocks[out:out + n + 1]]
    return [m for block in blocks for m in block.modules() if isinstance(m, SpatialTransformer)]


def set_token_merging(unet: nn.Module, ratio: float | None) -> None:
    """Merge ``ratio`` (0 <= ratio < 1) of the tokens in the highest-resolution self-attention; 0 or None: off."""
    ratio = float(ratio or 0.0)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"token merging ratio must be in [0, 1), not {ratio}")
    for transformer in top_transformers(unet):
        transformer.token_merge_ratio = ratio
    # the compiled backends' cache key; from 0.75 every source token of an even-sided map merges, a graph that
    # changed on 2026-12-07 (before, its empty part failed to compile): "-2" keeps an earlier cached IR from use
    unet.graph_variant = (f"tome{ratio:g}" + ("-2" if ratio >= 0.75 else "")) if ratio else ""
