"""Bypassed, muted and reroute nodes: the graph the engine runs once they are taken out.

The semantics (the same as ComfyUI's):

- **bypass**: the node does not run; each of its outputs passes on the first of its inputs of
  the same data type that is wired (a Sampler bypassed hands its `latent` input on). An output
  whose type none of its inputs has (a VAEDecode's IMAGE, its inputs being LATENT and VAE)
  cannot pass anything: the bypassed node is reported failed, naming it and the type, and the
  nodes reading that output are skipped.
- **mute**: the node does not run and gives nothing. A node reading it through an optional
  input runs as if that input were unwired; through a required input it is skipped, with the
  reason naming the muted node.
- **reroute** (a `Reroute` node, a dot on a wire): passes its one input on unchanged, keeping
  the wire's type.

`resolve` rewires each reader straight to the node that really gives the value, so a run with a
node bypassed is exactly the run of the graph with that node removed and its input wired
through (same cache keys, same values). No Qt, no torch; node types come from a catalog.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .document import Edge, Graph, Node

BYPASS, MUTE = "bypass", "mute"
REROUTE = "Reroute"  # the node type of a reroute dot: one input "in", one output "out"
ANY = "*"            # the declared type of a reroute's ports

# How a run reports a node that passed its inputs on instead of running.
BYPASSED, MUTED, REROUTED = "bypassed", "muted", "rerouted"


def is_passthrough(node: Node) -> bool:
    return node.mode in (BYPASS, MUTE) or (node.type == REROUTE and not node.is_placeholder)


@dataclass
class Resolved:
    graph: Graph                                          # what the engine runs
    passed: dict[str, str] = field(default_factory=dict)  # taken-out node -> BYPASSED/MUTED/REROUTED
    failed: dict[str, str] = field(default_factory=dict)  # taken-out node -> why it cannot pass on
    skipped: dict[str, str] = field(default_factory=dict)  # node -> why it cannot run


class _Source:
    """Where the value on an output really comes from, following pass-through nodes upstream."""

    def __init__(self, graph: Graph, catalog: Callable[[str], Any]):
        self.graph, self.catalog = graph, catalog
        self.inputs = graph.inputs_by_node()
        self.failed: dict[str, str] = {}

    def find(self, src: str, port: str) -> tuple[Optional[tuple[str, str]], str]:
        """((node, port), "") of the real source, or (None, why nothing comes)."""
        seen: set[str] = set()
        while True:
            node = self.graph.nodes[src]
            if not is_passthrough(node):
                return (src, port), ""
            if src in seen:
                return None, f"comes through a loop of reroutes or bypassed nodes at {node.label}"
            seen.add(src)
            if node.mode == MUTE:
                return None, f"comes from {node.label}, which is muted"
            name = "in" if node.type == REROUTE and node.mode != BYPASS else self._through(node, port)
            if name is None:
                return None, f"comes from {node.label}: {self.failed[src]}"
            edge = self.inputs.get(src, {}).get(name)
            if edge is None:
                why = (f"nothing is wired into reroute {node.label}" if node.type == REROUTE
                       else f"comes from {node.label}, which is bypassed with its input {name!r} unwired")
                return None, why
            src, port = edge.src, edge.src_port

    def _through(self, node: Node, port: str) -> Optional[str]:
        """The input a bypassed node passes on to output `port`: the first of its type."""
        spec = self.catalog(node.type)
        if spec is None or node.is_placeholder:
            self.failed[node.id] = f"{node.label} is bypassed, but its type is unknown to this build"
            return None
        out_type = spec.outputs.get(port)
        if node.type == REROUTE:
            return "in"
        wired = self.inputs.get(node.id, {})
        same = [name for name, inp in spec.inputs.items()
                if out_type is not None and inp.type.name == out_type.name]
        if not same:
            kind = out_type.name if out_type is not None else "?"
            self.failed[node.id] = (f"{node.label} is bypassed, but it has no {kind} input to pass "
                                    f"on to its output {port!r}; un-bypass it or mute it instead")
            return None
        return next((name for name in same if name in wired), same[0])


def resolve(graph: Graph, catalog: Callable[[str], Any]) -> Resolved:
    """The graph with every bypassed, muted and reroute node taken out and its readers rewired
    to the real sources. A graph without any is returned as it is (not copied)."""
    out = [nid for nid, n in graph.nodes.items() if is_passthrough(n)]
    if not out:
        return Resolved(graph)
    taken = set(out)
    source = _Source(graph, catalog)
    result = Resolved(Graph(nodes={i: n for i, n in graph.nodes.items() if i not in taken},
                            groups=graph.groups, meta=graph.meta, extra=graph.extra))
    for nid in out:
        node = graph.nodes[nid]
        result.passed[nid] = MUTED if node.mode == MUTE else BYPASSED if node.mode == BYPASS else REROUTED
    for e in graph.edges:
        if e.dst in taken:
            continue
        if e.src not in taken:
            result.graph.edges.append(e)
            continue
        found, why = source.find(e.src, e.src_port)
        if found is not None:
            result.graph.edges.append(Edge(found[0], found[1], e.dst, e.dst_port))
            continue
        spec = catalog(graph.nodes[e.dst].type)
        port = spec.inputs.get(e.dst_port) if spec is not None else None
        if port is not None and port.optional and why.endswith("is muted"):
            continue  # an optional input fed by a muted node: as if unwired
        result.skipped.setdefault(e.dst, f"not run: its input {e.dst_port!r} {why}")
    result.failed = {nid: why for nid, why in source.failed.items() if nid in taken}
    return result


def wire_type(graph: Graph, catalog: Callable[[str], Any], src: str, port: str,
              inputs: Optional[dict] = None) -> Optional[str]:
    """The data type name on output `port` of `src`: a reroute's is the type of what feeds it
    (ANY while nothing does). None if the source's type is unknown."""
    inputs = inputs if inputs is not None else graph.inputs_by_node()
    seen: set[str] = set()
    while True:
        node = graph.nodes.get(src)
        spec = catalog(node.type) if node is not None else None
        if spec is None or node.is_placeholder:
            return None
        if node.type != REROUTE:
            out = spec.outputs.get(port)
            return out.name if out is not None else None
        edge = inputs.get(src, {}).get("in")
        if edge is None or src in seen:
            return ANY
        seen.add(src)
        src, port = edge.src, edge.src_port


def type_accepts(want: str, got: str) -> bool:
    """Whether an input of type `want` takes a wire of type `got` (ANY on either side fits)."""
    return ANY in (want, got) or want == got
