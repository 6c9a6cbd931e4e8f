"""Prompt -> UNet conditioning: the text encoders' context (concatenated along channels for SDXL) and, for
SDXL, the vector ``y`` = pooled text + sinusoidal embeddings of the size/crop numbers (Podell et al. 2023); and
the classifier-free-guidance denoiser of a request, with A1111's prompt editing switching texts between steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .diffusion.denoiser import CFGDenoiser, Denoiser
from .embeddings import EmbeddingLibrary
from .models.unet import timestep_embedding
from .prompt_editing import prompt_schedule
from .prompts import count_chunks, encode_weighted

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .request import GenerationRequest


@dataclass
class Conditioning:
    context: torch.Tensor  # (B, 77, C)
    y: torch.Tensor | None = None  # (B, adm_in_channels) for SDXL


def encode_text(pipe: Pipeline, prompts: list[str], clip_skip: int = 1, min_chunks: int = 1,
                library: EmbeddingLibrary | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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


# The SDXL refiner's aesthetic scores: A1111's defaults (sdxl_refiner_high/low_aesthetic_score), diffusers' too
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


def condition(pipe: Pipeline, prompts: list[str], width: int, height: int, clip_skip: int = 1,
              min_chunks: int = 1, library: EmbeddingLibrary | None = None, negative: bool = False) -> Conditioning:
    """The conditioning of ``prompts``; ``negative``: they are the unconditional side (the refiner's y differs)."""
    context, pooled = encode_text(pipe, prompts, clip_skip, min_chunks, library)
    if not pipe.config.unet.adm_in_channels:
        return Conditioning(context.to(pipe.dtype))
    aesthetic = None
    if pipe.config.is_refiner:
        aesthetic = NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE
    return Conditioning(context.to(pipe.dtype),
                        sdxl_vector(pooled, width, height, pipe.config.size_embed_dim, aesthetic))


def sdxl_vector(pooled: torch.Tensor, width: int, height: int, size_embed_dim: int,
                aesthetic: float | None = None) -> torch.Tensor:
    """SDXL's y (Podell et al. 2023): the pooled text, then each of original size, crop top-left and target size,
    (h, w, 0, 0, h, w) as SDXL's reference sampling and training on uncropped images use, embedded. The refiner
    (``aesthetic`` given) has the aesthetic score where the base has the target size: (h, w, 0, 0, score)."""
    row = [height, width, 0, 0, height, width] if aesthetic is None else [height, width, 0, 0, aesthetic]
    numbers = torch.tensor([row], dtype=torch.float32).expand(pooled.shape[0], len(row))
    y = torch.cat([pooled.float(), size_embedding(numbers, size_embed_dim).to(pooled.device)], dim=1)
    return y.to(pooled.dtype)


class StepwiseCFG(torch.nn.Module):
    """Prompt editing: the CFG denoiser of the sampling step that ``sigma`` belongs to (no hidden state:
    the step is read off the sigma list, so second-order samplers' midpoints use their step's prompt)."""

    def __init__(self, sigmas: torch.Tensor, per_step: list[CFGDenoiser]) -> None:
        super().__init__()
        self.sigmas, self.per_step = sigmas, per_step

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, skip_uncond: bool = False,
                **options: object) -> torch.Tensor:
        step = int((self.sigmas[:-1] >= sigma.reshape(-1)[0] * (1 - 1e-6)).sum().item()) - 1
        return self.per_step[min(max(step, 0), len(self.per_step) - 1)](x, sigma, skip_uncond, **options)


def guided_denoiser(pipe: Pipeline, request: GenerationRequest, prompts: list[str], negative: str,
                    denoiser: Denoiser, sigmas: torch.Tensor) -> CFGDenoiser | StepwiseCFG:
    """Classifier-free guidance (Ho & Salimans 2022) on every image's prompt against the negative prompt, with
    A1111 prompt editing on both; each distinct text is encoded once, and the batch's conditioning stacks the
    texts each image is at. ``request`` is resolved (width and height set)."""
    steps = len(sigmas) - 1
    schedules = {text: prompt_schedule(text, steps) for text in {*prompts, negative}}
    texts = {t for schedule in schedules.values() for _, t in schedule}
    # every text pads to the same number of 77-token chunks so cond and uncond share one batched UNet call
    library = EmbeddingLibrary(request.embeddings_dir, [te.config.width for te in pipe.text_encoders])
    chunks = max(count_chunks(pipe.tokenizer, t, library) for t in texts)
    # the refiner conditions the two sides differently (aesthetic scores), so its texts are encoded per side
    refiner = pipe.config.is_refiner
    wanted = {(t, False) for t in texts} if not refiner else \
        {(t, side) for text, side in [*((p, False) for p in prompts), (negative, True)] for _, t in schedules[text]}
    encoded = {(t, side): condition(pipe, [t], request.width, request.height, request.clip_skip, chunks, library,
                                    negative=side) for t, side in wanted}

    def at(text: str, step: int) -> str:
        return next(part for end, part in schedules[text] if step <= end)

    def stacked(parts: tuple[str, ...], uncond: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        side = uncond and refiner
        context = torch.cat([encoded[p, side].context for p in parts])  # (n, tokens, width)
        ys = [encoded[p, side].y for p in parts]
        return context, None if ys[0] is None else torch.cat(ys)

    models: dict[tuple[tuple[str, ...], str], CFGDenoiser] = {}
    per_step = []
    for step in range(1, steps + 1):
        key = (tuple(at(p, step) for p in prompts), at(negative, step))
        if key not in models:
            (cond, cond_y), (uncond, uncond_y) = stacked(key[0]), stacked((key[1],) * len(prompts), uncond=True)
            models[key] = CFGDenoiser(denoiser, cond, uncond, request.cfg_scale, cond_y, uncond_y)
        per_step.append(models[key])
    return per_step[0] if len(models) == 1 else StepwiseCFG(sigmas, per_step)
