"""The main window's actions (with their shortcuts), menus, toolbar and the shortcuts help.

A mixin of MainWindow: the actions call slots of the window and of its other parts (files,
editing, run control) and of its doc and canvas; act_* are the window's attributes.
"""

from __future__ import annotations

from PySide6 import QtCore, QtGui, QtWidgets

from .batch_dialog import open_batch_dialog


class WindowActions:
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
        self.act_preferences = self._action("&Preferences…", self.edit_preferences, K.Preferences,
                                            "models and output folders, cache, device, memory, scale")
        self.act_model_folders = self._action("&Models Folders…", self.edit_model_folders, None,
                                              "the folders searched for models (ComfyUI, A1111 or your own)")
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
        self.act_run = self._action("&Run", self.run_all, K("Ctrl+Return"),
                                    "run every output node (Ctrl+Enter); while a run goes on, queue another")
        self.act_run_sel = self._action("Run to &Selected", self.run_selected, K("Ctrl+Shift+Return"),
                                        "run what the selected node needs, and it")
        self.act_cancel = self._action("&Cancel", self.cancel_run, K("Esc"), "stop the run (finished nodes stay cached)")
        self.act_cancel.setEnabled(False)
        self.act_run.setObjectName("RunAction")
        self._graph_edit_actions()
        self.act_gallery = self._action("&Gallery", lambda: self._show_dock(self.gallery_dock), K("Ctrl+Shift+G"),
                                        "the gallery: images of the output folder and past runs (Ctrl+Shift+G)")
        self.act_history = self._action("&History", lambda: self._show_dock(self.history_dock), K("Ctrl+H"),
                                        "past runs: reopen a run's graph exactly, see its images (Ctrl+H)")
        self.act_compare = self._action("&Compare Last Two", self.compare_last_two, None,
                                        "compare the two latest results side by side or with an A/B slider")
        self._set_icons()

    ICONS = {"act_new": "new", "act_open": "open", "act_save": "save", "act_undo": "undo", "act_redo": "redo",
             "act_add": "add", "act_frame": "frame", "act_run": "run", "act_run_sel": "run-selected",
             "act_cancel": "cancel", "act_gallery": "gallery", "act_history": "history",
             "act_compare": "compare", "act_preferences": "preferences"}

    def _set_icons(self) -> None:
        """Icons in the theme's colours (drawn again when the theme changes)."""
        from . import theme

        for attr, name in self.ICONS.items():
            getattr(self, attr).setIcon(theme.icon(name))

    def _show_dock(self, dock) -> None:
        dock.show()
        dock.raise_()

    def compare_last_two(self) -> None:
        from .compare import CompareWindow

        if len(self.images.images) < 2:
            self.show_message("Compare needs two results: run twice (or pick two in the gallery)")
            return
        (a, la, _pa), (b, lb, _pb) = self.images.images[1], self.images.images[0]
        CompareWindow(a, b, (f"{la} (older)", f"{lb} (latest)"), self).show()  # it adds "A · "/"B · "

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
        m.addAction(self.act_model_folders)
        m.addSeparator()
        m.addAction(self.act_quit)
        m = mb.addMenu("&Edit")
        m.addActions([self.act_undo, self.act_redo])
        m.addSeparator()
        m.addActions([self.act_cut, self.act_copy, self.act_paste, self.act_duplicate, self.act_delete])
        m.addSeparator()
        m.addActions([self.act_add, self.act_group, self.act_select_all])
        m.addSeparator()
        m.addActions([self.act_bypass, self.act_mute, self.act_collapse, self.act_tidy])
        m.addSeparator()
        m.addAction(self.act_preferences)
        m = mb.addMenu("&View")
        m.addActions([self.act_frame, self.act_minimap])
        m.addSeparator()
        for dock in (self.palette_dock, self.inspector_dock, self.image_dock, self.layout_dock, self.queue_dock,
                     self.gallery_dock, self.history_dock):
            m.addAction(dock.toggleViewAction())
        m.addSeparator()
        m.addActions([self.act_gallery, self.act_history, self.act_compare])
        m = mb.addMenu("&Run")
        m.addActions([self.act_run, self.act_run_sel, self.act_cancel])
        m.addAction("&Batch…", lambda: open_batch_dialog(self))
        m = mb.addMenu("&Help")
        m.addAction("Keyboard and mouse…", self.show_shortcuts)

        tb = self.addToolBar("Main")
        tb.setObjectName("MainToolbar")
        tb.setMovable(False)
        # icons with tooltips; Run keeps its word beside the icon (it is the one button to find)
        tb.setToolButtonStyle(QtCore.Qt.ToolButtonIconOnly)
        side = round(QtGui.QFontMetrics(self.font()).height() * 1.25)
        tb.setIconSize(QtCore.QSize(side, side))
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
            run_button.setToolButtonStyle(QtCore.Qt.ToolButtonTextBesideIcon)
        self.batch_count = QtWidgets.QSpinBox()
        self.batch_count.setRange(1, 999)
        self.batch_count.setPrefix("× ")
        self.batch_count.setToolTip("batch count: Run queues this many runs, each with the seeds one higher")
        self.batch_count.setObjectName("BatchCount")
        self.batch_count.setMaximumWidth(self.fontMetrics().horizontalAdvance("× 999") * 2)
        tb.addWidget(self.batch_count)
        tb.addActions([self.act_run_sel, self.act_cancel])
        tb.addSeparator()
        tb.addActions([self.act_frame, self.act_gallery, self.act_history, self.act_compare])
        spacer = QtWidgets.QWidget()
        spacer.setSizePolicy(QtWidgets.QSizePolicy.Expanding, QtWidgets.QSizePolicy.Preferred)
        tb.addWidget(spacer)
        tb.addAction(self.act_preferences)
        for act in tb.actions():  # the shortcut in every tooltip, as peers show it
            keys = act.shortcut().toString(QtGui.QKeySequence.NativeText)
            if keys and keys not in act.toolTip():
                act.setToolTip(f"{act.toolTip()} ({keys})")
        self.toolbar = tb


    # -- shortcuts help -------------------------------------------------------------------
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
        ("Ctrl+B / Ctrl+M", "bypass / mute the selection"), ("Alt+C", "collapse or expand the selection"),
        ("Ctrl+Shift+L", "tidy up the selection (or all)"), ("Right-click a wire", "add a reroute dot"),
        ("Drag a number on a node", "change it; double-click to type"),
    ]

    def edit_model_folders(self) -> None:
        from . import session
        from .model_picker import ModelFoldersDialog

        dialog = ModelFoldersDialog(self)
        if dialog.exec() == QtWidgets.QDialog.Accepted:
            self.runner.set_model_roots(session.all_model_roots())

    def edit_preferences(self) -> None:
        from .preferences import PreferencesDialog

        PreferencesDialog(self.runner, self).exec()

    def show_shortcuts(self) -> None:
        rows = "".join(f"<tr><td><b>{k}</b>&nbsp;&nbsp;</td><td>{v}</td></tr>" for k, v in self.SHORTCUTS)
        QtWidgets.QMessageBox.information(self, "Keyboard and mouse", f"<table>{rows}</table>")
