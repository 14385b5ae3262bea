"""The `.loom` file format: JSON, versioned, migrated on load, saved atomically.

    {"format": "loomwork.graph", "version": 2,
     "nodes": [{"id", "type", "version", "title", "params", "pos", "meta", "mode"?}],
     "edges": [{"from": {"node", "port"}, "to": {"node", "port"}}],
     "groups": [{"id", "title", "nodes", "rect", "color"}], "meta": {}}

History of the format (each step has a migration below, tested on a file saved by it):
  1  edges were strings: {"from": "NODE_ID:PORT", "to": "NODE_ID:PORT"}
  2  edges are objects, so port names may contain ':'

Node types carry their own version; a catalog (the node registry, passed in: this layer does
not import nodes/) migrates old params on load. Unknown node types, and types saved by a newer
build, are kept as placeholders and written back byte-for-byte as they were read.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

# The one atomic write (standard library only, so this layer stays free of torch); the UI's
# session store imports it from here too.
from kernels.files import atomic_write

from .document import Edge, Graph, Group, Node
from .errors import GraphFileError, brief, brief_repr
from .png import PNG_SIGNATURE, read_graph_text

FORMAT_NAME = "loomwork.graph"
FORMAT_VERSION = 2

# The keys a node record has; any other key (a misspelt "ti<le", a newer build's field) is kept
# in Node.extra and written back, never dropped.
NODE_KEYS = ("id", "type", "version", "title", "params", "pos", "meta", "mode")
# A node's "mode" (written only when it is not "", so a file without bypassed or muted nodes
# reads the same in builds that know no modes). An older build keeps the key as an unknown one.
NODE_MODES = ("", "bypass", "mute")
DOC_KEYS = ("format", "version", "nodes", "edges", "groups", "meta")
GROUP_KEYS = ("id", "title", "nodes", "rect", "color")
# No graph nests this deep; past it a file is refused, so nothing later (copies, saves, the
# JSON check of a param) can hit Python's recursion limit.
MAX_DEPTH = 100


class NodeTypeInfo(Protocol):
    """What loading needs to know about a node type (nodes.base.NodeSpec provides it)."""

    version: int

    def migrate(self, params: dict, from_version: int) -> dict: ...


Catalog = Callable[[str], Optional[NodeTypeInfo]]


# -- format migrations ---------------------------------------------------------------------
def _migrate_v1_to_v2(doc: dict) -> dict:
    edges = []
    for i, e in enumerate(_list(doc, "edges")):
        if not isinstance(e, dict):
            raise GraphFileError(f"edge #{i} is not an object")
        ends = {}
        for end in ("from", "to"):
            ref = e.get(end)
            if not isinstance(ref, str) or ":" not in ref:
                raise GraphFileError(f"edge #{i}: {end!r} should look like 'NODE_ID:PORT', got {ref!r}")
            node, port = ref.rsplit(":", 1)
            ends[end] = {"node": node, "port": port}
        edges.append(ends)
    return {**doc, "edges": edges, "version": 2}


FORMAT_MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _migrate_v1_to_v2}


# -- reading -------------------------------------------------------------------------------
def _list(doc: dict, key: str) -> list:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise GraphFileError(f"{key!r} should be a list, got {type(value).__name__}")
    return value


def _finite(v: Any) -> bool:
    """A number a float holds: not bool, NaN, inf, nor an integer too large for a float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer of more than 308 digits
        return False


def _number_pair(value: Any, what: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_finite(v) for v in value):
        raise GraphFileError(f"{what} should be two numbers [x, y], got {brief_repr(value)}")
    return float(value[0]), float(value[1])


class _HugeInteger:
    """What the JSON reader makes of an integer past Python's int-from-text limit (4,300
    digits), so the error can name the node and field holding it."""

    def __init__(self, digits: int):
        self.digits = digits


def _parse_int(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return _HugeInteger(len(text.lstrip("-")))


def _check_values(doc: Any) -> None:
    """Refuse a document nested deeper than MAX_DEPTH or holding an integer past the int-from-
    text limit, naming the node and field (iterative: the document may be deep)."""
    stack: list[tuple[Any, int, str, list]] = [(doc, 0, "", [])]
    while stack:
        value, depth, record, fields = stack.pop()
        if isinstance(value, _HugeInteger) or depth > MAX_DEPTH:
            where = ": ".join(p for p in (record, ".".join(fields)) if p) or "the file"
            problem = (f"an integer of {value.digits:,} digits is too large for any field"
                       if isinstance(value, _HugeInteger) else
                       f"nested more than {MAX_DEPTH} levels deep, deeper than any graph")
            raise GraphFileError(f"{where}: {problem}")
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, list):
            items = enumerate(value)
        else:
            continue
        for key, item in items:
            if depth == 1 and fields and fields[0] in ("nodes", "edges", "groups"):
                stack.append((item, depth + 1, _record_name(fields[0], key, item), []))
            else:
                stack.append((item, depth + 1, record, fields + [brief(str(key), 60)]))


def _record_name(section: str, i: int, rec: Any) -> str:
    """How an error names the i-th record of a section: "node ID (Type)", "edge #3"."""
    if section == "nodes" and isinstance(rec, dict) and isinstance(rec.get("id"), str):
        return f"node {brief(rec['id'], 40)} ({brief(str(rec.get('type')), 60)})"
    return f"{section[:-1]} #{i}"


def _extra(rec: dict, known: tuple) -> dict:
    """A record's keys this build does not know, kept to be written back."""
    return {k: v for k, v in rec.items() if k not in known}


def _read_node(i: int, rec: Any, catalog: Optional[Catalog]) -> Node:
    if not isinstance(rec, dict):
        raise GraphFileError(f"node #{i} is not an object")
    node_id, node_type = rec.get("id"), rec.get("type")
    if not isinstance(node_id, str) or not node_id:
        raise GraphFileError(f"node #{i} has no string 'id'")
    where = f"node {node_id}"
    if not isinstance(node_type, str) or not node_type:
        raise GraphFileError(f"{where} has no string 'type'")
    version = rec.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise GraphFileError(f"{where} ({node_type}): 'version' should be a positive integer, "
                             f"got {brief_repr(version)}")
    params = rec.get("params", {})
    if not isinstance(params, dict):
        raise GraphFileError(f"{where} ({node_type}): 'params' should be an object")
    title = rec.get("title", "")
    if not isinstance(title, str):
        raise GraphFileError(f"{where} ({node_type}): 'title' should be a string")
    meta = rec.get("meta", {})
    if not isinstance(meta, dict):
        raise GraphFileError(f"{where} ({node_type}): 'meta' should be an object")
    pos = _number_pair(rec.get("pos", [0, 0]), f"{where} ({node_type}): 'pos'")
    mode = rec.get("mode", "")
    if mode not in NODE_MODES:
        raise GraphFileError(f"{where} ({node_type}): 'mode' should be one of "
                             f"{', '.join(repr(m) for m in NODE_MODES)}, got {brief_repr(mode)}")
    node = Node(id=node_id, type=node_type, version=version, title=title, params=dict(params),
                pos=pos, meta=dict(meta), mode=mode, extra=_extra(rec, NODE_KEYS))
    info = catalog(node_type) if catalog else None
    if info is None or version > info.version:
        node.raw = json.loads(json.dumps(rec))  # a deep copy of exactly what was read
    elif version < info.version:
        try:
            node.params = info.migrate(dict(params), version)
        except Exception as exc:  # a migration that cannot make sense of old params
            raise GraphFileError(f"{where} ({node_type} v{version}): cannot migrate to "
                                 f"v{info.version}: {brief(str(exc))}") from exc
        node.version = info.version
    return node


def _read_edge(i: int, rec: Any, nodes: dict[str, Node]) -> Edge:
    if not isinstance(rec, dict):
        raise GraphFileError(f"edge #{i} is not an object")
    ends = []
    for end in ("from", "to"):
        ref = rec.get(end)
        if not isinstance(ref, dict) or not isinstance(ref.get("node"), str) \
                or not isinstance(ref.get("port"), str):
            raise GraphFileError(f"edge #{i}: {end!r} should be {{\"node\": ID, \"port\": NAME}}")
        if ref["node"] not in nodes:
            raise GraphFileError(f"edge #{i}: {end!r} names node {ref['node']!r}, which is not in the file")
        ends.append((ref["node"], ref["port"]))
    return Edge(ends[0][0], ends[0][1], ends[1][0], ends[1][1])


def _read_group(i: int, rec: Any, nodes: dict[str, Node]) -> Group:
    if not isinstance(rec, dict):
        raise GraphFileError(f"group #{i} is not an object")
    members = rec.get("nodes", [])
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise GraphFileError(f"group #{i}: 'nodes' should be a list of node ids")
    rect = rec.get("rect", [0, 0, 200, 200])
    if not isinstance(rect, list) or len(rect) != 4 or not all(_finite(v) for v in rect):
        raise GraphFileError(f"group #{i}: 'rect' should be [x, y, width, height]")
    title, color = rec.get("title", "Group"), rec.get("color", "#3a4150")
    if not isinstance(title, str) or not isinstance(color, str):
        raise GraphFileError(f"group #{i}: 'title' and 'color' should be strings")
    gid = rec.get("id")
    if not isinstance(gid, str) or not gid:
        raise GraphFileError(f"group #{i} has no string 'id'")
    return Group(id=gid, title=title, nodes=[m for m in members if m in nodes],
                 rect=tuple(float(v) for v in rect), color=color, extra=_extra(rec, GROUP_KEYS))


def graph_from_dict(doc: Any, catalog: Optional[Catalog] = None) -> Graph:
    """Build a Graph from parsed JSON, migrating old formats. Raises GraphFileError."""
    if not isinstance(doc, dict):
        raise GraphFileError(f"the top level should be a JSON object, got {type(doc).__name__}")
    if doc.get("format") != FORMAT_NAME:
        raise GraphFileError(f"not a Loomwork graph: 'format' is {brief_repr(doc.get('format'))}, "
                             f"expected {FORMAT_NAME!r}")
    _check_values(doc)
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise GraphFileError(f"'version' should be a positive integer, got {brief_repr(version)}")
    if version > FORMAT_VERSION:
        raise GraphFileError(f"this graph was saved by a newer Loomwork (format version {version}; "
                             f"this build reads up to {FORMAT_VERSION}). Update Loomwork to open it.")
    while version < FORMAT_VERSION:
        doc = FORMAT_MIGRATIONS[version](doc)
        version = doc["version"]

    graph = Graph()
    for i, rec in enumerate(_list(doc, "nodes")):
        node = _read_node(i, rec, catalog)
        if node.id in graph.nodes:
            raise GraphFileError(f"node id {node.id} appears twice")
        graph.nodes[node.id] = node
    wired: set[tuple[str, str]] = set()
    for i, rec in enumerate(_list(doc, "edges")):
        edge = _read_edge(i, rec, graph.nodes)
        if (edge.dst, edge.dst_port) in wired:
            raise GraphFileError(f"edge #{i}: input {edge.dst_port!r} of node {edge.dst} is wired twice")
        wired.add((edge.dst, edge.dst_port))
        graph.edges.append(edge)
    graph.groups = [_read_group(i, rec, graph.nodes) for i, rec in enumerate(_list(doc, "groups"))]
    meta = doc.get("meta", {})
    if not isinstance(meta, dict):
        raise GraphFileError("'meta' should be an object")
    graph.meta = dict(meta)
    graph.extra = _extra(doc, DOC_KEYS)
    return graph


def graph_to_dict(graph: Graph) -> dict:
    nodes = []
    for n in graph.nodes.values():
        if n.raw is not None:
            # Placeholders go back as read; only the canvas position may have moved.
            # (Compared as read, so an untouched [10, 20] is not rewritten as [10.0, 20.0].)
            rec = json.loads(json.dumps(n.raw))
            if n.pos != _number_pair(rec.get("pos", [0, 0]), "pos"):
                rec["pos"] = [n.pos[0], n.pos[1]]
            nodes.append(rec)
            continue
        rec = {**n.extra, "id": n.id, "type": n.type, "version": n.version, "title": n.title,
               "params": n.params, "pos": [n.pos[0], n.pos[1]], "meta": n.meta}
        if n.mode:
            rec["mode"] = n.mode
        nodes.append(rec)
    return {
        **graph.extra,
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "nodes": nodes,
        "edges": [{"from": {"node": e.src, "port": e.src_port}, "to": {"node": e.dst, "port": e.dst_port}}
                  for e in graph.edges],
        "groups": [{**g.extra, "id": g.id, "title": g.title, "nodes": list(g.nodes), "rect": list(g.rect),
                    "color": g.color} for g in graph.groups],
        "meta": graph.meta,
    }


def dumps(graph: Graph, *, strict: bool = True) -> str:
    """The file text. `strict=False` lets NaN/inf params through (as JSON's NaN extension), for
    embedding a graph that validation will still flag rather than losing it."""
    return json.dumps(graph_to_dict(graph), indent=2, ensure_ascii=False, allow_nan=not strict)


def loads(text: str, catalog: Optional[Catalog] = None, *, path=None) -> Graph:
    """A Graph from the file text. Every problem is a GraphFileError naming the node and field."""
    try:
        doc = json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise GraphFileError(f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})", path) from None
    except RecursionError:  # json's decoder recurses per level of [ / {
        raise GraphFileError("not a graph: the JSON is nested too deeply", path) from None
    try:
        return graph_from_dict(doc, catalog)
    except GraphFileError as exc:
        if path is not None and exc.path is None:
            raise GraphFileError(str(exc), path) from None
        raise


def load(path: os.PathLike | str, catalog: Optional[Catalog] = None) -> Graph:
    """Open a `.loom` file, or a PNG that Loomwork saved (its graph is in a text chunk)."""
    path = Path(path)
    try:
        data = _read_regular_file(path)
    except FileNotFoundError:
        raise GraphFileError("no such file", path) from None
    except IsADirectoryError:
        raise GraphFileError("is a folder, not a graph file", path) from None
    except OSError as exc:
        raise GraphFileError(f"cannot read: {exc.strerror or exc}", path) from None
    if data.startswith(PNG_SIGNATURE):
        text = read_graph_text(path, data)
    else:
        if not data.strip():
            raise GraphFileError("the file is empty", path)
        try:
            text = data.decode("utf-8-sig")  # a BOM (some Windows editors add one) is fine
        except UnicodeDecodeError:
            raise GraphFileError("not a text file (not UTF-8); a .loom file is JSON", path) from None
    return loads(text, catalog, path=path)


def _read_regular_file(path: Path) -> bytes:
    """The bytes of a regular file. A pipe or device is refused (reading one could wait
    forever); opened without blocking so even the open of a FIFO returns."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(mode):
            raise GraphFileError("not a regular file (a pipe, socket or device), so not a graph file", path)
        return f.read()


def save(graph: Graph, path: os.PathLike | str) -> None:
    try:
        atomic_write(path, dumps(graph).encode("utf-8"))
    except OSError as exc:
        raise GraphFileError(f"cannot save: {exc.strerror or exc}", path) from None
    except (ValueError, TypeError) as exc:  # NaN, or a value JSON cannot hold: refuse, keep the old file
        raise GraphFileError(f"cannot save: {exc}", path) from None
