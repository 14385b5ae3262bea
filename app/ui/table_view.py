"""The Table panel: result tables of the last runs (an analysis node's scores, rankings,
per-layer effects), read-only, rows in the order the node gave them (its ranking).

Plain data in (a title, column names, rows of plain values), a small Qt model over it; the
panel keeps the recent tables and shows one at a time.
"""

from __future__ import annotations

from PySide6 import QtCore, QtWidgets

NO_PARENT = QtCore.QModelIndex()  # a table's rows have no parent
NO_TABLE_YET = "No table yet: run a node with a table output (Diffusion Classifier, Seed Scan, ...)."


def cell_text(value) -> str:
    """A cell as shown: floats to 6 significant digits, as the table's text form has them."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class TableModel(QtCore.QAbstractTableModel):
    """Read-only columns and rows; numbers align right and sort as numbers would be read."""

    def __init__(self, columns: list, rows: list, parent=None):
        super().__init__(parent)
        for k, row in enumerate(rows):
            if len(row) != len(columns):
                raise ValueError(f"table row {k + 1} has {len(row)} values for {len(columns)} columns")
        self.columns = [str(c) for c in columns]
        self.rows = [list(r) for r in rows]

    def rowCount(self, parent=NO_PARENT) -> int:
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent=NO_PARENT) -> int:
        return 0 if parent.isValid() else len(self.columns)

    def data(self, index, role=QtCore.Qt.DisplayRole):
        if not index.isValid():
            return None
        value = self.rows[index.row()][index.column()]
        if role in (QtCore.Qt.DisplayRole, QtCore.Qt.ToolTipRole):
            return cell_text(value)
        if role == QtCore.Qt.TextAlignmentRole and isinstance(value, (int, float)):
            return int(QtCore.Qt.AlignRight | QtCore.Qt.AlignVCenter)
        return None

    def headerData(self, section, orientation, role=QtCore.Qt.DisplayRole):
        if role != QtCore.Qt.DisplayRole:
            return None
        if orientation == QtCore.Qt.Horizontal:
            return self.columns[section] if 0 <= section < len(self.columns) else None
        return str(section + 1)

    def flags(self, index):
        return QtCore.Qt.ItemIsEnabled | QtCore.Qt.ItemIsSelectable  # not editable


class TablePanel(QtWidgets.QWidget):
    """The latest result tables: pick one of the recent ones, see it as a table."""

    MAX_RECENT = 24

    def __init__(self, parent=None):
        super().__init__(parent)
        self.picker = QtWidgets.QComboBox()
        self.picker.setToolTip("the recent result tables, newest first")
        self.picker.currentIndexChanged.connect(self._pick)
        self.view = QtWidgets.QTableView()
        self.view.setEditTriggers(QtWidgets.QAbstractItemView.NoEditTriggers)
        self.view.setSelectionBehavior(QtWidgets.QAbstractItemView.SelectRows)
        self.view.setSortingEnabled(False)  # the node's order is the ranking
        self.view.verticalHeader().setVisible(False)
        self.view.horizontalHeader().setStretchLastSection(True)
        self.caption = QtWidgets.QLabel(NO_TABLE_YET)
        self.caption.setObjectName("Hint")
        self.caption.setWordWrap(True)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.setSpacing(4)
        lay.addWidget(self.picker)
        lay.addWidget(self.view, 1)
        lay.addWidget(self.caption)
        self.tables: list[tuple[str, TableModel]] = []  # (label, model), newest first

    def add_table(self, title: str, columns: list, rows: list, label: str) -> None:
        model = TableModel(columns, rows, self)
        self.tables.insert(0, (f"{label}: {title}", model))
        del self.tables[self.MAX_RECENT:]
        self.picker.blockSignals(True)
        self.picker.insertItem(0, self.tables[0][0])
        while self.picker.count() > self.MAX_RECENT:
            self.picker.removeItem(self.picker.count() - 1)
        self.picker.setCurrentIndex(0)
        self.picker.blockSignals(False)
        self._pick(0)

    def _pick(self, index: int) -> None:
        if 0 <= index < len(self.tables):
            name, model = self.tables[index]
            self.view.setModel(model)
            self.view.resizeColumnsToContents()
            self.caption.setText(f"{name} ({model.rowCount()} rows)")

    def clear(self) -> None:
        """Another graph: its tables are not this one's."""
        self.tables.clear()
        self.picker.clear()
        self.view.setModel(None)
        self.caption.setText(NO_TABLE_YET)
