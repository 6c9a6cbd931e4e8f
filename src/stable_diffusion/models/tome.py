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
# bumped when a cached merge / unmerge graph would compile or compute differently from today's code: 2 (2026-12-07)
# no empty part when every source merges; 3 the gather / scatter-add merge and the one-gather unmerge
GRAPH_VERSION = 3


def take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[b, index[b, i]]`` for (B, N, C) tokens and a (B, K) index: one row gather on the flattened tokens (a
    compiled Gather; ``torch.gather`` becomes OpenVINO's element-wise GatherElements, about twice as slow)."""
    b, n, c = t.shape
    flat = index + torch.arange(b, device=index.device).unsqueeze(1) * n  # (B, K) rows of the (B * N, C) view
    return t.reshape(b * n, c)[flat.reshape(-1)].reshape(b, -1, c)


def bipartite_soft_matching(x: torch.Tensor, height: int, width: int, ratio: float) -> tuple[Merge, Merge]:
    """``merge`` (B, N, C) -> (B, N - r, C) and ``unmerge`` back, for the tokens ``x`` of an ``height x width``
    map (N = height * width), r = ratio * N (at most the non-destination tokens).

    The merged tensor holds the kept sources, then the destinations. Merging gathers each slot's own token and adds
    the merged sources onto their destinations' slots (one row scatter-add), then divides by the slot's count;
    unmerging is one gather of each position's slot. (A scatter-mean merge and scatter unmerge computed the same
    numbers, but OpenVINO ran them at ~20 % of a cached --fast step: experiments/logs/tome-ops.txt.)"""
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
        merged, kept = order[:, :r], order[:, r:]  # (B, r) sources merged away; (B, nk) sources kept
        # the merged tensor: the nk kept sources' slots, then the destinations'; sizes taken from tensors, not
        # computed (a traced Ns - r has no lower bound in OpenVINO's shape inference, which then fails)
        nk = kept.shape[1]
        into = best_dst.gather(1, merged) + nk  # (B, r) the slots of their destinations
        # (B, M) the position each slot starts from; no empty part in the graph (every source merges from ratio
        # 0.75, and a compiled graph cannot hold one)
        own = torch.cat([src_pos[kept], dst_pos.expand(b, -1)], 1) if nk else dst_pos.expand(b, -1)
        merged_pos = src_pos[merged]  # (B, r) the positions merged away
        slots = torch.arange(own.shape[1], device=x.device).expand(b, -1)
        slot = torch.empty(b, n, dtype=torch.long, device=x.device).scatter_(1, own, slots)  # (B, N): each
        slot.scatter_(1, merged_pos, into)  # position's slot, its own or its destination's
        count = torch.ones_like(own, dtype=x.dtype).scatter_add(1, into, torch.ones_like(into, dtype=x.dtype))
        count = count.unsqueeze(-1)  # (B, M, 1) the tokens averaged into each slot

    def merge(t: torch.Tensor) -> torch.Tensor:
        into_rows = into.unsqueeze(-1).expand(-1, -1, t.shape[-1])
        return take(t, own).scatter_add(1, into_rows, take(t, merged_pos)) / count

    def unmerge(t: torch.Tensor) -> torch.Tensor:
        return take(t, slot)

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
    # the compiled backends' cache key, which holds no code version: GRAPH_VERSION keeps an earlier IR from use
    unet.graph_variant = f"tome{ratio:g}-{GRAPH_VERSION}" if ratio else ""
