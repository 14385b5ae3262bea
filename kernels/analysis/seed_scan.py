"""Seed scan: the same prompt rendered from many seeds, scored by a metric and ranked.

Seeds differ a lot in quality for one prompt (the "golden seed" effect: some seeds' starting
noise favours a clean layout, a visible object, a particular position). A scan renders seeds
`first .. first + count - 1`, scores each image and ranks them, best first; ties are broken by
the smaller seed, so the ranking is a pure function of the scores.

Metrics (higher is better):
- "oracle": for the ShapesT2I world, how much of the prompt the oracle finds: the mean over the
  prompt's objects of (right colour) + (right colour and shape) + (right cell, when the prompt
  names one), divided by the parts counted; 1 is everything right;
- "clip": the cosine similarity of the image's and the prompt's embeddings by a CLIP model from
  a local folder (kernels.analysis.clip_score), for real models;
- "contrast": the standard deviation of the luminance;
- "colourfulness": the mean chroma (max - min channel);
- "sharpness": the mean absolute Laplacian of the luminance.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import numpy as np
import torch

METRICS = ("oracle", "clip", "contrast", "colourfulness", "sharpness")
SHEET_GAP = 2  # pixels between contact-sheet cells


class SeedScanError(ValueError):
    """A metric or setting the scan cannot use."""


def intended_objects(prompt: str) -> list[dict]:
    """The objects a ShapesT2I caption names: [{colour, shape[, cell]}], in order."""
    from kernels.shapes import world

    colours, shapes = "|".join(world.COLOURS), "|".join(world.SHAPES)
    cells = "|".join(sorted((re.escape(p) for p in world.CELL_PHRASES), key=len, reverse=True))
    pattern = re.compile(rf"\b(?:a|an)\s+({colours})\s+({shapes})(?:\s+({cells}))?\b")
    out = []
    for colour, shape, where in pattern.findall(" ".join(prompt.lower().split())):
        obj = {"colour": colour, "shape": shape}
        if where:
            obj["cell"] = world.CELL_PHRASES.index(where)
        out.append(obj)
    return out


def _uint8(image: torch.Tensor) -> np.ndarray:
    """HWC 0..1 -> uint8."""
    return (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


def oracle_score(prompt: str, image: torch.Tensor) -> float:
    """The "oracle" metric of one HWC image in 0..1 (see the module doc)."""
    from kernels.shapes.oracle import detect, match

    intended = intended_objects(prompt)
    if not intended:
        raise SeedScanError(f"the oracle metric needs a ShapesT2I prompt naming a colour and shape, got {prompt!r}")
    arr = _uint8(image)
    if arr.shape[0] != arr.shape[1]:
        raise SeedScanError(f"the oracle reads square images, got {arr.shape[1]}x{arr.shape[0]}")
    found = match(intended, detect(arr))
    right, parts = 0, 0
    for obj, d in zip(intended, found):
        right += (d is not None) + (d is not None and d.shape == obj["shape"])
        parts += 2
        if "cell" in obj:
            right += d is not None and d.cell == obj["cell"]
            parts += 1
    return right / parts


def _luminance(image: torch.Tensor) -> torch.Tensor:
    img = image.detach().float()
    return 0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]


def statistic(metric: str, image: torch.Tensor) -> float:
    """An image-statistics metric of one HWC image in 0..1."""
    if metric == "contrast":
        return float(_luminance(image).std(unbiased=False))
    if metric == "colourfulness":
        img = image.detach().float()
        return float((img.max(-1).values - img.min(-1).values).mean())
    if metric == "sharpness":
        y = _luminance(image)[None, None]
        kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None, None]
        return float(torch.nn.functional.conv2d(y, kernel).abs().mean())
    raise SeedScanError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def scorer(metric: str, prompt: str, clip_folder: str = "",
           load_clip: Callable | None = None) -> Callable[[torch.Tensor], float]:
    """image (HWC, 0..1) -> score for `metric` (and the prompt, for the oracle and CLIP).
    load_clip(folder): how the CLIP model is loaded (kernels.analysis.clip_score.clip_scorer)."""
    if metric == "clip":
        from kernels.analysis.clip_score import ClipScoreError, clip_scorer

        try:
            return clip_scorer(clip_folder, prompt, load_clip)
        except ClipScoreError as exc:
            raise SeedScanError(str(exc)) from None
    if metric == "oracle":
        if not intended_objects(prompt):
            raise SeedScanError(f"the oracle metric needs a ShapesT2I prompt naming a colour and shape, "
                                f"got {prompt!r}")
        return lambda image: oracle_score(prompt, image)
    if metric not in METRICS:
        raise SeedScanError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return lambda image: statistic(metric, image)


def ranked(scores: dict[int, float]) -> list[int]:
    """Seeds best first: by score, then by the smaller seed."""
    return sorted(scores, key=lambda s: (-scores[s], s))


def contact_sheet(images: Sequence[torch.Tensor], columns: int = 0) -> torch.Tensor:
    """The images (each HWC, one size) in a grid, row by row, SHEET_GAP dark pixels between
    cells; `columns` 0 makes the grid about square. Returns (1, H, W, C)."""
    if not images:
        raise SeedScanError("a contact sheet needs at least one image")
    h, w, c = images[0].shape
    if any(tuple(im.shape) != (h, w, c) for im in images):
        raise SeedScanError("contact-sheet images must all have one size")
    cols = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    sheet = torch.zeros(rows * h + (rows - 1) * SHEET_GAP, cols * w + (cols - 1) * SHEET_GAP, c)
    for k, im in enumerate(images):
        r, q = divmod(k, cols)
        y, x = r * (h + SHEET_GAP), q * (w + SHEET_GAP)
        sheet[y:y + h, x:x + w] = im.float()
    return sheet[None]


def scan(render: Callable[[int], torch.Tensor], seeds: Sequence[int], score: Callable[[torch.Tensor], float],
         progress: Callable[[int, int], None] | None = None) -> tuple[list[int], dict[int, float], dict[int, torch.Tensor]]:
    """Render and score every seed: (seeds best first, seed -> score, seed -> image (HWC))."""
    scores, images = {}, {}
    for k, seed in enumerate(seeds):
        images[seed] = render(int(seed))
        scores[seed] = float(score(images[seed]))
        if progress is not None:
            progress(k + 1, len(seeds))
    return ranked(scores), scores, images


def scan_table(order: list[int], scores: dict[int, float], metric: str):
    from kernels.analysis.table import Table

    return Table(f"Seed scan ({metric}, higher is better)", ["rank", "seed", "score"],
                 [[r + 1, s, round(scores[s], 6)] for r, s in enumerate(order)])
