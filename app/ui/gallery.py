"""The gallery: the images of the output folder and of the run history as labelled thumbnails.

Thumbnails load lazily and off the UI thread: after a scroll or resize the view asks for the rows
it shows (and half a screen ahead), a miss queues the file with `ThumbnailLoader`, whose worker
threads decode and shrink it
(Pillow) and hand back a small QImage; the newest request is served first, so what is on
screen comes before what was scrolled past. The UI thread only paints.

Labels come from the history (graph, node, seed) when a run made the file, else from its name.
Double-click opens the large viewer; Compare takes two; Open Folder shows the file in the file
manager; dragging a thumbnail drags the file out (a file URL, as file managers and other apps
take it).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from PySide6 import QtCore, QtGui, QtWidgets

from .image_viewer import ImageWindow, drag_files, open_folder, tool_button

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SOURCES = ("History and output folder", "History", "Output folder")


class ThumbnailLoader(QtCore.QObject):
    """Small QImages of image files, made in worker threads; the functions given to `on_ready`
    get (path, image) on the UI thread. Keeps the last `keep` thumbnails.

    Results wait in a queue that a UI-thread timer drains every DRAIN_MS while work is out:
    one wake-up for many thumbnails, so the UI thread takes Python's lock from the workers less
    often, and no signal is emitted per thumbnail (PySide6 6.12 on Python 3.11 leaks a reference
    to True on every Signal.emit; enough of them abort the app)."""

    DRAIN_MS = 30
    # per tick at most this many thumbnails, and no more once this much time is spent: each one
    # becomes a QPixmap and an icon on the UI thread (~1-3 ms), so 500 finished at once would
    # otherwise hold the loop for a second; the rest wait for the next tick
    DRAIN_MAX = 16
    DRAIN_BUDGET_S = 0.025

    def __init__(self, side: int = 128, threads: int = 1, keep: int = 1500, parent=None):
        super().__init__(parent)
        self.side, self.keep = side, keep
        self._cache: OrderedDict[str, QtGui.QImage] = OrderedDict()
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._max_threads = max(1, threads)
        self._stopped = False
        self._done: deque[tuple[str, QtGui.QImage]] = deque()
        self._listeners: list = []
        self._timer = QtCore.QTimer(self, interval=self.DRAIN_MS)
        self._timer.timeout.connect(self._drain)
        self.failed: set[str] = set()

    def on_ready(self, fn) -> None:
        """Call fn(path, image) on the UI thread for each thumbnail made from now on."""
        self._listeners.append(fn)

    def get(self, path: str) -> Optional[QtGui.QImage]:
        image = self._cache.get(path)
        if image is not None:
            self._cache.move_to_end(path)
        return image

    def request(self, path: str) -> None:
        """Queue `path` (again: to the front) unless it is loaded, failed or being loaded."""
        if path in self._cache or path in self.failed:
            return
        with self._cond:
            if path in self._queued:
                try:
                    self._queue.remove(path)
                except ValueError:  # a worker has it already
                    return
            self._queued.add(path)
            self._queue.append(path)
            alive = [t for t in self._threads if t.is_alive()]
            self._threads = alive
            if len(alive) < self._max_threads:
                t = threading.Thread(target=self._work, name="loomwork-thumbnails", daemon=True)
                self._threads.append(t)
                t.start()
            self._cond.notify()
        if not self._timer.isActive():
            self._timer.start()

    def pending(self) -> int:
        with self._cond:
            return len(self._queued)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._queue.clear()
            self._queued.clear()
            self._cond.notify_all()

    @staticmethod
    def _lower_priority() -> None:
        """Thumbnails are background work: on a busy machine the UI thread goes first (Linux
        schedules threads on their own; raising a thread's niceness needs no rights)."""
        if not hasattr(os, "setpriority"):
            return
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 10))
        except OSError:
            pass

    def _work(self) -> None:
        self._lower_priority()
        while True:
            with self._cond:
                if not self._queue and not self._stopped:
                    self._cond.wait(5.0)  # idle threads end; request() starts new ones
                if self._stopped or not self._queue:
                    return
                path = self._queue.pop()  # the newest request: most likely on screen
            image = self.load(path, self.side)
            with self._cond:  # the result is queued before the path stops counting as pending
                if image is None:
                    self.failed.add(path)
                else:
                    self._done.append((path, image))
                self._queued.discard(path)

    @staticmethod
    def load(path: str, side: int) -> Optional[QtGui.QImage]:
        """`path` shrunk to fit side×side, or None if it cannot be read. Safe in any thread.

        Pillow decodes and shrinks with Python's lock released, so the UI thread keeps running
        while the workers work (QImageReader.read holds it for the whole decode). Pillow's
        decompression-bomb limit stays on: a huge file fails rather than eating the memory."""
        from PIL import Image, ImageOps

        try:
            with Image.open(path) as im:
                im.draft("RGB", (side, side))  # JPEG: decode at a fraction of the size
                im = ImageOps.exif_transpose(im)
                im.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
                rgb = im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            return None
        data = rgb.tobytes()
        image = QtGui.QImage(data, rgb.width, rgb.height, 3 * rgb.width, QtGui.QImage.Format_RGB888)
        return image.convertToFormat(QtGui.QImage.Format_RGB32)  # a copy: owns its pixels

    def _drain(self) -> int:
        """Hand finished thumbnails to the listeners, a bounded batch per tick; returns how many."""
        end = time.perf_counter() + self.DRAIN_BUDGET_S
        handled = 0
        while handled < self.DRAIN_MAX and (handled == 0 or time.perf_counter() < end):
            with self._cond:
                if not self._done:
                    break
                path, image = self._done.popleft()
            self._cache[path] = image
            for fn in self._listeners:
                fn(path, image)
            handled += 1
        while len(self._cache) > self.keep:
            self._cache.popitem(last=False)
        with self._cond:
            if not self._queued and not self._done:
                self._timer.stop()
        return handled


@dataclass
class GalleryEntry:
    path: str
    graph: str = ""
    node: str = ""
    seed: Optional[int] = None
    when: float = 0.0
    record_id: Optional[str] = None

    def label(self) -> str:
        if self.record_id is None:
            return os.path.basename(self.path)
        top = f"{self.graph} · {self.node}" if self.node else self.graph
        return top + (f"\nseed {self.seed}" if self.seed is not None else "")


def entries_from_history(records) -> list[GalleryEntry]:
    out = []
    for r in records:
        seeds = r.seeds()
        graph = None
        for o in r.outputs:
            if not o.get("path"):
                continue
            seed = _seed_for(r, o.get("node"), seeds, graph)
            out.append(GalleryEntry(o["path"], r.graph_name, o.get("title") or "", seed, r.ended_at, r.id))
    return out


def _seed_for(record, nid, seeds: dict, graph) -> Optional[int]:
    """The seed the output node `nid` was made with: the one seeded node it reads from, else the
    run's only seed."""
    if not seeds:
        return None
    if len(set(seeds.values())) == 1:
        return next(iter(seeds.values()))
    try:
        g = record.graph()
        up = g.upstream([nid]) if nid in g.nodes else set()
    except Exception:  # a damaged record: no seed rather than no gallery
        return None
    found = [seeds[n] for n in sorted(up) if n in seeds]
    return found[0] if found else None


def entries_from_folder(folder: Path, limit: int = 5000) -> list[GalleryEntry]:
    """Image files directly in `folder`, newest first (os.scandir: a stat per file, no decode)."""
    out = []
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES):
                    out.append(GalleryEntry(e.path, when=e.stat().st_mtime))
    except OSError:
        return []
    out.sort(key=lambda e: e.when, reverse=True)
    return out[:limit]


class GalleryModel(QtGui.QStandardItemModel):
    """The shown entries as Qt items: the view paints them without calling into Python (each
    call from Qt into Python waits for Python's lock, which the thumbnail workers share).
    Which rows to load is the view's call (GalleryView.visible_rows)."""

    def __init__(self, loader: ThumbnailLoader, parent=None):
        super().__init__(parent)
        self.loader = loader
        self.entries: list[GalleryEntry] = []
        self._items: dict[str, list[QtGui.QStandardItem]] = {}
        side = loader.side
        placeholder = QtGui.QPixmap(side, side)
        placeholder.fill(QtGui.QColor("#2b2f37"))
        self._placeholder = QtGui.QIcon(placeholder)
        loader.on_ready(self._on_ready)

    CHUNK = 150  # rows added per turn of the event loop: a long list never stalls the UI

    def set_entries(self, entries: list[GalleryEntry]) -> None:
        """Show `entries`: the first CHUNK rows at once, the rest a chunk per event-loop turn."""
        self.entries = list(entries)
        self._items = {}
        self._generation = getattr(self, "_generation", 0) + 1
        self.clear()
        self._append(0, self._generation)

    def complete(self) -> bool:
        return self.rowCount() == len(self.entries)

    def _append(self, start: int, generation: int) -> None:
        if generation != self._generation:
            return  # replaced meanwhile
        flags = QtCore.Qt.ItemIsEnabled | QtCore.Qt.ItemIsSelectable | QtCore.Qt.ItemIsDragEnabled
        items = []
        for e in self.entries[start:start + self.CHUNK]:
            label = e.label()
            item = QtGui.QStandardItem(label)
            item.setFlags(flags)
            item.setToolTip(f"{label}\n{e.path}")
            image = self.loader.get(e.path)
            item.setIcon(QtGui.QIcon(QtGui.QPixmap.fromImage(image)) if image is not None else self._placeholder)
            self._items.setdefault(e.path, []).append(item)
            items.append(item)
        if items:
            self.invisibleRootItem().appendRows(items)
        if start + self.CHUNK < len(self.entries):
            QtCore.QTimer.singleShot(0, self, lambda: self._append(start + self.CHUNK, generation))

    def request_rows(self, rows) -> None:
        """Queue the thumbnails of `rows` (last first: the loader serves the newest first)."""
        for r in reversed(list(rows)):
            if 0 <= r < len(self.entries):
                self.loader.request(self.entries[r].path)

    def _on_ready(self, path: str, image) -> None:
        items = self._items.get(path)
        if items:
            icon = QtGui.QIcon(QtGui.QPixmap.fromImage(image))
            for item in items:
                item.setIcon(icon)


class GalleryView(QtWidgets.QListView):
    """Icon grid; a drag takes the selected files out as file URLs."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setViewMode(QtWidgets.QListView.IconMode)
        self.setResizeMode(QtWidgets.QListView.Adjust)
        self.setMovement(QtWidgets.QListView.Static)
        self.setUniformItemSizes(True)  # no size query per row: 500 rows lay out at once
        self.setLayoutMode(QtWidgets.QListView.Batched)
        self.setBatchSize(200)
        self.setSelectionMode(QtWidgets.QAbstractItemView.ExtendedSelection)
        self.setDragEnabled(True)
        self.setDragDropMode(QtWidgets.QAbstractItemView.DragOnly)
        self.setWordWrap(True)
        self.setTextElideMode(QtCore.Qt.ElideMiddle)
        self.setSpacing(4)
        # what is on screen is asked for a moment after a scroll or resize settles
        self._visible_timer = QtCore.QTimer(self, singleShot=True, interval=30)
        self._visible_timer.timeout.connect(self.request_visible)
        self.verticalScrollBar().valueChanged.connect(lambda _v: self._visible_timer.start())

    def setModel(self, model):
        super().setModel(model)
        model.modelReset.connect(self._visible_timer.start)
        model.rowsInserted.connect(lambda *_: self._visible_timer.start())

    def resizeEvent(self, event):
        super().resizeEvent(event)
        self._fit_side()
        self._visible_timer.start()

    def showEvent(self, event):
        super().showEvent(event)
        self._visible_timer.start()

    def visible_rows(self, ahead: float = 0.5) -> list[int]:
        """Rows on screen, and those within `ahead` of a screen below (read ahead of a scroll)."""
        grid = self.gridSize()
        if not grid.isValid() or self.model() is None or not self.model().rowCount():
            return []
        port = self.viewport().rect()
        rows = set()
        bottom = int(port.bottom() + port.height() * ahead)
        for y in range(port.top() + grid.height() // 2 - grid.height(), bottom + grid.height(), grid.height()):
            for x in range(port.left() + grid.width() // 2, port.right(), grid.width()):
                i = self.indexAt(QtCore.QPoint(x, max(port.top(), min(y, port.bottom()))) if y <= port.bottom()
                                 else QtCore.QPoint(x, port.bottom()))
                if i.isValid():
                    rows.add(i.row())
        if rows and bottom > port.bottom():  # below the screen: the rows that follow, by count
            per_screen = max(rows) - min(rows) + 1
            rows |= set(range(max(rows) + 1, min(self.model().rowCount(), max(rows) + 1 + int(per_screen * ahead))))
        return sorted(rows)

    def request_visible(self) -> None:
        if self.isVisible() and self.model() is not None:
            self.model().request_rows(self.visible_rows())

    def set_thumb_side(self, side: int) -> None:
        """The largest thumbnails shown (smaller when the panel is too low for a whole row)."""
        self._max_side = side
        self._fit_side()

    def _fit_side(self) -> None:
        fm = self.fontMetrics()
        text = int(fm.height() * 3.2)  # two label lines and the gaps
        room = self.viewport().height() - text - 2 * self.spacing()
        side = max(48, min(getattr(self, "_max_side", 128), room))
        if self.iconSize().width() != side:
            self.setIconSize(QtCore.QSize(side, side))
            self.setGridSize(QtCore.QSize(side + fm.height(), side + text))

    def selected_paths(self) -> list[str]:
        rows = sorted(i.row() for i in self.selectionModel().selectedIndexes())
        return [self.model().entries[r].path for r in rows]

    def startDrag(self, _actions):
        paths = self.selected_paths()
        image = self.model().loader.get(paths[0]) if paths else None
        drag_files(self, paths, QtGui.QPixmap.fromImage(image) if image is not None else None)


class GalleryPanel(QtWidgets.QWidget):
    """The gallery: a source (history, output folder or both), a filter, and the grid."""

    reopen_requested = QtCore.Signal(str)  # a PNG whose graph to open

    def __init__(self, history=None, loader: Optional[ThumbnailLoader] = None, output_dir=None, parent=None):
        super().__init__(parent)
        self.history = history
        self.loader = loader or ThumbnailLoader(parent=self)
        self._output_dir = output_dir  # a callable giving the output folder, or None
        self.model = GalleryModel(self.loader, self)
        self.view = GalleryView()
        self.view.setModel(self.model)
        self.view.set_thumb_side(self.loader.side)
        self.view.doubleClicked.connect(lambda i: self.open_large(i.row()))
        self.view.selectionModel().selectionChanged.connect(lambda *_: self._update_buttons())
        self.view.setContextMenuPolicy(QtCore.Qt.CustomContextMenu)
        self.view.customContextMenuRequested.connect(self._context_menu)
        self.source = QtWidgets.QComboBox()
        self.source.addItems(list(SOURCES))
        self.source.setToolTip("which images to show")
        self.source.currentIndexChanged.connect(lambda _i: self.refresh())
        self.filter = QtWidgets.QLineEdit()
        self.filter.setPlaceholderText("Filter: graph, node, seed or file name")
        self.filter.setClearButtonEnabled(True)
        self.filter.textChanged.connect(lambda _t: self._apply_filter())
        from . import theme

        style = self.style()
        self.refresh_btn = tool_button("", "read the folder and history again", self.refresh,
                                        style.standardIcon(QtWidgets.QStyle.SP_BrowserReload))
        self.view_btn = tool_button("View", "open in the large viewer (double-click)", lambda: self.open_large())
        self.compare_btn = tool_button("Compare", "compare two selected images", self.compare)
        self.folder_btn = tool_button("Open folder", "show the file in its folder", self.open_folder,
                                       theme.icon("open"))
        self.graph_btn = tool_button("Reopen graph", "open the graph inside this PNG as an untitled copy",
                                      self._reopen)
        self.count = QtWidgets.QLabel("")
        self.count.setObjectName("Hint")
        top = QtWidgets.QHBoxLayout()
        top.addWidget(self.source)
        top.addWidget(self.filter, 1)
        top.addWidget(self.refresh_btn)
        bottom = QtWidgets.QHBoxLayout()
        for b in (self.view_btn, self.compare_btn, self.folder_btn, self.graph_btn):
            bottom.addWidget(b)
        bottom.addStretch(1)
        bottom.addWidget(self.count)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.addLayout(top)
        lay.addWidget(self.view, 1)
        lay.addLayout(bottom)
        self.all_entries: list[GalleryEntry] = []
        self._loaded = False
        self._dirty = False
        self.windows: list[QtWidgets.QWidget] = []  # viewers opened from here (kept for tests)
        if history is not None:
            history.added.connect(self._on_history_added)
        self._update_buttons()

    # -- what is shown --------------------------------------------------------------------
    def showEvent(self, event):
        super().showEvent(event)
        if not self._loaded or self._dirty:
            self.refresh()

    def output_dir(self) -> Optional[Path]:
        if self._output_dir is not None:
            return Path(self._output_dir())
        from . import session

        return session.default_output_dir()

    def refresh(self) -> None:
        """Read the history and the output folder again (cheap: no image is decoded here)."""
        self._loaded, self._dirty = True, False
        which = self.source.currentText()
        entries: list[GalleryEntry] = []
        if self.history is not None and which != SOURCES[2]:
            entries = entries_from_history(self.history.records())
        if which != SOURCES[1]:
            known = {e.path for e in entries}
            folders = [self.output_dir()] if self.output_dir() is not None else []
            entries = [e for e in entries if os.path.isfile(e.path)]  # history may name deleted files
            for folder in folders:
                entries += [e for e in entries_from_folder(folder) if e.path not in known]
            entries.sort(key=lambda e: e.when, reverse=True)
        else:
            entries = [e for e in entries if os.path.isfile(e.path)]
        self.set_entries(entries)

    def set_entries(self, entries: list[GalleryEntry]) -> None:
        self.all_entries = list(entries)
        self._apply_filter()

    def show_paths(self, paths: list[str]) -> None:
        """Just these files (a run's outputs, from History), labelled from the history."""
        known = {e.path: e for e in entries_from_history(self.history.records())} if self.history else {}
        self._loaded = True
        self.set_entries([known.get(p, GalleryEntry(p)) for p in paths if os.path.isfile(p)])

    def _apply_filter(self) -> None:
        words = self.filter.text().lower().split()
        shown = [e for e in self.all_entries
                 if all(w in (e.label() + " " + Path(e.path).name).lower() for w in words)]
        self.model.set_entries(shown)
        n = len(shown)
        self.count.setText(f"{n} image{'s' if n != 1 else ''}")
        self._update_buttons()

    def _on_history_added(self, _record) -> None:
        if self.isVisible():
            self.refresh()
        else:
            self._dirty = True

    # -- acting on the selection ----------------------------------------------------------
    def _update_buttons(self) -> None:
        paths = self.view.selected_paths()
        self.view_btn.setEnabled(bool(paths))
        self.folder_btn.setEnabled(bool(paths))
        self.compare_btn.setEnabled(len(paths) == 2)
        self.graph_btn.setEnabled(len(paths) == 1 and paths[0].lower().endswith(".png"))

    def select_rows(self, rows: list[int]) -> None:
        sel = self.view.selectionModel()
        sel.clearSelection()
        for r in rows:
            sel.select(self.model.index(r, 0), QtCore.QItemSelectionModel.Select)
        self._update_buttons()

    def open_large(self, row: Optional[int] = None) -> Optional[ImageWindow]:
        if row is None:
            rows = sorted(i.row() for i in self.view.selectionModel().selectedIndexes())
            if not rows:
                return None
            row = rows[0]
        items = [(e.path, e.label().replace("\n", " · "), e.path) for e in self.model.entries]
        window = ImageWindow(items, row, self.window())
        window.show()
        self.windows.append(window)
        return window

    def compare(self):
        rows = sorted(i.row() for i in self.view.selectionModel().selectedIndexes())
        if len(rows) != 2:
            return None
        a, b = (self.model.entries[r] for r in rows)
        window = compare_files(a.path, b.path, (a.label().replace("\n", " · "), b.label().replace("\n", " · ")),
                               self.window())
        self.windows.append(window)
        return window

    def open_folder(self) -> Optional[QtCore.QUrl]:
        paths = self.view.selected_paths()
        return open_folder(paths[0]) if paths else None

    def _reopen(self) -> None:
        paths = self.view.selected_paths()
        if len(paths) == 1:
            self.reopen_requested.emit(paths[0])

    def _context_menu(self, pos) -> None:
        if not self.view.indexAt(pos).isValid():
            return
        menu = QtWidgets.QMenu(self)
        for b in (self.view_btn, self.compare_btn, self.folder_btn, self.graph_btn):
            act = menu.addAction(b.text(), b.click)
            act.setEnabled(b.isEnabled())
        menu.exec(self.view.viewport().mapToGlobal(pos))


def compare_files(a: str, b: str, labels=None, parent=None):
    from .compare import CompareWindow

    window = CompareWindow(a, b, labels or (Path(a).name, Path(b).name), parent)
    window.show()
    return window


def install(window) -> None:
    """Give the main window its History and Gallery docks (tabbed below the canvas, hidden until
    asked for) and record every run that ends. Called once from MainWindow.__init__."""
    from .history import HistoryPanel, HistoryStore, reopen_record

    window.history = HistoryStore(parent=window)
    window.thumbnails = ThumbnailLoader(parent=window)
    window.history_panel = HistoryPanel(window.history, window.thumbnails)
    window.gallery = GalleryPanel(window.history, window.thumbnails)
    window.run_queue.finished.connect(window.history.record_run)

    window.runner.images.connect(lambda nid, images, paths: window.run_queue.add_output(nid, list(paths), len(images)))
    window.history_panel.reopen_requested.connect(lambda r: reopen_record(window, r))
    window.history_panel.outputs_requested.connect(lambda paths: (window.gallery_dock.show(),
                                                                  window.gallery_dock.raise_(),
                                                                  window.gallery.show_paths(paths)))
    window.history_panel.compare_requested.connect(lambda a, b: compare_files(a, b, None, window))
    window.gallery.reopen_requested.connect(window.open_path)
    area = QtCore.Qt.BottomDockWidgetArea
    window.gallery_dock = window._dock("Gallery", window.gallery, area, "GalleryDock")
    window.history_dock = window._dock("History", window.history_panel, area, "HistoryDock")
    window.gallery_dock.hide()
    window.history_dock.hide()
    # tabbed together once both are open (two hidden tabbed docks leave their tab bar painted)
    for dock, other in ((window.gallery_dock, window.history_dock), (window.history_dock, window.gallery_dock)):
        dock.visibilityChanged.connect(lambda shown, d=dock, o=other: _tab_together(window, d, o, shown))


def _tab_together(window, dock, other, shown: bool) -> None:
    if shown and not dock.isFloating() and dock.height() < window.height() * 0.3:
        # a gallery a row high shows nothing: give it a good share of the window's height
        window.resizeDocks([dock], [int(window.height() * 0.4)], QtCore.Qt.Vertical)
    if shown and other.isVisible() and not other.isFloating() and not dock.isFloating() \
            and other not in window.tabifiedDockWidgets(dock):
        window.tabifyDockWidget(other, dock)
        dock.raise_()
