"""Prompt -> UNet conditioning: the text encoders' context (concatenated along channels for SDXL) and, for
SDXL, the vector ``y`` = pooled text + sinusoidal embeddings of the size/crop numbers (Podell et al. 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models.unet import timestep_embedding
from .prompts import encode_weighted


@dataclass
class Conditioning:
    context: torch.Tensor  # (B, 77, C)
    y: torch.Tensor | None = None  # (B, adm_in_channels) for SDXL


def encode_text(pipe, prompts: list[str], clip_skip: int = 1, min_chunks: int = 1,
                library=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (B, 77 * chunks, sum of widths), pooled output of the last encoder), A1111 prompt syntax."""
    contexts, pooled = [], None
    for tokenizer, encoder in zip(pipe.tokenizers, pipe.text_encoders, strict=True):
        context, pooled = encode_weighted(tokenizer, encoder, prompts, pipe.device, clip_skip, min_chunks,
                                          library)
        contexts.append(context)
    return torch.cat(contexts, dim=-1), pooled


def size_embedding(numbers: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, 6) size/crop numbers -> (B, 6 * dim): each number gets its own sinusoidal embedding."""
    return timestep_embedding(numbers.flatten(), dim).reshape(numbers.shape[0], -1)


def condition(pipe, prompts: list[str], width: int, height: int, clip_skip: int = 1,
              min_chunks: int = 1, library=None) -> Conditioning:
    context, pooled = encode_text(pipe, prompts, clip_skip, min_chunks, library)
    c = pipe.config
    if not c.unet.adm_in_channels:
        return Conditioning(context.to(pipe.dtype))
    # original size, crop top-left, target size: (h, w, 0, 0, h, w) as SDXL's reference sampling uses
    numbers = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).expand(len(prompts), 6)
    y = torch.cat([pooled.float(), size_embedding(numbers, c.size_embed_dim).to(pooled.device)], dim=1)
    return Conditioning(context.to(pipe.dtype), y.to(pipe.dtype))
