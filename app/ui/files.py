"""Files for the main window: new, open (also recent, examples, dropped files), save, save as,
the unsaved-changes question, and recovering an autosave left behind by a crash.

A mixin of MainWindow: it uses the window's doc, autosave, show_message, _notice and
_update_title.
"""

from __future__ import annotations

from pathlib import Path

from PySide6 import QtWidgets

from app.graph import GraphFileError, load, save
from nodes import registry

from . import file_dialogs, session
from .resources import APP_NAME, default_graph, resources_dir

FILE_FILTER = "Loomwork graphs (*.loom *.png);;Graph files (*.loom);;Loomwork images (*.png);;All files (*)"


class FileHandling:
    # -- opening and saving ---------------------------------------------------------------
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
        path = file_dialogs.open_file(self, "Open graph", start, FILE_FILTER)
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
        shipped = _inside(Path(path), resources_dir())
        # A graph opened from a PNG saves as a new .loom, never over the image; one shipped with
        # the app opens as an untitled copy (Save asks where; outputs go to the output folder).
        self.doc.replace(graph, None if is_png or shipped else str(Path(path).resolve()))
        if not (is_png or shipped):
            session.add_recent(path)
        self._update_title()
        self.show_message(f"Opened a copy of {path}" if shipped else f"Opened {path}")
        return True

    def file_save(self) -> bool:
        if not self.doc.path:
            return self.file_save_as()
        return self._save_to(self.doc.path)

    def file_save_as(self) -> bool:
        start = self.doc.path or str(Path.home() / "untitled.loom")
        path = file_dialogs.save_file(self, "Save graph", start, "Loomwork graphs (*.loom)")
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

    # -- recent files and examples --------------------------------------------------------
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
        return self.open_path(str(path))

    # -- crash recovery -------------------------------------------------------------------
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

    # -- dropped files --------------------------------------------------------------------
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


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False
