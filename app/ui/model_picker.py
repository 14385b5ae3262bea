"""Models from the models folders in the app: a searchable picker for a node's model path, and
the dialog that sets which folders are searched.

The list comes from kernels.model_folders.scan (headers only, never a tensor or a pickle), run
on a worker thread so a large or slow folder never freezes the window.
"""

from __future__ import annotations

import os
import threading
from typing import Optional, Sequence

from PySide6 import QtCore, QtWidgets

from . import file_dialogs, session

COLUMNS = ("Name", "Kind", "Family", "Note")


class _ScanResults(QtCore.QObject):
    done = QtCore.Signal(int, list, str)  # scan number, [ModelEntry], error text


def scan_in_background(roots: Sequence[str], kinds: Sequence[str], results: _ScanResults, number: int) -> None:
    """Scan `roots` on a worker thread; `results.done` fires on the Qt thread with `number`."""
    def work():
        from kernels.model_folders import scan

        try:
            entries, error = [e for e in scan(roots) if not kinds or e.kind in kinds], ""
        except Exception as exc:  # noqa: BLE001 (an unreadable folder is shown, not raised)
            entries, error = [], f"{type(exc).__name__}: {exc}"
        try:
            results.done.emit(number, entries, error)
        except RuntimeError:  # the dialog closed before the scan ended
            pass

    threading.Thread(target=work, name="loomwork-model-scan", daemon=True).start()


class ModelPicker(QtWidgets.QDialog):
    """Choose a model of `kinds` by name; `chosen()` is the `ckpt:NAME` to put in the path."""

    def __init__(self, kinds: Sequence[str], current: str = "", parent=None):
        super().__init__(parent)
        self.setWindowTitle("Choose a model")
        self.resize(720, 460)
        self.kinds = tuple(kinds)
        self.entries: list = []
        self.filter = QtWidgets.QLineEdit()
        self.filter.setPlaceholderText("search by name, kind or family")
        self.filter.setClearButtonEnabled(True)
        self.filter.textChanged.connect(self._apply_filter)
        self.table = QtWidgets.QTreeWidget()
        self.table.setHeaderLabels(list(COLUMNS))
        self.table.setRootIsDecorated(False)
        self.table.setSortingEnabled(True)
        self.table.itemDoubleClicked.connect(lambda *_: self.accept())
        self.status = QtWidgets.QLabel("")
        self.status.setObjectName("Hint")
        self.status.setWordWrap(True)
        folders = QtWidgets.QPushButton("Models Folders…")
        folders.clicked.connect(self._edit_folders)
        buttons = QtWidgets.QDialogButtonBox(QtWidgets.QDialogButtonBox.Ok | QtWidgets.QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        buttons.addButton(folders, QtWidgets.QDialogButtonBox.ResetRole)
        self.ok = buttons.button(QtWidgets.QDialogButtonBox.Ok)
        lay = QtWidgets.QVBoxLayout(self)
        lay.addWidget(self.filter)
        lay.addWidget(self.table, 1)
        lay.addWidget(self.status)
        lay.addWidget(buttons)
        self._current = current[len("ckpt:"):] if current.startswith("ckpt:") else ""
        self._results = _ScanResults(self)
        self._results.done.connect(self._scanned)
        self._scans = 0  # only the latest scan's results are shown
        self.scanning = False
        self.rescan()

    # -- the list -----------------------------------------------------------------------------
    def rescan(self) -> None:
        roots = session.all_model_roots()
        self.table.clear()
        self.ok.setEnabled(False)
        if not roots:
            self.status.setText("No models folders yet: add your ComfyUI or A1111 folder (or any "
                                "folder of models) with Models Folders….")
            return
        self.scanning = True
        self._scans += 1
        self.status.setText(f"Looking in {len(roots)} folder{'s' if len(roots) != 1 else ''}…")
        scan_in_background(roots, self.kinds, self._results, self._scans)

    def _scanned(self, number: int, entries: list, error: str) -> None:
        if number != self._scans:
            return
        self.scanning = False
        self.entries = entries
        self.table.setSortingEnabled(False)
        self.table.clear()
        for e in entries:
            item = QtWidgets.QTreeWidgetItem([e.name, e.kind, e.family, e.note])
            item.setToolTip(0, e.path)
            item.setData(0, QtCore.Qt.UserRole, e.name)
            self.table.addTopLevelItem(item)
            if e.name == self._current:
                self.table.setCurrentItem(item)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(0, QtCore.Qt.AscendingOrder)
        for col in range(len(COLUMNS) - 1):
            self.table.resizeColumnToContents(col)
        if error:
            self.status.setText(f"Could not list the models folders: {error}")
        elif not entries:
            self.status.setText(f"No {' or '.join(self.kinds) or 'models'} in: "
                                + "; ".join(session.all_model_roots()))
        else:
            self.status.setText(f"{len(entries)} found. Graphs store the name, so they move between "
                                f"machines with the same models.")
        self._apply_filter(self.filter.text())

    def _apply_filter(self, text: str) -> None:
        words = text.lower().split()
        first_shown = None
        for i in range(self.table.topLevelItemCount()):
            item = self.table.topLevelItem(i)
            hay = " ".join(item.text(c) for c in range(len(COLUMNS))).lower()
            hidden = not all(w in hay for w in words)
            item.setHidden(hidden)
            if not hidden and first_shown is None:
                first_shown = item
        current = self.table.currentItem()
        if (current is None or current.isHidden()) and first_shown is not None:
            self.table.setCurrentItem(first_shown)
        self.ok.setEnabled(first_shown is not None)

    def chosen(self) -> Optional[str]:
        item = self.table.currentItem()
        if item is None or item.isHidden():
            return None
        return "ckpt:" + item.data(0, QtCore.Qt.UserRole)

    def _edit_folders(self) -> None:
        if ModelFoldersDialog(self).exec() == QtWidgets.QDialog.Accepted:
            self.rescan()


class ModelFoldersList(QtWidgets.QWidget):
    """The models folders as an editable list (Add…, Remove), for the dialog and Preferences."""

    def __init__(self, folders: Sequence[str] = (), parent=None):
        super().__init__(parent)
        self.list = QtWidgets.QListWidget()
        for folder in folders:
            self.list.addItem(folder)
        add = QtWidgets.QPushButton("Add…")
        add.clicked.connect(self._add)
        self.remove = QtWidgets.QPushButton("Remove")
        self.remove.clicked.connect(self._remove)
        side = QtWidgets.QVBoxLayout()
        side.addWidget(add)
        side.addWidget(self.remove)
        side.addStretch(1)
        row = QtWidgets.QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.list, 1)
        row.addLayout(side)

    def folders(self) -> list[str]:
        return [self.list.item(i).text() for i in range(self.list.count())]

    def add_folder(self, folder: str) -> None:
        if folder and folder not in self.folders():
            self.list.addItem(folder)

    def _add(self) -> None:
        self.add_folder(file_dialogs.choose_folder(self, "Add a models folder", os.path.expanduser("~")))

    def _remove(self) -> None:
        for item in self.list.selectedItems():
            self.list.takeItem(self.list.row(item))


class ModelFoldersDialog(QtWidgets.QDialog):
    """The models folders: a ComfyUI or A1111 install (or its `models` folder), or any folder of models."""

    changed = QtCore.Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Models Folders")
        self.resize(620, 360)
        intro = QtWidgets.QLabel("Folders searched for models, in order. A ComfyUI or A1111 install "
                                 "(or its models folder) is read in its own layout.")
        intro.setWordWrap(True)
        self.editor = ModelFoldersList(session.model_folders())
        from kernels.model_folders import ENV_VAR, roots_from_env

        env = roots_from_env()
        note = QtWidgets.QLabel(f"Also searched, from {ENV_VAR}: " + "; ".join(env) if env else "")
        note.setObjectName("Hint")
        note.setWordWrap(True)
        buttons = QtWidgets.QDialogButtonBox(QtWidgets.QDialogButtonBox.Ok | QtWidgets.QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QtWidgets.QVBoxLayout(self)
        lay.addWidget(intro)
        lay.addWidget(self.editor, 1)
        lay.addWidget(note)
        lay.addWidget(buttons)

    def folders(self) -> list[str]:
        return self.editor.folders()

    def add_folder(self, folder: str) -> None:
        self.editor.add_folder(folder)

    def accept(self) -> None:
        session.set_model_folders(self.folders())
        self.changed.emit()
        super().accept()
