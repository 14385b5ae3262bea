"""Every adaptation of NodeGraphQt 0.6.x to PySide6 6.12 and to our "canvas only" use, in one place.

We use NodeGraphQt as a view: nodes, ports, wires, backdrops, selection, pan and zoom. Its own
undo stack, properties bin, context menus, tab search and session format are not used; user
gestures on the canvas are turned into requests to our document (see canvas.py) instead of edits
to NodeGraphQt's model. What this module changes, and why:

1. Qt.py (NodeGraphQt's Qt shim) must pick PySide6, not whatever other binding is importable.
2. `LoomViewer` (a NodeViewer subclass):
   - is built without an undo stack, so NodeGraphQt adds no Ctrl+Z/Ctrl+Y actions of its own
     (two actions with one shortcut in a window are ambiguous in Qt and neither fires);
   - hands Tab to us (QWidget would use it to move focus) for our node palette;
   - draws wires in the colour of their data type, also after selection highlights reset them;
   - asks our document whether a wire being dragged may land on a port (live "refused" tip,
     and the reason in the status bar on drop) instead of NodeGraphQt's per-name constraints;
   - has no context menu of its own (the window adds ours);
   - reports dropped files (and node types dragged from our palette) instead of trying to
     import them as NodeGraphQt sessions.
3. `detach_controller` unplugs NodeGraph's slots from the viewer's gesture signals, so a drag,
   a wire, a rename or a backdrop resize can never change NodeGraphQt's model behind our back.
4. `show_scene_rect` frames a rectangle (F): NodeViewer keeps its visible range privately.
5. Qt6 removed QWheelEvent.delta(); NodeViewer.wheelEvent falls back to angleDelta by catching
   AttributeError, which works, but the zoom position comes from `event.pos()`, gone from
   QWheelEvent in Qt6: LoomViewer.wheelEvent passes `position()` instead.
6. `LoomNodeItem` (the node's QGraphicsItem) makes room below the ports for the on-node
   settings panel (`panel_size`), folds a node to its title row (`collapsed`: ports stacked
   on the title, port names hidden, also after NodeGraphQt's zoom-dependent "proxy mode"
   shows them again), draws a reroute as a small dot (`compact`), and tints bypassed and
   muted nodes (`loom_mode`). NodeItem has none of these; its minimum size would undo them.
7. `LoomViewer.view_changed` is emitted whenever the visible range changes (pan, zoom, frame),
   for the minimap; `center_on` pans to a scene point the way NodeViewer pans.
8. `LoomViewer` raises Qt's pixmap cache limit (`ITEM_CACHE_KB`): NodeGraphQt caches every node,
   port and wire in device coordinates, and Qt's default 10 MB holds the caches of ~50 nodes, so
   panning a larger graph evicted and repainted every node on every step (2-3x slower).
9. Not NodeGraphQt but the Qt binding under it: `keep_none_alive` (PySide6 6.12 on Python 3.11
   wears None's and True's reference counts down until the interpreter aborts).

Tests: tests/test_ui.py (test_nodegraphqt_is_only_a_view, test_mouse_gestures_on_the_canvas,
test_many_qt_calls_do_not_wear_out_none and the canvas tests around them); tests/test_ui_canvas.py
(collapse, reroute dots, wires under the cursor, the minimap's panning, emits that wore out True,
the pixmap cache limit).
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_PREFERRED_BINDING", "PySide6")
os.environ.setdefault("QT_PREFERRED_BINDING_JSON", "")

import NodeGraphQt  # noqa: E402
from NodeGraphQt import BackdropNode, BaseNode, NodeGraph  # noqa: E402
from NodeGraphQt.constants import NodeEnum  # noqa: E402
from NodeGraphQt.qgraphics.node_base import NodeItem  # noqa: E402
from NodeGraphQt.qgraphics.port import PortItem  # noqa: E402
from NodeGraphQt.widgets.viewer import NodeViewer  # noqa: E402
from PySide6 import QtCore, QtGui  # noqa: E402

__all__ = ["NodeGraphQt", "BackdropNode", "BaseNode", "NodeGraph", "LoomViewer", "LoomNode", "LoomNodeItem",
           "make_node_graph", "detach_controller", "pipe_between", "pipe_at", "center_on", "show_scene_rect",
           "keep_none_alive"]


NODE_TYPE_MIME = "application/x-loomwork-node-type"  # a palette entry being dragged


COMPACT_SIZE = (26.0, 18.0)  # a reroute dot
MODE_TINTS = {"bypass": (150, 90, 200, 110), "mute": (20, 22, 26, 150)}


class LoomNodeItem(NodeItem):
    """NodeItem with room for our settings panel, a collapsed form, a dot form and mode tints."""

    def __init__(self, name="node", parent=None):
        super().__init__(name, parent)
        self.panel_size = (0.0, 0.0)  # (width, height) the settings panel needs below the ports
        self.panel_top = 0.0          # where it goes (set when the node is laid out)
        self.collapsed = False
        self.compact = False
        self.loom_mode = ""

    def calc_size(self, add_w=0.0, add_h=0.0):
        w, h = super().calc_size(add_w, add_h)
        if self.collapsed:
            return w, self._text_item.boundingRect().height() + 4.0
        self.panel_top = h
        return max(w, self.panel_size[0]), h + self.panel_size[1]

    def _set_base_size(self, add_w=0.0, add_h=0.0):
        if self.compact:
            self._width, self._height = COMPACT_SIZE
            return
        w, h = self.calc_size(add_w, add_h)
        self._width = max(w, NodeEnum.WIDTH.value)
        self._height = h if self.collapsed or self.panel_size[1] else max(h, NodeEnum.HEIGHT.value)

    def draw_node(self):
        super().draw_node()
        if self.collapsed or self.compact:
            self._fold_ports()

    def _fold_ports(self):
        """Every port on one row (the title's, or the dot's middle); names hidden."""
        for text in list(self._input_items.values()) + list(self._output_items.values()):
            text.setVisible(False)
        if self.compact:
            self._text_item.setVisible(False)
            self._icon_item.setVisible(False)
        for port in self.inputs + self.outputs:
            r = port.boundingRect()
            x = -r.width() / 2 if port in self.inputs else self._width - r.width() / 2
            port.setPos(x, (self._height - r.height()) / 2)
            port.redraw_connected_pipes()
        self.update()

    def set_proxy_mode(self, mode):
        super().set_proxy_mode(mode)
        if self.collapsed or self.compact:
            self._fold_ports()

    def paint(self, painter, option, widget):
        if self.compact:
            self.auto_switch_mode()
            painter.save()
            painter.setRenderHint(QtGui.QPainter.Antialiasing)
            border = QtGui.QColor(*(NodeEnum.SELECTED_BORDER_COLOR.value if self.selected else self.border_color))
            painter.setPen(QtGui.QPen(border, 1.2))
            painter.setBrush(QtGui.QColor(*self.color))
            r = self.boundingRect().adjusted(3, 1, -3, -1)
            painter.drawRoundedRect(r, r.height() / 2, r.height() / 2)
            painter.restore()
            return
        super().paint(painter, option, widget)
        tint = MODE_TINTS.get(self.loom_mode)
        if tint:
            painter.save()
            painter.setPen(QtCore.Qt.NoPen)
            painter.setBrush(QtGui.QColor(*tint))
            painter.drawRoundedRect(self.boundingRect().adjusted(1, 1, -1, -1), 4.0, 4.0)
            painter.restore()


class LoomNode(BaseNode):
    """The one NodeGraphQt node class we use; ports and looks are set per instance."""

    __identifier__ = "loomwork"
    NODE_NAME = "node"

    def __init__(self):
        super().__init__(qgraphics_item=LoomNodeItem)


class LoomViewer(NodeViewer):
    tab_pressed = QtCore.Signal()
    files_dropped = QtCore.Signal(list, QtCore.QPointF)
    node_type_dropped = QtCore.Signal(str, QtCore.QPointF)
    connection_refused = QtCore.Signal(str)
    context_requested = QtCore.Signal(QtCore.QPoint, QtCore.QPointF)

    view_changed = QtCore.Signal()

    # room for the device-coordinate caches of a few hundred nodes with their settings panels
    # (~300 KB each at 1:1); Qt fills it only as items are painted
    ITEM_CACHE_KB = 128 * 1024

    def __init__(self, parent=None):
        super().__init__(parent, undo_stack=None)
        if QtGui.QPixmapCache.cacheLimit() < self.ITEM_CACHE_KB:
            QtGui.QPixmapCache.setCacheLimit(self.ITEM_CACHE_KB)
        self.wire_colors: dict[tuple[str, str], tuple] = {}  # (node id, out port) -> rgba

    def _update_scene(self):
        super()._update_scene()
        self.view_changed.emit()

    def resizeEvent(self, event):
        super().resizeEvent(event)
        self.view_changed.emit()

    # Tab is a focus-change key for QWidget.event(); take it first.
    def event(self, event):
        if event.type() == QtCore.QEvent.KeyPress and event.key() == QtCore.Qt.Key_Tab:
            self.tab_pressed.emit()
            return True
        return super().event(event)

    def keyPressEvent(self, event):
        super().keyPressEvent(event)
        # NodeGraphQt paints "CTRL: Deselect Nodes" (and SHIFT/ALT hints) at the cursor on a
        # modifier press and hides it only on the release, which a shortcut (Ctrl+Z) swallows:
        # the text stayed on the canvas. The modifiers are in Help > Keyboard and mouse.
        self._cursor_text.setVisible(False)

    def focusOutEvent(self, event):
        super().focusOutEvent(event)
        self._cursor_text.setVisible(False)

    def contextMenuEvent(self, event):
        self.RMB_state = False
        self.context_requested.emit(event.globalPos(), self.mapToScene(event.pos()))

    def wheelEvent(self, event):
        delta = event.angleDelta().y() or event.angleDelta().x()
        self._set_viewer_zoom(delta, pos=event.position().toPoint())

    def dragEnterEvent(self, event):
        mime = event.mimeData()
        if mime.hasUrls() or mime.hasFormat(NODE_TYPE_MIME):
            event.acceptProposedAction()
        else:
            event.ignore()

    dragMoveEvent = dragEnterEvent

    def dropEvent(self, event):
        mime = event.mimeData()
        scene_pos = self.mapToScene(event.position().toPoint())
        if mime.hasFormat(NODE_TYPE_MIME):
            event.acceptProposedAction()
            self.node_type_dropped.emit(bytes(mime.data(NODE_TYPE_MIME)).decode("utf-8"), scene_pos)
            return
        paths = [u.toLocalFile() for u in mime.urls() if u.isLocalFile()]
        if paths:
            event.acceptProposedAction()
            self.files_dropped.emit(paths, scene_pos)

    # Live wire feedback: the dragged wire's tip turns to "refused" over a port our document would
    # refuse (wrong type, a loop), and dropping it there reports why instead of silently undoing.
    connection_check = None  # fn(port_item, port_item) -> reason or None; set by the canvas

    def _validate_accept_connection(self, from_port, to_port):
        if self.connection_check is not None and from_port.port_type != to_port.port_type \
                and from_port.node is not to_port.node:
            return self.connection_check(from_port, to_port) is None
        return super()._validate_accept_connection(from_port, to_port)

    def apply_live_connection(self, event):
        if self._LIVE_PIPE.isVisible() and self._start_port is not None and self.connection_check:
            end = next((i for i in self.scene().items(event.scenePos()) if isinstance(i, PortItem)), None)
            if end is not None and end is not self._start_port and end.port_type != self._start_port.port_type \
                    and end.node is not self._start_port.node:
                why = self.connection_check(self._start_port, end)
                if why:
                    self.connection_refused.emit(why)
        super().apply_live_connection(event)

    def establish_connection(self, start_port, end_port):
        super().establish_connection(start_port, end_port)
        pipe = pipe_between(start_port, end_port)
        if pipe is not None:
            out = pipe.output_port
            color = self.wire_colors.get((out.node.id, out.name))
            if color is not None:
                pipe.color = color
                if not pipe.highlighted():
                    pipe.reset()


_none_guarded = False


def keep_none_alive() -> bool:
    """Stop PySide6 from wearing None's (and True's) reference count down to zero (a fatal abort).

    PySide6 6.12 on Python 3.11: every call of a C++ method that returns void (setToolTip,
    update, setPen, drawRect, signal.emit, ...) gives back None without taking a reference, as
    if None were immortal (it is from Python 3.12, PEP 683; not in 3.11). Each such call costs
    None one reference; None starts with ~5000, so an app that paints and updates aborts with
    "Fatal Python error: none_dealloc" after a few thousand calls (300 nodes on the canvas were
    enough). A connected signal's emit() likewise gives back True without a reference. We detect
    the leaks with probes, and if they are there give None, True and False a reference count
    they can never spend (2**56, as good as 3.12's immortality). Returns True if the guard was set.
    """
    global _none_guarded
    import ctypes
    import sys

    if _none_guarded or sys.version_info >= (3, 12):
        return False
    probe = QtCore.QObject()
    before = sys.getrefcount(None)
    for _ in range(64):
        probe.setObjectName("probe")  # a void C++ method
    leaks = before - sys.getrefcount(None) >= 32
    # The same binding gives back True from a connected signal's emit() without a reference
    # (the canvas emits one per pan step; the app aborted with "bool_dealloc" after a while).
    timer = QtCore.QTimer()
    probe.objectNameChanged.connect(timer.stop)
    before = sys.getrefcount(True)
    for _ in range(64):
        probe.objectNameChanged.emit("probe")
    leaks = leaks or before - sys.getrefcount(True) >= 32
    if not leaks:
        return False  # a binding that counts correctly: nothing to do
    for singleton in (None, True, False):  # ob_refcnt is PyObject's first field
        ctypes.c_ssize_t.from_address(id(singleton)).value += 1 << 56
    _none_guarded = True
    return True


keep_none_alive()  # before any canvas work: importing this module is the first Qt use of the UI


# Below this scale node titles and port names are a few pixels high (and NodeGraphQt hides
# them once a node is narrower than 70 px on screen): frame-to-fit never goes further out.
MIN_LEGIBLE_SCALE = 0.6


def show_scene_rect(viewer: NodeViewer, rect: QtCore.QRectF, max_zoom: float = 0.1,
                    min_scale: float = MIN_LEGIBLE_SCALE) -> None:
    """Fit `rect` in the view, but never so far out that text cannot be read: a graph too
    large for that shows from its left edge (where its loaders are), at `min_scale`.
    NodeViewer keeps its own visible range (`_scene_range`) and recomputes the transform from
    it, so that is what must change (zoom_to_nodes does the same but frames only node bodies,
    not the images we hang below them)."""
    viewer._scene_range = QtCore.QRectF(rect)
    viewer._update_scene()
    if viewer.get_zoom() > max_zoom:  # never blow a lone node up past ~100%
        viewer.reset_zoom(rect.center())
    elif viewer.transform().m11() < min_scale:
        port = viewer.viewport().rect()
        target = min_scale * 1.02  # fitInView keeps a small margin: aim a little closer
        w, h = port.width() / target, port.height() / target
        visible = QtCore.QRectF(rect.left(), rect.center().y() - h / 2, w, h)
        if h >= rect.height():
            visible.moveCenter(QtCore.QPointF(visible.center().x(), rect.center().y()))
        else:
            visible.moveTop(rect.top())
        viewer._scene_range = visible
        viewer._update_scene()


def center_on(viewer: NodeViewer, point: QtCore.QPointF) -> None:
    """Pan so `point` is in the middle of the view, at the same zoom."""
    viewer._scene_range.moveCenter(point)
    viewer._update_scene()


def pipe_at(viewer: NodeViewer, scene_pos: QtCore.QPointF, reach: float = 6.0):
    """The (output port, input port) of the wire under a scene point, or None."""
    from NodeGraphQt.qgraphics.pipe import PipeItem

    area = QtCore.QRectF(scene_pos.x() - reach, scene_pos.y() - reach, 2 * reach, 2 * reach)
    stroker = QtGui.QPainterPathStroker()
    stroker.setWidth(2 * reach)
    for item in viewer.scene().items(area):
        if isinstance(item, PipeItem) and item.input_port is not None and item.output_port is not None \
                and item.isVisible() and stroker.createStroke(item.path()).contains(item.mapFromScene(scene_pos)):
            out, inp = item.output_port, item.input_port
            return (out, inp) if out.port_type == "out" else (inp, out)
    return None


def pipe_between(port_a, port_b):
    for pipe in port_a.connected_pipes:
        if port_b in (pipe.input_port, pipe.output_port):
            return pipe
    return None


def make_node_graph(parent=None) -> NodeGraph:
    """A NodeGraph whose viewer is a LoomViewer, unplugged from NodeGraphQt's editing slots."""
    viewer = LoomViewer()
    graph = NodeGraph(parent, viewer=viewer)
    graph.register_node(LoomNode)
    detach_controller(graph)
    viewer.pipe_collision = False  # dropping a node on a wire would rewire without asking us
    return graph


def detach_controller(graph: NodeGraph) -> None:
    viewer = graph.viewer()
    pairs = [
        (viewer.search_triggered, graph._on_search_triggered),
        (viewer.connection_sliced, graph._on_connection_sliced),
        (viewer.connection_changed, graph._on_connection_changed),
        (viewer.moved_nodes, graph._on_nodes_moved),
        (viewer.node_name_changed, graph._on_node_name_changed),
        (viewer.node_backdrop_updated, graph._on_node_backdrop_updated),
        (viewer.insert_node, graph._on_insert_node),
        (viewer.data_dropped, graph._on_node_data_dropped),
        (viewer.context_menu_prompt, graph._on_context_menu_prompt),
    ]
    for signal, slot in pairs:
        try:
            signal.disconnect(slot)
        except (RuntimeError, TypeError):  # already unplugged
            pass
