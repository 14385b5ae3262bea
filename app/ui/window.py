"""The main window: canvas in the middle, node palette left, inspector right, image and layout
panels below it. The window builds the panels and wires them together; its jobs live in mixins:
actions.py (actions, menus, toolbar), editing.py (edit commands), files.py (open, save, crash
recovery) and run_control.py (runs and their display)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from PySide6 import QtCore, QtGui, QtWidgets

from nodes import registry

from . import gallery, session
from .actions import WindowActions
from .canvas import GraphCanvas
from .document import Document
from .editing import EditCommands
from .files import FileHandling
from .image_viewer import ImageViewer
from .inspector import Inspector
from .layout_canvas import LayoutPanel
from .palette import NodePalette, NodeSearchPopup
from .resources import APP_NAME, app_icon, default_graph, resources_dir
from .run_control import RunControl
from .run_queue import QueuePanel
from .runner import Runner
from .table_view import TablePanel

# default_graph, resources_dir and app_icon moved to resources.py; importers still find them here.
__all__ = ["MainWindow", "app_icon", "default_graph", "resources_dir"]


class MainWindow(WindowActions, EditCommands, FileHandling, RunControl, QtWidgets.QMainWindow):
    def __init__(self, *, runner: Optional[Runner] = None, autosave: bool = True):
        super().__init__()
        self.setWindowIcon(app_icon())
        self.doc = Document(parent=self)
        self.canvas = GraphCanvas(self.doc, self)
        self.runner = runner or Runner(self)
        self.runner.setParent(self)
        self.runner.set_model_roots(session.all_model_roots())
        self._init_run_state()
        self._closing_ok = False
        self.setAcceptDrops(True)
        self._layout_enlarged = False  # the Layout panel was given most of the right column

        self.setCentralWidget(self.canvas.widget)
        self.palette = NodePalette()
        self.inspector = Inspector(self.doc)
        self.images = ImageViewer()
        self.tables = TablePanel()
        self.layout_panel = LayoutPanel(self.doc)
        self.search = NodeSearchPopup(self)
        self._docks()
        gallery.install(self)  # the History and Gallery docks, and the history of runs
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
            self._fit_columns_on_show = False  # the user's own column widths

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
        self.table_dock = self._dock("Table", self.tables, QtCore.Qt.RightDockWidgetArea, "TableDock")
        self.layout_dock = self._dock("Layout", self.layout_panel, QtCore.Qt.RightDockWidgetArea, "LayoutDock")
        self.queue_panel = QueuePanel(self.run_queue)
        self.queue_panel.cancel_requested.connect(self.cancel_run)
        self.queue_dock = self._dock("Queue", self.queue_panel, QtCore.Qt.RightDockWidgetArea, "QueueDock")
        self.tabifyDockWidget(self.image_dock, self.table_dock)
        self.tabifyDockWidget(self.table_dock, self.layout_dock)
        self.tabifyDockWidget(self.layout_dock, self.queue_dock)
        self.image_dock.raise_()
        em = QtGui.QFontMetrics(self.font()).horizontalAdvance("M")
        self.resizeDocks([self.palette_dock], [self.palette.minimumWidth()], QtCore.Qt.Horizontal)
        self.resizeDocks([self.inspector_dock], [em * 26], QtCore.Qt.Horizontal)
        # the inspector gets the larger share: it is where most edits happen
        self.resizeDocks([self.inspector_dock, self.image_dock], [em * 30, em * 22], QtCore.Qt.Vertical)
        self._fit_columns_on_show = True  # unless a saved arrangement is restored

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if self._fit_columns_on_show:
            # again with the font the theme has set by now: measured at construction the right
            # column came out 473 px, most of a 1280 px window, and the canvas too narrow to
            # frame a graph legibly (the Layout tab's tool row sets its least width, ~400 px)
            self._fit_columns_on_show = False
            em = QtGui.QFontMetrics(self.font()).horizontalAdvance("M")
            self.resizeDocks([self.inspector_dock], [em * 26], QtCore.Qt.Horizontal)

    def _status_bar(self) -> None:
        bar = self.statusBar()
        self.progress = QtWidgets.QProgressBar()
        self.progress.setMaximumWidth(QtGui.QFontMetrics(self.font()).horizontalAdvance("M") * 16)
        self.progress.setVisible(False)
        self.progress.setFormat("%v/%m steps")
        self.run_label = QtWidgets.QLabel("")
        bar.addPermanentWidget(self.run_label)
        bar.addPermanentWidget(self.progress)

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
        r.table.connect(self._on_table)
        r.finished.connect(self._run_finished)

    # -- what the panels show -------------------------------------------------------------
    def _on_selection(self, ids: list[str]) -> None:
        nid = ids[0] if len(ids) == 1 else None
        self.inspector.show_node(nid)
        self._show_node_status(nid)
        if self.is_layout_node(nid):
            self.layout_panel.set_node(nid)
            self.layout_dock.show()
            self.layout_dock.raise_()
            # drawing boxes wants room: give the layout panel most of the column, for as long
            # as a Layout node is selected
            h = self.inspector_dock.height() + self.layout_dock.height()
            if self.layout_dock.height() < h * 0.5:
                self.resizeDocks([self.inspector_dock, self.layout_dock], [int(h * 0.4), int(h * 0.6)],
                                 QtCore.Qt.Vertical)
                self._layout_enlarged = True
        elif self._layout_enlarged:  # another node: the inspector gets its share back
            self._give_column_back()

    def _give_column_back(self) -> None:
        self._layout_enlarged = False
        h = self.inspector_dock.height() + self.layout_dock.height()
        self.resizeDocks([self.inspector_dock, self.image_dock], [int(h * 0.58), int(h * 0.42)],
                         QtCore.Qt.Vertical)

    def is_layout_node(self, nid: Optional[str]) -> bool:
        node = self.doc.graph.nodes.get(nid) if nid else None
        spec = registry.get(node.type) if node else None
        return spec is not None and "boxes" in spec.params

    def _on_replaced(self) -> None:
        """A whole new graph: nothing shown of the old one's runs stays."""
        self._clear_run_state()
        self.run_label.setText("")
        self.run_label.setToolTip("")
        self.images.clear()
        self.tables.clear()
        self.layout_panel.set_image(None)
        # the old graph's Layout node is gone: the inspector gets its share and results their tab
        if self._layout_enlarged:
            self._give_column_back()
        if not self.layout_dock.visibleRegion().isEmpty():
            self.image_dock.raise_()
        self._update_title()

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

    # -- closing --------------------------------------------------------------------------
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
        self.thumbnails.stop()
        self._save_layout()
        event.accept()
