"""The graph document: plain data, the one source of truth for a Loomwork graph.

No Qt, no torch. The canvas, the inspector, the CLI and the engine all read this; edits go
through the methods here (the UI wraps them in undoable commands).
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional


def new_id() -> str:
    return str(uuid.uuid4())


@dataclass
class Node:
    """One node instance. `params` are stored by name; `version` is its type's version."""

    id: str
    type: str
    version: int = 1
    title: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    pos: tuple[float, float] = (0.0, 0.0)
    meta: dict[str, Any] = field(default_factory=dict)
    # A node whose type this build does not know (or knows only in an older version): the
    # record as it was read, written back unchanged so nothing the user made is lost.
    raw: Optional[dict] = None

    @property
    def is_placeholder(self) -> bool:
        return self.raw is not None

    @property
    def label(self) -> str:
        """How messages name this node: its title if it has one, else its type, plus a short id."""
        return f"{self.title or self.type} [{self.id[:8]}]"


@dataclass(frozen=True)
class Edge:
    """A wire from an output port to an input port. An input takes at most one wire."""

    src: str
    src_port: str
    dst: str
    dst_port: str


@dataclass
class Group:
    """A backdrop around nodes, with a title and colour."""

    id: str
    title: str = "Group"
    nodes: list[str] = field(default_factory=list)
    rect: tuple[float, float, float, float] = (0.0, 0.0, 200.0, 200.0)
    color: str = "#3a4150"


class GraphError(ValueError):
    """An edit the document refuses (unknown node, port already wired, ...)."""


class CycleError(GraphError):
    """The graph has a cycle. `nodes`: every id that cannot be ordered (on a cycle, or fed
    through one); `on_cycle`: only those on a cycle."""

    def __init__(self, message: str, nodes: list[str], on_cycle: Optional[list[str]] = None):
        super().__init__(message)
        self.nodes = nodes
        self.on_cycle = nodes if on_cycle is None else on_cycle


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    # -- nodes ------------------------------------------------------------------------------
    def add_node(self, type: str, params: Optional[dict] = None, *, title: str = "",
                 version: int = 1, pos=(0.0, 0.0), id: Optional[str] = None) -> Node:
        node = Node(id=id or new_id(), type=type, version=version, title=title,
                    params=dict(params or {}), pos=(float(pos[0]), float(pos[1])))
        if node.id in self.nodes:
            raise GraphError(f"a node with id {node.id} already exists")
        self.nodes[node.id] = node
        return node

    def remove_node(self, node_id: str) -> tuple[Node, list[Edge]]:
        """Remove a node and its wires; returns both so an undo can put them back."""
        node = self.node(node_id)
        wires = [e for e in self.edges if node_id in (e.src, e.dst)]
        self.edges = [e for e in self.edges if node_id not in (e.src, e.dst)]
        for group in self.groups:
            if node_id in group.nodes:
                group.nodes.remove(node_id)
        del self.nodes[node_id]
        return node, wires

    def node(self, node_id: str) -> Node:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise GraphError(f"no node with id {node_id}") from None

    def find(self, ref: str) -> Node:
        """A node by id, id prefix (8+ chars) or unique title — how the CLI's --set names nodes."""
        if ref in self.nodes:
            return self.nodes[ref]
        titled = [n for n in self.nodes.values() if n.title == ref]
        if len(titled) == 1:
            return titled[0]
        if len(titled) > 1:
            raise GraphError(f"{len(titled)} nodes are titled {ref!r}; name the node by id instead")
        if len(ref) >= 8:
            prefixed = [n for n in self.nodes.values() if n.id.startswith(ref)]
            if len(prefixed) == 1:
                return prefixed[0]
        raise GraphError(f"no node has id or title {ref!r}")

    def set_param(self, node_id: str, name: str, value: Any) -> Any:
        """Set a param; returns the old value (or None) for undo."""
        node = self.node(node_id)
        old = node.params.get(name)
        node.params[name] = value
        return old

    # -- edges ------------------------------------------------------------------------------
    def connect(self, src: str, src_port: str, dst: str, dst_port: str) -> Optional[Edge]:
        """Wire src.src_port -> dst.dst_port, replacing the wire that fed that input (returned)."""
        self.node(src), self.node(dst)
        if src == dst:
            raise GraphError("a node cannot feed itself")
        old = self.input_edge(dst, dst_port)
        if old is not None:
            self.edges.remove(old)
        self.edges.append(Edge(src, src_port, dst, dst_port))
        return old

    def disconnect(self, dst: str, dst_port: str) -> Optional[Edge]:
        old = self.input_edge(dst, dst_port)
        if old is not None:
            self.edges.remove(old)
        return old

    def input_edge(self, dst: str, dst_port: str) -> Optional[Edge]:
        for e in self.edges:
            if e.dst == dst and e.dst_port == dst_port:
                return e
        return None

    def inputs_of(self, node_id: str) -> dict[str, Edge]:
        return {e.dst_port: e for e in self.edges if e.dst == node_id}

    def outputs_of(self, node_id: str) -> list[Edge]:
        return [e for e in self.edges if e.src == node_id]

    # -- structure --------------------------------------------------------------------------
    def upstream(self, targets: Iterable[str]) -> set[str]:
        """The target nodes and everything they (transitively) read from."""
        return self._reach(targets, forward=False)

    def downstream(self, sources: Iterable[str]) -> set[str]:
        """The source nodes and everything that (transitively) reads from them."""
        return self._reach(sources, forward=True)

    def _reach(self, start: Iterable[str], forward: bool) -> set[str]:
        step: dict[str, list[str]] = {}
        for e in self.edges:
            a, b = (e.src, e.dst) if forward else (e.dst, e.src)
            step.setdefault(a, []).append(b)
        seen: set[str] = set()
        stack = list(start)
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                stack.extend(step.get(n, ()))
        return seen

    def topological_order(self, subset: Optional[Iterable[str]] = None) -> list[str]:
        """Nodes of `subset` (default all) so that every node follows its inputs.

        Raises GraphError naming the nodes on a cycle.
        """
        members = set(self.nodes if subset is None else subset)
        indegree = {n: 0 for n in members}
        reads: dict[str, list[str]] = {}
        for e in self.edges:
            if e.src in members and e.dst in members:
                indegree[e.dst] += 1
                reads.setdefault(e.src, []).append(e.dst)
        # Ties broken by position then id, so the order (and thus event order) is stable.
        def order_key(nid: str):
            n = self.nodes[nid]
            return (n.pos[0], n.pos[1], nid)
        ready = sorted((n for n, d in indegree.items() if d == 0), key=order_key)
        out: list[str] = []
        while ready:
            n = ready.pop(0)
            out.append(n)
            for m in reads.get(n, ()):
                indegree[m] -= 1
                if indegree[m] == 0:
                    ready.append(m)
            ready.sort(key=order_key)
        if len(out) != len(members):
            stuck = sorted(n for n, d in indegree.items() if d > 0)
            on_cycle = self._on_cycle(stuck)
            names = ", ".join(self.nodes[n].label for n in on_cycle)
            raise CycleError(f"the graph has a cycle through: {names}", stuck, on_cycle)
        return out

    def _on_cycle(self, candidates: list[str]) -> list[str]:
        """Those of `candidates` that can reach themselves (not merely fed by a cycle)."""
        among = set(candidates)
        reads: dict[str, set[str]] = {}
        for e in self.edges:
            if e.src in among and e.dst in among:
                reads.setdefault(e.src, set()).add(e.dst)
        found = []
        for start in candidates:
            seen: set[str] = set()
            stack = list(reads.get(start, ()))
            while stack:
                n = stack.pop()
                if n == start:
                    found.append(start)
                    break
                if n not in seen:
                    seen.add(n)
                    stack.extend(reads.get(n, ()))
        return found

    def copy(self) -> "Graph":
        return copy.deepcopy(self)

    def subgraph(self, node_ids: Iterable[str]) -> "Graph":
        """A copy of the given nodes and the wires among them (for copy/paste)."""
        ids = set(node_ids)
        g = Graph(meta={})
        for nid in ids:
            g.nodes[nid] = copy.deepcopy(self.nodes[nid])
        g.edges = [e for e in self.edges if e.src in ids and e.dst in ids]
        return g

    def merge(self, other: "Graph", offset=(40.0, 40.0)) -> dict[str, str]:
        """Paste `other` into this graph with fresh ids; returns old id -> new id."""
        mapping = {old: new_id() for old in other.nodes}
        for old, node in other.nodes.items():
            clone = copy.deepcopy(node)
            clone.id = mapping[old]
            clone.pos = (node.pos[0] + offset[0], node.pos[1] + offset[1])
            self.nodes[clone.id] = clone
        for e in other.edges:
            self.edges.append(Edge(mapping[e.src], e.src_port, mapping[e.dst], e.dst_port))
        return mapping
