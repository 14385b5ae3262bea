"""The inspector: a form generated from the selected node's declared params.

Every field writes through Document.set_param (so through the undo stack) and re-reads the
document when it changes (undo, redo, the layout canvas). Typing in one field merges into one
undo step; the declaration's help text is each field's tooltip.
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable, Optional

from PySide6 import QtCore, QtGui, QtWidgets

from nodes import registry
from nodes.base import Bool, Choice, Float, Int, Json, Param, Path, Seed, String

from . import file_dialogs
from .document import Document

INT32 = 2**31 - 1
SEED_CONTROLS = ("fixed", "increment", "random")


def random_seed(param: Seed) -> int:
    """A random seed within the param's range (at most 2**32 - 1, what every generator takes)."""
    hi = param.max if param.max is not None else 2**32 - 1
    return random.randint(param.min or 0, min(hi, 2**32 - 1))


def seed_control_key(param_name: str) -> str:
    """The node-meta key of a seed param's after-run control."""
    return f"seed_control:{param_name}"


class ParamField(QtCore.QObject):
    """One param's editor: `widget` to place, `load(value)` to show, `commit(value)` to edit."""

    def __init__(self, param: Param, commit: Callable[[Any, bool], Optional[str]]):
        super().__init__()
        self.param, self._commit = param, commit
        self.widget: QtWidgets.QWidget = QtWidgets.QWidget()
        # why the value is invalid, under the field; hidden while it is fine
        self.problem = QtWidgets.QLabel("")
        self.problem.setObjectName("ParamProblem")
        self.problem.setWordWrap(True)
        self.problem.setVisible(False)

    def commit(self, value, merge: bool = False) -> None:
        self.show_problem(self._commit(value, merge))

    def show_problem(self, problem: Optional[str]) -> None:
        self.widget.setProperty("invalid", bool(problem))
        self.widget.style().unpolish(self.widget)
        self.widget.style().polish(self.widget)
        self.widget.setToolTip(f"{problem}" if problem else self.param.help)
        self.problem.setText(problem or "")
        self.problem.setVisible(bool(problem))

    def load_checked(self, value) -> None:
        """Show a stored value; one the param refuses (a file's "many" steps) is flagged with
        the reason, and the widget shows the default until the user sets a new value."""
        problem = self.param.check(value)
        try:
            self.load(value)
        except (TypeError, ValueError, OverflowError):
            self.load(self.param.default)
            problem = problem or f"{value!r} cannot be shown here"
        if problem:
            problem = f"the stored value is invalid: {problem}; set a new one"
        self.show_problem(problem)

    def load(self, value) -> None:
        raise NotImplementedError


class IntField(ParamField):
    def __init__(self, param: Int, commit):
        super().__init__(param, commit)
        box = QtWidgets.QSpinBox()
        lo = -INT32 if param.min is None else max(-INT32, param.min)
        hi = INT32 if param.max is None else min(INT32, param.max)
        box.setRange(lo, hi)
        box.setSingleStep(param.step or 1)
        box.setKeyboardTracking(False)  # commit on Enter / focus out / arrows, not per keystroke
        box.valueChanged.connect(lambda v: self.commit(int(v), merge=True))
        self.widget = box

    def load(self, value):
        self.widget.blockSignals(True)
        self.widget.setValue(int(value))
        self.widget.blockSignals(False)


class SeedField(ParamField):
    """Seeds go to 2**63: a text field with a number check, plus a randomise button."""

    def __init__(self, param: Seed, commit):
        super().__init__(param, commit)
        self.edit = QtWidgets.QLineEdit()
        self.edit.setValidator(QtGui.QRegularExpressionValidator(QtCore.QRegularExpression(r"\d{1,19}")))
        self.edit.editingFinished.connect(self._typed)
        self.dice = QtWidgets.QToolButton()
        from .theme import icons_dir

        self.dice.setIcon(QtGui.QIcon(f"{icons_dir()}/dice.svg"))
        self.dice.setText("random")
        self.dice.setToolTip("a new random seed")
        self.dice.setObjectName("RandomSeed")
        self.dice.clicked.connect(self.randomise)
        # what happens to the seed after each run (kept in the node's meta: not part of the result)
        self.control = QtWidgets.QComboBox()
        self.control.addItems(list(SEED_CONTROLS))
        self.control.setToolTip("after each run: keep the seed, add one, or pick a random one")
        self.control.setObjectName("SeedControl")
        row = QtWidgets.QWidget()
        lay = QtWidgets.QHBoxLayout(row)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.edit, 1)
        lay.addWidget(self.dice)
        lay.addWidget(self.control)
        self.widget = row

    def bind_control(self, current: str, set_control) -> None:
        self.control.blockSignals(True)
        self.control.setCurrentText(current if current in SEED_CONTROLS else SEED_CONTROLS[0])
        self.control.blockSignals(False)
        self.control.currentTextChanged.connect(set_control)

    def _typed(self):
        text = self.edit.text().strip()
        if text:
            self.commit(int(text))

    def randomise(self):
        self.commit(random_seed(self.param))

    def load(self, value):
        self.edit.setText(str(value))


class FloatField(ParamField):
    def __init__(self, param: Float, commit):
        super().__init__(param, commit)
        box = QtWidgets.QDoubleSpinBox()
        step = param.step or 0.1
        decimals = max(2, len(f"{step:.6f}".rstrip("0").split(".")[1]))
        box.setDecimals(decimals)
        box.setRange(-1e9 if param.min is None else param.min, 1e9 if param.max is None else param.max)
        box.setSingleStep(step)
        box.setKeyboardTracking(False)
        box.valueChanged.connect(lambda v: self.commit(round(float(v), decimals), merge=True))
        self.widget = box

    def load(self, value):
        self.widget.blockSignals(True)
        self.widget.setValue(float(value))
        self.widget.blockSignals(False)


class ChoiceField(ParamField):
    def __init__(self, param: Choice, commit):
        super().__init__(param, commit)
        box = QtWidgets.QComboBox()
        box.addItems(list(param.options))
        box.currentTextChanged.connect(lambda t: self.commit(t))
        self.widget = box

    def load(self, value):
        self.widget.blockSignals(True)
        i = self.widget.findText(str(value))
        if i < 0:  # a value this build does not offer (kept, shown, flagged by validation)
            self.widget.addItem(str(value))
            i = self.widget.count() - 1
        self.widget.setCurrentIndex(i)
        self.widget.blockSignals(False)


class BoolField(ParamField):
    def __init__(self, param: Bool, commit):
        super().__init__(param, commit)
        box = QtWidgets.QCheckBox()
        box.toggled.connect(lambda on: self.commit(bool(on)))
        self.widget = box

    def load(self, value):
        self.widget.blockSignals(True)
        self.widget.setChecked(bool(value))
        self.widget.blockSignals(False)


class TextField(ParamField):
    """One line, or a multi-line prompt box that commits shortly after typing stops."""

    def __init__(self, param: String, commit):
        super().__init__(param, commit)
        if param.multiline:
            edit = QtWidgets.QPlainTextEdit()
            edit.setTabChangesFocus(True)
            edit.setMinimumHeight(QtGui.QFontMetrics(edit.font()).lineSpacing() * 5)
            self._timer = QtCore.QTimer(self, singleShot=True, interval=400)
            self._timer.timeout.connect(lambda: self.commit(edit.toPlainText(), merge=True))
            edit.textChanged.connect(self._timer.start)
        else:
            edit = QtWidgets.QLineEdit()
            edit.editingFinished.connect(lambda: self.commit(edit.text()))
        self.edit = edit
        self.widget = edit

    def flush(self):
        if self.param.multiline and self._timer.isActive():
            self._timer.stop()
            self.commit(self.edit.toPlainText(), merge=True)

    def load(self, value):
        value = "" if value is None else str(value)
        if self.param.multiline and self._timer.isActive():
            return  # the user is typing: their text is newer than the document's
        if self.param.multiline:
            if self.edit.toPlainText() != value:
                self.edit.blockSignals(True)
                cursor = self.edit.textCursor().position()
                self.edit.setPlainText(value)
                c = self.edit.textCursor()
                c.setPosition(min(cursor, len(value)))
                self.edit.setTextCursor(c)
                self.edit.blockSignals(False)
        elif self.edit.text() != value:
            self.edit.setText(value)


class PathField(ParamField):
    """A path with a picker (file, folder or save-as); `builtin:` and `ckpt:` names are typed as text."""

    def __init__(self, param: Path, commit):
        super().__init__(param, commit)
        self.edit = QtWidgets.QLineEdit()
        self.edit.setPlaceholderText("folder" if param.mode == "folder" else "file")
        self.edit.editingFinished.connect(lambda: self.commit(self.edit.text()))
        self.pick = QtWidgets.QToolButton()
        self.pick.setText("…")
        self.pick.setToolTip("choose a folder" if param.mode == "folder" else "choose a file")
        self.pick.clicked.connect(self.choose)
        row = QtWidgets.QWidget()
        lay = QtWidgets.QHBoxLayout(row)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.edit, 1)
        lay.addWidget(self.pick)
        self.models = None
        if param.models:  # a model: offer the models folders' list as well as the file dialog
            self.models = QtWidgets.QToolButton()
            self.models.setText("Models")
            self.models.setToolTip("choose from the models folders (File > Models Folders)")
            self.models.clicked.connect(self.choose_model)
            lay.addWidget(self.models)
        self.widget = row

    def choose_model(self):
        from .model_picker import ModelPicker

        picker = ModelPicker(self.param.models, self.edit.text(), self.widget.window())
        if picker.exec() == QtWidgets.QDialog.Accepted and picker.chosen():
            self.edit.setText(picker.chosen())
            self.commit(picker.chosen())

    def choose(self):
        start = self.edit.text()
        if start.startswith(("builtin:", "ckpt:")):
            start = ""
        parent = self.widget.window()
        if self.param.mode == "folder":
            path = file_dialogs.choose_folder(parent, "Choose a folder", start)
            if path:  # the user chose it: graphs run here may write there
                from . import session

                session.allow_write_folder(path)
        elif self.param.mode == "save":
            path = file_dialogs.save_file(parent, "Save as", start, self.param.filters)
        else:
            path = file_dialogs.open_file(parent, "Choose a file", start, self.param.filters)
        if path:
            self.edit.setText(path)
            self.commit(path)

    def load(self, value):
        self.edit.setText("" if value is None else str(value))


class JsonField(ParamField):
    """Structured data: a one-line summary, and the JSON text behind a toggle (boxes are
    better edited on the layout canvas, but the text is there for anything else)."""

    def __init__(self, param: Json, commit):
        super().__init__(param, commit)
        self.summary = QtWidgets.QLabel("")
        self.summary.setObjectName("Hint")
        self.hint = ""  # e.g. where else the value is edited
        self.summary.setWordWrap(True)
        self.summary.setSizePolicy(QtWidgets.QSizePolicy.Ignored, QtWidgets.QSizePolicy.Preferred)
        self.toggle = QtWidgets.QToolButton()
        self.toggle.setText("JSON")
        self.toggle.setCheckable(True)
        self.toggle.setToolTip("show the value as JSON text")
        edit = QtWidgets.QPlainTextEdit()
        edit.setMinimumHeight(QtGui.QFontMetrics(edit.font()).lineSpacing() * 6)
        edit.setFont(QtGui.QFontDatabase.systemFont(QtGui.QFontDatabase.FixedFont))
        edit.setVisible(False)
        self.toggle.toggled.connect(edit.setVisible)
        self._timer = QtCore.QTimer(self, singleShot=True, interval=600)
        self._timer.timeout.connect(self._parse)
        edit.textChanged.connect(self._timer.start)
        self.edit = edit
        head = QtWidgets.QHBoxLayout()
        head.setContentsMargins(0, 0, 0, 0)
        head.addWidget(self.summary, 1)
        head.addWidget(self.toggle)
        box = QtWidgets.QWidget()
        lay = QtWidgets.QVBoxLayout(box)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(head)
        lay.addWidget(edit)
        self.widget = box

    def _parse(self):
        try:
            value = json.loads(self.edit.toPlainText() or "null")
        except json.JSONDecodeError as exc:
            self.edit.setProperty("invalid", True)
            self.edit.setToolTip(f"not valid JSON: {exc.msg} (line {exc.lineno})")
            self.edit.style().polish(self.edit)
            return
        self.edit.setProperty("invalid", False)
        self.edit.style().polish(self.edit)
        self.commit(value, merge=True)

    def load(self, value):
        if isinstance(value, list):
            self.summary.setText(f"{len(value)} item(s){self.hint}")
        elif isinstance(value, dict):
            self.summary.setText(f"{len(value)} field(s){self.hint}")
        else:
            self.summary.setText(json.dumps(value)[:60])
        try:
            same = json.loads(self.edit.toPlainText() or "null") == value
        except json.JSONDecodeError:
            same = False
        if not same:
            self.edit.blockSignals(True)
            self.edit.setPlainText(json.dumps(value, indent=1))
            self.edit.blockSignals(False)


def reflow(text: str) -> str:
    """A docstring as prose: its line breaks joined, its paragraphs kept."""
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p)


def field_for(param: Param, commit) -> ParamField:
    # Order matters: Seed is an Int, Path is a String.
    for cls, field in ((Seed, SeedField), (Int, IntField), (Float, FloatField), (Choice, ChoiceField),
                       (Bool, BoolField), (Path, PathField), (String, TextField), (Json, JsonField)):
        if isinstance(param, cls):
            return field(param, commit)
    return JsonField(param, commit)


class Inspector(QtWidgets.QScrollArea):
    """Shows the params of one node (the selection) and edits them through the document."""

    message = QtCore.Signal(str)

    def __init__(self, doc: Document, parent=None):
        super().__init__(parent)
        self.doc = doc
        self.node_id: Optional[str] = None
        self.fields: dict[str, ParamField] = {}
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(QtCore.Qt.ScrollBarAlwaysOff)
        doc.node_changed.connect(self._on_node_changed)
        doc.structure_changed.connect(self._on_structure)
        doc.replaced.connect(lambda: self.show_node(None))
        self.status_text = ""
        self.show_node(None)

    def show_node(self, node_id: Optional[str]) -> None:
        for f in self.fields.values():
            if isinstance(f, TextField):
                f.flush()
        self.node_id = node_id
        self.fields = {}
        body = QtWidgets.QWidget()
        body.setObjectName("InspectorBody")
        outer = QtWidgets.QVBoxLayout(body)
        outer.setContentsMargins(12, 10, 12, 10)
        outer.setSpacing(8)
        node = self.doc.graph.nodes.get(node_id) if node_id else None
        if node is None:
            hint = QtWidgets.QLabel("Select a node to edit its settings.\n\n"
                                    "Tab adds a node; drag from a port to wire it.")
            hint.setObjectName("Hint")
            hint.setWordWrap(True)
            outer.addWidget(hint)
            outer.addStretch(1)
            self.setWidget(body)
            return
        spec = registry.get(node.type)
        self.title_edit = QtWidgets.QLineEdit(node.title)
        self.title_edit.setPlaceholderText(node.type)
        self.title_edit.setObjectName("InspectorTitleEdit")
        self.title_edit.setToolTip("the node's title (how files and the CLI's --set name it)")
        self.title_edit.editingFinished.connect(lambda: self.doc.rename(node.id, self.title_edit.text().strip()))
        head = QtWidgets.QLabel(node.type + (f"  ·  {spec.category}" if spec else ""))
        head.setObjectName("InspectorTitle")
        outer.addWidget(head)
        outer.addWidget(self.title_edit)
        if spec is not None and spec.doc():
            doc_label = QtWidgets.QLabel(reflow(spec.doc()))
            doc_label.setObjectName("InspectorDoc")
            doc_label.setWordWrap(True)
            outer.addWidget(doc_label)
        self.state_label = QtWidgets.QLabel(self.status_text)
        self.state_label.setObjectName("InspectorDoc")
        self.state_label.setWordWrap(True)
        self.state_label.setTextInteractionFlags(QtCore.Qt.TextSelectableByMouse)
        self.state_label.setVisible(bool(self.status_text))
        outer.addWidget(self.state_label)
        if spec is None or node.is_placeholder:
            why = QtWidgets.QLabel("This node's type is unknown to this build (or newer than it). "
                                   "It is kept unchanged and written back as it was read, but it "
                                   "cannot run or be edited here.")
            why.setWordWrap(True)
            outer.addWidget(why)
            outer.addStretch(1)
            self.setWidget(body)
            return
        form = QtWidgets.QFormLayout()
        form.setLabelAlignment(QtCore.Qt.AlignRight | QtCore.Qt.AlignVCenter)
        form.setFieldGrowthPolicy(QtWidgets.QFormLayout.AllNonFixedFieldsGrow)
        form.setRowWrapPolicy(QtWidgets.QFormLayout.WrapLongRows)
        values = spec.resolved_params(node.params)
        for name, param in spec.params.items():
            field = field_for(param, self._committer(node.id, name))
            if isinstance(field, JsonField) and name == "boxes":
                field.hint = " · draw them on the Layout panel"
            field.widget.setObjectName(f"param:{name}")
            if isinstance(field, SeedField):
                key = seed_control_key(name)
                field.bind_control(node.meta.get(key, "fixed"),
                                   lambda value, key=key: self.doc.set_meta(node.id, key, value))
            field.widget.setToolTip(param.help)
            field.load_checked(values[name])
            label = QtWidgets.QLabel(name.replace("_", " "))
            label.setObjectName("ParamLabel")
            label.setToolTip(param.help)
            if isinstance(param, String) and param.multiline:
                form.addRow(label)
                form.addRow(field.widget)
            else:
                form.addRow(label, field.widget)
            form.addRow("", field.problem)
            self.fields[name] = field
        outer.addLayout(form)
        outer.addStretch(1)
        self.setWidget(body)

    def set_status(self, text: str) -> None:
        """A line about the node's last run (time, cache, error) under its description."""
        self.status_text = text
        label = getattr(self, "state_label", None)
        try:
            if label is not None:
                label.setText(text)
                label.setVisible(bool(text))
        except RuntimeError:  # the label went with an older form
            pass

    def _committer(self, node_id: str, name: str):
        def commit(value, merge):
            problem = self.doc.set_param(node_id, name, value, merge=merge)
            if problem:
                self.message.emit(f"{name}: {problem}")
            return problem
        return commit

    def _on_node_changed(self, node_id: str) -> None:
        if node_id != self.node_id:
            return
        node = self.doc.graph.nodes.get(node_id)
        spec = registry.get(node.type) if node else None
        if spec is None:
            return
        values = spec.resolved_params(node.params)
        for name, field in self.fields.items():
            field.load_checked(values[name])
        if self.title_edit.text() != node.title:
            self.title_edit.setText(node.title)

    def _on_structure(self) -> None:
        if self.node_id is not None and self.node_id not in self.doc.graph.nodes:
            self.show_node(None)
