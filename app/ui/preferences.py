"""Edit > Preferences: where models are found and images go (and how they are named), the result
cache, the device and memory budget, the interface scale and the theme. Saved with QSettings
(app/ui/session.py); the engine is rebuilt from them before the next run, the theme applies at
once, the scale at the next start.
"""

from __future__ import annotations

import os
from typing import Optional

from PySide6 import QtWidgets

from . import file_dialogs, session, theme
from .model_picker import ModelFoldersList
from .run_queue import DEFAULT_NAME_PATTERN, NAME_FIELDS, NAME_PATTERN_KEY, format_name, name_pattern_problem

DEVICES = ("auto", "cpu", "cuda", "mps")
UI_SCALES = ("", "1", "1.25", "1.5", "2")


def _size_text(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


class PreferencesDialog(QtWidgets.QDialog):
    def __init__(self, runner=None, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Preferences")
        self.resize(680, 560)
        self.runner = runner
        engine = session.engine_settings()
        self.models = ModelFoldersList(session.model_folders())
        self.models.list.setMaximumHeight(self.fontMetrics().height() * 8)
        self.output = self._folder_row(str(session.settings().value(session.OUTPUT_FOLDER_KEY, "") or ""),
                                       str(session.default_output_dir()))
        self.cache_folder = self._folder_row(engine["disk_cache"], self._default_cache_dir())
        self.cache_budget = QtWidgets.QLineEdit(engine["disk_budget_gb"])
        self.cache_budget.setPlaceholderText("2 (GB)")
        self.cache_size = QtWidgets.QLabel("")
        self.cache_size.setObjectName("Hint")
        clear = QtWidgets.QPushButton("Clear cache")
        clear.clicked.connect(self.clear_cache)
        self.device = QtWidgets.QComboBox()
        self.device.addItems(list(DEVICES))
        self.device.setCurrentText(engine["device"] or "auto")
        self.ram_budget = QtWidgets.QLineEdit(engine["ram_budget"])
        self.ram_budget.setPlaceholderText("default: 60% of this machine's memory (e.g. 12G)")
        self.scale = QtWidgets.QComboBox()
        self.scale.addItems(["system"] + list(UI_SCALES[1:]))
        self.scale.setCurrentText(session.ui_scale() or "system")
        self.theme = QtWidgets.QComboBox()
        self.theme.addItems(list(theme.THEMES))
        self.theme.setCurrentText(theme.saved_theme())
        self.name_pattern = QtWidgets.QLineEdit(
            str(session.settings().value(NAME_PATTERN_KEY, "") or "") or DEFAULT_NAME_PATTERN)
        self.name_pattern.setPlaceholderText(DEFAULT_NAME_PATTERN)
        self.name_pattern.setToolTip("fields: " + ", ".join("{" + f + "}" for f in NAME_FIELDS)
                                     + "; it ends with _{counter:05}. e.g. {graph}_{node}_{seed}_{counter:05}")
        self.name_example = QtWidgets.QLabel("")
        self.name_example.setObjectName("Hint")
        self.name_pattern.textChanged.connect(self._show_name_example)
        self._show_name_example()
        self.problem = QtWidgets.QLabel("")
        self.problem.setObjectName("ParamProblem")
        self.problem.setWordWrap(True)
        self._lay_out(clear)
        self.refresh_cache_size()

    # -- building ---------------------------------------------------------------------------
    def _folder_row(self, value: str, placeholder: str) -> QtWidgets.QLineEdit:
        edit = QtWidgets.QLineEdit(value)
        edit.setPlaceholderText(placeholder)
        return edit

    def _with_browse(self, edit: QtWidgets.QLineEdit) -> QtWidgets.QWidget:
        row = QtWidgets.QWidget()
        lay = QtWidgets.QHBoxLayout(row)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(edit, 1)
        button = QtWidgets.QToolButton()
        button.setText("…")
        button.clicked.connect(lambda: self._browse(edit))
        lay.addWidget(button)
        return row

    def _lay_out(self, clear: QtWidgets.QPushButton) -> None:
        form = QtWidgets.QFormLayout()
        form.setFieldGrowthPolicy(QtWidgets.QFormLayout.AllNonFixedFieldsGrow)
        form.addRow("Models folders", self.models)
        form.addRow("Output folder", self._with_browse(self.output))
        form.addRow("File names", self.name_pattern)
        form.addRow("", self.name_example)
        form.addRow("Cache folder", self._with_browse(self.cache_folder))
        budget = QtWidgets.QHBoxLayout()
        budget.addWidget(self.cache_budget)
        budget.addWidget(self.cache_size, 1)
        budget.addWidget(clear)
        form.addRow("Cache size (GB)", budget)
        form.addRow("Device", self.device)
        form.addRow("Memory for models", self.ram_budget)
        form.addRow("Interface scale", self.scale)
        form.addRow("Theme", self.theme)
        note = QtWidgets.QLabel("The interface scale applies at the next start, the theme at once, "
                                "the rest before the next run.")
        note.setObjectName("Hint")
        note.setWordWrap(True)
        buttons = QtWidgets.QDialogButtonBox(QtWidgets.QDialogButtonBox.Ok | QtWidgets.QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QtWidgets.QVBoxLayout(self)
        lay.addLayout(form, 1)
        lay.addWidget(note)
        lay.addWidget(self.problem)
        lay.addWidget(buttons)

    @staticmethod
    def _default_cache_dir() -> str:
        from app.engine.executor import default_cache_dir

        return str(default_cache_dir())

    def _browse(self, edit: QtWidgets.QLineEdit) -> None:
        folder = file_dialogs.choose_folder(self, "Choose a folder", edit.text() or edit.placeholderText())
        if folder:
            edit.setText(folder)

    def _show_name_example(self) -> None:
        problem = name_pattern_problem(self.name_pattern.text().strip() or DEFAULT_NAME_PATTERN)
        self.name_example.setText(problem or "e.g. " + example_name(self.name_pattern.text().strip()))
        self.name_example.setObjectName("ParamProblem" if problem else "Hint")
        self.name_example.style().unpolish(self.name_example)
        self.name_example.style().polish(self.name_example)

    # -- the cache --------------------------------------------------------------------------
    def _disk_cache(self):
        from app.engine.cache import DiskCache

        return DiskCache(os.path.expanduser(self.cache_folder.text().strip() or self._default_cache_dir()))

    def refresh_cache_size(self) -> None:
        self.cache_size.setText(f"holds {_size_text(self._disk_cache().size_bytes())}")

    def clear_cache(self) -> None:
        freed = self._disk_cache().clear()
        self.refresh_cache_size()
        self.problem.setText(f"Cleared {_size_text(freed)} of cached results.")

    # -- saving -----------------------------------------------------------------------------
    def check(self) -> Optional[str]:
        """Why the values cannot be saved, or None."""
        from kernels.memory import BudgetError, parse_bytes

        if self.ram_budget.text().strip():
            try:
                parse_bytes(self.ram_budget.text().strip(), "memory for models")
            except BudgetError as exc:
                return str(exc)
        problem = name_pattern_problem(self.name_pattern.text().strip() or DEFAULT_NAME_PATTERN)
        if problem:
            return problem
        text = self.cache_budget.text().strip()
        if text:
            try:
                if float(text) <= 0:
                    raise ValueError
            except ValueError:
                return f"cache size: {text!r} is not a positive number of GB"
        return None

    def accept(self) -> None:
        problem = self.check()
        if problem:
            self.problem.setText(problem)
            return
        session.set_model_folders(self.models.folders())
        session.set_preferences({
            "output_folder": self.output.text(), "disk_cache": self.cache_folder.text(),
            "disk_budget_gb": self.cache_budget.text(), "ram_budget": self.ram_budget.text(),
            "device": "" if self.device.currentText() == "auto" else self.device.currentText(),
            "ui_scale": "" if self.scale.currentText() == "system" else self.scale.currentText()})
        s = session.settings()
        s.setValue(NAME_PATTERN_KEY, self.name_pattern.text().strip() or DEFAULT_NAME_PATTERN)
        s.setValue(theme.THEME_KEY, self.theme.currentText())
        s.sync()
        if self.theme.currentText() != getattr(theme.apply, "name", None):
            apply_theme(self.theme.currentText())
        if self.runner is not None:
            self.runner.set_model_roots(session.all_model_roots())
            self.runner.reconfigure()
        super().accept()


def example_name(pattern: str) -> str:
    """The first file name `pattern` gives a Save Image node of a saved graph, seed 42."""
    values = {"prefix": "loomwork", "graph": "portrait", "node": "Save Image", "seed": 42,
              "date": "20260101", "time": "120000"}
    return f"{format_name(pattern or DEFAULT_NAME_PATTERN, values)}_00001.png"


def apply_theme(name: str) -> None:
    """Restyle the running app (and the toolbar icons of its windows) with theme `name`."""
    app = QtWidgets.QApplication.instance()
    if app is None:
        return
    theme.apply(app, name)
    for w in app.topLevelWidgets():
        if hasattr(w, "_set_icons"):
            w._set_icons()
