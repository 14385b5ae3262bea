"""Editing commands of the main window: add a node (palette, search, drop, context menu),
copy / cut / paste through the system clipboard, duplicate, delete, group, and double-click.

A mixin of MainWindow: every change goes through the window's doc (so it is undoable); the
canvas says what is selected and where the cursor is.
"""

from __future__ import annotations

from typing import Optional

from PySide6 import QtCore, QtWidgets

from app.graph import GraphError, GraphFileError
from nodes import registry

from .document import clipboard_mime, clipboard_text


class EditCommands:
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
