"""Checker: read colour, shape, size and position back from a (generated) toy-world image.

Pure heuristics on pixels, no learned weights:
* foreground = saturated pixels (the background is neutral grey), largest 4-connected blob;
* colour = majority vote of the blob pixels' hue against the palette hues;
* shape = the blob's mask cropped to its bounding box, resized to 16x16 and compared with the mean
  mask of each shape (circle/square/triangle and the concept star) drawn by `toyworld` -- nearest template wins;
* size = blob bounding-box width vs the two toy sizes; position = blob centre vs the named positions.

Public API:
    analyze(img) -> dict(color, shape, size, position, area)
    foreground_mask(img) -> np.ndarray[bool];  dominant_color(img) -> str | None;  shape_of(img) -> str | None
    accuracy_on_toy(n, seed, concept) -> dict of accuracies on real toy images (should be 1.0)
"""
from __future__ import annotations

import colorsys
import random
from collections import deque
from functools import lru_cache

import numpy as np
from PIL import Image

import toyworld as tw

SAT_MIN = 0.3  # a pixel is foreground if its HSV saturation exceeds this (background saturation is 0)
VAL_MIN = 0.15  # ... and it is not near-black (hue of dark noise is meaningless)
MIN_AREA = 12  # blobs smaller than this many pixels (at 64 px) count as "nothing drawn"
TEMPLATE = 16  # side of the normalised shape mask compared with the templates
ALL_SHAPES = tw.SHAPES + (tw.CONCEPT_SHAPE,)


def _rgb01(img: Image.Image | np.ndarray) -> np.ndarray:
    "Image as float array (H, W, 3) in [0, 1], resized to the toy resolution."
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img if img.dtype == np.uint8 else (np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    img = img.convert("RGB")
    if img.size != (tw.RESOLUTION, tw.RESOLUTION):
        img = img.resize((tw.RESOLUTION, tw.RESOLUTION), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


def _saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    "HSV saturation and value per pixel."
    mx, mn = rgb.max(-1), rgb.min(-1)
    return (mx - mn) / np.maximum(mx, 1e-6), mx


def _hue(rgb: np.ndarray) -> np.ndarray:
    "HSV hue in degrees [0, 360) per pixel (undefined -> 0 for grey pixels)."
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    d = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return (h * 60.0) % 360.0


def largest_component(mask: np.ndarray) -> np.ndarray:
    "Largest 4-connected region of a boolean mask (breadth-first flood fill; 64x64 takes ~ms)."
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp, q = [], deque([(y0, x0)])
        seen[y0, x0] = True
        while q:
            y, x = q.popleft()
            comp.append((y, x))
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    q.append((yy, xx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def foreground_mask(img: Image.Image | np.ndarray) -> np.ndarray:
    "Boolean mask of the shape: the largest blob of saturated, not-dark pixels."
    rgb = _rgb01(img)
    s, v = _saturation_value(rgb)
    return largest_component((s > SAT_MIN) & (v > VAL_MIN))


def _palette_hues() -> dict[str, float]:
    return {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for name, rgb in tw.COLORS.items()}


def dominant_color(img: Image.Image | np.ndarray, mask: np.ndarray | None = None) -> str | None:
    "Palette colour whose hue is nearest to most foreground pixels; None if there is no foreground."
    rgb = _rgb01(img)
    mask = foreground_mask(rgb) if mask is None else mask
    if mask.sum() < MIN_AREA:
        return None
    hues = _hue(rgb[mask])
    names, ref = zip(*_palette_hues().items())
    diff = np.abs(hues[:, None] - np.array(ref)[None, :])
    diff = np.minimum(diff, 360 - diff)  # hue is circular
    votes = np.bincount(diff.argmin(1), minlength=len(names))
    return names[int(votes.argmax())]


def normalized_mask(mask: np.ndarray, side: int = TEMPLATE) -> np.ndarray:
    "Crop a mask to its bounding box and resize it to side x side (float in [0,1]): position/size invariant."
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    im = Image.fromarray((crop * 255).astype(np.uint8)).resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.float32) / 255.0


@lru_cache(maxsize=1)
def shape_templates() -> dict[str, np.ndarray]:
    "Mean normalised mask of each shape over 40 toy renders (both sizes, jittered); built in ~0.2 s."
    rng = random.Random(1234)
    out = {}
    for shape in ALL_SHAPES:
        masks = [normalized_mask(foreground_mask(tw.render(tw.sample_scene(rng, (shape,))))) for _ in range(40)]
        out[shape] = np.mean(masks, 0)
    return out


def shape_of(img: Image.Image | np.ndarray, mask: np.ndarray | None = None) -> str | None:
    "Nearest shape template (mean absolute difference of normalised masks); None if nothing is drawn."
    mask = foreground_mask(img) if mask is None else mask
    if mask.sum() < MIN_AREA:
        return None
    m = normalized_mask(mask)
    dists = {s: float(np.abs(m - t).mean()) for s, t in shape_templates().items()}
    return min(dists, key=dists.get)


def size_of(mask: np.ndarray) -> str | None:
    "'small' or 'large' from the blob's bounding-box half-width (threshold midway between the toy sizes)."
    if mask.sum() < MIN_AREA:
        return None
    ys, xs = np.nonzero(mask)
    half = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / 2
    return "small" if half < (tw.SIZES["small"] + tw.SIZES["large"]) / 2 else "large"


def position_of(mask: np.ndarray) -> str | None:
    "Named position nearest to the blob's bounding-box centre (toy positions computed for the measured size)."
    if mask.sum() < MIN_AREA:
        return None
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    r = tw.SIZES[size_of(mask)]
    d = {p: (cx - tw._center(p, r)[0]) ** 2 + (cy - tw._center(p, r)[1]) ** 2 for p in tw.POSITIONS}
    return min(d, key=d.get)


def analyze(img: Image.Image | np.ndarray) -> dict:
    "All measurements of one image: color, shape, size, position (None when nothing is drawn) and blob area."
    rgb = _rgb01(img)
    mask = foreground_mask(rgb)
    return {"color": dominant_color(rgb, mask), "shape": shape_of(rgb, mask), "size": size_of(mask),
            "position": position_of(mask), "area": int(mask.sum())}


def accuracy_on_toy(n: int = 300, seed: int = 7, concept: bool = False, p_concept: float = 0.25) -> dict[str, float]:
    "Checker accuracy on freshly drawn toy images (base shapes plus, if `concept`, a share of stars)."
    rng = random.Random(seed)
    hits = {"color": 0, "shape": 0, "size": 0, "position": 0}
    for _ in range(n):
        shapes = (tw.CONCEPT_SHAPE,) if concept and rng.random() < p_concept else tw.SHAPES
        sc = tw.sample_scene(rng, shapes)
        got = analyze(tw.render(sc))
        for k in hits:
            hits[k] += got[k] == getattr(sc, k)
    return {k: v / n for k, v in hits.items()}


if __name__ == "__main__":
    print("base shapes   :", accuracy_on_toy(400, seed=7))
    print("incl. concept :", accuracy_on_toy(400, seed=8, concept=True, p_concept=0.5))
