"""CLIP interrogation as A1111's "clip" interrogator ranks its terms: the image and every term of each category
file (A1111's ``models/interrogate/*.txt``: artists, flavors, mediums, movements; ``name.top3.txt`` keeps three)
are embedded by a CLIP model, and each category contributes its ``top`` terms by ``softmax(100 * cos)``. A1111
prefixes the terms with a BLIP caption; no captioning model is part of this project, so the answer is the terms
alone. Any CLIP checkpoint in transformers' folder layout works (the project's domain CLIP among them)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..images import to_unit
from .clip_score import CLIPScorer

_TOP = re.compile(r"\.top(\d+)\.")


@dataclass
class Category:
    name: str
    top: int
    items: list[str]


def read_categories(folder: str | Path) -> list[Category]:
    """A1111's interrogation categories: each ``*.txt`` in the folder (sorted), one term per line; ``.topN.`` in
    the file name keeps N terms (else 1)."""
    folder = Path(folder)
    categories = []
    for path in sorted(folder.glob("*.txt")) if folder.is_dir() else []:
        items = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        items = [item for item in items if item]
        match = _TOP.search(path.name)
        if items:
            categories.append(Category(path.name.split(".")[0], int(match.group(1)) if match else 1, items))
    return categories


def clip_crop(image: Image.Image, size: int) -> Image.Image:
    """CLIP's preprocessing before normalisation: the short side to ``size`` (bicubic), the centre cropped."""
    image = image.convert("RGB")
    scale = size / min(image.size)
    resized = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                           Image.Resampling.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


class Interrogator:
    """Ranks category terms for images with a CLIP model; each category's text embeddings are computed once."""

    def __init__(self, scorer: CLIPScorer, categories: list[Category], batch: int = 256) -> None:
        self.scorer, self.categories, self.batch = scorer, categories, batch
        self._texts: dict[str, torch.Tensor] = {}

    @classmethod
    def from_folders(cls, clip: str | Path, categories: str | Path) -> Interrogator:
        found = read_categories(categories)
        if not found:
            raise ValueError(f"no interrogation categories in {Path(categories).name}/ (A1111's *.txt term lists)")
        return cls(CLIPScorer.from_folder(clip), found)

    def _text_embeddings(self, category: Category) -> torch.Tensor:
        if category.name not in self._texts:
            model, tokenizer = self.scorer.model, self.scorer.tokenizer
            device = next(model.parameters()).device
            chunks = [model.embed_texts(tokenizer(category.items[i:i + self.batch]).to(device)).float()
                      for i in range(0, len(category.items), self.batch)]
            self._texts[category.name] = torch.cat(chunks)  # (terms, dim), unit length
        return self._texts[category.name]

    @torch.no_grad()
    def rank(self, image: Image.Image) -> list[tuple[str, float]]:
        """(term, probability) of each category's top terms, categories in file order."""
        model = self.scorer.model
        param = next(model.parameters())
        pixels = to_unit([clip_crop(image, model.vision_config.image_size)]).to(param.device, param.dtype)
        image_emb = model.embed_images(pixels).float()  # (1, dim), unit length
        ranked = []
        for category in self.categories:
            probs = (100.0 * image_emb @ self._text_embeddings(category).T).softmax(dim=-1)[0]
            top = probs.topk(min(category.top, len(category.items)))
            ranked += [(category.items[i], float(p)) for p, i in zip(top.values, top.indices, strict=True)]
        return ranked

    def interrogate(self, image: Image.Image, return_ranks: bool = False) -> str:
        """A1111's answer without its caption: the terms joined by commas (with ranks: ``(term:0.123)``)."""
        return ", ".join(f"({term}:{p:.3f})" if return_ranks else term for term, p in self.rank(image))
