"""Validation returns every problem at once, each with its node id and an actionable sentence."""

from __future__ import annotations

import json

import pytest

from app.graph import Graph, dumps, loads, validate
from nodes import registry


def catalog(name):
    return registry.get(name)


def add(g: Graph, type_name: str, params=None, **kw):
    spec = registry.get(type_name)
    return g.add_node(type_name, params, version=spec.version if spec else 1, **kw)


def chain(**sampler_params):
    """A complete, valid text-to-image chain with a preview; returns (graph, nodes by role)."""
    g = Graph()
    n = {}
    n["load"] = add(g, "LoadModel", {"path": "/models/tiny"}, title="Load", pos=(0, 0))
    n["text"] = add(g, "TextEncode", {"text": "a red circle"}, title="Prompt", pos=(200, 0))
    n["neg"] = add(g, "TextEncode", {"text": "blurry"}, title="Negative", pos=(200, 100))
    n["empty"] = add(g, "EmptyLatent", {"width": 64, "height": 64}, title="Empty", pos=(200, 200))
    n["sampler"] = add(g, "Sampler", {"steps": 4, **sampler_params}, title="Sampler", pos=(400, 0))
    n["decode"] = add(g, "VAEDecode", {}, title="Decode", pos=(600, 0))
    n["preview"] = add(g, "PreviewImage", {}, title="Preview", pos=(800, 0))
    g.connect(n["load"].id, "clip", n["text"].id, "clip")
    g.connect(n["load"].id, "clip", n["neg"].id, "clip")
    g.connect(n["load"].id, "vae", n["empty"].id, "vae")
    g.connect(n["load"].id, "model", n["sampler"].id, "model")
    g.connect(n["text"].id, "conditioning", n["sampler"].id, "positive")
    g.connect(n["neg"].id, "conditioning", n["sampler"].id, "negative")
    g.connect(n["empty"].id, "latent", n["sampler"].id, "latent")
    g.connect(n["load"].id, "vae", n["decode"].id, "vae")
    g.connect(n["sampler"].id, "latent", n["decode"].id, "latent")
    g.connect(n["decode"].id, "image", n["preview"].id, "image")
    return g, n


def problems_of(g, node, **kw):
    return [p.message for p in validate(g, catalog, **kw) if p.node_id == node.id]


def test_valid_graph_has_no_problems():
    g, _ = chain(scheduler="dpmpp_2m", cfg=0.0, denoise=1.0, seed=2**63 - 1)
    assert validate(g, catalog) == []


def test_optional_input_may_stay_unconnected_and_defaults_fill_missing_params():
    g, n = chain()
    g.disconnect(n["sampler"].id, "negative")
    g.remove_node(n["neg"].id)
    n["empty"].params.clear()
    assert validate(g, catalog) == []


def test_incompatible_port_types():
    g, n = chain()
    g.connect(n["load"].id, "clip", n["sampler"].id, "model")
    [msg] = problems_of(g, n["sampler"])
    assert "input 'model' takes MODEL" in msg and "gives CLIP" in msg and "Load" in msg
    assert msg.startswith(n["sampler"].label)


def test_missing_required_input():
    g, n = chain()
    g.disconnect(n["sampler"].id, "latent")
    assert problems_of(g, n["sampler"]) == [f"{n['sampler'].label}: input 'latent' (LATENT) is not connected"]


def test_cycle_names_every_node_on_it_and_only_them():
    g = Graph()
    a = add(g, "ImageScale", {}, title="A", pos=(0, 0))
    b = add(g, "ImageScale", {}, title="B", pos=(100, 0))
    c = add(g, "ImageScale", {}, title="C", pos=(200, 0))
    after = add(g, "PreviewImage", {}, title="After", pos=(300, 0))
    g.connect(a.id, "image", b.id, "image")
    g.connect(b.id, "image", c.id, "image")
    g.connect(c.id, "image", a.id, "image")
    g.connect(c.id, "image", after.id, "image")
    problems = validate(g, catalog)
    on_cycle = {p.node_id for p in problems if "cycle" in p.message and p.node_id != after.id}
    assert on_cycle == {a.id, b.id, c.id}
    for node in (a, b, c):
        [msg] = problems_of(g, node)
        assert "is on a cycle" in msg
    # The node fed by the cycle is not itself on it, and is told where the loop is.
    [msg] = problems_of(g, after)
    assert "is on a cycle" not in msg and "cycle" in msg and "C" in msg


def test_self_loop_from_a_file_is_a_cycle():
    g = Graph()
    a = add(g, "ImageScale", {}, title="Loop")
    doc = json.loads(dumps(g))
    doc["edges"] = [{"from": {"node": a.id, "port": "image"}, "to": {"node": a.id, "port": "image"}}]
    g2 = loads(json.dumps(doc), catalog)
    [p] = validate(g2, catalog)
    assert p.node_id == a.id and "cycle" in p.message


@pytest.mark.parametrize("param, value, words", [
    ("steps", 0, "below the minimum 1"),
    ("steps", 501, "above the maximum 500"),
    ("cfg", -0.5, "below the minimum 0.0"),
    ("denoise", 1.5, "above the maximum 1.0"),
    ("seed", -1, "below the minimum 0"),
    ("steps", "20", "expected a whole number"),
    ("steps", 2.5, "expected a whole number"),
    ("steps", True, "expected a whole number"),
    ("cfg", float("nan"), "finite"),
    ("cfg", "7", "expected a number"),
])
def test_param_out_of_range_or_wrong_type(param, value, words):
    g, n = chain(**{param: value})
    [msg] = problems_of(g, n["sampler"])
    assert f"param {param!r}" in msg and words in msg and msg.startswith(n["sampler"].label)


def test_unknown_choice_lists_the_options():
    g, n = chain(scheduler="euler_a")
    [msg] = problems_of(g, n["sampler"])
    assert "'euler_a' is not one of" in msg and "euler_ancestral" in msg and "ddim" in msg


def test_unknown_node_type():
    g, n = chain()
    ghost = g.add_node("FancyUpscaler9000", {"tile": 512}, title="Upscale", pos=(700, 300))
    g.connect(n["decode"].id, "image", ghost.id, "image")
    g.connect(ghost.id, "image", n["preview"].id, "image")
    [msg] = problems_of(g, ghost)
    assert "unknown node type 'FancyUpscaler9000'" in msg
    assert problems_of(g, n["preview"]) == []  # its wire from the unknown node is reported once


def test_unknown_node_type_from_a_file_is_a_placeholder_problem():
    g, n = chain()
    doc = json.loads(dumps(g))
    doc["nodes"].append({"id": "ph-1", "type": "NotInstalled", "version": 4, "params": {"x": 1}})
    g2 = loads(json.dumps(doc), catalog)
    problems = validate(g2, catalog)
    assert [p.node_id for p in problems] == ["ph-1"]
    assert "unknown node type 'NotInstalled'" in problems[0].message


def test_placeholder_of_a_known_type_is_not_called_newer():
    """A file loaded without a catalog keeps every node as a placeholder: say so, not 'newer'."""
    g, n = chain()
    g2 = loads(dumps(g))  # no catalog
    [msg] = problems_of(g2, n["sampler"])
    assert "placeholder" in msg and "newer" not in msg


def test_wire_into_a_missing_input():
    g, n = chain()
    g.connect(n["text"].id, "conditioning", n["decode"].id, "conditioning")
    [msg] = problems_of(g, n["decode"])
    assert "'conditioning', which is not an input of VAEDecode" in msg


def test_wire_from_a_missing_output():
    g, n = chain()
    g.connect(n["load"].id, "unet", n["sampler"].id, "model")
    [msg] = problems_of(g, n["sampler"])
    assert "Load" in msg and ".unet" in msg and "no such output" in msg


def test_unknown_param():
    g, n = chain(sampler_name="euler")
    [msg] = problems_of(g, n["sampler"])
    assert "unknown param 'sampler_name'" in msg and "Sampler" in msg


def test_every_problem_is_reported_at_once_with_its_node_id():
    g, n = chain(steps=0, scheduler="nope", bogus=1)
    g.connect(n["load"].id, "vae", n["text"].id, "clip")            # wrong type
    g.disconnect(n["decode"].id, "latent")                            # missing input
    n["empty"].params["width"] = 4                                    # below minimum
    ghost = g.add_node("Ghost", {}, title="Ghost", pos=(0, 500))     # unknown type
    loop_a = add(g, "ImageScale", {"method": "sharp"}, title="LoopA", pos=(0, 600))
    loop_b = add(g, "ImageScale", {}, title="LoopB", pos=(100, 600))
    g.connect(loop_a.id, "image", loop_b.id, "image")
    g.connect(loop_b.id, "image", loop_a.id, "image")
    problems = validate(g, catalog)
    by_node: dict[str, list[str]] = {}
    for p in problems:
        assert p.node_id in g.nodes
        assert p.message.startswith(g.nodes[p.node_id].label + ": ")
        assert str(p) == p.message
        by_node.setdefault(p.node_id, []).append(p.message)
    assert len(by_node[n["sampler"].id]) == 3
    assert len(by_node[n["text"].id]) == 1
    assert len(by_node[n["decode"].id]) == 1
    assert len(by_node[n["empty"].id]) == 1
    assert len(by_node[ghost.id]) == 1
    assert len(by_node[loop_a.id]) == 2  # bad choice and the cycle
    assert len(by_node[loop_b.id]) == 1
    assert set(by_node) == {n["sampler"].id, n["text"].id, n["decode"].id, n["empty"].id, ghost.id,
                            loop_a.id, loop_b.id}
    # No problem is reported twice.
    assert len(problems) == len({(p.node_id, p.message) for p in problems})


def test_targets_limit_validation_to_their_cone():
    g, n = chain()
    stray = add(g, "Sampler", {"steps": 0}, title="Stray", pos=(0, 900))
    assert {p.node_id for p in validate(g, catalog)} == {stray.id}
    assert validate(g, catalog, targets={n["preview"].id}) == []


def test_empty_graph_is_valid():
    assert validate(Graph(), catalog) == []
