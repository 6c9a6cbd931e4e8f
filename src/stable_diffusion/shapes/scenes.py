"""A procedural captioned dataset of coloured shapes: seeded, infinite, no files. Big enough that a small model
has to learn words (8 colours x 5 shapes x 2 sizes x 9 places x 5 backgrounds, one- and two-object scenes, many
phrasings), and with a held-out split of attribute combinations that training never sees."""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from ..images import to_tensor

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 230), "yellow": (245, 220, 30),
    "purple": (140, 40, 190), "orange": (250, 140, 20), "pink": (250, 130, 200), "cyan": (40, 210, 220),
}
BACKGROUNDS = {
    "white": (245, 245, 245), "black": (12, 12, 12), "gray": (128, 128, 128), "brown": (115, 70, 35),
    "navy": (15, 25, 80),
}
SHAPES = ("circle", "square", "triangle", "star", "ring")
SIZES = {"small": 0.11, "large": 0.21}  # radius as a fraction of the image side
# 3 x 3 places: name -> (column, row), and the words a caption may use for it
PLACES = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "centre": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
PLACE_PHRASES = {
    "top left": ["at the top left", "in the top left corner", "in the upper left"],
    "top": ["at the top", "at the top centre", "near the top"],
    "top right": ["at the top right", "in the top right corner", "in the upper right"],
    "left": ["on the left", "at the left", "on the left side"],
    "centre": ["in the centre", "in the middle", "at the center"],
    "right": ["on the right", "at the right", "on the right side"],
    "bottom left": ["at the bottom left", "in the bottom left corner", "in the lower left"],
    "bottom": ["at the bottom", "at the bottom centre", "near the bottom"],
    "bottom right": ["at the bottom right", "in the bottom right corner", "in the lower right"],
}
RELATIONS = ("left of", "above")  # object A is left of / above object B
TWO_OBJECT_RADIUS = 0.17


@dataclass(frozen=True)
class Thing:
    """An object; ``box`` (centre x, centre y, radius as fractions of the side) draws it at a free position and
    size instead of its place's grid point (``size`` and ``place`` then name the nearest ones, for the caption)."""
    colour: str
    shape: str
    size: str = "large"
    place: str = "centre"
    box: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class Scene:
    """One or two objects on a background; for two, ``relation`` says where objects[0] is against objects[1]."""
    objects: tuple[Thing, ...]
    background: str
    relation: str | None = None
    caption: str = field(default="", compare=False)

    def key(self) -> str:
        if self.relation is None:
            t = self.objects[0]
            return f"1|{t.colour}|{t.shape}|{t.size}|{t.place}|{self.background}"
        a, b = self.objects
        return f"2|{a.colour}|{a.shape}|{b.colour}|{b.shape}|{self.relation}"


def is_held_out(scene: Scene, fraction: float = 0.1) -> bool:
    """A fixed ~10 % of attribute combinations, chosen by hash, never used for training."""
    digest = hashlib.sha256(scene.key().encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def star_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _draw(draw: ImageDraw.ImageDraw, thing: Thing, cx: float, cy: float, r: float,
          background: tuple[int, int, int], colour: tuple[int, int, int] | None = None) -> None:
    fill = colour or COLOURS[thing.colour]
    box = (cx - r, cy - r, cx + r, cy + r)
    if thing.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif thing.shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif thing.shape == "triangle":
        h = r * math.sqrt(3) / 2
        draw.polygon([(cx, cy - r), (cx - h, cy + r / 2), (cx + h, cy + r / 2)], fill=fill)
    elif thing.shape == "star":
        draw.polygon(star_points(cx, cy, r), fill=fill)
    elif thing.shape == "ring":
        draw.ellipse(box, fill=fill)
        inner = r * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=background)
    else:
        raise ValueError(f"unknown shape {thing.shape!r}")


def place_centre(place: str, size: int) -> tuple[float, float]:
    col, row = PLACES[place]
    return (0.25 + 0.25 * col) * size, (0.25 + 0.25 * row) * size


def nearest_place(x: float, y: float) -> str:
    """The grid place nearest a centre at (x, y), fractions of the side (the grid points are at 1/4, 1/2, 3/4)."""
    col, row = (min(2, max(0, round(v * 4 - 1))) for v in (x, y))
    return next(name for name, cell in PLACES.items() if cell == (col, row))


def size_word(radius: float) -> str:
    """ "small" or "large" for a radius (fraction of the side): the nearer of the two on a log scale."""
    return "small" if radius < math.sqrt(SIZES["small"] * SIZES["large"]) else "large"


def render(scene: Scene, size: int = 64, supersample: int = 4, layout: bool = False) -> Image.Image:
    """Draw the scene at ``supersample`` x the size and box-filter it down, for anti-aliased edges. ``layout``:
    the objects' filled silhouettes, white on black (a ControlNet's control image of where they go)."""
    big = size * supersample
    background = (0, 0, 0) if layout else BACKGROUNDS[scene.background]
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    if all(thing.box for thing in scene.objects):
        placed = [(thing, thing.box[:2], thing.box[2]) for thing in scene.objects]
    elif scene.relation is None:
        placed = [(scene.objects[0], scene.objects[0].place, SIZES[scene.objects[0].size])]
    else:
        first, second = ("left", "right") if scene.relation == "left of" else ("top", "bottom")
        placed = [(scene.objects[0], first, TWO_OBJECT_RADIUS), (scene.objects[1], second, TWO_OBJECT_RADIUS)]
    for thing, where, radius in placed:
        cx, cy = place_centre(where, big) if isinstance(where, str) else (where[0] * big, where[1] * big)
        _draw(draw, thing, cx, cy, radius * big, background, (255, 255, 255) if layout else None)
    return image.resize((size, size), Image.Resampling.BOX)


def outline(layout: Image.Image) -> Image.Image:
    """A layout's outlines instead of its filled silhouettes: the silhouettes less their 3x3 erosion."""
    return ImageChops.subtract(layout, layout.filter(ImageFilter.MinFilter(3)))


def _a(text: str) -> str:
    """The indefinite article for ``text``: "a red ...", "an orange ..."."""
    return ("an " if text[0] in "aeiou" else "a ") + text


def caption_for(scene: Scene, rng: random.Random, full: bool = False) -> str:
    """A natural-English caption; ``full`` names every attribute in the main form (used for evaluation)."""
    bg = f"on a {scene.background} background"
    if scene.relation is None:
        t = scene.objects[0]
        where = rng.choice(PLACE_PHRASES[t.place]) if not full else PLACE_PHRASES[t.place][0]
        if full:
            return f"a {t.size} {t.colour} {t.shape} {where} {bg}"
        form = rng.random()
        if form < 0.55:
            return f"a {t.size} {t.colour} {t.shape} {where} {bg}"
        if form < 0.7:
            return f"{_a(t.colour)} {t.shape} {where}, {t.size}, {bg}"
        if form < 0.85:
            return f"{bg.removeprefix('on ')} with a {t.size} {t.colour} {t.shape} {where}"
        return f"a picture of a {t.size} {t.colour} {t.shape} {where} {bg}"
    a, b = scene.objects
    wa, wb = _a(f"{a.colour} {a.shape}"), _a(f"{b.colour} {b.shape}")
    if scene.relation == "left of":
        forms = [f"{wa} on the left and {wb} on the right", f"{wa} to the left of {wb}",
                 f"{wb} on the right and {wa} on the left", f"{wb} to the right of {wa}"]
    else:
        forms = [f"{wa} above {wb}", f"{wb} below {wa}", f"{wa} at the top and {wb} at the bottom",
                 f"{wb} under {wa}"]
    text = forms[0] if full else rng.choice(forms)
    return f"{text} {bg}"


def _rebalance_size(rng: random.Random, size: str, small_fraction: float) -> str:
    """Turn a fair small/large draw into P(small) = ``small_fraction``. At 0.5 it draws nothing more, so the
    default stream (and with it the held-out prompts) stays as it was."""
    if small_fraction > 0.5 and size == "large" and rng.random() < 2 * small_fraction - 1:
        return "small"
    if small_fraction < 0.5 and size == "small" and rng.random() < 1 - 2 * small_fraction:
        return "large"
    return size


def random_scene(rng: random.Random, two_object_fraction: float = 0.4, small_fraction: float = 0.5) -> Scene:
    """One scene; ``small_fraction`` of single objects are small (two-object scenes draw large objects)."""
    background = rng.choice(list(BACKGROUNDS))
    if rng.random() >= two_object_fraction:
        colour, shape, size = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(SIZES))
        size = _rebalance_size(rng, size, small_fraction)
        thing = Thing(colour, shape, size, rng.choice(list(PLACES)))
        return Scene((thing,), background)
    ca, cb = rng.sample(list(COLOURS), 2)  # two objects never share a colour
    objects = (Thing(ca, rng.choice(SHAPES)), Thing(cb, rng.choice(SHAPES)))
    return Scene(objects, background, rng.choice(RELATIONS))


FREE_RADIUS = {1: (0.1, 0.25), 2: (0.12, 0.2)}  # free layouts: radius ranges for one and two objects
FREE_GAP = 0.03  # free two-object layouts: at least this gap between the objects (fraction of the side)


def free_layout(rng: random.Random, scene: Scene) -> Scene:
    """``scene``'s objects at free positions and sizes (what a prompt cannot say, a layout can): one object
    anywhere inside the image; two apart, the first left of or above the second (whichever is the larger offset,
    the relation the caption then states). Size words and places are the nearest ones."""
    low, high = FREE_RADIUS[len(scene.objects)]
    while True:
        boxes = []
        for _ in scene.objects:
            r = rng.uniform(low, high)
            boxes.append((rng.uniform(r, 1 - r), rng.uniform(r, 1 - r), r))
        if len(boxes) == 1:
            break
        (xa, ya, ra), (xb, yb, rb) = boxes
        if math.hypot(xb - xa, yb - ya) > ra + rb + FREE_GAP:
            break
    if len(boxes) == 2:
        (xa, ya, _), (xb, yb, _) = boxes
        relation = "left of" if abs(xb - xa) >= abs(yb - ya) else "above"
        if (xb < xa) if relation == "left of" else (yb < ya):
            boxes.reverse()
    else:
        relation = None
    objects = tuple(Thing(t.colour, t.shape, size_word(box[2]), nearest_place(box[0], box[1]), box)
                    for t, box in zip(scene.objects, boxes, strict=True))
    return Scene(objects, scene.background, relation)


class ShapesDataset(torch.utils.data.IterableDataset):
    """Infinite (image in [-1, 1] (3, size, size), caption) pairs. ``split``: "train" skips the held-out
    combinations, "heldout" draws only them. Deterministic for a seed; each worker/rank gets its own stream.
    ``free_fraction`` of the scenes get free layouts (:func:`free_layout`); at 0 the stream is as it always was."""

    def __init__(self, size: int = 64, seed: int = 0, split: str = "train", two_object_fraction: float = 0.4,
                 rank: int = 0, small_fraction: float = 0.5, free_fraction: float = 0.0) -> None:
        if split not in ("train", "heldout"):
            raise ValueError(f"unknown split {split!r} (train or heldout)")
        self.size, self.seed, self.split, self.two = size, seed, split, two_object_fraction
        self.rank, self.small, self.free = rank, small_fraction, free_fraction

    def scenes(self, rng: random.Random, full_captions: bool = False):
        while True:
            scene = random_scene(rng, self.two, self.small)
            if self.free and rng.random() < self.free:
                scene = free_layout(rng, scene)
            if is_held_out(scene) != (self.split == "heldout"):
                continue
            yield Scene(scene.objects, scene.background, scene.relation, caption_for(scene, rng, full_captions))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rng = random.Random(f"{self.seed}/{self.rank}/{worker}")
        for scene in self.scenes(rng):
            yield to_tensor(render(scene, self.size)), scene.caption


def heldout_scenes(n: int, seed: int = 1234, two_object: bool = False, free: bool = False) -> list[Scene]:
    """n held-out scenes with their full captions, one-object or two-object only (for evaluation); ``free``: all
    with free layouts."""
    dataset = ShapesDataset(split="heldout", two_object_fraction=1.0 if two_object else 0.0,
                            free_fraction=1.0 if free else 0.0)
    stream = dataset.scenes(random.Random(seed), full_captions=True)
    return [next(stream) for _ in range(n)]
