"""The run queue: Run while a run is going queues the graph as it is at that moment.

`RunQueue` is plain data behind a Qt signal (the panel and the window read it): each entry is a
snapshot of the graph, what to run and where the images go, and its status. `QueuePanel` shows
it with remove, reorder and cancel. A batch count queues N snapshots, the k-th with every
Sampler's seed raised by k (the way a seed "increments" in peers' batch counts).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from PySide6 import QtCore, QtWidgets

from app.graph import Graph

PENDING, RUNNING, DONE, FAILED, CANCELLED = "pending", "running", "done", "failed", "cancelled"
STATUS_MARKS = {PENDING: "…", RUNNING: "▶", DONE: "✓", FAILED: "✗", CANCELLED: "■"}
SEEDED_TYPES = ("Sampler",)  # node types whose `seed` a batch count raises


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


class RunQueue(QtCore.QObject):
    changed = QtCore.Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.items: list[QueuedRun] = []

    def add(self, run: QueuedRun) -> None:
        self.items.append(run)
        self.changed.emit()

    def pending(self) -> list[QueuedRun]:
        return [r for r in self.items if r.status == PENDING]

    def next_pending(self) -> Optional[QueuedRun]:
        waiting = self.pending()
        return waiting[0] if waiting else None

    def mark(self, run: QueuedRun, status: str, summary: str = "") -> None:
        run.status, run.summary = status, summary or run.summary
        self.changed.emit()

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
        self.up = self._button("Up", "run it earlier", lambda: self._move(-1))
        self.down = self._button("Down", "run it later", lambda: self._move(1))
        self.remove = self._button("Remove", "take a waiting run out of the queue", self._remove)
        self.cancel = self._button("Cancel", "stop the run going on (the next one starts)", self.cancel_requested.emit)
        self.clear = self._button("Clear finished", "forget the runs that ended", queue.clear_finished)
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

    def _button(self, text, tip, slot) -> QtWidgets.QPushButton:
        b = QtWidgets.QPushButton(text)
        b.setToolTip(tip)
        b.clicked.connect(slot)
        return b

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
