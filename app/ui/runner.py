"""Runs graphs off the UI thread and turns the engine's plain callbacks into Qt signals.

One Executor for the whole app session (its caches make re-runs cheap), created in the worker
thread on first use so that torch loads there and never blocks the window. The worker runs on a
snapshot of the graph, so editing during a run is safe; the run's results are for that snapshot.
Images are converted to QImage in the worker, so the UI thread only paints.
"""

from __future__ import annotations

import threading
import traceback
from pathlib import Path
from typing import Optional

from PySide6 import QtCore, QtGui

from app.graph import Graph


def images_to_qimages(images) -> list[QtGui.QImage]:
    """IMAGE (NHWC float 0..1 tensor, or anything numpy-like) -> QImages. Runs in the worker."""
    import numpy as np

    if hasattr(images, "detach"):
        images = images.detach().float().clamp(0, 1).cpu().numpy()
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    out = []
    for a in arr:
        if a.shape[-1] == 1:
            a = np.repeat(a, 3, axis=-1)
        a = np.ascontiguousarray(a[..., :3])
        h, w = a.shape[:2]
        out.append(QtGui.QImage(a.data, w, h, 3 * w, QtGui.QImage.Format_RGB888).copy())
    return out


# The heavy third-party modules a first run needs (the UI layer does not import our kernels; these
# are what they pull in). Missing ones are skipped: they only make the first run slower.
WARM_MODULES = ("diffusers.models.unets.unet_2d_condition", "diffusers.schedulers",
                "diffusers.models.autoencoders.autoencoder_kl", "transformers.models.clip.modeling_clip")


def import_torch_gently(*more: str) -> None:
    """Import torch (and the modules named) from a background thread, freezing the UI thread as
    little as a plain import allows.

    The importing thread holds the GIL for long stretches, and the UI thread needs it for every
    Python slot and paint. The cyclic GC makes several full passes over the millions of objects
    the import creates (~0.15 s each), so the import runs with the GC paused, and what it made is
    frozen out of the GC's way afterwards. The longest stretch stays: the dynamic loader runs
    libtorch's static initialisers inside the import with the GIL held (~0.4 s on an idle
    machine). Loading torch's libraries ahead of the import by their file names, the GIL released,
    would hide it, but goes around torch's own loader: it loads them RTLD_LOCAL so their C++
    symbols cannot clobber other libraries', and loads the CUDA libraries it ships first, so the
    system's copies do not win.
    """
    import gc
    import importlib
    import sys

    if "torch" in sys.modules and all(m in sys.modules for m in more):
        return  # nothing to load (and no reason to freeze the GC's view again)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        import torch  # noqa: F401

        for name in more:  # the kernels' heavy dependencies (diffusers...) likewise
            try:
                importlib.import_module(name)
            except ImportError:
                pass
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def executor_arguments(disk_cache: bool = True) -> dict:
    """Executor arguments from Preferences (each left to the engine's default when not set)."""
    from . import session

    chosen = session.engine_settings()
    out: dict = {"disk_cache": disk_cache}
    if chosen["device"] and chosen["device"] != "auto":
        out["device"] = chosen["device"]
    if chosen["ram_budget"]:
        out["ram_budget"] = chosen["ram_budget"]
    if disk_cache and chosen["disk_cache"]:
        out["disk_cache"] = chosen["disk_cache"]
    if chosen["disk_budget_gb"]:
        try:
            out["disk_budget"] = int(float(chosen["disk_budget_gb"]) * (1 << 30))
        except ValueError:
            pass  # the dialog refuses such values; a hand-edited file falls back to the default
    return out


class Runner(QtCore.QObject):
    """Start, cancel and report runs. Signals arrive on the UI thread (queued)."""

    started = QtCore.Signal(list)                  # node ids in the run's cone
    node_state = QtCore.Signal(str, str, dict)     # node id, state, info
    progress = QtCore.Signal(str, int, int)        # node id, step, total
    preview = QtCore.Signal(str, QtGui.QImage)     # node id, latest sampler preview
    images = QtCore.Signal(str, list, list)        # node id, [QImage], [saved paths]
    table = QtCore.Signal(str, str, list, list)    # node id, title, columns, rows (plain values)
    finished = QtCore.Signal(object)               # RunReport, or an error string
    warmed = QtCore.Signal()

    def __init__(self, parent=None, *, disk_cache=True):
        super().__init__(parent)
        self._disk_cache = disk_cache
        self._model_roots: Optional[list[str]] = None  # None: LOOMWORK_MODELS only
        self._rebuild = False  # Preferences changed: a new engine for the next run
        self._executor = None
        self._thread: Optional[threading.Thread] = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def executor(self):
        with self._lock:
            if self._executor is None or (self._rebuild and not self.busy):
                from app.engine import Executor

                self._executor = Executor(**executor_arguments(self._disk_cache), model_roots=self._model_roots)
                self._rebuild = False
            return self._executor

    def reconfigure(self) -> None:
        """Build the engine again from Preferences (device, budgets, cache folder) for the next
        run, not the one going on. Its caches in memory go with it; the disk cache stays."""
        with self._lock:
            self._rebuild = True

    def set_model_roots(self, roots: list[str]) -> None:
        """Where `ckpt:` names are found, from the next run on."""
        with self._lock:
            self._model_roots = list(roots)
            if self._executor is not None:
                self._executor.model_roots = list(roots)

    def warm_up(self) -> None:
        """Import torch and the kernels in the background after the window shows, so the first
        Run does not pay for it (and the window is never waiting on it)."""
        def work():
            try:
                import_torch_gently(*WARM_MODULES)
                self.executor()
            except Exception:  # a broken install shows up on the first run instead
                pass
            self.warmed.emit()

        threading.Thread(target=work, name="loomwork-warmup", daemon=True).start()

    def start(self, graph: Graph, targets: Optional[list[str]] = None, *,
              graph_path: Optional[str] = None, output_dir: Optional[str] = None) -> bool:
        if self.busy:
            return False
        self._cancel = threading.Event()
        snapshot = graph.copy()
        cancel = self._cancel
        self._thread = threading.Thread(target=self._work, name="loomwork-run", daemon=True,
                                        args=(snapshot, targets, graph_path, output_dir, cancel))
        self._thread.start()
        return True

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.busy

    def _work(self, graph: Graph, targets, graph_path, output_dir, cancel: threading.Event) -> None:
        try:
            from app.engine import EngineEvents

            import_torch_gently(*WARM_MODULES)  # if warm_up has not already
            executor = self.executor()
            if targets is None:
                targets = executor.output_nodes(graph)
            if not targets:
                self.finished.emit("nothing to run: add a Save Image or Preview Image node, "
                                   "or select a node and use Run to Selected")
                return
            self.started.emit(sorted(graph.upstream(targets)))

            def on_preview(nid, image):
                self.preview.emit(nid, images_to_qimages(image[:1])[0])

            def on_images(nid, images, paths):
                self.images.emit(nid, images_to_qimages(images), list(paths))

            def on_table(nid, table):  # plain lists cross the thread, not the kernel's type
                self.table.emit(nid, str(table.title), list(table.columns), [list(r) for r in table.rows])

            events = EngineEvents(
                node_state=lambda nid, state, info: self.node_state.emit(nid, state, dict(info)),
                progress=lambda nid, step, total: self.progress.emit(nid, step, total),
                preview=on_preview, images=on_images, tables=on_table)
            out = Path(output_dir) if output_dir else None
            from . import session

            report = executor.run(graph, targets, events=events, cancel=cancel, output_dir=out,
                                  graph_path=graph_path, write_dirs=session.allowed_write_folders())
            self.finished.emit(report)
        except Exception as exc:  # a graph-level problem (a cycle, ...): report, never crash
            self.finished.emit(f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc))
            traceback.print_exc()
