"""Images in and out, for every front end (CLI, server, training, metrics): PIL <-> tensors, PNG files and bytes
with AUTOMATIC1111's "parameters" text chunk, image files opened with a one-line error, and grids (with A1111's
legend for the X/Y/Z plot)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin, UnidentifiedImageError

from .checkpoints.io import atomic_write


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) float32 in [-1, 1] (RGB)."""
    image = image.convert("RGB")
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.reshape(image.height, image.width, 3).permute(2, 0, 1).float() / 127.5 - 1


def to_batch(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) in [-1, 1], resized (Lanczos) to width x height first (A1111's "just resize")."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return to_tensor(image)[None]


def to_unit(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> (B, 3, H, W) in [0, 1], the range CLIP and Inception features take."""
    return (torch.stack([to_tensor(image) for image in images]) + 1) / 2


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL RGB images (values clamped, rounded to 8 bits)."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def _png_info(infotext: str | None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    if infotext is not None:
        info.add_text("parameters", infotext)
    return info


def save_png(image: Image.Image, path: str | Path, infotext: str | None = None) -> None:
    """Write a PNG with A1111's "parameters" chunk, atomically (a temporary name renamed into place)."""
    atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG", pnginfo=_png_info(infotext)))


def png_bytes(image: Image.Image, infotext: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_png_info(infotext))
    return buffer.getvalue()


def open_image(path: str | Path) -> Image.Image:
    """An image file fully read into memory; a ValueError naming the file for anything unreadable."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError) as error:
        raise ValueError(f"{path}: not a readable image ({error})") from None


def read_infotext(path: str | Path) -> str | None:
    """The "parameters" text of a PNG (None when it has none)."""
    return open_image(path).info.get("parameters")


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Images of one size tiled row-major, ``columns`` to a row."""
    w, h = images[0].size
    rows = -(-len(images) // columns)
    out = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        out.paste(image, ((i % columns) * w, (i // columns) * h))
    return out


def _wrapped(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """``text`` broken into lines no wider than ``width`` pixels (at spaces, else wherever it must)."""
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if draw.textlength(candidate, font=font) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for char in word:  # a word wider than the line is cut where it must be
            if line and draw.textlength(line + char, font=font) > width:
                lines.append(line)
                line = ""
            line += char
    lines.append(line)
    return "\n".join(lines)


def labelled_grid(cells: list[Image.Image], columns: int, column_labels: list[str], row_labels: list[str],
                  margin: int = 0) -> Image.Image:
    """A grid with a legend, as A1111's X/Y/Z plot draws it: a label over each column and left of each row (a
    band only where some label is not empty), text sized to the cells, ``margin`` pixels between cells."""
    w, h = (max(sizes) for sizes in zip(*(cell.size for cell in cells)))
    rows = -(-len(cells) // columns)
    font = ImageFont.load_default(size=max(8, (w + h) // 25))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    spacing = font.size // 2
    tops = [_wrapped(measure, text, font, w) for text in column_labels]
    left_width = w * 3 // 4 if any(row_labels) else 0
    sides = [_wrapped(measure, text, font, max(left_width - spacing, 1)) for text in row_labels]

    def height(text: str) -> int:
        box = measure.multiline_textbbox((0, 0), text, font=font, spacing=spacing)
        return box[3] - box[1] if text else 0

    top = max(map(height, tops)) + 2 * spacing if any(column_labels) else 0
    out = Image.new("RGB", (left_width + columns * w + margin * (columns - 1),
                            top + rows * h + margin * (rows - 1)), "white")
    draw = ImageDraw.Draw(out)
    for i, cell in enumerate(cells):
        out.paste(cell, (left_width + (i % columns) * (w + margin), top + (i // columns) * (h + margin)))
    for col, text in enumerate(tops):
        x = left_width + col * (w + margin) + w // 2
        draw.multiline_text((x, top // 2), text, fill="black", font=font, anchor="mm", align="center",
                            spacing=spacing)
    for row, text in enumerate(sides):
        y = top + row * (h + margin) + h // 2
        draw.multiline_text((left_width // 2, y), text, fill="black", font=font, anchor="mm", align="center",
                            spacing=spacing)
    return out


def film_strip(frames: list[Image.Image], height: int = 128) -> Image.Image:
    """Frames scaled to ``height`` and laid side by side (the CLI's ``--preview`` of each step's x0)."""
    width = max(1, round(frames[0].width * height / frames[0].height))
    return grid([frame.resize((width, height), Image.Resampling.LANCZOS) for frame in frames], len(frames))
