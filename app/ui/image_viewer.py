"""The image panel: the latest results (and live previews) with zoom, pixel/smooth filtering, save;
and the large viewer (`ImageWindow`): one image at window size, zoom and pan, the next and
previous of a list, open its folder, drag it out as a file.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

from PySide6 import QtCore, QtGui, QtWidgets

from . import file_dialogs


def open_folder(path: str) -> QtCore.QUrl:
    """Show the folder holding `path` in the desktop's file manager; the URL asked for."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    url = QtCore.QUrl.fromLocalFile(folder)
    QtGui.QDesktopServices.openUrl(url)
    return url


def file_mime(paths: list[str]) -> QtCore.QMimeData:
    """What a drag of image files carries: their file URLs (file managers, browsers, editors
    and chat apps take those; the PNG keeps the graph inside it)."""
    mime = QtCore.QMimeData()
    mime.setUrls([QtCore.QUrl.fromLocalFile(os.path.abspath(p)) for p in paths])
    return mime


def drag_files(source: QtWidgets.QWidget, paths: list[str], pixmap: Optional[QtGui.QPixmap] = None) -> None:
    """Start dragging `paths` out of `source` (blocks until the drop, as QDrag does)."""
    paths = [p for p in paths if p and os.path.isfile(p)]
    if not paths:
        return
    drag = QtGui.QDrag(source)
    drag.setMimeData(file_mime(paths))
    if pixmap is not None and not pixmap.isNull():
        side = source.fontMetrics().height() * 5
        drag.setPixmap(pixmap.scaled(side, side, QtCore.Qt.KeepAspectRatio, QtCore.Qt.SmoothTransformation))
    drag.exec(QtCore.Qt.CopyAction)


def tool_button(text: str, tip: str, slot=None, icon=None) -> QtWidgets.QToolButton:
    """A tool button with its tooltip (and icon, beside the text when there is text)."""
    b = QtWidgets.QToolButton()
    b.setText(text)
    b.setToolTip(tip)
    if icon is not None:
        b.setIcon(icon)
        b.setToolButtonStyle(QtCore.Qt.ToolButtonTextBesideIcon if text else QtCore.Qt.ToolButtonIconOnly)
    if slot is not None:
        b.clicked.connect(slot)
    return b


class ZoomView(QtWidgets.QGraphicsView):
    """A pixmap with wheel zoom and drag pan; starts fitted to the panel."""

    zoom_changed = QtCore.Signal(float)
    double_clicked = QtCore.Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setScene(QtWidgets.QGraphicsScene(self))
        self.item = QtWidgets.QGraphicsPixmapItem()
        self.scene().addItem(self.item)
        self.setDragMode(QtWidgets.QGraphicsView.ScrollHandDrag)
        self.setTransformationAnchor(QtWidgets.QGraphicsView.AnchorUnderMouse)
        self.setBackgroundBrush(QtGui.QColor("#15171b"))
        self.setFrameShape(QtWidgets.QFrame.NoFrame)
        self.fitted = True
        self.smooth = False

    def set_image(self, image: QtGui.QImage) -> None:
        self.item.setPixmap(QtGui.QPixmap.fromImage(image))
        self.scene().setSceneRect(self.item.boundingRect())
        self.apply_filter()
        if self.fitted:
            self.fit()

    def apply_filter(self) -> None:
        self.item.setTransformationMode(QtCore.Qt.SmoothTransformation if self.smooth
                                        else QtCore.Qt.FastTransformation)

    def fit(self) -> None:
        self.fitted = True
        if not self.item.pixmap().isNull():
            self.fitInView(self.item, QtCore.Qt.KeepAspectRatio)
            self.zoom_changed.emit(self.zoom())

    def set_zoom(self, factor: float) -> None:
        self.fitted = False
        self.setTransform(QtGui.QTransform.fromScale(factor, factor))
        self.zoom_changed.emit(factor)

    def zoom(self) -> float:
        return self.transform().m11()

    def wheelEvent(self, event):
        step = 1.25 if event.angleDelta().y() > 0 else 0.8
        self.set_zoom(max(0.05, min(64.0, self.zoom() * step)))

    def resizeEvent(self, event):
        super().resizeEvent(event)
        if self.fitted:
            self.fit()

    def mouseDoubleClickEvent(self, event):
        self.double_clicked.emit()
        event.accept()


class ImageWindow(QtWidgets.QDialog):
    """The large viewer: `images` is a list of (QImage or path, caption, path or None)."""

    def __init__(self, images: list, index: int = 0, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Image")
        self.setWindowFlag(QtCore.Qt.WindowMaximizeButtonHint, True)
        self.setAttribute(QtCore.Qt.WA_DeleteOnClose)
        self.images, self.index = list(images), 0
        self.view = ZoomView()
        self.view.setBackgroundBrush(QtGui.QColor("#101114"))
        self.caption = QtWidgets.QLabel("")
        self.caption.setObjectName("Hint")
        self.caption.setSizePolicy(QtWidgets.QSizePolicy.Ignored, QtWidgets.QSizePolicy.Preferred)
        self.caption.setTextInteractionFlags(QtCore.Qt.TextSelectableByMouse)
        self.zoom_label = QtWidgets.QLabel("")
        self.zoom_label.setObjectName("Hint")
        self.view.zoom_changed.connect(lambda z: self.zoom_label.setText(f"{z * 100:.0f}%"))
        bar = QtWidgets.QHBoxLayout()
        from . import theme

        self.prev_btn = tool_button("", "previous image (Left)", lambda: self.step(-1), theme.icon("previous"))
        self.next_btn = tool_button("", "next image (Right)", lambda: self.step(1), theme.icon("next"))
        fit = tool_button("Fit", "fit the image to the window (F)", self.view.fit)
        one = tool_button("1:1", "actual pixels (1)", lambda: self.view.set_zoom(1.0))
        smooth = QtWidgets.QCheckBox("Smooth")
        smooth.setToolTip("smooth filtering when zoomed (off: hard pixels)")
        smooth.toggled.connect(self._set_smooth)
        self.folder_btn = tool_button("Open folder", "show the file in its folder", self.open_folder,
                                       theme.icon("open"))
        self.drag_btn = tool_button("Drag out", "drag this image (as a file) into another app",
                                     None, theme.icon("new"))
        self.drag_btn.pressed.connect(self._drag)
        for w in (self.prev_btn, self.next_btn, fit, one, smooth):
            bar.addWidget(w)
        bar.addWidget(self.caption, 1)
        bar.addWidget(self.zoom_label)
        bar.addWidget(self.folder_btn)
        bar.addWidget(self.drag_btn)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.addLayout(bar)
        lay.addWidget(self.view, 1)
        for key, slot in (("Left", lambda: self.step(-1)), ("Right", lambda: self.step(1)),
                          ("F", self.view.fit), ("1", lambda: self.view.set_zoom(1.0))):
            QtGui.QShortcut(QtGui.QKeySequence(key), self, activated=slot)
        screen = QtGui.QGuiApplication.primaryScreen()
        avail = screen.availableGeometry() if screen is not None else QtCore.QRect(0, 0, 1600, 1000)
        self.resize(int(avail.width() * 0.8), int(avail.height() * 0.85))
        self.show_index(index)

    def _set_smooth(self, on: bool) -> None:
        self.view.smooth = on
        self.view.apply_filter()

    def path(self) -> Optional[str]:
        return self.images[self.index][2] if self.images else None

    def show_index(self, index: int) -> None:
        if not self.images:
            return
        self.index = index % len(self.images)
        image, caption, path = self.images[self.index]
        if isinstance(image, str):
            image = QtGui.QImage(image)
        self.view.fitted = True
        self.view.set_image(image)
        size = f"{image.width()}×{image.height()}"
        count = f"{self.index + 1}/{len(self.images)} · " if len(self.images) > 1 else ""
        self.caption.setText(f"{count}{caption} · {size}" + (f" · {path}" if path else ""))
        self.setWindowTitle(f"{caption} — Image")
        self.prev_btn.setEnabled(len(self.images) > 1)
        self.next_btn.setEnabled(len(self.images) > 1)
        self.folder_btn.setEnabled(bool(path))
        self.drag_btn.setEnabled(bool(path))

    def step(self, delta: int) -> None:
        self.show_index(self.index + delta)

    def open_folder(self) -> None:
        if self.path():
            open_folder(self.path())

    def _drag(self) -> None:
        if self.path():
            drag_files(self.drag_btn, [self.path()], self.view.item.pixmap())
            self.drag_btn.setDown(False)


class ImageViewer(QtWidgets.QWidget):
    """Shows one image large, recent ones as a strip below."""

    MAX_RECENT = 24

    def __init__(self, parent=None):
        super().__init__(parent)
        self.view = ZoomView()
        self.caption = QtWidgets.QLabel("No image yet: press Run.")
        self.caption.setObjectName("Hint")
        # long paths must not widen the dock: wrap anywhere, take no width of their own
        self.caption.setWordWrap(True)
        self.caption.setSizePolicy(QtWidgets.QSizePolicy.Ignored, QtWidgets.QSizePolicy.Preferred)
        self.caption.setTextInteractionFlags(QtCore.Qt.TextSelectableByMouse)
        self.zoom_label = QtWidgets.QLabel("")
        self.zoom_label.setObjectName("Hint")
        # room for "10000%" from the start, so the first image does not reflow the tool bar
        self.zoom_label.setMinimumWidth(QtGui.QFontMetrics(self.zoom_label.font()).horizontalAdvance("10000%") + 4)
        self.zoom_label.setAlignment(QtCore.Qt.AlignRight | QtCore.Qt.AlignVCenter)
        # a tool bar, not a row of widgets: it folds what does not fit into its ">>" menu, so
        # these buttons do not set the right column's least width (the canvas keeps the room)
        bar = QtWidgets.QToolBar()
        bar.setIconSize(QtCore.QSize(16, 16))
        bar.setSizePolicy(QtWidgets.QSizePolicy.Ignored, QtWidgets.QSizePolicy.Fixed)
        self.fit_btn = tool_button("Fit", "fit the image to the panel", self.view.fit)
        self.one_btn = tool_button("1:1", "actual pixels", lambda: self.view.set_zoom(1.0))
        self.x8_btn = tool_button("8×", "eight times", lambda: self.view.set_zoom(8.0))
        self.smooth_box = QtWidgets.QCheckBox("Smooth")
        self.smooth_box.setToolTip("smooth filtering when zoomed (off: hard pixels)")
        self.smooth_box.toggled.connect(self._set_smooth)
        self.save_btn = tool_button("Save…", "save this image as PNG", self.save_current)
        self.large_btn = tool_button("Large", "open this image in the large viewer (or double-click it)",
                                      self.open_large)
        self.view.double_clicked.connect(self.open_large)
        # in order of need: what does not fit goes to the ">>" menu from the end (the zoom first)
        for w in (self.fit_btn, self.one_btn, self.x8_btn, self.save_btn, self.large_btn, self.smooth_box):
            bar.addWidget(w)
        spacer = QtWidgets.QWidget()
        spacer.setSizePolicy(QtWidgets.QSizePolicy.Expanding, QtWidgets.QSizePolicy.Preferred)
        bar.addWidget(spacer)
        bar.addWidget(self.zoom_label)
        self.strip = QtWidgets.QListWidget()
        self.strip.setViewMode(QtWidgets.QListView.IconMode)
        self.strip.setFlow(QtWidgets.QListView.LeftToRight)
        self.strip.setWrapping(False)
        em = QtGui.QFontMetrics(self.font()).height()
        self.strip.setIconSize(QtCore.QSize(em * 3, em * 3))
        self.strip.setFixedHeight(em * 5)
        self.strip.setMovement(QtWidgets.QListView.Static)
        self.strip.setDragEnabled(True)
        self.strip.startDrag = self._drag_from_strip  # a saved result drags out as its file
        self.strip.currentRowChanged.connect(self._pick)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.setSpacing(4)
        lay.addWidget(bar)
        lay.addWidget(self.view, 1)
        lay.addWidget(self.caption)
        lay.addWidget(self.strip)
        self.view.zoom_changed.connect(lambda z: self.zoom_label.setText(f"{z * 100:.0f}%"))
        self.images: list[tuple[QtGui.QImage, str, Optional[str]]] = []
        self.current: Optional[QtGui.QImage] = None
        self.save_btn.setEnabled(False)

    def _set_smooth(self, on: bool) -> None:
        self.view.smooth = on
        self.view.apply_filter()

    def clear(self) -> None:
        """Another graph: its results are not this one's (they stay on disk)."""
        self.images.clear()
        self.strip.clear()
        self.current = None
        self.view.item.setPixmap(QtGui.QPixmap())
        self.caption.setText("No image yet: press Run.")
        self.save_btn.setEnabled(False)

    def show_preview(self, image: QtGui.QImage, label: str) -> None:
        """A live sampler preview: shown, not kept."""
        self.current = image
        self.view.set_image(image)
        self.caption.setText(f"{label} (preview)")

    def add_image(self, image: QtGui.QImage, label: str, path: Optional[str] = None) -> None:
        self.images.insert(0, (image, label, path))
        del self.images[self.MAX_RECENT:]
        item = QtWidgets.QListWidgetItem(QtGui.QIcon(QtGui.QPixmap.fromImage(image)), "")
        item.setToolTip(f"{label}\n{path or 'not saved'}")
        self.strip.blockSignals(True)
        self.strip.insertItem(0, item)
        while self.strip.count() > self.MAX_RECENT:
            self.strip.takeItem(self.strip.count() - 1)
        self.strip.setCurrentRow(0)
        self.strip.blockSignals(False)
        self._pick(0)

    def _pick(self, row: int) -> None:
        if 0 <= row < len(self.images):
            image, label, path = self.images[row]
            self.current = image
            self.view.set_image(image)
            # zero-width spaces after slashes let a long path wrap
            shown = path.replace("/", "/\u200b") if path else ""
            self.caption.setText(f"{label} · {image.width()}×{image.height()}" + (f" · {shown}" if path else ""))
            self.save_btn.setEnabled(True)

    def open_large(self) -> Optional[ImageWindow]:
        """The shown result (and the rest of the strip) in the large viewer."""
        if self.current is None:
            return None
        row = self.strip.currentRow()
        if 0 <= row < len(self.images) and self.images[row][0] is self.current:
            window = ImageWindow(self.images, row, self.window())
        else:  # a live preview
            window = ImageWindow([(self.current, self.caption.text(), None)], 0, self.window())
        window.show()
        return window

    def _drag_from_strip(self, _actions) -> None:
        row = self.strip.currentRow()
        if 0 <= row < len(self.images) and self.images[row][2]:
            drag_files(self.strip, [self.images[row][2]], QtGui.QPixmap.fromImage(self.images[row][0]))

    def current_path(self) -> Optional[str]:
        row = self.strip.currentRow()
        if 0 <= row < len(self.images) and self.images[row][0] is self.current:
            return self.images[row][2]
        return None

    def save_current(self, path: Optional[str] = None) -> Optional[str]:
        """Save the shown image. One that Save Image wrote is copied as is, so the copy keeps
        the graph inside it (opening it reopens the graph)."""
        if self.current is None:
            return None
        if not path:
            path = file_dialogs.save_file(self, "Save image", "image.png", "PNG (*.png)")
        if not path:
            return None
        source = self.current_path()
        try:
            if source and os.path.isfile(source):
                shutil.copyfile(source, path)
            elif not self.current.save(path, "PNG"):
                raise OSError("the image could not be encoded")
        except OSError as exc:
            QtWidgets.QMessageBox.warning(self, "Save image", f"Could not write {path}: {exc}")
            return None
        return path
