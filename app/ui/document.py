"""The open document: a Graph, its file path and the one undo stack that every edit goes through.

The canvas, the inspector and the layout canvas never change the Graph themselves: they call the
edit methods here, which push QUndoCommands. Each command changes the Graph and then announces
what it changed, and the views sync from the Graph. That makes undo/redo of every edit (params
included) one linear history tied to the document.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Iterable, Optional

from PySide6 import QtCore, QtGui

from app.graph import Edge, Graph, GraphError, Group, Node, new_id
from app.graph.fileformat import dumps
from app.graph.passthrough import REROUTE, type_accepts, wire_type
from nodes import registry

_ABSENT = object()  # a param that was not stored (so its default applied)

CLIPBOARD_MIME = "application/x-loomwork-graph"


class Document(QtCore.QObject):
    """A graph being edited. Signals say what changed so views update only that."""

    structure_changed = QtCore.Signal()       # nodes, wires, groups or positions
    node_changed = QtCore.Signal(str)         # a node's params or title
    inputs_changed = QtCore.Signal(list)      # nodes whose inputs (params or wires) changed
    replaced = QtCore.Signal()                # a whole new graph (new/open)
    dirty_changed = QtCore.Signal(bool)

    def __init__(self, graph: Optional[Graph] = None, path: Optional[str] = None, parent=None):
        super().__init__(parent)
        self.graph = graph or Graph()
        self.path = path
        self.undo = QtGui.QUndoStack(self)
        self.undo.cleanChanged.connect(self._on_clean_changed)

    def _on_clean_changed(self, clean: bool) -> None:
        self.dirty_changed.emit(not clean)

    # -- whole document ------------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        return not self.undo.isClean()

    def replace(self, graph: Graph, path: Optional[str]) -> None:
        """Show another graph (New/Open); the undo history starts over."""
        self.graph, self.path = graph, path
        self.undo.clear()
        self.undo.setClean()
        self.replaced.emit()
        self.structure_changed.emit()
        self.dirty_changed.emit(False)

    def mark_saved(self, path: str) -> None:
        self.path = path
        self.undo.setClean()

    # -- checks --------------------------------------------------------------------------
    def connection_problem(self, src: str, src_port: str, dst: str, dst_port: str) -> Optional[str]:
        """Why this wire may not be made, as a sentence; None if it may."""
        g = self.graph
        if src not in g.nodes or dst not in g.nodes:
            return "that node no longer exists"
        if src == dst:
            return "a node cannot feed itself"
        a, b = g.nodes[src], g.nodes[dst]
        sa, sb = registry.get(a.type), registry.get(b.type)
        if sa is None or sb is None or a.is_placeholder or b.is_placeholder:
            return "cannot wire a placeholder node (its type is unknown to this build)"
        out_type = wire_type(g, registry.get, src, src_port)  # a reroute: the type it carries
        port = sb.inputs.get(dst_port)
        if out_type is None:
            return f"{a.label} has no output {src_port!r}"
        if port is None:
            return f"{b.label} has no input {dst_port!r}"
        if src in g.downstream([dst]):
            return f"that wire would make a loop through {b.title or b.type}"
        takers = [(b, dst_port, port.type.name)] if b.type != REROUTE else self._reroute_takers(dst)
        for taker, name, want in takers:
            if not type_accepts(want, out_type):
                return (f"{taker.title or taker.type}.{name} takes {want}, but "
                        f"{a.title or a.type}.{src_port} gives {out_type}")
        return None

    def _reroute_takers(self, reroute: str) -> list:
        """(node, input, type) of every input a reroute (and reroutes after it) feeds."""
        g, out, stack, seen = self.graph, [], [reroute], set()
        while stack:
            nid = stack.pop()
            if nid in seen:
                continue
            seen.add(nid)
            for e in g.outputs_of(nid):
                node = g.nodes[e.dst]
                spec = registry.get(node.type)
                if node.type == REROUTE:
                    stack.append(e.dst)
                elif spec is not None and e.dst_port in spec.inputs:
                    out.append((node, e.dst_port, spec.inputs[e.dst_port].type.name))
        return out

    # -- edits (each pushes one undoable command) ------------------------------------------
    def add_node(self, type_name: str, pos=(0.0, 0.0), params: Optional[dict] = None,
                 title: str = "") -> str:
        spec = registry.get(type_name)
        if spec is None:
            raise GraphError(f"unknown node type {type_name!r}")
        node = Node(id=new_id(), type=type_name, version=spec.version, title=title,
                    params=dict(params or {}), pos=(float(pos[0]), float(pos[1])))
        self.undo.push(AddNodesCmd(self, [node], [], f"add {type_name}"))
        return node.id

    def remove_nodes(self, ids: Iterable[str], group_ids: Iterable[str] = ()) -> None:
        ids = [i for i in ids if i in self.graph.nodes]
        group_ids = [g for g in group_ids if self.group(g) is not None]
        if not ids and not group_ids:
            return
        self.undo.beginMacro(f"delete {len(ids) + len(group_ids)} item(s)")
        for gid in group_ids:
            self.undo.push(RemoveGroupCmd(self, gid))
        if ids:
            self.undo.push(RemoveNodesCmd(self, ids))
        self.undo.endMacro()

    def connect(self, src: str, src_port: str, dst: str, dst_port: str) -> Optional[str]:
        """Wire an output to an input (replacing what fed it). Returns a refusal reason or None."""
        why = self.connection_problem(src, src_port, dst, dst_port)
        if why:
            return why
        edge = Edge(src, src_port, dst, dst_port)
        if edge in self.graph.edges:
            return None
        self.undo.push(ConnectCmd(self, edge))
        return None

    def disconnect(self, dst: str, dst_port: str) -> None:
        if self.graph.input_edge(dst, dst_port) is not None:
            self.undo.push(DisconnectCmd(self, dst, dst_port))

    def set_param(self, node_id: str, name: str, value: Any, *, merge: bool = False) -> Optional[str]:
        """Set a param if its declaration accepts the value; returns the refusal message or None.

        `merge` lets consecutive edits of one field (typing, dragging) become one undo step.
        """
        node = self.graph.nodes.get(node_id)
        if node is None:
            return "that node no longer exists"
        spec = registry.get(node.type)
        param = spec.params.get(name) if spec else None
        if param is None:
            return f"{node.type} has no param {name!r}"
        problem = param.check(value)
        if problem:
            return problem
        if node.params.get(name, _ABSENT) == value:
            return None
        self.undo.push(SetParamCmd(self, node_id, name, copy.deepcopy(value), merge))
        return None

    def move_nodes(self, moves: dict[str, tuple[float, float]]) -> None:
        moves = {i: (float(p[0]), float(p[1])) for i, p in moves.items()
                 if i in self.graph.nodes and tuple(self.graph.nodes[i].pos) != tuple(p)}
        if moves:
            self.undo.push(MoveNodesCmd(self, moves))

    def set_meta(self, node_id: str, key: str, value: Any) -> None:
        """A node's UI-only setting (kept in the file, not read by the engine), undoable."""
        node = self.graph.nodes.get(node_id)
        if node is not None and node.meta.get(key) != value:
            self.undo.push(SetMetaCmd(self, node_id, key, value))

    def set_mode(self, ids: Iterable[str], mode: str) -> None:
        """Bypass ("bypass"), mute ("mute") or restore ("") nodes, in one undo step."""
        changes = {i: mode for i in ids if i in self.graph.nodes and self.graph.nodes[i].mode != mode
                   and not self.graph.nodes[i].is_placeholder}
        if changes:
            self.undo.push(SetModeCmd(self, changes, mode))

    def set_meta_many(self, ids: Iterable[str], key: str, value: Any) -> None:
        """One UI setting (a colour, collapsed) on several nodes, in one undo step; None removes it."""
        ids = [i for i in ids if i in self.graph.nodes and self.graph.nodes[i].meta.get(key) != value]
        if not ids:
            return
        self.undo.beginMacro(f"set {key} of {len(ids)} node(s)")
        for i in ids:
            self.undo.push(SetMetaCmd(self, i, key, _ABSENT if value is None else value))
        self.undo.endMacro()

    def insert_reroute(self, edge: Edge, pos) -> Optional[str]:
        """A reroute dot on a wire (one undo step); returns its id."""
        if edge not in self.graph.edges:
            return None
        node = Node(id=new_id(), type=REROUTE, version=registry.get(REROUTE).version,
                    pos=(float(pos[0]), float(pos[1])))
        self.undo.beginMacro("add reroute")
        self.undo.push(AddNodesCmd(self, [node], [Edge(edge.src, edge.src_port, node.id, "in")], "add reroute"))
        self.undo.push(ConnectCmd(self, Edge(node.id, "out", edge.dst, edge.dst_port)))
        self.undo.endMacro()
        return node.id

    def rename(self, node_id: str, title: str) -> None:
        node = self.graph.nodes.get(node_id)
        if node is not None and node.title != title:
            self.undo.push(RenameCmd(self, node_id, title))

    def add_group(self, node_ids: list[str], rect, title: str = "Group",
                  color: str = "#3a4150") -> str:
        group = Group(id=new_id(), title=title, nodes=list(node_ids),
                      rect=tuple(float(v) for v in rect), color=color)
        self.undo.push(AddGroupCmd(self, group))
        return group.id

    def edit_group(self, group_id: str, **changes) -> None:
        group = self.group(group_id)
        if group is None:
            return
        changes = {k: v for k, v in changes.items() if getattr(group, k) != v}
        if changes:
            self.undo.push(EditGroupCmd(self, group_id, changes))

    def group(self, group_id: str) -> Optional[Group]:
        return next((g for g in self.graph.groups if g.id == group_id), None)

    # -- clipboard -----------------------------------------------------------------------
    def copy_text(self, ids: Iterable[str], group_ids: Iterable[str] = ()) -> str:
        """The JSON of the selection (a .loom document): what Copy puts on the clipboard."""
        ids = [i for i in ids if i in self.graph.nodes]
        sub = self.graph.subgraph(ids)
        sub.groups = [copy.deepcopy(g) for g in self.graph.groups if g.id in set(group_ids)]
        for g in sub.groups:
            g.nodes = [n for n in g.nodes if n in sub.nodes]
        return dumps(sub)

    def paste_text(self, text: str, at: Optional[tuple[float, float]] = None,
                   offset=(40.0, 40.0)) -> list[str]:
        """Paste a copied selection with fresh ids; at `at` (its top-left) or shifted by `offset`.

        Returns the new node ids. Raises GraphFileError for text that is not a graph.
        """
        from app.graph import loads

        sub = loads(text, registry.get)
        if not sub.nodes and not sub.groups:
            return []
        if at is not None:
            xs = [n.pos[0] for n in sub.nodes.values()] + [g.rect[0] for g in sub.groups]
            ys = [n.pos[1] for n in sub.nodes.values()] + [g.rect[1] for g in sub.groups]
            offset = (at[0] - min(xs), at[1] - min(ys))
        mapping = {old: new_id() for old in sub.nodes}
        nodes = []
        for old, node in sub.nodes.items():
            clone = copy.deepcopy(node)
            clone.id = mapping[old]
            clone.pos = (node.pos[0] + offset[0], node.pos[1] + offset[1])
            if clone.raw is not None:
                clone.raw["id"] = clone.id
            nodes.append(clone)
        edges = [Edge(mapping[e.src], e.src_port, mapping[e.dst], e.dst_port) for e in sub.edges]
        groups = []
        for g in sub.groups:
            x, y, w, h = g.rect
            groups.append(Group(id=new_id(), title=g.title, nodes=[mapping[n] for n in g.nodes if n in mapping],
                                rect=(x + offset[0], y + offset[1], w, h), color=g.color))
        self.undo.beginMacro(f"paste {len(nodes)} node(s)")
        self.undo.push(AddNodesCmd(self, nodes, edges, "paste"))
        for g in groups:
            self.undo.push(AddGroupCmd(self, g))
        self.undo.endMacro()
        return [n.id for n in nodes]

    def duplicate(self, ids: Iterable[str]) -> list[str]:
        ids = list(ids)
        if not ids:
            return []
        return self.paste_text(self.copy_text(ids))

    # -- notifications (commands call these) ---------------------------------------------
    def _announce(self, structure: bool = False, nodes: Iterable[str] = (),
                  inputs: Iterable[str] = ()) -> None:
        if structure:
            self.structure_changed.emit()
        for nid in nodes:
            self.node_changed.emit(nid)
        inputs = [i for i in inputs if i in self.graph.nodes]
        if inputs:
            self.inputs_changed.emit(inputs)


# -- commands ---------------------------------------------------------------------------------
class AddNodesCmd(QtGui.QUndoCommand):
    """Insert nodes and the wires among them (add, paste, duplicate)."""

    def __init__(self, doc: Document, nodes: list[Node], edges: list[Edge], text: str):
        super().__init__(text)
        self.doc, self.nodes, self.edges = doc, [copy.deepcopy(n) for n in nodes], list(edges)

    def redo(self):
        g = self.doc.graph
        for n in self.nodes:
            g.nodes[n.id] = copy.deepcopy(n)
        g.edges.extend(self.edges)
        ids = [n.id for n in self.nodes]
        self.doc._announce(structure=True, inputs=ids)

    def undo(self):
        g = self.doc.graph
        ids = {n.id for n in self.nodes}
        g.edges = [e for e in g.edges if e.src not in ids and e.dst not in ids]
        for nid in ids:
            g.nodes.pop(nid, None)
        for grp in g.groups:
            grp.nodes = [m for m in grp.nodes if m not in ids]
        self.doc._announce(structure=True)


class RemoveNodesCmd(QtGui.QUndoCommand):
    def __init__(self, doc: Document, ids: list[str]):
        super().__init__(f"delete {len(ids)} node(s)")
        self.doc, self.ids = doc, list(ids)
        self.saved: list[Node] = []
        self.wires: list[tuple[int, Edge]] = []
        self.memberships: list[tuple[str, int, str]] = []

    def redo(self):
        g = self.doc.graph
        ids = set(self.ids)
        self.order = list(g.nodes)
        self.saved = [copy.deepcopy(g.nodes[i]) for i in self.ids if i in g.nodes]
        self.wires = [(k, e) for k, e in enumerate(g.edges) if e.src in ids or e.dst in ids]
        self.memberships = [(grp.id, k, m) for grp in g.groups for k, m in enumerate(grp.nodes) if m in ids]
        affected = {e.dst for _, e in self.wires if e.dst not in ids}
        g.edges = [e for e in g.edges if e.src not in ids and e.dst not in ids]
        for grp in g.groups:
            grp.nodes = [m for m in grp.nodes if m not in ids]
        for i in self.ids:
            g.nodes.pop(i, None)
        self.doc._announce(structure=True, inputs=affected)

    def undo(self):
        g = self.doc.graph
        restored = {n.id: copy.deepcopy(n) for n in self.saved}
        # Back in their old places (dict order is file order), so files diff cleanly.
        nodes = {i: restored.get(i) or g.nodes.get(i) for i in self.order}
        nodes.update({i: n for i, n in g.nodes.items() if i not in nodes})
        g.nodes.clear()
        g.nodes.update({i: n for i, n in nodes.items() if n is not None})
        for k, e in self.wires:
            g.edges.insert(min(k, len(g.edges)), e)
        for gid, k, m in self.memberships:
            grp = self.doc.group(gid)
            if grp is not None:
                grp.nodes.insert(min(k, len(grp.nodes)), m)
        # restored nodes get back the inputs they had; only their survivors' inputs change
        restored_ids = {n.id for n in self.saved}
        self.doc._announce(structure=True, inputs={e.dst for _, e in self.wires if e.dst not in restored_ids})


class ConnectCmd(QtGui.QUndoCommand):
    def __init__(self, doc: Document, edge: Edge):
        super().__init__(f"connect {edge.src_port} -> {edge.dst_port}")
        self.doc, self.edge, self.replaced = doc, edge, None

    def redo(self):
        e = self.edge
        self.replaced = self.doc.graph.connect(e.src, e.src_port, e.dst, e.dst_port)
        self.doc._announce(structure=True, inputs=[e.dst])

    def undo(self):
        e = self.edge
        self.doc.graph.disconnect(e.dst, e.dst_port)
        if self.replaced is not None:
            r = self.replaced
            self.doc.graph.connect(r.src, r.src_port, r.dst, r.dst_port)
        self.doc._announce(structure=True, inputs=[e.dst])


class DisconnectCmd(QtGui.QUndoCommand):
    def __init__(self, doc: Document, dst: str, dst_port: str):
        super().__init__(f"disconnect {dst_port}")
        self.doc, self.dst, self.dst_port, self.removed = doc, dst, dst_port, None

    def redo(self):
        self.removed = self.doc.graph.disconnect(self.dst, self.dst_port)
        self.doc._announce(structure=True, inputs=[self.dst])

    def undo(self):
        if self.removed is not None:
            r = self.removed
            self.doc.graph.connect(r.src, r.src_port, r.dst, r.dst_port)
        self.doc._announce(structure=True, inputs=[self.dst])


class SetParamCmd(QtGui.QUndoCommand):
    MERGE_ID = 4242
    MERGE_WINDOW = 2.0  # seconds: typing in one field is one undo step, a later edit is another

    def __init__(self, doc: Document, node_id: str, name: str, value: Any, mergeable: bool):
        node = doc.graph.nodes[node_id]
        super().__init__(f"set {node.title or node.type}.{name}")
        self.doc, self.node_id, self.name, self.value = doc, node_id, name, value
        old = node.params.get(name, _ABSENT)
        self.old = old if old is _ABSENT else copy.deepcopy(old)
        self.mergeable = mergeable
        self.stamp = time.monotonic()

    def id(self):
        return self.MERGE_ID

    def mergeWith(self, other):
        if not (isinstance(other, SetParamCmd) and self.mergeable and other.mergeable
                and other.node_id == self.node_id and other.name == self.name
                and other.stamp - self.stamp < self.MERGE_WINDOW):
            return False
        self.value, self.stamp = other.value, other.stamp
        return True

    def _apply(self, value):
        node = self.doc.graph.nodes[self.node_id]
        if value is _ABSENT:
            node.params.pop(self.name, None)
        else:
            node.params[self.name] = copy.deepcopy(value)
        self.doc._announce(nodes=[self.node_id], inputs=[self.node_id])

    def redo(self):
        self._apply(self.value)

    def undo(self):
        self._apply(self.old)


class MoveNodesCmd(QtGui.QUndoCommand):
    def __init__(self, doc: Document, moves: dict[str, tuple[float, float]]):
        super().__init__(f"move {len(moves)} node(s)")
        self.doc, self.new = doc, dict(moves)
        self.old = {i: tuple(doc.graph.nodes[i].pos) for i in moves}

    def _apply(self, positions):
        for i, p in positions.items():
            if i in self.doc.graph.nodes:
                self.doc.graph.nodes[i].pos = p
        self.doc._announce(structure=True)

    def redo(self):
        self._apply(self.new)

    def undo(self):
        self._apply(self.old)


class RenameCmd(QtGui.QUndoCommand):
    def __init__(self, doc: Document, node_id: str, title: str):
        super().__init__(f"rename to {title!r}")
        self.doc, self.node_id, self.title = doc, node_id, title
        self.old = doc.graph.nodes[node_id].title

    def _apply(self, title):
        self.doc.graph.nodes[self.node_id].title = title
        self.doc._announce(structure=True, nodes=[self.node_id])

    def redo(self):
        self._apply(self.title)

    def undo(self):
        self._apply(self.old)


class SetMetaCmd(QtGui.QUndoCommand):
    def __init__(self, doc: Document, node_id: str, key: str, value: Any):
        super().__init__(f"set {key}")
        self.doc, self.node_id, self.key, self.value = doc, node_id, key, value
        self.old = doc.graph.nodes[node_id].meta.get(key, _ABSENT)

    def _apply(self, value):
        meta = self.doc.graph.nodes[self.node_id].meta
        if value is _ABSENT:
            meta.pop(self.key, None)
        else:
            meta[self.key] = value
        self.doc._announce(nodes=[self.node_id])

    def redo(self):
        self._apply(self.value)

    def undo(self):
        self._apply(self.old)


class SetModeCmd(QtGui.QUndoCommand):
    def __init__(self, doc: Document, changes: dict[str, str], mode: str):
        super().__init__({"bypass": "bypass", "mute": "mute"}.get(mode, "un-bypass") + f" {len(changes)} node(s)")
        self.doc, self.new = doc, dict(changes)
        self.old = {i: doc.graph.nodes[i].mode for i in changes}

    def _apply(self, modes):
        for i, m in modes.items():
            self.doc.graph.nodes[i].mode = m
        # what reads a bypassed node changes, so its readers' inputs change
        readers = {e.dst for e in self.doc.graph.edges if e.src in modes} | set(modes)
        self.doc._announce(nodes=list(modes), inputs=self.doc.graph.downstream(readers))

    def redo(self):
        self._apply(self.new)

    def undo(self):
        self._apply(self.old)


class AddGroupCmd(QtGui.QUndoCommand):
    def __init__(self, doc: Document, group: Group):
        super().__init__(f"group {group.title!r}")
        self.doc, self.group = doc, copy.deepcopy(group)

    def redo(self):
        self.doc.graph.groups.append(copy.deepcopy(self.group))
        self.doc._announce(structure=True)

    def undo(self):
        self.doc.graph.groups = [g for g in self.doc.graph.groups if g.id != self.group.id]
        self.doc._announce(structure=True)


class RemoveGroupCmd(QtGui.QUndoCommand):
    def __init__(self, doc: Document, group_id: str):
        super().__init__("delete group")
        self.doc, self.group_id, self.saved, self.index = doc, group_id, None, 0

    def redo(self):
        groups = self.doc.graph.groups
        self.index = next(k for k, g in enumerate(groups) if g.id == self.group_id)
        self.saved = groups.pop(self.index)
        self.doc._announce(structure=True)

    def undo(self):
        self.doc.graph.groups.insert(self.index, self.saved)
        self.doc._announce(structure=True)


class EditGroupCmd(QtGui.QUndoCommand):
    def __init__(self, doc: Document, group_id: str, changes: dict):
        super().__init__("edit group")
        self.doc, self.group_id, self.new = doc, group_id, dict(changes)
        group = doc.group(group_id)
        self.old = {k: copy.deepcopy(getattr(group, k)) for k in changes}

    def _apply(self, values):
        group = self.doc.group(self.group_id)
        for k, v in values.items():
            setattr(group, k, copy.deepcopy(v))
        self.doc._announce(structure=True)

    def redo(self):
        self._apply(self.new)

    def undo(self):
        self._apply(self.old)


def clipboard_mime(text: str) -> QtCore.QMimeData:
    """Mime data for a copied selection: our own type plus plain JSON text (other apps, other
    windows of Loomwork, and a text editor can all take it)."""
    mime = QtCore.QMimeData()
    mime.setData(CLIPBOARD_MIME, text.encode("utf-8"))
    mime.setText(text)
    return mime


def clipboard_text(mime: Optional[QtCore.QMimeData]) -> Optional[str]:
    if mime is None:
        return None
    if mime.hasFormat(CLIPBOARD_MIME):
        return bytes(mime.data(CLIPBOARD_MIME)).decode("utf-8")
    if mime.hasText():
        text = mime.text()
        if '"loomwork.graph"' in text:
            return text
    return None
