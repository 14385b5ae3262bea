"""The main window: canvas in the middle, node palette left, inspector right, image and layout
panels below it; menus, toolbar, shortcuts; files; runs and their display."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from PySide6 import QtCore, QtGui, QtWidgets

from app.graph import Graph, GraphError, GraphFileError, load, save
from nodes import registry

from . import session
from .canvas import GraphCanvas
from .document import Document, clipboard_mime, clipboard_text
from .image_viewer import ImageViewer
from .inspector import Inspector
from .layout_canvas import LayoutPanel
from .palette import NodePalette, NodeSearchPopup
from .runner import Runner

APP_NAME = "Loomwork"
FILE_FILTER = "Loomwork graphs (*.loom *.png);;Graph files (*.loom);;Loomwork images (*.png);;All files (*)"

STATE_LABELS = {"cached-memory": "cached", "cached-disk": "cached (disk)"}


def resources_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "resources"


def default_graph() -> Graph:
    """The graph a new window shows: the shipped default.loom, or the same chain built here."""
    path = resources_dir() / "graphs" / "default.loom"
    if path.exists():
        try:
            return load(path, registry.get)
        except GraphFileError:
            pass
    g = Graph()
    load_id = g.add_node("LoadModel", {"path": "builtin:shapes-t2i"}, title="Model", pos=(0, 80)).id
    text = g.add_node("TextEncode", {"text": "a red circle on the left and a blue square on the right"},
                      title="Prompt", pos=(260, 0)).id
    neg = g.add_node("TextEncode", {"text": ""}, title="Negative", pos=(260, 140)).id
    empty = g.add_node("EmptyLatent", {"width": 32, "height": 32}, title="Size", pos=(260, 280)).id
    sampler = g.add_node("Sampler", {"steps": 20, "cfg": 4.0}, title="Sampler", pos=(560, 60)).id
    decode = g.add_node("VAEDecode", {}, title="Decode", pos=(820, 60)).id
    out = g.add_node("SaveImage", {"prefix": "loomwork"}, title="Save", pos=(1040, 60)).id
    for wire in ((load_id, "clip", text, "clip"), (load_id, "clip", neg, "clip"),
                 (load_id, "vae", empty, "vae"), (load_id, "model", sampler, "model"),
                 (text, "conditioning", sampler, "positive"), (neg, "conditioning", sampler, "negative"),
                 (empty, "latent", sampler, "latent"), (load_id, "vae", decode, "vae"),
                 (sampler, "latent", decode, "latent"), (decode, "image", out, "image")):
        g.connect(*wire)
    return g


def app_icon() -> QtGui.QIcon:
    icon = QtGui.QIcon()
    for name in ("loomwork.svg", "loomwork.png"):
        p = resources_dir() / "icons" / name
        if p.exists():
            icon.addFile(str(p))
    return icon


class MainWindow(QtWidgets.QMainWindow):
    def __init__(self, *, runner: Optional[Runner] = None, autosave: bool = True):
        super().__init__()
        self.setWindowIcon(app_icon())
        self.doc = Document(parent=self)
        self.canvas = GraphCanvas(self.doc, self)
        self.runner = runner or Runner(self)
        self.runner.setParent(self)
        # Run states stay after a node is deleted, so undo brings the node back as it was.
        self.states: dict[str, str] = {}       # node id -> last run state shown
        self.errors: dict[str, str] = {}
        self._badges: dict[str, tuple] = {}    # node id -> (state, text, tooltip) of the last run
        self.problems: dict[str, list[str]] = {}  # node id -> why it cannot run as drawn
        self.run_started = 0.0
        self._closing_ok = False
        self.setAcceptDrops(True)

        self.setCentralWidget(self.canvas.widget)
        self.palette = NodePalette()
        self.inspector = Inspector(self.doc)
        self.images = ImageViewer()
        self.layout_panel = LayoutPanel(self.doc)
        self.search = NodeSearchPopup(self)
        self._docks()
        self._status_bar()
        self._actions()
        self._menus_and_toolbar()
        self._wire()
        self.autosave = session.Autosave(self.doc, self) if autosave else None
        self._update_title()
        self._initial_size()
        self._restore_layout()

    def _restore_layout(self) -> None:
        """The window size and panel arrangement the user left last time."""
        s = session.settings()
        geometry, state = s.value("window/geometry"), s.value("window/state")
        if geometry is not None:
            self.restoreGeometry(geometry)
        if state is not None:
            self.restoreState(state)

    def _save_layout(self) -> None:
        s = session.settings()
        s.setValue("window/geometry", self.saveGeometry())
        s.setValue("window/state", self.saveState())
        s.sync()

    def _initial_size(self) -> None:
        """1360x820, or less on a small (or scaled-up) screen: the window must fit on it."""
        screen = QtGui.QGuiApplication.primaryScreen()
        avail = screen.availableGeometry() if screen is not None else QtCore.QRect(0, 0, 1600, 1000)
        self.resize(min(1360, int(avail.width() * 0.95)), min(820, int(avail.height() * 0.92)))
        frame = self.frameGeometry()
        frame.moveCenter(avail.center())
        self.move(frame.topLeft())

    # -- construction ---------------------------------------------------------------------
    def _dock(self, title: str, widget: QtWidgets.QWidget, area, name: str) -> QtWidgets.QDockWidget:
        dock = QtWidgets.QDockWidget(title, self)
        dock.setObjectName(name)
        dock.setWidget(widget)
        dock.setFeatures(QtWidgets.QDockWidget.DockWidgetMovable | QtWidgets.QDockWidget.DockWidgetFloatable
                         | QtWidgets.QDockWidget.DockWidgetClosable)
        self.addDockWidget(area, dock)
        return dock

    def _docks(self) -> None:
        self.palette_dock = self._dock("Nodes", self.palette, QtCore.Qt.LeftDockWidgetArea, "NodesDock")
        self.inspector_dock = self._dock("Inspector", self.inspector, QtCore.Qt.RightDockWidgetArea, "InspectorDock")
        self.image_dock = self._dock("Image", self.images, QtCore.Qt.RightDockWidgetArea, "ImageDock")
        self.layout_dock = self._dock("Layout", self.layout_panel, QtCore.Qt.RightDockWidgetArea, "LayoutDock")
        self.tabifyDockWidget(self.image_dock, self.layout_dock)
        self.image_dock.raise_()
        em = QtGui.QFontMetrics(self.font()).horizontalAdvance("M")
        self.resizeDocks([self.palette_dock], [self.palette.minimumWidth()], QtCore.Qt.Horizontal)
        self.resizeDocks([self.inspector_dock], [em * 26], QtCore.Qt.Horizontal)
        # the inspector gets the larger share: it is where most edits happen
        self.resizeDocks([self.inspector_dock, self.image_dock], [em * 30, em * 22], QtCore.Qt.Vertical)

    def _status_bar(self) -> None:
        bar = self.statusBar()
        self.progress = QtWidgets.QProgressBar()
        self.progress.setMaximumWidth(QtGui.QFontMetrics(self.font()).horizontalAdvance("M") * 16)
        self.progress.setVisible(False)
        self.progress.setFormat("%v/%m steps")
        self.run_label = QtWidgets.QLabel("")
        bar.addPermanentWidget(self.run_label)
        bar.addPermanentWidget(self.progress)

    def _action(self, text, slot, shortcut=None, tip="") -> QtGui.QAction:
        a = QtGui.QAction(text, self)
        if shortcut is not None:
            if isinstance(shortcut, list):
                a.setShortcuts(shortcut)
            else:
                a.setShortcut(shortcut)
        a.setToolTip(tip or text.replace("&", ""))
        a.triggered.connect(slot)
        self.addAction(a)
        return a

    def _actions(self) -> None:
        K = QtGui.QKeySequence
        self.act_new = self._action("&New", self.file_new, K.New)
        self.act_open = self._action("&Open…", self.file_open, K.Open)
        self.act_save = self._action("&Save", self.file_save, K.Save)
        self.act_save_as = self._action("Save &As…", self.file_save_as, K("Ctrl+Shift+S"))
        self.act_quit = self._action("&Quit", self.close, K.Quit)
        # Our own undo/redo actions (not createUndoAction): a fixed label keeps the toolbar still;
        # what would be undone goes in the tooltip.
        undo = self.doc.undo
        self.act_undo = self._action("&Undo", undo.undo, [K("Ctrl+Z")])
        self.act_redo = self._action("&Redo", undo.redo, [K("Ctrl+Y"), K("Ctrl+Shift+Z")])
        self.act_undo.setEnabled(False)
        self.act_redo.setEnabled(False)
        undo.canUndoChanged.connect(self.act_undo.setEnabled)
        undo.canRedoChanged.connect(self.act_redo.setEnabled)
        undo.undoTextChanged.connect(lambda t: self.act_undo.setToolTip(f"Undo {t}" if t else "Undo"))
        undo.redoTextChanged.connect(lambda t: self.act_redo.setToolTip(f"Redo {t}" if t else "Redo"))
        self.act_copy = self._action("&Copy", self.copy_selection, K.Copy)
        self.act_cut = self._action("Cu&t", self.cut_selection, K.Cut)
        self.act_paste = self._action("&Paste", self.paste, K.Paste)
        self.act_duplicate = self._action("&Duplicate", self.duplicate_selection, K("Ctrl+D"))
        self.act_delete = self._action("De&lete", self.delete_selection, [K(QtCore.Qt.Key_Delete), K(QtCore.Qt.Key_Backspace)])
        self.act_group = self._action("&Group Selection", self.group_selection, K("Ctrl+G"))
        self.act_select_all = self._action("Select &All", lambda: self.canvas.select(list(self.doc.graph.nodes)), K.SelectAll)
        self.act_add = self._action("Add &Node…", self.show_search, None, "search node types (Tab on the canvas)")
        self.act_frame = self._action("&Frame", self.canvas.frame, K("F"), "fit the selection or the whole graph (F)")
        self.act_run = self._action("&Run", self.run_all, K("Ctrl+Return"), "run every output node (Ctrl+Enter)")
        self.act_run_sel = self._action("Run to &Selected", self.run_selected, K("Ctrl+Shift+Return"),
                                        "run what the selected node needs, and it")
        self.act_cancel = self._action("&Cancel", self.cancel_run, K("Esc"), "stop the run (finished nodes stay cached)")
        self.act_cancel.setEnabled(False)
        self.act_run.setObjectName("RunAction")

    def _menus_and_toolbar(self) -> None:
        mb = self.menuBar()
        m = mb.addMenu("&File")
        m.addActions([self.act_new, self.act_open])
        self.recent_menu = m.addMenu("Open &Recent")
        self.recent_menu.aboutToShow.connect(self._fill_recent)
        self.examples_menu = m.addMenu("&Examples")
        self.examples_menu.aboutToShow.connect(self._fill_examples)
        m.addSeparator()
        m.addActions([self.act_save, self.act_save_as])
        m.addSeparator()
        m.addAction(self.act_quit)
        m = mb.addMenu("&Edit")
        m.addActions([self.act_undo, self.act_redo])
        m.addSeparator()
        m.addActions([self.act_cut, self.act_copy, self.act_paste, self.act_duplicate, self.act_delete])
        m.addSeparator()
        m.addActions([self.act_add, self.act_group, self.act_select_all])
        m = mb.addMenu("&View")
        m.addAction(self.act_frame)
        m.addSeparator()
        for dock in (self.palette_dock, self.inspector_dock, self.image_dock, self.layout_dock):
            m.addAction(dock.toggleViewAction())
        m = mb.addMenu("&Run")
        m.addActions([self.act_run, self.act_run_sel, self.act_cancel])
        m = mb.addMenu("&Help")
        m.addAction("Keyboard and mouse…", self.show_shortcuts)

        tb = self.addToolBar("Main")
        tb.setObjectName("MainToolbar")
        tb.setMovable(False)
        tb.setToolButtonStyle(QtCore.Qt.ToolButtonTextOnly)
        tb.addActions([self.act_new, self.act_open, self.act_save])
        tb.addSeparator()
        tb.addActions([self.act_undo, self.act_redo])
        tb.addSeparator()
        tb.addAction(self.act_add)
        tb.addSeparator()
        tb.addAction(self.act_run)
        run_button = tb.widgetForAction(self.act_run)
        if run_button is not None:
            run_button.setObjectName("RunButton")
        tb.addActions([self.act_run_sel, self.act_cancel])

    def _wire(self) -> None:
        c = self.canvas
        c.message.connect(self.show_message)
        c.selection_changed.connect(self._on_selection)
        c.files_dropped.connect(self._open_dropped)
        c.node_type_dropped.connect(lambda t, pos: self.add_node(t, pos))
        c.tab_pressed.connect(self.show_search)
        c.context_requested.connect(self._context_menu)
        c.node_activated.connect(self._on_activated)
        c.item_created.connect(self._apply_badge)
        self.palette.add_requested.connect(lambda t: self.add_node(t))
        self.search.chosen.connect(lambda t: self.add_node(t, self._search_pos))
        self.inspector.message.connect(self.show_message)
        self.layout_panel.message.connect(self.show_message)
        self.doc.dirty_changed.connect(lambda _d: self._update_title())
        self.doc.inputs_changed.connect(self._mark_stale)
        self._problem_timer = QtCore.QTimer(self, singleShot=True, interval=0)
        self._problem_timer.timeout.connect(self._check_problems)
        self.doc.structure_changed.connect(self._problem_timer.start)
        self.doc.inputs_changed.connect(self._problem_timer.start)
        self.doc.replaced.connect(self._on_replaced)
        r = self.runner
        r.started.connect(self._run_started)
        r.node_state.connect(self._on_node_state)
        r.progress.connect(self._on_progress)
        r.preview.connect(self._on_preview)
        r.images.connect(self._on_images)
        r.finished.connect(self._run_finished)

    SHORTCUTS = [
        ("Tab", "add a node (search)"), ("Drag from a port", "wire; drop on nothing to cancel"),
        ("Drag a wire off an input", "disconnect"), ("Alt+Shift+drag", "cut wires"),
        ("Del / Backspace", "delete the selection"), ("Ctrl+C / Ctrl+V", "copy / paste (also between windows)"),
        ("Ctrl+D", "duplicate"), ("Ctrl+G", "group the selection on a backdrop"),
        ("Ctrl+Z / Ctrl+Y", "undo / redo (every edit, params included)"), ("F", "frame the selection or all"),
        ("Middle drag / Alt+drag", "pan"), ("Wheel", "zoom"),
        ("Ctrl+Enter", "run all outputs"), ("Ctrl+Shift+Enter", "run to the selected node"), ("Esc", "cancel the run"),
        ("Ctrl+S / Ctrl+Shift+S / Ctrl+O", "save / save as / open"),
        ("Double-click a title", "rename the node (or a group)"),
    ]

    def show_shortcuts(self) -> None:
        rows = "".join(f"<tr><td><b>{k}</b>&nbsp;&nbsp;</td><td>{v}</td></tr>" for k, v in self.SHORTCUTS)
        QtWidgets.QMessageBox.information(self, "Keyboard and mouse", f"<table>{rows}</table>")

    # -- messages -------------------------------------------------------------------------
    def show_message(self, text: str, ms: int = 8000) -> None:
        self.statusBar().showMessage(text, ms)

    def _notice(self, title: str, text: str) -> None:
        """A warning that does not block (also at start-up, before the event loop runs)."""
        if QtWidgets.QApplication.platformName() == "offscreen":
            return  # no one to click it: the status bar has the message
        box = QtWidgets.QMessageBox(QtWidgets.QMessageBox.Warning, title, text, QtWidgets.QMessageBox.Ok, self)
        box.setAttribute(QtCore.Qt.WA_DeleteOnClose)
        box.open()

    def _update_title(self) -> None:
        name = Path(self.doc.path).name if self.doc.path else "Untitled"
        self.setWindowTitle(f"{name}[*] — {APP_NAME}")
        self.setWindowModified(self.doc.dirty)

    # -- editing ----------------------------------------------------------------------------
    def add_node(self, type_name: str, pos: Optional[QtCore.QPointF] = None) -> Optional[str]:
        pos = pos or self.canvas.cursor_scene_pos()
        try:
            nid = self.doc.add_node(type_name, (pos.x(), pos.y()))
        except GraphError as exc:
            self.show_message(str(exc))
            return None
        self.canvas.select([nid])
        return nid

    _search_pos: Optional[QtCore.QPointF] = None

    def show_search(self) -> None:
        self._search_pos = self.canvas.cursor_scene_pos()
        v = self.canvas.viewer
        local = v.mapFromScene(self._search_pos)
        self.search.popup(v.mapToGlobal(local))

    def copy_selection(self) -> None:
        ids, groups = self.canvas.selected_ids(), self.canvas.selected_group_ids()
        if not ids and not groups:
            self.show_message("Nothing selected to copy")
            return
        QtWidgets.QApplication.clipboard().setMimeData(clipboard_mime(self.doc.copy_text(ids, groups)))
        self.show_message(f"Copied {len(ids)} node(s)")

    def cut_selection(self) -> None:
        self.copy_selection()
        self.delete_selection()

    def paste(self) -> None:
        text = clipboard_text(QtWidgets.QApplication.clipboard().mimeData())
        if text is None:
            self.show_message("The clipboard holds no Loomwork nodes")
            return
        try:
            pos = self.canvas.cursor_scene_pos()
            new = self.doc.paste_text(text, at=(pos.x(), pos.y()))
        except (GraphFileError, GraphError) as exc:
            self.show_message(f"Cannot paste: {exc}")
            return
        self.canvas.select(new)

    def duplicate_selection(self) -> None:
        new = self.doc.duplicate(self.canvas.selected_ids())
        if new:
            self.canvas.select(new)

    def delete_selection(self) -> None:
        self.doc.remove_nodes(self.canvas.selected_ids(), self.canvas.selected_group_ids())

    def group_selection(self) -> None:
        self.canvas.group_selection()

    def _context_menu(self, global_pos: QtCore.QPoint, scene_pos: QtCore.QPointF) -> None:
        menu = QtWidgets.QMenu(self)
        self._search_pos = scene_pos
        add = menu.addMenu("Add Node")
        by_cat: dict[str, list[str]] = {}
        for name, spec in registry.all_types().items():
            by_cat.setdefault(spec.category, []).append(name)
        for cat in sorted(by_cat):
            sub = add.addMenu(cat)
            for name in sorted(by_cat[cat]):
                sub.addAction(name, lambda n=name, p=scene_pos: self.add_node(n, p))
        menu.addSeparator()
        has_sel = bool(self.canvas.selected_ids() or self.canvas.selected_group_ids())
        for act in (self.act_run_sel, self.act_copy, self.act_paste, self.act_duplicate,
                    self.act_group, self.act_delete):
            menu.addAction(act)
            if act not in (self.act_paste,):
                act.setEnabled(has_sel or act is self.act_paste)
        menu.addSeparator()
        menu.addAction(self.act_frame)
        menu.exec(global_pos)
        for act in (self.act_run_sel, self.act_copy, self.act_duplicate, self.act_group, self.act_delete):
            act.setEnabled(True)
        self.act_run_sel.setEnabled(not self.runner.busy)

    def _on_activated(self, item_id: str) -> None:
        """Double click: a group asks for its title; a node shows its inspector."""
        group = self.doc.group(item_id)
        if group is not None:
            title, ok = QtWidgets.QInputDialog.getText(self, "Group", "Title:", text=group.title)
            if ok:
                self.doc.edit_group(item_id, title=title.strip() or "Group")
        elif item_id in self.doc.graph.nodes:
            self.inspector_dock.show()
            self.inspector_dock.raise_()

    def _on_selection(self, ids: list[str]) -> None:
        nid = ids[0] if len(ids) == 1 else None
        self.inspector.show_node(nid)
        self._show_node_status(nid)
        if nid is not None:
            spec = registry.get(self.doc.graph.nodes[nid].type)
            if spec is not None and "boxes" in spec.params:
                self.layout_panel.set_node(nid)
                self.layout_dock.show()
                self.layout_dock.raise_()
                # drawing boxes wants room: give the layout panel most of the column
                h = self.inspector_dock.height() + self.layout_dock.height()
                if self.layout_dock.height() < h * 0.5:
                    self.resizeDocks([self.inspector_dock, self.layout_dock], [int(h * 0.4), int(h * 0.6)],
                                     QtCore.Qt.Vertical)

    def _show_node_status(self, nid: Optional[str]) -> None:
        if nid is None:
            self.inspector.set_status("")
            return
        state = self.states.get(nid)
        lines = []
        if state:
            lines.append(f"Last run: {STATE_LABELS.get(state, state)}")
            if nid in self.errors:
                lines.append(self.errors[nid])
        for problem in self.problems.get(nid, []):
            lines.append(f"⚠ {problem}")
        self.inspector.set_status("\n".join(lines))

    # -- run state ------------------------------------------------------------------------
    def _mark_stale(self, ids: list[str]) -> None:
        """A changed input (param or wire) makes the node and everything after it out of date."""
        cone = self.doc.graph.downstream(ids)
        if self.runner.busy:  # the running snapshot predates this edit: its results will be stale
            self.edited_during_run |= cone
        for nid in cone:
            if self.states.get(nid) not in (None, "stale", "running", "queued"):
                self.states[nid] = "stale"
                self.errors.pop(nid, None)
                self._set_badge(nid, "stale", "stale", "out of date: an input changed since the last run")

    def _on_replaced(self) -> None:
        self.states.clear()
        self.errors.clear()
        self._badges.clear()
        self.problems = {}
        self._update_title()

    # Badges: a node's run state, unless the graph as drawn cannot run it (then what to fix).
    def _set_badge(self, nid: str, state: str, text: str = "", tip: str = "") -> None:
        self._badges[nid] = (state, text, tip)
        self._apply_badge(nid)

    def _apply_badge(self, nid: str) -> None:
        state, text, tip = self._badges.get(nid, ("idle", "", ""))
        problems = self.problems.get(nid)
        if problems and state not in ("running", "queued", "failed"):
            short = "needs input" if all("is not connected" in m for m in problems) else "invalid"
            self.canvas.set_state(nid, "invalid", short, "\n".join(problems))
        else:
            self.canvas.set_state(nid, state, text, tip)

    def _check_problems(self) -> None:
        """Validate the document (cheap: no torch) and mark nodes that could not run as drawn:
        a required input not wired, a bad param, an unknown type. Coalesced to once per edit."""
        from app.graph import validate

        found: dict[str, list[str]] = {}
        for problem in validate(self.doc.graph, registry.get):
            if problem.node_id in self.doc.graph.nodes:
                node = self.doc.graph.nodes[problem.node_id]
                message = problem.message.removeprefix(f"{node.label}: ")
                found.setdefault(problem.node_id, []).append(message)
        changed = set(found) | set(self.problems)
        self.problems = found
        for nid in changed:
            if nid in self.doc.graph.nodes:
                self._apply_badge(nid)
        if self.inspector.node_id in changed:
            self._show_node_status(self.inspector.node_id)

    def run_all(self) -> None:
        self._start_run(None)

    def run_selected(self) -> None:
        ids = self.canvas.selected_ids()
        if not ids:
            self.show_message("Select a node to run to")
            return
        self._start_run(ids)

    def _start_run(self, targets: Optional[list[str]]) -> None:
        if self.runner.busy:
            self.show_message("A run is in progress; cancel it first")
            return
        path = self.doc.path if self.doc.path and not self.doc.path.lower().endswith(".png") else None
        out_dir = str(Path(path).parent / "output") if path else str(session.default_output_dir())
        self.run_started = time.monotonic()
        self.edited_during_run = set()
        if self.runner.start(self.doc.graph, targets, graph_path=path, output_dir=out_dir):
            self.act_run.setEnabled(False)
            self.act_run_sel.setEnabled(False)
            self.act_cancel.setEnabled(True)
            self.run_label.setText("Running…")

    def cancel_run(self) -> None:
        if self.runner.busy:
            self.runner.cancel()
            self.run_label.setText("Cancelling…")

    def _run_started(self, cone: list[str]) -> None:
        for nid in cone:
            self.errors.pop(nid, None)

    edited_during_run: set = set()

    def _on_node_state(self, nid: str, state: str, info: dict) -> None:
        if nid not in self.doc.graph.nodes:
            return
        self.states[nid] = state
        tip = ""
        text = STATE_LABELS.get(state, state)
        if state == "failed" or (state == "skipped" and info.get("error")):
            self.errors[nid] = info.get("error", "")
            tip = info.get("error", "")
        elif "seconds" in info:
            text = f"done {info['seconds']:.1f}s"
        if state == "running":
            self.progress.setVisible(False)
        if nid in self.edited_during_run and state in ("done", "cached-memory", "cached-disk"):
            state, text, tip = "stale", "stale", "edited during the run: this result is out of date"
            self.states[nid] = state
        self._set_badge(nid, state, text, tip)
        if self.inspector.node_id == nid:
            self._show_node_status(nid)

    def _on_progress(self, nid: str, step: int, total: int) -> None:
        self.progress.setVisible(True)
        self.progress.setRange(0, max(1, total))
        self.progress.setValue(step)
        self._set_badge(nid, "running", f"running {step}/{total}")

    def _on_preview(self, nid: str, image: QtGui.QImage) -> None:
        self.canvas.show_image(nid, image)
        node = self.doc.graph.nodes.get(nid)
        self.images.show_preview(image, node.title or node.type if node else "preview")

    def _on_images(self, nid: str, images: list, paths: list) -> None:
        node = self.doc.graph.nodes.get(nid)
        label = (node.title or node.type) if node else "image"
        if images:
            self.canvas.show_image(nid, images[0])
            self.layout_panel.set_image(images[0])
        for k, image in enumerate(images):
            self.images.add_image(image, label, paths[k] if k < len(paths) else None)

    def _run_finished(self, report) -> None:
        self.act_run.setEnabled(True)
        self.act_run_sel.setEnabled(True)
        self.act_cancel.setEnabled(False)
        self.progress.setVisible(False)
        seconds = time.monotonic() - self.run_started
        if isinstance(report, str):
            self.run_label.setText("Run failed")
            self.show_message(f"Run failed: {report}", 15000)
            return
        counts: dict[str, int] = {}
        for rep in report.nodes.values():
            counts[rep.status] = counts.get(rep.status, 0) + 1
        ran = counts.get("done", 0)
        cached = counts.get("cached-memory", 0) + counts.get("cached-disk", 0)
        failed = [r for r in report.nodes.values() if r.status == "failed"]
        if report.cancelled:
            summary = f"Cancelled after {seconds:.1f} s ({ran} node(s) finished and stay cached)"
            short = "Cancelled"
        elif failed:
            first = failed[0]
            summary = f"{len(failed)} node(s) failed: {first.title}: {first.error}"
            short = f"{len(failed)} failed"
        else:
            summary = f"Done in {seconds:.1f} s: {ran} ran, {cached} cached"
            short = f"Last run {seconds:.1f} s"
        self.run_label.setText(short)
        self.run_label.setToolTip(summary)
        self.show_message(summary, 15000)
        if self.inspector.node_id:
            self._show_node_status(self.inspector.node_id)

    # -- files ----------------------------------------------------------------------------
    def maybe_save(self) -> bool:
        """Ask about unsaved changes; False means the user cancelled."""
        if not self.doc.dirty:
            return True
        answer = QtWidgets.QMessageBox.question(
            self, APP_NAME, "The graph has unsaved changes. Save them first?",
            QtWidgets.QMessageBox.Save | QtWidgets.QMessageBox.Discard | QtWidgets.QMessageBox.Cancel,
            QtWidgets.QMessageBox.Save)
        if answer == QtWidgets.QMessageBox.Save:
            return self.file_save()
        return answer == QtWidgets.QMessageBox.Discard

    def file_new(self) -> None:
        if self.maybe_save():
            self.doc.replace(default_graph(), None)

    def file_open(self) -> None:
        if not self.maybe_save():
            return
        start = str(Path(self.doc.path).parent) if self.doc.path else ""
        path, _ = QtWidgets.QFileDialog.getOpenFileName(self, "Open graph", start, FILE_FILTER)
        if path:
            self.open_path(path, ask=False)

    def open_path(self, path: str, *, ask: bool = True) -> bool:
        """Open a .loom file or a Loomwork PNG. A file that cannot be read leaves the current
        graph as it was and says why."""
        if ask and not self.maybe_save():
            return False
        try:
            graph = load(path, registry.get)
        except GraphFileError as exc:
            self.show_message(f"Cannot open: {exc}", 15000)
            self._notice("Cannot open graph", str(exc))
            return False
        is_png = path.lower().endswith(".png")
        # A graph opened from a PNG saves as a new .loom, never over the image.
        self.doc.replace(graph, None if is_png else str(Path(path).resolve()))
        if not is_png:
            session.add_recent(path)
        self.show_message(f"Opened {path}")
        return True

    def file_save(self) -> bool:
        if not self.doc.path:
            return self.file_save_as()
        return self._save_to(self.doc.path)

    def file_save_as(self) -> bool:
        start = self.doc.path or str(Path.home() / "untitled.loom")
        path, _ = QtWidgets.QFileDialog.getSaveFileName(self, "Save graph", start, "Loomwork graphs (*.loom)")
        if not path:
            return False
        if not path.lower().endswith(".loom"):
            path += ".loom"
        return self._save_to(path)

    def _save_to(self, path: str) -> bool:
        try:
            save(self.doc.graph, path)
        except GraphFileError as exc:
            self.show_message(f"Cannot save: {exc}", 15000)
            self._notice("Cannot save", str(exc))
            return False
        self.doc.mark_saved(str(Path(path).resolve()))
        session.add_recent(path)
        if self.autosave is not None:
            self.autosave.discard()
        self._update_title()
        self.show_message(f"Saved {path}")
        return True

    def _fill_recent(self) -> None:
        self.recent_menu.clear()
        items = session.recent_files()
        if not items:
            a = self.recent_menu.addAction("(none)")
            a.setEnabled(False)
        for p in items:
            self.recent_menu.addAction(p, lambda p=p: self.open_path(p))

    def example_graphs(self) -> list[Path]:
        return sorted((resources_dir() / "graphs").glob("*.loom"))

    def _fill_examples(self) -> None:
        self.examples_menu.clear()
        for p in self.example_graphs():
            self.examples_menu.addAction(p.stem.replace("-", " "), lambda p=p: self.open_example(p))

    def open_example(self, path: Path) -> bool:
        """Examples open as untitled copies: Save asks where, the shipped file stays as it is."""
        if not self.open_path(str(path)):
            return False
        self.doc.path = None
        self._update_title()
        return True

    def offer_recovery(self) -> bool:
        """After a crash: offer the newest autosave left behind. True if one was opened."""
        found = session.find_recoveries()
        if not found:
            return False
        rec = found[0]
        where = rec.original_path or "an untitled graph"
        answer = QtWidgets.QMessageBox.question(
            self, "Recover unsaved work?",
            f"Loomwork did not close normally. Recover the unsaved changes to {where} "
            f"autosaved at {rec.when}?",
            QtWidgets.QMessageBox.Yes | QtWidgets.QMessageBox.No, QtWidgets.QMessageBox.Yes)
        opened = False
        if answer == QtWidgets.QMessageBox.Yes:
            try:
                graph = load(rec.graph_file, registry.get)
                self.doc.replace(graph, rec.original_path)
                # Recovered edits are not on disk: mark them unsaved so closing asks.
                self.doc.undo.resetClean()
                self._update_title()
                opened = True
            except GraphFileError as exc:
                self.show_message(f"Cannot recover: {exc}")
        for r in found:
            r.discard()
        return opened

    def _open_dropped(self, paths: list) -> None:
        for p in paths:
            if p.lower().endswith((".loom", ".png", ".json")):
                self.open_path(p)
                return
        self.show_message("Drop a .loom file or a PNG saved by Loomwork to open it")

    def dragEnterEvent(self, event):
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event):
        paths = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if paths:
            event.acceptProposedAction()
            self._open_dropped(paths)

    def closeEvent(self, event):
        if not self._closing_ok and not self.maybe_save():
            event.ignore()
            return
        if self.runner.busy:
            self.runner.cancel()
            self.runner.wait(5.0)
        if self.autosave is not None:
            self.autosave.timer.stop()
            self.autosave.discard()
        self._save_layout()
        event.accept()
