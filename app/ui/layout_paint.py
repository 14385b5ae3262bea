"""Painted layout regions: the mask grid a brush paints, its extent, and mask images.

A painted region is a layout box with a "mask": a grid over the whole image (MASK_SIDE cells on
the image's long side, so a region costs a few KB in the file), written as one "0"/"1" string
per row. The box's x0..y1 is always the mask's extent, so techniques that read rectangles still
see where the region is. A grid here is a list of lists of 0/1 ints, [row][column].
The functions are pure (no Qt); at the end, `grid_image` (a grid as a tinted image),
`PaintBar` (the tool buttons) and `PaintActions` (the layout panel's tool actions, a mixin).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Optional, Sequence

from PySide6 import QtCore, QtGui, QtWidgets

from . import layout_align as align
from . import theme
from .file_dialogs import open_file

MASK_SIDE = 64            # cells on the long side: plenty for ShapesT2I's 32², fine for SD's 64²
MAX_IMPORT_BYTES = 64 << 20
MAX_IMPORT_PIXELS = 40_000_000  # larger images are refused before they are decoded

Grid = list[list[int]]


class MaskImportError(ValueError):
    """A mask image that cannot be used; the message names the file and the reason."""


def mask_shape(width: int, height: int, side: int = MASK_SIDE) -> tuple[int, int]:
    """(rows, columns) of a mask for a width x height image: `side` cells on the long side."""
    w, h = max(1, int(width)), max(1, int(height))
    if w >= h:
        return max(1, round(side * h / w)), side
    return side, max(1, round(side * w / h))


def empty_grid(rows: int, cols: int) -> Grid:
    return [[0] * cols for _ in range(rows)]


def decode(mask: Sequence) -> Grid:
    """A stored mask (rows of numbers or of "0"/"1" text) as a 0/1 grid (values >= 0.5 are in)."""
    return [[int(c == "1") for c in r] if isinstance(r, str) else [int(v >= 0.5) for v in r]
            for r in mask]


def encode(grid: Grid) -> list[str]:
    """The compact stored form: one "0"/"1" string per row."""
    return ["".join("1" if v else "0" for v in row) for row in grid]


def extent(grid: Grid) -> Optional[dict]:
    """The painted cells' bounding rectangle in 0..1 ({"x0".."y1"}), or None when none is."""
    rows = [i for i, row in enumerate(grid) if any(row)]
    if not rows:
        return None
    cols = [j for j in range(len(grid[0])) if any(row[j] for row in grid)]
    n_rows, n_cols = len(grid), len(grid[0])
    return {"x0": cols[0] / n_cols, "y0": rows[0] / n_rows,
            "x1": (cols[-1] + 1) / n_cols, "y1": (rows[-1] + 1) / n_rows}


def rect_grid(rect: dict, rows: int, cols: int) -> Grid:
    """A grid with the cells whose centre lies in `rect` set (a box turned into a region)."""
    grid = empty_grid(rows, cols)
    for i in range(rows):
        for j in range(cols):
            u, v = (j + 0.5) / cols, (i + 0.5) / rows
            if rect["x0"] <= u < rect["x1"] and rect["y0"] <= v < rect["y1"]:
                grid[i][j] = 1
    return grid


def paint_segment(grid: Grid, a: tuple[float, float], b: tuple[float, float], radius: float,
                  value: int) -> None:
    """Set to `value` every cell whose centre is within `radius` of the segment a-b.

    a and b are (x, y) in cell units (0..columns, 0..rows); a brush stroke is the chain of its
    mouse positions' segments, so a fast stroke leaves no gaps.
    """
    rows, cols = len(grid), len(grid[0])
    (ax, ay), (bx, by) = a, b
    dx, dy = bx - ax, by - ay
    length2 = dx * dx + dy * dy
    j0 = max(0, math.floor(min(ax, bx) - radius))
    j1 = min(cols - 1, math.ceil(max(ax, bx) + radius))
    i0 = max(0, math.floor(min(ay, by) - radius))
    i1 = min(rows - 1, math.ceil(max(ay, by) + radius))
    r2 = radius * radius + 1e-9
    for i in range(i0, i1 + 1):
        cy = i + 0.5
        for j in range(j0, j1 + 1):
            cx = j + 0.5
            t = 0.0 if length2 == 0 else max(0.0, min(1.0, ((cx - ax) * dx + (cy - ay) * dy) / length2))
            px, py = ax + t * dx - cx, ay + t * dy - cy
            if px * px + py * py <= r2:
                grid[i][j] = value


def shifted(grid: Grid, di: int, dj: int) -> Grid:
    """The grid moved by di rows and dj columns (cells pushed off the edge are lost)."""
    rows, cols = len(grid), len(grid[0])
    out = empty_grid(rows, cols)
    for i in range(rows):
        si = i - di
        if 0 <= si < rows:
            for j in range(cols):
                sj = j - dj
                if 0 <= sj < cols and grid[si][sj]:
                    out[i][j] = 1
    return out


def refit(grid: Grid, new: dict) -> Grid:
    """The painted shape stretched from its extent into rectangle `new` (nearest cell)."""
    old = extent(grid)
    rows, cols = len(grid), len(grid[0])
    out = empty_grid(rows, cols)
    if old is None:
        return out
    ow, oh = old["x1"] - old["x0"], old["y1"] - old["y0"]
    nw, nh = max(1e-9, new["x1"] - new["x0"]), max(1e-9, new["y1"] - new["y0"])
    for i in range(rows):
        v = (i + 0.5) / rows
        if not new["y0"] <= v < new["y1"]:
            continue
        si = min(rows - 1, int((old["y0"] + (v - new["y0"]) / nh * oh) * rows))
        for j in range(cols):
            u = (j + 0.5) / cols
            if new["x0"] <= u < new["x1"]:
                sj = min(cols - 1, int((old["x0"] + (u - new["x0"]) / nw * ow) * cols))
                out[i][j] = grid[si][sj]
    return out


def region(grid: Grid, phrase: str = "") -> Optional[dict]:
    """The box of a painted grid: its extent as the rectangle and the grid as its mask
    (None when nothing is painted)."""
    rect = extent(grid)
    if rect is None:
        return None
    return {**rect, "phrase": phrase, "mask": encode(grid)}


def with_grid(box: dict, grid: Grid) -> Optional[dict]:
    """`box` (its phrase kept) with a new painted grid, or None when the grid is empty."""
    return region(grid, box.get("phrase", ""))


def moved_box(box: dict, x0: float, y0: float) -> dict:
    """`box` with its top-left at (x0, y0), size kept; a painted region shifts its mask by
    whole cells and its rectangle follows the mask."""
    if box.get("mask") is None:
        w, h = box["x1"] - box["x0"], box["y1"] - box["y0"]
        return {**box, "x0": round(x0, 4), "y0": round(y0, 4),
                "x1": round(x0 + w, 4), "y1": round(y0 + h, 4)}
    grid = decode(box["mask"])
    rows, cols = len(grid), len(grid[0])
    grid = shifted(grid, round((y0 - box["y0"]) * rows), round((x0 - box["x0"]) * cols))
    return with_grid(box, grid) or box


def mask_from_image(path: str, rows: int, cols: int) -> Grid:
    """A 0/1 grid of rows x cols from a mask image: white (or, with transparency, opaque) is
    inside, thresholded at half. The image is stretched over the whole layout.

    Raises MaskImportError naming the file for a missing, unreadable, huge or empty image; a
    Pillow decompression-bomb warning counts as an error.
    """
    from PIL import Image, UnidentifiedImageError

    name = os.path.basename(path) or path
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise MaskImportError(f"mask image {name}: cannot read it ({e.strerror or e})") from e
    if size > MAX_IMPORT_BYTES:
        raise MaskImportError(f"mask image {name} is {size >> 20} MB; the limit is "
                              f"{MAX_IMPORT_BYTES >> 20} MB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMPORT_PIXELS:
                    raise MaskImportError(f"mask image {name} is {w}x{h} pixels; the limit is "
                                          f"{MAX_IMPORT_PIXELS // 1_000_000} megapixels")
                im.load()
                has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
                rgba = im.convert("RGBA")
    except MaskImportError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise MaskImportError(f"mask image {name} is too large to decode safely ({e})") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise MaskImportError(f"mask image {name} is not an image Pillow can read ({e})") from e
    alpha = rgba.getchannel("A")
    # transparency marks the region when the image has any; else brightness does
    channel = alpha if has_alpha and alpha.getextrema()[0] < 255 else rgba.convert("L")
    small = channel.resize((cols, rows), Image.Resampling.BOX)  # area average, then threshold
    values = small.tobytes()  # mode L: one byte a cell, row by row
    grid = [[int(values[i * cols + j] >= 128) for j in range(cols)] for i in range(rows)]
    if extent(grid) is None:
        raise MaskImportError(f"mask image {name} has no white (or opaque) pixels: nothing to "
                              "use as a region")
    return grid


def grid_image(grid: Grid, color: QtGui.QColor, alpha: int = 110) -> QtGui.QImage:
    """The grid as a tinted image, one pixel a cell (drawn scaled over the image rect)."""
    h, w = len(grid), len(grid[0]) if grid else 0
    if not w:
        return QtGui.QImage()
    on = bytes((color.blue(), color.green(), color.red(), alpha))  # ARGB32 is BGRA in memory
    off = bytes(4)
    data = b"".join(on if v else off for row in grid for v in row)
    return QtGui.QImage(data, w, h, 4 * w, QtGui.QImage.Format_ARGB32).copy()


class PaintBar(QtWidgets.QWidget):
    """The tool row: box / brush / eraser, brush size, clear, import; emits the tool by name."""

    tool_changed = QtCore.Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        lay = QtWidgets.QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(4)
        # which tool is on must show (the theme gives tool buttons no checked look)
        self.setStyleSheet(f"QToolButton {{ padding: 0.3em 0.5em; }} "
                           f"QToolButton:checked {{ background: {theme.ACCENT_DIM}; "
                           f"border: 1px solid {theme.ACCENT}; }}")
        self.group = QtWidgets.QButtonGroup(self)
        self.buttons: dict[str, QtWidgets.QToolButton] = {}
        tips = {"box": "draw, move and resize boxes (B)",
                "brush": "paint the selected region's mask; with no region selected, a new one (P)",
                "eraser": "erase from the selected region's mask (E)"}
        for name, text in (("box", "Boxes"), ("brush", "Brush"), ("eraser", "Eraser")):
            b = QtWidgets.QToolButton()
            b.setText(text)
            b.setCheckable(True)
            b.setToolTip(tips[name])
            self.group.addButton(b)
            self.buttons[name] = b
            lay.addWidget(b)
            b.setObjectName(f"LayoutTool_{name}")
            b.toggled.connect(lambda on, n=name: on and self.tool_changed.emit(n))
        self.buttons["box"].setChecked(True)
        self.size = QtWidgets.QSpinBox()
        self.size.setRange(1, MASK_SIDE // 2)
        self.size.setValue(6)
        self.size.setToolTip(f"brush size: its diameter in mask cells ({MASK_SIDE} cells on the image's long side)")
        lay.addWidget(self.size)
        # clear and import sit in one menu so the row fits the narrow right column
        self.mask_btn = QtWidgets.QToolButton()
        self.mask_btn.setText("Mask")
        self.mask_btn.setToolTip("clear the selected region's mask, or import a mask image")
        self.mask_btn.setPopupMode(QtWidgets.QToolButton.InstantPopup)
        menu = QtWidgets.QMenu(self.mask_btn)
        self.clear_action = menu.addAction("Clear mask (back to a plain box)")
        self.clear_action.setToolTip("drop the selected region's painting: it becomes the plain "
                                     "box of its extent")
        self.import_action = menu.addAction("Import mask image…")
        self.import_action.setToolTip("a PNG mask (white or opaque = inside) as the selected "
                                      "region's mask, or as a new region")
        self.mask_btn.setMenu(menu)
        lay.addWidget(self.mask_btn)
        lay.addStretch(1)

    def tool(self) -> str:
        return next(n for n, b in self.buttons.items() if b.isChecked())

    def set_tool(self, name: str) -> None:
        self.buttons[name].setChecked(True)


class PaintActions:
    """The layout panel's tool actions (a mixin of LayoutPanel: it uses the panel's canvas,
    tools, hint, node_id and message). Each finished action is one commit of the boxes."""

    HINTS = {
        "box": "Drag to draw a box · drag to move · corners resize · shift-click selects "
               "several (Align) · Delete removes",
        "brush": "Paint the selected region (a box becomes one) or, with none selected, a new "
                 "one · one stroke, one undo",
        "eraser": "Erase from the selected region; erasing all of it removes the region",
    }

    def set_tool(self, name: str) -> None:
        """"box", "brush" or "eraser"."""
        self.canvas.tool = name
        if self.tools.tool() != name:
            self.tools.set_tool(name)
        self.tools.size.setEnabled(name != "box")
        self.hint.setText(self.HINTS[name])
        self.canvas.update()

    def _brush_size(self, value: int) -> None:
        self.canvas.brush_size = value
        self.canvas.update()

    def _snap_toggled(self, on: bool) -> None:
        self.canvas.snap = on
        self.canvas.update()

    def _moved_to(self, rects: list[dict], indices: list[int]) -> None:
        boxes = copy.deepcopy(self.canvas.boxes)
        for i, rect in zip(indices, rects):
            boxes[i] = moved_box(boxes[i], rect["x0"], rect["y0"])
        self.canvas.replace_boxes(boxes)

    def align_selected(self, how: str) -> None:
        """Line up the selected boxes (two or more) on their outermost edge or common centre."""
        indices = self.canvas.selection()
        if len(indices) < 2:
            self.message.emit("layout: select two or more boxes to align (shift-click adds)")
            return
        self._moved_to(align.align([self.canvas.boxes[i] for i in indices], how), indices)

    def distribute_selected(self, axis: str) -> None:
        """Equal gaps between the selected boxes (three or more) along "x" or "y"."""
        indices = self.canvas.selection()
        if len(indices) < 3:
            self.message.emit("layout: select three or more boxes to distribute (shift-click adds)")
            return
        self._moved_to(align.distribute([self.canvas.boxes[i] for i in indices], axis), indices)

    def clear_mask(self) -> None:
        """The selected region's painting dropped: it becomes the plain box of its extent."""
        i = self.canvas.selected
        if not 0 <= i < len(self.canvas.boxes) or self.canvas.boxes[i].get("mask") is None:
            self.message.emit("layout: select a painted region to clear its mask")
            return
        boxes = copy.deepcopy(self.canvas.boxes)
        boxes[i].pop("mask")
        self.canvas.replace_boxes(boxes)

    def import_mask(self, path: Optional[str] = None) -> bool:
        """A mask image as the selected region's (or box's) mask, or as a new region; False
        (with the reason in a message) when the file cannot be used."""
        if self.node_id is None:
            return False
        if path is None:
            path = open_file(self, "Import a mask image", "",
                             "Images (*.png *.jpg *.jpeg *.bmp *.webp);;All files (*)")
            if not path:
                return False
        i = self.canvas.selected
        boxes = copy.deepcopy(self.canvas.boxes)
        current = boxes[i] if 0 <= i < len(boxes) else None
        if current is not None and current.get("mask") is not None:
            stored = decode(current["mask"])
            shape = (len(stored), len(stored[0]))
        else:
            shape = self.canvas.mask_shape()
        try:
            grid = mask_from_image(path, *shape)
        except MaskImportError as e:
            self.message.emit(f"layout: {e}")
            return False
        if current is not None:
            boxes[i] = with_grid(current, grid)
        else:
            boxes.append(region(grid))
            i = len(boxes) - 1
        self.canvas.replace_boxes(boxes)
        self.canvas.select(i)
        return True
