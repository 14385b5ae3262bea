"""Adding nodes: a side list grouped by category, and a Tab popup that searches as you type.

Both are built from the node registry's declarations (importing it does not import torch).
"""

from __future__ import annotations

from typing import Optional

from PySide6 import QtCore, QtGui, QtWidgets

from nodes import registry

TYPE_ROLE = QtCore.Qt.UserRole + 1


def node_matches(name: str, spec, words: list[str]) -> bool:
    hay = f"{name} {spec.label()} {spec.category} {spec.doc()}".lower()
    return all(w in hay for w in words)


def rank(name: str, query: str) -> tuple:
    """Names that start with the query first, then names containing it, then doc matches."""
    n, q = name.lower(), query.lower().strip()
    return (not n.startswith(q), q not in n, name)


NODE_TYPE_MIME = "application/x-loomwork-node-type"  # same as ngqt_compat's (no Qt-canvas import here)


class PaletteTree(QtWidgets.QTreeWidget):
    """Node types can be dragged from here onto the canvas."""

    def mimeData(self, items):
        mime = QtCore.QMimeData()
        names = [i.data(0, TYPE_ROLE) for i in items if i.data(0, TYPE_ROLE)]
        if names:
            mime.setData(NODE_TYPE_MIME, names[0].encode("utf-8"))
        return mime

    def mimeTypes(self):
        return [NODE_TYPE_MIME]


class NodePalette(QtWidgets.QWidget):
    """The side list: a filter field over a tree of categories. Activating a type adds it."""

    add_requested = QtCore.Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.setSpacing(6)
        self.filter = QtWidgets.QLineEdit()
        self.filter.setPlaceholderText("Filter nodes…")
        self.filter.setClearButtonEnabled(True)
        self.tree = PaletteTree()
        self.tree.setHeaderHidden(True)
        self.tree.setRootIsDecorated(True)
        self.tree.setIndentation(14)
        self.tree.setDragEnabled(True)
        self.tree.setDragDropMode(QtWidgets.QAbstractItemView.DragOnly)
        lay.addWidget(self.filter)
        lay.addWidget(self.tree, 1)
        hint = QtWidgets.QLabel("Double-click or drag onto the canvas to add · Tab on the canvas to search")
        hint.setObjectName("Hint")
        hint.setWordWrap(True)
        lay.addWidget(hint)
        self.filter.textChanged.connect(self._rebuild)
        self.tree.itemActivated.connect(self._activated)
        self._rebuild()
        # wide enough for the longest node name (indent + margins + scroll bar)
        fm = QtGui.QFontMetrics(self.tree.font())
        longest = max((fm.horizontalAdvance(spec.label()) for spec in registry.all_types().values()), default=100)
        em = fm.horizontalAdvance("M")
        # (the theme's style sheet sets the font after this: a fifth more keeps the names whole)
        self.setMinimumWidth(min(int(longest * 1.2) + self.tree.indentation() + em * 4, em * 26))

    def _rebuild(self) -> None:
        words = self.filter.text().lower().split()
        self.tree.clear()
        by_cat: dict[str, list] = {}
        for name, spec in registry.all_types().items():
            if node_matches(name, spec, words):
                by_cat.setdefault(spec.category, []).append((name, spec))
        for cat in sorted(by_cat):
            top = QtWidgets.QTreeWidgetItem([cat])
            top.setFlags(QtCore.Qt.ItemIsEnabled)
            font = top.font(0)
            font.setBold(True)
            top.setFont(0, font)
            for name, spec in sorted(by_cat[cat], key=lambda ns: ns[1].label().lower()):
                child = QtWidgets.QTreeWidgetItem([spec.label()])
                child.setFlags(QtCore.Qt.ItemIsEnabled | QtCore.Qt.ItemIsSelectable | QtCore.Qt.ItemIsDragEnabled)
                child.setData(0, TYPE_ROLE, name)
                child.setToolTip(0, spec.doc())
                top.addChild(child)
            self.tree.addTopLevelItem(top)
            top.setExpanded(True)

    def _activated(self, item: QtWidgets.QTreeWidgetItem, _col: int) -> None:
        name = item.data(0, TYPE_ROLE)
        if name:
            self.add_requested.emit(name)


class NodeSearchPopup(QtWidgets.QFrame):
    """The Tab popup: type to search node types, Enter (or click) to add one at the cursor."""

    chosen = QtCore.Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent, QtCore.Qt.Popup)
        self.setObjectName("NodeSearch")
        self.setFrameShape(QtWidgets.QFrame.StyledPanel)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        self.edit = QtWidgets.QLineEdit()
        self.edit.setPlaceholderText("Add node…")
        self.list = QtWidgets.QListWidget()
        self.list.setUniformItemSizes(True)
        lay.addWidget(self.edit)
        lay.addWidget(self.list)
        self.edit.textChanged.connect(self._filter)
        self.edit.installEventFilter(self)
        self.list.itemActivated.connect(self._choose)
        self.list.itemClicked.connect(self._choose)
        self._anchor = QtCore.QPoint()

    def popup(self, global_pos: QtCore.QPoint) -> None:
        self._anchor = QtCore.QPoint(global_pos)
        self.edit.clear()
        self._filter("")
        self.show()
        self.edit.setFocus()

    def _fit(self) -> None:
        """As wide as the longest entry and as tall as the matches (up to a limit), kept inside
        the window (or the screen) from the cursor, flipped up or left where it would run out."""
        fm = QtGui.QFontMetrics(self.list.font())
        em = fm.horizontalAdvance("M")
        texts = [self.list.item(i).text() for i in range(self.list.count())]
        width = max([em * 16] + [fm.horizontalAdvance(t) for t in texts]) + em * 3
        rows = max(1, min(len(texts), 16))
        height = self.edit.sizeHint().height() + rows * (fm.height() + 6) + 16
        height = max(height, self.minimumSizeHint().height())
        bounds = self._bounds()
        width, height = min(width, bounds.width()), min(height, bounds.height())
        x, y = self._anchor.x(), self._anchor.y()
        if x + width > bounds.right():
            x = max(bounds.left(), bounds.right() - width)
        if y + height > bounds.bottom():
            y = max(bounds.top(), min(y, bounds.bottom()) - height)
        self.setGeometry(x, y, width, height)

    def _bounds(self) -> QtCore.QRect:
        parent = self.parentWidget()
        if parent is not None and parent.isVisible():
            return parent.window().frameGeometry()
        screen = QtGui.QGuiApplication.screenAt(self._anchor) or QtGui.QGuiApplication.primaryScreen()
        return screen.availableGeometry() if screen is not None else QtCore.QRect(0, 0, 1600, 1000)

    def _filter(self, text: str) -> None:
        words = text.lower().split()
        self.list.clear()
        found = [(name, spec) for name, spec in registry.all_types().items() if node_matches(name, spec, words)]
        found.sort(key=lambda ns: min(rank(ns[0], text), rank(ns[1].label(), text)))
        for name, spec in found:
            item = QtWidgets.QListWidgetItem(f"{spec.label()}    ·  {spec.category}")
            item.setData(TYPE_ROLE, name)
            item.setToolTip(spec.doc())
            self.list.addItem(item)
        if self.list.count():
            self.list.setCurrentRow(0)
        self._fit()

    def eventFilter(self, obj, event) -> bool:
        if obj is self.edit and event.type() == QtCore.QEvent.KeyPress:
            key = event.key()
            if key in (QtCore.Qt.Key_Down, QtCore.Qt.Key_Up):
                row = self.list.currentRow() + (1 if key == QtCore.Qt.Key_Down else -1)
                self.list.setCurrentRow(max(0, min(self.list.count() - 1, row)))
                return True
            if key in (QtCore.Qt.Key_Return, QtCore.Qt.Key_Enter):
                self._choose(self.list.currentItem())
                return True
            if key == QtCore.Qt.Key_Escape:
                self.hide()
                return True
        return super().eventFilter(obj, event)

    def _choose(self, item: Optional[QtWidgets.QListWidgetItem]) -> None:
        if item is None:
            return
        self.hide()
        self.chosen.emit(item.data(TYPE_ROLE))
