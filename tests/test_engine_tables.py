"""A node's TABLE outputs reach the app (EngineEvents.tables) when it finishes, whether or not a
Save Table node reads them, and each table once per run."""

import pytest

pytest.importorskip("torch")


def _seed_scan_graph(tiny_pixel_model, with_save_table: bool):
    from test_analysis_graphs import small_example

    g = small_example("analysis-seed-scan", tiny_pixel_model, "a blue square", SeedScan={"metric": "contrast"})
    for node in list(g.nodes.values()):
        if node.type == "SaveTable" and not with_save_table:
            g.remove_node(node.id)
    return g


def _run(executor, g, tmp_path):
    from app.engine import EngineEvents

    shown = []
    events = EngineEvents(tables=lambda nid, table: shown.append((g.nodes[nid].type, table)))
    report = executor.run(g, events=events, output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values()}
    return report, shown


def test_a_table_output_is_shown_when_its_node_finishes_without_save_table(tiny_pixel_model, tmp_path):
    from app.engine import Executor

    report, shown = _run(Executor(device="cpu", disk_cache=False), _seed_scan_graph(tiny_pixel_model, False), tmp_path)
    assert "SaveTable" not in [r.type for r in report.nodes.values()]
    assert [kind for kind, _ in shown] == ["SeedScan"]
    assert shown[0][1].columns == ["rank", "seed", "score"] and len(shown[0][1].rows) == 2


def test_save_table_adds_no_second_copy_and_shows_a_cached_table(tiny_pixel_model, tmp_path):
    from app.engine import Executor

    executor = Executor(device="cpu", disk_cache=False)
    g = _seed_scan_graph(tiny_pixel_model, True)
    _, first = _run(executor, g, tmp_path)
    assert [kind for kind, _ in first] == ["SeedScan"]  # Save Table's copy is the same table
    report, again = _run(executor, g, tmp_path)  # the scan is cached; Save Table always runs
    scan = next(r for r in report.nodes.values() if r.type == "SeedScan")
    assert scan.status.startswith("cached")
    assert [kind for kind, _ in again] == ["SaveTable"] and again[0][1].rows == first[0][1].rows
