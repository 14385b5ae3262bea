"""The oracle: finds each object of the shapes world in an image, with colour, shape, box, cell.

No pretrained detector exists here, and none is needed: the world is fully specified, so the
oracle inverts its renderer. Backgrounds are achromatic (black, white or gray, with at most a
vertical gradient) and every object colour is saturated, so
1. the background is a per-channel linear function of the row, fitted on low-chroma pixels;
2. objects are the connected regions of high chroma;
3. an object's colour is the mean of its most saturated pixels, named by the nearest palette
   colour, and each pixel's coverage (alpha) is its projection onto background -> that colour;
4. its shape is the world's own outline (circle, square, triangle, star) that, placed at the
   region's centroid and scaled to its area, best reproduces the alpha map.
Works at 64x64 and at 32x32 (where the smallest stars and squares lose their corners).

    python -m kernels.shapes.oracle IMAGE...   (or `loomwork oracle IMAGE...`): JSON per image
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from kernels.shapes.world import COLOURS, SHAPES, cell_of_point, shape_outline

CHROMA_MASK = 50        # max-min channel spread that marks a pixel as (mostly) object
CHROMA_BACKGROUND = 12  # below this a pixel counts as background for the fit
MIN_AREA_FRACTION = 0.002  # regions smaller than this share of the image are noise
# The world draws at most 3 objects (a trained model's renders show at most 6 regions); an image
# with more is noise, not a scene: a half-trained model's noisy samples break into ~20 coloured
# specks, and matching prompts against those scored 0.5-0.9 "colour" on pure noise.
MAX_REGIONS = 8
SUPERSAMPLE = 4
PALETTE = {name: np.array(rgb, np.float32) for name, rgb in COLOURS.items()}


@dataclass
class Detection:
    colour: str
    shape: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in 0..1
    cell: int
    center: tuple[float, float]  # of the outline's box, 0..1
    area: float  # in 0..1 image units
    fit_error: float  # mean |alpha - template| over the region, relative to its area

    def to_dict(self) -> dict:
        d = asdict(self)
        d["box"] = [round(v, 4) for v in self.box]
        d["center"] = [round(v, 4) for v in self.center]
        d["area"], d["fit_error"] = round(self.area, 5), round(self.fit_error, 4)
        return d


def _as_array(image) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"expected a square RGB image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr * 255 if arr.max() <= 1.0 else arr), 0, 255).astype(np.uint8)
    return arr.astype(np.float32)


def _background(img: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """Per-pixel background colour: a linear function of the row, fitted on grey pixels."""
    size = img.shape[0]
    rows = np.repeat(np.arange(size, dtype=np.float32)[:, None], size, axis=1)
    grey = chroma < CHROMA_BACKGROUND
    if grey.sum() < size:  # almost no background visible: fall back to the darkest/greyest
        grey = chroma <= np.quantile(chroma, 0.2)
    design = np.stack([np.ones(grey.sum(), np.float32), rows[grey] / size], axis=1)
    coef, *_ = np.linalg.lstsq(design, img[grey], rcond=None)  # (2, 3)
    t = np.arange(size, dtype=np.float32) / size
    per_row = coef[0][None, :] + t[:, None] * coef[1][None, :]
    return np.repeat(per_row[:, None, :], size, axis=1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of a boolean mask, as lists of (row, col) indices."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    regions = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        stack, pixels = [(r0, c0)], []
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        regions.append(np.array(pixels))
    return regions


@lru_cache(maxsize=None)
def _unit_geometry(shape: str) -> tuple[float, float, float]:
    """(area, centroid dx, centroid dy) of the outline at radius 1, centre 0."""
    if shape == "circle":
        return float(np.pi), 0.0, 0.0
    pts = np.array(shape_outline(shape, (0.0, 0.0), 1.0))
    x, y = pts[:, 0], pts[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    cx = ((x + xn) * cross).sum() / (6 * area)
    cy = ((y + yn) * cross).sum() / (6 * area)
    return float(abs(area)), float(cx), float(cy)


def _template(shape: str, center: tuple[float, float], radius: float, size: int) -> np.ndarray:
    """Coverage (0..1) of the outline in a size x size image, drawn supersampled like the world."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    pts = [(x * big - 0.5, y * big - 0.5) for x, y in shape_outline(shape, center, radius)]
    if shape == "circle":
        draw.ellipse([pts[0], pts[1]], fill=255)
    else:
        draw.polygon(pts, fill=255)
    arr = np.asarray(canvas, np.float32).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    return arr / 255.0


def detect(image) -> list[Detection]:
    """Every object in an image of the shapes world (square RGB, uint8 or float 0..1)."""
    img = _as_array(image)
    size = img.shape[0]
    chroma = img.max(axis=2) - img.min(axis=2)
    bg = _background(img, chroma)
    detections = []
    min_pixels = max(2, MIN_AREA_FRACTION * size * size)
    regions = [pixels for pixels in _components(chroma > CHROMA_MASK) if len(pixels) >= min_pixels]
    if len(regions) > MAX_REGIONS:
        return []
    for pixels in regions:
        rows, cols = pixels[:, 0], pixels[:, 1]
        region_chroma = chroma[rows, cols]
        core = region_chroma >= np.quantile(region_chroma, 0.5)
        colour_rgb = img[rows[core], cols[core]].mean(axis=0)
        name = min(PALETTE, key=lambda k: float(np.sum((PALETTE[k] - colour_rgb) ** 2)))
        # Coverage of every pixel near the region (edges fall below the chroma mask).
        r0, r1 = max(rows.min() - 2, 0), min(rows.max() + 3, size)
        c0, c1 = max(cols.min() - 2, 0), min(cols.max() + 3, size)
        window = img[r0:r1, c0:c1] - bg[r0:r1, c0:c1]
        direction = colour_rgb - bg[r0:r1, c0:c1]
        alpha = np.clip((window * direction).sum(axis=2) / np.maximum((direction ** 2).sum(axis=2), 1e-3), 0, 1)
        alpha[alpha < 0.08] = 0.0  # shading noise, not coverage
        area = float(alpha.sum())
        ys, xs = np.mgrid[r0:r1, c0:c1].astype(np.float32) + 0.5
        mx, my = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)
        full = np.zeros((size, size), np.float32)
        full[r0:r1, c0:c1] = alpha
        best = None
        for shape in SHAPES:
            unit_area, dx, dy = _unit_geometry(shape)
            r = np.sqrt(area / unit_area)
            center = ((mx - dx * r) / size, (my - dy * r) / size)
            t = _template(shape, center, r / size, size)
            err = float(np.abs(t - full).sum() / area)
            if best is None or err < best[0]:
                best = (err, shape, center, r / size)
        err, shape, center, radius = best
        xs_, ys_ = zip(*shape_outline(shape, center, radius))
        box = (float(min(xs_)), float(min(ys_)), float(max(xs_)), float(max(ys_)))
        box_center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        detections.append(Detection(name, shape, box, cell_of_point(*box_center), box_center,
                                    area / (size * size), err))
    return detections


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(intended: list[dict], detections: list[Detection]) -> list[Detection | None]:
    """Pair each intended object ({colour, shape[, cell]}) with a distinct detection, best first:
    same colour and shape, then same colour; None where nothing fits."""
    free = list(detections)
    out: list[Detection | None] = [None] * len(intended)
    for strict in (True, False):
        for i, obj in enumerate(intended):
            if out[i] is not None:
                continue
            cands = [d for d in free if d.colour == obj["colour"] and (d.shape == obj["shape"] or not strict)]
            if "cell" in obj:  # prefer the one in the intended cell
                cands.sort(key=lambda d: d.cell != obj["cell"])
            if cands:
                out[i] = cands[0]
                free.remove(cands[0])
    return out


def score_prompt(intended: list[dict], image) -> dict:
    """How well an image shows the intended objects: per-object rates and all-objects-right."""
    found = match(intended, detect(image))
    colour = [d is not None for d in found]
    colour_shape = [d is not None and d.shape == o["shape"] for o, d in zip(intended, found)]
    cell = [d is not None and "cell" in o and d.cell == o["cell"] for o, d in zip(intended, found)]
    return {"colour": float(np.mean(colour)), "colour_shape": float(np.mean(colour_shape)),
            "cell": float(np.mean(cell)), "all_right": float(all(colour_shape))}


def detect_in_files(paths: Sequence[str]) -> list[dict]:
    """One JSON-able record per image file: its size and objects, or the error that kept it from
    being read."""
    results = []
    for path in paths:
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
            if arr.shape[0] != arr.shape[1]:
                raise ValueError(f"expected a square image, got {arr.shape[1]}x{arr.shape[0]}")
            results.append({"image": path, "size": arr.shape[0],
                            "objects": [d.to_dict() for d in detect(arr)]})
        except (OSError, ValueError) as exc:
            results.append({"image": path, "error": str(exc)})
    return results


def main(argv: list[str] | None = None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: loomwork oracle IMAGE...", file=sys.stderr)
        return 2
    results = detect_in_files(paths)
    print(json.dumps(results, indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
