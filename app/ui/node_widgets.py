"""What the canvas draws on a node besides NodeGraphQt's own: its settings (one painted panel
below its ports), its run-state badge and its latest image.

Rows by param kind: numbers (drag left/right to change, click an arrow to step, double-click to
type), choices (click for the list), toggles (click), text (a box; multi-line prompts show a
few lines; click to edit in place), paths (the file name; click to edit), JSON (a summary; edit
it in the inspector). Every edit calls `commit(name, value, merge)`, which the canvas binds to
Document.set_param, the call the inspector makes: the same checks, the same undo steps.

Painted, not QWidgets in QGraphicsProxyWidgets: a 200-node graph would hold a thousand proxy
widgets, and Qt repaints each through its own widget backing store, which makes panning stutter.
Only the one field being typed in is a real widget, for as long as it is edited.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

from PySide6 import QtCore, QtGui, QtWidgets

from nodes.base import Bool, Choice, Float, Int, Json, Param, Path, Seed, String

ROW_H = 21.0
TEXT_LINES = 3         # lines a multi-line prompt shows on the node
PANEL_W = 190.0        # the panel's least width (scene units)
PAD = 7.0
DRAG_PX = 6.0          # horizontal pixels of drag per step
LOD_TEXT = 0.45        # below this zoom only the boxes are drawn (text would be a smudge)

FIELD = QtGui.QColor(16, 18, 22, 170)
FIELD_HOVER = QtGui.QColor(40, 44, 54, 200)
LABEL = QtGui.QColor(160, 166, 178)
VALUE = QtGui.QColor(232, 235, 240)
BAD = QtGui.QColor("#e57373")
ACCENT = QtGui.QColor("#6aa7e8")


def decimals_for(step: float) -> int:
    text = f"{step:.6f}".rstrip("0")
    return max(1, len(text.split(".")[1])) if "." in text else 1


def shown_value(param: Param, value: Any) -> str:
    if isinstance(param, Bool):
        return "on" if value else "off"
    if isinstance(param, Float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.{decimals_for(param.step)}f}"
    if isinstance(param, Path) and isinstance(value, str):
        name = value.split(":", 1)[1] if value.startswith(("ckpt:", "builtin:")) else os.path.basename(value.rstrip("/"))
        return name or "(none)"
    if isinstance(param, Json):
        if isinstance(value, list):
            return f"{len(value)} item(s)"
        return "set" if value else "(none)"
    if isinstance(param, String):
        return " ".join(str(value).split()) if isinstance(value, str) else repr(value)
    return str(value)


def wrapped_lines(text: str, font: QtGui.QFont, width: float, max_lines: int) -> list[str]:
    """`text` word-wrapped to `width`, at most `max_lines` whole lines; when it needs more, the
    last one ends in an ellipsis (rather than a line cut through by the field's edge)."""
    layout = QtGui.QTextLayout(text.replace("\n", "\u2028"), font)
    option = QtGui.QTextOption()
    option.setWrapMode(QtGui.QTextOption.WrapAtWordBoundaryOrAnywhere)
    layout.setTextOption(option)
    layout.beginLayout()
    spans = []
    while True:
        line = layout.createLine()
        if not line.isValid():
            break
        line.setLineWidth(width)
        spans.append((line.textStart(), line.textLength()))
    layout.endLayout()
    flat = layout.text()
    lines = [flat[a:a + n].rstrip("\u2028 ") for a, n in spans]
    if len(lines) <= max_lines:
        return lines
    if max_lines <= 0:
        return []
    rest = flat[spans[max_lines - 1][0]:].replace("\u2028", " ")
    return lines[:max_lines - 1] + [QtGui.QFontMetricsF(font).elidedText(rest, QtCore.Qt.ElideRight, width)]


@dataclass
class Row:
    name: str
    param: Param
    top: float
    height: float

    @property
    def multiline(self) -> bool:
        return isinstance(self.param, String) and not isinstance(self.param, Path) and self.param.multiline


def rows_for(params: dict[str, Param]) -> list[Row]:
    rows, y = [], PAD / 2
    for name, param in params.items():
        h = ROW_H
        if isinstance(param, String) and not isinstance(param, Path) and param.multiline:
            h = ROW_H * 0.8 + TEXT_LINES * 14.5 + 6
        rows.append(Row(name, param, y, h))
        y += h + 3
    return rows


class ParamPanel(QtWidgets.QGraphicsObject):
    """The settings of one node, painted; edits go to `commit(name, value, merge) -> problem`."""

    def __init__(self, parent: QtWidgets.QGraphicsItem, params: dict[str, Param],
                 commit: Callable[[str, Any, bool], Optional[str]]):
        super().__init__(parent)
        self.params, self.commit = params, commit
        self.rows = rows_for(params)
        self.values: dict[str, Any] = {n: p.default for n, p in params.items()}
        self.width = PANEL_W
        self.font = QtGui.QFont()
        self.font.setPointSizeF(9.0)
        self.bold = QtGui.QFont(self.font)
        self.bold.setBold(True)
        self._metrics, self._bold_metrics = QtGui.QFontMetricsF(self.font), QtGui.QFontMetricsF(self.bold)
        self._hover: Optional[str] = None
        self._press: Optional[tuple[Row, QtCore.QPointF, Any]] = None
        self._dragged = False
        self._editor: Optional[QtWidgets.QGraphicsProxyWidget] = None
        self.setAcceptHoverEvents(True)
        self.setAcceptedMouseButtons(QtCore.Qt.LeftButton)
        self.setCacheMode(QtWidgets.QGraphicsItem.DeviceCoordinateCache)
        self.setFlag(QtWidgets.QGraphicsItem.ItemUsesExtendedStyleOption)  # gives paint exposedRect
        self.setZValue(2)

    # -- geometry --------------------------------------------------------------------------
    def height(self) -> float:
        return (self.rows[-1].top + self.rows[-1].height + PAD / 2) if self.rows else 0.0

    def set_width(self, width: float) -> None:
        if width != self.width:
            self.prepareGeometryChange()
            self.width = width
            self.update()

    def boundingRect(self) -> QtCore.QRectF:
        return QtCore.QRectF(0, 0, self.width, self.height())

    def row_rect(self, row: Row) -> QtCore.QRectF:
        return QtCore.QRectF(PAD, row.top, self.width - 2 * PAD, row.height)

    def row_at(self, pos: QtCore.QPointF) -> Optional[Row]:
        return next((r for r in self.rows if self.row_rect(r).contains(pos)), None)

    # -- values ----------------------------------------------------------------------------
    def set_values(self, values: dict[str, Any]) -> None:
        if values != self.values:
            self.values = dict(values)
            self.update()

    def problem(self, name: str) -> Optional[str]:
        return self.params[name].check(self.values.get(name))

    def _edit(self, row: Row, value: Any, merge: bool = False) -> None:
        self.commit(row.name, value, merge)

    # -- painting --------------------------------------------------------------------------
    def paint(self, painter, option, widget=None):
        lod = option.levelOfDetailFromTransform(painter.worldTransform())
        exposed = option.exposedRect  # the device cache asks for strips as a panel scrolls in
        painter.setRenderHint(QtGui.QPainter.Antialiasing)
        for row in self.rows:
            rect = self.row_rect(row)
            if not rect.intersects(exposed):
                continue
            painter.setPen(QtCore.Qt.NoPen)
            painter.setBrush(FIELD_HOVER if row.name == self._hover else FIELD)
            painter.drawRoundedRect(rect, 4, 4)
            if lod < LOD_TEXT:
                continue
            self._paint_row(painter, row, rect)

    def _paint_row(self, painter, row: Row, rect: QtCore.QRectF) -> None:
        param, value = row.param, self.values.get(row.name)
        bad = self.problem(row.name)
        label = row.name.replace("_", " ")
        painter.setFont(self.font)
        fm = self._metrics
        inner = rect.adjusted(7, 0, -7, 0)
        if row.multiline:
            head = QtCore.QRectF(inner.left(), rect.top() + 1, inner.width(), ROW_H * 0.8)
            painter.setPen(LABEL)
            painter.drawText(head, QtCore.Qt.AlignVCenter | QtCore.Qt.AlignLeft, label)
            body = QtCore.QRectF(inner.left(), head.bottom(), inner.width(), rect.bottom() - head.bottom() - 3)
            painter.setPen(BAD if bad else VALUE)
            text = bad if bad else (value if isinstance(value, str) else repr(value))
            y = body.top()
            for line in wrapped_lines(text, self.font, body.width(), int(body.height() // fm.lineSpacing())):
                painter.drawText(QtCore.QPointF(body.left(), y + fm.ascent()), line)
                y += fm.lineSpacing()
            return
        if isinstance(param, Bool):
            dot = QtCore.QRectF(inner.right() - 24, rect.center().y() - 6, 24, 12)
            on = bool(value) if not bad else False
            painter.setPen(QtCore.Qt.NoPen)
            painter.setBrush(ACCENT if on else QtGui.QColor(70, 74, 84))
            painter.drawRoundedRect(dot, 6, 6)
            painter.setBrush(VALUE)
            painter.drawEllipse(QtCore.QRectF(dot.right() - 11 if on else dot.left() + 1, dot.top() + 1, 10, 10))
            inner.setRight(dot.left() - 6)
        numeric = isinstance(param, (Int, Float)) and not isinstance(param, Bool)
        if numeric:
            painter.setPen(LABEL)
            painter.drawText(QtCore.QRectF(rect.left() + 2, rect.top(), 10, rect.height()), QtCore.Qt.AlignCenter, "‹")
            painter.drawText(QtCore.QRectF(rect.right() - 12, rect.top(), 10, rect.height()), QtCore.Qt.AlignCenter, "›")
            inner = rect.adjusted(14, 0, -14, 0)
        painter.setPen(LABEL)
        label_w = min(fm.horizontalAdvance(label) + 8, inner.width() * (1.0 if isinstance(param, Bool) else 0.55))
        painter.drawText(QtCore.QRectF(inner.left(), rect.top(), label_w, rect.height()),
                         QtCore.Qt.AlignVCenter | QtCore.Qt.AlignLeft, fm.elidedText(label, QtCore.Qt.ElideRight, label_w))
        if isinstance(param, Bool) and not bad:
            return
        text = "invalid: " + shown_value(String(), value) if bad else shown_value(param, value)
        if isinstance(param, Choice) and not bad:
            text += "  ▾"
        space = inner.width() - label_w
        painter.setPen(BAD if bad else VALUE)
        painter.setFont(self.bold if not bad else self.font)
        painter.drawText(QtCore.QRectF(inner.left() + label_w, rect.top(), space, rect.height()),
                         QtCore.Qt.AlignVCenter | QtCore.Qt.AlignRight,
                         self._bold_metrics.elidedText(text, QtCore.Qt.ElideMiddle, space))

    # -- mouse -----------------------------------------------------------------------------
    def hoverMoveEvent(self, event):
        row = self.row_at(event.pos())
        name = row.name if row else None
        if name != self._hover:
            self._hover = name
            self.setToolTip(self._tip(row) if row else "")
            if row is not None and isinstance(row.param, (Int, Float)):
                self.setCursor(QtCore.Qt.SizeHorCursor)
            else:
                self.unsetCursor()
            self.update()

    def hoverLeaveEvent(self, event):
        self._hover = None
        self.unsetCursor()
        self.update()

    def _tip(self, row: Row) -> str:
        bad = self.problem(row.name)
        help_text = row.param.help or row.name
        if bad:
            return f"{row.name}: {bad}\n{help_text}"
        if isinstance(row.param, (Int, Float)):
            return f"{help_text}\ndrag sideways or click the arrows to change; double-click to type"
        return help_text

    def mousePressEvent(self, event):
        row = self.row_at(event.pos())
        if row is None or event.button() != QtCore.Qt.LeftButton:
            event.ignore()  # between rows: the node takes it (select, move)
            return
        self._press, self._dragged = (row, event.scenePos(), self.values.get(row.name)), False
        event.accept()

    def mouseMoveEvent(self, event):
        if self._press is None:
            return
        row, start, value = self._press
        if not isinstance(row.param, (Int, Float)) or isinstance(row.param, Bool) or self.problem(row.name):
            return
        view = event.widget()
        scale = view.parentWidget().transform().m11() if view is not None and view.parentWidget() else 1.0
        dx = (event.scenePos().x() - start.x()) * scale
        if not self._dragged and abs(dx) < 3:
            return
        self._dragged = True
        self._edit(row, self._stepped(row.param, value, int(dx / DRAG_PX)), merge=True)

    def mouseReleaseEvent(self, event):
        if self._press is None:
            return
        row, _start, value = self._press
        self._press = None
        if self._dragged:
            return
        self.click(row, event.pos())

    def mouseDoubleClickEvent(self, event):
        row = self.row_at(event.pos())
        if row is not None and isinstance(row.param, (Int, Float)):
            self.open_editor(row)
            event.accept()
        else:
            event.ignore()

    def click(self, row: Row, pos: QtCore.QPointF) -> None:
        """What a click on a row does (also what tests call)."""
        param, value = row.param, self.values.get(row.name)
        rect = self.row_rect(row)
        if isinstance(param, Bool):
            self._edit(row, not bool(value))
        elif isinstance(param, (Int, Float)):
            if self.problem(row.name):
                self.open_editor(row)
            elif pos.x() < rect.left() + 16:
                self._edit(row, self._stepped(param, value, -1), merge=True)
            elif pos.x() > rect.right() - 16:
                self._edit(row, self._stepped(param, value, 1), merge=True)
        elif isinstance(param, Choice):
            self._choose(row)
        elif isinstance(param, String):
            self.open_editor(row)

    @staticmethod
    def _stepped(param, value, steps: int):
        value = value + steps * param.step
        if param.min is not None:
            value = max(param.min, value)
        if param.max is not None:
            value = min(param.max, value)
        if isinstance(param, Float):
            return round(float(value), decimals_for(param.step) + 2)
        return int(value)

    def _choose(self, row: Row) -> None:
        menu = QtWidgets.QMenu()
        for option in row.param.options:
            act = menu.addAction(option)
            act.setCheckable(True)
            act.setChecked(option == self.values.get(row.name))
        view = self.scene().views()[0] if self.scene() and self.scene().views() else None
        at = QtGui.QCursor.pos()
        if view is not None:
            at = view.mapToGlobal(view.mapFromScene(self.mapToScene(self.row_rect(row).bottomLeft())))
        chosen = menu.exec(at)
        if chosen is not None:
            self._edit(row, chosen.text())

    # -- typing in place --------------------------------------------------------------------
    def open_editor(self, row: Row) -> None:
        self.close_editor()
        param, value = row.param, self.values.get(row.name)
        if row.multiline:
            edit = QtWidgets.QPlainTextEdit(value if isinstance(value, str) else "")
        else:
            text = shown_value(param, value) if isinstance(param, Float) and not self.problem(row.name) else \
                (value if isinstance(value, str) else str(value))
            edit = QtWidgets.QLineEdit(text)
            edit.selectAll()
        edit.setObjectName(f"node-editor:{row.name}")
        edit.setStyleSheet("background:#101216; color:#e8ebf0; border:1px solid #6aa7e8; font-size:8pt;")
        proxy = QtWidgets.QGraphicsProxyWidget(self)
        proxy.setWidget(edit)
        rect = self.row_rect(row)
        proxy.setPos(rect.topLeft())
        proxy.resize(rect.width(), rect.height())
        proxy.setZValue(10)
        self._editor = proxy
        self._editing = row
        edit.installEventFilter(self)
        if isinstance(edit, QtWidgets.QLineEdit):
            edit.returnPressed.connect(self.finish_editor)
        edit.setFocus()

    def editor(self) -> Optional[QtWidgets.QWidget]:
        """The field being typed in, while one is."""
        return self._editor.widget() if self._editor is not None else None

    def eventFilter(self, obj, event):
        if event.type() == QtCore.QEvent.KeyPress:
            if event.key() == QtCore.Qt.Key_Escape:
                self.close_editor()
                return True
            if event.key() in (QtCore.Qt.Key_Return, QtCore.Qt.Key_Enter) \
                    and event.modifiers() & QtCore.Qt.ControlModifier:
                self.finish_editor()
                return True
        elif event.type() == QtCore.QEvent.FocusOut:
            QtCore.QTimer.singleShot(0, self.finish_editor)
        return False

    def finish_editor(self) -> None:
        """Commit what was typed (a number is parsed by the param; bad text is refused)."""
        if self._editor is None:
            return
        row, edit = self._editing, self._editor.widget()
        text = edit.toPlainText() if isinstance(edit, QtWidgets.QPlainTextEdit) else edit.text()
        self.close_editor()
        try:
            value = row.param.parse(text) if isinstance(row.param, (Int, Float)) else text
        except ValueError:
            self.commit(row.name, text, False)  # the document refuses it, with the reason
            return
        if value != self.values.get(row.name):
            self._edit(row, value, merge=self.merges_typing(row))

    @staticmethod
    def merges_typing(row: Row) -> bool:
        """Whether typed edits merge into one undo step: as the inspector's field of that kind
        does (spin boxes and the prompt box merge; seed, line and path fields do not)."""
        return row.multiline or (isinstance(row.param, (Int, Float)) and not isinstance(row.param, Seed))

    def close_editor(self) -> None:
        if self._editor is not None:
            proxy, self._editor = self._editor, None
            proxy.widget().removeEventFilter(self)
            proxy.setParentItem(None)
            if proxy.scene() is not None:
                proxy.scene().removeItem(proxy)
            proxy.deleteLater()


# -- a node's run state and latest image --------------------------------------------------------
class BadgeItem(QtWidgets.QGraphicsItem):
    """A small coloured pill above a node: its run state ("running 4/20", "failed", ...)."""

    def __init__(self, parent):
        super().__init__(parent)
        self.text, self.color = "", QtGui.QColor("#666")
        self.font = QtGui.QFont()
        self.font.setPointSizeF(7.5)
        self.font.setBold(True)
        self.setZValue(5)
        self.setAcceptHoverEvents(True)

    def set(self, text: str, color: str, tooltip: str = "") -> None:
        self.prepareGeometryChange()
        self.text, self.color = text, QtGui.QColor(color)
        self.setToolTip(tooltip)
        self.setVisible(bool(text))
        self.update()

    def _size(self) -> QtCore.QSizeF:
        m = QtGui.QFontMetricsF(self.font)
        return QtCore.QSizeF(m.horizontalAdvance(self.text) + 12, m.height() + 4)

    def boundingRect(self):
        s = self._size()
        return QtCore.QRectF(0, 0, s.width(), s.height())

    def paint(self, painter, option, widget=None):
        r = self.boundingRect()
        painter.setRenderHint(QtGui.QPainter.Antialiasing)
        painter.setPen(QtCore.Qt.NoPen)
        painter.setBrush(self.color)
        painter.drawRoundedRect(r, r.height() / 2, r.height() / 2)
        painter.setFont(self.font)
        painter.setPen(QtGui.QColor("#101216") if self.color.lightness() > 110 else QtGui.QColor("#f0f2f5"))
        painter.drawText(r, QtCore.Qt.AlignCenter, self.text)


class ThumbItem(QtWidgets.QGraphicsPixmapItem):
    """A node's latest image (a preview while sampling, the result after), below the node."""

    def __init__(self, parent):
        super().__init__(parent)
        self.setZValue(-1)
        self.setVisible(False)

    def show_image(self, image: QtGui.QImage, width: float) -> None:
        pix = QtGui.QPixmap.fromImage(image)
        self.setPixmap(pix)
        scale = width / max(1, pix.width())
        self.setScale(scale)
        # Hard pixels for small images (the built-in model makes 32x32): blurring them up lies.
        small = pix.width() * 2 <= width
        self.setTransformationMode(QtCore.Qt.FastTransformation if small else QtCore.Qt.SmoothTransformation)
        self.setVisible(True)
