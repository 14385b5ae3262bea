"""The example graph of prompt schedules (resources/graphs/prompt-schedule.loom): built here,
checked and run here. `python tests/test_prompt_graphs.py` rewrites the file."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRAPH = ROOT / "resources" / "graphs" / "prompt-schedule.loom"
BACKGROUND = ", white background"
# (title, prompt): the same seed three ways
BRANCHES = [
    ("Plain", "a red circle in the center" + BACKGROUND),
    ("Edited", "a [red:blue:0.25] circle in the center" + BACKGROUND),
    ("Weighted", "a (red:1.4) circle in the center" + BACKGROUND),
]
STAGE = ("Staged", "a green square in the center" + BACKGROUND, 0.0, 0.3)


def build(model_path: str = "builtin:shapes-t2i"):
    from app.graph import Graph
    from nodes.registry import add_node

    g = Graph(meta={"title": "Prompts: editing, weighting and stages", "description": (
        "One seed, four ways. [red:blue:0.25] reads 'red' for the first quarter of the steps "
        "and 'blue' after, so a blue circle stands where the red one began; (red:1.4) weighs a "
        "word; a ConditioningStage reads another prompt for the first 30% of the steps (the "
        "layout settles early, the colours late).")})
    load = add_node(g, "LoadModel", {"path": model_path}, title="Load ShapesT2I", pos=(0, 200))
    empty = add_node(g, "EmptyLatent", {"width": 32, "height": 32}, title="Canvas 32x32", pos=(0, 420))
    g.connect(load.id, "vae", empty.id, "vae")
    rows = []
    for k, (title, prompt) in enumerate(BRANCHES):
        text = add_node(g, "TextEncode", {"text": prompt}, title=f"Prompt ({title.lower()})", pos=(320, k * 220))
        g.connect(load.id, "clip", text.id, "clip")
        rows.append((title, (text.id, "conditioning"), k * 220))
    title, prompt, start, end = STAGE
    y = len(BRANCHES) * 220
    base = add_node(g, "TextEncode", {"text": BRANCHES[0][1]}, title="Prompt (late)", pos=(320, y))
    early = add_node(g, "TextEncode", {"text": prompt}, title="Prompt (early)", pos=(320, y + 160))
    stage = add_node(g, "ConditioningStage", {"start": start, "end": end}, title="Early stage", pos=(640, y + 60))
    for node in (base, early):
        g.connect(load.id, "clip", node.id, "clip")
    g.connect(base.id, "conditioning", stage.id, "conditioning")
    g.connect(early.id, "conditioning", stage.id, "stage")
    rows.append((title, (stage.id, "conditioning"), y))
    for title, cond, y in rows:
        sampler = add_node(g, "Sampler", {"scheduler": "euler", "steps": 20, "cfg": 5.0, "seed": 75},
                           title=f"Sampler ({title.lower()})", pos=(960, y))
        decode = add_node(g, "VAEDecode", {}, title=f"Decode ({title.lower()})", pos=(1260, y))
        scale = add_node(g, "ImageScale", {"factor": 8.0, "method": "nearest"}, title="Scale x8", pos=(1500, y))
        save = add_node(g, "SaveImage", {"prefix": f"prompt-{title.lower()}"}, title=f"Save ({title.lower()})",
                        pos=(1740, y))
        g.connect(load.id, "model", sampler.id, "model")
        g.connect(*cond, sampler.id, "positive")
        g.connect(empty.id, "latent", sampler.id, "latent")
        g.connect(load.id, "vae", decode.id, "vae")
        g.connect(sampler.id, "latent", decode.id, "latent")
        g.connect(decode.id, "image", scale.id, "image")
        g.connect(scale.id, "image", save.id, "image")
    return g


def test_example_graph_is_current_and_valid():
    from app.graph import load
    from app.graph.validate import validate
    from nodes import registry

    g = load(GRAPH, registry.get)
    assert not [p.message for p in validate(g, registry.get)]
    fresh = build()
    assert sorted(n.type for n in g.nodes.values()) == sorted(n.type for n in fresh.nodes.values())
    assert sorted(n.params.get("text", "") for n in g.nodes.values()) == \
        sorted(n.params.get("text", "") for n in fresh.nodes.values())


def test_example_graph_runs_headless(tiny_pixel_model, tmp_path):
    from app.engine import Executor
    from app.graph import load
    from nodes import registry

    g = load(GRAPH, registry.get)
    for node in g.nodes.values():
        if node.type == "LoadModel":
            node.params["path"] = tiny_pixel_model
        if node.type == "EmptyLatent":
            node.params.update(width=16, height=16)
        if node.type == "Sampler":
            node.params["steps"] = 4
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    assert len(report.outputs()) == 4


if __name__ == "__main__":
    from app.graph import save

    save(build(), GRAPH)
    sys.exit(0)
