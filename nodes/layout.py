"""Layout: boxes with phrases that say where things go in the image.

A declaration for now (the layout-to-image issue gives it a kernel): the app's layout canvas edits
its `boxes` param; downstream nodes read the LAYOUT it outputs.
"""

from __future__ import annotations

from .base import LAYOUT, Int, Json, Node
from .registry import register

BOX_KEYS = ("x0", "y0", "x1", "y1")


def check_boxes(value) -> "str | None":
    """A list of {"x0","y0","x1","y1" in 0..1 with x0 < x1 and y0 < y1, "phrase": text}."""
    if not isinstance(value, list):
        return f"boxes should be a list, got {type(value).__name__}"
    for i, box in enumerate(value):
        if not isinstance(box, dict):
            return f"box #{i} should be an object with x0, y0, x1, y1 and phrase"
        for key in BOX_KEYS:
            v = box.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                return f"box #{i}: {key} should be a number in 0..1, got {v!r}"
            if not 0.0 <= v <= 1.0:
                return f"box #{i}: {key} = {v} is outside 0..1"
        if not box["x0"] < box["x1"] or not box["y0"] < box["y1"]:
            return f"box #{i} is empty: it needs x0 < x1 and y0 < y1"
        if not isinstance(box.get("phrase", ""), str):
            return f"box #{i}: phrase should be text"
        unknown = set(box) - set(BOX_KEYS) - {"phrase"}
        if unknown:
            return f"box #{i}: unknown keys {sorted(unknown)}"
    return None


@register
class Layout(Node):
    """Boxes with phrases, in 0..1 image coordinates, drawn on the layout canvas."""

    category = "layout"
    params = {
        "width": Int(512, 8, 8192, step=8, help="width of the image the boxes are drawn for"),
        "height": Int(512, 8, 8192, step=8, help="height of the image the boxes are drawn for"),
        "boxes": Json([], help="boxes: x0, y0, x1, y1 in 0..1 and a phrase each",
                      validator=check_boxes),
    }
    outputs = {"layout": LAYOUT}

    def run(self, ctx, width, height, boxes):
        return {"layout": {"width": width, "height": height,
                           "boxes": [dict(b) for b in boxes]}}
