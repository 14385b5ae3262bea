"""The graph document: plain data, the one source of truth for a Loomwork graph.

No Qt, no torch. The canvas, the inspector, the CLI and the engine all read this; edits go
through the methods here (the UI wraps them in undoable commands).
"""

from __future__ import annotations

import copy
import heapq
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

# How much of a title a message shows, and how many nodes a cycle's message names.
LABEL_CHARS = 60
CYCLE_NAMES = 10


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
    # How the engine treats the node: "" runs it, "bypass" passes its inputs through to outputs
    # of the same type, "mute" runs nothing and gives nothing (see app/graph/passthrough.py).
    mode: str = ""
    # A node whose type this build does not know (or knows only in an older version): the
    # record as it was read, written back unchanged so nothing the user made is lost.
    raw: Optional[dict] = None
    # Keys of the record this build does not know (a misspelt one, a newer build's field): kept
    # and written back, so nothing in the file is lost.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_placeholder(self) -> bool:
        return self.raw is not None

    @property
    def label(self) -> str:
        """How messages name this node: its title if it has one, else its type, plus a short id."""
        name = self.title or self.type
        if len(name) > LABEL_CHARS:  # a huge title must not make every message huge
            name = name[:LABEL_CHARS] + "…"
        return f"{name} [{self.id[:8]}]"


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
    extra: dict[str, Any] = field(default_factory=dict)  # keys this build does not know, kept


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
    extra: dict[str, Any] = field(default_factory=dict)  # top-level keys this build does not know, kept

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

    def inputs_by_node(self) -> dict[str, dict[str, Edge]]:
        """Every node's wired inputs at once ({node: {port: edge}}), in one pass over the wires:
        what a walk over all nodes reads instead of calling `inputs_of` per node (quadratic)."""
        wired: dict[str, dict[str, Edge]] = {}
        for e in self.edges:
            wired.setdefault(e.dst, {})[e.dst_port] = e
        return wired

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

        Ties are broken by position then id, so the order (and thus event order) is stable.
        Linear in nodes and wires (a heap of the ready nodes). Raises CycleError naming the nodes
        on a cycle.
        """
        members = set(self.nodes if subset is None else subset)
        indegree = {n: 0 for n in members}
        reads: dict[str, list[str]] = {}
        for e in self.edges:
            if e.src in members and e.dst in members:
                indegree[e.dst] += 1
                reads.setdefault(e.src, []).append(e.dst)

        def order_key(nid: str):
            n = self.nodes[nid]
            return (n.pos[0], n.pos[1], nid)

        ready = [order_key(n) for n, d in indegree.items() if d == 0]
        heapq.heapify(ready)
        out: list[str] = []
        while ready:
            n = heapq.heappop(ready)[2]
            out.append(n)
            for m in reads.get(n, ()):
                indegree[m] -= 1
                if indegree[m] == 0:
                    heapq.heappush(ready, order_key(m))
        if len(out) != len(members):
            stuck = sorted(n for n, d in indegree.items() if d > 0)
            on_cycle = self._on_cycle(stuck)
            names = ", ".join(self.nodes[n].label for n in on_cycle[:CYCLE_NAMES])
            more = len(on_cycle) - CYCLE_NAMES
            if more > 0:
                names += f" and {more} more"
            raise CycleError(f"the graph has a cycle through: {names}", stuck, on_cycle)
        return out

    def _on_cycle(self, candidates: list[str]) -> list[str]:
        """Those of `candidates` that can reach themselves (not merely fed by a cycle): the
        members of strongly connected components with a cycle (Tarjan's, iterative: linear)."""
        among = set(candidates)
        reads: dict[str, list[str]] = {n: [] for n in candidates}
        looped: set[str] = set()
        for e in self.edges:
            if e.src in among and e.dst in among:
                reads[e.src].append(e.dst)
                if e.src == e.dst:
                    looped.add(e.src)
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found: set[str] = set()
        for root in candidates:
            if root in index:
                continue
            work = [(root, 0)]
            while work:
                node, i = work.pop()
                if i == 0:
                    index[node] = low[node] = len(index)
                    stack.append(node)
                    on_stack.add(node)
                succ = reads[node]
                while i < len(succ) and succ[i] in index:
                    if succ[i] in on_stack:
                        low[node] = min(low[node], index[succ[i]])
                    i += 1
                if i < len(succ):
                    work.append((node, i + 1))
                    work.append((succ[i], 0))
                    continue
                if low[node] == index[node]:
                    component = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        component.append(m)
                        if m == node:
                            break
                    if len(component) > 1 or node in looped:
                        found.update(component)
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
        return [n for n in candidates if n in found]

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
