"""The themes (dark, the default, and light): a QPalette for every widget plus a small
stylesheet for the details, and the toolbar's icons, drawn here in the theme's text colour.

Sizes in the stylesheet are in points or relative units where Qt allows, so the app reads the
same at 100% and 200% scaling (QT_SCALE_FACTOR=2 scales pixels, not the design). The node canvas
keeps its dark colours in both themes (they are the nodes' state and category colours).

The icons are drawn with QPainter rather than taken from an icon set: Qt's standard icons are
Fusion's small bitmaps, which barely show on a dark panel, and no icon font ships with Qt.
"""

from __future__ import annotations

from PySide6 import QtCore, QtGui, QtWidgets

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
DARK = {"BG": BG, "PANEL": PANEL, "RAISED": RAISED, "BORDER": BORDER, "TEXT": TEXT, "TEXT_DIM": TEXT_DIM,
        "ACCENT": ACCENT, "ACCENT_DIM": ACCENT_DIM, "DANGER": DANGER, "ON_ACCENT": "#0d1117",
        "DISABLED": "#5b606b", "SHADOW": "#121418"}
LIGHT = {"BG": "#eceef2", "PANEL": "#f7f8fa", "RAISED": "#dfe3e9", "BORDER": "#c3c9d2", "TEXT": "#1b1f27",
         "TEXT_DIM": "#5a6170", "ACCENT": "#1c6cc4", "ACCENT_DIM": "#bcd6f3", "DANGER": "#c23a3a",
         "ON_ACCENT": "#ffffff", "DISABLED": "#a3a9b3", "SHADOW": "#b8bec8"}
THEMES = {"dark": DARK, "light": LIGHT}
THEME_KEY = "ui/theme"

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


def stylesheet(c: dict) -> str:
    BG, PANEL, RAISED, BORDER = c["BG"], c["PANEL"], c["RAISED"], c["BORDER"]
    TEXT, TEXT_DIM, ACCENT, ACCENT_DIM, DANGER = c["TEXT"], c["TEXT_DIM"], c["ACCENT"], c["ACCENT_DIM"], c["DANGER"]
    ON_ACCENT, DISABLED = c["ON_ACCENT"], c["DISABLED"]
    return f"""
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
QToolButton#RunButton:hover {{ background: {ACCENT}; color: {ON_ACCENT}; }}
QToolButton:disabled {{ color: {DISABLED}; }}
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


STYLESHEET = stylesheet(DARK)


def icons_dir() -> str:
    from pathlib import Path

    return (Path(__file__).resolve().parents[2] / "resources" / "icons").as_posix()


def _light_arrows(color: str) -> str:
    """The arrow icons recoloured for a light theme, written once into the data folder."""
    from pathlib import Path

    from . import session

    folder = session.data_dir() / "theme-icons"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("arrow-up.svg", "arrow-down.svg"):
            text = (Path(icons_dir()) / name).read_text("utf-8").replace("#aab1bf", color)
            target = folder / name
            if not target.exists() or target.read_text("utf-8") != text:
                target.write_text(text, "utf-8")
    except OSError:
        return icons_dir()
    return folder.as_posix()


def spin_arrows(c: dict = None) -> str:
    """Fusion draws no spin-box arrows once a stylesheet styles the box: give it ours (the
    light theme's are drawn in its text colour, as files beside the data folder's settings).
    Its check box outline is the window colour darkened, lost on a dark theme: ours is drawn
    in the dim text colour, with a white check on the accent colour when on."""
    c = c or DARK
    d = icons_dir() if c is DARK else _light_arrows(c["TEXT"])
    RAISED = c["RAISED"]
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
QCheckBox::indicator {{ width: 12px; height: 12px; border: 1px solid {c["TEXT_DIM"]}; border-radius: 3px;
    background: {c["BG"]}; }}
QCheckBox::indicator:hover {{ border-color: {c["ACCENT"]}; }}
QCheckBox::indicator:checked {{ background: {c["ACCENT"]}; border-color: {c["ACCENT"]};
    image: url({icons_dir()}/check.svg); }}
QCheckBox::indicator:disabled {{ border-color: {c["BORDER"]}; }}
"""


def palette(c: dict = DARK) -> QtGui.QPalette:
    p = QtGui.QPalette()
    q = QtGui.QColor
    roles = {
        QtGui.QPalette.Window: c["BG"], QtGui.QPalette.WindowText: c["TEXT"], QtGui.QPalette.Base: c["BG"],
        QtGui.QPalette.AlternateBase: c["PANEL"], QtGui.QPalette.ToolTipBase: c["RAISED"],
        QtGui.QPalette.ToolTipText: c["TEXT"], QtGui.QPalette.Text: c["TEXT"], QtGui.QPalette.Button: c["RAISED"],
        QtGui.QPalette.ButtonText: c["TEXT"], QtGui.QPalette.BrightText: "#ffffff",
        QtGui.QPalette.Highlight: c["ACCENT_DIM"], QtGui.QPalette.HighlightedText: c["TEXT"],
        QtGui.QPalette.Link: c["ACCENT"], QtGui.QPalette.PlaceholderText: c["TEXT_DIM"],
        QtGui.QPalette.Mid: c["BORDER"], QtGui.QPalette.Dark: c["SHADOW"], QtGui.QPalette.Light: c["RAISED"],
    }
    for role, color in roles.items():
        p.setColor(role, q(color))
    for role in (QtGui.QPalette.WindowText, QtGui.QPalette.Text, QtGui.QPalette.ButtonText):
        p.setColor(QtGui.QPalette.Disabled, role, q(c["DISABLED"]))
    return p


def saved_theme() -> str:
    from . import session

    name = str(session.settings().value(THEME_KEY, "") or "dark")
    return name if name in THEMES else "dark"


def current() -> dict:
    """The colours of the theme in use."""
    return THEMES.get(getattr(apply, "name", "dark"), DARK)


MIN_POINT_SIZE = 10.0  # the platform default (9 pt on many Linux desktops) reads small on a dense UI


def apply(app: QtWidgets.QApplication, name: str = None) -> None:
    """Style the app with theme `name` (default: the one saved in Preferences)."""
    name = name if name in THEMES else saved_theme()
    colors = THEMES[name]
    apply.name = name
    app.setStyle("Fusion")
    font = app.font()
    if 0 < font.pointSizeF() < MIN_POINT_SIZE:
        font.setPointSizeF(MIN_POINT_SIZE)
        app.setFont(font)
    app.setPalette(palette(colors))
    app.setStyleSheet(stylesheet(colors) + spin_arrows(colors))


# -- icons ------------------------------------------------------------------------------------
ICON_NAMES = ("new", "open", "save", "undo", "redo", "add", "frame", "run", "run-selected", "cancel",
              "gallery", "history", "compare", "preferences", "previous", "next")


def _glyph(p: QtGui.QPainter, name: str, s: float) -> None:
    """Draw icon `name` in a square of side `s` with the painter's pen and brush."""
    u = s / 16.0  # designed on a 16-unit grid
    R = QtCore.QRectF
    P = QtCore.QPointF
    if name == "new":
        path = QtGui.QPainterPath(P(3.5 * u, 1.5 * u))
        for x, y in ((9.5, 1.5), (12.5, 4.5), (12.5, 14.5), (3.5, 14.5)):
            path.lineTo(x * u, y * u)
        path.closeSubpath()
        p.drawPath(path)
        p.drawPolyline([P(9.5 * u, 1.5 * u), P(9.5 * u, 4.5 * u), P(12.5 * u, 4.5 * u)])
    elif name == "open":
        path = QtGui.QPainterPath(P(1.5 * u, 3 * u))
        for x, y in ((6, 3), (7.5, 4.5), (14.5, 4.5), (14.5, 13.5), (1.5, 13.5)):
            path.lineTo(x * u, y * u)
        path.closeSubpath()
        p.drawPath(path)
        p.drawLine(P(1.5 * u, 7 * u), P(14.5 * u, 7 * u))
    elif name == "save":
        p.drawRoundedRect(R(2 * u, 2 * u, 12 * u, 12 * u), 1.5 * u, 1.5 * u)
        p.drawRect(R(5 * u, 2 * u, 6 * u, 4 * u))
        p.drawRect(R(4.5 * u, 9 * u, 7 * u, 5 * u))
    elif name in ("undo", "redo"):
        p.save()
        if name == "redo":
            p.translate(s, 0)
            p.scale(-1, 1)
        p.drawArc(R(3 * u, 4 * u, 10 * u, 9 * u), 90 * 16, -200 * 16)
        p.drawPolyline([P(6.5 * u, 1.5 * u), P(3.5 * u, 4.5 * u), P(6.5 * u, 7.5 * u)])
        p.restore()
    elif name == "add":
        p.drawLine(P(8 * u, 2.5 * u), P(8 * u, 13.5 * u))
        p.drawLine(P(2.5 * u, 8 * u), P(13.5 * u, 8 * u))
    elif name == "frame":
        for x, y, dx, dy in ((2, 2, 1, 1), (14, 2, -1, 1), (2, 14, 1, -1), (14, 14, -1, -1)):
            p.drawPolyline([P(x * u, (y + 4 * dy) * u), P(x * u, y * u), P((x + 4 * dx) * u, y * u)])
        p.drawRect(R(6 * u, 6 * u, 4 * u, 4 * u))
    elif name in ("run", "run-selected"):
        tri = QtGui.QPolygonF([P(4 * u, 2.5 * u), P(13.5 * u, 8 * u), P(4 * u, 13.5 * u)])
        if name == "run-selected":
            tri = QtGui.QPolygonF([P(2.5 * u, 2.5 * u), P(10.5 * u, 8 * u), P(2.5 * u, 13.5 * u)])
            p.drawLine(P(13 * u, 2.5 * u), P(13 * u, 13.5 * u))
        p.save()
        p.setBrush(p.pen().color())
        p.drawPolygon(tri)
        p.restore()
    elif name == "cancel":
        p.save()
        p.setBrush(p.pen().color())
        p.drawRoundedRect(R(3.5 * u, 3.5 * u, 9 * u, 9 * u), 1.2 * u, 1.2 * u)
        p.restore()
    elif name == "gallery":
        for x in (2, 9):
            for y in (2, 9):
                p.drawRoundedRect(R(x * u, y * u, 5 * u, 5 * u), 0.8 * u, 0.8 * u)
    elif name == "history":
        p.drawEllipse(R(2 * u, 2 * u, 12 * u, 12 * u))
        p.drawPolyline([P(8 * u, 4.5 * u), P(8 * u, 8 * u), P(10.5 * u, 10 * u)])
    elif name == "compare":
        p.drawRoundedRect(R(1.5 * u, 3 * u, 13 * u, 10 * u), 1.2 * u, 1.2 * u)
        p.drawLine(P(8 * u, 1 * u), P(8 * u, 15 * u))
        p.save()
        p.setBrush(p.pen().color())
        p.drawRect(R(1.5 * u, 3 * u, 6.5 * u, 10 * u))
        p.restore()
    elif name == "preferences":
        for y, knob in ((3.5, 10.5), (8, 5), (12.5, 9)):
            p.drawLine(P(2 * u, y * u), P(14 * u, y * u))
            p.save()
            p.setBrush(p.pen().color())
            p.drawEllipse(P(knob * u, y * u), 1.8 * u, 1.8 * u)
            p.restore()
    elif name in ("previous", "next"):
        x0, x1 = (10.5, 5.5) if name == "previous" else (5.5, 10.5)
        p.drawPolyline([P(x0 * u, 3 * u), P(x1 * u, 8 * u), P(x0 * u, 13 * u)])
    else:
        raise KeyError(f"no icon named {name!r}")


def icon(name: str, color: str = None) -> QtGui.QIcon:
    """Toolbar icon `name` (one of ICON_NAMES), drawn sharp at every size, greyed when disabled."""
    colors = current()
    out = QtGui.QIcon()
    for mode, c in ((QtGui.QIcon.Normal, color or colors["TEXT"]), (QtGui.QIcon.Disabled, colors["DISABLED"])):
        for side in (16, 20, 24, 32, 48, 64):
            pm = QtGui.QPixmap(side, side)
            pm.fill(QtCore.Qt.transparent)
            p = QtGui.QPainter(pm)
            p.setRenderHint(QtGui.QPainter.Antialiasing)
            pen = QtGui.QPen(QtGui.QColor(c), max(1.0, side / 16 * 1.4))
            pen.setCapStyle(QtCore.Qt.RoundCap)
            pen.setJoinStyle(QtCore.Qt.RoundJoin)
            p.setPen(pen)
            p.setBrush(QtCore.Qt.NoBrush)
            _glyph(p, name, float(side))
            p.end()
            out.addPixmap(pm, mode)
    return out

