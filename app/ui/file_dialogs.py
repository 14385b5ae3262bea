"""File dialogs that read on the dark theme.

Where the platform has no native dialog (Linux without a desktop theme, Xvfb), Qt draws its own,
with the style's standard icons, which are dark grey on our dark background, and columns sized
for a small window. These helpers give that dialog light folder/file icons and room for its
columns; a native dialog (Windows, macOS, a desktop's portal) ignores both and looks as usual.
"""

from __future__ import annotations

from typing import Optional

from PySide6 import QtCore, QtGui, QtWidgets

from .theme import icons_dir

DIALOG_SIZE = (880, 540)


class LightIcons(QtWidgets.QFileIconProvider):
    """Our own light outline icons for folders and files (everything else as Qt gives it)."""

    def __init__(self):
        super().__init__()
        self._folder = QtGui.QIcon(f"{icons_dir()}/folder.svg")
        self._file = QtGui.QIcon(f"{icons_dir()}/file.svg")

    def icon(self, what):
        if isinstance(what, QtCore.QFileInfo):
            return self._folder if what.isDir() else self._file
        if what in (QtWidgets.QFileIconProvider.Folder, QtWidgets.QFileIconProvider.Drive,
                    QtWidgets.QFileIconProvider.Computer, QtWidgets.QFileIconProvider.Network):
            return self._folder
        return self._file


_ICONS: Optional[LightIcons] = None


def make_dialog(parent, title: str, start: str, filters: str, mode: str) -> QtWidgets.QFileDialog:
    """A file dialog for `mode` "open", "save" or "folder", set up to read on the dark theme."""
    global _ICONS
    dialog = QtWidgets.QFileDialog(parent, title, start, filters)
    if mode == "save":
        dialog.setAcceptMode(QtWidgets.QFileDialog.AcceptSave)
    elif mode == "folder":
        dialog.setFileMode(QtWidgets.QFileDialog.Directory)
        dialog.setOption(QtWidgets.QFileDialog.ShowDirsOnly, True)
    else:
        dialog.setFileMode(QtWidgets.QFileDialog.ExistingFile)
    if _ICONS is None:
        _ICONS = LightIcons()
    dialog.setIconProvider(_ICONS)
    dialog.resize(*DIALOG_SIZE)
    # Qt's own dialog: its navigation buttons' standard icons are dark, so they sit on light chips
    dialog.setStyleSheet("QFileDialog QToolButton { background: #b9c0cc; border-radius: 3px; "
                         "margin: 1px; padding: 2px; }")
    for view in dialog.findChildren(QtWidgets.QTreeView):  # the name takes the room, the rest fit
        header = view.header()
        header.setStretchLastSection(False)
        header.setSectionResizeMode(0, QtWidgets.QHeaderView.Stretch)
        for column in range(1, header.count()):
            header.setSectionResizeMode(column, QtWidgets.QHeaderView.ResizeToContents)
    return dialog


def _run(parent, title: str, start: str, filters: str, mode: str) -> str:
    dialog = make_dialog(parent, title, start, filters, mode)
    if dialog.exec() != QtWidgets.QDialog.Accepted or not dialog.selectedFiles():
        return ""
    return dialog.selectedFiles()[0]


def open_file(parent, title: str, start: str = "", filters: str = "") -> str:
    return _run(parent, title, start, filters, "open")


def save_file(parent, title: str, start: str = "", filters: str = "") -> str:
    return _run(parent, title, start, filters, "save")


def choose_folder(parent, title: str, start: str = "") -> str:
    return _run(parent, title, start, "", "folder")
