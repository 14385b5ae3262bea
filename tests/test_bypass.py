"""Bypass, mute and reroute: a bypassed node is the graph without it and its input wired
through (bit-identical images), a reroute is the direct wire, mute skips its readers with a
reason, and all of it round-trips through the file."""

from __future__ import annotations

import pytest

from app.engine import EngineEvents, Executor
from app.graph import GraphFileError, dumps, loads, passthrough, validate
from app.graph.arrange import tidy
from nodes import registry
from nodes.registry import add_node


def _run(g, tmp_path, ex=None, name="out"):
    """(image, report) of a run; the image is what the SaveImage got."""
    ex = ex or Executor(device="cpu", disk_cache=False)
    got = {}
    report = ex.run(g, events=EngineEvents(images=lambda nid, im, paths: got.setdefault("im", im)),
                    output_dir=tmp_path / name)
    return got.get("im"), report


def _chain(model, **kw):
    from conftest import txt2img_graph

    return txt2img_graph(model, steps=2, size=16, **kw)


def _insert(g, ids, type_name, params, src, src_port, dst, dst_port, title):
    """A node of `type_name` put on the wire src.src_port -> dst.dst_port (its first in/out)."""
    spec = registry.get(type_name)
    nid = add_node(g, type_name, params, title=title, pos=(500, 300)).id
    g.connect(src, src_port, nid, next(iter(spec.inputs)))
    g.connect(nid, next(iter(spec.outputs)), dst, dst_port)
    ids[title] = nid
    return nid


def test_bypassed_node_is_the_graph_without_it(tiny_pixel_model, tmp_path):
    direct, ids = _chain(tiny_pixel_model)
    ref, rep = _run(direct, tmp_path, name="direct")
    assert rep.ok and ref is not None
    # an ImageScale between decode and save, and a second Sampler pass on the latent
    g, ids = _chain(tiny_pixel_model)
    scale = _insert(g, ids, "ImageScale", {"factor": 2.0}, ids["decode"], "image", ids["save"], "image", "Scale")
    again = add_node(g, "Sampler", {"steps": 2, "seed": 9, "denoise": 0.5}, title="Again").id
    g.connect(ids["sampler"], "latent", again, "latent")
    g.connect(again, "latent", ids["decode"], "latent")
    g.connect(ids["load"], "model", again, "model")
    g.connect(ids["text"], "conditioning", again, "positive")
    changed, rep = _run(g, tmp_path, name="changed")
    assert rep.ok and changed.shape[1] == 32  # the inserted nodes do something
    g.nodes[scale].mode = g.nodes[again].mode = "bypass"
    image, rep = _run(g, tmp_path, name="bypassed")
    assert rep.ok, {r.title: r.error for r in rep.nodes.values() if r.error}
    assert rep.status(scale) == rep.status(again) == "bypassed"
    assert image.shape == ref.shape and (image == ref).all()


def test_bypass_with_no_input_of_the_output_type_fails_naming_the_node(tiny_pixel_model, tmp_path):
    g, ids = _chain(tiny_pixel_model)
    g.nodes[ids["decode"]].mode = "bypass"  # IMAGE out, inputs VAE and LATENT: nothing to pass
    image, rep = _run(g, tmp_path)
    assert image is None
    assert rep.status(ids["decode"]) == "failed"
    assert "Decode" in rep.nodes[ids["decode"]].error and "no IMAGE input" in rep.nodes[ids["decode"]].error
    assert rep.status(ids["save"]) == "skipped" and "Decode" in rep.nodes[ids["save"]].error


def test_mute_skips_required_readers_and_unwires_optional_ones(tiny_pixel_model, tmp_path):
    g, ids = _chain(tiny_pixel_model)
    neg = add_node(g, "TextEncode", {"text": "blue"}, title="Negative", pos=(200, 100)).id
    g.connect(ids["load"], "clip", neg, "clip")
    g.connect(neg, "conditioning", ids["sampler"], "negative")
    g.nodes[neg].mode = "mute"
    image, rep = _run(g, tmp_path, name="muted-negative")
    direct, _ = _chain(tiny_pixel_model)
    ref, _ = _run(direct, tmp_path, name="direct")
    assert rep.ok and rep.status(neg) == "muted"
    assert (image == ref).all()  # a muted optional input is as if unwired
    g.nodes[ids["decode"]].mode = "mute"
    image, rep = _run(g, tmp_path, name="muted-decode")
    assert image is None and rep.status(ids["decode"]) == "muted"
    assert rep.status(ids["save"]) == "skipped"
    assert "Decode" in rep.nodes[ids["save"]].error and "muted" in rep.nodes[ids["save"]].error
    assert ids["sampler"] not in rep.nodes  # what only the muted node reads is not pulled


def test_muted_or_bypassed_output_node_is_not_a_run_target(tiny_pixel_model):
    g, ids = _chain(tiny_pixel_model)
    for mode in ("mute", "bypass"):
        g.nodes[ids["save"]].mode = mode
        assert Executor.output_nodes(g) == []


def test_reroute_is_the_direct_wire(tiny_pixel_model, tmp_path):
    direct, ids = _chain(tiny_pixel_model)
    ex = Executor(device="cpu", disk_cache=False)
    ref, _ = _run(direct, tmp_path, ex, name="direct")
    g, ids = _chain(tiny_pixel_model)
    r1 = _insert(g, ids, "Reroute", {}, ids["sampler"], "latent", ids["decode"], "latent", "R1")
    # two reroutes in a row on the model wire
    r2 = _insert(g, ids, "Reroute", {}, ids["load"], "model", ids["sampler"], "model", "R2")
    g.disconnect(r2, "in")
    r3 = add_node(g, "Reroute", {}, pos=(100, 100)).id
    g.connect(ids["load"], "model", r3, "in")
    g.connect(r3, "out", r2, "in")
    assert validate(g, registry.get) == []
    image, rep = _run(g, tmp_path, ex, name="rerouted")
    assert (image == ref).all()
    assert rep.status(r1) == rep.status(r3) == "rerouted"
    assert rep.status(ids["sampler"]) == "cached-memory"  # same cache key as the direct wire


def test_reroute_carries_the_type_of_its_wire(tiny_pixel_model):
    g, ids = _chain(tiny_pixel_model)
    r = _insert(g, ids, "Reroute", {}, ids["load"], "clip", ids["text"], "clip", "R")
    assert passthrough.wire_type(g, registry.get, r, "out") == "CLIP"
    g.connect(ids["load"], "vae", r, "in")  # now it carries VAE into a CLIP input
    problems = [p.message for p in validate(g, registry.get)]
    assert any("takes CLIP" in m and "gives VAE" in m for m in problems), problems


def test_modes_colour_collapse_round_trip_and_old_files_still_read(tiny_pixel_model):
    g, ids = _chain(tiny_pixel_model)
    g.nodes[ids["decode"]].mode = "bypass"
    g.nodes[ids["text"]].mode = "mute"
    g.nodes[ids["sampler"]].meta.update(color="#2f6d4a", collapsed=True)
    text = dumps(g)
    back = loads(text, registry.get)
    assert back.nodes[ids["decode"]].mode == "bypass" and back.nodes[ids["text"]].mode == "mute"
    assert back.nodes[ids["sampler"]].meta == {"color": "#2f6d4a", "collapsed": True}
    assert dumps(back) == text
    # a node in the normal mode writes no "mode" key: files look as before
    assert '"mode"' not in dumps(_chain(tiny_pixel_model)[0])
    bad = text.replace('"mode": "bypass"', '"mode": "sideways"')
    with pytest.raises(GraphFileError, match="'mode' should be one of"):
        loads(bad, registry.get)


def test_tidy_lays_out_by_depth():
    from conftest import txt2img_graph

    g, ids = txt2img_graph("unused")
    for n in g.nodes.values():
        n.pos = (0.0, 0.0)
    sizes = {nid: (150.0, 90.0) for nid in g.nodes}
    pos = tidy(g, list(g.nodes), sizes)
    x = {role: pos[ids[role]][0] for role in ids}
    assert x["load"] < x["text"] == x["empty"] < x["sampler"] < x["decode"] < x["save"]
    assert pos[ids["text"]][1] != pos[ids["empty"]][1]  # one column, stacked
    assert abs(pos[ids["text"]][1] - pos[ids["empty"]][1]) >= 90


def test_tidy_with_a_width_wraps_columns_into_bands_below():
    from conftest import txt2img_graph

    g, ids = txt2img_graph("unused")
    sizes = {nid: (150.0, 90.0) for nid in g.nodes}
    wide = tidy(g, list(g.nodes), sizes)
    pos = tidy(g, list(g.nodes), sizes, max_width=400)
    right = max(x + 150.0 for x, _ in pos.values()) - min(x for x, _ in pos.values())
    assert right <= 400 < max(x + 150.0 for x, _ in wide.values()) - min(x for x, _ in wide.values())
    # read left to right, then down: each later column is to the right in its band or in a lower band
    order = ["load", "text", "sampler", "decode", "save"]
    spots = [pos[ids[r]] for r in order]
    for (x0, y0), (x1, y1) in zip(spots, spots[1:]):
        assert x1 > x0 or y1 >= y0 + 90 + 36
    assert len({y for _, y in (pos[ids[r]] for r in ("load", "sampler", "save"))}) > 1  # more than one band
