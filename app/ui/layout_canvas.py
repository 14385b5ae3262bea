"""The layout canvas: draw, move, resize and delete boxes, or paint regions, each with a phrase,
for a Layout node.

Boxes are kept in 0..1 image coordinates ({"x0","y0","x1","y1","phrase"}), drawn over the current
image or a blank canvas of the node's width x height. A painted region is a box with a "mask"
(layout_paint: brush, eraser, clear, a mask image imported), its rectangle the mask's extent.
Boxes snap to a grid and align (layout_align). Every finished gesture (a drawn box, a stroke, a
move, a resize, an alignment, a delete, a phrase) is one Document.set_param of the node's
`boxes`, so it is undoable with everything else; the canvas re-reads the param whenever the
document changes.
"""

from __future__ import annotations

import copy
from typing import Optional

from PySide6 import QtCore, QtGui, QtWidgets

from nodes import registry

from . import layout_align as align
from . import layout_paint as paint
from .document import Document

HANDLE = 7          # px: corner handle size
MIN_BOX = 0.01      # boxes smaller than this (in 0..1) are a click, not a drawing
BOX_COLORS = ["#5aa9f0", "#f0b429", "#4caf70", "#e5606a", "#b07cd8", "#4dd0c8", "#e86fa8", "#a1887f"]


def clamp01(v: float) -> float:
    return max(0.0, min(1.0, v))


class BoxCanvas(QtWidgets.QWidget):
    """The drawing surface. `boxes` are edited locally during a drag and committed on release.

    `tool` is "box" (draw, move, resize; shift-click adds to the selection) or "brush" /
    "eraser" (paint the selected region's mask; the brush with nothing selected starts a region).
    """

    committed = QtCore.Signal(list)       # the new boxes list after a gesture
    selection_changed = QtCore.Signal(int)
    message = QtCore.Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setMouseTracking(True)
        self.setFocusPolicy(QtCore.Qt.StrongFocus)
        self.setMinimumSize(160, 120)  # the panel's minimum stays what the window's dock split expects
        self.boxes: list[dict] = []
        self.size_px = (512, 512)
        self.background: Optional[QtGui.QImage] = None
        self.selected = -1
        self.extra: set[int] = set()         # further selected boxes (for align), shift-click
        self._drag: Optional[tuple] = None   # (mode, index, start point 0..1, box at start)
        self._stroke: Optional[dict] = None  # a brush stroke: index, grid, last cell point, value
        self._hover: Optional[QtCore.QPointF] = None
        self.enabled_for_node = False
        self.tool = "box"
        self.brush_size = 6                  # diameter in mask cells
        self.snap = False
        self._images: dict = {}              # region images by (mask rows, colour, alpha)

    # -- geometry -------------------------------------------------------------------------
    def image_rect(self) -> QtCore.QRectF:
        """Where the image (or blank canvas) sits in the widget: centred, aspect kept."""
        w, h = self.size_px
        margin = 10
        avail = QtCore.QRectF(self.rect()).adjusted(margin, margin, -margin, -margin)
        scale = min(avail.width() / max(1, w), avail.height() / max(1, h))
        rw, rh = w * scale, h * scale
        return QtCore.QRectF(avail.center().x() - rw / 2, avail.center().y() - rh / 2, rw, rh)

    def to_unit(self, p: QtCore.QPointF) -> tuple[float, float]:
        r = self.image_rect()
        return clamp01((p.x() - r.x()) / r.width()), clamp01((p.y() - r.y()) / r.height())

    def box_rect(self, box: dict) -> QtCore.QRectF:
        r = self.image_rect()
        return QtCore.QRectF(r.x() + box["x0"] * r.width(), r.y() + box["y0"] * r.height(),
                             (box["x1"] - box["x0"]) * r.width(), (box["y1"] - box["y0"]) * r.height())

    def mask_shape(self) -> tuple[int, int]:
        """(rows, columns) of a new region's mask for the node's image size."""
        return paint.mask_shape(*self.size_px)

    def _snapped(self, u: tuple[float, float]) -> tuple[float, float]:
        if not self.snap:
            return u
        step = 1.0 / align.GRID
        return align.snap(u[0], step), align.snap(u[1], step)

    def _corner_at(self, pos: QtCore.QPointF, index: int) -> Optional[str]:
        r = self.box_rect(self.boxes[index])
        corners = {"tl": r.topLeft(), "tr": r.topRight(), "bl": r.bottomLeft(), "br": r.bottomRight()}
        for name, c in corners.items():
            if abs(pos.x() - c.x()) <= HANDLE and abs(pos.y() - c.y()) <= HANDLE:
                return name
        return None

    def _box_at(self, pos: QtCore.QPointF) -> int:
        for i in reversed(range(len(self.boxes))):  # topmost (last drawn) first
            if self.box_rect(self.boxes[i]).contains(pos):
                return i
        return -1

    # -- state ---------------------------------------------------------------------------
    def set_boxes(self, boxes: list[dict]) -> None:
        if self._drag is not None or self._stroke is not None:
            return  # the document echoes our own commit; the drag's local state is newer
        self.boxes = copy.deepcopy(boxes or [])
        self.extra = {i for i in self.extra if i < len(self.boxes)}
        if self.selected >= len(self.boxes):
            self.select(len(self.boxes) - 1)
        self.update()

    def select(self, index: int, add: bool = False) -> None:
        """Select box `index` (-1: none); `add` keeps the selection and adds or drops it."""
        if add and index >= 0 and self.selected >= 0:
            if index == self.selected:
                self.selected = min(self.extra) if self.extra else -1
                self.extra.discard(self.selected)
            elif index in self.extra:
                self.extra.discard(index)
            else:
                self.extra.add(self.selected)
                self.selected = index
        else:
            self.selected = index
            self.extra = set()
        self.selection_changed.emit(self.selected)
        self.update()

    def selection(self) -> list[int]:
        """Every selected box's index, in order."""
        picked = set(self.extra) | ({self.selected} if self.selected >= 0 else set())
        return sorted(i for i in picked if 0 <= i < len(self.boxes))

    def delete_selected(self) -> None:
        if 0 <= self.selected < len(self.boxes):
            del self.boxes[self.selected]
            self.extra = set()
            self.select(min(self.selected, len(self.boxes) - 1))
            self.committed.emit(copy.deepcopy(self.boxes))

    def replace_boxes(self, boxes: list[dict]) -> None:
        """Commit a whole new list (an alignment, a cleared mask, an imported one)."""
        if boxes != self.boxes:
            self.boxes = copy.deepcopy(boxes)
            self.update()
            self.committed.emit(copy.deepcopy(self.boxes))

    # -- mouse ---------------------------------------------------------------------------
    def mousePressEvent(self, event):
        if event.button() != QtCore.Qt.LeftButton or not self.enabled_for_node:
            return
        self.setFocus()
        pos = event.position()
        if self.tool != "box":
            self._stroke_press(pos)
            return
        u = self.to_unit(pos)
        if 0 <= self.selected < len(self.boxes):
            corner = self._corner_at(pos, self.selected)
            if corner:
                self._drag = ("resize:" + corner, self.selected, u, dict(self.boxes[self.selected]))
                return
        hit = self._box_at(pos)
        if hit >= 0:
            if event.modifiers() & QtCore.Qt.ShiftModifier:
                self.select(hit, add=True)
                return
            if hit not in self.selection():
                self.select(hit)
            else:  # a click inside the selection keeps it, with `hit` as the one being edited
                self.extra = set(self.selection()) - {hit}
                self.selected = hit
                self.selection_changed.emit(hit)
            self._drag = ("move", hit, u, dict(self.boxes[hit]))
            return
        if not self.image_rect().contains(pos):
            self.select(-1)
            return
        u = self._snapped(u)
        self.boxes.append({"x0": u[0], "y0": u[1], "x1": u[0], "y1": u[1], "phrase": ""})
        self.select(len(self.boxes) - 1)
        self._drag = ("draw", self.selected, u, dict(self.boxes[-1]))

    def mouseMoveEvent(self, event):
        pos = event.position()
        self._hover = pos
        if self._stroke is not None:
            self._stroke_to(pos)
            return
        if self._drag is None:
            self._update_cursor(pos)
            if self.tool != "box":
                self.update()  # the brush outline follows the mouse
            return
        mode, i, start, box0 = self._drag
        u = self.to_unit(pos)
        dx, dy = u[0] - start[0], u[1] - start[1]
        box = dict(box0)
        if mode == "draw":
            u = self._snapped(u)
            box.update(x0=min(start[0], u[0]), x1=max(start[0], u[0]),
                       y0=min(start[1], u[1]), y1=max(start[1], u[1]))
        elif mode == "move":
            w, h = box0["x1"] - box0["x0"], box0["y1"] - box0["y0"]
            x0 = max(0.0, min(1.0 - w, box0["x0"] + dx))
            y0 = max(0.0, min(1.0 - h, box0["y0"] + dy))
            if self.snap:
                x0, y0 = align.snap_moved({**box0, "x0": x0, "y0": y0, "x1": x0 + w, "y1": y0 + h},
                                          1.0 / align.GRID)
            box = paint.moved_box(box0, x0, y0) if box0.get("mask") is not None else \
                {**box0, "x0": x0, "y0": y0, "x1": x0 + w, "y1": y0 + h}
        else:
            corner = mode.split(":")[1]
            xk = "x0" if corner[1] == "l" else "x1"
            yk = "y0" if corner[0] == "t" else "y1"
            box[xk], box[yk] = self._snapped((clamp01(box0[xk] + dx), clamp01(box0[yk] + dy)))
            box["x0"], box["x1"] = sorted((box["x0"], box["x1"]))
            box["y0"], box["y1"] = sorted((box["y0"], box["y1"]))
        self.boxes[i] = box
        self.update()

    def mouseReleaseEvent(self, event):
        if event.button() != QtCore.Qt.LeftButton:
            return
        if self._stroke is not None:
            self._stroke_release()
            return
        if self._drag is None:
            return
        mode, i, _start, box0 = self._drag
        self._drag = None
        box = self.boxes[i]
        if box["x1"] - box["x0"] < MIN_BOX or box["y1"] - box["y0"] < MIN_BOX:
            if mode == "draw":  # a click on empty canvas: no box
                del self.boxes[i]
                self.select(-1)
            else:
                self.boxes[i] = box0
            self.update()
            if mode == "draw":
                return
        if i < len(self.boxes) and mode.startswith("resize") and box0.get("mask") is not None:
            # a painted region stretches its shape into the new rectangle
            grid = paint.refit(paint.decode(box0["mask"]), self.boxes[i])
            self.boxes[i] = paint.with_grid(box0, grid) or box0
        elif i < len(self.boxes) and self.boxes[i].get("mask") is None:
            # 4 decimals: a tenth of a pixel at 8K (a region's rectangle is its mask's extent)
            self.boxes[i] = {k: (round(v, 4) if k in ("x0", "y0", "x1", "y1") else v)
                             for k, v in self.boxes[i].items()}
        if mode != "draw" and i < len(self.boxes) and self.boxes[i] == box0:
            return  # a click that selected a box
        self.committed.emit(copy.deepcopy(self.boxes))

    # -- brush and eraser -------------------------------------------------------------------
    def _cell(self, pos: QtCore.QPointF, grid: paint.Grid) -> tuple[float, float]:
        r = self.image_rect()
        return ((pos.x() - r.x()) / r.width() * len(grid[0]),
                (pos.y() - r.y()) / r.height() * len(grid))

    def _stroke_press(self, pos: QtCore.QPointF) -> None:
        i = self.selected if 0 <= self.selected < len(self.boxes) else -1
        if i < 0 and self.tool == "eraser":
            self.message.emit("layout: select a painted region to erase from")
            return
        if i < 0 and not self.image_rect().contains(pos):
            return
        if i >= 0 and self.boxes[i].get("mask") is not None:
            grid = paint.decode(self.boxes[i]["mask"])
        elif i >= 0:  # painting on a plain box makes it a region, starting from its rectangle
            grid = paint.rect_grid(self.boxes[i], *self.mask_shape())
        else:
            grid = paint.empty_grid(*self.mask_shape())
        if i >= 0:
            self.extra = set()
        self._stroke = {"index": i, "grid": grid, "at": None,
                        "value": 0 if self.tool == "eraser" else 1}
        self._stroke_to(pos)

    def _stroke_to(self, pos: QtCore.QPointF) -> None:
        s = self._stroke
        p = self._cell(pos, s["grid"])
        paint.paint_segment(s["grid"], s["at"] or p, p, self.brush_size / 2, s["value"])
        s["at"] = p
        self.update()

    def _stroke_release(self) -> None:
        s, self._stroke = self._stroke, None
        i = s["index"]
        if i < 0:
            new = paint.region(s["grid"])
            if new is None:
                self.update()
                return
            self.boxes.append(new)
            self.select(len(self.boxes) - 1)
        else:
            new = paint.with_grid(self.boxes[i], s["grid"])
            if new is None:  # everything erased: the region goes (undo brings it back)
                del self.boxes[i]
                self.select(min(i, len(self.boxes) - 1))
                self.message.emit("layout: the region was erased completely and is removed")
            elif new == self.boxes[i]:
                self.update()
                return
            else:
                self.boxes[i] = new
        self.update()
        self.committed.emit(copy.deepcopy(self.boxes))

    def event(self, event):
        # Delete here removes a box: claim the key before the window's "delete nodes" shortcut
        if event.type() == QtCore.QEvent.ShortcutOverride and \
                event.key() in (QtCore.Qt.Key_Delete, QtCore.Qt.Key_Backspace) and self.selected >= 0:
            event.accept()
            return True
        return super().event(event)

    def keyPressEvent(self, event):
        if event.key() in (QtCore.Qt.Key_Delete, QtCore.Qt.Key_Backspace):
            self.delete_selected()
            return
        super().keyPressEvent(event)

    def leaveEvent(self, event):
        self._hover = None
        self.update()
        super().leaveEvent(event)

    def _update_cursor(self, pos) -> None:
        if self.tool != "box":
            self.setCursor(QtCore.Qt.BlankCursor if self.image_rect().contains(pos) else QtCore.Qt.ArrowCursor)
            return
        if 0 <= self.selected < len(self.boxes):
            corner = self._corner_at(pos, self.selected)
            if corner:
                self.setCursor(QtCore.Qt.SizeFDiagCursor if corner in ("tl", "br") else QtCore.Qt.SizeBDiagCursor)
                return
        if self._box_at(pos) >= 0:
            self.setCursor(QtCore.Qt.SizeAllCursor)
        else:
            self.setCursor(QtCore.Qt.CrossCursor)

    def _region_image(self, mask: list, color: QtGui.QColor, alpha: int,
                      size: QtCore.QSize) -> QtGui.QPixmap:
        """A stored region's image at the drawn size, kept while the mask and the size are
        unchanged: repaints follow the mouse, and scaling a mask on every one costs ~7 ms."""
        rows = tuple(mask) if isinstance(mask[0], str) else tuple(paint.encode(paint.decode(mask)))
        key = (rows, color.name(), alpha, size.width(), size.height())
        pixmap = self._images.get(key)
        if pixmap is None:
            if len(self._images) > 64:
                self._images.clear()
            image = paint.grid_image(paint.decode(mask), color, alpha)
            pixmap = self._images[key] = QtGui.QPixmap.fromImage(
                image.scaled(size, QtCore.Qt.IgnoreAspectRatio, QtCore.Qt.FastTransformation))
        return pixmap

    # -- paint ---------------------------------------------------------------------------
    def paintEvent(self, event):
        p = QtGui.QPainter(self)
        p.setRenderHint(QtGui.QPainter.Antialiasing)
        p.fillRect(self.rect(), QtGui.QColor("#15171b"))
        r = self.image_rect()
        if self.background is not None and not self.background.isNull():
            small = self.background.width() * 2 <= r.width()
            p.setRenderHint(QtGui.QPainter.SmoothPixmapTransform, not small)
            p.drawImage(r, self.background)
            p.fillRect(r, QtGui.QColor(0, 0, 0, 70))  # so boxes stay readable over any image
        else:
            p.fillRect(r, QtGui.QColor("#23262d"))
        self._paint_grid(p, r)
        p.setPen(QtGui.QPen(QtGui.QColor("#3a3f4b"), 1))
        p.setBrush(QtCore.Qt.NoBrush)
        p.drawRect(r)
        picked = set(self.selection())
        for i, box in enumerate(self.boxes):
            self._paint_box(p, r, i, box, i in picked)
        for i, (tag, label, font) in enumerate(self.label_rects(p.font())):  # over every box
            p.setFont(font)
            p.fillRect(tag, QtGui.QColor(BOX_COLORS[i % len(BOX_COLORS)]))
            p.setPen(QtGui.QColor("#101216"))
            p.drawText(tag, QtCore.Qt.AlignCenter, label)
        if self._stroke is not None:  # the stroke in progress, over everything
            color = QtGui.QColor("#f0f2f5" if self._stroke["value"] else "#e5606a")
            p.setRenderHint(QtGui.QPainter.SmoothPixmapTransform, False)
            p.drawImage(r, paint.grid_image(self._stroke["grid"], color, 120))
        if self.tool != "box" and self._hover is not None and r.contains(self._hover):
            rows, cols = self.mask_shape()
            radius = self.brush_size / 2 * r.width() / cols
            p.setBrush(QtCore.Qt.NoBrush)
            p.setPen(QtGui.QPen(QtGui.QColor("#f0f2f5"), 1.2))
            p.drawEllipse(self._hover, radius, radius)
        if not self.enabled_for_node:
            p.setPen(QtGui.QColor("#8c93a1"))
            p.drawText(self.rect(), QtCore.Qt.AlignCenter | QtCore.Qt.TextWordWrap,
                       "Select a Layout node to draw its boxes")
        p.end()

    def _paint_grid(self, p: QtGui.QPainter, r: QtCore.QRectF) -> None:
        """Eighths guides on a blank canvas; the snap grid whenever snapping is on."""
        lines = align.GRID if self.snap else (8 if self.background is None else 0)
        if not lines:
            return
        p.setPen(QtGui.QPen(QtGui.QColor("#3a4050" if self.snap else "#2e323a"), 1))
        for k in range(1, lines):
            x = r.x() + r.width() * k / lines
            y = r.y() + r.height() * k / lines
            p.drawLine(QtCore.QPointF(x, r.top()), QtCore.QPointF(x, r.bottom()))
            p.drawLine(QtCore.QPointF(r.left(), y), QtCore.QPointF(r.right(), y))

    def label_rects(self, base: Optional[QtGui.QFont] = None) -> list[tuple[QtCore.QRectF, str, QtGui.QFont]]:
        """Each box's (tag rectangle, label, font), placed so no two tags overlap: above its
        box, else below it, else inside its top or bottom edge, else stacked under the tags in
        the way (the first place that stays on the image and is free)."""
        r = self.image_rect()
        picked = set(self.selection())
        placed: list[QtCore.QRectF] = []
        out = []
        for i, box in enumerate(self.boxes):
            label = box.get("phrase") or (f"region {i + 1}" if box.get("mask") else f"box {i + 1}")
            font = QtGui.QFont(base if base is not None else self.font())
            font.setBold(i in picked)
            fm = QtGui.QFontMetricsF(font)
            w, h = fm.horizontalAdvance(label) + 8, fm.height() + 2
            br = self.box_rect(box)
            x = min(br.x(), r.right() - w) if w < r.width() else r.x()
            tops = [br.y() - h, br.bottom() + 1, br.y() + 1, br.bottom() - h - 1]
            tops += [t.bottom() + 1 for t in placed]  # under a tag that is in the way
            on_image = [t for t in tops if r.top() <= t and t + h <= r.bottom()] or [max(r.top(), br.y() + 1)]
            free = [t for t in on_image
                    if not any(QtCore.QRectF(x, t, w, h).intersects(q) for q in placed)]
            tag = QtCore.QRectF(x, (free or on_image)[0], w, h)
            placed.append(tag)
            out.append((tag, label, font))
        return out

    def _paint_box(self, p: QtGui.QPainter, r: QtCore.QRectF, i: int, box: dict, picked: bool) -> None:
        color = QtGui.QColor(BOX_COLORS[i % len(BOX_COLORS)])
        current = i == self.selected
        br = self.box_rect(box)
        fill = QtGui.QColor(color)
        mask = box.get("mask")
        if mask:  # a painted region (over the whole image) that stands in for the rectangle
            p.setRenderHint(QtGui.QPainter.SmoothPixmapTransform, False)
            size = QtCore.QSize(max(1, round(r.width())), max(1, round(r.height())))
            p.drawPixmap(r.topLeft(), self._region_image(mask, color, 150 if current else 110, size))
            fill.setAlpha(0)
            pen = QtGui.QPen(color, 2.0 if current else 1.0, QtCore.Qt.DashLine)
        else:
            fill.setAlpha(60 if current else 35)
            pen = QtGui.QPen(color, 2.2 if current else (1.8 if picked else 1.4))
        p.setBrush(fill)
        p.setPen(pen)
        p.drawRect(br)
        if current and self.tool == "box":
            p.setBrush(QtGui.QColor("#f0f2f5"))
            p.setPen(QtGui.QPen(color, 1))
            for c in (br.topLeft(), br.topRight(), br.bottomLeft(), br.bottomRight()):
                p.drawRect(QtCore.QRectF(c.x() - HANDLE / 2, c.y() - HANDLE / 2, HANDLE, HANDLE))


class LayoutPanel(paint.PaintActions, QtWidgets.QWidget):
    """The canvas, its tools and a phrase field for the selected box, bound to one Layout node."""

    message = QtCore.Signal(str)

    def __init__(self, doc: Document, parent=None):
        super().__init__(parent)
        self.doc = doc
        self.node_id: Optional[str] = None
        self.canvas = BoxCanvas()
        self.title = QtWidgets.QLabel("")
        self.title.setObjectName("Hint")
        # the title may be cut rather than widen the right column (its tooltip has it whole)
        self.title.setSizePolicy(QtWidgets.QSizePolicy.Ignored, QtWidgets.QSizePolicy.Preferred)
        self.phrase = QtWidgets.QLineEdit()
        self.phrase.setPlaceholderText("phrase for the selected box or region, e.g. “a red circle”")
        self.phrase.setEnabled(False)
        self.delete_btn = QtWidgets.QToolButton()
        self.delete_btn.setText("Delete")
        self.delete_btn.setToolTip("delete the selected box or region (Delete)")
        self.delete_btn.clicked.connect(self.canvas.delete_selected)
        self.image_box = QtWidgets.QCheckBox("Over image")
        self.image_box.setToolTip("draw over the latest image (off: a blank canvas of the node's size)")
        self.image_box.setChecked(True)
        self.image_box.toggled.connect(self._refresh_background)
        self.tools = paint.PaintBar()
        self.tools.tool_changed.connect(self.set_tool)
        self.tools.size.valueChanged.connect(self._brush_size)
        self.tools.clear_action.triggered.connect(self.clear_mask)
        self.tools.import_action.triggered.connect(lambda: self.import_mask())
        self.snap_box = QtWidgets.QCheckBox("Snap")
        self.snap_box.setToolTip(f"snap boxes to a grid of 1/{align.GRID} of the image")
        self.snap_box.toggled.connect(self._snap_toggled)
        self.align_btn = QtWidgets.QToolButton()
        self.align_btn.setText("Align")
        self.align_btn.setToolTip("line up the selected boxes (shift-click to select several)")
        self.align_btn.setPopupMode(QtWidgets.QToolButton.InstantPopup)
        menu = QtWidgets.QMenu(self.align_btn)
        for how, text in (("left", "Left edges"), ("right", "Right edges"), ("top", "Top edges"),
                          ("bottom", "Bottom edges"), ("hcenter", "Centres, horizontally"),
                          ("vcenter", "Centres, vertically")):
            menu.addAction(text, lambda h=how: self.align_selected(h))
        menu.addSeparator()
        menu.addAction("Distribute horizontally", lambda: self.distribute_selected("x"))
        menu.addAction("Distribute vertically", lambda: self.distribute_selected("y"))
        self.align_btn.setMenu(menu)
        row = QtWidgets.QHBoxLayout()
        row.addWidget(self.phrase, 1)
        row.addWidget(self.delete_btn)
        top = QtWidgets.QHBoxLayout()
        top.addWidget(self.title, 1)
        top.addWidget(self.snap_box)
        top.addWidget(self.align_btn)
        top.addWidget(self.image_box)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.addLayout(top)
        lay.addWidget(self.tools)
        lay.addWidget(self.canvas, 1)
        lay.addLayout(row)
        self.hint = QtWidgets.QLabel()
        self.hint.setObjectName("Hint")
        self.hint.setWordWrap(True)
        lay.addWidget(self.hint)
        self.latest_image: Optional[QtGui.QImage] = None
        self.canvas.committed.connect(self._commit)
        self.canvas.selection_changed.connect(self._on_box_selected)
        self.canvas.message.connect(self.message)
        self.phrase.editingFinished.connect(self._phrase_edited)
        doc.node_changed.connect(self._on_node_changed)
        doc.structure_changed.connect(self._on_structure)
        doc.replaced.connect(lambda: self.set_node(None))
        self.set_tool("box")
        self.set_node(None)

    def set_node(self, node_id: Optional[str]) -> None:
        """Bind to a Layout node (anything with a `boxes` Json param), or to nothing."""
        node = self.doc.graph.nodes.get(node_id) if node_id else None
        spec = registry.get(node.type) if node else None
        if spec is None or "boxes" not in spec.params:
            node_id = None
        self.node_id = node_id
        self.canvas.enabled_for_node = node_id is not None
        self.canvas.selected = -1
        self._reload()

    def set_image(self, image: Optional[QtGui.QImage]) -> None:
        self.latest_image = image
        self._refresh_background()

    def _refresh_background(self, *_):
        self.canvas.background = self.latest_image if self.image_box.isChecked() else None
        if self.canvas.background is not None and self.node_id is None:
            self.canvas.size_px = (self.latest_image.width(), self.latest_image.height())
        self._reload()

    def _params(self) -> Optional[dict]:
        node = self.doc.graph.nodes.get(self.node_id) if self.node_id else None
        if node is None:
            return None
        return registry.get(node.type).resolved_params(node.params)

    def _reload(self) -> None:
        params = self._params()
        if params is None:
            self.title.setText("No Layout node selected")
            self.canvas.set_boxes([])
        else:
            node = self.doc.graph.nodes[self.node_id]
            w, h = int(params.get("width", 512)), int(params.get("height", 512))
            self.canvas.size_px = (w, h)
            count = len(params["boxes"] or [])
            # short enough for the tool row of a narrow column; the tooltip names the node too
            self.title.setText(f"{w}×{h} · {count} box{'' if count == 1 else 'es'}")
            self.title.setToolTip(f"{node.title or node.type}: {self.title.text()}")
            self.canvas.set_boxes(params["boxes"] or [])
        self._on_box_selected(self.canvas.selected)
        self.canvas.update()

    def _commit(self, boxes: list) -> None:
        if self.node_id is None:
            return
        problem = self.doc.set_param(self.node_id, "boxes", boxes)
        if problem:
            self.message.emit(f"boxes: {problem}")
            self._reload()

    def _on_box_selected(self, index: int) -> None:
        ok = 0 <= index < len(self.canvas.boxes)
        self.phrase.setEnabled(ok)
        self.delete_btn.setEnabled(ok)
        self.phrase.setText(self.canvas.boxes[index].get("phrase", "") if ok else "")

    def _phrase_edited(self) -> None:
        i = self.canvas.selected
        if 0 <= i < len(self.canvas.boxes) and self.canvas.boxes[i].get("phrase", "") != self.phrase.text():
            boxes = copy.deepcopy(self.canvas.boxes)
            boxes[i]["phrase"] = self.phrase.text()
            self._commit(boxes)

    def _on_node_changed(self, node_id: str) -> None:
        if node_id == self.node_id:
            self._reload()

    def _on_structure(self) -> None:
        if self.node_id is not None and self.node_id not in self.doc.graph.nodes:
            self.set_node(None)
