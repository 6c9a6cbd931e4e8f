"""The CLIP text transformer (Radford et al. 2021) that turns token ids into the UNet's context.

Module names are those of Hugging Face's CLIPTextModel (``text_model.encoder.layers.N.self_attn.q_proj``),
which is exactly SD1's ``cond_stage_model.transformer.*``. OpenCLIP checkpoints (SD2, SDXL bigG) use other
names for the same maths; ``checkpoints/keymap.py`` generates the translation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import TextEncoderConfig


class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid approximation of GELU: ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool = True) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        # (B, N, C) -> (B, heads, N, C/heads); causal (text): token i sees tokens <= i
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, intermediate: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, intermediate)
        self.act = QuickGELU() if activation == "quick_gelu" else nn.GELU()
        self.fc2 = nn.Linear(intermediate, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, c: TextEncoderConfig, causal: bool = True) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.width)
        self.self_attn = CLIPAttention(c.width, c.heads, causal)
        self.layer_norm2 = nn.LayerNorm(c.width)
        self.mlp = CLIPMLP(c.width, c.intermediate, c.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, c: TextEncoderConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.position_embedding = nn.Embedding(c.max_positions, c.width)

    def forward(self, ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.token_embedding(ids) if token_embeds is None else token_embeds
        positions = torch.arange(ids.shape[1], device=tokens.device)  # through the module, so offload hooks see it
        return tokens + self.position_embedding(positions)


class CLIPEncoder(nn.Module):
    def __init__(self, c: TextEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, c: TextEncoderConfig) -> None:
        super().__init__()
        self.embeddings = CLIPEmbeddings(c)
        self.encoder = CLIPEncoder(c)
        self.final_layer_norm = nn.LayerNorm(c.width)


class CLIPTextModel(nn.Module):
    """``text_encoder(ids)`` -> ``(context, pooled)``.

    ids: (B, T) token ids, T <= 77. context: (B, T, width), the hidden state after layer
    ``output_layer`` (shifted ``clip_skip - 1`` layers earlier), final-normed when ``final_norm``.
    pooled: (B, projection_dim or width), the final-normed last layer at the first end-of-text token, through
    ``text_projection`` when the model has one (SDXL's bigG)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if config.projection_dim:
            self.text_projection = nn.Linear(config.width, config.projection_dim, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.__dict__.get("compute_dtype") or self.text_model.final_layer_norm.weight.dtype  # as UNet.dtype

    def forward(self, ids: torch.Tensor, clip_skip: int = 1,
                token_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        tm = self.text_model
        layers = tm.encoder.layers
        # index into the L+1 hidden states (embeddings, after layer 1, ..., after layer L)
        wanted = len(layers) + 1 + c.output_layer - (max(clip_skip, 1) - 1)
        if not 0 <= wanted <= len(layers):
            raise ValueError(f"clip_skip={clip_skip} is too large for a {len(layers)}-layer text encoder")
        x = tm.embeddings(ids, token_embeds)  # token_embeds: (B, T, width), e.g. with textual-inversion vectors
        context = x
        for i, layer in enumerate(layers):
            if i == wanted:
                context = x
            x = layer(x)
        if wanted == len(layers):
            context = x
        if c.final_norm:
            context = tm.final_layer_norm(context)
        last = tm.final_layer_norm(x)
        eos = (ids == c.eos_token_id).int().argmax(dim=-1)  # first end-of-text token
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]
        if c.projection_dim:
            pooled = self.text_projection(pooled)
        return context, pooled
