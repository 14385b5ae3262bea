"""Running graphs from the app: worker thread, node states, images on nodes, cancel (tiny model)."""

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("NodeGraphQt")
pytest.importorskip("torch")

# NodeGraphQt 0.6 still calls Qt5-era event methods (QMouseEvent.pos()...): not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Function.*is marked as deprecated:DeprecationWarning")

from conftest import txt2img_graph  # noqa: E402


def _finished(qtbot, w, timeout=120_000):
    with qtbot.waitSignal(w.runner.finished, timeout=timeout) as blocker:
        pass
    return blocker.args[0]


def test_run_shows_the_image_on_the_output_node(window, qtbot, tiny_pixel_model, tmp_path):
    graph, ids = txt2img_graph(tiny_pixel_model, steps=3, size=16)
    window.doc.replace(graph, None)
    states = []
    window.runner.node_state.connect(lambda nid, state, info: states.append((nid, state)))
    progress = []
    window.runner.progress.connect(lambda nid, i, n: progress.append((i, n)))
    with qtbot.waitSignal(window.runner.finished, timeout=180_000) as blocker:
        window.act_run.trigger()
        assert window.runner.busy and window.act_run.isEnabled()  # a second Run queues
    report = blocker.args[0]
    assert not isinstance(report, str), report
    assert report.ok, report.as_json()
    thumb = window.canvas.thumbnail(ids["save"])
    assert thumb is not None and (thumb.width(), thumb.height()) == (16, 16)
    assert window.images.current is not None and window.images.current.width() == 16
    assert window.images.images[0][2].startswith(str(tmp_path / "out"))  # saved where we said
    assert (ids["sampler"], "running") in states and (ids["save"], "done") in states
    assert progress and progress[-1] == (3, 3)
    assert window.canvas.badge_text(ids["sampler"]).startswith("done")
    assert window.act_run.isEnabled() and not window.act_cancel.isEnabled()
    assert "Done" in window.statusBar().currentMessage()

    # Deleting the output node and undoing brings back its badge and image too.
    window.canvas.select([ids["save"]])
    window.act_delete.trigger()
    window.act_undo.trigger()
    assert window.canvas.thumbnail(ids["save"]) is not None
    assert window.canvas.badge_text(ids["save"]).startswith("done")

    # A param edit marks its downstream cone stale at once; a re-run only redoes that part.
    window.doc.set_param(ids["sampler"], "seed", 7)
    assert window.states[ids["sampler"]] == "stale" and window.states[ids["decode"]] == "stale"
    assert window.states[ids["text"]] != "stale"
    report = None
    with qtbot.waitSignal(window.runner.finished, timeout=180_000) as blocker:
        window.act_run.trigger()
    report = blocker.args[0]
    assert report.status(ids["text"]) == "cached-memory" and report.status(ids["sampler"]) == "ran"

    # Run to the selected node: only its cone.
    window.canvas.select([ids["text"]])
    with qtbot.waitSignal(window.runner.finished, timeout=60_000) as blocker:
        window.act_run_sel.trigger()
    assert set(blocker.args[0].nodes) == {ids["load"], ids["text"]}


def test_cancel_a_run(window, qtbot, tiny_pixel_model):
    graph, ids = txt2img_graph(tiny_pixel_model, steps=400, size=16, seed=3)
    window.doc.replace(graph, None)

    def cancel_once(nid, step, total):
        if step == 2:
            window.act_cancel.trigger()

    window.runner.progress.connect(cancel_once)
    with qtbot.waitSignal(window.runner.finished, timeout=180_000) as blocker:
        window.act_run.trigger()
    report = blocker.args[0]
    assert report.cancelled
    assert report.nodes[ids["sampler"]].status == "skipped"
    assert report.status(ids["load"]) in ("ran", "cached-memory", "cached-disk")  # finished work stays
    assert "Cancelled" in window.statusBar().currentMessage()
    assert window.act_run.isEnabled()


def test_a_failing_node_is_shown_not_raised(window, qtbot, tmp_path):
    graph, ids = txt2img_graph(str(tmp_path / "no-such-model"), steps=2, size=16)
    window.doc.replace(graph, None)
    with qtbot.waitSignal(window.runner.finished, timeout=120_000) as blocker:
        window.act_run.trigger()
    report = blocker.args[0]
    assert report.nodes[ids["load"]].status == "failed"
    assert window.states[ids["load"]] == "failed"
    assert window.canvas._badges[ids["load"]].toolTip()  # the message on hover
    assert "failed" in window.statusBar().currentMessage()
    window.canvas.select([ids["load"]])
    assert window.inspector.status_text.startswith("Last run: failed")


def test_editing_during_a_run_leaves_its_results_stale(window, qtbot, tiny_pixel_model):
    graph, ids = txt2img_graph(tiny_pixel_model, steps=30, size=16, seed=5)
    window.doc.replace(graph, None)

    def edit_once(nid, step, total):
        if step == 1:
            window.doc.set_param(ids["sampler"], "cfg", 2.5)  # the UI stays editable

    window.runner.progress.connect(edit_once)
    with qtbot.waitSignal(window.runner.finished, timeout=180_000) as blocker:
        window.act_run.trigger()
    assert blocker.args[0].ok
    assert window.states[ids["sampler"]] == "stale" and window.states[ids["save"]] == "stale"
    assert window.states[ids["text"]] in ("done", "cached-memory")
    assert window.doc.graph.nodes[ids["sampler"]].params["cfg"] == 2.5


def test_saving_a_result_from_the_viewer_keeps_its_graph(window, qtbot, tiny_pixel_model, tmp_path):
    from app.graph import load
    from nodes import registry

    graph, ids = txt2img_graph(tiny_pixel_model, steps=2, size=16)
    window.doc.replace(graph, None)
    with qtbot.waitSignal(window.runner.finished, timeout=120_000):
        window.act_run.trigger()
    out = window.images.save_current(str(tmp_path / "copy.png"))
    reopened = load(out, registry.get)  # a Loomwork PNG: its graph comes back
    assert set(reopened.nodes) == set(graph.nodes)


def test_opening_a_result_png_reopens_its_graph(window, qtbot, tiny_pixel_model):
    from app.graph import dumps

    graph, ids = txt2img_graph(tiny_pixel_model, steps=2, size=16)
    window.doc.replace(graph, None)
    with qtbot.waitSignal(window.runner.finished, timeout=120_000):
        window.act_run.trigger()
    png = window.images.images[0][2]
    expected = dumps(window.doc.graph)
    window.doc.replace(__import__("app.graph", fromlist=["Graph"]).Graph(), None)
    assert window.open_path(png, ask=False)
    assert dumps(window.doc.graph) == expected
    assert window.doc.path is None  # Save asks for a .loom name rather than overwrite the image


def test_a_new_graph_shows_nothing_of_the_last_ones_runs(window, qtbot, tiny_pixel_model, tmp_path):
    """The failed label, the results strip and the Layout panel's image belong to their graph."""
    graph, ids = txt2img_graph(tiny_pixel_model, steps=2, size=16)
    window.doc.replace(graph, None)
    with qtbot.waitSignal(window.runner.finished, timeout=120_000):
        window.act_run.trigger()
    assert window.images.images and window.layout_panel.latest_image is not None
    broken, broken_ids = txt2img_graph(str(tmp_path / "no-such-model"), steps=2, size=16)
    window.doc.replace(broken, None)
    assert not window.images.images and window.images.current is None
    assert window.layout_panel.latest_image is None and window.layout_panel.canvas.background is None
    with qtbot.waitSignal(window.runner.finished, timeout=120_000):
        window.act_run.trigger()
    assert "failed" in window.run_label.text()
    window.doc.replace(graph, None)
    assert window.run_label.text() == "" and window.states == {}
    # images of a run that belongs to a graph no longer open are not shown
    window._on_images(broken_ids["save"], [window.canvas.thumbnail(ids["save"]) or None], [])
    assert not window.images.images


def test_undoing_back_to_what_last_ran_clears_stale(window, qtbot, tiny_pixel_model):
    graph, ids = txt2img_graph(tiny_pixel_model, steps=2, size=16)
    window.doc.replace(graph, None)
    with qtbot.waitSignal(window.runner.finished, timeout=120_000):
        window.act_run.trigger()
    done = window.canvas.badge_text(ids["sampler"])
    assert done.startswith("done")
    window.doc.set_param(ids["sampler"], "seed", 7)
    assert window.states[ids["sampler"]] == "stale" and window.states[ids["save"]] == "stale"
    window.act_undo.trigger()  # exactly the graph that ran: its results are current again
    assert window.states[ids["sampler"]] == "done" and window.canvas.badge_text(ids["sampler"]) == done
    assert window.states[ids["save"]] == "done"
    window.act_redo.trigger()
    assert window.states[ids["sampler"]] == "stale"
    window.doc.set_param(ids["sampler"], "seed", 1)  # the same value by another edit
    assert window.states[ids["sampler"]] == "done"


def test_the_right_column_keeps_its_width_on_the_first_run(window, qtbot, tiny_pixel_model):
    window.resize(1600, 1000)
    graph, _ids = txt2img_graph(tiny_pixel_model, steps=2, size=16)
    window.doc.replace(graph, None)
    qtbot.wait(50)
    before = window.image_dock.width()
    with qtbot.waitSignal(window.runner.finished, timeout=120_000):
        window.act_run.trigger()
    qtbot.wait(50)
    assert window.images.zoom_label.text().endswith("%")
    assert window.image_dock.width() == before


def test_run_during_a_run_queues_a_snapshot_and_the_queue_runs_in_order(window, qtbot, tiny_pixel_model):
    from app.ui.run_queue import DONE, PENDING

    graph, ids = txt2img_graph(tiny_pixel_model, steps=6, size=16, seed=3)
    window.doc.replace(graph, None)
    finished = []
    window.runner.finished.connect(finished.append)
    window.act_run.trigger()
    assert window.runner.busy
    window.doc.set_param(ids["sampler"], "seed", 9)
    window.act_run.trigger()  # queued, with seed 9, while the first run goes on
    window.doc.set_param(ids["sampler"], "seed", 11)  # after queuing: not in the queued snapshot
    queue = window.run_queue
    assert [r.status for r in queue.items] == ["running", PENDING]
    assert queue.items[1].graph.nodes[ids["sampler"]].params["seed"] == 9
    qtbot.waitUntil(lambda: len(finished) == 2, timeout=180_000)
    assert [r.status for r in queue.items] == [DONE, DONE] and all(r.ok for r in finished)
    assert [r.text().split("  ")[1] for r in queue.items] == ["seed 3", "seed 9"]


def test_batch_count_queues_runs_with_rising_seeds_and_waiting_runs_can_move_or_go(window, qtbot, tiny_pixel_model):
    from app.ui.run_queue import PENDING, QueuedRun, batch_snapshots

    graph, ids = txt2img_graph(tiny_pixel_model, steps=2, size=16, seed=5)
    assert [g.nodes[ids["sampler"]].params["seed"] for g, _ in batch_snapshots(graph, 3)] == [5, 6, 7]
    queue = window.run_queue
    runs = [QueuedRun(g, None, None, None, label) for g, label in batch_snapshots(graph, 3)]
    for run in runs:
        queue.add(run)
    queue.move(runs[2], -1)
    assert [r.label for r in queue.items] == ["seed 5", "seed 7", "seed 6"]
    assert queue.remove(runs[0]) and [r.label for r in queue.pending()] == ["seed 7", "seed 6"]
    window.queue_panel.list.setCurrentRow(0)
    assert window.queue_panel.remove.isEnabled()
    queue.items.clear()
    window.doc.replace(graph, None)
    window.batch_count.setValue(2)
    finished = []
    window.runner.finished.connect(finished.append)
    window.act_run.trigger()
    qtbot.waitUntil(lambda: len(finished) == 2, timeout=120_000)
    assert [r.label for r in queue.items] == ["seed 5", "seed 6"] and not queue.pending()
    assert all(r.status != PENDING for r in queue.items)


def test_a_folder_the_user_picked_may_be_written_one_from_a_file_may_not(window, qtbot, tiny_pixel_model,
                                                                         tmp_path, monkeypatch):
    from app.ui import file_dialogs

    picked, other = tmp_path / "picked", tmp_path / "elsewhere"
    graph, ids = txt2img_graph(tiny_pixel_model, steps=2, size=16)
    graph.nodes[ids["save"]].params["folder"] = str(other)  # as a shared file might say
    window.doc.replace(graph, None)
    with qtbot.waitSignal(window.runner.finished, timeout=120_000) as blocker:
        window.act_run.trigger()
    assert "refused to write" in blocker.args[0].nodes[ids["save"]].error and not other.exists()
    window.canvas.select([ids["save"]])
    monkeypatch.setattr(file_dialogs, "choose_folder", lambda *a, **k: str(picked))
    window.inspector.fields["folder"].choose()  # the user picks a folder in the app
    with qtbot.waitSignal(window.runner.finished, timeout=120_000) as blocker:
        window.act_run.trigger()
    assert blocker.args[0].ok and list(picked.glob("*.png"))


def test_seed_control_increments_or_randomises_the_seed_after_a_run(window, qtbot, tiny_pixel_model):
    graph, ids = txt2img_graph(tiny_pixel_model, steps=2, size=16, seed=4)
    window.doc.replace(graph, None)
    window.canvas.select([ids["sampler"]])
    field = window.inspector.fields["seed"]
    field.control.setCurrentText("increment")  # an undoable edit of the node's meta
    assert window.doc.graph.nodes[ids["sampler"]].meta["seed_control:seed"] == "increment"
    with qtbot.waitSignal(window.runner.finished, timeout=120_000):
        window.act_run.trigger()
    assert window.doc.graph.nodes[ids["sampler"]].params["seed"] == 5
    window.act_undo.trigger()  # the new seed is an ordinary edit
    assert window.doc.graph.nodes[ids["sampler"]].params["seed"] == 4
    window.canvas.select([ids["sampler"]])
    window.inspector.fields["seed"].control.setCurrentText("fixed")
    with qtbot.waitSignal(window.runner.finished, timeout=120_000):
        window.act_run.trigger()
    assert window.doc.graph.nodes[ids["sampler"]].params["seed"] == 4


def test_recipe_keys_walk_a_long_chain_and_follow_their_inputs():
    """The stale badges' keys: a 5,000-node chain neither recurses too deep nor re-scans every
    wire per node; an upstream edit changes every key below it and nothing above."""
    import time

    from app.graph.document import Graph
    from app.ui.run_control import recipe_keys

    g = Graph()
    ids = [g.add_node("LoadImage", {"file": "a.png"}, id="n0").id]
    for i in range(1, 5000):
        ids.append(g.add_node("ImageScale", {"factor": 1.0}, id=f"n{i}").id)
        g.connect(ids[-2], "image", ids[-1], "image")
    started = time.monotonic()
    before = recipe_keys(g, ids)
    assert time.monotonic() - started < 20  # seconds: quadratic took minutes
    assert len(set(before.values())) == len(ids)
    g.nodes["n2500"].params["factor"] = 2.0
    after = recipe_keys(g, ids)
    changed = [nid for nid in ids if before[nid] != after[nid]]
    assert changed == ids[2500:]
    g.connect("n4999", "image", "n0", "image")  # a cycle has a key that matches nothing
    assert recipe_keys(g, ["n10"])["n10"] != after["n10"]


def test_a_run_that_ends_before_its_finish_is_handled_is_booked_to_itself(window, qtbot, tiny_pixel_model):
    """An all-cached run ends in milliseconds; the queue must not start the next run before
    that run's finish is handled, or the finish is booked to the wrong run."""
    from app.ui.run_queue import DONE, ENDED

    graph, ids = txt2img_graph(tiny_pixel_model, steps=2, size=16, seed=4)
    window.doc.replace(graph, None)
    finished = []
    window.runner.finished.connect(finished.append)
    window.act_run.trigger()
    qtbot.waitUntil(lambda: len(finished) == 1, timeout=120_000)
    queue = window.run_queue
    queue.clear_finished()
    window.batch_count.setValue(3)  # the first of these is the run just made: all cached
    window.act_run.trigger()
    window.runner.wait(60)  # its thread ends before the UI thread hears of it
    window._start_next()  # as the last run's "the queue goes on" timer may then fire
    qtbot.waitUntil(lambda: len(finished) == 4, timeout=120_000)
    qtbot.waitUntil(lambda: all(r.status in ENDED for r in queue.items), timeout=10_000)
    assert [r.status for r in queue.items] == [DONE, DONE, DONE]
