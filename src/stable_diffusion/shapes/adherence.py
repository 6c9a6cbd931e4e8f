"""Prompt adherence for the procedural shapes domain: read background, objects, colours, shapes, sizes and
places back from an image, and judge them against the scene a prompt asked for.

Reading: the background is the median border colour; foreground pixels are those far from it; each is given
to the nearest object colour present ("present" = enough near-pure pixels of it). Each object's mask is then
fitted by every shape template rendered at the size its bounding box implies, and the best IoU names the shape;
the fitted radius gives the size and the fitted centre the place (3 x 3 grid)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .scenes import BACKGROUNDS, COLOURS, SHAPES, Scene, nearest_place, size_word, star_points

PURE = 60.0  # an object pixel within this RGB distance of a palette colour counts as that colour
FOREGROUND = 70.0  # a pixel this far from the background colour is foreground
MIN_PIXELS = 8  # near-pure interior pixels needed to believe an object of that colour is there


@dataclass
class Seen:
    colour: str
    shape: str
    radius: float  # in pixels
    centre: tuple[float, float]  # (x, y) in pixels
    iou: float

    def size(self, image_size: int) -> str:
        return size_word(self.radius / image_size)

    def place(self, image_size: int) -> str:
        return nearest_place(self.centre[0] / image_size, self.centre[1] / image_size)


@dataclass
class Reading:
    background: str
    objects: list[Seen]
    image_size: int


def _nearest(colour: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> tuple[str, float]:
    names = list(palette)
    distances = np.linalg.norm(np.array([palette[n] for n in names], dtype=np.float32) - colour, axis=-1)
    return names[int(distances.argmin())], float(distances.min())


def _template(shape: str, cx: float, cy: float, r: float, size: int, supersample: int = 4) -> np.ndarray:
    """A boolean mask of ``shape`` centred at (cx, cy) with circumradius r, drawn as the dataset draws it."""
    s = supersample
    image = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(image)
    cx, cy, r = cx * s, cy * s, r * s
    if shape in ("circle", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if shape == "ring":
            inner = r * 0.55
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=255)
    elif shape == "triangle":
        h = r * math.sqrt(3) / 2
        draw.polygon([(cx, cy - r), (cx - h, cy + r / 2), (cx + h, cy + r / 2)], fill=255)
    else:
        draw.polygon(star_points(cx, cy, r), fill=255)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX)) >= 128


def _geometry(shape: str, box: tuple[float, float, float, float]) -> tuple[float, float, float]:
    """(cx, cy, r) of ``shape`` whose drawn bounding box is ``box`` = (x0, y0, x1, y1), pixel edges."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape in ("circle", "ring"):
        return (x0 + x1) / 2, (y0 + y1) / 2, (w + h) / 4
    if shape == "square":
        return (x0 + x1) / 2, (y0 + y1) / 2, (w + h) / 4 / 0.85
    if shape == "triangle":  # width sqrt(3) r, height 1.5 r, apex at cy - r
        r = (w / math.sqrt(3) + h / 1.5) / 2
        return (x0 + x1) / 2, y0 + r, r
    r = (w / (2 * math.cos(math.pi / 10)) + h / (1 + math.cos(math.pi / 5))) / 2  # star, tip up
    return (x0 + x1) / 2, y0 + r, r


def _fit(mask: np.ndarray) -> tuple[str, float, tuple[float, float], float]:
    ys, xs = np.nonzero(mask)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    best = ("circle", 0.0, (0.0, 0.0), -1.0)
    for shape in SHAPES:
        cx, cy, r = _geometry(shape, box)
        template = _template(shape, cx, cy, r, mask.shape[0])
        union = (template | mask).sum()
        iou = float((template & mask).sum() / union) if union else 0.0
        if iou > best[3]:
            best = (shape, r, (cx, cy), iou)
    return best


def _eroded(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 4 neighbours are in ``mask`` too (anti-aliased edges never survive this)."""
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def _grown(seeds: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The connected parts of ``region`` (4-neighbour) that contain a seed pixel: flood fill by dilation."""
    grown = seeds & region
    while True:
        step = grown.copy()
        step[1:] |= grown[:-1]
        step[:-1] |= grown[1:]
        step[:, 1:] |= grown[:, :-1]
        step[:, :-1] |= grown[:, 1:]
        step &= region
        if (step == grown).all():
            return grown
        grown = step


def read_image(image: Image.Image) -> Reading:
    """What is in a shapes-domain image (any size; judged on the 64 px grid the dataset uses)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    size = pixels.shape[0]
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    bg_colour = np.median(border, axis=0)
    background, _ = _nearest(bg_colour, BACKGROUNDS)
    foreground = np.linalg.norm(pixels - bg_colour, axis=-1) > FOREGROUND
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float32)
    distances = np.linalg.norm(pixels[:, :, None, :] - palette, axis=-1)  # (H, W, colours)
    nearest = distances.argmin(-1)
    pure = (distances.min(-1) < PURE) & foreground
    cores = {i: _eroded(pure & (nearest == i)) for i in range(len(names))}
    counts = np.array([cores[i].sum() for i in range(len(names))])
    present = [i for i in np.argsort(-counts) if counts[i] >= MIN_PIXELS][:2]
    objects = []
    if present:
        owner = np.array(present)[distances[:, :, present].argmin(-1)]  # each pixel -> nearest present colour
        for i in present:
            mask = _grown(cores[i], foreground & (owner == i))
            if mask.sum() >= MIN_PIXELS:
                shape, radius, centre, iou = _fit(mask)
                objects.append(Seen(names[i], shape, radius, centre, iou))
    return Reading(background, objects, size)


def judge(reading: Reading, scene: Scene) -> dict[str, bool]:
    """Per-attribute verdicts and "all" for a one-object scene (colour, shape, size, place, background) or a
    two-object one (each object's colour and shape, and their relative place)."""
    seen = {o.colour: o for o in reading.objects}
    if scene.relation is None:
        want = scene.objects[0]
        got = seen.get(want.colour)
        verdict = {
            "count": len(reading.objects) == 1,
            "colour": got is not None,
            "shape": got is not None and got.shape == want.shape,
            "size": got is not None and got.size(reading.image_size) == want.size,
            "place": got is not None and got.place(reading.image_size) == want.place,
            "background": reading.background == scene.background,
        }
    else:
        a, b = scene.objects
        ga, gb = seen.get(a.colour), seen.get(b.colour)
        relation = False
        if ga is not None and gb is not None:
            dx, dy = gb.centre[0] - ga.centre[0], gb.centre[1] - ga.centre[1]
            relation = (dx > abs(dy)) if scene.relation == "left of" else (dy > abs(dx))
        verdict = {
            "count": len(reading.objects) == 2,
            "colour": ga is not None and gb is not None,
            "shape": ga is not None and gb is not None and ga.shape == a.shape and gb.shape == b.shape,
            "place": relation,
        }
    verdict["all"] = all(verdict.values())
    return verdict
