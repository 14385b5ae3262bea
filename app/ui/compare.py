"""Compare two results: side by side (zoom and pan move both) or on one another with an A/B
slider (left of the line is A, right of it B).

Both views draw B over A's rectangle, so two images of different sizes still line up corner to
corner (an upscaled result against its source, say).
"""

from __future__ import annotations

from typing import Optional

from PySide6 import QtCore, QtGui, QtWidgets

from .image_viewer import ZoomView

SIDE_BY_SIDE, SLIDER = "side by side", "A/B slider"


def _image(source) -> QtGui.QImage:
    return source if isinstance(source, QtGui.QImage) else QtGui.QImage(str(source))


class SliderCompare(QtWidgets.QWidget):
    """A over B split by a vertical line: drag with the left button to move the line, wheel to
    zoom about the cursor, drag with the middle or right button to pan, double-click to fit."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.a = self.b = QtGui.QImage()
        self.labels = ("A", "B")
        self.split = 0.5           # where the line is, as a fraction of the widget's width
        self.zoom: Optional[float] = None  # None: fitted
        self.center = QtCore.QPointF(0, 0)  # the image point at the widget's centre
        self._pan_from: Optional[tuple] = None
        self.smooth = True
        self.setMouseTracking(True)
        self.setMinimumSize(160, 120)
        self.setCursor(QtCore.Qt.SplitHCursor)

    def set_images(self, a: QtGui.QImage, b: QtGui.QImage, labels=("A", "B")) -> None:
        self.a, self.b, self.labels = a, b, tuple(labels)
        self.center = QtCore.QPointF(a.width() / 2, a.height() / 2)
        self.zoom = None
        self.update()

    def fit_scale(self) -> float:
        if self.a.isNull():
            return 1.0
        return min(self.width() / max(1, self.a.width()), self.height() / max(1, self.a.height()))

    def scale(self) -> float:
        return self.fit_scale() if self.zoom is None else self.zoom

    def image_rect(self) -> QtCore.QRectF:
        """Where A (and B over it) is drawn, in widget coordinates."""
        s = self.scale()
        c = self.center if self.zoom is not None else QtCore.QPointF(self.a.width() / 2, self.a.height() / 2)
        w, h = self.a.width() * s, self.a.height() * s
        return QtCore.QRectF(self.width() / 2 - c.x() * s, self.height() / 2 - c.y() * s, w, h)

    def split_x(self) -> float:
        return self.split * self.width()

    def paintEvent(self, _event):
        p = QtGui.QPainter(self)
        p.fillRect(self.rect(), QtGui.QColor("#101114"))
        if self.a.isNull():
            return
        p.setRenderHint(QtGui.QPainter.SmoothPixmapTransform, self.smooth and self.scale() < 2)
        target = self.image_rect()
        x = self.split_x()
        p.save()
        p.setClipRect(QtCore.QRectF(0, 0, x, self.height()))
        p.drawImage(target, self.a)
        p.restore()
        if not self.b.isNull():
            p.save()
            p.setClipRect(QtCore.QRectF(x, 0, self.width() - x, self.height()))
            p.drawImage(target, self.b)
            p.restore()
        p.setPen(QtGui.QPen(QtGui.QColor("#ffffff"), 2))
        p.drawLine(QtCore.QPointF(x, 0), QtCore.QPointF(x, self.height()))
        r = self.fontMetrics().height()
        p.setBrush(QtGui.QColor("#ffffff"))
        p.drawEllipse(QtCore.QPointF(x, self.height() / 2), r * 0.45, r * 0.45)
        self._tag(p, f"A · {self.labels[0]}", QtCore.Qt.AlignLeft)
        self._tag(p, f"B · {self.labels[1]}", QtCore.Qt.AlignRight)

    def _tag(self, p: QtGui.QPainter, text: str, side) -> None:
        fm = self.fontMetrics()
        text = fm.elidedText(text, QtCore.Qt.ElideMiddle, int(self.width() * 0.45))
        w, h = fm.horizontalAdvance(text) + fm.height(), int(fm.height() * 1.5)
        x = 8 if side == QtCore.Qt.AlignLeft else self.width() - w - 8
        box = QtCore.QRectF(x, 8, w, h)
        p.setPen(QtCore.Qt.NoPen)
        p.setBrush(QtGui.QColor(0, 0, 0, 170))
        p.drawRoundedRect(box, 4, 4)
        p.setPen(QtGui.QColor("#ffffff"))
        p.drawText(box, QtCore.Qt.AlignCenter, text)

    # -- gestures ---------------------------------------------------------------------------
    def set_split(self, fraction: float) -> None:
        self.split = max(0.0, min(1.0, fraction))
        self.update()

    def mousePressEvent(self, event):
        if event.button() == QtCore.Qt.LeftButton:
            self.set_split(event.position().x() / max(1, self.width()))
        elif event.button() in (QtCore.Qt.MiddleButton, QtCore.Qt.RightButton):
            self._start_zoomed()
            self._pan_from = (event.position(), QtCore.QPointF(self.center))
            self.setCursor(QtCore.Qt.ClosedHandCursor)

    def mouseMoveEvent(self, event):
        if event.buttons() & QtCore.Qt.LeftButton and self._pan_from is None:
            self.set_split(event.position().x() / max(1, self.width()))
        elif self._pan_from is not None:
            start, center = self._pan_from
            d = (event.position() - start) / self.scale()
            self.center = center - d
            self.update()

    def mouseReleaseEvent(self, _event):
        self._pan_from = None
        self.setCursor(QtCore.Qt.SplitHCursor)

    def mouseDoubleClickEvent(self, _event):
        self.zoom = None
        self.update()

    def _start_zoomed(self) -> None:
        if self.zoom is None:
            self.zoom = self.fit_scale()
            self.center = QtCore.QPointF(self.a.width() / 2, self.a.height() / 2)

    def zoom_at(self, factor: float, pos: QtCore.QPointF) -> None:
        """Zoom by `factor`, keeping the image point under `pos` where it is."""
        self._start_zoomed()
        before = self._to_image(pos)
        self.zoom = max(0.05, min(64.0, self.zoom * factor))
        after = self._to_image(pos)
        self.center += before - after
        self.update()

    def _to_image(self, pos: QtCore.QPointF) -> QtCore.QPointF:
        s = self.scale()
        return QtCore.QPointF(self.center.x() + (pos.x() - self.width() / 2) / s,
                              self.center.y() + (pos.y() - self.height() / 2) / s)

    def wheelEvent(self, event):
        self.zoom_at(1.25 if event.angleDelta().y() > 0 else 0.8, event.position())


class SideBySide(QtWidgets.QSplitter):
    """Two zoom views; zooming or panning one moves the other the same way."""

    def __init__(self, parent=None):
        super().__init__(QtCore.Qt.Horizontal, parent)
        self.views = (ZoomView(), ZoomView())
        self.captions = []
        for view in self.views:
            box = QtWidgets.QWidget()
            lay = QtWidgets.QVBoxLayout(box)
            lay.setContentsMargins(0, 0, 0, 0)
            caption = QtWidgets.QLabel("")
            caption.setAlignment(QtCore.Qt.AlignCenter)
            caption.setSizePolicy(QtWidgets.QSizePolicy.Ignored, QtWidgets.QSizePolicy.Preferred)
            self.captions.append(caption)
            lay.addWidget(caption)
            lay.addWidget(view, 1)
            self.addWidget(box)
        self._following = False
        a, b = self.views
        for src, dst in ((a, b), (b, a)):
            src.zoom_changed.connect(lambda _z, s=src, d=dst: self._follow(s, d))
            src.horizontalScrollBar().valueChanged.connect(lambda _v, s=src, d=dst: self._follow(s, d))
            src.verticalScrollBar().valueChanged.connect(lambda _v, s=src, d=dst: self._follow(s, d))

    def set_images(self, a: QtGui.QImage, b: QtGui.QImage, labels=("A", "B")) -> None:
        for view, image, caption, label in zip(self.views, (a, b), self.captions, labels):
            caption.setText(f"{'A' if image is a else 'B'} · {label}")
            view.fitted = True
            # B is shown at A's size so the two line up pixel for pixel
            if image is b and not a.isNull() and not b.isNull() and b.size() != a.size():
                image = b.scaled(a.size(), QtCore.Qt.IgnoreAspectRatio, QtCore.Qt.SmoothTransformation)
            view.set_image(image)

    def _follow(self, src: ZoomView, dst: ZoomView) -> None:
        if self._following:
            return
        self._following = True
        try:
            dst.fitted = src.fitted
            dst.setTransform(src.transform())
            dst.horizontalScrollBar().setValue(src.horizontalScrollBar().value())
            dst.verticalScrollBar().setValue(src.verticalScrollBar().value())
        finally:
            self._following = False


class CompareWindow(QtWidgets.QDialog):
    """Two results, side by side or with the A/B slider; Swap exchanges them."""

    def __init__(self, a, b, labels=("A", "B"), parent=None, mode: str = SLIDER):
        super().__init__(parent)
        self.setWindowTitle("Compare")
        self.setWindowFlag(QtCore.Qt.WindowMaximizeButtonHint, True)
        self.setAttribute(QtCore.Qt.WA_DeleteOnClose)
        self.a, self.b, self.labels = _image(a), _image(b), tuple(labels)
        self.slider = SliderCompare()
        self.side = SideBySide()
        self.stack = QtWidgets.QStackedWidget()
        self.stack.addWidget(self.side)
        self.stack.addWidget(self.slider)
        self.mode = QtWidgets.QComboBox()
        self.mode.addItems([SIDE_BY_SIDE, SLIDER])
        self.mode.setToolTip("side by side, or one over the other with a line to drag")
        self.mode.currentTextChanged.connect(self.set_mode)
        swap = QtWidgets.QPushButton("Swap")
        swap.setToolTip("exchange A and B")
        swap.clicked.connect(self.swap)
        hint = QtWidgets.QLabel("Slider: drag to move the line · wheel zooms · right-drag pans · double-click fits")
        hint.setObjectName("Hint")
        bar = QtWidgets.QHBoxLayout()
        bar.addWidget(QtWidgets.QLabel("Mode"))
        bar.addWidget(self.mode)
        bar.addWidget(swap)
        bar.addStretch(1)
        bar.addWidget(hint)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.addLayout(bar)
        lay.addWidget(self.stack, 1)
        screen = QtGui.QGuiApplication.primaryScreen()
        avail = screen.availableGeometry() if screen is not None else QtCore.QRect(0, 0, 1600, 1000)
        self.resize(int(avail.width() * 0.8), int(avail.height() * 0.85))
        self._show_images()
        self.mode.setCurrentText(mode)
        self.set_mode(mode)

    def _show_images(self) -> None:
        self.slider.set_images(self.a, self.b, self.labels)
        self.side.set_images(self.a, self.b, self.labels)

    def set_mode(self, mode: str) -> None:
        self.stack.setCurrentWidget(self.slider if mode == SLIDER else self.side)

    def swap(self) -> None:
        self.a, self.b = self.b, self.a
        self.labels = self.labels[::-1]
        self._show_images()
