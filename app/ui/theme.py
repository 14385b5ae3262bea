"""The dark theme: a QPalette for every widget plus a small stylesheet for the details.

Sizes in the stylesheet are in points or relative units where Qt allows, so the app reads the
same at 100% and 200% scaling (QT_SCALE_FACTOR=2 scales pixels, not the design).
"""

from __future__ import annotations

from PySide6 import QtGui, QtWidgets

# Base colours: a blue-grey dark scheme with one warm accent (the wire colour of images).
BG = "#1b1d22"
PANEL = "#22252b"
RAISED = "#2b2f37"
BORDER = "#363b45"
TEXT = "#dde1e8"
TEXT_DIM = "#8c93a1"
ACCENT = "#5aa9f0"
ACCENT_DIM = "#2d5a82"
DANGER = "#e5606a"

# Node run states (badge and border colours).
STATE_COLORS = {
    "stale": "#6b7080",
    "queued": "#8c7ae6",
    "running": "#f0b429",
    "cached": "#3d9a8b",
    "cached-memory": "#3d9a8b",
    "cached-disk": "#3d9a8b",
    "done": "#4caf70",
    "failed": "#e5606a",
    "skipped": "#9a6b5c",
    "invalid": "#c9824a",
    "idle": "#3a3f4b",
}

# Subtle node body tints per category, so a graph reads at a glance.
CATEGORY_TINTS = {
    "loaders": "#2f2a3a",
    "conditioning": "#3a3126",
    "latent": "#38283a",
    "sampling": "#26343a",
    "image": "#233243",
    "layout": "#1f3a38",
    "erasers": "#3a2629",
    "analysis": "#2a3326",
    "misc": "#2b2f37",
}


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    c = QtGui.QColor(color)
    return c.red(), c.green(), c.blue()


STYLESHEET = f"""
QMainWindow, QDialog {{ background: {BG}; }}
QDockWidget {{ color: {TEXT}; titlebar-close-icon: none; }}
QDockWidget::title {{ background: {PANEL}; padding: 0.35em 0.6em; border-bottom: 1px solid {BORDER};
    font-weight: 600; }}
QToolBar {{ background: {PANEL}; border: none; border-bottom: 1px solid {BORDER}; spacing: 0.3em;
    padding: 0.2em; }}
QToolButton {{ color: {TEXT}; padding: 0.3em 0.7em; border-radius: 4px; }}
QToolButton:hover {{ background: {RAISED}; }}
QToolButton:pressed {{ background: {ACCENT_DIM}; }}
QToolButton#RunButton {{ background: {ACCENT_DIM}; font-weight: 600; }}
QToolButton#RunButton:hover {{ background: {ACCENT}; color: #0d1117; }}
QToolButton:disabled {{ color: #5b606b; }}
QStatusBar {{ background: {PANEL}; color: {TEXT_DIM}; border-top: 1px solid {BORDER}; }}
QStatusBar QLabel {{ color: {TEXT_DIM}; }}
QMenuBar {{ background: {PANEL}; color: {TEXT}; }}
QMenuBar::item:selected {{ background: {RAISED}; }}
QMenu {{ background: {PANEL}; color: {TEXT}; border: 1px solid {BORDER}; padding: 0.25em; }}
QMenu::item {{ padding: 0.3em 1.6em 0.3em 1em; border-radius: 3px; }}
QMenu::item:selected {{ background: {ACCENT_DIM}; }}
QMenu::separator {{ height: 1px; background: {BORDER}; margin: 0.3em 0.5em; }}
QLineEdit, QPlainTextEdit, QTextEdit, QSpinBox, QDoubleSpinBox, QComboBox {{
    background: {BG}; color: {TEXT}; border: 1px solid {BORDER}; border-radius: 4px;
    padding: 0.2em 0.4em; selection-background-color: {ACCENT_DIM}; }}
QLineEdit:focus, QPlainTextEdit:focus, QSpinBox:focus, QDoubleSpinBox:focus, QComboBox:focus {{
    border-color: {ACCENT}; }}
QLineEdit[invalid="true"], QPlainTextEdit[invalid="true"], QSpinBox[invalid="true"],
QDoubleSpinBox[invalid="true"], QComboBox[invalid="true"], QCheckBox[invalid="true"] {{ border-color: {DANGER}; }}
QPushButton {{ background: {RAISED}; color: {TEXT}; border: 1px solid {BORDER}; border-radius: 4px;
    padding: 0.25em 0.8em; }}
QPushButton:hover {{ border-color: {ACCENT}; }}
QPushButton:pressed {{ background: {ACCENT_DIM}; }}
QListWidget, QTreeWidget, QListView, QTreeView {{ background: {PANEL}; color: {TEXT}; border: none;
    outline: none; }}
QTreeView::item, QListView::item {{ padding: 0.2em 0.2em; }}
QTreeView::item:selected, QListView::item:selected {{ background: {ACCENT_DIM}; color: {TEXT}; }}
QTreeView::item:hover, QListView::item:hover {{ background: {RAISED}; }}
QProgressBar {{ background: {BG}; border: 1px solid {BORDER}; border-radius: 4px; color: {TEXT};
    text-align: center; max-height: 1.1em; }}
QProgressBar::chunk {{ background: {ACCENT}; border-radius: 3px; }}
QScrollArea {{ border: none; background: {PANEL}; }}
QLabel#InspectorTitle {{ font-size: 12pt; font-weight: 600; color: {TEXT}; }}
QLabel#InspectorDoc, QLabel#Hint {{ color: {TEXT_DIM}; }}
QLabel#ParamLabel {{ color: {TEXT_DIM}; }}
QLabel#ParamProblem {{ color: {DANGER}; }}
QToolTip {{ background: {RAISED}; color: {TEXT}; border: 1px solid {BORDER}; padding: 0.3em; }}
QTabWidget::pane {{ border: none; }}
QTabBar::tab {{ background: {PANEL}; color: {TEXT_DIM}; padding: 0.35em 0.9em; border: none; }}
QTabBar::tab:selected {{ color: {TEXT}; border-bottom: 2px solid {ACCENT}; }}
QCheckBox {{ color: {TEXT}; }}
QSplitter::handle {{ background: {BORDER}; }}
"""


def icons_dir() -> str:
    from pathlib import Path

    return (Path(__file__).resolve().parents[2] / "resources" / "icons").as_posix()


def spin_arrows() -> str:
    """Fusion draws no spin-box arrows once a stylesheet styles the box: give it ours."""
    d = icons_dir()
    return f"""
QAbstractSpinBox {{ padding-right: 1.4em; }}
QAbstractSpinBox::up-button, QAbstractSpinBox::down-button {{
    subcontrol-origin: border; width: 1.3em; border: none; background: transparent; }}
QAbstractSpinBox::up-button {{ subcontrol-position: top right; }}
QAbstractSpinBox::down-button {{ subcontrol-position: bottom right; }}
QAbstractSpinBox::up-button:hover, QAbstractSpinBox::down-button:hover {{ background: {RAISED}; }}
QAbstractSpinBox::up-arrow {{ image: url({d}/arrow-up.svg); width: 9px; height: 6px; }}
QAbstractSpinBox::down-arrow {{ image: url({d}/arrow-down.svg); width: 9px; height: 6px; }}
QComboBox::drop-down {{ border: none; width: 1.4em; }}
QComboBox::down-arrow {{ image: url({d}/arrow-down.svg); width: 9px; height: 6px; }}
"""


def palette() -> QtGui.QPalette:
    p = QtGui.QPalette()
    c = QtGui.QColor
    roles = {
        QtGui.QPalette.Window: BG, QtGui.QPalette.WindowText: TEXT, QtGui.QPalette.Base: BG,
        QtGui.QPalette.AlternateBase: PANEL, QtGui.QPalette.ToolTipBase: RAISED,
        QtGui.QPalette.ToolTipText: TEXT, QtGui.QPalette.Text: TEXT, QtGui.QPalette.Button: RAISED,
        QtGui.QPalette.ButtonText: TEXT, QtGui.QPalette.BrightText: "#ffffff",
        QtGui.QPalette.Highlight: ACCENT_DIM, QtGui.QPalette.HighlightedText: "#ffffff",
        QtGui.QPalette.Link: ACCENT, QtGui.QPalette.PlaceholderText: TEXT_DIM,
        QtGui.QPalette.Mid: BORDER, QtGui.QPalette.Dark: "#121418", QtGui.QPalette.Light: RAISED,
    }
    for role, color in roles.items():
        p.setColor(role, c(color))
    for role in (QtGui.QPalette.WindowText, QtGui.QPalette.Text, QtGui.QPalette.ButtonText):
        p.setColor(QtGui.QPalette.Disabled, role, c("#5b606b"))
    return p


def apply(app: QtWidgets.QApplication) -> None:
    app.setStyle("Fusion")
    app.setPalette(palette())
    app.setStyleSheet(STYLESHEET + spin_arrows())
