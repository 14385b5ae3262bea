"""Result tables in the app: the Qt model over a Table's plain data, and the Table panel after a
real run of the seed-scan example graph (tiny model)."""

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("NodeGraphQt")
pytest.importorskip("torch")

pytestmark = pytest.mark.filterwarnings("ignore:Function.*is marked as deprecated:DeprecationWarning")


def _shown(model):
    from PySide6 import QtCore

    head = [model.headerData(k, QtCore.Qt.Horizontal) for k in range(model.columnCount())]
    cells = [[model.data(model.index(r, c)) for c in range(model.columnCount())] for r in range(model.rowCount())]
    return head, cells


def test_the_model_shows_a_seed_scan_table_in_the_nodes_order_read_only(qapp):
    from PySide6 import QtCore

    from app.ui.table_view import TableModel
    from kernels.analysis.seed_scan import ranked, scan_table

    scores = {3: 0.25, 4: 0.75, 5: 0.25, 6: 1 / 3}
    table = scan_table(ranked(scores), scores, "contrast")
    model = TableModel(table.columns, table.rows)
    head, cells = _shown(model)
    assert head == ["rank", "seed", "score"]
    assert cells == [["1", "4", "0.75"], ["2", "6", "0.333333"], ["3", "3", "0.25"], ["4", "5", "0.25"]]
    assert not model.flags(model.index(0, 0)) & QtCore.Qt.ItemIsEditable
    assert model.data(model.index(0, 2), QtCore.Qt.TextAlignmentRole) & QtCore.Qt.AlignRight
    with pytest.raises(ValueError, match="row 2 has 1 values for 3 columns"):
        TableModel(["a", "b", "c"], [[1, 2, 3], [1]])


def test_a_seed_scan_run_shows_its_table_in_the_table_panel(window, qtbot, tiny_pixel_model):
    from test_analysis_graphs import GRAPHS, small_example

    from app.graph import load
    from nodes import registry

    g = small_example("analysis-seed-scan", tiny_pixel_model, "a blue square", SeedScan={"metric": "contrast"})
    scan = next(n for n in g.nodes.values() if n.type == "SeedScan")
    scan_id, first = scan.id, int(scan.params.get("first", 0))
    window.doc.replace(g, None)
    with qtbot.waitSignal(window.runner.finished, timeout=180_000) as blocker:
        window.act_run.trigger()
    report = blocker.args[0]
    assert not isinstance(report, str) and report.ok, report
    panel = window.tables
    assert len(panel.tables) == 1 and panel.view.model() is panel.tables[0][1]
    head, cells = _shown(panel.view.model())
    assert head == ["rank", "seed", "score"]
    assert [r[0] for r in cells] == ["1", "2"]
    assert sorted(int(r[1]) for r in cells) == [first, first + 1]
    scores = [float(r[2]) for r in cells]
    assert scores == sorted(scores, reverse=True)  # best first, as the node ranked them
    assert "Seed scan (contrast" in panel.caption.text() and scan_id in window.doc.graph.nodes
    window.doc.replace(load(GRAPHS / "analysis-seed-scan.loom", registry.get), None)
    assert panel.tables == [] and panel.view.model() is None  # another graph: none of the old tables


def test_a_table_output_shows_in_the_panel_without_a_save_table_node(window, qtbot, tiny_pixel_model):
    """Activation patching's image is saved and its table goes nowhere: the panel still shows
    the table, once, under the node's title."""
    from test_analysis_graphs import small_example

    g = small_example("analysis-activation-patch", tiny_pixel_model)
    for node in list(g.nodes.values()):
        if node.type == "SaveTable":
            g.remove_node(node.id)
    window.doc.replace(g, None)
    with qtbot.waitSignal(window.runner.finished, timeout=180_000) as blocker:
        window.act_run.trigger()
    report = blocker.args[0]
    assert not isinstance(report, str) and report.ok, report
    assert "SaveTable" not in [r.type for r in report.nodes.values()]
    panel = window.tables
    assert [name for name, _ in panel.tables] == [
        "Activation patch: Activation patching, one layer at a time (prompt B into A's run)"]
    head, cells = _shown(panel.view.model())
    assert head == ["layer", "change from A", "toward B"] and len(cells) >= 2
