"""History of runs across sessions, and the file-name pattern the run queue applies (tiny model)."""

import json

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("NodeGraphQt")

pytestmark = pytest.mark.filterwarnings("ignore:Function.*is marked as deprecated:DeprecationWarning")

from conftest import txt2img_graph  # noqa: E402


def _run(qtbot, window):
    with qtbot.waitSignal(window.history.added, timeout=180_000) as blocker:
        window.act_run.trigger()
    return blocker.args[0]


def test_a_run_is_recorded_on_disk_and_reopens_exactly_as_an_untitled_copy(window, qtbot, tiny_pixel_model, tmp_path):
    pytest.importorskip("torch")
    from app.graph import dumps
    from app.ui import session
    from app.ui.history import HistoryStore
    from app.ui.run_queue import NAME_PATTERN_KEY

    graph, ids = txt2img_graph(tiny_pixel_model, steps=2, size=16, seed=5)
    window.doc.replace(graph, None)
    ran_text = dumps(window.doc.graph, strict=False)
    record = _run(qtbot, window)
    # the default pattern keeps the names the engine always gave
    assert [o["path"] for o in record.outputs] == [str(tmp_path / "out" / "test_00001.png")]
    assert record.status == "done" and record.graph_text == ran_text
    assert record.overrides["seeds"] == {ids["sampler"]: 5} and record.overrides["file_names"] == {}
    assert record.outputs[0]["node"] == ids["save"] and record.outputs[0]["title"] == "Save"
    assert record.started_at >= record.queued_at and record.ended_at >= record.started_at

    # a pattern from Preferences names the next run's files; the record keeps the graph as queued
    session.settings().setValue(NAME_PATTERN_KEY, "{graph}_{node}_{seed}_{counter:05}")
    window.doc.set_param(ids["sampler"], "seed", 8)
    second = _run(qtbot, window)
    assert second.paths() == [str(tmp_path / "out" / "untitled_Save_8_00001.png")]
    assert second.overrides["file_names"] == {ids["save"]: "untitled_Save_8"}
    assert json.loads(second.graph_text)["nodes"][[n["id"] for n in json.loads(second.graph_text)["nodes"]]
                                                   .index(ids["save"])]["params"]["prefix"] == "test"

    # another session (a new store on the same folder) sees both, newest first
    later = HistoryStore(window.history.folder)
    assert [r.id for r in later.records()] == [second.id, record.id]

    # reopening the first run gives its graph exactly, untitled, whatever was edited since
    window.doc.set_param(ids["sampler"], "steps", 9)
    window.doc.undo.clear()  # no unsaved-changes question: the test window has no one to answer
    window.doc.undo.setClean()
    window.history_dock.show()
    window.history_panel.reload()
    assert window.history_panel.list.count() == 2
    window.history_panel.list.setCurrentRow(1)
    assert window.history_panel.reopen_btn.isEnabled()
    window.history_panel.reopen()
    assert window.doc.path is None and dumps(window.doc.graph, strict=False) == ran_text

    # Show outputs puts the run's images in the gallery, labelled from the history
    window.history_panel.list.setCurrentRow(0)
    window.history_panel.show_outputs()
    entries = window.gallery.model.entries
    assert [e.path for e in entries] == second.paths()
    assert entries[0].label() == "untitled · Save\nseed 8"


def test_the_store_skips_damaged_records_and_keeps_the_newest(qapp, tmp_path):
    from app.ui.history import HistoryStore, RunRecord

    store = HistoryStore(tmp_path / "history", max_records=3)
    for k in range(5):
        store.add(RunRecord(id=f"2026010{k}-000000-aaaa", graph_text='{"nodes": []}', status="done", ended_at=k))
    (tmp_path / "history" / "20269999-000000-bad.json").write_text("{ not json", "utf-8")
    # the oldest records went; the damaged file is skipped, not deleted
    assert [r.id for r in store.records()] == [f"2026010{k}-000000-aaaa" for k in (4, 3, 2)]
    store.add(RunRecord(id="20260105-000000-aaaa", graph_text='{"nodes": []}', status="done"))
    assert [r.id for r in store.records()] == ["20260105-000000-aaaa", "20260104-000000-aaaa"]
    assert (tmp_path / "history" / "20269999-000000-bad.json").exists()
    with pytest.raises(ValueError):
        RunRecord.from_json({"id": "x"})  # no graph


def test_the_file_name_pattern_is_checked_and_expanded_per_saving_node(qapp, tiny_pixel_model):
    from app.ui.run_queue import DEFAULT_NAME_PATTERN, expand_file_names, name_pattern_problem

    assert name_pattern_problem(DEFAULT_NAME_PATTERN) is None
    assert "end with _{counter:05}" in name_pattern_problem("{graph}_{seed}")
    assert "unknown field {colour}" in name_pattern_problem("{colour}_{counter:05}")
    graph, ids = txt2img_graph(tiny_pixel_model, seed=77)
    graph.nodes[ids["save"]].title = "Final image"
    assert expand_file_names(graph.copy(), DEFAULT_NAME_PATTERN, "/x/portrait.loom") == {}
    out = expand_file_names(graph, "{graph}_{node}_{seed}_{prefix}_{counter:05}", "/x/portrait.loom")
    assert out == {ids["save"]: "portrait_Final-image_77_test"}
    assert graph.nodes[ids["save"]].params["prefix"] == "portrait_Final-image_77_test"
