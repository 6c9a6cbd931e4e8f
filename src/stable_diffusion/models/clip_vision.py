"""CLIP's image tower (Radford et al. 2021): a ViT over patches with a class token, and the pair of towers with
their projections into the shared embedding space. Module names follow transformers' ``CLIPModel`` so its
checkpoints (config.json + model.safetensors) load as they are; used by the CLIP score, not by generation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .clip import CLIPEncoderLayer, CLIPTextModel
from .configs import TextEncoderConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    activation: str = "quick_gelu"

    def as_encoder(self) -> TextEncoderConfig:  # the layer options the encoder layers read
        return TextEncoderConfig(width=self.width, heads=self.heads, intermediate=self.intermediate,
                                 activation=self.activation, layers=self.layers)


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(c.width))
        self.patch_embedding = nn.Conv2d(3, c.width, c.patch_size, stride=c.patch_size, bias=False)
        self.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2 + 1, c.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, N, width)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionEncoder(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c.as_encoder(), causal=False) for _ in range(c.layers))


class CLIPVisionTransformer(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.width)  # (sic: transformers' name)
        self.encoder = CLIPVisionEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels normalised with CLIP's mean/std, (B, 3, S, S) -> pooled class-token features (B, width)."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])


class CLIPPair(nn.Module):
    """Both towers and their projections: ``embed_images`` / ``embed_texts`` give unit vectors."""

    def __init__(self, text: TextEncoderConfig, vision: VisionConfig, projection_dim: int) -> None:
        super().__init__()
        self.text_config, self.vision_config, self.projection_dim = text, vision, projection_dim
        self.text = CLIPTextModel(text)
        self.vision_model = CLIPVisionTransformer(vision)
        self.visual_projection = nn.Linear(vision.width, projection_dim, bias=False)
        self.text_projection = nn.Linear(text.width, projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))  # log(1 / 0.07), CLIP's initial temperature

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], any square size -> the tower's size (bicubic), CLIP-normalised."""
        size = self.vision_config.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False,
                                   antialias=images.shape[-1] > size).clamp(0, 1)
        mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled image-tower features before the projection (B, width): FID's feature space."""
        return self.vision_model(self.preprocess(images))

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual_projection(self.image_features(images)), dim=-1)

    def embed_texts(self, ids: torch.Tensor) -> torch.Tensor:
        _, pooled = self.text(ids)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def state_dict_hf(self) -> dict[str, torch.Tensor]:
        """Weights under transformers' CLIPModel names."""
        out = {k: v for k, v in self.state_dict().items() if not k.startswith("text.")}
        out.update(self.text.state_dict())
        return out

    def load_state_dict_hf(self, sd: dict[str, torch.Tensor]) -> None:
        text = {k: v for k, v in sd.items() if k.startswith("text_model.")}
        if "text_model.embeddings.position_ids" in text:
            del text["text_model.embeddings.position_ids"]
        self.text.load_state_dict(text, strict=True)
        rest = {k: v for k, v in sd.items() if not k.startswith("text_model.")
                and not k.endswith("position_ids")}
        missing, unexpected = self.load_state_dict({**rest, **{"text." + k: v for k, v in text.items()}},
                                                   strict=False)
        if missing or unexpected:
            raise ValueError(f"not a CLIPModel checkpoint: missing {missing[:3]}, unexpected {unexpected[:3]}")
