"""Toy world: procedurally generated 64x64 images of one coloured shape on a plain background.

Every image is drawn by code from a seed (nothing is stored), with a caption such as
"a small red circle at the top left". The base model is trained on circles, squares and
triangles; the held-out *concept* is a five-pointed star, which captions call by the rare
CLIP token ``sks`` ("a large blue sks at the center"), so a LoRA has something genuinely new to learn.

Public API:
    COLORS, SHAPES, CONCEPT_SHAPE, CONCEPT_TOKEN, SIZES, POSITIONS, BACKGROUND, RESOLUTION
    Scene                                   -- one image's parameters
    sample_scene(rng, shapes) -> Scene      -- random scene (jittered position/size)
    render(scene, res) -> PIL.Image         -- draw it (anti-aliased, deterministic)
    caption(scene, ...) -> str              -- its caption
    make_samples(n, seed, concept) -> list[(Image, str)]
    write_folder(folder, n, seed, concept) -> list[Path]   -- kohya-style img + .txt pairs
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

RESOLUTION = 64
BACKGROUND = (235, 235, 235)  # neutral light grey: zero saturation, so any saturated pixel is "the shape"
# Six saturated colours about 60 degrees of hue apart, so a pixel's hue names its colour unambiguously.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (230, 200, 20),
    "green": (30, 170, 50),
    "cyan": (20, 185, 210),
    "blue": (30, 60, 220),
    "magenta": (205, 40, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")  # what the base model is trained on
CONCEPT_SHAPE = "star"  # never shown to the base model
CONCEPT_TOKEN = "sks"  # the word captions use for the concept (CLIP id 48136, one token)
SIZES: dict[str, float] = {"small": 10.0, "large": 18.0}  # half-width of the shape's box, in pixels at 64 px
# Position name -> (x, y) as fractions of the free range (0 = as far left/top as the shape fits).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.0, 0.0),
    "top right": (1.0, 0.0),
    "center": (0.5, 0.5),
    "bottom left": (0.0, 1.0),
    "bottom right": (1.0, 1.0),
}


@dataclass(frozen=True)
class Scene:
    """Parameters of one toy image; ``cx, cy, r`` are in units of a 64 px canvas."""

    shape: str
    color: str
    size: str
    position: str
    cx: float
    cy: float
    r: float


def _center(position: str, r: float, res: int = RESOLUTION) -> tuple[float, float]:
    "Pixel centre for a named position, keeping a shape of half-width `r` (+3 px margin) inside the canvas."
    fx, fy = POSITIONS[position]
    margin = r + 3.0
    span = res - 2 * margin
    return margin + fx * span, margin + fy * span


def sample_scene(rng: random.Random, shapes: tuple[str, ...] = SHAPES) -> Scene:
    "Draw a random scene: uniform shape/colour/size/position, then +-2 px position and +-8% size jitter."
    shape = rng.choice(shapes)
    color = rng.choice(list(COLORS))
    size = rng.choice(list(SIZES))
    position = rng.choice(list(POSITIONS))
    r = SIZES[size] * rng.uniform(0.92, 1.08)
    cx, cy = _center(position, r)
    return Scene(shape, color, size, position, cx + rng.uniform(-2, 2), cy + rng.uniform(-2, 2), r)


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape inside the box [cx-r, cx+r] x [cy-r, cy+r]; None for the circle.

    square: side 1.7 r (so its area is close to the circle's); triangle: points up, spans the box width;
    star: five points, outer radius r, inner radius 0.5 r (fat enough to survive a blurry generator)."""
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.5 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + 0.05 * r + rad * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES + (CONCEPT_SHAPE,)}")


def random_blob(rng: random.Random, res: int = RESOLUTION, supersample: int = 4) -> Image.Image:
    """A random star-shaped polygon (3-10 vertices at jittered even angles and radii 0.3-1 r) in a random palette colour.

    Only for training the VAE as a generic codec of flat shapes, so it can later reconstruct the held-out
    concept without ever having seen it; the diffusion model never sees these."""
    r = rng.uniform(7, 20)
    cx, cy = rng.uniform(r + 1, res - r - 1), rng.uniform(r + 1, res - r - 1)
    k = rng.randint(3, 10)
    a0 = rng.uniform(0, 2 * math.pi)
    angles = [a0 + (i + rng.uniform(-0.3, 0.3)) * 2 * math.pi / k for i in range(k)]
    s = supersample
    pts = [((cx + rng.uniform(0.3, 1) * r * math.cos(a)) * s, (cy + rng.uniform(0.3, 1) * r * math.sin(a)) * s)
           for a in angles]
    big = Image.new("RGB", (res * s,) * 2, BACKGROUND)
    ImageDraw.Draw(big).polygon(pts, fill=COLORS[rng.choice(list(COLORS))])
    return big.resize((res, res), Image.Resampling.BOX)


def render(scene: Scene, res: int = RESOLUTION, supersample: int = 4) -> Image.Image:
    "Draw `scene` as an RGB image of `res` x `res` px (drawn `supersample`x larger and downscaled = anti-aliasing)."
    s = supersample * res / RESOLUTION
    big = Image.new("RGB", (res * supersample,) * 2, BACKGROUND)
    draw = ImageDraw.Draw(big)
    cx, cy, r = scene.cx * s, scene.cy * s, scene.r * s
    poly = shape_polygon(scene.shape, cx, cy, r)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[scene.color])
    else:
        draw.polygon(poly, fill=COLORS[scene.color])
    return big.resize((res, res), Image.Resampling.BOX)


def caption(scene: Scene, with_size: bool = True, with_position: bool = True, token: str = CONCEPT_TOKEN) -> str:
    "Caption such as 'a small red circle at the top left'; the concept shape is called `token`."
    word = token if scene.shape == CONCEPT_SHAPE else scene.shape
    parts = ["a"] + ([scene.size] if with_size else []) + [scene.color, word]
    if with_position:
        parts += ["at the", scene.position]
    return " ".join(parts)


def random_caption(scene: Scene, rng: random.Random, p_drop: float = 0.25) -> str:
    "Caption that leaves out the size and/or position with probability `p_drop` each (so short prompts work)."
    return caption(scene, with_size=rng.random() >= p_drop, with_position=rng.random() >= p_drop)


def make_samples(n: int, seed: int = 0, concept: bool = False, p_drop: float = 0.0,
                 res: int = RESOLUTION) -> list[tuple[Image.Image, str]]:
    "`n` (image, caption) pairs, deterministic in `seed`; `concept=True` draws only the concept shape."
    rng = random.Random(seed)
    shapes = (CONCEPT_SHAPE,) if concept else SHAPES
    out = []
    for _ in range(n):
        sc = sample_scene(rng, shapes)
        out.append((render(sc, res), random_caption(sc, rng, p_drop)))
    return out


def write_folder(folder: str | Path, n: int = 16, seed: int = 0, concept: bool = True, res: int = RESOLUTION) -> list[Path]:
    """Write `n` images as `folder/000.png` + `folder/000.txt` (caption), the kohya/sd-scripts image-folder layout.

    Name the folder like kohya's DreamBooth convention, e.g. `train/10_sks` (10 repeats)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, cap) in enumerate(make_samples(n, seed, concept, res=res)):
        p = folder / f"{i:03d}.png"
        img.save(p)
        p.with_suffix(".txt").write_text(cap + "\n")
        paths.append(p)
    return paths


if __name__ == "__main__":  # contact sheet for a quick look
    import sys

    samples = make_samples(24, seed=1) + make_samples(8, seed=2, concept=True)
    sheet = Image.new("RGB", (8 * 64, 4 * 64))
    for i, (im, cap) in enumerate(samples):
        sheet.paste(im, ((i % 8) * 64, (i // 8) * 64))
        print(cap)
    sheet.resize((8 * 128, 4 * 128), Image.Resampling.NEAREST).save(sys.argv[1] if len(sys.argv) > 1 else "sheet.png")
