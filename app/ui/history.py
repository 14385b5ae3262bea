"""History: every run that ended, across sessions, and a panel to reopen one.

A record is one JSON file in the user data folder (`history/`): the graph exactly as it was
queued (file text), the run's overrides (targets, the seeds it ran with, the file names the
pattern gave), its outputs (node, title, path), its status and summary, and when it was queued,
started and ended. One file per run, so a crash loses at most the run going on, and two app
windows never fight over one file. The oldest go beyond MAX_RECORDS.

`HistoryPanel` lists the records newest first with a thumbnail of the first output; Reopen opens
the run's graph as an untitled document (the original file is not touched), and Show Outputs
hands the images to the gallery.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from PySide6 import QtCore, QtGui, QtWidgets

from app.graph import Graph, GraphFileError, dumps, loads
from app.graph.fileformat import atomic_write

from .run_queue import QueuedRun, push_button

MAX_RECORDS = 2000
FORMAT = 1


@dataclass
class RunRecord:
    id: str
    graph_text: str
    status: str
    label: str = ""
    summary: str = ""
    graph_path: Optional[str] = None
    output_dir: Optional[str] = None
    targets: Optional[list] = None
    overrides: dict = field(default_factory=dict)
    outputs: list = field(default_factory=list)  # {"node", "title", "path"}
    queued_at: float = 0.0
    started_at: float = 0.0
    ended_at: float = 0.0

    @property
    def graph_name(self) -> str:
        return Path(self.graph_path).stem if self.graph_path else "untitled"

    def graph(self) -> Graph:
        """The graph as it was queued (a GraphFileError if the record's text is damaged)."""
        from nodes import registry

        return loads(self.graph_text, registry.get)

    def seeds(self) -> dict:
        return dict(self.overrides.get("seeds", {}))

    def paths(self) -> list[str]:
        return [o["path"] for o in self.outputs if o.get("path")]

    def as_json(self) -> dict:
        return {"format": FORMAT, "id": self.id, "status": self.status, "label": self.label,
                "summary": self.summary, "graph_path": self.graph_path, "output_dir": self.output_dir,
                "targets": self.targets, "overrides": self.overrides, "outputs": self.outputs,
                "queued_at": self.queued_at, "started_at": self.started_at, "ended_at": self.ended_at,
                "graph": self.graph_text}

    @classmethod
    def from_json(cls, d: dict) -> "RunRecord":
        if not isinstance(d, dict) or not isinstance(d.get("graph"), str) or not isinstance(d.get("id"), str):
            raise ValueError("not a run record")
        outputs = [o for o in d.get("outputs") or [] if isinstance(o, dict)]
        targets = d.get("targets")
        return cls(id=d["id"], graph_text=d["graph"], status=str(d.get("status", "")), label=str(d.get("label", "")),
                   summary=str(d.get("summary", "")), graph_path=d.get("graph_path") or None,
                   output_dir=d.get("output_dir") or None,
                   targets=[str(t) for t in targets] if isinstance(targets, list) else None,
                   overrides=d.get("overrides") if isinstance(d.get("overrides"), dict) else {},
                   outputs=outputs, queued_at=float(d.get("queued_at") or 0), started_at=float(d.get("started_at") or 0),
                   ended_at=float(d.get("ended_at") or 0))


def seeds_of(graph: Graph) -> dict:
    """{node id: seed} of every seeded param in `graph` (the value it runs with)."""
    from nodes import registry
    from nodes.base import Seed

    out = {}
    for nid, node in graph.nodes.items():
        spec = registry.get(node.type)
        if spec is None:
            continue
        for name, param in spec.params.items():
            if isinstance(param, Seed):
                out[nid] = spec.resolved_params(node.params)[name]
    return out


def record_of(run: QueuedRun) -> RunRecord:
    source = run.source if run.source is not None else run.graph
    names = {nid: run.graph.nodes[nid].params.get("prefix") for nid in run.graph.nodes
             if nid in source.nodes and run.graph.nodes[nid].params.get("prefix") != source.nodes[nid].params.get("prefix")}
    ended = run.ended_at or time.time()
    # ids sort as the runs ended (the store lists newest first by name)
    stamp = f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(ended))}-{int(ended * 1000) % 1000:03d}"
    return RunRecord(id=f"{stamp}-{uuid.uuid4().hex[:8]}",
                     graph_text=dumps(source, strict=False), status=run.status, label=run.label,
                     summary=run.summary, graph_path=run.graph_path, output_dir=run.output_dir,
                     targets=list(run.targets) if run.targets else None,
                     overrides={"seeds": seeds_of(source), "file_names": names},
                     outputs=[{"node": n, "title": t, "path": p} for n, t, p in run.outputs],
                     queued_at=run.queued_at, started_at=run.started_at, ended_at=ended)


class HistoryStore(QtCore.QObject):
    """The records on disk, newest first. `added` fires for each new record."""

    added = QtCore.Signal(object)

    def __init__(self, folder: Optional[Path] = None, parent=None, max_records: int = MAX_RECORDS):
        super().__init__(parent)
        if folder is None:
            from . import session

            folder = session.data_dir() / "history"
        self.folder = Path(folder)
        self.max_records = max_records

    def _files(self) -> list[Path]:
        try:
            return sorted(self.folder.glob("*.json"), reverse=True)  # ids start with the time
        except OSError:
            return []

    def records(self, limit: Optional[int] = None) -> list[RunRecord]:
        """The readable records, newest first (damaged files are skipped, not deleted)."""
        out = []
        for f in self._files():
            if limit is not None and len(out) >= limit:
                break
            try:
                out.append(RunRecord.from_json(json.loads(f.read_text("utf-8"))))
            except (OSError, ValueError, TypeError):
                continue
        return out

    def get(self, rid: str) -> Optional[RunRecord]:
        try:
            return RunRecord.from_json(json.loads((self.folder / f"{rid}.json").read_text("utf-8")))
        except (OSError, ValueError, TypeError):
            return None

    def add(self, record: RunRecord) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(self.folder / f"{record.id}.json", json.dumps(record.as_json(), indent=1).encode("utf-8"))
        except OSError:
            return  # history must never get in the way of a run
        for old in self._files()[self.max_records:]:
            self._unlink(old)
        self.added.emit(record)

    def remove(self, rid: str) -> None:
        self._unlink(self.folder / f"{rid}.json")

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass

    def record_run(self, run: QueuedRun) -> RunRecord:
        record = record_of(run)
        self.add(record)
        return record


def when_text(t: float) -> str:
    if not t:
        return "?"
    same_day = time.localtime(t)[:3] == time.localtime()[:3]
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M", time.localtime(t))


class HistoryPanel(QtWidgets.QWidget):
    """Past runs, newest first: reopen a run's graph, show its outputs, compare two."""

    reopen_requested = QtCore.Signal(object)      # RunRecord
    outputs_requested = QtCore.Signal(list)       # paths
    compare_requested = QtCore.Signal(str, str)   # two image paths

    def __init__(self, store: HistoryStore, thumbnails=None, parent=None):
        super().__init__(parent)
        self.store = store
        self.thumbnails = thumbnails  # a gallery.ThumbnailLoader, shared with the gallery
        self.records: list[RunRecord] = []
        self._loaded = False
        self.list = QtWidgets.QListWidget()
        self.list.setSelectionMode(QtWidgets.QAbstractItemView.ExtendedSelection)
        self.list.setWordWrap(True)
        self.list.setHorizontalScrollBarPolicy(QtCore.Qt.ScrollBarAlwaysOff)
        self.list.setUniformItemSizes(True)
        em = QtGui.QFontMetrics(self.font()).height()
        self.list.setIconSize(QtCore.QSize(em * 3, em * 3))
        self.list.itemDoubleClicked.connect(lambda _i: self.reopen())
        self.list.itemSelectionChanged.connect(self._update_buttons)
        self.reopen_btn = push_button("Reopen graph", "open this run's graph as it ran, as an untitled copy", self.reopen)
        self.outputs_btn = push_button("Show outputs", "show this run's images in the gallery", self.show_outputs)
        self.compare_btn = push_button("Compare", "compare the first images of two runs", self.compare)
        self.delete_btn = push_button("Forget", "remove the selected runs from the history (images stay)", self.forget)
        self.detail = QtWidgets.QLabel("")
        self.detail.setObjectName("Hint")
        self.detail.setWordWrap(True)
        self.detail.setSizePolicy(QtWidgets.QSizePolicy.Ignored, QtWidgets.QSizePolicy.Preferred)
        self.detail.setTextInteractionFlags(QtCore.Qt.TextSelectableByMouse)
        buttons = QtWidgets.QHBoxLayout()
        for b in (self.reopen_btn, self.outputs_btn, self.compare_btn):
            buttons.addWidget(b)
        buttons.addStretch(1)
        buttons.addWidget(self.delete_btn)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.addWidget(self.list, 1)
        lay.addWidget(self.detail)
        lay.addLayout(buttons)
        store.added.connect(self._on_added)
        if thumbnails is not None:
            thumbnails.on_ready(self._on_thumbnail)
        self._update_buttons()

    # -- filling --------------------------------------------------------------------------
    def showEvent(self, event):
        super().showEvent(event)
        if not self._loaded:
            self.reload()

    def reload(self) -> None:
        self._loaded = True
        self.records = self.store.records()
        self.list.clear()
        for r in self.records:
            self.list.addItem(self._item(r))
        self._update_buttons()

    def _on_added(self, record: RunRecord) -> None:
        if not self._loaded:
            return  # read with the rest when the panel is first shown
        self.records.insert(0, record)
        self.list.insertItem(0, self._item(record))

    def _item(self, r: RunRecord) -> QtWidgets.QListWidgetItem:
        n = len(r.outputs)
        seeds = sorted(set(r.seeds().values()))
        seed_text = f" · seed {', '.join(map(str, seeds[:3]))}" if seeds else ""
        text = (f"{when_text(r.ended_at)}  {r.graph_name}{seed_text}\n"
                f"{r.status} · {n} image{'s' if n != 1 else ''}")
        item = QtWidgets.QListWidgetItem(text)
        item.setData(QtCore.Qt.UserRole, r.id)
        item.setToolTip(r.summary or r.status)
        paths = r.paths()
        if paths and self.thumbnails is not None:
            image = self.thumbnails.get(paths[0])
            if image is not None:
                item.setIcon(QtGui.QIcon(QtGui.QPixmap.fromImage(image)))
            else:
                self.thumbnails.request(paths[0])
        return item

    def _on_thumbnail(self, path: str, image: QtGui.QImage) -> None:
        for row, r in enumerate(self.records):
            paths = r.paths()
            if paths and paths[0] == path and row < self.list.count():
                self.list.item(row).setIcon(QtGui.QIcon(QtGui.QPixmap.fromImage(image)))

    # -- acting on the selection ----------------------------------------------------------
    def selected(self) -> list[RunRecord]:
        rows = sorted(i.row() for i in self.list.selectionModel().selectedRows())
        return [self.records[r] for r in rows if r < len(self.records)]

    def _update_buttons(self) -> None:
        chosen = self.selected()
        self.reopen_btn.setEnabled(len(chosen) == 1)
        self.outputs_btn.setEnabled(any(r.paths() for r in chosen))
        self.compare_btn.setEnabled(len([r for r in chosen if r.paths()]) == 2)
        self.delete_btn.setEnabled(bool(chosen))
        if len(chosen) == 1:
            r = chosen[0]
            where = r.graph_path or "an untitled graph"
            self.detail.setText(f"{r.label} of {where}\nqueued {when_text(r.queued_at)}, "
                                f"took {max(0.0, r.ended_at - r.started_at):.1f} s · {r.summary}")
        else:
            self.detail.setText("")

    def reopen(self) -> None:
        chosen = self.selected()
        if len(chosen) == 1:
            self.reopen_requested.emit(chosen[0])

    def show_outputs(self) -> None:
        paths = [p for r in self.selected() for p in r.paths()]
        if paths:
            self.outputs_requested.emit(paths)

    def compare(self) -> None:
        withimages = [r for r in self.selected() if r.paths()]
        if len(withimages) == 2:
            self.compare_requested.emit(withimages[0].paths()[0], withimages[1].paths()[0])

    def forget(self) -> None:
        for r in self.selected():
            self.store.remove(r.id)
        self.reload()


def reopen_record(window, record: RunRecord) -> bool:
    """Open `record`'s graph in `window` as an untitled document (after asking about unsaved
    changes). A damaged record says why and leaves the open graph as it is."""
    if not window.maybe_save():
        return False
    try:
        graph = record.graph()
    except GraphFileError as exc:
        window.show_message(f"Cannot reopen that run: {exc}", 15000)
        return False
    window.doc.replace(graph, None)
    window.show_message(f"Reopened the graph of the run of {when_text(record.queued_at)} "
                        f"({record.graph_name}) as an untitled copy")
    return True
