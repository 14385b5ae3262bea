"""The run queue: Run while a run is going queues the graph as it is at that moment.

`RunQueue` is plain data behind a Qt signal (the panel and the window read it): each entry is a
snapshot of the graph, what to run and where the images go, and its status. `QueuePanel` shows
it with remove, reorder and cancel. A batch count queues N snapshots, the k-th with every
Sampler's seed raised by k (the way a seed "increments" in peers' batch counts).

Each run keeps `source`, the graph exactly as queued (what History reopens), beside `graph`, the
copy that runs: in that copy the file-name pattern from Preferences has been written into the
`prefix` of every saving node (`expand_file_names`), so the engine names its files by the pattern.
The queue announces each run that ends (`finished`): History records it from there.
"""

from __future__ import annotations

import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from PySide6 import QtCore, QtWidgets

from app.graph import Graph

PENDING, RUNNING, DONE, FAILED, CANCELLED = "pending", "running", "done", "failed", "cancelled"
STATUS_MARKS = {PENDING: "…", RUNNING: "▶", DONE: "✓", FAILED: "✗", CANCELLED: "■"}
SEEDED_TYPES = ("Sampler",)  # node types whose `seed` a batch count raises
ENDED = (DONE, FAILED, CANCELLED)
NAME_PATTERN_KEY = "output/name_pattern"

# The file-name pattern: the engine appends "_{counter:05}" to a saving node's prefix, so the
# default pattern gives exactly the names the engine always gave, and a pattern ends with it.
DEFAULT_NAME_PATTERN = "{prefix}_{counter:05}"
NAME_FIELDS = ("prefix", "graph", "node", "seed", "date", "time")
COUNTER_TAILS = ("_{counter:05}", "_{counter}")


def push_button(text: str, tip: str, slot) -> QtWidgets.QPushButton:
    """A push button with its tooltip, wired to `slot` (the queue's and the history's rows)."""
    b = QtWidgets.QPushButton(text)
    b.setToolTip(tip)
    b.clicked.connect(slot)
    return b


@dataclass
class QueuedRun:
    graph: Graph                       # a snapshot: later edits do not change it
    targets: Optional[list[str]]
    graph_path: Optional[str]
    output_dir: Optional[str]
    label: str
    status: str = PENDING
    queued_at: float = field(default_factory=time.time)
    summary: str = ""
    source: Optional[Graph] = None     # the graph as queued (before file names are expanded)
    outputs: list = field(default_factory=list)  # (node id, node title, path or None) as they come
    started_at: float = 0.0
    ended_at: float = 0.0

    def text(self) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(self.queued_at))
        tail = f" — {self.summary}" if self.summary else ""
        return f"{STATUS_MARKS[self.status]} {clock}  {self.label}  ({self.status}){tail}"


def batch_snapshots(graph: Graph, count: int) -> list[tuple[Graph, str]]:
    """`count` copies of `graph`, copy k with every seeded node's seed + k, and a label each."""
    out = []
    for k in range(max(1, count)):
        copy = graph.copy()
        seeds = []
        for node in copy.nodes.values():
            if node.type in SEEDED_TYPES and isinstance(node.params.get("seed", 0), int):
                node.params["seed"] = int(node.params.get("seed", 0)) + k
                seeds.append(node.params["seed"])
        label = f"seed {', '.join(map(str, seeds))}" if seeds else "run"
        out.append((copy, label))
    return out


def name_pattern_problem(pattern: str) -> Optional[str]:
    """Why `pattern` cannot name files, or None."""
    if not pattern.endswith(COUNTER_TAILS):
        return "the file-name pattern must end with _{counter:05} (the number that keeps names apart)"
    head = pattern[: pattern.rindex("_{counter")]
    try:
        fields = [f for _t, f, _s, _c in string.Formatter().parse(head) if f is not None]
    except ValueError as exc:
        return f"the file-name pattern {pattern!r}: {exc}"
    unknown = [f for f in fields if f not in NAME_FIELDS]
    if unknown:
        return (f"the file-name pattern has an unknown field {{{unknown[0]}}}; "
                f"known: {', '.join('{' + f + '}' for f in NAME_FIELDS)}, {{counter:05}}")
    if not fields and not head.strip():
        return "the file-name pattern needs a name before the counter"
    return None


def _name_part(value) -> str:
    """A value as it may stand in a file name: spaces become '-', other characters go."""
    text = "-".join(str(value).split())
    return "".join(c for c in text if c.isalnum() or c in "-_.")


def _seed_of(graph: Graph, nid: str) -> Optional[int]:
    """The seed of the first seeded node `nid` reads from (by canvas position), if any."""
    from nodes import registry
    from nodes.base import Seed

    for up in sorted(graph.upstream([nid]), key=lambda n: (graph.nodes[n].pos, n)):
        spec = registry.get(graph.nodes[up].type)
        if spec is None:
            continue
        for name, param in spec.params.items():
            if isinstance(param, Seed):
                value = spec.resolved_params(graph.nodes[up].params)[name]
                if isinstance(value, int):
                    return value
    return None


def format_name(pattern: str, values: dict) -> str:
    """The prefix `pattern` (less its counter) makes of `values`; the engine adds the counter."""
    head = pattern[: pattern.rindex("_{counter")]
    name = head.format(**{k: _name_part(v) for k, v in values.items()})
    return "_".join(p for p in name.split("_") if p)[:120].strip(".") or "loomwork"


def expand_file_names(graph: Graph, pattern: str, graph_path: Optional[str], when: Optional[float] = None) -> dict:
    """Write `pattern` (less its counter) into the `prefix` of every saving node of `graph` (an
    output node with a `prefix` param). Returns {node id: prefix written}. The default pattern
    changes nothing."""
    from nodes import registry

    if pattern in (DEFAULT_NAME_PATTERN, "") or name_pattern_problem(pattern):
        return {}
    stamp = time.localtime(when if when is not None else time.time())
    written = {}
    for nid, node in graph.nodes.items():
        spec = registry.get(node.type)
        if spec is None or not spec.output_node or "prefix" not in spec.params:
            continue
        seed = _seed_of(graph, nid)
        values = {"prefix": spec.resolved_params(node.params)["prefix"],
                  "graph": Path(graph_path).stem if graph_path else "untitled",
                  "node": node.title or node.type, "seed": "" if seed is None else seed,
                  "date": time.strftime("%Y%m%d", stamp), "time": time.strftime("%H%M%S", stamp)}
        node.params["prefix"] = written[nid] = format_name(pattern, values)
    return written


class RunQueue(QtCore.QObject):
    changed = QtCore.Signal()
    finished = QtCore.Signal(object)  # a QueuedRun that has ended (done, failed or cancelled)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.items: list[QueuedRun] = []
        self.name_pattern: Optional[str] = None  # None: the one in Preferences, read at each add

    def add(self, run: QueuedRun) -> None:
        """Queue `run`; its graph's saving nodes get their names from the file-name pattern."""
        if run.source is None:
            run.source = run.graph.copy()
        pattern = self.name_pattern
        if pattern is None:
            from . import session

            pattern = str(session.settings().value(NAME_PATTERN_KEY, "") or "") or DEFAULT_NAME_PATTERN
        expand_file_names(run.graph, pattern, run.graph_path, run.queued_at)
        self.items.append(run)
        self.changed.emit()

    def add_output(self, nid: str, paths: list, count: int) -> None:
        """Results of the running run, as the runner reports them (count images, paths saved)."""
        run = next((r for r in self.items if r.status == RUNNING), None)
        if run is not None:
            node = run.graph.nodes.get(nid)
            title = (node.title or node.type) if node is not None else nid
            for k in range(count):
                run.outputs.append((nid, title, paths[k] if k < len(paths) else None))

    def pending(self) -> list[QueuedRun]:
        return [r for r in self.items if r.status == PENDING]

    def next_pending(self) -> Optional[QueuedRun]:
        waiting = self.pending()
        return waiting[0] if waiting else None

    def mark(self, run: QueuedRun, status: str, summary: str = "") -> None:
        run.status, run.summary = status, summary or run.summary
        if status == RUNNING:
            run.started_at = time.time()
        elif status in ENDED:
            run.ended_at = time.time()
        self.changed.emit()
        if status in ENDED:
            self.finished.emit(run)

    def remove(self, run: QueuedRun) -> bool:
        """Drop a run that has not started (a running one is cancelled instead)."""
        if run.status == RUNNING or run not in self.items:
            return False
        self.items.remove(run)
        self.changed.emit()
        return True

    def move(self, run: QueuedRun, step: int) -> None:
        """Move a pending run earlier (step < 0) or later among the pending ones."""
        waiting = self.pending()
        if run not in waiting:
            return
        i = waiting.index(run)
        j = max(0, min(len(waiting) - 1, i + step))
        if i == j:
            return
        other = waiting[j]
        a, b = self.items.index(run), self.items.index(other)
        self.items[a], self.items[b] = other, run
        self.changed.emit()

    def clear_finished(self) -> None:
        self.items = [r for r in self.items if r.status in (PENDING, RUNNING)]
        self.changed.emit()


class QueuePanel(QtWidgets.QWidget):
    """The queue as a list: remove or reorder what waits, cancel what runs, clear what ended."""

    cancel_requested = QtCore.Signal()

    def __init__(self, queue: RunQueue, parent=None):
        super().__init__(parent)
        self.queue = queue
        self.list = QtWidgets.QListWidget()
        self.list.setSelectionMode(QtWidgets.QAbstractItemView.SingleSelection)
        self.list.setWordWrap(True)  # a long summary wraps rather than scrolls sideways
        self.list.setHorizontalScrollBarPolicy(QtCore.Qt.ScrollBarAlwaysOff)
        buttons = QtWidgets.QHBoxLayout()
        self.up = push_button("Up", "run it earlier", lambda: self._move(-1))
        self.down = push_button("Down", "run it later", lambda: self._move(1))
        self.remove = push_button("Remove", "take a waiting run out of the queue", self._remove)
        self.cancel = push_button("Cancel", "stop the run going on (the next one starts)", self.cancel_requested.emit)
        self.clear = push_button("Clear finished", "forget the runs that ended", queue.clear_finished)
        for b in (self.up, self.down, self.remove, self.cancel):
            buttons.addWidget(b)
        buttons.addStretch(1)
        buttons.addWidget(self.clear)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.addWidget(self.list, 1)
        lay.addLayout(buttons)
        queue.changed.connect(self.refresh)
        self.list.currentRowChanged.connect(lambda _row: self._update_buttons())
        self.refresh()

    def selected(self) -> Optional[QueuedRun]:
        row = self.list.currentRow()
        return self.queue.items[row] if 0 <= row < len(self.queue.items) else None

    def refresh(self) -> None:
        chosen = self.selected()
        self.list.blockSignals(True)
        self.list.clear()
        for run in self.queue.items:
            self.list.addItem(run.text())
        if chosen in self.queue.items:
            self.list.setCurrentRow(self.queue.items.index(chosen))
        self.list.blockSignals(False)
        self._update_buttons()

    def _update_buttons(self) -> None:
        run = self.selected()
        waiting = run is not None and run.status == PENDING
        for b in (self.up, self.down, self.remove):
            b.setEnabled(waiting)
        self.cancel.setEnabled(any(r.status == RUNNING for r in self.queue.items))
        self.clear.setEnabled(any(r.status not in (PENDING, RUNNING) for r in self.queue.items))

    def _move(self, step: int) -> None:
        run = self.selected()
        if run is not None:
            self.queue.move(run, step)

    def _remove(self) -> None:
        run = self.selected()
        if run is not None:
            self.queue.remove(run)
