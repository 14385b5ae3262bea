"""The example layout graphs in resources/graphs/layout-*.loom: built here, checked and run here.

`python tests/test_layout_graphs.py` rewrites the files (node versions come from the registry).
The tests load each shipped file, validate it, and run it headless with the model path pointed
at a tiny random model (the shipped files use the built-in ShapesT2I).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GRAPHS = ROOT / "resources" / "graphs"
PROMPT = "a red circle and a blue square, white background"
BOXES = [
    {"x0": 0.05, "y0": 0.05, "x1": 0.45, "y1": 0.45, "phrase": "a red circle"},
    {"x0": 0.55, "y0": 0.55, "x1": 0.95, "y1": 0.95, "phrase": "a blue square"},
]

# file stem -> (title, description, technique chain [(type, params, extra inputs)])
EXAMPLES = {
    "layout-region-attention": (
        "Layout: Paint-with-Words", "Each phrase's cross-attention is raised inside its box "
        "(eDiff-I Paint-with-Words), strongest while the image is noisy, for the first 30% of the "
        "steps: held to the end it paints the whole box, and small shapes come out square.",
        [("RegionAttention", {"strength": 2.0, "suppress_outside": True, "end": 0.3}, {})]),
    "layout-regional-prompts": (
        "Layout: per-region prompts", "Inside each box the model reads that box's own phrase; "
        "elsewhere it reads the whole prompt.",
        [("RegionalPrompts", {"mix": 1.0, "emphasis": 2.0}, {"clip": "clip"})]),
    "layout-zestguide": (
        "Layout: ZestGuide + Paint-with-Words", "ZestGuide steers the latent in the first half of "
        "sampling so each phrase's attention map matches its box; combined with Paint-with-Words "
        "as in its paper.",
        [("RegionAttention", {"strength": 2.0, "suppress_outside": True}, {}),
         ("ZestGuide", {"eta": 1.0, "iterations": 1, "end": 0.5}, {})]),
    "layout-box-guidance": (
        "Layout: box constraints (CSG / BoxDiff)", "Inner-box, outer-box and corner losses guide "
        "the latent; CSG redistribution moves each phrase's attention into its box early on.",
        [("BoxGuidance", {"eta": 1.0, "redistribute": True, "redistribute_end": 0.3}, {})]),
    "layout-a-star": (
        "Layout: A-STAR with per-region prompts", "A-STAR keeps the two concepts' attention apart "
        "and alive across steps (it ignores positions); per-region prompts place them.",
        [("RegionalPrompts", {"mix": 1.0, "emphasis": 2.0}, {"clip": "clip"}),
         ("AStar", {"eta": 0.3}, {})]),
}


def build(stem: str, model_path: str = "builtin:shapes-t2i"):
    from app.graph import Graph
    from nodes.registry import add_node

    title, description, chain = EXAMPLES[stem]
    g = Graph(meta={"title": title, "description": description})
    load = add_node(g, "LoadModel", {"path": model_path}, title="Load ShapesT2I", pos=(0, 0))
    text = add_node(g, "TextEncode", {"text": PROMPT}, title="Prompt", pos=(320, -160))
    layout = add_node(g, "Layout", {"width": 32, "height": 32, "boxes": BOXES}, title="Layout",
                      pos=(320, 40))
    empty = add_node(g, "EmptyLatent", {"width": 32, "height": 32}, title="Canvas 32x32", pos=(320, 240))
    g.connect(load.id, "clip", text.id, "clip")
    g.connect(load.id, "vae", empty.id, "vae")
    model_src = (load.id, "model")
    x = 640
    for type_name, params, extra in chain:
        node = add_node(g, type_name, params, title=type_name, pos=(x, 0))
        g.connect(*model_src, node.id, "model")
        g.connect(layout.id, "layout", node.id, "layout")
        for port, out in extra.items():
            g.connect(load.id, out, node.id, port)
        model_src = (node.id, "model")
        x += 300
    sampler = add_node(g, "Sampler", {"scheduler": "euler", "steps": 20, "cfg": 5.0, "seed": 7},
                       title="Sampler", pos=(x, 0))
    decode = add_node(g, "VAEDecode", {}, title="Decode", pos=(x + 300, 0))
    scale = add_node(g, "ImageScale", {"factor": 8.0, "method": "nearest"}, title="Scale x8", pos=(x + 540, 0))
    save = add_node(g, "SaveImage", {"prefix": stem}, title="Save", pos=(x + 780, 0))
    g.connect(*model_src, sampler.id, "model")
    g.connect(text.id, "conditioning", sampler.id, "positive")
    g.connect(empty.id, "latent", sampler.id, "latent")
    g.connect(load.id, "vae", decode.id, "vae")
    g.connect(sampler.id, "latent", decode.id, "latent")
    g.connect(decode.id, "image", scale.id, "image")
    g.connect(scale.id, "image", save.id, "image")
    if stem == "layout-region-attention":  # also show where each word looked
        maps = add_node(g, "AttentionMaps", {"scheduler": "euler", "steps": 20, "cfg": 5.0, "seed": 7,
                                             "words": "red, circle, blue, square", "tile": 128},
                        title="Attention maps", pos=(x, 300))
        save_maps = add_node(g, "SaveImage", {"prefix": stem + "-maps"}, title="Save maps", pos=(x + 300, 300))
        g.connect(*model_src, maps.id, "model")
        g.connect(text.id, "conditioning", maps.id, "positive")
        g.connect(empty.id, "latent", maps.id, "latent")
        g.connect(maps.id, "image", save_maps.id, "image")
    return g


def write_all() -> None:
    from app.graph import save

    for stem in EXAMPLES:
        save(build(stem), GRAPHS / f"{stem}.loom")


@pytest.mark.parametrize("stem", sorted(EXAMPLES))
def test_example_graph_is_current_and_valid(stem):
    from app.graph import load
    from app.graph.validate import validate
    from nodes import registry

    path = GRAPHS / f"{stem}.loom"
    g = load(path, registry.get)
    assert not [p.message for p in validate(g, registry.get)]
    for node in g.nodes.values():
        assert node.version == registry.get(node.type).version, node.type
    fresh = build(stem)
    assert sorted(n.type for n in g.nodes.values()) == sorted(n.type for n in fresh.nodes.values())


@pytest.mark.parametrize("stem", ["layout-region-attention", "layout-zestguide"])
def test_example_graph_runs_headless(stem, tiny_pixel_model, tmp_path):
    from app.engine import Executor
    from app.graph import load
    from nodes import registry

    g = load(GRAPHS / f"{stem}.loom", registry.get)
    for node in g.nodes.values():
        if node.type == "LoadModel":
            node.params["path"] = tiny_pixel_model
        if node.type == "Layout":
            node.params.update(width=16, height=16)
        if node.type == "EmptyLatent":
            node.params.update(width=16, height=16)
        if node.type in ("Sampler", "AttentionMaps"):
            node.params["steps"] = 2
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values()}
    assert len(report.outputs()) == (2 if stem == "layout-region-attention" else 1)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    write_all()
    print("wrote", ", ".join(f"{s}.loom" for s in EXAMPLES))
