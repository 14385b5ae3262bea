"""The Loomwork desktop app (PySide6). `main(argv)` opens the window.

Map of the package (each module's docstring says more):
  document.py       the open Graph + the one QUndoStack; every edit is a command here
  canvas.py         NodeGraphQt as a view of the document: sync one way, gestures the other way
  ngqt_compat.py    everything we change about NodeGraphQt, in one place
  inspector.py      param forms generated from node declarations
  layout_canvas.py  drawing Layout boxes (edits the node's `boxes` param through the stack)
  layout_paint.py     painting a region's mask (brush, eraser, clear, import a mask image)
  layout_align.py     snap and align math for boxes (pure functions)
  image_viewer.py   results and live previews, zoom, save
  runner.py         the engine in a worker thread, events as Qt signals; torch warm-up
  palette.py        side list of node types and the Tab search popup
  session.py        recent files, autosave and crash recovery, window layout (user data dir)
  theme.py          the dark palette and stylesheet
  window.py         the main window: builds the panels and wires them; its jobs are mixins in
  actions.py          actions, shortcuts, menus and toolbar
  editing.py          edit commands (add, copy/paste, duplicate, delete, group)
  files.py            open, save, recent files, examples, crash recovery, dropped files
  run_control.py      starting and cancelling runs; badges, progress, results
  resources.py      shipped files the window shows: default graph, examples, icon

Decisions a user would notice: New starts from the default graph (a working text-to-image chain),
not an empty canvas; a graph opened from a PNG saves as a new .loom, never over the image; images
from unsaved graphs go to ~/Pictures/Loomwork (saved graphs: an `output` folder beside them).

Start-up order matters for speed: Qt and our widgets first, window shown, then torch is imported
in a background thread (Runner.warm_up), so the window never waits on it.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from typing import Optional

__all__ = ["main", "install_excepthook"]


def install_excepthook(window) -> None:
    """Unexpected errors become a message (status bar, and a dialog for the first of a burst)
    instead of ending the app: a bug in one handler must not lose the user's graph."""
    from PySide6 import QtCore, QtWidgets

    state = {"open": False}

    def report(text: str, detail: str) -> None:
        sys.stderr.write(detail)
        try:
            window.show_message(f"Internal error: {text}", 20000)
        except Exception:
            return
        if state["open"] or os.environ.get("QT_QPA_PLATFORM") == "offscreen":
            return
        state["open"] = True
        box = QtWidgets.QMessageBox(QtWidgets.QMessageBox.Warning, "Loomwork: internal error",
                                    f"Something went wrong, but your graph is safe:\n{text}",
                                    QtWidgets.QMessageBox.Ok, window)
        box.setDetailedText(detail)
        box.finished.connect(lambda _r: state.update(open=False))
        box.open()

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt):
            QtWidgets.QApplication.quit()
            return
        detail = "".join(traceback.format_exception(exc_type, exc, tb))
        text = f"{exc_type.__name__}: {exc}"
        if threading.current_thread() is threading.main_thread():
            report(text, detail)
        else:  # from a worker thread: hop to the UI thread
            QtCore.QTimer.singleShot(0, window, lambda: report(text, detail))

    sys.excepthook = hook
    threading.excepthook = lambda args: hook(args.exc_type, args.exc_value, args.exc_traceback)


def _apply_ui_scale() -> None:
    """Preferences' interface scale, read before Qt starts (QT_SCALE_FACTOR set by hand wins)."""
    import os

    from . import session

    scale = session.ui_scale()
    if scale and "QT_SCALE_FACTOR" not in os.environ:
        os.environ["QT_SCALE_FACTOR"] = scale


def create_app(argv: Optional[list[str]] = None):
    from PySide6 import QtWidgets

    from . import theme
    from .ngqt_compat import keep_none_alive

    keep_none_alive()  # PySide6 6.12 + Python 3.11 otherwise aborts after a few thousand Qt calls
    if QtWidgets.QApplication.instance() is None:
        _apply_ui_scale()
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(["loomwork", *(argv or [])])
    app.setApplicationName("Loomwork")
    app.setOrganizationName("Loomwork")
    app.setDesktopFileName("loomwork")
    theme.apply(app)
    if app.platformName() == "offscreen" and not getattr(create_app, "_clipboard_guard", False):
        # PySide6 6.12's offscreen platform segfaults at exit if the clipboard still holds mime
        # data we set (tests, headless runs). Empty it while Python is still alive.
        import atexit

        def release_clipboard():
            from PySide6 import QtWidgets as _w

            if _w.QApplication.instance() is not None:
                _w.QApplication.clipboard().clear()

        atexit.register(release_clipboard)
        create_app._clipboard_guard = True
    return app


def desktop_environment() -> None:
    """Settings that must be in place before torch loads (it loads after the window shows).

    OpenMP's default is to spin its worker threads while they wait for work; on a desktop that
    takes whole cores away from the UI thread (and from everything else the user runs). Measured
    on a 2-core machine with one core busy, a tiny-model run went from ~1 s to 16-80 s and the
    UI stuttered. Passive waiting costs a little throughput and keeps the app responsive.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    desktop_environment()
    app = create_app([a for a in argv if a.startswith("-")])
    from PySide6 import QtCore

    from .window import MainWindow, app_icon, default_graph

    app.setWindowIcon(app_icon())
    window = MainWindow()
    install_excepthook(window)
    paths = [a for a in argv if not a.startswith("-")]
    window.show()
    opened = False
    if paths:
        opened = window.open_path(paths[0], ask=False)
    if not opened:
        window.doc.replace(default_graph(), None)

    def after_shown():
        # Recovery first (it is about work the user may lose), then warm torch up.
        if os.environ.get("LOOMWORK_QUIT_AFTER_SHOWN"):  # bench/ui.py measures start-up
            import time

            print(f"LOOMWORK_SHOWN {time.time():.6f} torch_loaded={'torch' in sys.modules}", flush=True)
            QtCore.QTimer.singleShot(0, app.quit)
            return
        if not paths:
            window.offer_recovery()
        window.runner.warm_up()

    QtCore.QTimer.singleShot(0, after_shown)
    return app.exec()
