"""The built-in look-alike set: procedurally rendered, similar elongated objects (never downloaded).

Eight families of elongated objects (baton, flashlight, knife, screwdriver, pen, tube, chisel, syringe), each
in 8 variants: a variant is a fixed side-view silhouette with three binary design choices (e.g. for a knife:
handle length, cross-guard, drop or clip point), so the nearest neighbour of a class differs from it by one
small part. Colours are drawn per instance, not per class, so only shape tells the classes apart.

An instance is the class silhouette under a random pose (any angle, mirrored), scale, thickness, colours,
lighting, a cluttered background with stick-like distractors, occluders, a drop shadow, low resolution,
blur and noise. Rendering is analytic in numpy (each pixel is mapped back to the object's axis frame and
looked up in a sampled width profile) at 2x supersampling, a few ms per image; the same (seed, class,
index) always gives the same image.

Splits (64 classes): `novel` has 10 classes, two variants of each of five families that differ in one
design choice; `val` has 10 classes built the same way from other variants of the same five families (so val tasks
hold look-alike pairs, as novel tasks do); `base` has the remaining 44, every family among them.
"""

from __future__ import annotations

import colorsys
import functools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import DataError
from .base import ImageDataset
from .lookalike_shapes import ACCENT, BODY, DARK, EDGE, FAMILIES, HANDLE, METAL, N_ROLES, PROFILE_SAMPLES

__all__ = [
    "FAMILIES",
    "LookalikeDataset",
    "contact_sheet",
    "lookalike_classes",
    "render_lookalike",
]

# Instance nuisances. Tuned together with the families' design choices so that generic features stay far
# from 90% on the novel classes while features learnt on the base classes do clearly better (the hardness
# figures and the command are in datasets/README.md; re-measure after any change here).
LENGTH = (0.62, 0.92)  # object length as a share of the image side
WIDTH_SCALE = 1.25  # all family widths x this: about 3-6 px half-width at 96 px
THICKNESS = (0.9, 1.1)  # per-instance aspect jitter, so that widths alone do not name the class
CLUTTER = (2, 8)  # number of background shapes
STICK_SHARE = 0.25  # share of background shapes that are elongated distractors
OCCLUDER = 0.2  # probability of a blob over part of the scene
LOW_RES = (0.5, 1.2, 2.2)  # probability, then the range of the down-and-up scale factor
BLUR = (0.5, 0.3, 0.9)  # probability, then the range of the Gaussian sigma in pixels
NOISE = (0.005, 0.03)  # range of the sensor noise sigma (images in 0..1)


# Novel pairs differ in one design choice, so each novel class has a look-alike in the same split.
_NOVEL = {
    "baton": ("100", "101"),
    "flashlight": ("010", "011"),
    "knife": ("011", "001"),
    "screwdriver": ("110", "100"),
    "pen": ("101", "111"),
}
# Val holds look-alike pairs as novel does (model selection must see what the test measures): in each of the same
# five families, two variants that differ in the same design choice as that family's novel pair.
_VAL = {
    "baton": ("010", "011"),
    "flashlight": ("100", "101"),
    "knife": ("100", "110"),
    "screwdriver": ("001", "011"),
    "pen": ("010", "000"),
}
ALL_CLASSES = tuple(f"{family}-{v:03b}" for family in FAMILIES for v in range(8))


def lookalike_classes(split: str | None = None) -> list[str]:
    """Class names (`<family>-<abc>`, the three design bits) of a split ("base", "val", "novel") or all."""
    novel = [f"{f}-{v}" for f, pair in _NOVEL.items() for v in pair]
    val = [f"{f}-{v}" for f, pair in _VAL.items() for v in pair]
    if split is None:
        return list(ALL_CLASSES)
    if split == "novel":
        return novel
    if split == "val":
        return val
    if split == "base":
        return [c for c in ALL_CLASSES if c not in novel and c not in val]
    raise DataError(f"unknown look-alike split '{split}'; choose 'base', 'val' or 'novel'")


@functools.cache
def _profile(class_name: str) -> dict[str, np.ndarray]:
    family, bits = class_name.split("-")
    return FAMILIES[family](*(int(b) for b in bits)).profile()


def _hsv(rng: np.random.Generator, h, s, v) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.uniform(*h), rng.uniform(*s), rng.uniform(*v)))


def _palette(rng: np.random.Generator) -> np.ndarray:
    """One colour per role, drawn per instance so that colour carries no class information."""

    def painted() -> np.ndarray:
        kind = rng.random()
        if kind < 0.2:  # black plastic or rubber
            return _hsv(rng, (0, 1), (0, 0.3), (0.06, 0.2))
        if kind < 0.35:  # wood
            return _hsv(rng, (0.05, 0.1), (0.45, 0.75), (0.3, 0.65))
        return _hsv(rng, (0, 1), (0.25, 0.95), (0.2, 0.95))

    palette = np.zeros((N_ROLES, 3), dtype=np.float32)
    metal = _hsv(rng, (0, 1), (0, 0.12), (0.45, 0.85))
    palette[HANDLE], palette[BODY], palette[ACCENT] = painted(), painted(), painted()
    palette[METAL] = metal
    palette[DARK] = _hsv(rng, (0, 1), (0, 0.4), (0.04, 0.25))
    palette[EDGE] = np.clip(metal * 1.25 + 0.08, 0, 1)
    return palette


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth colour field with random clutter, including stick-like distractors."""
    # A surface of one muted colour with uneven light, as on a table or a floor.
    base = _hsv(rng, (0, 1), (0, 0.5), (0.25, 0.9))
    grid = np.clip(base + rng.normal(0, 0.1, (3, 3, 3)), 0, 1)
    canvas = Image.fromarray(np.uint8(grid * 255), "RGB").resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(CLUTTER[0], CLUTTER[1] + 1))):
        colour = tuple(int(x) for x in _hsv(rng, (0, 1), (0, 0.8), (0.1, 0.95)) * 255)
        x0, y0, x1, y1 = (float(x) for x in rng.uniform(-0.1, 1.1, 4) * size)
        kind = 3 if rng.random() < STICK_SHARE else rng.integers(0, 3)
        width = int(rng.integers(1, max(2, size // 40)))
        if kind == 0:
            draw.line((x0, y0, x1, y1), fill=colour, width=width)
        elif kind == 1:
            draw.ellipse((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), outline=colour, width=width,
                         fill=colour if rng.random() < 0.5 else None)  # fmt: skip
        elif kind == 2:
            draw.rectangle((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), outline=colour, width=width,
                           fill=colour if rng.random() < 0.5 else None)  # fmt: skip
        else:  # a stick: an elongated distractor with the same aspect as the objects
            angle = rng.uniform(0, math.pi)
            length, half = rng.uniform(0.2, 0.6) * size, rng.uniform(0.01, 0.04) * size
            dx, dy = math.cos(angle), math.sin(angle)
            corners = [(x0 + sx * dx * length / 2 - sy * dy * half, y0 + sx * dy * length / 2 + sy * dx * half)
                       for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]  # fmt: skip
            draw.polygon(corners, fill=colour)
    return canvas


def _draw_object(canvas: np.ndarray, profile: dict[str, np.ndarray], rng: np.random.Generator) -> None:
    """Paint one object into the float HxWx3 canvas, in place."""
    size = canvas.shape[0]
    angle = rng.uniform(0, 2 * math.pi)
    mirror = rng.choice((-1.0, 1.0))
    length = size * rng.uniform(*LENGTH)
    thickness = rng.uniform(*THICKNESS) * WIDTH_SCALE
    cx, cy = size * (0.5 + rng.uniform(-0.08, 0.08, 2))
    cos, sin = math.cos(angle), math.sin(angle)
    shift = np.maximum(1, (rng.uniform(0.01, 0.04, 2) * size).astype(int)) * rng.choice((-1, 1), 2)
    # Work only in the object's bounding box (plus the shadow offset): a quarter of the pixels on average.
    half_width = profile["reach"] * thickness
    reach = length * (0.5 * abs(np.array([cos, sin])) + half_width * abs(np.array([sin, cos]))) + abs(shift) + 2
    x0, y0 = np.maximum(0, np.floor(np.array([cx, cy]) - reach).astype(int))
    x1, y1 = np.minimum(size, np.ceil(np.array([cx, cy]) + reach).astype(int))
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    dx, dy = xs - cx, ys - cy
    u = (dx * cos + dy * sin) / length + 0.5
    v = mirror * (dy * cos - dx * sin) / (length * thickness)
    idx = np.clip((u * PROFILE_SAMPLES).astype(np.int64), 0, PROFILE_SAMPLES - 1)
    top, bottom = profile["top"][idx], profile["bottom"][idx]
    role = np.where((u >= 0) & (u < 1) & (v <= top) & (v >= bottom), profile["role"][idx], 0)
    inside = role > 0
    across = (v - bottom) / np.maximum(top - bottom, 1e-6)  # 0..1 across the local width, for shading
    for u0, u1, f0, f1, r in profile["stripes"]:
        role[inside & (u >= u0) & (u < u1) & (across >= f0) & (across <= f1)] = int(r)
    for u0, u1, v0, v1, r in profile["rects"]:
        hit = (u >= u0) & (u < u1) & (v >= v0) & (v <= v1)
        role[hit], across[hit], inside = int(r), ((v - v0) / (v1 - v0))[hit], inside | hit
    for uc, vc, radius, r in profile["dots"]:
        hit = (u - uc) ** 2 + ((v - vc) * thickness) ** 2 <= radius**2
        role[hit], across[hit], inside = int(r), (0.5 + (v - vc) * thickness / (2 * radius))[hit], inside | hit

    box = canvas[y0:y1, x0:x1]  # a view: writes land in the canvas
    if rng.random() < 0.6:  # a drop shadow on the background
        shadow = np.roll(inside, (int(shift[1]), int(shift[0])), axis=(0, 1)) & ~inside
        box[shadow] *= rng.uniform(0.5, 0.8)

    # Cylinder shading: the surface normal across the width, lit from a random side, plus a highlight.
    normal_x = 2 * np.clip(across[inside], 0, 1) - 1
    normal_z = np.sqrt(np.maximum(0.0, 1 - normal_x**2))
    light = rng.uniform(-0.8, 0.8)
    diffuse = np.clip(normal_x * light + normal_z * math.sqrt(1 - light**2), 0, 1)
    ambient = rng.uniform(0.25, 0.5)
    shade = ambient + (1 - ambient) * diffuse
    palette = _palette(rng)
    shine = (diffuse ** rng.uniform(8, 30)) * rng.uniform(0.1, 0.5)
    box[inside] = palette[role[inside]] * shade[:, None] + shine[:, None]


def render_lookalike(class_name: str, index: int, image_size: int = 96, seed: int = 0) -> np.ndarray:
    """Render instance `index` of a look-alike class as an HxWx3 uint8 image; same arguments, same image.

    Args:
        class_name: One of `lookalike_classes()`, e.g. "knife-011".
        index: Instance number; any non-negative int.
        image_size: Output side in pixels (rendered at twice that, then averaged down).
        seed: Data seed; instance streams of different seeds are independent.

    Example:
        >>> image = render_lookalike("pen-101", 0, image_size=64)
        >>> image.shape, image.dtype
        ((64, 64, 3), dtype('uint8'))
    """
    if class_name not in ALL_CLASSES:
        raise DataError(f"unknown look-alike class '{class_name}'; see lookalike_classes()")
    rng = np.random.default_rng([seed, ALL_CLASSES.index(class_name), index])
    big = 2 * image_size
    background = _background(rng, big)
    canvas = np.asarray(background, dtype=np.float32) / 255.0
    _draw_object(canvas, _profile(class_name), rng)
    # 2x2 box average: anti-aliased edges at the output size.
    image = canvas.reshape(image_size, 2, image_size, 2, 3).mean(axis=(1, 3))
    pil = Image.fromarray(np.uint8(np.clip(image, 0, 1) * 255 + 0.5))
    if rng.random() < OCCLUDER:  # a blob over part of the scene
        draw = ImageDraw.Draw(pil)
        x, y = rng.uniform(0, image_size, 2)
        r = rng.uniform(0.06, 0.16) * image_size
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    if rng.random() < LOW_RES[0]:  # low resolution: down and back up
        small = max(8, int(image_size / rng.uniform(*LOW_RES[1:])))
        pil = pil.resize((small, small), Image.BILINEAR).resize((image_size, image_size), Image.BILINEAR)
    if rng.random() < BLUR[0]:
        pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(*BLUR[1:])))
    image = np.asarray(pil, dtype=np.float32) / 255.0
    # Camera response: per-channel gain (white balance), gamma, then sensor noise.
    image = np.clip(image * rng.uniform(0.85, 1.15, 3), 0, 1) ** rng.uniform(0.75, 1.3)
    image = image + rng.normal(0.0, rng.uniform(*NOISE), image.shape)
    return np.uint8(np.clip(image, 0, 1) * 255 + 0.5)


class LookalikeDataset(ImageDataset):
    """The look-alike set: `images_per_class` rendered instances of each class of a split.

    Args:
        split: "base" (44 classes), "val" (10) or "novel" (10).
        images_per_class: Instances per class; 60 leaves room for 20-shot episodes with 40 queries.
        image_size: Side of the square images in pixels.
        seed: Data seed: changes every instance, never the classes.
        transform: Applied to each HxWx3 uint8 image in `__getitem__`.
        cache: Keep rendered images in memory (about 27 kB each at 96 px) instead of re-rendering.

    Example:
        >>> novel = LookalikeDataset("novel", images_per_class=20, image_size=64)
        >>> len(novel.classes), len(novel)
        (10, 200)
    """

    def __init__(
        self,
        split: str = "base",
        images_per_class: int = 60,
        image_size: int = 96,
        seed: int = 0,
        *,
        transform=None,
        cache: bool = False,
    ) -> None:
        if images_per_class < 1 or image_size < 16:
            raise DataError(f"need images_per_class >= 1 and image_size >= 16, got {images_per_class}, {image_size}")
        self.split = split
        self.classes = lookalike_classes(split)
        self.images_per_class = images_per_class
        self.image_size = image_size
        self.seed = seed
        self.transform = transform
        self.targets = [c for c in range(len(self.classes)) for _ in range(images_per_class)]
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def load(self, index: int) -> np.ndarray:
        if self._cache is not None and index in self._cache:
            return self._cache[index].copy()
        label, instance = divmod(index, self.images_per_class)
        image = render_lookalike(self.classes[label], instance, self.image_size, self.seed)
        if self._cache is not None:
            self._cache[index] = image.copy()
        return image


def contact_sheet(
    classes: Sequence[str],
    per_class: int = 8,
    image_size: int = 64,
    seed: int = 0,
    label_width: int = 96,
) -> np.ndarray:
    """A grid with one row per class (name on the left) and `per_class` instances, as HxWx3 uint8."""
    rows = []
    for name in classes:
        label = Image.new("RGB", (label_width, image_size), "white")
        ImageDraw.Draw(label).text((4, image_size // 2 - 6), name, fill="black")
        tiles = [np.asarray(label)] + [render_lookalike(name, i, image_size, seed) for i in range(per_class)]
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)
