"""The desktop app's editing behaviour, through its widgets (pytest-qt, offscreen, no torch)."""

import json

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("NodeGraphQt")

# NodeGraphQt 0.6 still calls Qt5-era event methods (QMouseEvent.pos()...): not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Function.*is marked as deprecated:DeprecationWarning")

from conftest import load_and_encode_on_canvas  # noqa: E402
from PySide6 import QtCore, QtGui, QtWidgets  # noqa: E402


def test_add_and_connect_through_canvas(window):
    doc, load, text = load_and_encode_on_canvas(window)
    assert set(doc.graph.nodes) == {load, text}
    assert window.canvas.item(load) is not None
    assert window.canvas.request_connection(load, "clip", text, "clip") is None
    assert [(e.src, e.src_port, e.dst, e.dst_port) for e in doc.graph.edges] == [(load, "clip", text, "clip")]
    assert window.canvas.shown_edges() == {(load, "clip", text, "clip")}

def test_ports_are_coloured_by_type(window):
    from nodes.base import CLIP, MODEL

    doc, load, text = load_and_encode_on_canvas(window)
    clip = window.canvas.port_view(load, "clip", True)
    model = window.canvas.port_view(load, "model", True)
    assert QtGui.QColor(*clip.color[:3]).name() == CLIP.color
    assert QtGui.QColor(*model.color[:3]).name() == MODEL.color

def test_incompatible_connection_is_refused_with_a_reason(window, qtbot):
    doc = window.doc
    load = window.add_node("LoadModel", QtCore.QPointF(0, 0))
    sampler = window.add_node("Sampler", QtCore.QPointF(300, 0))
    before = doc.undo.count()
    why = window.canvas.request_connection(load, "clip", sampler, "model")
    assert why and "MODEL" in why and "CLIP" in why
    assert doc.graph.edges == []
    assert window.canvas.shown_edges() == set()
    assert doc.undo.count() == before  # a refusal is not an edit
    assert "Not connected" in window.statusBar().currentMessage()

def test_cycle_is_refused(window):
    doc = window.doc
    a = window.add_node("ImageScale", QtCore.QPointF(0, 0))
    b = window.add_node("ImageScale", QtCore.QPointF(300, 0))
    assert window.canvas.request_connection(a, "image", b, "image") is None
    why = window.canvas.request_connection(b, "image", a, "image")
    assert why and "loop" in why
    assert len(doc.graph.edges) == 1

def test_undo_redo_round_trip(window):
    from app.graph import dumps

    doc, load, text = load_and_encode_on_canvas(window)
    states = [dumps(doc.graph)]
    window.canvas.request_connection(load, "clip", text, "clip")
    states.append(dumps(doc.graph))
    doc.set_param(text, "text", "a red circle")
    states.append(dumps(doc.graph))
    doc.move_nodes({text: (320.0, 40.0)})
    states.append(dumps(doc.graph))
    window.canvas.select([load])
    window.delete_selection()
    states.append(dumps(doc.graph))
    assert window.canvas.item(load) is None
    for expected in reversed(states[:-1]):
        window.act_undo.trigger()
        assert dumps(doc.graph) == expected
    for expected in states[1:]:
        window.act_redo.trigger()
        assert dumps(doc.graph) == expected
    assert window.canvas.item(load) is None
    window.act_undo.trigger()  # the delete, once more: node and wire come back on the canvas
    assert window.canvas.shown_edges() == {(load, "clip", text, "clip")}

def test_moving_on_canvas_is_an_undoable_edit(window):
    doc, load, text = load_and_encode_on_canvas(window)
    view = window.canvas.item(text).view
    prev = view.xy_pos
    view.xy_pos = [500.0, 120.0]
    window.canvas.viewer.moved_nodes.emit({view: prev})
    assert doc.graph.nodes[text].pos == (500.0, 120.0)
    window.act_undo.trigger()
    assert doc.graph.nodes[text].pos == (300.0, 0.0)
    assert tuple(view.xy_pos) == (300.0, 0.0)

def test_copy_paste_through_the_system_clipboard(window):
    doc, load, text = load_and_encode_on_canvas(window)
    window.canvas.request_connection(load, "clip", text, "clip")
    doc.set_param(text, "text", "a blue square")
    window.canvas.select([load, text])
    window.act_copy.trigger()
    mime = QtWidgets.QApplication.clipboard().mimeData()
    pasted_json = json.loads(mime.text())  # plain JSON too: another window or app can take it
    assert pasted_json["format"] == "loomwork.graph" and len(pasted_json["nodes"]) == 2
    window.act_paste.trigger()
    assert len(doc.graph.nodes) == 4
    new = set(doc.graph.nodes) - {load, text}
    assert set(window.canvas.selected_ids()) == new
    texts = [n.params.get("text") for n in doc.graph.nodes.values() if n.type == "TextEncode"]
    assert texts == ["a blue square", "a blue square"]
    assert len(doc.graph.edges) == 2  # the wire inside the selection came along
    window.act_undo.trigger()
    assert set(doc.graph.nodes) == {load, text}

def test_duplicate_and_delete(window):
    doc, load, text = load_and_encode_on_canvas(window)
    window.canvas.select([text])
    window.act_duplicate.trigger()
    assert len(doc.graph.nodes) == 3
    window.act_delete.trigger()  # the duplicate is selected
    assert set(doc.graph.nodes) == {load, text}

def test_group_backdrop(window):
    doc, load, text = load_and_encode_on_canvas(window)
    window.canvas.select([load, text])
    window.act_group.trigger()
    assert len(doc.graph.groups) == 1
    group = doc.graph.groups[0]
    assert set(group.nodes) == {load, text}
    bd = window.canvas._backdrops[group.id]
    x, y, w, h = group.rect
    assert tuple(bd.view.xy_pos) == (x, y) and (bd.view.width, bd.view.height) == (w, h)
    window.act_undo.trigger()
    assert doc.graph.groups == [] and window.canvas._backdrops == {}

def test_inspector_edits_the_document_through_undo(window, qtbot):
    doc = window.doc
    sampler = window.add_node("Sampler", QtCore.QPointF(0, 0))
    window.canvas.select([sampler])
    assert window.inspector.node_id == sampler
    steps = window.inspector.fields["steps"].widget
    assert isinstance(steps, QtWidgets.QSpinBox) and steps.maximum() == 500 and steps.minimum() == 1
    steps.setValue(33)
    assert doc.graph.nodes[sampler].params["steps"] == 33
    assert type(doc.graph.nodes[sampler].params["steps"]) is int  # not "33" (NodeGraphQt's bug)
    window.inspector.fields["scheduler"].widget.setCurrentText("ddim")
    assert doc.graph.nodes[sampler].params["scheduler"] == "ddim"
    cfg = window.inspector.fields["cfg"].widget
    cfg.setValue(5.5)
    assert doc.graph.nodes[sampler].params["cfg"] == 5.5
    seed = window.inspector.fields["seed"]
    seed.randomise()
    assert doc.graph.nodes[sampler].params["seed"] == int(seed.edit.text())
    window.act_undo.trigger()
    assert "seed" not in doc.graph.nodes[sampler].params
    window.act_undo.trigger()
    window.act_undo.trigger()
    assert doc.graph.nodes[sampler].params == {"steps": 33}
    assert steps.value() == 33
    window.act_undo.trigger()
    assert steps.value() == 20 and doc.graph.nodes[sampler].params == {}

def test_inspector_widgets_follow_the_declaration(window, qtbot):
    text = window.add_node("TextEncode", QtCore.QPointF(0, 0))
    window.canvas.select([text])
    prompt = window.inspector.fields["text"]
    assert isinstance(prompt.widget, QtWidgets.QPlainTextEdit)
    assert prompt.widget.toolTip() == "the prompt; (words:1.3) weighs words"
    prompt.widget.setPlainText("a green star")
    qtbot.waitUntil(lambda: window.doc.graph.nodes[text].params.get("text") == "a green star", timeout=3000)
    save = window.add_node("SaveImage", QtCore.QPointF(0, 200))
    window.canvas.select([save])
    fields = window.inspector.fields
    assert isinstance(fields["embed_graph"].widget, QtWidgets.QCheckBox)
    assert fields["folder"].pick is not None  # a folder picker
    fields["embed_graph"].widget.setChecked(False)
    assert window.doc.graph.nodes[save].params["embed_graph"] is False

def test_param_edit_marks_downstream_stale(window):
    doc, load, text = load_and_encode_on_canvas(window)
    window.canvas.request_connection(load, "clip", text, "clip")
    for nid in (load, text):  # as after a run
        window._on_node_state(nid, "done", {"seconds": 0.1})
    doc.set_param(text, "text", "changed")
    assert window.states[text] == "stale" and window.states[load] == "done"
    assert window.canvas.badge_text(text) == "stale"
    doc.set_param(load, "dtype", "float16")
    assert window.states[load] == "stale"

def test_failed_state_shows_its_message_on_hover(window):
    doc, load, text = load_and_encode_on_canvas(window)
    window._on_node_state(load, "failed", {"error": "no model folder at /nope"})
    badge = window.canvas._badges[load]
    assert badge.text == "failed" and "no model folder" in badge.toolTip()
    assert "no model folder" in window.canvas.item(load).view.toolTip()

def test_done_state_shows_the_nodes_summary(window):
    doc, load, text = load_and_encode_on_canvas(window)
    said = "36 edit templates; preserved 117 prompts ('a green circle', ...) (auto); lam 0.5, preserve weight 1"
    window._on_node_state(load, "running", {})
    window._on_node_state(load, "done", {"seconds": 0.2, "summary": said})
    assert window.canvas.badge_text(load) == "done 0.2s" and window.canvas._badges[load].toolTip() == said
    window.canvas.select([load])
    assert said in window.inspector.status_text.splitlines()
    window._on_node_state(load, "running", {})  # a new run: the old summary goes
    window._on_node_state(load, "done", {"seconds": 0.1})
    window.canvas.select([load])
    assert said not in window.inspector.status_text and window.canvas._badges[load].toolTip() == ""

def _drag(qtbot, widget, a, b):
    qtbot.mousePress(widget, QtCore.Qt.LeftButton, pos=a)
    QtWidgets.QApplication.sendEvent(widget, QtGui.QMouseEvent(
        QtCore.QEvent.MouseMove, QtCore.QPointF(b), widget.mapToGlobal(QtCore.QPointF(b)),
        QtCore.Qt.NoButton, QtCore.Qt.LeftButton, QtCore.Qt.NoModifier))
    qtbot.mouseRelease(widget, QtCore.Qt.LeftButton, pos=b)

def test_layout_canvas_draw_move_delete_box(window, qtbot):
    doc = window.doc
    layout = window.add_node("Layout", QtCore.QPointF(0, 0))
    doc.set_param(layout, "width", 256)
    doc.set_param(layout, "height", 128)
    window.canvas.select([layout])
    panel = window.layout_panel
    assert panel.node_id == layout
    canvas = panel.canvas
    canvas.resize(420, 420)
    r = canvas.image_rect()
    assert r.width() / r.height() == pytest.approx(2.0, rel=1e-3)  # the node's 256x128 aspect
    a = QtCore.QPoint(round(r.x() + 0.25 * r.width()), round(r.y() + 0.25 * r.height()))
    b = QtCore.QPoint(round(r.x() + 0.75 * r.width()), round(r.y() + 0.5 * r.height()))
    _drag(qtbot, canvas, a, b)
    boxes = doc.graph.nodes[layout].params["boxes"]
    assert len(boxes) == 1
    box = boxes[0]
    assert box["x0"] == pytest.approx(0.25, abs=0.01) and box["x1"] == pytest.approx(0.75, abs=0.01)
    assert box["y0"] == pytest.approx(0.25, abs=0.02) and box["y1"] == pytest.approx(0.5, abs=0.02)
    # a phrase for it
    panel.phrase.setText("a red circle")
    panel.phrase.editingFinished.emit()
    assert doc.graph.nodes[layout].params["boxes"][0]["phrase"] == "a red circle"
    # move it right by a tenth
    mid = QtCore.QPoint(round(r.x() + 0.5 * r.width()), round(r.y() + 0.375 * r.height()))
    to = QtCore.QPoint(round(mid.x() + 0.1 * r.width()), mid.y())
    _drag(qtbot, canvas, mid, to)
    moved = doc.graph.nodes[layout].params["boxes"][0]
    assert moved["x0"] == pytest.approx(0.35, abs=0.01) and moved["phrase"] == "a red circle"
    from nodes.layout import check_boxes
    assert check_boxes(doc.graph.nodes[layout].params["boxes"]) is None
    # undo the move through the one stack; the canvas follows
    window.act_undo.trigger()
    assert canvas.boxes[0]["x0"] == pytest.approx(0.25, abs=0.01)
    canvas.select(0)
    canvas.setFocus()
    qtbot.keyClick(canvas, QtCore.Qt.Key_Delete)  # the box, not the selected Layout node
    assert layout in doc.graph.nodes
    assert doc.graph.nodes[layout].params["boxes"] == []

def test_delete_key_on_the_canvas_deletes_nodes(window, qtbot):
    doc, load, text = load_and_encode_on_canvas(window)
    window.activateWindow()
    window.canvas.select([text])
    window.canvas.viewer.setFocus()
    qtbot.keyClick(window.canvas.viewer, QtCore.Qt.Key_Delete)
    assert set(doc.graph.nodes) == {load}
    qtbot.keyClick(window.canvas.viewer, QtCore.Qt.Key_Z, QtCore.Qt.ControlModifier)
    assert set(doc.graph.nodes) == {load, text}

def test_tab_opens_the_search_and_adds_the_chosen_node(window, qtbot):
    window.canvas.viewer.setFocus()
    QtWidgets.QApplication.sendEvent(window.canvas.viewer, QtGui.QKeyEvent(
        QtCore.QEvent.KeyPress, QtCore.Qt.Key_Tab, QtCore.Qt.NoModifier))
    assert window.search.isVisible()
    qtbot.keyClicks(window.search.edit, "sampl")
    assert window.search.list.currentItem().data(QtCore.Qt.UserRole + 1) == "Sampler"
    qtbot.keyClick(window.search.edit, QtCore.Qt.Key_Return)
    assert [n.type for n in window.doc.graph.nodes.values()] == ["Sampler"]

def test_side_palette_lists_categories_and_adds(window):
    tree = window.palette.tree
    cats = {tree.topLevelItem(i).text(0) for i in range(tree.topLevelItemCount())}
    assert {"loaders", "sampling", "image", "layout"} <= cats
    window.palette.filter.setText("vae")
    names = [tree.topLevelItem(i).child(j).text(0) for i in range(tree.topLevelItemCount())
             for j in range(tree.topLevelItem(i).childCount())]
    assert set(names) >= {"VAE Decode", "VAE Encode"} and "Sampler" not in names
    window.palette.add_requested.emit("VAEDecode")
    assert [n.type for n in window.doc.graph.nodes.values()] == ["VAEDecode"]
    # dragged onto the canvas: added where it was dropped
    window.palette.filter.setText("sampler")
    item = next(tree.topLevelItem(i).child(j) for i in range(tree.topLevelItemCount())
                for j in range(tree.topLevelItem(i).childCount())
                if tree.topLevelItem(i).child(j).text(0) == "Sampler")
    mime = tree.mimeData([item])
    v = window.canvas.viewer
    at = QtCore.QPointF(120, 90)
    enter = QtGui.QDragEnterEvent(at.toPoint(), QtCore.Qt.CopyAction, mime, QtCore.Qt.LeftButton,
                                  QtCore.Qt.NoModifier)
    QtWidgets.QApplication.sendEvent(v.viewport(), enter)
    assert enter.isAccepted()
    drop = QtGui.QDropEvent(at, QtCore.Qt.CopyAction, mime, QtCore.Qt.LeftButton, QtCore.Qt.NoModifier)
    QtWidgets.QApplication.sendEvent(v.viewport(), drop)
    added = [n for n in window.doc.graph.nodes.values() if n.type == "Sampler"]
    assert len(added) == 1
    expected = v.mapToScene(at.toPoint())
    assert added[0].pos == pytest.approx((expected.x(), expected.y()), abs=1.0)

def test_rename_on_canvas_and_group_edits_are_undoable(window):
    doc, load, text = load_and_encode_on_canvas(window)
    window.canvas.viewer.node_name_changed.emit(text, "Prompt")
    assert doc.graph.nodes[text].title == "Prompt"
    assert window.canvas.item(text).view.name == "Prompt"
    window.canvas.select([load, text])
    gid = window.canvas.group_selection("Inputs")
    x, y, w, h = doc.group(gid).rect
    window.canvas.viewer.node_backdrop_updated.emit(gid, "sizer_mouse_release",
                                                   {"pos": [x, y], "width": w + 100, "height": h})
    assert doc.group(gid).rect == (x, y, w + 100, h)
    assert window.canvas._backdrops[gid].view.width == w + 100
    window.act_undo.trigger()
    assert doc.group(gid).rect == (x, y, w, h)
    window.act_undo.trigger()
    window.act_undo.trigger()
    assert doc.graph.nodes[text].title == "" and window.canvas.item(text).view.name == "Text Encode"

def _viewer_drag(viewer, p1, p2, steps=5):
    """A real mouse drag on the canvas viewport (NodeGraphQt's own gesture code runs)."""
    from PySide6.QtTest import QTest

    vp = viewer.viewport()
    QTest.mousePress(vp, QtCore.Qt.LeftButton, QtCore.Qt.NoModifier, p1)
    for k in range(1, steps + 1):
        p = p1 + (p2 - p1) * k / steps
        QtWidgets.QApplication.sendEvent(vp, QtGui.QMouseEvent(
            QtCore.QEvent.MouseMove, QtCore.QPointF(p), QtCore.QPointF(vp.mapToGlobal(p)),
            QtCore.Qt.NoButton, QtCore.Qt.LeftButton, QtCore.Qt.NoModifier))
    QTest.mouseRelease(vp, QtCore.Qt.LeftButton, QtCore.Qt.NoModifier, p2)

def test_mouse_gestures_on_the_canvas(window, qtbot):
    doc = window.doc
    load = window.add_node("LoadModel", QtCore.QPointF(0, 0))
    text = window.add_node("TextEncode", QtCore.QPointF(300, 0))
    sampler = window.add_node("Sampler", QtCore.QPointF(300, 200))
    window.canvas.select([])
    v = window.canvas.viewer

    def at(nid, port, out):
        return v.mapFromScene(window.canvas.port_view(nid, port, out).sceneBoundingRect().center())

    _viewer_drag(v, at(load, "clip", True), at(text, "clip", False))  # wire
    assert [(e.src_port, e.dst_port) for e in doc.graph.edges] == [("clip", "clip")]
    clip_out = window.canvas.port_view(load, "clip", True)
    assert not v._validate_accept_connection(clip_out, window.canvas.port_view(sampler, "model", False))
    assert v._validate_accept_connection(clip_out, window.canvas.port_view(text, "clip", False))
    _viewer_drag(v, at(load, "clip", True), at(sampler, "model", False))  # wrong type
    assert len(doc.graph.edges) == 1 and "MODEL" in window.statusBar().currentMessage()
    assert window.canvas.shown_edges() == {(load, "clip", text, "clip")}
    inp = at(text, "clip", False)
    _viewer_drag(v, inp, inp + QtCore.QPoint(-80, 120))  # pull the wire off the input
    assert doc.graph.edges == [] and window.canvas.shown_edges() == set()
    r = window.canvas.node_rect(sampler)
    title = v.mapFromScene(QtCore.QPointF(r.center().x(), r.top() + 8))
    _viewer_drag(v, title, title + QtCore.QPoint(50, 30))  # move by the title
    assert doc.graph.nodes[sampler].pos != (300.0, 200.0)
    assert doc.undo.text(doc.undo.index() - 1).startswith("move")
    window.act_undo.trigger()
    assert doc.graph.nodes[sampler].pos == (300.0, 200.0)

def test_nodegraphqt_is_only_a_view(window):
    """ngqt_compat: gestures never reach NodeGraphQt's own undo stack or model wiring; wires
    take their type's colour; Qt6 wheel events zoom."""
    from nodes.base import CLIP

    doc, load, text = load_and_encode_on_canvas(window)
    window.canvas.request_connection(load, "clip", text, "clip")
    view = window.canvas.item(text).view
    prev = view.xy_pos
    view.xy_pos = [10.0, 10.0]
    window.canvas.viewer.moved_nodes.emit({view: prev})
    assert window.canvas.ng.undo_stack().count() == 0
    pipe = window.canvas.port_view(text, "clip", False).connected_pipes[0]
    assert QtGui.QColor(*pipe.color[:3]).name() == CLIP.color
    v = window.canvas.viewer
    before = v.get_zoom()
    QtWidgets.QApplication.sendEvent(v.viewport(), QtGui.QWheelEvent(
        QtCore.QPointF(50, 50), QtCore.QPointF(v.mapToGlobal(QtCore.QPoint(50, 50))), QtCore.QPoint(),
        QtCore.QPoint(0, 240), QtCore.Qt.NoButton, QtCore.Qt.NoModifier, QtCore.Qt.NoScrollPhase, False))
    assert v.get_zoom() > before

def test_dragging_a_node_onto_a_backdrop_joins_its_group(window):
    doc, load, text = load_and_encode_on_canvas(window)
    window.canvas.select([load])
    gid = window.canvas.group_selection()
    assert doc.group(gid).nodes == [load]
    x, y, w, h = doc.group(gid).rect
    view = window.canvas.item(text).view
    prev = view.xy_pos
    view.xy_pos = [x + 10, y + 30]
    window.canvas.viewer.moved_nodes.emit({view: prev})
    assert set(doc.group(gid).nodes) == {load, text}
    window.act_undo.trigger()  # one step: the move and the membership
    assert doc.group(gid).nodes == [load] and doc.graph.nodes[text].pos == (300.0, 0.0)

def test_random_edits_keep_canvas_and_document_in_step(window):
    """A seeded random walk of edits: after each one the canvas shows exactly the document, and
    undoing everything returns the empty graph, redoing everything the final one."""
    import random

    from app.graph import dumps
    from nodes import registry

    rng = random.Random(4)
    doc, canvas = window.doc, window.canvas
    types = [n for n, spec in registry.all_types().items() if spec.inputs or spec.outputs]
    start = dumps(doc.graph)

    def check():
        assert set(canvas._items) == set(doc.graph.nodes)
        assert canvas.shown_edges() == {(e.src, e.src_port, e.dst, e.dst_port) for e in doc.graph.edges}
        assert set(canvas._backdrops) == {g.id for g in doc.graph.groups}
        for nid, node in doc.graph.nodes.items():
            assert tuple(canvas.item(nid).view.xy_pos) == tuple(node.pos)

    for _ in range(70):
        ids = list(doc.graph.nodes)
        op = rng.choice(["add", "add", "wire", "wire", "wire", "param", "move", "delete", "group", "dup"])
        if op == "add" or not ids:
            window.add_node(rng.choice(types), QtCore.QPointF(rng.uniform(0, 900), rng.uniform(0, 600)))
        elif op == "wire":
            a, b = rng.choice(ids), rng.choice(ids)
            sa, sb = registry.get(doc.graph.nodes[a].type), registry.get(doc.graph.nodes[b].type)
            if sa and sb and sa.outputs and sb.inputs:
                canvas.request_connection(a, rng.choice(list(sa.outputs)), b, rng.choice(list(sb.inputs)))
        elif op == "param":
            nid = rng.choice(ids)
            spec = registry.get(doc.graph.nodes[nid].type)
            ints = [k for k, p in spec.params.items() if p.kind in ("int", "seed") and p.min is not None and p.max is not None]
            if ints:
                k = rng.choice(ints)
                p = spec.params[k]
                doc.set_param(nid, k, rng.randint(p.min, min(p.max, p.min + 50)))
        elif op == "move":
            nid = rng.choice(ids)
            doc.move_nodes({nid: (rng.uniform(0, 900), rng.uniform(0, 600))})
        elif op == "delete":
            canvas.select(rng.sample(ids, k=min(len(ids), rng.randint(1, 2))))
            window.act_delete.trigger()
        elif op == "group":
            canvas.select(rng.sample(ids, k=min(len(ids), 2)))
            window.act_group.trigger()
        elif op == "dup":
            canvas.select([rng.choice(ids)])
            window.act_duplicate.trigger()
        check()
    final = dumps(doc.graph)
    while doc.undo.canUndo():
        doc.undo.undo()
        check()
    assert dumps(doc.graph) == start
    while doc.undo.canRedo():
        doc.undo.redo()
    check()
    assert dumps(doc.graph) == final

def test_many_qt_calls_do_not_wear_out_none(window):
    """PySide6 6.12 on Python 3.11 drops a reference to None on every void C++ call; without
    ngqt_compat.keep_none_alive the interpreter aborts after a few thousand (as a 300-node graph
    did). Here: far more calls than None had references, then a big graph."""
    import sys

    from app.graph import Graph

    w = QtWidgets.QWidget()
    for _ in range(20000):
        w.setToolTip("x")
    assert sys.getrefcount(None) > 10000
    g = Graph()
    prev = None
    for i in range(300):
        n = g.add_node("ImageScale", {}, pos=((i % 20) * 200, (i // 20) * 120))
        if prev:
            g.connect(prev, "image", n.id, "image")
        prev = n.id
    window.doc.replace(g, None)
    assert len(window.canvas._items) == 300
