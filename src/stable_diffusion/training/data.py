"""Training batches as pure functions of (seed, step, rank): nothing to save for an exact resume, and each rank
of a data-parallel run draws different samples. Procedural shapes, or a folder of images with same-name .txt
captions (the kohya / A1111 trainer layout) with resize, centre/random crop and flip."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..images import to_tensor
from ..shapes.scenes import ShapesDataset, outline, render
from .config import DataSection

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class FolderDataset:
    """Images in a folder (recursively), each captioned by the .txt file of the same name ("" if none)."""

    def __init__(self, path: str | Path, size: int, random_crop: bool = False, flip: bool = False) -> None:
        root = Path(path)
        if not root.is_dir():
            raise ValueError(f"dataset folder {root} does not exist")
        self.root = root
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}")
        self.size, self.random_crop, self.flip = size, random_crop, flip

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, index: int) -> str:
        text = self.files[index].with_suffix(".txt")
        return text.read_text(encoding="utf-8").strip() if text.exists() else ""

    def image(self, index: int, rng: random.Random) -> torch.Tensor:
        """Resize the short side to ``size``, crop a square (centre or random), maybe flip; (3, size, size)."""
        try:
            with Image.open(self.files[index]) as opened:
                image = ImageOps.exif_transpose(opened).convert("RGB")
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"cannot read image {self.files[index]}: {error}") from None
        scale = self.size / min(image.size)
        w, h = max(self.size, round(image.width * scale)), max(self.size, round(image.height * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
        left, top = ((rng.randint(0, w - self.size), rng.randint(0, h - self.size)) if self.random_crop
                     else ((w - self.size) // 2, (h - self.size) // 2))
        image = image.crop((left, top, left + self.size, top + self.size))
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(image)


def control_folder(folder: FolderDataset, path: str | Path) -> FolderDataset:
    """The control images of a folder dataset: the same relative paths under ``path`` (each must exist)."""
    root = Path(path)
    controls = FolderDataset.__new__(FolderDataset)
    controls.size, controls.random_crop, controls.flip = folder.size, folder.random_crop, folder.flip
    controls.files = [root / f.relative_to(folder.root) for f in folder.files]
    missing = [str(f) for f in controls.files if not f.exists()]
    if missing:
        raise ValueError(f"{len(missing)} control images missing under {root}, e.g. {missing[0]}")
    controls.root = root
    return controls


def make_batch(data: DataSection, folder: FolderDataset | None, step: int, batch_size: int, rank: int = 0,
               world: int = 1, caption_dropout: float | None = None, controls: FolderDataset | bool | None = None,
               free_fraction: float = 0.0, outline_fraction: float = 0.0) -> tuple[torch.Tensor, ...]:
    """Batch ``step`` of ``rank``: images (B, 3, S, S) in [-1, 1] and captions, some emptied for CFG; with
    ``controls`` (True for shapes, the control FolderDataset for a folder) the control images too, (B, 3, S, S)
    in [0, 1], between them: (images, controls, captions). ``free_fraction``: shapes scenes with free layouts,
    ``outline_fraction``: their layouts drawn as outlines."""
    dropout = data.caption_dropout if caption_dropout is None else caption_dropout
    rng = random.Random(f"{data.seed}/{rank}/{step}")
    images, captions, hints = [], [], []
    if folder is None:
        stream = ShapesDataset(data.size, data.seed, "train", data.two_object_fraction,
                               small_fraction=data.small_fraction, free_fraction=free_fraction).scenes(rng)
        for _ in range(batch_size):
            scene = next(stream)
            images.append(to_tensor(render(scene, data.size)))
            captions.append(scene.caption)
            if controls:
                layout = render(scene, data.size, layout=True)
                if outline_fraction and rng.random() < outline_fraction:
                    layout = outline(layout)
                hints.append((to_tensor(layout) + 1) / 2)
    else:
        n = len(folder)
        for j in range(batch_size):
            index = (step * world + rank) * batch_size + j
            epoch, within = divmod(index, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(data.seed * 100003 + epoch))
            item = int(order[within])
            images.append(folder.image(item, random.Random(f"{data.seed}/{index}")))
            captions.append(folder.caption(item))
            if isinstance(controls, FolderDataset):  # the same crop and flip as its image
                hints.append((controls.image(item, random.Random(f"{data.seed}/{index}")) + 1) / 2)
    captions = ["" if rng.random() < dropout else c for c in captions]
    if controls:
        return torch.stack(images), torch.stack(hints), captions
    return torch.stack(images), captions
