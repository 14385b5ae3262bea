"""The graph a new user sees first (resources/graphs/default.loom): it places its objects with a
layout, and with the shipped model its render shows what the prompt says."""

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "resources" / "graphs" / "default.loom"
MODEL = ROOT / "resources" / "models" / "shapes-t2i"


def load_default():
    from app.graph import load
    from nodes import registry

    return load(DEFAULT, registry.get)


def of_type(graph, type_name):
    return next(n for n in graph.nodes.values() if n.type == type_name)


def test_default_graph_is_valid_and_its_layout_feeds_the_sampler():
    from app.graph.validate import validate
    from nodes import registry

    g = load_default()
    assert not [p.message for p in validate(g, registry.get)]
    layout, region, sampler = of_type(g, "Layout"), of_type(g, "RegionAttention"), of_type(g, "Sampler")
    regional = of_type(g, "RegionalPrompts")  # bench/layout.py's best: regional prompts + early region attention
    wired = {(e.src, e.dst) for e in g.edges}
    assert (layout.id, region.id) in wired and (region.id, sampler.id) in wired
    assert (layout.id, regional.id) in wired and (regional.id, region.id) in wired
    assert region.params["end"] == 0.3
    prompt = of_type(g, "TextEncode").params["text"]
    assert all(box["phrase"] in prompt for box in layout.params["boxes"])


@pytest.mark.skipif(not (MODEL / "model_index.json").exists(), reason="no shipped model")
def test_default_graph_draws_each_object_in_its_box_with_the_shipped_model(tmp_path):
    from app.engine import EngineEvents, Executor
    from kernels.shapes.oracle import detect
    from kernels.shapes.world import cell_of_point

    g = load_default()
    g.set_param(of_type(g, "ImageScale").id, "factor", 1.0)  # judge the model's own 32x32
    images = []
    report = Executor(device="cpu", disk_cache=False).run(
        g, events=EngineEvents(images=lambda nid, im, p: images.append(im)), output_dir=tmp_path)
    assert report.ok
    found = detect((images[0][0].numpy() * 255).round().astype(np.uint8))
    wanted = []
    for box in of_type(g, "Layout").params["boxes"]:
        _article, colour, shape = box["phrase"].split()
        cell = cell_of_point((box["x0"] + box["x1"]) / 2, (box["y0"] + box["y1"]) / 2)
        wanted.append((colour, shape, cell))
    assert sorted((d.colour, d.shape, d.cell) for d in found) == sorted(wanted)
