"""Settings on the nodes, collapse, colours, bypass/mute, reroutes, tidy and the minimap, through
the window as a user drives them (mouse events on the canvas, the window's actions)."""

from __future__ import annotations

import pytest
from PySide6 import QtCore, QtGui, QtWidgets

from app.graph import load, save
from nodes import registry


def _undo_texts(doc) -> list[str]:
    return [doc.undo.text(i) for i in range(doc.undo.count())]


def _send(viewer, kind, scene_pos, buttons=QtCore.Qt.LeftButton):
    """A mouse event on the canvas viewport at a scene point (QTest cannot drag with a button held)."""
    local = QtCore.QPointF(viewer.mapFromScene(scene_pos))
    button = QtCore.Qt.NoButton if kind == QtCore.QEvent.MouseMove else QtCore.Qt.LeftButton
    event = QtGui.QMouseEvent(kind, local, QtCore.QPointF(viewer.viewport().mapToGlobal(local.toPoint())),
                              button, buttons, QtCore.Qt.NoModifier)
    QtWidgets.QApplication.sendEvent(viewer.viewport(), event)


def _row_point(canvas, nid, name, where="middle"):
    panel = canvas.panel(nid)
    row = next(r for r in panel.rows if r.name == name)
    rect = panel.row_rect(row)
    x = {"left": rect.left() + 6, "right": rect.right() - 6, "middle": rect.center().x()}[where]
    return panel.mapToScene(QtCore.QPointF(x, rect.center().y())), row


def _click(canvas, nid, name, where="middle"):
    point, _ = _row_point(canvas, nid, name, where)
    v = canvas.viewer
    _send(v, QtCore.QEvent.MouseButtonPress, point)
    _send(v, QtCore.QEvent.MouseButtonRelease, point, QtCore.Qt.NoButton)


def _drag(canvas, nid, name, dx_px):
    point, _ = _row_point(canvas, nid, name)
    v = canvas.viewer
    scale = v.transform().m11()
    _send(v, QtCore.QEvent.MouseButtonPress, point)
    for k in range(1, 6):
        _send(v, QtCore.QEvent.MouseMove, point + QtCore.QPointF(dx_px * k / 5 / scale, 0))
    _send(v, QtCore.QEvent.MouseButtonRelease, point + QtCore.QPointF(dx_px / scale, 0), QtCore.Qt.NoButton)


def _fresh_sampler(window):
    sampler = window.add_node("Sampler", QtCore.QPointF(0, 0))
    window.canvas.select([sampler])
    window.canvas.frame()
    QtWidgets.QApplication.processEvents()
    return sampler


def test_node_shows_its_params_and_follows_the_document(window):
    sampler = _fresh_sampler(window)
    panel = window.canvas.panel(sampler)
    assert [r.name for r in panel.rows] == list(registry.get("Sampler").params)
    view = window.canvas.item(sampler).view
    assert panel.pos().y() >= view.panel_top and view.height >= panel.pos().y() + panel.height()
    window.doc.set_param(sampler, "steps", 31)
    assert panel.values["steps"] == 31
    window.act_undo.trigger()
    assert panel.values["steps"] == 20
    # an invalid stored value shows as invalid, with its reason
    window.doc.graph.nodes[sampler].params["steps"] = "many"
    window.doc.node_changed.emit(sampler)
    assert "expected a whole number" in panel.problem("steps")


def test_canvas_edits_make_the_inspectors_undo_steps(window, qtbot):
    doc = window.doc
    # the inspector: steps up twice (one merged step), a toggle, a choice
    a = _fresh_sampler(window)
    steps = window.inspector.fields["steps"].widget
    steps.setValue(21)
    steps.setValue(22)
    window.inspector.fields["scheduler"].widget.setCurrentText("ddim")
    inspector_texts = _undo_texts(doc)[1:]
    inspector_params = dict(doc.graph.nodes[a].params)
    # the canvas, on a second sampler: the right arrow twice, then the choice through the panel
    b = _fresh_sampler(window)
    before = doc.undo.count()
    _click(window.canvas, b, "steps", "right")
    _click(window.canvas, b, "steps", "right")
    window.canvas.panel(b).commit("scheduler", "ddim", False)  # what picking it from the list does
    assert _undo_texts(doc)[before:] == inspector_texts
    assert doc.graph.nodes[b].params == inspector_params
    assert window.inspector.fields["steps"].widget.value() == 22  # the inspector follows
    # a drag is one merged step, like typing in the spin box
    before, where = doc.undo.count(), doc.graph.nodes[b].pos
    _drag(window.canvas, b, "cfg", 60)
    assert doc.undo.count() == before + 1 and doc.graph.nodes[b].params["cfg"] > 7.0
    assert doc.graph.nodes[b].pos == where  # the drag changed the value, not the node's place
    assert doc.undo.text(doc.undo.count() - 1) == "set Sampler.cfg"
    window.act_undo.trigger()
    assert "cfg" not in doc.graph.nodes[b].params


def test_toggle_and_text_edits_on_the_node(window, qtbot):
    doc = window.doc
    save_node = window.add_node("SaveImage", QtCore.QPointF(0, 0))
    window.canvas.frame()
    QtWidgets.QApplication.processEvents()
    _click(window.canvas, save_node, "embed_graph")
    assert doc.graph.nodes[save_node].params["embed_graph"] is False
    text = window.add_node("TextEncode", QtCore.QPointF(0, 300))
    window.canvas.frame()
    QtWidgets.QApplication.processEvents()
    _click(window.canvas, text, "text")
    editor = window.canvas.panel(text).editor()
    assert isinstance(editor, QtWidgets.QPlainTextEdit) and editor.objectName() == "node-editor:text"
    editor.setPlainText("a green star")
    window.canvas.panel(text).finish_editor()
    assert doc.graph.nodes[text].params["text"] == "a green star"
    assert doc.undo.text(doc.undo.count() - 1) == "set TextEncode.text"


def test_collapse_colour_bypass_are_undoable_and_round_trip(window, tmp_path):
    doc = window.doc
    sampler = _fresh_sampler(window)
    view = window.canvas.item(sampler).view
    tall = view.height
    window.act_collapse.trigger()
    assert doc.graph.nodes[sampler].meta["collapsed"] is True
    assert view.height < tall / 3 and not window.canvas.panel(sampler).isVisible()
    ports = [p.scenePos().y() for p in view.inputs + view.outputs]
    assert max(ports) - min(ports) < 1  # all on the title row
    window.set_color("#3b6a45")
    assert tuple(view.color[:3]) == (0x3b, 0x6a, 0x45)
    window.act_bypass.trigger()
    assert doc.graph.nodes[sampler].mode == "bypass" and view.loom_mode == "bypass"
    path = tmp_path / "g.loom"
    save(doc.graph, path)
    back = load(path, registry.get).nodes[sampler]
    assert back.mode == "bypass" and back.meta == {"collapsed": True, "color": "#3b6a45"}
    window.act_mute.trigger()
    assert doc.graph.nodes[sampler].mode == "mute"
    window.act_mute.trigger()  # again: back to normal
    assert doc.graph.nodes[sampler].mode == ""
    for _ in range(5):
        window.act_undo.trigger()
    node = doc.graph.nodes[sampler]
    assert node.mode == "" and node.meta == {} and view.height == tall
    assert window.canvas.panel(sampler).isVisible()


def test_reroute_on_a_wire_keeps_its_type(window):
    doc = window.doc
    load_id = window.add_node("LoadModel", QtCore.QPointF(0, 0))
    text = window.add_node("TextEncode", QtCore.QPointF(400, 0))
    assert doc.connect(load_id, "clip", text, "clip") is None
    from app.graph import Edge

    window.canvas.frame()
    QtWidgets.QApplication.processEvents()
    mid = (window.canvas.port_view(load_id, "clip", True).scenePos()
           + window.canvas.port_view(text, "clip", False).scenePos()) / 2
    wire = window.canvas.wire_at(mid + QtCore.QPointF(4, 4))
    assert wire == Edge(load_id, "clip", text, "clip")
    before = doc.undo.count()
    dot = doc.insert_reroute(wire, (mid.x(), mid.y()))
    assert doc.undo.count() == before + 1
    assert window.canvas.item(dot).view.compact and window.canvas.panel(dot) is None
    assert window.canvas.shown_edges() == {(load_id, "clip", dot, "in"), (dot, "out", text, "clip")}
    why = doc.connect(load_id, "vae", dot, "in")  # a VAE into a reroute that feeds a CLIP input
    assert why and "takes CLIP" in why
    window.act_undo.trigger()
    assert window.canvas.shown_edges() == {(load_id, "clip", text, "clip")}


def test_tidy_is_one_undo_step_and_orders_by_depth(window):
    from app.ui.window import default_graph

    doc = window.doc
    doc.replace(default_graph(), None)
    QtWidgets.QApplication.processEvents()
    old = {i: n.pos for i, n in doc.graph.nodes.items()}
    before = doc.undo.count()
    window.act_tidy.trigger()
    assert doc.undo.count() == before + 1
    g = doc.graph
    for e in g.edges:  # every wire runs left to right, and nothing overlaps
        assert g.nodes[e.src].pos[0] < g.nodes[e.dst].pos[0]
    rects = [window.canvas.node_rect(i) for i in g.nodes]
    assert not any(a.intersects(b) for k, a in enumerate(rects) for b in rects[k + 1:])
    window.act_undo.trigger()
    assert {i: n.pos for i, n in doc.graph.nodes.items()} == old


def test_minimap_shows_the_view_and_pans_on_click(window):
    from app.ui.window import default_graph

    window.doc.replace(default_graph(), None)
    QtWidgets.QApplication.processEvents()
    mm = window.canvas.minimap
    assert mm.isVisible()
    mm.grab()  # paints: computes its mapping
    target = mm.scene_point(QtCore.QPointF(8, 8))
    QtCore.QCoreApplication.sendEvent(mm, QtGui.QMouseEvent(
        QtCore.QEvent.MouseButtonPress, QtCore.QPointF(8, 8), QtCore.QPointF(8, 8),
        QtCore.Qt.LeftButton, QtCore.Qt.LeftButton, QtCore.Qt.NoModifier))
    center = mm.visible_rect().center()
    tolerance = 1 + 1 / window.canvas.viewer.transform().m11()  # a viewport pixel, in scene units
    assert abs(center.x() - target.x()) < tolerance and abs(center.y() - target.y()) < tolerance
    window.act_minimap.trigger()
    assert not mm.isVisible()


def test_signal_emits_do_not_wear_out_true(window):
    """PySide6 6.12 on Python 3.11 gives back True from a connected signal's emit() without a
    reference; the canvas emits one per pan step, which aborted the interpreter ("bool_dealloc")
    after a few thousand. ngqt_compat.keep_none_alive guards True and False as it does None."""
    import sys

    viewer = window.canvas.viewer
    for _ in range(20000):
        viewer.view_changed.emit()
    assert sys.getrefcount(True) > 10000 and sys.getrefcount(False) > 10000


def test_pixmap_cache_holds_the_device_caches_of_many_nodes(window):
    """Qt's 10 MB default pixmap cache holds ~50 nodes' device caches: panning a larger graph
    repainted the rest on every step. The viewer raises the limit; the nodes are cached."""
    from app.ui.ngqt_compat import LoomViewer
    from app.ui.resources import default_graph

    assert QtGui.QPixmapCache.cacheLimit() >= LoomViewer.ITEM_CACHE_KB >= 128 * 1024
    window.doc.replace(default_graph(), None)
    QtWidgets.QApplication.processEvents()
    nodes = [i for i in window.canvas.viewer.scene().items() if type(i).__name__ == "LoomNodeItem"]
    assert nodes and all(n.cacheMode() == QtWidgets.QGraphicsItem.DeviceCoordinateCache for n in nodes)


@pytest.mark.parametrize("size", [(1600, 1000), (1280, 800)])
def test_a_framed_graph_is_never_under_the_minimap(window, qtbot, size):
    """Every example, framed with a result image below each image node (as after a run): no
    node or image lies under the minimap. A graph too large for the legible zoom is framed from
    its left, and the minimap turns see-through over its nodes until the mouse comes over it."""
    from pathlib import Path

    from app.ui.ngqt_compat import MIN_LEGIBLE_SCALE

    window.resize(*size)
    qtbot.wait(20)
    canvas, viewer = window.canvas, window.canvas.viewer
    image = QtGui.QImage(256, 256, QtGui.QImage.Format_RGB32)
    image.fill(QtGui.QColor("white"))
    under = {}
    for path in sorted((Path(__file__).resolve().parents[1] / "resources" / "graphs").glob("*.loom")):
        window.open_path(str(path), ask=False)
        qtbot.wait(20)
        for nid, node in window.doc.graph.nodes.items():
            if node.type in ("Save", "Decode", "Preview"):
                canvas.show_image(nid, image)
        canvas.frame()
        mm = canvas.minimap
        assert mm.isVisible()
        block = mm.rect_in_viewport()
        hit = [r for r in canvas.shown_rects()
               if viewer.mapFromScene(r).boundingRect().toRectF().intersects(block)]
        if hit:
            under[path.stem] = len(hit)
            assert viewer.transform().m11() < MIN_LEGIBLE_SCALE * 1.05, (path.stem, viewer.transform().m11(), [viewer.mapFromScene(r).boundingRect() for r in hit], block, viewer.viewport().rect())
            assert mm.opacity() < 1
            QtCore.QCoreApplication.sendEvent(mm, QtGui.QEnterEvent(
                QtCore.QPointF(5, 5), QtCore.QPointF(5, 5), QtCore.QPointF(5, 5)))
            assert mm.opacity() == 1  # opaque again to be used
            QtCore.QCoreApplication.sendEvent(mm, QtCore.QEvent(QtCore.QEvent.Leave))
        else:
            assert mm.opacity() == 1
    assert "default" not in under and "layout-regional-prompts" not in under, under


def test_a_long_prompt_on_the_node_shows_whole_lines_and_an_ellipsis(window):
    """The prompt field on a node draws only lines that fit (the last one elided), never a line
    cut through by the field's bottom edge."""
    from app.ui.node_widgets import TEXT_LINES, wrapped_lines
    from app.ui.window import default_graph

    window.doc.replace(default_graph(), None)
    QtWidgets.QApplication.processEvents()
    nid = next(i for i, n in window.doc.graph.nodes.items() if n.type == "TextEncode")
    panel = window.canvas.panel(nid)
    row = next(r for r in panel.rows if r.multiline)
    metrics = QtGui.QFontMetricsF(panel.font)
    body_h = row.height - 21.0 * 0.8 - 4
    assert body_h >= TEXT_LINES * metrics.lineSpacing()  # the field holds its lines whole
    width = panel.row_rect(row).width() - 14  # inside the field's padding
    text = "a red circle on the left and a blue square at the bottom right, white background, " * 2
    lines = wrapped_lines(text, panel.font, width, TEXT_LINES)
    assert len(lines) == TEXT_LINES and lines[-1].endswith("…")
    assert all(metrics.horizontalAdvance(line) <= width + 0.5 for line in lines)
    whole = wrapped_lines("short prompt\nsecond line", panel.font, width, TEXT_LINES)
    assert whole == ["short prompt", "second line"]
