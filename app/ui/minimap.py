"""The minimap: the whole graph in a corner of the canvas, with the part in view outlined.

Click or drag on it to pan there. The nodes' rectangles (in their colours, no text) are drawn
into a pixmap when the graph changes; a pan repaints only that pixmap and the view's outline.
"""

from __future__ import annotations

from PySide6 import QtCore, QtGui, QtWidgets

from . import ngqt_compat as ngqt

SIZE = QtCore.QSize(180, 112)
MARGIN = 12


class Minimap(QtWidgets.QWidget):
    def __init__(self, canvas, parent: QtWidgets.QWidget):
        super().__init__(parent)
        self.canvas = canvas
        self.setObjectName("Minimap")
        self.setFixedSize(SIZE)
        self.setCursor(QtCore.Qt.PointingHandCursor)
        self.setToolTip("the whole graph: click or drag to go there")
        self._fit = QtGui.QTransform()
        self._picture: QtGui.QPixmap | None = None
        self.setAttribute(QtCore.Qt.WA_OpaquePaintEvent)  # nothing under it to blend: cheap repaints
        viewer = canvas.viewer
        viewer.view_changed.connect(self.update)
        viewer.installEventFilter(self)
        canvas.doc.structure_changed.connect(self.invalidate)
        canvas.doc.node_changed.connect(self.invalidate)
        self._place()

    def eventFilter(self, obj, event):
        if event.type() == QtCore.QEvent.Resize:
            self._place()
        return False

    def _place(self) -> None:
        viewer = self.parentWidget()
        self.move(viewer.width() - self.width() - MARGIN, viewer.height() - self.height() - MARGIN)
        self.raise_()

    def scene_extent(self) -> QtCore.QRectF:
        rect = QtCore.QRectF()
        for nid in self.canvas.doc.graph.nodes:
            if self.canvas.item(nid) is not None:
                rect = rect.united(self.canvas.node_rect(nid))
        return rect.adjusted(-80, -80, 80, 80) if not rect.isNull() else QtCore.QRectF(0, 0, 800, 600)

    def visible_rect(self) -> QtCore.QRectF:
        viewer = self.canvas.viewer
        return viewer.mapToScene(viewer.viewport().rect()).boundingRect()

    def _transform(self, extent: QtCore.QRectF) -> QtGui.QTransform:
        inner = QtCore.QRectF(self.rect()).adjusted(6, 6, -6, -6)
        s = min(inner.width() / extent.width(), inner.height() / extent.height())
        dx = inner.left() + (inner.width() - extent.width() * s) / 2 - extent.left() * s
        dy = inner.top() + (inner.height() - extent.height() * s) / 2 - extent.top() * s
        return QtGui.QTransform(s, 0, 0, s, dx, dy)

    def invalidate(self, *_args) -> None:
        self._picture = None
        self.update()

    def _draw_graph(self) -> QtGui.QPixmap:
        """The background and the nodes, drawn once per change of the graph (not per pan)."""
        ratio = self.devicePixelRatioF()
        pix = QtGui.QPixmap(self.size() * ratio)
        pix.setDevicePixelRatio(ratio)
        pix.fill(QtGui.QColor(14, 16, 20))
        p = QtGui.QPainter(pix)
        p.setPen(QtGui.QPen(QtGui.QColor(70, 76, 90), 1))
        p.drawRect(QtCore.QRectF(self.rect()).adjusted(0.5, 0.5, -0.5, -0.5))
        self._fit = self._transform(self.scene_extent())
        p.setPen(QtCore.Qt.NoPen)
        for nid in self.canvas.doc.graph.nodes:
            item = self.canvas.item(nid)
            if item is not None:
                p.setBrush(QtGui.QColor(*item.view.color[:3]).lighter(130))
                p.drawRect(self._fit.mapRect(self.canvas.node_rect(nid)))
        p.end()
        return pix

    def paintEvent(self, event):
        if self._picture is None or self._picture.size() != self.size() * self.devicePixelRatioF():
            self._picture = self._draw_graph()
        p = QtGui.QPainter(self)
        p.drawPixmap(0, 0, self._picture)
        p.setClipRect(self.rect().adjusted(1, 1, -1, -1))
        p.setBrush(QtGui.QColor(106, 167, 232, 40))
        p.setPen(QtGui.QPen(QtGui.QColor("#6aa7e8"), 1.2))
        p.drawRect(self._fit.mapRect(self.visible_rect()))
        p.end()

    def scene_point(self, pos: QtCore.QPointF) -> QtCore.QPointF:
        inverse, _ok = self._fit.inverted()
        return inverse.map(QtCore.QPointF(pos))

    def mousePressEvent(self, event):
        ngqt.center_on(self.canvas.viewer, self.scene_point(event.position()))

    def mouseMoveEvent(self, event):
        if event.buttons() & QtCore.Qt.LeftButton:
            ngqt.center_on(self.canvas.viewer, self.scene_point(event.position()))
