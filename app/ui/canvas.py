"""The graph canvas: NodeGraphQt as a view of our Document.

Two directions, never mixed:
- document -> canvas: `sync()` diffs the Graph against what the canvas shows and adds, removes or
  moves node items, wires and backdrops until they match. It runs after every document change.
- canvas -> document: user gestures (drag a wire, move nodes, slice wires, rename, resize a
  backdrop) arrive as viewer signals and become Document edits (undoable commands). A refused
  edit (an incompatible wire) just re-syncs, which puts the canvas back as the document says.

Node run states (stale, queued, running, cached, done, failed), result thumbnails and the
settings panels (node_widgets.py) are child items of the node items.
"""

from __future__ import annotations

from typing import Optional

from PySide6 import QtCore, QtGui, QtWidgets

from app.graph import Edge, Node
from app.graph.arrange import tidy
from app.graph.passthrough import REROUTE, wire_type
from nodes import registry

from . import ngqt_compat as ngqt
from .document import Document
from .node_widgets import PANEL_W, BadgeItem, ParamPanel, ThumbItem
from .theme import CATEGORY_TINTS, STATE_COLORS, hex_to_rgb

REROUTE_COLOR = (154, 160, 166, 255)

THUMB_WIDTH = 160  # scene units; small results are scaled up to this


class GraphCanvas(QtCore.QObject):
    """Owns the NodeGraphQt graph showing `doc`; translates gestures into document edits."""

    selection_changed = QtCore.Signal(list)     # selected node ids
    message = QtCore.Signal(str)                # for the status bar (refusals and hints)
    node_activated = QtCore.Signal(str)         # double click
    files_dropped = QtCore.Signal(list)
    node_type_dropped = QtCore.Signal(str, QtCore.QPointF)
    tab_pressed = QtCore.Signal()
    item_created = QtCore.Signal(str)           # a node item was (re)built: re-apply its badge
    context_requested = QtCore.Signal(QtCore.QPoint, QtCore.QPointF)

    def __init__(self, doc: Document, parent=None):
        super().__init__(parent)
        self.doc = doc
        self.ng = ngqt.make_node_graph(self)
        self.viewer: ngqt.LoomViewer = self.ng.viewer()
        self.viewer.setObjectName("GraphViewer")
        self._items: dict[str, ngqt.LoomNode] = {}       # node id -> NodeGraphQt node
        self._backdrops: dict[str, ngqt.BackdropNode] = {}
        self._shape: dict[str, tuple] = {}               # node id -> (type, ports) it was built with
        self._badges: dict[str, BadgeItem] = {}
        self._thumbs: dict[str, ThumbItem] = {}
        self._panels: dict[str, ParamPanel] = {}          # node id -> its settings on the canvas
        self._images: dict[str, QtGui.QImage] = {}       # last image per node, kept across undo
        self._syncing = False
        self.ng.set_background_color(24, 26, 31)
        self.ng.set_grid_color(34, 37, 44)

        v = self.viewer
        v.connection_changed.connect(self._on_connection_changed)
        v.connection_sliced.connect(self._on_connection_sliced)
        v.moved_nodes.connect(self._on_moved)
        v.node_name_changed.connect(self._on_renamed)
        v.node_backdrop_updated.connect(self._on_backdrop_updated)
        v.node_double_clicked.connect(self.node_activated)
        v.node_selection_changed.connect(lambda *_: self._emit_selection())
        v.node_selected.connect(lambda *_: self._emit_selection())
        v.files_dropped.connect(lambda paths, _pos: self.files_dropped.emit(paths))
        v.node_type_dropped.connect(self.node_type_dropped)
        v.tab_pressed.connect(self.tab_pressed)
        v.context_requested.connect(self.context_requested)
        v.connection_check = self._check_ports
        v.connection_refused.connect(self._on_refused)
        doc.structure_changed.connect(self.sync)
        doc.node_changed.connect(self._refresh_node)
        doc.replaced.connect(self._on_replaced)
        self.sync()
        from .minimap import Minimap

        self.minimap = Minimap(self, self.viewer)

    # -- widget -------------------------------------------------------------------------
    @property
    def widget(self) -> QtWidgets.QWidget:
        return self.viewer

    # -- queries ------------------------------------------------------------------------
    def item(self, node_id: str) -> Optional[ngqt.LoomNode]:
        return self._items.get(node_id)

    def port_view(self, node_id: str, port: str, output: bool):
        node = self._items[node_id]
        return (node.outputs() if output else node.inputs())[port].view

    def shown_edges(self) -> set[tuple[str, str, str, str]]:
        """The wires the canvas draws, as (src, src_port, dst, dst_port)."""
        out = set()
        for nid, node in self._items.items():
            for name, port in node.inputs().items():
                for other in port.view.connected_ports:
                    out.add((other.node.id, other.name, nid, name))
        return out

    def selected_ids(self) -> list[str]:
        return [v.id for v in self.viewer.selected_nodes() if v.id in self._items]

    def selected_group_ids(self) -> list[str]:
        return [v.id for v in self.viewer.selected_nodes() if v.id in self._backdrops]

    def select(self, ids) -> None:
        ids = set(ids)
        for nid, node in list(self._items.items()) + list(self._backdrops.items()):
            node.view.setSelected(nid in ids)
        self._emit_selection()

    def node_rect(self, node_id: str) -> QtCore.QRectF:
        view = self._items[node_id].view
        x, y = view.xy_pos
        return QtCore.QRectF(x, y, view.width, view.height)

    def cursor_scene_pos(self) -> QtCore.QPointF:
        """Where a new node should go: under the mouse if it is over the canvas, else the centre."""
        v = self.viewer
        local = v.mapFromGlobal(QtGui.QCursor.pos())
        if v.rect().contains(local):
            return v.mapToScene(local)
        return v.mapToScene(v.rect().center())

    def shown_rects(self, views=None) -> list[QtCore.QRectF]:
        """The scene rectangles of these node/group views (all by default) and of the result
        images hung below them."""
        if views is None:
            views = [n.view for n in self._items.values()] + [b.view for b in self._backdrops.values()]
        rects = []
        for v in views:
            rects.append(v.sceneBoundingRect())
            thumb = self._thumbs.get(getattr(v, "id", None))
            if thumb is not None and thumb.isVisible():
                rects.append(thumb.sceneBoundingRect())
        return rects

    def frame(self) -> None:
        """Fit the selection (or everything) in view, out of the minimap's corner."""
        rects = self.shown_rects(self.viewer.selected_nodes() or None)
        if rects:
            rect = QtCore.QRectF()
            for r in rects:
                rect = rect.united(r)
            # a margin only: a fixed allowance for thumbnails not yet made cost a fifth of the
            # height and pushed graphs that fit below the legible zoom
            framed = rect.adjusted(-40, -40, 40, 40)
            ngqt.show_scene_rect(self.viewer, framed)
            self.minimap.keep_clear(rects, framed, ngqt.MIN_LEGIBLE_SCALE)

    # -- document -> canvas -------------------------------------------------------------
    def _on_replaced(self):
        self._images.clear()
        for nid in list(self._items):
            self._remove_item(nid)
        for gid in list(self._backdrops):
            self._remove_backdrop(gid)
        self.sync()
        QtCore.QTimer.singleShot(0, self.frame)

    def sync(self) -> None:
        """Make the canvas show exactly the document."""
        self._syncing = True
        try:
            graph = self.doc.graph
            for nid in list(self._items):
                node = graph.nodes.get(nid)
                if node is None or self._shape.get(nid) != self._ports_of(node):
                    self._remove_item(nid)
            for nid, node in graph.nodes.items():
                if nid not in self._items:
                    self._add_item(node)
                else:
                    view = self._items[nid].view
                    if tuple(view.xy_pos) != tuple(node.pos):
                        view.xy_pos = [node.pos[0], node.pos[1]]
                    if view.name != shown_name(node):
                        self._refresh_node(nid)
            want = {(e.src, e.src_port, e.dst, e.dst_port) for e in graph.edges}
            have = self.shown_edges()
            for src, sp, dst, dp in have - want:
                a, b = self.port_view(src, sp, True), self.port_view(dst, dp, False)
                a.disconnect_from(b)
            for src, sp, dst, dp in want - have:
                try:
                    a, b = self.port_view(src, sp, True), self.port_view(dst, dp, False)
                except KeyError:  # a wire to a port the node does not have (a stale file)
                    continue
                a.connect_to(b)
            self._color_reroute_wires()
            self._sync_groups()
        finally:
            self._syncing = False

    def _color_reroute_wires(self) -> None:
        """A wire out of a reroute has the colour of the type the reroute carries."""
        from nodes.base import DATA_TYPES

        graph = self.doc.graph
        for nid, node in graph.nodes.items():
            if node.type != REROUTE or nid not in self._items:
                continue
            kind = wire_type(graph, registry.get, nid, "out")
            rgb = hex_to_rgb(DATA_TYPES[kind].color) if kind in DATA_TYPES else REROUTE_COLOR[:3]
            color = (*rgb, 255)
            if self.viewer.wire_colors.get((nid, "out")) != color:
                self.viewer.wire_colors[(nid, "out")] = color
            for pipe in self.port_view(nid, "out", True).connected_pipes:
                if tuple(pipe.color) != color:
                    pipe.color = color
                    if not pipe.highlighted():
                        pipe.reset()

    def _ports_of(self, node: Node) -> tuple:
        """(inputs, outputs) the node item needs: from the declaration, or for a placeholder
        from the wires the file has (so they still show)."""
        spec = registry.get(node.type)
        if spec is not None and not node.is_placeholder:
            return (node.type, tuple((n, i.type.name, i.optional) for n, i in spec.inputs.items()),
                    tuple((n, t.name) for n, t in spec.outputs.items()))
        ins = sorted({e.dst_port for e in self.doc.graph.edges if e.dst == node.id})
        outs = sorted({e.src_port for e in self.doc.graph.edges if e.src == node.id})
        return (node.type, tuple((n, "?", True) for n in ins), tuple((n, "?") for n in outs))

    def _add_item(self, node: Node) -> None:
        from nodes.base import DATA_TYPES

        shape = self._ports_of(node)
        item = ngqt.LoomNode()
        item.model.id = node.id
        item.view.id = node.id
        spec = registry.get(node.type)
        known = spec is not None and not node.is_placeholder
        item.view.compact = known and node.type == REROUTE
        if known and spec.params and not item.view.compact:
            panel = ParamPanel(item.view, spec.params,
                               lambda name, value, merge, nid=node.id: self.commit_param(nid, name, value, merge))
            item.view.panel_size = (PANEL_W, panel.height())
            self._panels[node.id] = panel
        item.NODE_NAME = item.model.name = item.view.name = shown_name(node)
        for name, type_name, _optional in shape[1]:
            color = hex_to_rgb(DATA_TYPES[type_name].color) if type_name in DATA_TYPES else (120, 120, 120)
            item.add_input(name, color=color)
        for name, type_name in shape[2]:
            color = hex_to_rgb(DATA_TYPES[type_name].color) if type_name in DATA_TYPES else (120, 120, 120)
            item.add_output(name, multi_output=True, color=color)
            self.viewer.wire_colors[(node.id, name)] = (*color, 255)
        self.ng.add_node(item, pos=[node.pos[0], node.pos[1]], selected=False, push_undo=False)
        # Looks are set on the view after adding: NodeGraphQt copies its model onto the view when
        # a node is added (and makes names unique, "Sampler 1"; we show the document's title).
        item.view.color = self._node_color(node)
        item.view.border_color = (58, 63, 75, 255)
        item.view.text_color = (230, 233, 238, 255)
        item.view.name = shown_name(node)
        item.view.draw_node()
        for name, type_name, optional in shape[1]:
            port = item.inputs()[name].view
            port.setToolTip(f"{name}: {type_name}" + (" (optional)" if optional else ""))
        for name, type_name in shape[2]:
            item.outputs()[name].view.setToolTip(f"{name}: {type_name}")
        self._items[node.id] = item
        self._shape[node.id] = shape
        badge = BadgeItem(item.view)
        badge.setVisible(False)
        self._badges[node.id] = badge
        self._thumbs[node.id] = ThumbItem(item.view)
        self._refresh_node(node.id)
        if node.id in self._images:  # deleted and brought back by undo: its result comes too
            self.show_image(node.id, self._images[node.id])
        self.item_created.emit(node.id)

    def _remove_item(self, nid: str) -> None:
        item = self._items.pop(nid)
        for port in list(item.inputs().values()) + list(item.outputs().values()):
            for pipe in list(port.view.connected_pipes):
                pipe.delete()
        self.ng.remove_node(item, push_undo=False)
        self._shape.pop(nid, None)
        self._badges.pop(nid, None)
        self._panels.pop(nid, None)
        self._thumbs.pop(nid, None)
        for key in [k for k in self.viewer.wire_colors if k[0] == nid]:
            del self.viewer.wire_colors[key]

    def _refresh_node(self, nid: str) -> None:
        node, item = self.doc.graph.nodes.get(nid), self._items.get(nid)
        if node is None or item is None:
            return
        title = shown_name(node)
        if item.view.name != title:
            item.view.name = title
            item.view.draw_node()
        spec = registry.get(node.type)
        tip = f"{node.type}" + (f"\n{spec.doc()}" if spec else "\n(unknown type: kept as a placeholder)")
        mode = {"bypass": "\n(bypassed: passes its inputs on)", "mute": "\n(muted: runs nothing)"}.get(node.mode, "")
        item.view.setToolTip(getattr(item.view, "_state_tip", "") or tip + mode)
        panel = self._panels.get(nid)
        if panel is not None and spec is not None:
            panel.set_values(spec.resolved_params(node.params))
        self._apply_looks(node, item.view)
        self._place_decorations(nid)

    def _node_color(self, node: Node) -> tuple:
        if node.type == REROUTE:
            return REROUTE_COLOR
        color = node.meta.get("color")
        if isinstance(color, str) and QtGui.QColor.isValidColorName(color):
            c = QtGui.QColor(color)
            return (c.red(), c.green(), c.blue(), 255)
        spec = registry.get(node.type)
        tint = CATEGORY_TINTS.get(spec.category if spec else "", CATEGORY_TINTS["misc"])
        return (*hex_to_rgb(tint), 255)

    def _apply_looks(self, node: Node, view) -> None:
        """Colour, collapsed and mode from the document onto the node item."""
        collapsed = bool(node.meta.get("collapsed")) and not view.compact
        color = self._node_color(node)
        if tuple(view.color) != color:
            view.color = color
        view.loom_mode = node.mode
        view.setOpacity(0.55 if node.mode == "mute" else 1.0)
        if view.collapsed != collapsed:
            view.collapsed = collapsed
            view.draw_node()
            for port in view.inputs + view.outputs:
                port.redraw_connected_pipes()
        panel = self._panels.get(node.id)
        if panel is not None:
            panel.setVisible(not collapsed)
        thumb = self._thumbs.get(node.id)
        if thumb is not None:
            thumb.setVisible(not collapsed and node.id in self._images)
        view.update()

    def _place_decorations(self, nid: str) -> None:
        view = self._items[nid].view
        badge = self._badges[nid]
        badge.setPos(view.width - badge.boundingRect().width() - 4, -badge.boundingRect().height() - 3)
        panel = self._panels.get(nid)
        if panel is not None:
            panel.setPos(0, view.panel_top)
            panel.set_width(view.width)
        self._thumbs[nid].setPos(0, view.height + 6)

    def panel(self, node_id: str) -> Optional[ParamPanel]:
        return self._panels.get(node_id)

    def commit_param(self, node_id: str, name: str, value, merge: bool = False) -> Optional[str]:
        """An edit on the canvas: the inspector's call (Document.set_param), so the same undo step."""
        problem = self.doc.set_param(node_id, name, value, merge=merge)
        if problem:
            self.message.emit(f"{name}: {problem}")
        return problem

    def _sync_groups(self) -> None:
        groups = {g.id: g for g in self.doc.graph.groups}
        for gid in list(self._backdrops):
            if gid not in groups:
                self._remove_backdrop(gid)
        for gid, group in groups.items():
            bd = self._backdrops.get(gid)
            if bd is None:
                bd = ngqt.BackdropNode()
                bd.model.id = bd.view.id = gid
                self.ng.add_node(bd, selected=False, push_undo=False)
                self._backdrops[gid] = bd
            x, y, w, h = group.rect
            view = bd.view
            if tuple(view.xy_pos) != (x, y):
                view.xy_pos = [x, y]
            if (view.width, view.height) != (w, h):
                view.width, view.height = w, h
            view.name = group.title
            view.color = (*hex_to_rgb(group.color), 255)
            view.update()

    def _remove_backdrop(self, gid: str) -> None:
        bd = self._backdrops.pop(gid)
        self.ng.remove_node(bd, push_undo=False)

    # -- run state and images -----------------------------------------------------------
    def set_state(self, nid: str, state: str, text: str = "", tooltip: str = "") -> None:
        """Show a run state on a node: badge text and colour, border colour, tooltip."""
        item = self._items.get(nid)
        if item is None:
            return
        color = STATE_COLORS.get(state, "#666a74")
        self._badges[nid].set(text or state, color, tooltip)
        item.view.border_color = (*hex_to_rgb(color), 255) if state != "idle" else (58, 63, 75, 255)
        item.view._state_tip = tooltip
        if state == "idle":
            self._badges[nid].setVisible(False)
            self._badges[nid].setToolTip("")
        self._refresh_node(nid)
        item.view.update()

    def badge_text(self, nid: str) -> str:
        badge = self._badges.get(nid)
        return badge.text if badge is not None and badge.isVisible() else ""

    def show_image(self, nid: str, image: QtGui.QImage) -> None:
        self._images[nid] = image
        thumb = self._thumbs.get(nid)
        if thumb is not None:
            thumb.show_image(image, max(THUMB_WIDTH, self._items[nid].view.width))
            thumb.setVisible(not self._items[nid].view.collapsed)
            self._place_decorations(nid)

    def thumbnail_height(self, nid: str) -> float:
        thumb = self._thumbs.get(nid)
        if thumb is None or not thumb.isVisible():
            return 0.0
        return thumb.pixmap().height() * thumb.scale() + 6

    def thumbnail(self, nid: str) -> Optional[QtGui.QPixmap]:
        thumb = self._thumbs.get(nid)
        return thumb.pixmap() if thumb is not None and thumb.isVisible() else None

    # -- canvas -> document -------------------------------------------------------------
    def _pair(self, p1, p2) -> Optional[tuple[str, str, str, str]]:
        """(src, src_port, dst, dst_port) for two port views in either order."""
        from NodeGraphQt.constants import PortTypeEnum

        out, inp = (p1, p2) if p1.port_type == PortTypeEnum.OUT.value else (p2, p1)
        if out.port_type != PortTypeEnum.OUT.value or inp.port_type != PortTypeEnum.IN.value:
            return None
        return out.node.id, out.name, inp.node.id, inp.name

    def _check_ports(self, p1, p2) -> Optional[str]:
        pair = self._pair(p1, p2)
        if pair is None:
            return "connect an output to an input"
        return self.doc.connection_problem(*pair)

    def _on_refused(self, why: str) -> None:
        self._last_refusal = why
        self.message.emit(f"Not connected: {why}")

    def request_connection(self, src: str, src_port: str, dst: str, dst_port: str) -> Optional[str]:
        """Wire as a drag on the canvas would (same path, same refusal): returns the refusal."""
        a, b = self.port_view(src, src_port, True), self.port_view(dst, dst_port, False)
        self._last_refusal = None
        self.viewer.connection_changed.emit([], [(a, b)])
        return self._last_refusal

    _last_refusal: Optional[str] = None

    def _on_connection_changed(self, disconnected, connected) -> None:
        doc = self.doc
        refused = None
        wires, new_inputs = [], set()
        for p1, p2 in connected:
            pair = self._pair(p1, p2)
            if pair is None:
                refused = "connect an output to an input"
                continue
            why = doc.connection_problem(*pair)
            if why:
                refused = why
                continue
            wires.append(pair)
            new_inputs.add((pair[2], pair[3]))
        # A drag that moves a wire first detaches it; an input wired again by the same gesture
        # needs no separate disconnect (the connect replaces it). A refused drop changes nothing.
        cuts = []
        if not refused:
            for p1, p2 in disconnected:
                pair = self._pair(p1, p2)
                if pair and (pair[2], pair[3]) not in new_inputs \
                        and doc.graph.input_edge(pair[2], pair[3]) is not None:
                    cuts.append(pair)
        if cuts or wires:
            doc.undo.beginMacro("connect" if wires else "disconnect")
            for pair in cuts:
                doc.disconnect(pair[2], pair[3])
            for pair in wires:
                doc.connect(*pair)
            doc.undo.endMacro()
        if refused:
            self._last_refusal = refused
            self.message.emit(f"Not connected: {refused}")
        self.sync()

    def _on_connection_sliced(self, ports) -> None:
        self.doc.undo.beginMacro("cut wires")
        for p1, p2 in ports:
            pair = self._pair(p1, p2)
            if pair:
                self.doc.disconnect(pair[2], pair[3])
        self.doc.undo.endMacro()
        self.sync()

    def _on_moved(self, moved: dict) -> None:
        node_moves, group_moves = {}, {}
        for view, _prev in moved.items():
            # tenths of a unit: files stay tidy and nothing visible is lost
            x, y = (round(float(c), 1) for c in view.xy_pos)
            if view.id in self._items:
                node_moves[view.id] = (x, y)
            elif view.id in self._backdrops:
                group_moves[view.id] = (x, y)
        self.doc.undo.beginMacro("move")
        self.doc.move_nodes(node_moves)
        for gid, (x, y) in group_moves.items():
            group = self.doc.group(gid)
            if group is not None:
                self.doc.edit_group(gid, rect=(x, y, group.rect[2], group.rect[3]))
        self._update_memberships()
        self.doc.undo.endMacro()
        self.sync()

    def _update_memberships(self) -> None:
        """A group holds the nodes whose centre lies on its backdrop (dragging a node onto or
        off a backdrop changes that, within the same undo step as the drag)."""
        for group in self.doc.graph.groups:
            x, y, w, h = group.rect
            area = QtCore.QRectF(x, y, w, h)
            inside = [nid for nid in self.doc.graph.nodes
                      if nid in self._items and area.contains(self.node_rect(nid).center())]
            if set(inside) != set(group.nodes):
                self.doc.edit_group(group.id, nodes=inside)

    def _on_renamed(self, nid: str, name: str) -> None:
        if nid in self._items:
            node = self.doc.graph.nodes[nid]
            self.doc.rename(nid, "" if name == node.type else name)
        elif nid in self._backdrops:
            self.doc.edit_group(nid, title=name)
        self.sync()

    def _on_backdrop_updated(self, gid: str, what: str, value) -> None:
        if gid in self._backdrops and isinstance(value, dict):
            x, y = value.get("pos", self._backdrops[gid].view.xy_pos)
            self.doc.undo.beginMacro("resize group")
            self.doc.edit_group(gid, rect=(float(x), float(y), float(value["width"]), float(value["height"])))
            self._update_memberships()
            self.doc.undo.endMacro()
        self.sync()

    def _emit_selection(self) -> None:
        if not self._syncing:
            self.selection_changed.emit(self.selected_ids())

    # -- edits on the selection ---------------------------------------------------------
    def tidy_selection(self) -> None:
        """Lay the selected nodes (or all) out in columns by depth, in one undo step."""
        ids = self.selected_ids() or list(self.doc.graph.nodes)
        sizes = {}
        for nid in ids:
            if nid in self._items:
                r = self.node_rect(nid)
                sizes[nid] = (max(r.width(), THUMB_WIDTH if self.thumbnail_height(nid) else 0),
                              r.height() + self.thumbnail_height(nid))
        self.doc.move_nodes(tidy(self.doc.graph, [i for i in ids if i in sizes], sizes))

    def wire_at(self, scene_pos: QtCore.QPointF) -> Optional[Edge]:
        """The wire under a scene point, as the document's Edge."""
        ports = ngqt.pipe_at(self.viewer, scene_pos)
        if ports is None:
            return None
        out, inp = ports
        edge = Edge(out.node.id, out.name, inp.node.id, inp.name)
        return edge if edge in self.doc.graph.edges else None

    def node_at(self, scene_pos: QtCore.QPointF) -> Optional[str]:
        for nid in self._items:
            if self.node_rect(nid).contains(scene_pos):
                return nid
        return None

    def group_selection(self, title: str = "Group") -> Optional[str]:
        ids = self.selected_ids()
        if not ids:
            self.message.emit("Select nodes to group first")
            return None
        rect = QtCore.QRectF()
        for nid in ids:
            rect = rect.united(self.node_rect(nid))
        rect = rect.adjusted(-24, -48, 24, 24)
        return self.doc.add_group(ids, (rect.x(), rect.y(), rect.width(), rect.height()), title)


def shown_name(node) -> str:
    """A node's title, or its type's display name (registry label) when it has none."""
    if node.title:
        return node.title
    spec = registry.get(node.type)
    return spec.label() if spec is not None else node.type
