"""Auto-tidy: a layered layout of some nodes by topological depth. No Qt.

Each node goes in the column of its depth (the longest chain of wires leading to it from inside
the selection), columns left to right as wide as their widest node; in a column, nodes are
ordered by where the nodes feeding them sit (so wires cross less), then by their old height,
and stacked from the selection's top. With `max_width`, columns that would pass it start a new
band below the last (read left to right, then down), so a long chain fits a narrow view.
Hand-written: a Sugiyama layout from a library (graphviz,
networkx) would be a heavy dependency for what a few lines do well enough on a selection.
"""

from __future__ import annotations

from typing import Iterable

from .document import CycleError, Graph

GAP_X, GAP_Y = 70.0, 36.0


def tidy(graph: Graph, ids: Iterable[str], sizes: dict[str, tuple[float, float]],
         gap_x: float = GAP_X, gap_y: float = GAP_Y,
         max_width: float | None = None) -> dict[str, tuple[float, float]]:
    """New positions (top-left) for `ids`; `sizes` gives each node's (width, height)."""
    members = [i for i in ids if i in graph.nodes]
    if not members:
        return {}
    chosen = set(members)
    try:
        order = graph.topological_order(chosen)
    except CycleError:  # a loop (the run refuses it anyway): keep the left-to-right order
        order = sorted(members, key=lambda i: graph.nodes[i].pos)
    feeds: dict[str, list[str]] = {i: [] for i in members}
    for e in graph.edges:
        if e.src in chosen and e.dst in chosen and e.src != e.dst:
            feeds[e.dst].append(e.src)
    depth: dict[str, int] = {}
    for nid in order:
        depth[nid] = max((depth[s] + 1 for s in feeds[nid] if s in depth), default=0)
    columns: dict[int, list[str]] = {}
    for nid in order:
        columns.setdefault(depth[nid], []).append(nid)
    left = min(graph.nodes[i].pos[0] for i in members)
    top = min(graph.nodes[i].pos[1] for i in members)
    rank: dict[str, float] = {}
    out: dict[str, tuple[float, float]] = {}
    x, band_top, band_bottom = left, top, top
    for d in sorted(columns):
        col = columns[d]
        col_w = max(sizes.get(n, (160.0, 80.0))[0] for n in col)
        if max_width is not None and x > left and x + col_w - left > max_width:
            x, band_top = left, band_bottom + gap_y * 2  # the next band

        def key(nid):
            placed = [rank[s] for s in feeds[nid] if s in rank]
            return (sum(placed) / len(placed) if placed else float("inf"), graph.nodes[nid].pos[1], nid)

        col.sort(key=key)
        y = band_top
        for k, nid in enumerate(col):
            rank[nid] = k
            out[nid] = (round(x, 1), round(y, 1))
            y += sizes.get(nid, (160.0, 80.0))[1] + gap_y
        band_bottom = max(band_bottom, y - gap_y)
        x += col_w + gap_x
    return out
