"""The shipped ShapesT2I model loads offline through LoadModel and draws the prompted colours."""

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "resources" / "models" / "shapes-t2i"

pytestmark = pytest.mark.skipif(not (MODEL / "model_index.json").exists(), reason="no shipped model")


def test_shipped_model_draws_the_prompted_colour(tmp_path):
    from app.engine import EngineEvents, Executor
    from app.graph import load
    from kernels.shapes.oracle import detect
    from nodes import registry

    graph = load(ROOT / "resources" / "graphs" / "default.loom", registry.get)
    sampler = next(n for n in graph.nodes.values() if n.type == "Sampler")
    prompt = next(n for n in graph.nodes.values() if n.type == "TextEncode")
    scale = next(n for n in graph.nodes.values() if n.type == "ImageScale")
    graph.set_param(scale.id, "factor", 1.0)
    loader = next(n for n in graph.nodes.values() if n.type == "LoadModel")
    graph.connect(loader.id, "model", sampler.id, "model")  # the prompt alone: no layout boxes
    executor = Executor(device="cpu", disk_cache=False)
    found = 0
    cases = [("a red circle", "red"), ("a blue square", "blue"), ("a yellow star", "yellow"),
             ("a green triangle", "green")]
    for text, colour in cases:
        graph.set_param(prompt.id, "text", text)
        graph.set_param(sampler.id, "seed", 3)
        images = []
        report = executor.run(graph, events=EngineEvents(images=lambda nid, im, p, images=images: images.append(im)),
                              output_dir=tmp_path)
        assert report.ok
        img = (images[0][0].numpy() * 255).round().astype(np.uint8)
        assert img.shape == (32, 32, 3)
        found += any(d.colour == colour for d in detect(img))
    assert executor.models.loads == 1
    assert found >= 3  # a loose bar: the model is small and still training
