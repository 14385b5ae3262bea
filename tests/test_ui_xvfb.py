"""The real window on a real X server (Xvfb): it opens, runs the default graph, and is
photographed. The screenshots are for a person to look at (the test checks only that the
window drew something): under the pytest tmp dir, with a copy at /tmp/loomwork-screenshot.png
(and -2x.png at QT_SCALE_FACTOR=2).

Skipped only when there is no X server to test on (Xvfb not installed, or it does not start).
Once the server is up, anything else is the app's fault and fails the test with its stderr:
a Qt that cannot reach the server, a crash, a missing screenshot."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

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


def _accepts_connections(socket_path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(socket_path))
        except OSError:
            return False
    return True


@pytest.fixture
def xvfb(request, tmp_path):
    """An X server; at 200% a 3200x2000 screen, so both scales lay out 1600x1000 logical px.
    Skips when Xvfb is not installed or our server does not come up (its stderr says why)."""
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed")
    scale = int(request.node.callspec.params.get("scale", "1"))
    display = _free_display()
    size = f"{1600 * scale}x{1000 * scale}x24"
    log = tmp_path / "xvfb.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(["Xvfb", f":{display}", "-screen", "0", size, "-nolisten", "tcp"],
                                stdout=subprocess.DEVNULL, stderr=err)
    sock = Path(f"/tmp/.X11-unix/X{display}")
    for _ in range(100):
        # alive too: another server that took the same display number would also answer
        if proc.poll() is not None or _accepts_connections(sock):
            break
        time.sleep(0.05)
    if proc.poll() is not None or not _accepts_connections(sock):
        proc.kill()
        proc.wait(10)
        pytest.skip(f"Xvfb did not start on :{display}: {log.read_text(errors='replace')[-400:]}")
    yield f":{display}"
    proc.terminate()
    proc.wait(10)


def app_failure(returncode: int, stderr: str, shot: Path) -> Optional[str]:
    """What went wrong with the app under a running X server, with the end of its stderr; None
    when it exited cleanly with its screenshot taken."""
    if returncode < 0:
        try:
            what = f"the app died of {signal.Signals(-returncode).name}"
        except ValueError:
            what = f"the app died of signal {-returncode}"
    elif returncode != 0:
        what = f"the app exited with status {returncode}"
    elif not shot.exists():
        what = "the app exited without taking its screenshot"
    else:
        return None
    return f"{what}; its stderr ends:\n{stderr[-3000:]}"


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
    try:
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(shot)], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"the app did not finish in 240 s; its stderr ends:\n{stderr[-3000:]}")
    failure = app_failure(out.returncode, out.stderr, shot)
    assert failure is None, failure
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


def test_after_the_x_server_starts_every_way_of_going_wrong_fails(tmp_path):
    """The stderr that used to turn a crash into a skip (Qt naming xcb or the display) is now in
    the failure message; a crash at exit fails even with the screenshot taken."""
    shot = tmp_path / "shot.png"
    stderr = "qt.qpa.xcb: could not connect to display :99\nFatal Python error: Aborted\n"
    crash = app_failure(-signal.SIGABRT, stderr, shot)
    assert "SIGABRT" in crash and "could not connect to display" in crash
    assert "status 1" in app_failure(1, stderr, shot)
    assert "without taking its screenshot" in app_failure(0, "", shot)
    shot.write_bytes(b"")
    assert "SIGSEGV" in app_failure(-signal.SIGSEGV, "", shot)
    assert app_failure(0, "qt.qpa.xcb: a warning only", shot) is None
