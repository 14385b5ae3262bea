"""The Batch dialog: sweep one param of the graph over values, on worker processes, and watch the
contact sheet fill in as jobs finish.

The sweep is app.batch's (the values field takes what `loomwork batch --sweep` takes); the jobs
run on a thread of their own with a local backend (worker processes, one torch thread each), so
the window stays responsive; each finished job redraws the sheet in that thread and hands the
picture to the UI thread as a QImage through a signal. Stop leaves the finished jobs in the
folder's manifest: starting the same sweep into the same folder resumes it.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from PySide6 import QtCore, QtGui, QtWidgets

SWEEPABLE = ("seed", "int", "float", "string", "choice", "bool", "path")


class _Bridge(QtCore.QObject):
    sheet = QtCore.Signal(QtGui.QImage, str)
    finished = QtCore.Signal(str)


def _qimage(pil) -> QtGui.QImage:
    import io

    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return QtGui.QImage.fromData(buf.getvalue(), "PNG")


def sweepable_params(graph) -> list[tuple[str, str, str]]:
    """(label, NODE-id.PARAM, default values text) for every param a sweep can take."""
    from nodes import registry

    out = []
    for nid, node in sorted(graph.nodes.items(), key=lambda kv: kv[1].pos):
        spec = registry.get(node.type)
        if spec is None or node.is_placeholder:
            continue
        for name, param in spec.params.items():
            if param.kind not in SWEEPABLE:
                continue
            value = node.params.get(name, param.default)
            if param.kind == "seed":
                hint = f"{value}..{value + 7}"
            elif param.kind == "choice":
                hint = ",".join(param.options[:4])
            elif param.kind in ("int", "float"):
                hint = f"{value}"
            else:
                hint = ""
            out.append((f"{node.title or node.type} · {name}", f"{nid}.{name}", hint))
    return out


class BatchDialog(QtWidgets.QDialog):
    """Opened on a snapshot of the window's graph. `backend_factory(workers)` makes the backend
    (default: app.batch.local.LocalBackend)."""

    def __init__(self, graph, graph_path: Optional[str], out_dir: str, parent=None,
                 backend_factory: Optional[Callable] = None):
        super().__init__(parent)
        self.setWindowTitle("Batch")
        self.graph, self.graph_path = graph.copy(), graph_path or "untitled.loom"
        self.backend_factory = backend_factory
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.sheets_shown = 0
        self.bridge = _Bridge()  # no parent: the batch thread may emit after the dialog is gone
        self.bridge.sheet.connect(self._show_sheet)
        self.bridge.finished.connect(self._finished)
        self.param = QtWidgets.QComboBox()
        self._params = sweepable_params(self.graph)
        for label, target, _hint in self._params:
            self.param.addItem(label, target)
        self.values = QtWidgets.QLineEdit()
        self.values.setPlaceholderText("0..15, 1..2:0.25, a,b,c, a JSON list or @file")
        self.param.currentIndexChanged.connect(self._param_changed)
        self.workers = QtWidgets.QSpinBox()
        self.workers.setRange(1, max(1, os.cpu_count() or 1))
        self.workers.setValue(min(2, self.workers.maximum()))
        self.out = QtWidgets.QLineEdit(str(Path(out_dir) / f"batch-{time.strftime('%Y%m%d-%H%M%S')}"))
        browse = QtWidgets.QPushButton("…")
        browse.clicked.connect(self._browse)
        out_row = QtWidgets.QHBoxLayout()
        out_row.addWidget(self.out, 1)
        out_row.addWidget(browse)
        form = QtWidgets.QFormLayout()
        form.addRow("Param", self.param)
        form.addRow("Values", self.values)
        form.addRow("Workers", self.workers)
        form.addRow("Folder", out_row)
        self.status = QtWidgets.QLabel("Choose a param and its values, then Start.")
        self.status.setWordWrap(True)
        self.sheet = QtWidgets.QLabel()
        self.sheet.setAlignment(QtCore.Qt.AlignCenter)
        scroll = QtWidgets.QScrollArea()
        scroll.setWidget(self.sheet)
        scroll.setWidgetResizable(True)
        scroll.setMinimumSize(420, 300)
        self.start_button = QtWidgets.QPushButton("Start")
        self.start_button.clicked.connect(self.start)
        self.stop_button = QtWidgets.QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self._stop.set)
        buttons = QtWidgets.QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.stop_button)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.status)
        layout.addWidget(scroll, 1)
        layout.addLayout(buttons)
        preferred = next((i for i, p in enumerate(self._params) if p[1].endswith(".seed")), 0)
        self.param.setCurrentIndex(preferred)
        self._param_changed(preferred)

    def _param_changed(self, index: int) -> None:
        if 0 <= index < len(self._params):
            self.values.setText(self._params[index][2])

    def _browse(self) -> None:
        folder = QtWidgets.QFileDialog.getExistingDirectory(self, "Batch folder", self.out.text())
        if folder:
            self.out.setText(folder)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Check the sweep (an error is shown, nothing runs), then run it on a thread."""
        from app.batch import Sweep, SweepError, parse_axis, plan_batch
        from app.cli.headless import UsageError

        if self.running or self.param.currentData() is None:
            return
        try:
            axis = parse_axis(f"{self.param.currentData()}={self.values.text()}", Path(self.graph_path).parent)
            plan = plan_batch(self.graph_path, Sweep([axis]), graph=self.graph)
        except (SweepError, UsageError) as exc:
            self.status.setText(f"Not started: {exc}")
            return
        self._stop.clear()
        self.start_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.status.setText(f"{len(plan.jobs)} jobs on {self.workers.value()} workers: starting…")
        self._thread = threading.Thread(target=self._work, args=(plan, self.out.text(), self.workers.value()),
                                        name="loomwork-batch", daemon=True)
        self._thread.start()

    def _work(self, plan, out: str, workers: int) -> None:
        """The batch, off the UI thread."""
        from app.batch import run_batch
        from app.batch.contact_sheet import render

        total = len(plan.jobs)

        def on_event(kind, rec, manifest):
            if kind in ("done", "failed"):
                image = _qimage(render(manifest.in_order(), plan.axes, plan.sweep.mode, manifest.out_dir))
                c = manifest.counts()
                self.bridge.sheet.emit(image, f"{c['done']} of {total} done, {c['failed']} failed")

        try:
            if self.backend_factory is not None:
                backend = self.backend_factory(workers)
            else:
                from app.batch.local import LocalBackend

                backend = LocalBackend(workers, {"disk_cache": True})
            try:
                res = run_batch(plan, out, backend, on_event=on_event, stop=self._stop)
            finally:
                backend.close()
            c = res.counts
            word = "Stopped" if res.interrupted else "Finished"
            message = (f"{word}: {c['done']} of {total} done, {c['failed']} failed, in {res.seconds:.1f}s; "
                       f"{out} holds the images, results.json and contact_sheet.png")
        except Exception as exc:  # noqa: BLE001 - shown in the dialog, the app goes on
            message = f"The batch failed: {type(exc).__name__}: {exc}"
        self.bridge.finished.emit(message)

    def _show_sheet(self, image: QtGui.QImage, text: str) -> None:
        self.sheets_shown += 1
        self.sheet.setPixmap(QtGui.QPixmap.fromImage(image))
        self.status.setText(text)

    def _finished(self, message: str) -> None:
        self.status.setText(message)
        self.start_button.setEnabled(True)
        self.stop_button.setEnabled(False)

    def done(self, result: int) -> None:  # closing stops the batch; finished jobs stay
        self._stop.set()
        super().done(result)


def open_batch_dialog(window) -> BatchDialog:
    """The window's Run ▸ Batch… entry: a dialog on the graph as it is now."""
    from . import session

    path = window.doc.path if window.doc.path and not window.doc.path.lower().endswith(".png") else None
    out_dir = str(Path(path).parent / "output") if path else str(session.default_output_dir())
    dialog = BatchDialog(window.doc.graph, path, out_dir, window)
    dialog.setAttribute(QtCore.Qt.WA_DeleteOnClose)
    dialog.show()
    return dialog
