"""The minimap: the whole graph in a corner of the canvas, with the part in view outlined.

Click or drag on it to pan there. The nodes' rectangles (in their colours, no text) are drawn
into a pixmap when the graph changes; a pan repaints only that pixmap and the view's outline.

It never hides a framed graph: `keep_clear` moves a framing out of its corner (a pan if the graph
has room to its left or above, else a fit into the canvas beside or above it). Where nodes still
lie under it (a graph too large for the legible zoom, or panned there), it turns see-through
until the mouse comes over it, as map overlays in other editors do.
"""

from __future__ import annotations

from PySide6 import QtCore, QtGui, QtWidgets

from . import ngqt_compat as ngqt

SIZE = QtCore.QSize(180, 112)    # on a wide canvas; a narrow one gets a smaller minimap
MIN_WIDTH = 120
SHARE = 0.2                      # of the canvas width, at most
MARGIN = 12
CLEARANCE = 8        # viewport pixels kept free between a framed node and the minimap
SEE_THROUGH = 0.25   # its opacity while nodes lie under it and the mouse is elsewhere


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
        self._see_through = False
        self._hovered = False
        viewer = canvas.viewer
        viewer.view_changed.connect(self._on_view_changed)
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
        width = max(MIN_WIDTH, min(SIZE.width(), int(viewer.width() * SHARE)))
        self.setFixedSize(width, round(width * SIZE.height() / SIZE.width()))
        self.move(viewer.width() - self.width() - MARGIN, viewer.height() - self.height() - MARGIN)
        self.raise_()
        self._on_view_changed()

    # -- staying out of the graph's way ----------------------------------------------------
    def rect_in_viewport(self) -> QtCore.QRectF:
        """Where it sits, in the canvas viewport's pixels."""
        viewport = self.canvas.viewer.viewport()
        return QtCore.QRectF(viewport.mapFrom(self.parentWidget(), self.pos()), QtCore.QSizeF(self.size()))

    def _block(self) -> QtCore.QRectF:
        return self.rect_in_viewport().adjusted(-CLEARANCE, -CLEARANCE, CLEARANCE, CLEARANCE)

    def covers(self, scene_rects) -> bool:
        """Whether any of these scene rectangles lies under it (with the clearance)."""
        if not self.isVisible():
            return False
        viewer, block = self.canvas.viewer, self._block()
        return any(viewer.mapFromScene(r).boundingRect().toRectF().intersects(block) for r in scene_rects)

    def keep_clear(self, scene_rects, framed: QtCore.QRectF, min_scale: float, tries: int = 8) -> None:
        """After a frame-to-fit of `framed`: if any of `scene_rects` lies under the minimap, show
        `framed` whole at the largest zoom from the current one down to `min_scale` where one of
        a few placements (centred, against the top/left edge, centred beside or above the
        minimap) leaves them all clear. A graph that cannot be placed so stays as framed."""
        if not self.covers(scene_rects):
            return
        viewer = self.canvas.viewer
        scale = viewer.transform().m11()
        port = QtCore.QRectF(viewer.viewport().rect()).adjusted(2, 2, -2, -2)
        block = self._block()
        steps = [scale * (min_scale / scale) ** (k / (tries - 1)) for k in range(tries)] \
            if scale > min_scale else [scale]
        xs = (port.center().x(), port.left(), (port.left() + block.left()) / 2)
        ys = (port.center().y(), port.top(), (port.top() + block.top()) / 2)
        for s in steps:
            half_w, half_h = framed.width() * s / 2, framed.height() * s / 2
            places = [QtCore.QPointF(x + (half_w if x == port.left() else 0), y + (half_h if y == port.top() else 0))
                      for y in ys for x in xs]
            for at in sorted(places, key=lambda q: (q - port.center()).manhattanLength()):
                shown = QtCore.QRectF(at.x() - half_w, at.y() - half_h, 2 * half_w, 2 * half_h)
                if not port.adjusted(-0.5, -0.5, 0.5, 0.5).contains(shown):
                    continue
                if not any(self._placed(r, framed.center(), at, s).intersects(block) for r in scene_rects):
                    self._show(framed.center(), at, s)
                    return

    @staticmethod
    def _placed(r: QtCore.QRectF, centre: QtCore.QPointF, at: QtCore.QPointF, s: float) -> QtCore.QRectF:
        """Scene rect `r` in viewport pixels, for a view at scale `s` with `centre` at `at`."""
        return QtCore.QRectF(at.x() + (r.left() - centre.x()) * s, at.y() + (r.top() - centre.y()) * s,
                             r.width() * s, r.height() * s)

    def _show(self, scene_point: QtCore.QPointF, at: QtCore.QPointF, scale: float) -> None:
        """Zoom to `scale` with `scene_point` at viewport pixel `at`. NodeViewer fits its own
        scene range with a 2 px margin, so the range is sized for that."""
        viewer = self.canvas.viewer
        port = viewer.viewport().rect()
        w, h = (port.width() - 4) / scale, (port.height() - 4) / scale
        centre = scene_point + QtCore.QPointF((port.width() / 2 - at.x()) / scale,
                                              (port.height() / 2 - at.y()) / scale)
        viewer._scene_range = QtCore.QRectF(centre.x() - w / 2, centre.y() - h / 2, w, h)
        viewer._update_scene()

    def _on_view_changed(self, *_args) -> None:
        self._see_through = self.covers(self.canvas.shown_rects())
        self.update()

    def enterEvent(self, event):
        self._hovered = True
        self.update()

    def leaveEvent(self, event):
        self._hovered = False
        self.update()

    def opacity(self) -> float:
        return SEE_THROUGH if self._see_through and not self._hovered else 1.0

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
        p.setOpacity(self.opacity())
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
