"""The Batch dialog: a sweep of one param started from the window's graph runs off the UI
thread, and the contact sheet fills in as jobs finish (jobs on the in-process backend here; the
worker backends are tests/test_batch_workers.py's)."""

import json
from pathlib import Path

from app.batch.local import InProcessBackend
from app.graph import load
from nodes import registry

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "resources" / "graphs" / "default.loom"


def test_run_menu_has_the_batch_entry(window):
    run_menu = next(a.menu() for a in window.menuBar().actions() if a.text() == "&Run")
    assert "&Batch…" in [a.text() for a in run_menu.actions()]


def test_dialog_sweeps_a_param_and_fills_the_sheet(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOMWORK_CACHE_DIR", str(tmp_path / "cache"))
    from app.ui import create_app
    from app.ui.batch_dialog import BatchDialog

    create_app()
    graph = load(DEFAULT, registry.get)
    sampler = next(n for n in graph.nodes.values() if n.type == "Sampler")
    graph.set_param(sampler.id, "steps", 1)
    dialog = BatchDialog(graph, str(DEFAULT), str(tmp_path), backend_factory=lambda n: InProcessBackend())
    qtbot.addWidget(dialog)
    assert dialog.param.currentData() == f"{sampler.id}.seed"  # a seed is the first choice
    dialog.values.setText("0..3")
    dialog.out.setText(str(tmp_path / "b"))
    dialog.start()
    assert dialog.running and not dialog.start_button.isEnabled()
    qtbot.waitUntil(lambda: not dialog.running and dialog.start_button.isEnabled(), timeout=180_000)
    assert dialog.status.text().startswith("Finished: 4 of 4 done"), dialog.status.text()
    assert dialog.sheets_shown == 4  # redrawn at each finished job
    pix = dialog.sheet.pixmap()
    assert (pix.width(), pix.height()) == (2 * 128, 2 * (128 + 18))
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [j["overrides"] for j in results["jobs"]] == [{f"{sampler.id}.seed": s} for s in range(4)]


def test_a_bad_value_is_shown_and_nothing_runs(qtbot, tmp_path):
    from app.ui import create_app
    from app.ui.batch_dialog import BatchDialog

    create_app()
    dialog = BatchDialog(load(DEFAULT, registry.get), str(DEFAULT), str(tmp_path),
                         backend_factory=lambda n: InProcessBackend())
    qtbot.addWidget(dialog)
    dialog.values.setText("5..1")
    dialog.start()
    assert not dialog.running and "Not started" in dialog.status.text() and "before it starts" in dialog.status.text()
    assert not (tmp_path / "batch").exists()
