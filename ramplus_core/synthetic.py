"""A synthetic image-tag-text dataset: coloured shapes on textured backgrounds, with tags and captions.

Made for tests and demos that train a tiny RAM++ from scratch: every tag is visible at 64 x 64 pixels
(colours are far apart, backgrounds are neutral so they never look like an object colour), and every image
comes with the three things RAM++ trains on: tags, captions, and tag descriptions for the open-set text side.

Two generators, chosen by ``version`` (a dataset records the one that drew it):

- v2 (the default): one or two objects that never touch, 30-70% of the side, and three shapes that differ
  in their local structure (a filled ``circle``, a hollow ``ring``, a long ``bar``). A tiny Swin trained
  from scratch on 2 CPU cores learns all three groups in minutes (held-out shape AP ~0.87 after 25 epochs of
  3,200 scenes, see bench/RESULTS.md).
- v1: one to four objects that may overlap by a quarter, 20-50% of the side, five rotated shapes (circle,
  square, triangle, star, cross). Still drawn bit-identically for old seeds; its shapes stay near chance
  for a tiny Swin in a 15-minute CPU budget, which is why v2 exists.

Tags of an image are the colours and shapes of its objects plus its background; the first caption names
every one of them. Scene ``i`` of ``generate(n, seed)`` depends only on ``(seed, i)``, so any shard can be
regenerated on its own and a larger ``n`` only appends. Output is bit-identical for the same seed with the
same Pillow and NumPy versions.

Reading order: the tag vocabulary and its descriptions (data), the scene types, drawing (backgrounds,
shapes, placement, captions), and the generator.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "GENERATORS",
    "GENERATOR_VERSION",
    "GeneratorSpec",
    "SHAPES",
    "SHAPES_V1",
    "TAGS",
    "TAG_GROUPS",
    "Scene",
    "SceneObject",
    "describe_tags",
    "draw_scene",
    "generate",
    "scene_seed",
    "tag_groups",
]

# Bump when a change alters the pixels, tags or captions a seed produces (written into dataset metadata).
GENERATOR_VERSION = 2

# --------------------------------------------------------------------------------------------------------------
# The tag vocabulary, as data
# --------------------------------------------------------------------------------------------------------------

# Saturated and at least ~100 apart in RGB from each other and from every background, so that JPEG,
# the per-object jitter and a 64 px resize never make one look like another.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "orange": (250, 130, 0),
    "yellow": (245, 225, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "purple": (150, 55, 195),
}
SHAPES_V1: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# v2: shapes a patch-based encoder tells apart from local structure (filled, hollow, elongated).
SHAPES: tuple[str, ...] = ("circle", "ring", "bar")
# Neutral (or, for sand, desaturated) base colours with their own texture; none is near an object colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white background": (236, 236, 236),
    "black background": (22, 22, 24),
    "gray background": (124, 124, 124),
    "sand background": (212, 190, 145),
}



@dataclass(frozen=True)
class GeneratorSpec:
    """What one generator version draws, as data."""

    version: int
    shapes: tuple[str, ...]
    min_objects: int  # every count from min to max is equally likely
    max_objects: int
    diameter: dict[int, tuple[float, float]]  # circumscribed diameter as a fraction of the side, by object count
    rotate: bool  # random rotation of non-circular shapes
    min_visible: float  # every object keeps this fraction of its pixels uncovered (1.0: objects never touch)


GENERATORS: dict[int, GeneratorSpec] = {
    1: GeneratorSpec(1, SHAPES_V1, 1, 4, {1: (0.30, 0.50), 2: (0.26, 0.46), 3: (0.24, 0.42), 4: (0.24, 0.38)},
                     rotate=True, min_visible=0.75),
    2: GeneratorSpec(2, SHAPES, 1, 2, {1: (0.45, 0.70), 2: (0.34, 0.52)}, rotate=False, min_visible=1.0),
}


def spec(version: int) -> GeneratorSpec:
    try:
        return GENERATORS[version]
    except KeyError:
        raise ValueError(f"unknown generator version {version}; known: {', '.join(map(str, GENERATORS))}") from None


def tag_groups(version: int = GENERATOR_VERSION) -> dict[str, list[str]]:
    """The tags of a generator version by group: colour, shape, background."""
    return {"colour": list(COLOURS), "shape": list(spec(version).shapes), "background": list(BACKGROUNDS)}


TAG_GROUPS: dict[str, list[str]] = tag_groups()
TAGS: list[str] = [tag for group in TAG_GROUPS.values() for tag in group]

_HINTS: dict[str, str] = {
    "red": "the colour of a ripe tomato or a stop sign",
    "orange": "the colour of an orange fruit, between red and yellow",
    "yellow": "the colour of a lemon or a school bus",
    "green": "the colour of fresh grass or a leaf",
    "blue": "the deep colour of a clear sky or the sea",
    "purple": "the colour of a violet or an aubergine, between red and blue",
    "circle": "a round disc with no corners and a smooth edge",
    "square": "a shape with four equal straight sides and four right angles",
    "triangle": "a shape with three straight sides and three sharp corners",
    "star": "a five-pointed star with sharp spikes around a centre",
    "cross": "a plus sign made of two bars crossing at right angles",
    "ring": "a hollow circle, a thick round band around an empty middle",
    "bar": "a long, narrow horizontal strip with square ends",
    "white background": "a bright, almost white surface with faint soft shading",
    "black background": "a dark, nearly black surface with faint grain",
    "gray background": "a mid-gray, concrete-like surface with a rough texture",
    "sand background": "a beige, grainy surface like sand with soft ripples",
}


def describe_tags(version: int = GENERATOR_VERSION) -> dict[str, list[str]]:
    """Five short visual descriptions per tag, in the spirit of RAM++'s LLM-written tag descriptions."""
    groups = tag_groups(version)
    out: dict[str, list[str]] = {}
    for colour in groups["colour"]:
        out[colour] = [
            f"{_article(colour)} {colour} object.",
            f"something coloured bright {colour}.",
            f"a flat shape filled with solid {colour}.",
            f"{_HINTS[colour]}.",
            f"a {colour} patch that stands out from the background.",
        ]
    for shape in groups["shape"]:
        out[shape] = [
            f"a {shape}.",
            f"a flat {shape} shape.",
            f"{_HINTS[shape]}.",
            f"a simple geometric {shape} silhouette.",
            f"a {shape} drawn in one solid colour.",
        ]
    for background in groups["background"]:
        word = background.removesuffix(" background")
        out[background] = [
            f"a plain {word} background.",
            f"a {word} backdrop behind the shapes.",
            f"{_HINTS[background]}.",
            f"an image whose background is {word}.",
            f"the empty {word} area around the objects.",
        ]
    return out


# --------------------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; geometry in pixels of the scene image (``radius``: of the circumscribed circle)."""

    colour: str
    shape: str
    center: tuple[float, float]
    radius: float
    angle: float  # degrees
    visible: float  # fraction of its pixels not covered by objects drawn later


@dataclass(frozen=True)
class Scene:
    """An image with its tags (sorted, unique) and 3 captions; the first caption names every tag."""

    image: Image.Image
    tags: list[str]
    captions: list[str]
    background: str
    objects: tuple[SceneObject, ...]  # in drawing order, back to front


# --------------------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------------------

_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth edges, deterministic
_COLOUR_JITTER = 10  # per channel, per object
_PIXEL_NOISE = 3.0  # standard deviation, whole image
_RING_HOLE = 0.55  # inner radius of a ring, as a fraction of its outer radius
_BAR_HALF_WIDTH = 0.25  # of a bar's half-length


def scene_seed(seed: int, index: int) -> int:
    """The seed of scene ``index`` of a dataset: a hash of both, so scenes are independent of each other."""
    digest = hashlib.sha256(f"ramplus-synthetic:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _smooth_field(nrng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a ``cells`` x ``cells`` grid, bicubically upsampled."""
    grid = nrng.normal(0.0, 0.5, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))


def _background(name: str, size: int, nrng: np.random.Generator) -> np.ndarray:
    """H x W x 3 float32 pixels of one background texture."""
    base = np.array(BACKGROUNDS[name], np.float32)
    shade = _smooth_field(nrng, size, 4)
    if name == "white background":
        light = 8.0 * shade
    elif name == "black background":
        light = 6.0 * shade + nrng.normal(0.0, 3.0, (size, size))
    elif name == "gray background":  # concrete: blotches plus coarse grain
        light = 10.0 * shade + 8.0 * _smooth_field(nrng, size, 16) + nrng.normal(0.0, 6.0, (size, size))
    else:  # sand: diagonal ripples plus fine grain
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        phase, freq = nrng.uniform(0, 2 * np.pi), nrng.uniform(5.0, 8.0)
        light = 7.0 * np.sin(2 * np.pi * freq * (xx + 0.6 * yy) + phase + 1.5 * shade) + nrng.normal(0.0, 8.0, (size, size))
    return base[None, None, :] + light[..., None].astype(np.float32)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape with circumradius ``r`` (``angle`` in degrees), for all shapes but the circle."""
    if shape == "square":
        points = [(r, 45 + 90 * k) for k in range(4)]
    elif shape == "triangle":
        points = [(r, -90 + 120 * k) for k in range(3)]
    elif shape == "star":
        points = [(r if k % 2 == 0 else 0.42 * r, -90 + 36 * k) for k in range(10)]
    elif shape == "cross":  # arms of half-width w reaching r: 12 corners
        w = 0.3 * r
        corners = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        points = [(float(np.hypot(x, y)), float(np.degrees(np.arctan2(y, x)))) for x, y in corners]
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(dict.fromkeys(SHAPES_V1 + SHAPES))}")
    return [
        (cx + rho * np.cos(np.radians(phi + angle)), cy + rho * np.sin(np.radians(phi + angle))) for rho, phi in points
    ]


def _coverage(shape: str, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    """Anti-aliased coverage of one shape, H x W float32 in [0, 1]."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    if shape in ("circle", "ring"):
        rc = 0.9 * r  # a disc of the full circumradius looks bigger than the polygons
        draw.ellipse([(cx - rc) * s, (cy - rc) * s, (cx + rc) * s, (cy + rc) * s], fill=255)
        if shape == "ring":
            ri = _RING_HOLE * rc
            draw.ellipse([(cx - ri) * s, (cy - ri) * s, (cx + ri) * s, (cy + ri) * s], fill=0)
    elif shape == "bar":  # horizontal: v2 draws upright shapes
        w = _BAR_HALF_WIDTH * r
        draw.rectangle([(cx - r) * s, (cy - w) * s, (cx + r) * s, (cy + w) * s], fill=255)
    else:
        draw.polygon([(x * s, y * s) for x, y in _polygon(shape, cx, cy, r, angle)], fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


@dataclass(frozen=True)
class _Placed:
    colour: str
    shape: str
    cx: float
    cy: float
    r: float
    angle: float
    cover: np.ndarray  # anti-aliased coverage, H x W in [0, 1]


def _place(
    rng: random.Random, count: int, size: int, gen: GeneratorSpec, colours: list[str]
) -> list[tuple[_Placed, float]]:
    """Objects one by one, each at a random spot that leaves every earlier one visible enough.

    Returns each object with the fraction of its pixels still visible once all are drawn.
    """
    lo, hi = gen.diameter[count]
    placed: list[_Placed] = []
    visible: list[np.ndarray] = []
    for _ in range(count):
        colour, shape = rng.choice(colours), rng.choice(gen.shapes)
        for attempt in range(200):
            shrink = 1.0 - 0.15 * min(attempt / 100, 1.0)  # a crowded scene falls back to smaller objects
            r = rng.uniform(lo, hi) * shrink * size / 2
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            angle = rng.uniform(0.0, 360.0) if gen.rotate and shape != "circle" else 0.0
            cover = _coverage(shape, cx, cy, r, angle, size)
            mask = cover > 0.5
            if gen.min_visible >= 1.0:  # apart: not even the anti-aliased edges touch
                if not any(((cover > 0.0) & (p.cover > 0.0)).any() for p in placed):
                    break
                continue
            if all((v & ~mask).sum() >= gen.min_visible * (p.cover > 0.5).sum() for v, p in zip(visible, placed)):
                break
        else:  # practically unreachable; keep the scene valid by drawing fewer objects
            break
        visible = [v & ~mask for v in visible] + [mask]
        placed.append(_Placed(colour, shape, cx, cy, r, angle, cover))
    return [(p, float(v.sum() / max((p.cover > 0.5).sum(), 1))) for p, v in zip(placed, visible)]


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x")) else "s")


_COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _captions(rng: random.Random, objects: tuple[SceneObject, ...], background: str) -> list[str]:
    """Three captions: left to right with repeats counted (names every tag), then two paraphrases."""
    by_x = sorted(objects, key=lambda o: o.center[0])
    counts = Counter((o.colour, o.shape) for o in by_x)
    grouped = [
        f"{_article(c)} {c} {s}" if k == 1 else f"{_COUNT_WORDS[k]} {c} {_plural(s)}" for (c, s), k in counts.items()
    ]
    singles = [f"{_article(o.colour)} {o.colour} {o.shape}" for o in objects]
    rng.shuffle(singles)
    noun = "shape" if len(objects) == 1 else "shapes"
    return [
        f"{_join(grouped)} on {_article(background)} {background}",
        f"{_article(background)} {background} with {_join(singles)}",
        f"{_COUNT_WORDS[len(objects)]} {noun} on a {background.removesuffix(' background')} surface: {_join(grouped)}",
    ]


def draw_scene(
    rng: random.Random | int, size: int = 128, *, version: int = GENERATOR_VERSION, colours: Sequence[str] | None = None
) -> Scene:
    """One scene: a textured background and objects of the generator ``version``; deterministic by seed.

    ``colours`` restricts the object colours to a subset (e.g. to hold some back for a fine-tuning test).
    """
    gen = spec(version)
    if size < 32:
        raise ValueError(f"size {size} is too small to draw recognisable shapes; use 32 or more")
    palette = list(COLOURS) if colours is None else list(colours)
    unknown = [c for c in palette if c not in COLOURS]
    if unknown or not palette:
        raise ValueError(f"colours must be a non-empty subset of {', '.join(COLOURS)} (got {palette})")
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    nrng = np.random.default_rng(rng.getrandbits(64))
    background = rng.choice(list(BACKGROUNDS))
    pixels = _background(background, size, nrng)
    objects: list[SceneObject] = []
    for p, visible in _place(rng, rng.randint(gen.min_objects, gen.max_objects), size, gen, palette):
        rgb = np.array(COLOURS[p.colour], np.float32) + [rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER) for _ in range(3)]
        alpha = p.cover[..., None]
        pixels = pixels * (1.0 - alpha) + rgb[None, None, :] * alpha
        objects.append(SceneObject(p.colour, p.shape, (p.cx, p.cy), p.r, p.angle, visible))
    pixels += nrng.normal(0.0, _PIXEL_NOISE, pixels.shape)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    drawn = tuple(objects)
    tags = sorted({o.colour for o in drawn} | {o.shape for o in drawn} | {background})
    return Scene(image=image, tags=tags, captions=_captions(rng, drawn, background), background=background, objects=drawn)


# --------------------------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------------------------


def generate(
    n: int, seed: int = 0, size: int = 128, start: int = 0, *, version: int = GENERATOR_VERSION,
    colours: Sequence[str] | None = None,
) -> Iterator[Scene]:
    """Scenes ``start`` .. ``start + n - 1`` of the dataset ``seed``; scene i depends only on (seed, i)."""
    spec(version)  # an unknown version fails here, not at the first scene
    for index in range(start, start + n):
        yield draw_scene(scene_seed(seed, index), size, version=version, colours=colours)
