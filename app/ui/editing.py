"""Editing commands of the main window: add a node (palette, search, drop, context menu),
copy / cut / paste through the system clipboard, duplicate, delete, group, double-click, and
bypass / mute / collapse / colour / tidy of the selection and reroutes on wires.

A mixin of MainWindow: every change goes through the window's doc (so it is undoable); the
canvas says what is selected and where the cursor is.
"""

from __future__ import annotations

from typing import Optional

from PySide6 import QtCore, QtGui, QtWidgets

from app.graph import GraphError, GraphFileError
from nodes import registry

from .document import clipboard_mime, clipboard_text

# Node colours offered by the context menu (dark enough for light text on them).
NODE_COLORS = {"Red": "#7a3b3b", "Orange": "#7a5a32", "Yellow": "#6e6a30", "Green": "#3b6a45",
               "Teal": "#2f6468", "Blue": "#34507a", "Purple": "#5a3f78", "Grey": "#4a4e57"}


class EditCommands:
    def _graph_edit_actions(self) -> None:
        """Bypass, mute, collapse, tidy and the minimap toggle (shortcuts work on the canvas)."""
        K = QtGui.QKeySequence
        self.act_bypass = self._action("&Bypass", lambda: self.toggle_mode("bypass"), K("Ctrl+B"),
                                       "bypass the selected nodes: they pass their inputs on (Ctrl+B)")
        self.act_mute = self._action("&Mute", lambda: self.toggle_mode("mute"), K("Ctrl+M"),
                                     "mute the selected nodes: they run nothing, what reads them is skipped (Ctrl+M)")
        self.act_collapse = self._action("Co&llapse", self.toggle_collapsed, K("Alt+C"),
                                         "fold the selected nodes to their titles, or unfold them (Alt+C)")
        self.act_tidy = self._action("&Tidy Up", self.canvas.tidy_selection, K("Ctrl+Shift+L"),
                                     "lay the selected nodes (or all) out in columns by depth")
        self.act_minimap = self._action("&Minimap", lambda on: self.canvas.minimap.setVisible(on), None,
                                        "the whole graph in the canvas corner")
        self.act_minimap.setCheckable(True)
        self.act_minimap.setChecked(True)

    def toggle_mode(self, mode: str) -> None:
        ids = self.canvas.selected_ids()
        if not ids:
            self.show_message(f"Select nodes to {mode} first")
            return
        nodes = self.doc.graph.nodes
        self.doc.set_mode(ids, "" if all(nodes[i].mode == mode for i in ids) else mode)

    def toggle_collapsed(self) -> None:
        ids = self.canvas.selected_ids()
        nodes = self.doc.graph.nodes
        fold = not all(nodes[i].meta.get("collapsed") for i in ids)
        self.doc.set_meta_many(ids, "collapsed", True if fold else None)

    def set_color(self, color: Optional[str]) -> None:
        self.doc.set_meta_many(self.canvas.selected_ids(), "color", color)

    def _node_menu(self, menu: QtWidgets.QMenu) -> None:
        for act in (self.act_bypass, self.act_mute, self.act_collapse):
            menu.addAction(act)
        colors = menu.addMenu("Colour")
        for name, value in NODE_COLORS.items():
            pix = QtGui.QPixmap(12, 12)
            pix.fill(QtGui.QColor(value))
            colors.addAction(QtGui.QIcon(pix), name, lambda v=value: self.set_color(v))
        colors.addSeparator()
        colors.addAction("Default", lambda: self.set_color(None))

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
        under = self.canvas.node_at(scene_pos)
        if under is not None and under not in self.canvas.selected_ids():
            self.canvas.select([under])  # right-click a node: the menu is about it
        wire = self.canvas.wire_at(scene_pos) if under is None else None
        if wire is not None:
            menu.addAction("Add Reroute Here", lambda: self.doc.insert_reroute(wire, (scene_pos.x() - 13, scene_pos.y() - 9)))
            menu.addSeparator()
        if self.canvas.selected_ids():
            self._node_menu(menu)
            menu.addSeparator()
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
        menu.addActions([self.act_tidy, self.act_frame])
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
