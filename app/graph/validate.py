"""Validation: every problem in a graph, each with its node id and a sentence a person can act on.

Node declarations come from a catalog passed in (this layer does not import nodes/); a node type
is anything with `inputs` ({name: Input(type, optional)}), `outputs` ({name: DataType}) and
`params` ({name: Param with check(value) -> message or None}).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from .document import CycleError, Graph
from .errors import MESSAGE_CHARS, brief
from .passthrough import type_accepts, wire_type


@dataclass(frozen=True)
class Problem:
    node_id: Optional[str]
    message: str

    def __str__(self) -> str:
        return self.message


def validate(graph: Graph, catalog: Callable[[str], Any],
             targets: Optional[set[str]] = None) -> list[Problem]:
    """Return every problem (empty list: the graph can run). `targets` limits it to their cone."""
    members = graph.upstream(targets) if targets else set(graph.nodes)
    problems: list[Problem] = []

    def add(node, text):
        message = f"{node.label}: {text}"
        if len(message) > MESSAGE_CHARS:  # a 50 MB value must not make a 50 MB message
            message = message[:MESSAGE_CHARS] + "…"
        problems.append(Problem(node.id, message))

    inputs = graph.inputs_by_node()  # once: inputs_of per node is quadratic in a big graph

    for nid in sorted(members, key=lambda i: (graph.nodes[i].pos, i)):
        node = graph.nodes[nid]
        spec = catalog(node.type)
        if spec is None:
            add(node, f"unknown node type {node.type!r} (kept as a placeholder; install the "
                      f"extension that provides it or delete the node)")
            continue
        if node.is_placeholder:
            if node.version > spec.version:
                add(node, f"saved by a newer Loomwork ({node.type} v{node.version}; this build has "
                          f"v{spec.version}); it is kept unchanged but cannot run")
            else:  # e.g. the file was loaded without a node catalog
                add(node, "kept unchanged as a placeholder, so it cannot run; reopen the file "
                          "with the node catalog to edit it")
            continue
        for where, text in _unwritable_strings(node):
            add(node, f"{where}: {text}")
        wired = inputs.get(nid, {})
        for name, port in spec.inputs.items():
            edge = wired.get(name)
            if edge is None:
                if not port.optional:
                    add(node, f"input {name!r} ({port.type.name}) is not connected")
                continue
            src = graph.nodes[edge.src]
            src_spec = catalog(src.type)
            if src_spec is None or src.is_placeholder:
                continue  # reported on the source node itself
            out_type = wire_type(graph, catalog, edge.src, edge.src_port, inputs)
            if out_type is None:
                add(node, f"input {name!r} is wired to {src.label}.{edge.src_port}, "
                          f"which has no such output")
            elif not type_accepts(port.type.name, out_type):
                add(node, f"input {name!r} takes {port.type.name} but is wired to "
                          f"{src.label}.{edge.src_port}, which gives {out_type}")
        for name in wired:
            if name not in spec.inputs:
                add(node, f"a wire goes into {name!r}, which is not an input of {node.type}")
        for name, value in node.params.items():
            param = spec.params.get(name)
            if param is None:
                add(node, f"unknown param {name!r} for {node.type}")
                continue
            message = param.check(value)
            if message:
                add(node, f"param {name!r}: {message}")
    try:
        graph.topological_order(members)
    except CycleError as exc:
        loop = ", ".join(graph.nodes[n].label for n in exc.on_cycle)
        loop = brief(loop, 400)
        on_cycle = set(exc.on_cycle)
        for nid in exc.nodes:
            if nid in on_cycle:
                add(graph.nodes[nid], "is on a cycle: its inputs depend on its own output; "
                                      "remove one of the wires between " + loop)
            else:
                add(graph.nodes[nid], f"cannot run: it is fed by a cycle (through {loop})")
    return problems


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """Every string in a JSON value (keys too), with where it is."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str):
                yield f"{where} key", k
            yield from _strings(v, f"{where}.{k}" if isinstance(k, str) and len(k) < 40 else where)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v, where)


def _unwritable_strings(node) -> Iterator[tuple[str, str]]:
    """Text of the node that no file can hold: a lone surrogate (JSON's "\\udfff") cannot be
    encoded as UTF-8, so the graph could not be saved, nor embedded in the PNG a run saves.
    Found here, before the run, rather than by SaveImage after the sampling."""
    fields = [("title", node.title)] + [(f"param {k!r}", v) for k, v in node.params.items()] + [("meta", node.meta)]
    for field, value in fields:
        for where, text in _strings(value, field):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                yield where, (f"holds {text[exc.start]!r} at character {exc.start}, a lone surrogate that "
                              f"no file can hold; retype the text")
                break
