"""Snap and align for layout boxes: pure functions on rectangles in 0..1 image coordinates.

A rectangle is any mapping with "x0", "y0", "x1", "y1". Snapping rounds to a grid of `step`
(1/16 of the image by default); aligning and distributing move rectangles and never resize them,
so a painted region (whose rectangle is its mask's extent) can follow by shifting its mask.
No Qt here: the layout canvas calls these and the tests check them exactly.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

GRID = 16  # snap grid: 1/16 of the image's width and height

ALIGNMENTS = ("left", "right", "top", "bottom", "hcenter", "vcenter")


def snap(v: float, step: float) -> float:
    """`v` to the nearest multiple of `step`, kept in 0..1."""
    if step <= 0:
        return v
    return max(0.0, min(1.0, round(round(v / step) * step, 6)))


def snap_moved(rect: Mapping, step: float) -> tuple[float, float]:
    """Where a moved rectangle's top-left goes on the grid: (x0, y0), its size kept and the
    rectangle kept inside the image."""
    def place(v: float, size: float) -> float:
        v = snap(v, step)
        if v + size > 1.0:  # past the edge: the last grid line where it still fits
            v = max(0.0, math.floor(round((1.0 - size) / step, 9)) * step)
        return v

    return (place(rect["x0"], rect["x1"] - rect["x0"]),
            place(rect["y0"], rect["y1"] - rect["y0"]))


def _moved(rect: Mapping, x0: float, y0: float) -> dict:
    w, h = rect["x1"] - rect["x0"], rect["y1"] - rect["y0"]
    return {"x0": x0, "y0": y0, "x1": x0 + w, "y1": y0 + h}


def align(rects: Sequence[Mapping], how: str) -> list[dict]:
    """The rectangles lined up on the selection's own edge or centre line: "left", "right",
    "top", "bottom" (the outermost edge of them all), "hcenter" / "vcenter" (the centre of the
    selection's extent, on the horizontal / vertical axis)."""
    if how not in ALIGNMENTS:
        raise ValueError(f"unknown alignment {how!r}; one of {', '.join(ALIGNMENTS)}")
    if not rects:
        return []
    left = min(r["x0"] for r in rects)
    right = max(r["x1"] for r in rects)
    top = min(r["y0"] for r in rects)
    bottom = max(r["y1"] for r in rects)
    out = []
    for r in rects:
        w, h = r["x1"] - r["x0"], r["y1"] - r["y0"]
        x0, y0 = r["x0"], r["y0"]
        if how == "left":
            x0 = left
        elif how == "right":
            x0 = right - w
        elif how == "hcenter":
            x0 = (left + right) / 2 - w / 2
        elif how == "top":
            y0 = top
        elif how == "bottom":
            y0 = bottom - h
        else:
            y0 = (top + bottom) / 2 - h / 2
        out.append(_moved(r, x0, y0))
    return out


def distribute(rects: Sequence[Mapping], axis: str) -> list[dict]:
    """Equal gaps between the rectangles along `axis` ("x" or "y"), in their order along it;
    the first and the last stay where they are. Fewer than three: unchanged."""
    if axis not in ("x", "y"):
        raise ValueError(f"axis should be 'x' or 'y', got {axis!r}")
    lo, hi = ("x0", "x1") if axis == "x" else ("y0", "y1")
    out = [_moved(r, r["x0"], r["y0"]) for r in rects]
    if len(rects) < 3:
        return out
    order = sorted(range(len(rects)), key=lambda i: (rects[i][lo], rects[i][hi]))
    first, last = rects[order[0]], rects[order[-1]]
    sizes = sum(rects[i][hi] - rects[i][lo] for i in order)
    gap = (last[hi] - first[lo] - sizes) / (len(rects) - 1)
    pos = first[lo]
    for i in order:
        size = rects[i][hi] - rects[i][lo]
        out[i][lo], out[i][hi] = pos, pos + size
        pos += size + gap
    return out
