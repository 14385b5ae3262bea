"""The layout canvas's paint tools, mask import, snap and align; and a painted layout run.

Painting is checked cell by cell on a canvas sized so one mask cell is exactly 10 px; snap and
align are pure math checked exactly; the painted example graph runs headless and the region
attention kernel's bias covers exactly the painted mask.

`python tests/test_ui_layout_paint.py` rewrites resources/graphs/layout-mask.loom.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GRAPH = ROOT / "resources" / "graphs" / "layout-mask.loom"
PROMPT = "a red circle and a blue square, white background"
CELL = 10  # px per mask cell on the test canvas (512 px image, 64 cells, 640 px drawn)


# -- the painted example graph ----------------------------------------------------------------
def circle_rows(rows=64, cols=64, centre=(16.0, 16.0), radius=12.0) -> list[str]:
    from app.ui import layout_paint as paint

    grid = paint.empty_grid(rows, cols)
    paint.paint_segment(grid, centre, centre, radius, 1)
    return paint.encode(grid)


def build(model_path: str = "builtin:shapes-t2i"):
    from app.graph import Graph
    from app.ui import layout_paint as paint
    from nodes.registry import add_node

    circle = paint.region(paint.decode(circle_rows()), "a red circle")
    boxes = [circle, {"x0": 0.55, "y0": 0.55, "x1": 0.95, "y1": 0.95, "phrase": "a blue square"}]
    g = Graph(meta={"title": "Layout: a painted region", "description":
                    "The red circle's region is painted (a disc), not a box: Paint-with-Words "
                    "raises its phrase's attention only inside the painted cells; the blue "
                    "square keeps a plain box. Select the Layout node and use Brush or Eraser "
                    "to repaint it."})
    load = add_node(g, "LoadModel", {"path": model_path}, title="Load ShapesT2I", pos=(0, 0))
    text = add_node(g, "TextEncode", {"text": PROMPT}, title="Prompt", pos=(320, -160))
    layout = add_node(g, "Layout", {"width": 32, "height": 32, "boxes": boxes}, title="Layout",
                      pos=(320, 40))
    empty = add_node(g, "EmptyLatent", {"width": 32, "height": 32}, title="Canvas 32x32", pos=(320, 240))
    region = add_node(g, "RegionAttention", {"strength": 2.0, "suppress_outside": True, "end": 0.3},
                      title="RegionAttention", pos=(640, 0))
    sampler = add_node(g, "Sampler", {"scheduler": "euler", "steps": 20, "cfg": 5.0, "seed": 7},
                       title="Sampler", pos=(940, 0))
    decode = add_node(g, "VAEDecode", {}, title="Decode", pos=(1240, 0))
    scale = add_node(g, "ImageScale", {"factor": 8.0, "method": "nearest"}, title="Scale x8",
                     pos=(1480, 0))
    save = add_node(g, "SaveImage", {"prefix": "layout-mask"}, title="Save", pos=(1720, 0))
    g.connect(load.id, "clip", text.id, "clip")
    g.connect(load.id, "vae", empty.id, "vae")
    g.connect(load.id, "model", region.id, "model")
    g.connect(layout.id, "layout", region.id, "layout")
    g.connect(region.id, "model", sampler.id, "model")
    g.connect(text.id, "conditioning", sampler.id, "positive")
    g.connect(empty.id, "latent", sampler.id, "latent")
    g.connect(load.id, "vae", decode.id, "vae")
    g.connect(sampler.id, "latent", decode.id, "latent")
    g.connect(decode.id, "image", scale.id, "image")
    g.connect(scale.id, "image", save.id, "image")
    return g


# -- helpers -----------------------------------------------------------------------------------
def _drag(qtbot, widget, a, b, modifier=None):
    from PySide6 import QtCore, QtGui, QtWidgets

    mods = modifier or QtCore.Qt.NoModifier
    qtbot.mousePress(widget, QtCore.Qt.LeftButton, mods, pos=a)
    for k in (1, 2, 3, 4):  # a few moves along the way, as a real stroke sends
        p = QtCore.QPointF(a.x() + (b.x() - a.x()) * k / 4, a.y() + (b.y() - a.y()) * k / 4)
        QtWidgets.QApplication.sendEvent(widget, QtGui.QMouseEvent(
            QtCore.QEvent.MouseMove, p, widget.mapToGlobal(p),
            QtCore.Qt.NoButton, QtCore.Qt.LeftButton, mods))
    qtbot.mouseRelease(widget, QtCore.Qt.LeftButton, mods, pos=b)


def cell_point(cx: float, cy: float):
    """The canvas pixel of mask cell coordinate (cx, cy) on the 660 px test canvas."""
    from PySide6 import QtCore

    return QtCore.QPoint(round(10 + CELL * cx), round(10 + CELL * cy))


@pytest.fixture
def painting(window):
    """(window, panel, canvas, layout node id): a 512x512 Layout node on a 660 px canvas."""
    doc = window.doc
    from PySide6 import QtCore

    layout = window.add_node("Layout", QtCore.QPointF(0, 0))
    window.canvas.select([layout])
    panel = window.layout_panel
    assert panel.node_id == layout
    panel.image_box.setChecked(False)
    canvas = panel.canvas
    canvas.setFixedSize(660, 660)  # the dock's layout keeps it: one mask cell is 10 px
    r = canvas.image_rect()
    assert (r.x(), r.y(), r.width(), r.height()) == (10, 10, 640, 640)
    assert canvas.mask_shape() == (64, 64)
    return window, panel, canvas, layout, doc


def cells(grid) -> set:
    return {(i, j) for i, row in enumerate(grid) for j, v in enumerate(row) if v}


def boxes_of(doc, node_id):
    return doc.graph.nodes[node_id].params.get("boxes", [])


# -- brush, eraser, undo -----------------------------------------------------------------------
def test_brush_stroke_sets_exactly_the_cells_under_it_and_the_box_follows(painting, qtbot):
    from app.ui import layout_paint as paint
    from nodes.layout import check_boxes

    window, panel, canvas, layout, doc = painting
    panel.tools.buttons["brush"].click()
    assert canvas.tool == "brush"
    panel.tools.size.setValue(4)  # diameter 4 cells: radius 2
    _drag(qtbot, canvas, cell_point(10.5, 20.5), cell_point(30.5, 20.5))
    boxes = boxes_of(doc, layout)
    assert len(boxes) == 1 and check_boxes(boxes) is None
    grid = paint.decode(boxes[0]["mask"])
    assert len(grid) == 64 and all(len(r) == 64 for r in grid)
    # cells whose centre is within 2 of the segment (10.5, 20.5)-(30.5, 20.5): rows 18..22 along
    # it, and the round caps: columns 9 and 31 rows 19..21, columns 8 and 32 row 20
    expected = {(i, j) for i in range(18, 23) for j in range(10, 31)}
    expected |= {(i, j) for i in (19, 20, 21) for j in (9, 31)} | {(20, 8), (20, 32)}
    assert cells(grid) == expected
    assert {k: boxes[0][k] for k in ("x0", "y0", "x1", "y1")} == \
        {"x0": 8 / 64, "y0": 18 / 64, "x1": 33 / 64, "y1": 23 / 64}
    assert all(isinstance(r, str) and len(r) == 64 for r in boxes[0]["mask"])  # compact rows
    # drawn: the region's cells are tinted at their place (cell (20, 20) is 10 px a side)
    shot = canvas.grab().toImage()
    inside, outside = shot.pixelColor(10 + 205, 10 + 205), shot.pixelColor(10 + 205, 10 + 405)
    assert inside != outside
    # a phrase per region, as boxes have
    panel.phrase.setText("a red circle")
    panel.phrase.editingFinished.emit()
    assert boxes_of(doc, layout)[0]["phrase"] == "a red circle"


def test_eraser_clears_its_cells_and_undo_restores_the_boxes_exactly(painting, qtbot):
    from app.ui import layout_paint as paint

    window, panel, canvas, layout, doc = painting
    panel.set_tool("brush")
    panel.tools.size.setValue(4)
    _drag(qtbot, canvas, cell_point(10.5, 20.5), cell_point(30.5, 20.5))
    painted = boxes_of(doc, layout)
    before = cells(paint.decode(painted[0]["mask"]))
    panel.tools.buttons["eraser"].click()
    panel.tools.size.setValue(2)  # radius 1 across the stroke at column 20
    _drag(qtbot, canvas, cell_point(20.5, 16.5), cell_point(20.5, 24.5))
    erased = boxes_of(doc, layout)
    after = cells(paint.decode(erased[0]["mask"]))
    assert before - after == {(i, j) for i in range(18, 23) for j in (19, 20, 21)}
    assert after <= before
    assert erased[0]["x0"] == painted[0]["x0"] and erased[0]["x1"] == painted[0]["x1"]
    window.act_undo.trigger()
    assert boxes_of(doc, layout) == painted and canvas.boxes == painted
    window.act_undo.trigger()
    assert boxes_of(doc, layout) == [] and canvas.boxes == []
    window.act_redo.trigger()
    assert boxes_of(doc, layout) == painted


def test_erasing_a_region_completely_removes_it_and_undo_brings_it_back(painting, qtbot):
    window, panel, canvas, layout, doc = painting
    panel.set_tool("brush")
    panel.tools.size.setValue(2)
    _drag(qtbot, canvas, cell_point(5.5, 5.5), cell_point(8.5, 5.5))
    painted = boxes_of(doc, layout)
    panel.set_tool("eraser")
    panel.tools.size.setValue(8)
    _drag(qtbot, canvas, cell_point(4.5, 5.5), cell_point(9.5, 5.5))
    assert boxes_of(doc, layout) == []
    window.act_undo.trigger()
    assert boxes_of(doc, layout) == painted


def test_brush_on_a_box_turns_it_into_a_region_that_keeps_its_phrase(painting, qtbot):
    from app.ui import layout_paint as paint

    window, panel, canvas, layout, doc = painting
    box = {"x0": 0.25, "y0": 0.25, "x1": 0.5, "y1": 0.5, "phrase": "a blue square"}
    doc.set_param(layout, "boxes", [box])
    canvas.select(0)
    panel.set_tool("brush")
    panel.tools.size.setValue(2)
    _drag(qtbot, canvas, cell_point(40.5, 20.5), cell_point(40.5, 20.5))  # one dab at (20, 40)
    region = boxes_of(doc, layout)[0]
    assert region["phrase"] == "a blue square"
    expected = {(i, j) for i in range(16, 32) for j in range(16, 32)}  # the box's cells
    expected |= {(20, 40), (19, 40), (21, 40), (20, 39), (20, 41)}   # the dab, radius 1
    assert cells(paint.decode(region["mask"])) == expected
    assert (region["x0"], region["x1"], region["y0"], region["y1"]) == (0.25, 42 / 64, 0.25, 0.5)
    panel.clear_mask()  # back to the plain box of its extent
    assert boxes_of(doc, layout) == [{k: v for k, v in region.items() if k != "mask"}]


# -- import a mask image -----------------------------------------------------------------------
def _l_shape_png(path, scale=2, rgba=False):
    """An L-shape on a 64-cell grid drawn at `scale` px per cell; returns its cells."""
    from PIL import Image

    shape = {(i, j) for i in range(8, 56) for j in range(8, 20)} | \
            {(i, j) for i in range(44, 56) for j in range(8, 48)}
    side = 64 * scale
    if rgba:
        im = Image.new("RGBA", (side, side), (255, 255, 255, 0))  # white but transparent
        ink = (0, 0, 0, 255)
    else:
        im = Image.new("L", (side, side), 0)
        ink = 255
    for i, j in shape:
        for y in range(i * scale, (i + 1) * scale):
            for x in range(j * scale, (j + 1) * scale):
                im.putpixel((x, y), ink)
    im.save(path)
    return shape


@pytest.mark.parametrize("rgba", [False, True], ids=["white-on-black", "opaque-on-transparent"])
def test_imported_mask_image_round_trips_to_its_rows(painting, tmp_path, rgba):
    from app.ui import layout_paint as paint

    window, panel, canvas, layout, doc = painting
    shape = _l_shape_png(tmp_path / "l.png", rgba=rgba)
    assert panel.import_mask(str(tmp_path / "l.png"))
    (region,) = boxes_of(doc, layout)
    assert cells(paint.decode(region["mask"])) == shape
    assert (region["x0"], region["y0"], region["x1"], region["y1"]) == (8 / 64, 8 / 64, 48 / 64, 56 / 64)
    # and back: the stored rows drawn as an image import to the same rows
    grid = paint.decode(region["mask"])
    from PIL import Image

    im = Image.new("L", (64, 64))
    im.putdata([255 * v for row in grid for v in row])
    im.save(tmp_path / "again.png")
    assert paint.mask_from_image(str(tmp_path / "again.png"), 64, 64) == grid
    window.act_undo.trigger()
    assert boxes_of(doc, layout) == []


def test_bad_mask_images_give_a_clear_error_and_change_nothing(painting, tmp_path, monkeypatch):
    from PIL import Image

    from app.ui import layout_paint as paint

    window, panel, canvas, layout, doc = painting
    messages = []
    panel.message.connect(messages.append)
    (tmp_path / "notes.png").write_text("not a picture")
    Image.new("L", (32, 32), 0).save(tmp_path / "black.png")
    Image.new("L", (100, 100), 255).save(tmp_path / "white.png")
    cases = [(tmp_path / "missing.png", "cannot read"), (tmp_path / "notes.png", "not an image"),
             (tmp_path / "black.png", "no white")]
    for path, reason in cases:
        assert not panel.import_mask(str(path))
        assert path.name in messages[-1] and reason in messages[-1]
    with monkeypatch.context() as m:  # Pillow's decompression-bomb check, at a small limit
        m.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
        assert not panel.import_mask(str(tmp_path / "white.png"))
        assert "too large to decode safely" in messages[-1]
    with monkeypatch.context() as m:
        m.setattr(paint, "MAX_IMPORT_PIXELS", 5000)
        assert not panel.import_mask(str(tmp_path / "white.png"))
        assert "100x100 pixels" in messages[-1]
    assert boxes_of(doc, layout) == []
    assert panel.import_mask(str(tmp_path / "white.png"))  # the same file, within the limits
    assert boxes_of(doc, layout)[0]["mask"] == ["1" * 64] * 64


def test_mask_shape_keeps_the_image_aspect():
    from app.ui.layout_paint import mask_shape

    assert mask_shape(512, 512) == (64, 64)
    assert mask_shape(1024, 512) == (32, 64)
    assert mask_shape(512, 768) == (64, 43)
    assert mask_shape(8, 8192) == (64, 1)


def test_layout_node_accepts_text_rows_and_hands_the_kernels_numbers():
    from nodes.layout import Layout, check_boxes

    box = {"x0": 0.0, "y0": 0.0, "x1": 0.5, "y1": 1.0, "phrase": "a red circle", "mask": ["10", "10"]}
    assert check_boxes([box]) is None
    assert "only 0 and 1" in check_boxes([{**box, "mask": ["12", "10"]}])
    assert "same" in check_boxes([{**box, "mask": ["10", "1"]}])
    assert "rows" in check_boxes([{**box, "mask": ["10", [1, 0]]}])
    assert "larger" in check_boxes([{**box, "mask": ["1" * 257]}])
    out = Layout().run(None, 16, 16, [box])["layout"]
    assert out["boxes"][0]["mask"] == [[1, 0], [1, 0]]
    assert box["mask"] == ["10", "10"]  # the param itself is not changed


# -- snap and align ---------------------------------------------------------------------------
def test_snap_and_align_math_is_exact():
    from app.ui.layout_align import align, distribute, snap, snap_moved

    step = 1 / 16
    assert snap(0.33, step) == 0.3125 and snap(0.34, step) == 0.3125 and snap(0.35, step) == 0.375
    assert snap(1.2, step) == 1.0 and snap(-0.1, step) == 0.0
    assert snap_moved({"x0": 0.97, "y0": 0.02, "x1": 1.0, "y1": 0.27}, step) == (0.9375, 0.0)
    assert snap_moved({"x0": 0.9, "y0": 0.0, "x1": 1.0, "y1": 0.25}, step) == (0.875, 0.0)
    a = {"x0": 0.125, "y0": 0.5, "x1": 0.375, "y1": 0.75}
    b = {"x0": 0.5, "y0": 0.0, "x1": 0.625, "y1": 0.5}
    assert align([a, b], "left") == [a, {"x0": 0.125, "y0": 0.0, "x1": 0.25, "y1": 0.5}]
    assert align([a, b], "right") == [{"x0": 0.375, "y0": 0.5, "x1": 0.625, "y1": 0.75}, b]
    assert align([a, b], "top") == [{"x0": 0.125, "y0": 0.0, "x1": 0.375, "y1": 0.25}, b]
    assert align([a, b], "bottom") == [a, {"x0": 0.5, "y0": 0.25, "x1": 0.625, "y1": 0.75}]
    # centres of the extent 0.125..0.625 (0.375) and 0..0.75 (0.375)
    assert align([a, b], "hcenter") == [{"x0": 0.25, "y0": 0.5, "x1": 0.5, "y1": 0.75},
                                        {"x0": 0.3125, "y0": 0.0, "x1": 0.4375, "y1": 0.5}]
    assert align([a, b], "vcenter") == [{"x0": 0.125, "y0": 0.25, "x1": 0.375, "y1": 0.5},
                                        {"x0": 0.5, "y0": 0.125, "x1": 0.625, "y1": 0.625}]
    with pytest.raises(ValueError, match="middle"):
        align([a], "middle")
    row = [{"x0": 0.75, "y0": 0, "x1": 1.0, "y1": 0.5}, {"x0": 0.0, "y0": 0, "x1": 0.125, "y1": 0.5},
           {"x0": 0.25, "y0": 0, "x1": 0.5, "y1": 0.5}]
    # span 0..1, sizes 0.625: gaps of 0.1875; the first and last stay
    assert distribute(row, "x") == [row[0], row[1], {"x0": 0.3125, "y0": 0, "x1": 0.5625, "y1": 0.5}]
    assert distribute(row[:2], "x") == row[:2]
    assert distribute(row, "y") == row  # all on one row: already evenly spread vertically


def test_align_in_the_panel_moves_selected_boxes_and_painted_regions_by_whole_cells(painting, qtbot):
    from app.ui import layout_paint as paint

    window, panel, canvas, layout, doc = painting
    disc = paint.region(paint.decode(circle_rows(centre=(40.0, 40.0), radius=6.0)), "a red circle")
    box = {"x0": 0.125, "y0": 0.125, "x1": 0.25, "y1": 0.25, "phrase": "a blue square"}
    doc.set_param(layout, "boxes", [box, disc])
    from PySide6 import QtCore

    # shift-click selects both
    qtbot.mouseClick(canvas, QtCore.Qt.LeftButton, pos=cell_point(12, 12))
    qtbot.mouseClick(canvas, QtCore.Qt.LeftButton, QtCore.Qt.ShiftModifier, pos=cell_point(40, 40))
    assert canvas.selection() == [0, 1]
    panel.align_selected("left")
    new_box, new_disc = boxes_of(doc, layout)
    assert new_box == box
    assert new_disc["x0"] == 0.125 and new_disc["phrase"] == "a red circle"
    shift = round((disc["x0"] - 0.125) * 64)
    moved = {(i, j - shift) for i, j in cells(paint.decode(disc["mask"]))}
    assert cells(paint.decode(new_disc["mask"])) == moved
    window.act_undo.trigger()
    assert boxes_of(doc, layout) == [box, disc]


def test_snap_puts_drawn_and_moved_boxes_on_the_grid(painting, qtbot):
    window, panel, canvas, layout, doc = painting
    panel.snap_box.setChecked(True)
    # 640 px / 16 = 40 px a grid step; draw from 0.26 to 0.49 -> 0.25 .. 0.5
    _drag(qtbot, canvas, cell_point(0.26 * 64, 0.26 * 64), cell_point(0.49 * 64, 0.49 * 64))
    (box,) = boxes_of(doc, layout)
    assert (box["x0"], box["y0"], box["x1"], box["y1"]) == (0.25, 0.25, 0.5, 0.5)
    # move by 0.1 right: x0 0.35 snaps to 0.375
    _drag(qtbot, canvas, cell_point(24, 24), cell_point(24 + 0.1 * 64, 24))
    (box,) = boxes_of(doc, layout)
    assert (box["x0"], box["y0"], box["x1"], box["y1"]) == (0.375, 0.25, 0.625, 0.5)


# -- the painted layout runs, and the kernel uses the painted cells ------------------------------
def test_example_graph_is_current_and_valid():
    from app.graph import load
    from app.graph.validate import validate
    from nodes import registry

    g = load(GRAPH, registry.get)
    assert not [p.message for p in validate(g, registry.get)]
    (layout,) = [n for n in g.nodes.values() if n.type == "Layout"]
    assert layout.params["boxes"][0]["mask"] == circle_rows()
    fresh = build()
    assert sorted(n.type for n in g.nodes.values()) == sorted(n.type for n in fresh.nodes.values())
    for node in g.nodes.values():
        assert node.version == registry.get(node.type).version, node.type
    assert GRAPH.stat().st_size < 20_000  # one line a mask row, not a line a cell


def test_painted_graph_runs_headless_and_region_attention_uses_the_mask(tiny_pixel_model, tmp_path,
                                                                         monkeypatch):
    import torch

    from app.engine import Executor
    from app.graph import load
    from kernels.layout import box_mask
    from kernels.layout.region_attention import RegionAttentionRun
    from nodes import registry
    from nodes.layout import mask_rows

    seen = []
    original = RegionAttentionRun.bias

    def spy(self, ctl, layer, q, k):  # the real bias, kept with the layer it was made for
        out = original(self, ctl, layer, q, k)
        seen.append((layer.height, layer.width, self.boxes, out.detach().clone()))
        return out

    monkeypatch.setattr(RegionAttentionRun, "bias", spy)
    g = load(GRAPH, registry.get)
    for node in g.nodes.values():
        if node.type == "LoadModel":
            node.params["path"] = tiny_pixel_model
        if node.type in ("Layout", "EmptyLatent"):
            node.params.update(width=16, height=16)
        if node.type == "Sampler":
            node.params["steps"] = 2
        if node.type == "RegionAttention":
            node.params.update(suppress_outside=False, end=1.0)
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values()}
    assert len(report.outputs()) == 1
    assert seen
    painted = {"x0": 0, "y0": 0, "x1": 1, "y1": 1, "mask": mask_rows(circle_rows())}
    differs = False
    for h, w, boxes, bias in seen:
        circle = next(b for b in boxes if b["phrase"] == "a red circle")
        inside = bias[0, 0][:, circle["tokens"]].ne(0).all(-1)  # (pixels,) the phrase is raised
        assert torch.equal(inside, box_mask(painted, h, w).flatten().bool()), (h, w)
        rect = box_mask({k: circle[k] for k in ("x0", "y0", "x1", "y1")}, h, w).flatten().bool()
        differs |= not torch.equal(inside, rect)
    assert differs  # the disc, not its bounding box


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from app.graph import save

    save(build(), GRAPH)
    print("wrote", GRAPH.name)


@pytest.mark.parametrize("stroke", [((0.50, 0.58), (0.75, 0.52)), ((0.56, 0.60), (0.70, 0.60)),
                                    ((0.06, 0.50), (0.40, 0.50)), ((0.60, 0.97), (0.90, 0.97))])
def test_painted_region_labels_do_not_cover_box_labels(window, qtbot, stroke):
    """The regional-prompts example with a new region painted near its boxes, on a canvas the
    size the right column gives it: no two labels overlap and each stays on the image."""
    from pathlib import Path

    from PySide6 import QtCore

    window.open_example(Path(__file__).resolve().parents[1] / "resources" / "graphs" / "layout-regional-prompts.loom")
    layout = next(i for i, n in window.doc.graph.nodes.items() if n.type == "Layout")
    window.canvas.select([layout])
    panel = window.layout_panel
    canvas = panel.canvas
    canvas.setFixedSize(340, 300)
    canvas.selected, canvas.extra = -1, set()  # nothing selected: the brush paints a new region
    panel.tools.buttons["brush"].click()
    r = canvas.image_rect()
    (ax, ay), (bx, by) = stroke
    _drag(qtbot, canvas, QtCore.QPoint(round(r.x() + ax * r.width()), round(r.y() + ay * r.height())),
          QtCore.QPoint(round(r.x() + bx * r.width()), round(r.y() + by * r.height())))
    boxes = boxes_of(window.doc, layout)
    assert len(boxes) == 3 and boxes[2].get("mask")
    tags = canvas.label_rects()
    assert [label for _t, label, _f in tags] == ["a red circle", "a blue square", "region 3"]
    for k, (tag, _label, _font) in enumerate(tags):
        assert r.adjusted(-0.5, -0.5, 0.5, 0.5).contains(tag)
        assert not any(tag.intersects(other) for other, _l, _f in tags[k + 1:]), tags
    canvas.grab()  # and it paints with them
