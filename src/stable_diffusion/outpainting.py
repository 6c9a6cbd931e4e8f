"""A1111's "Poor man's outpainting" (scripts/poor_mans_outpainting.py): the image is put on a larger canvas (grown
by ``pixels`` in the chosen directions, rounded up to multiples of 64), the new border is masked, and the canvas
is cut into overlapping tiles of the request's size; every tile that touches the border is inpainted on its
own (seed, seed + 1, ...), and the tiles are joined again with their overlaps blended (A1111's split_grid /
combine_grid). ``generate`` runs the tiles; this module holds the geometry."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

DIRECTIONS = ("left", "right", "up", "down")
TITLE = "Poor man's outpainting"


@dataclass(frozen=True)
class Outpaint:
    """The script's settings (A1111's run() arguments)."""

    pixels: int = 128  # how far to grow the image (8 to 256 in A1111's UI)
    mask_blur: int = 4  # the tiles are inpainted with twice this blur, as A1111's
    inpainting_fill: int = 0  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    directions: tuple[str, ...] = DIRECTIONS

    def check(self, tile_w: int, tile_h: int) -> None:
        if not 8 <= self.pixels <= 1024:
            raise ValueError(f"outpainting pixels must be from 8 to 1024, got {self.pixels}")
        if self.pixels >= min(tile_w, tile_h):
            raise ValueError(f"outpainting pixels ({self.pixels}) must be less than the tile size {tile_w}x{tile_h}")
        if not 0 <= self.mask_blur <= 64:
            raise ValueError(f"outpainting mask_blur must be from 0 to 64, got {self.mask_blur}")
        unknown = set(self.directions) - set(DIRECTIONS)
        if unknown or not self.directions:
            raise ValueError(f"outpainting directions: some of {', '.join(DIRECTIONS)}, got {list(self.directions)}")


@dataclass
class Tile:
    x: int
    y: int
    image: Image.Image


@dataclass
class Tiles:
    """An image cut into tiles of tile_w x tile_h overlapping by ``overlap`` (rows of tiles, top to bottom)."""

    rows: list[list[Tile]]
    tile_w: int
    tile_h: int
    width: int
    height: int
    overlap: int
    todo: list[Tile] = field(default_factory=list)


def canvas(init: Image.Image, settings: Outpaint) -> tuple[Image.Image, Image.Image, Image.Image, tuple[int, ...]]:
    """(the grown canvas with the image on it, the mask of what to paint, the latent mask, (left, right, up,
    down) growth), as A1111's script lays them out: the mask's edge moved in by twice the blur, the latent
    mask's by half of it, so the blended band overlaps the original."""
    grow = {d: settings.pixels if d in settings.directions else 0 for d in DIRECTIONS}
    target_w = math.ceil((init.width + grow["left"] + grow["right"]) / 64) * 64
    target_h = math.ceil((init.height + grow["up"] + grow["down"]) / 64) * 64
    left, right, up, down = grow["left"], grow["right"], grow["up"], grow["down"]
    if left:
        left = left * (target_w - init.width) // (left + right)
    if right:
        right = target_w - init.width - left
    if up:
        up = up * (target_h - init.height) // (up + down)
    if down:
        down = target_h - init.height - up
    image = Image.new("RGB", (target_w, target_h))
    image.paste(init.convert("RGB"), (left, up))

    def mask(inset: int) -> Image.Image:
        out = Image.new("L", (target_w, target_h), "white")
        ImageDraw.Draw(out).rectangle((left + (inset if left else 0), up + (inset if up else 0),
                                       target_w - right - (inset if right else 0),
                                       target_h - down - (inset if down else 0)), fill="black")
        return out

    return image, mask(settings.mask_blur * 2), mask(settings.mask_blur // 2), (left, right, up, down)


def split(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> Tiles:
    """A1111's split_grid: as few tiles as cover the image with at least ``overlap`` pixels shared, spread
    evenly, the last flush with the edge."""
    w, h = image.size
    cols = max(1, math.ceil((w - overlap) / (tile_w - overlap)))
    rows = max(1, math.ceil((h - overlap) / (tile_h - overlap)))
    dx = (w - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (h - tile_h) / (rows - 1) if rows > 1 else 0
    grid = Tiles([], tile_w, tile_h, w, h, overlap)
    for row in range(rows):
        y = min(int(row * dy), h - tile_h)
        tiles = []
        for col in range(cols):
            x = min(int(col * dx), w - tile_w)
            tiles.append(Tile(x, y, image.crop((x, y, x + tile_w, y + tile_h))))
        grid.rows.append(tiles)
    return grid


def combine(grid: Tiles) -> Image.Image:
    """A1111's combine_grid: tiles pasted left to right and rows top to bottom, each overlap blended by a
    linear ramp from the earlier tile to the later one."""
    ramp = np.arange(grid.overlap, dtype=np.float32) * 255 / grid.overlap
    across = Image.fromarray(np.repeat(ramp[None, :], grid.tile_h, axis=0).astype(np.uint8), "L")
    down = Image.fromarray(np.repeat(ramp[:, None], grid.width, axis=1).astype(np.uint8), "L")
    out = Image.new("RGB", (grid.width, grid.height))
    for row in grid.rows:
        y = row[0].y
        strip = Image.new("RGB", (grid.width, grid.tile_h))
        for tile in row:
            if tile.x == 0:
                strip.paste(tile.image, (0, 0))
                continue
            strip.paste(tile.image.crop((0, 0, grid.overlap, grid.tile_h)), (tile.x, 0), mask=across)
            strip.paste(tile.image.crop((grid.overlap, 0, grid.tile_w, grid.tile_h)), (tile.x + grid.overlap, 0))
        if y == 0:
            out.paste(strip, (0, 0))
            continue
        out.paste(strip.crop((0, 0, grid.width, grid.overlap)), (0, y), mask=down)
        out.paste(strip.crop((0, grid.overlap, grid.width, grid.tile_h)), (0, y + grid.overlap))
    return out


def plan(init: Image.Image, settings: Outpaint, tile_w: int, tile_h: int
         ) -> tuple[Tiles, list[tuple[Tile, Image.Image, Image.Image]]]:
    """The canvas's tiles, and (tile, its mask, its latent mask) for each tile that reaches the grown border
    (the tiles inside the original image are kept as they are), in A1111's order."""
    settings.check(tile_w, tile_h)
    image, mask, latent_mask, (left, right, up, down) = canvas(init, settings)
    if image.width < tile_w or image.height < tile_h:
        raise ValueError(f"outpainting: the grown image ({image.width}x{image.height}) is smaller than a tile "
                         f"({tile_w}x{tile_h}); grow it more or use a smaller width and height")
    grid = split(image, tile_w, tile_h, settings.pixels)
    masks, latents = split(mask, tile_w, tile_h, settings.pixels), split(latent_mask, tile_w, tile_h, settings.pixels)
    work = []
    for row, mask_row, latent_row in zip(grid.rows, masks.rows, latents.rows, strict=True):
        for tile, tile_mask, tile_latent in zip(row, mask_row, latent_row, strict=True):
            inside = tile.x >= left and tile.x + tile_w <= image.width - right and tile.y >= up \
                and tile.y + tile_h <= image.height - down
            if not inside:
                work.append((tile, tile_mask.image, tile_latent.image))
    return grid, work
