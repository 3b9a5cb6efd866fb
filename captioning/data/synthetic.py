"""Synthetic shapes: small captioned scenes for the quick start and the tests, with no download.

Each image shows one or two coloured shapes on a light background. Its five template captions name every shape's
colour, kind and size and, for two shapes, where one is relative to the other, in a vocabulary of about 25 words.
A captioner reaches a high BLEU only if its encoder sees colour, shape, size and position, so a few minutes of CPU
training show whether the whole pipeline (images -> encoder -> decoder -> decoding -> metrics) works.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from captioning.data.sources import CaptionSource, Sample

SPLIT_ID = {"train": 0, "val": 1, "test": 2}  # separate random streams, so held-out images differ from train
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 200, 0)}
KINDS = ("circle", "square", "triangle")
SIZES = {"small": 0.09, "large": 0.18}  # half the side of a shape's bounding box, as a fraction of image_size
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
MARGIN = 0.03  # least distance from a shape's box to the image edge, fraction of image_size
MIN_GAP = 0.06  # least gap between the two boxes along the relation's axis, fraction of image_size
MAX_OFFSET = 0.05  # most offset between the two centres across that axis: the relation is never ambiguous
SUPERSAMPLE = 4  # draw at 4x and box-filter down: clean antialiased edges


@dataclass(frozen=True)
class Shape:
    """One shape; its bounding box is the square of half-side `radius` around (cx, cy), in pixels."""

    kind: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float

    def words(self, with_size: bool = True) -> str:
        """The shape's noun phrase: "a small red circle", or "a red circle" without the size."""
        return f"a {self.size} {self.colour} {self.kind}" if with_size else f"a {self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """One shape, or two shapes A, B such that `A relation B` holds."""

    shapes: tuple[Shape, ...]
    relation: str | None
    background: int  # grey level, white to very light grey
    noise_seed: int


def _make_shape(rng: np.random.Generator, image_size: int, colour: str | None = None) -> Shape:
    """A random shape at the image centre; the caller moves it into place."""
    size = str(rng.choice(list(SIZES)))
    return Shape(
        kind=str(rng.choice(KINDS)),
        colour=colour if colour is not None else str(rng.choice(list(COLOURS))),
        size=size,
        cx=image_size / 2,
        cy=image_size / 2,
        radius=SIZES[size] * image_size * rng.uniform(0.92, 1.08),
    )


def _make_scene(rng: np.random.Generator, image_size: int) -> Scene:
    s, margin = image_size, MARGIN * image_size
    background, noise_seed = int(rng.integers(238, 256)), int(rng.integers(2**31))
    if rng.random() < 1 / 3:
        shape = _make_shape(rng, s)
        lo, hi = margin + shape.radius, s - margin - shape.radius
        return Scene((replace(shape, cx=rng.uniform(lo, hi), cy=rng.uniform(lo, hi)),), None, background, noise_seed)

    # Different colours keep every caption unambiguous (and let the tests find each shape by colour).
    colour_a, colour_b = rng.choice(list(COLOURS), size=2, replace=False)
    a, b = _make_shape(rng, s, str(colour_a)), _make_shape(rng, s, str(colour_b))
    relation = str(rng.choice(list(INVERSE)))
    # Along the relation's axis: margin, first box, gap >= MIN_GAP, second box, margin; the slack is spread randomly.
    a_first = relation in ("left of", "above")
    r_first, r_second = (a.radius, b.radius) if a_first else (b.radius, a.radius)
    slack = s - 2 * margin - 2 * r_first - 2 * r_second - MIN_GAP * s
    extra_gap = rng.uniform(0, slack)
    first = margin + rng.uniform(0, slack - extra_gap) + r_first
    second = first + r_first + MIN_GAP * s + extra_gap + r_second
    along_a, along_b = (first, second) if a_first else (second, first)
    # Across it: both centres near a common line, offset by at most MAX_OFFSET.
    offset = rng.uniform(-MAX_OFFSET, MAX_OFFSET) * s
    lo = max(margin + a.radius - offset / 2, margin + b.radius + offset / 2)
    hi = min(s - margin - a.radius - offset / 2, s - margin - b.radius + offset / 2)
    centre = rng.uniform(lo, hi)
    across_a, across_b = centre + offset / 2, centre - offset / 2
    if relation in ("left of", "right of"):
        a, b = replace(a, cx=along_a, cy=across_a), replace(b, cx=along_b, cy=across_b)
    else:
        a, b = replace(a, cx=across_a, cy=along_a), replace(b, cx=across_b, cy=along_b)
    return Scene((a, b), relation, background, noise_seed)


def scene_captions(scene: Scene) -> list[str]:
    """Five differently worded captions of a scene."""
    if scene.relation is None:
        (shape,) = scene.shapes
        full = shape.words()
        return [full, f"{full} on a white background", f"there is {full}", shape.words(with_size=False),
                f"a single {full[2:]}"]
    a, b = scene.shapes
    rel, inv = scene.relation, INVERSE[scene.relation]
    return [
        f"{a.words()} {rel} {b.words()}",
        f"{a.words(False)} {rel} {b.words(False)}",
        f"{b.words()} {inv} {a.words()}",
        f"there is {a.words()} {rel} {b.words()}",
        f"{a.words()} and {b.words()}",
    ]


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """Draw a scene as an RGB image of image_size x image_size pixels."""
    k = SUPERSAMPLE
    canvas = Image.new("RGB", (image_size * k, image_size * k), (scene.background,) * 3)
    draw = ImageDraw.Draw(canvas)
    for shape in scene.shapes:
        x, y, r, fill = shape.cx * k, shape.cy * k, shape.radius * k, COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    pixels = np.asarray(canvas.reduce(k), dtype=np.float32)  # (S, S, 3)
    noise = np.random.default_rng(scene.noise_seed).normal(0, 1.5, size=pixels.shape[:2])[..., None]  # (S, S, 1)
    return Image.fromarray(np.clip(np.rint(pixels + noise), 0, 255).astype(np.uint8))


class SyntheticShapes(CaptionSource):
    """Deterministic shape scenes: sample i of a split comes from np.random.default_rng([seed, SPLIT_ID[split], i]).

    Captions are made here (only the scene layout, which is cheap); pixels are rendered in load_image.
    """

    def __init__(self, split: str, num_images: int, seed: int = 0, image_size: int = 128):
        if split not in SPLIT_ID:
            raise ValueError(f"synthetic split must be one of {list(SPLIT_ID)}, got {split!r}")
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels so the shapes stay recognisable, got {image_size}")
        self.split, self.seed, self.image_size = split, seed, image_size
        self.scenes = [
            _make_scene(np.random.default_rng([seed, SPLIT_ID[split], i]), image_size) for i in range(num_images)
        ]
        super().__init__([Sample(i, None, scene_captions(scene)) for i, scene in enumerate(self.scenes)])

    def load_image(self, i: int, min_size: int = 0) -> Image.Image:
        return render_scene(self.scenes[i], self.image_size)

    def write_images(self, folder: str | Path, count: int) -> list[Path]:
        """Save the first `count` images as PNGs in `folder` (created if needed); returns their paths."""
        if not 0 <= count <= len(self):
            raise ValueError(f"count must be between 0 and {len(self)} (the number of images), got {count}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(count):
            path = folder / f"shapes_{self.split}_{i:05d}.png"
            self.load_image(i).save(path)
            paths.append(path)
        return paths
