"""The real window on a real X server (Xvfb): it opens, runs the default graph, and is
photographed. The screenshots are for a person to look at (the test checks only that the
window drew something): under the pytest tmp dir, with a copy at /tmp/loomwork-screenshot.png
(and -2x.png at QT_SCALE_FACTOR=2)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import os, sys, time
from PySide6 import QtCore, QtGui, QtWidgets
from app.ui import create_app, install_excepthook
from app.ui.window import MainWindow, default_graph

app = create_app()
w = MainWindow(autosave=False)
install_excepthook(w)
w._closing_ok = True
w.show()
graph = default_graph()
model = os.environ.get("SHOT_MODEL")
if model:  # the built-in model is not shipped yet in this checkout: a tiny one stands in
    for n in graph.nodes.values():
        if n.type == "LoadModel":
            n.params["path"] = model
w.doc.replace(graph, None)
sampler = next((i for i, n in graph.nodes.items() if n.type == "Sampler"), None)
shot = sys.argv[1]

def grab():
    app.processEvents()
    QtGui.QGuiApplication.primaryScreen().grabWindow(0).save(shot)
    app.quit()

def finished(_report):
    w.canvas.frame()
    if sampler:
        w.canvas.select([sampler])
    QtCore.QTimer.singleShot(800, grab)

w.runner.finished.connect(finished)
QtCore.QTimer.singleShot(300, w.run_all)
QtCore.QTimer.singleShot(120_000, app.quit)
app.exec()
"""


def _free_display() -> int:
    for n in range(90 + os.getpid() % 50, 200):
        if not Path(f"/tmp/.X11-unix/X{n}").exists() and not Path(f"/tmp/.X{n}-lock").exists():
            return n
    raise RuntimeError("no free X display number")


@pytest.fixture
def xvfb(request):
    """An X server; at 200% a 3200x2000 screen, so both scales lay out 1600x1000 logical px."""
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed")
    scale = int(request.node.callspec.params.get("scale", "1"))
    display = _free_display()
    size = f"{1600 * scale}x{1000 * scale}x24"
    proc = subprocess.Popen(["Xvfb", f":{display}", "-screen", "0", size, "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if Path(f"/tmp/.X11-unix/X{display}").exists():
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.skip("Xvfb did not start")
    yield f":{display}"
    proc.terminate()
    proc.wait(10)


@pytest.mark.xvfb
@pytest.mark.slow
@pytest.mark.parametrize("scale", ["1", "2"])
def test_real_window_screenshot(xvfb, tmp_path, scale, tiny_pixel_model):
    from PySide6 import QtGui

    shot = tmp_path / f"loomwork-{scale}x.png"
    env = dict(os.environ, DISPLAY=xvfb, QT_QPA_PLATFORM="xcb", QT_SCALE_FACTOR=scale,
               LOOMWORK_DATA_DIR=str(tmp_path / "data"), LOOMWORK_CACHE_DIR=str(tmp_path / "cache"),
               LOOMWORK_OUTPUT_DIR=str(tmp_path / "out"), PYTHONPATH=str(ROOT))
    if not (ROOT / "resources" / "models" / "shapes-t2i").exists():
        env["SHOT_MODEL"] = tiny_pixel_model
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(shot)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=240)
    if "could not connect to display" in out.stderr or "xcb" in out.stderr and not shot.exists():
        pytest.skip(f"Qt cannot use the X server: {out.stderr[-400:]}")
    assert shot.exists(), out.stderr[-2000:]
    image = QtGui.QImage(str(shot))
    assert image.width() >= 1600 * int(scale) and image.height() >= 1000 * int(scale)
    # the window drew: the picture is not one flat colour
    colours = {image.pixel(x, y) for x in range(0, image.width(), 37) for y in range(0, image.height(), 37)}
    assert len(colours) > 20
    copy = Path("/tmp/loomwork-screenshot.png" if scale == "1" else "/tmp/loomwork-screenshot-2x.png")
    try:
        shutil.copyfile(shot, copy)
    except OSError:
        pass
