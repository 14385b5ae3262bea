"""The desktop app's files, recovery, messages and start-up, through its widgets (pytest-qt,
offscreen, no torch)."""

import json
import os

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("NodeGraphQt")

# NodeGraphQt 0.6 still calls Qt5-era event methods (QMouseEvent.pos()...): not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Function.*is marked as deprecated:DeprecationWarning")

from conftest import load_and_encode_on_canvas  # noqa: E402
from PySide6 import QtCore, QtGui, QtWidgets  # noqa: E402


def test_save_and_reopen(window, tmp_path):
    from app.graph import dumps

    doc, load, text = load_and_encode_on_canvas(window)
    window.canvas.request_connection(load, "clip", text, "clip")
    doc.set_param(text, "text", "saved prompt")
    assert doc.dirty and window.isWindowModified()
    path = str(tmp_path / "g.loom")
    assert window._save_to(path)
    assert not doc.dirty and not window.isWindowModified() and window.windowTitle().startswith("g.loom")
    saved = dumps(doc.graph)
    window.doc.replace(__import__("app.graph", fromlist=["Graph"]).Graph(), None)
    assert window.open_path(path, ask=False)
    assert dumps(window.doc.graph) == saved
    assert window.canvas.shown_edges() == {(load, "clip", text, "clip")}
    from app.ui import session
    assert session.recent_files()[0] == str((tmp_path / "g.loom").resolve())


def test_a_bad_file_shows_a_message_and_keeps_the_graph(window, tmp_path):
    doc, load, text = load_and_encode_on_canvas(window)
    bad = tmp_path / "bad.loom"
    bad.write_text('{"format": "loomwork.graph", "version": 99}')
    assert not window.open_path(str(bad), ask=False)
    assert "newer Loomwork" in window.statusBar().currentMessage()
    assert set(doc.graph.nodes) == {load, text}


def test_dropping_a_file_opens_it(window, tmp_path):
    from app.graph import save
    from app.ui.window import default_graph

    path = tmp_path / "dropped.loom"
    save(default_graph(), path)
    mime = QtCore.QMimeData()
    mime.setUrls([QtCore.QUrl.fromLocalFile(str(path))])
    window.canvas.viewer.files_dropped.emit([str(path)], QtCore.QPointF())
    assert window.doc.path == str(path.resolve())
    # and a real drop on the window (over a panel, not the canvas)
    other = tmp_path / "other.loom"
    save(default_graph(), other)
    mime.setUrls([QtCore.QUrl.fromLocalFile(str(other))])
    target = window.inspector
    pos = QtCore.QPointF(target.mapTo(window, QtCore.QPoint(10, 10)))
    enter = QtGui.QDragEnterEvent(pos.toPoint(), QtCore.Qt.CopyAction, mime, QtCore.Qt.LeftButton,
                                  QtCore.Qt.NoModifier)
    QtWidgets.QApplication.sendEvent(window, enter)
    assert enter.isAccepted()
    drop = QtGui.QDropEvent(pos, QtCore.Qt.CopyAction, mime, QtCore.Qt.LeftButton, QtCore.Qt.NoModifier)
    QtWidgets.QApplication.sendEvent(window, drop)
    assert window.doc.path == str(other.resolve())


def test_autosave_and_recovery(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOMWORK_DATA_DIR", str(tmp_path / "data"))
    from app.ui import create_app, session
    from app.ui.window import MainWindow

    create_app()
    w = MainWindow(autosave=True)
    w._closing_ok = True
    qtbot.addWidget(w)
    w.autosave.timer.setInterval(50)
    w.add_node("Sampler", QtCore.QPointF(0, 0))
    qtbot.waitUntil(lambda: w.autosave.graph_file.exists(), timeout=3000)
    info = json.loads(w.autosave.info_file.read_text())
    assert info["pid"] == os.getpid()
    assert session.find_recoveries() == []  # our own session is alive: not a crash
    # pretend the process died: a pid that does not exist
    info["pid"] = 2**22 + 12345
    w.autosave.info_file.write_text(json.dumps(info))
    found = session.find_recoveries()
    assert len(found) == 1
    w2 = MainWindow(autosave=False)
    w2._closing_ok = True
    qtbot.addWidget(w2)
    monkeypatch.setattr(QtWidgets.QMessageBox, "question", lambda *a, **k: QtWidgets.QMessageBox.Yes)
    assert w2.offer_recovery()
    assert [n.type for n in w2.doc.graph.nodes.values()] == ["Sampler"]
    assert w2.doc.dirty  # recovered work is not saved anywhere yet
    assert session.find_recoveries() == []


def test_excepthook_turns_errors_into_messages(window):
    import sys

    from app.ui import install_excepthook

    old = sys.excepthook, __import__("threading").excepthook
    try:
        install_excepthook(window)
        try:
            raise RuntimeError("boom in a slot")
        except RuntimeError:
            sys.excepthook(*sys.exc_info())
        assert "boom in a slot" in window.statusBar().currentMessage()
    finally:
        sys.excepthook, __import__("threading").excepthook = old


def test_app_does_not_import_torch(window):
    import subprocess
    import sys

    code = ("import os, sys; os.environ['QT_QPA_PLATFORM']='offscreen';"
            "from app.ui import create_app; create_app();"
            "from app.ui.window import MainWindow, default_graph; w = MainWindow(autosave=False); w.show();"
            "w.doc.replace(default_graph(), None);"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr


def test_placeholder_nodes_show_and_survive(window, tmp_path):

    src = tmp_path / "p.loom"
    src.write_text(json.dumps({
        "format": "loomwork.graph", "version": 2,
        "nodes": [{"id": "a", "type": "FutureThing", "version": 3, "params": {"k": [1, 2]}, "pos": [0, 0]},
                  {"id": "b", "type": "PreviewImage", "version": 1, "params": {}, "pos": [300, 0]}],
        "edges": [{"from": {"node": "a", "port": "image"}, "to": {"node": "b", "port": "image"}}],
        "groups": [], "meta": {}}))
    assert window.open_path(str(src), ask=False)
    assert window.canvas.shown_edges() == {("a", "image", "b", "image")}
    window.canvas.select(["a"])
    assert window.inspector.fields == {}  # nothing to edit, and no crash
    out = tmp_path / "q.loom"
    window._save_to(str(out))
    assert json.loads(out.read_text())["nodes"][0]["params"] == {"k": [1, 2]}


def test_image_viewer_zoom_filter_and_save(window, tmp_path):
    image = QtGui.QImage(16, 16, QtGui.QImage.Format_RGB888)
    image.fill(QtGui.QColor("#ff0000"))
    viewer = window.images
    viewer.add_image(image, "Save", None)
    assert viewer.view.item.transformationMode() == QtCore.Qt.FastTransformation  # hard pixels
    viewer.smooth_box.setChecked(True)
    assert viewer.view.item.transformationMode() == QtCore.Qt.SmoothTransformation
    viewer.x8_btn.click()
    assert viewer.view.zoom() == 8.0
    out = viewer.save_current(str(tmp_path / "x.png"))
    assert QtGui.QImage(out).size() == QtCore.QSize(16, 16)


def test_command_line_opens_a_graph_or_survives_a_bad_one(tmp_path):
    import subprocess
    import sys

    from app.graph import save
    from app.ui.window import default_graph

    good = tmp_path / "g.loom"
    save(default_graph(), good)
    bad = tmp_path / "bad.loom"
    bad.write_text("{not json")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", LOOMWORK_QUIT_AFTER_SHOWN="1",
               LOOMWORK_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=root)
    for path in (good, bad):
        out = subprocess.run([sys.executable, "-m", "app.main", str(path)], env=env, cwd=root,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "LOOMWORK_SHOWN" in out.stdout and "torch_loaded=False" in out.stdout


def test_window_layout_is_remembered(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOMWORK_DATA_DIR", str(tmp_path / "data"))
    from app.ui import create_app
    from app.ui.window import MainWindow

    create_app()
    w = MainWindow(autosave=False)
    qtbot.addWidget(w)
    w.image_dock.hide()
    w.close()
    w2 = MainWindow(autosave=False)
    w2._closing_ok = True
    qtbot.addWidget(w2)
    assert w2.image_dock.isHidden()


def test_nodes_that_cannot_run_say_why_before_running(window, qtbot):
    doc = window.doc
    sampler = window.add_node("Sampler", QtCore.QPointF(300, 0))
    qtbot.waitUntil(lambda: window.canvas.badge_text(sampler) == "needs input", timeout=2000)
    assert "'model' (MODEL) is not connected" in window.canvas._badges[sampler].toolTip()
    window.canvas.select([sampler])
    assert "⚠ input 'model' (MODEL) is not connected" in window.inspector.status_text
    load = window.add_node("LoadModel", QtCore.QPointF(0, 0))
    window.canvas.request_connection(load, "model", sampler, "model")
    qtbot.wait(10)
    assert "'model'" not in window.canvas._badges[sampler].toolTip()  # what is left to wire
    doc.set_param(load, "dtype", "float16")
    qtbot.wait(10)
    assert window.canvas.badge_text(load) == ""  # a valid, never-run node has no badge
    doc.remove_nodes([sampler])
    window.act_undo.trigger()
    qtbot.wait(10)
    assert window.canvas.badge_text(sampler) == "needs input"


def test_examples_open_as_untitled_copies(window):
    examples = window.example_graphs()
    assert examples and any(p.name == "default.loom" for p in examples)
    for path in examples:  # every shipped graph opens (and shows) without a problem
        assert window.open_example(path), path
        assert window.doc.path is None and len(window.canvas._items) == len(window.doc.graph.nodes)
