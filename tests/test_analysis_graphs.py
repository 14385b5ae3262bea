"""The example analysis graphs in resources/graphs/analysis-*.loom: built here, checked and run here.

`python tests/test_analysis_graphs.py` rewrites the files (node versions come from the registry).
The tests load each shipped file, validate it, and run it headless with the model path pointed
at a tiny random model and small sizes (the shipped files use the built-in ShapesT2I).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GRAPHS = ROOT / "resources" / "graphs"
SAMPLING = {"scheduler": "euler", "steps": 20, "cfg": 5.0}

EXAMPLES = {
    "analysis-classifier": ("Analysis: Diffusion Classifier",
                            "Draws a red star, then asks the model which of four prompts explains the "
                            "image best, from its own denoising error; the table is saved as CSV."),
    "analysis-seed-scan": ("Analysis: seed scan", "One prompt from 16 seeds, ranked by the ShapesT2I "
                           "oracle: a contact sheet best first, the best image and the table of seeds."),
    "analysis-cycle-edit": ("Editing: CycleDiffusion", "Draws a red circle, encodes it with its prompt "
                            "(DPM-Encoder) and regenerates it with 'blue' in place of 'red'."),
    "analysis-activation-patch": ("Analysis: activation patching", "Samples 'a red circle' while the "
                                  "first up block's cross-attention reads 'a blue square'; the table "
                                  "gives each layer's effect alone."),
}


def _base(g, stem):
    from nodes.registry import add_node

    load = add_node(g, "LoadModel", {"path": "builtin:shapes-t2i"}, title="Load ShapesT2I", pos=(0, 0))
    empty = add_node(g, "EmptyLatent", {"width": 32, "height": 32}, title="Canvas 32x32", pos=(320, 240))
    g.connect(load.id, "vae", empty.id, "vae")
    return load, empty


def _text(g, load, text, title, pos):
    from nodes.registry import add_node

    node = add_node(g, "TextEncode", {"text": text}, title=title, pos=pos)
    g.connect(load.id, "clip", node.id, "clip")
    return node


def _drawn(g, load, empty, text, seed=7):
    """Sampler + decode of `text`: the image an analysis node reads."""
    from nodes.registry import add_node

    sampler = add_node(g, "Sampler", {**SAMPLING, "seed": seed}, title="Sampler", pos=(640, 0))
    decode = add_node(g, "VAEDecode", {}, title="Decode", pos=(900, 0))
    g.connect(load.id, "model", sampler.id, "model")
    g.connect(text.id, "conditioning", sampler.id, "positive")
    g.connect(empty.id, "latent", sampler.id, "latent")
    g.connect(load.id, "vae", decode.id, "vae")
    g.connect(sampler.id, "latent", decode.id, "latent")
    return decode


def _save(g, src, port, prefix, pos, scale=True):
    from nodes.registry import add_node

    if scale:
        up = add_node(g, "ImageScale", {"factor": 8.0, "method": "nearest"}, title="Scale x8", pos=pos)
        g.connect(src.id, port, up.id, "image")
        src, port, pos = up, "image", (pos[0] + 260, pos[1])
    save = add_node(g, "SaveImage", {"prefix": prefix}, title="Save", pos=pos)
    g.connect(src.id, port, save.id, "image")


def _table(g, src, prefix, pos):
    from nodes.registry import add_node

    save = add_node(g, "SaveTable", {"prefix": prefix}, title="Save table", pos=pos)
    g.connect(src.id, "table", save.id, "table")


def build(stem: str):
    from app.graph import Graph
    from nodes.registry import add_node

    title, description = EXAMPLES[stem]
    g = Graph(meta={"title": title, "description": description})
    load, empty = _base(g, stem)
    if stem == "analysis-classifier":
        text = _text(g, load, "a red star in the center, white background", "Prompt", (320, -160))
        image = _drawn(g, load, empty, text)
        node = add_node(g, "DiffusionClassifier", {"prompts": "a red circle\na red square\na red triangle\na red star",
                                                   "samples": 16, "first": 4, "keep": 2}, title="Classifier", pos=(1160, 0))
        for port in ("model", "clip", "vae"):
            g.connect(load.id, port, node.id, port)
        g.connect(image.id, "image", node.id, "image")
        _table(g, node, stem, (1440, 0))
    elif stem == "analysis-seed-scan":
        text = _text(g, load, "a blue square at the top left, black background", "Prompt", (320, -160))
        node = add_node(g, "SeedScan", {**SAMPLING, "first": 0, "count": 16, "metric": "oracle"},
                        title="Seed scan", pos=(640, 0))
        g.connect(load.id, "model", node.id, "model")
        g.connect(load.id, "vae", node.id, "vae")
        g.connect(text.id, "conditioning", node.id, "positive")
        g.connect(empty.id, "latent", node.id, "latent")
        _save(g, node, "sheet", stem + "-sheet", (920, -120), scale=False)
        _save(g, node, "best", stem + "-best", (920, 60))
        _table(g, node, stem, (920, 240))
    elif stem == "analysis-cycle-edit":
        src = _text(g, load, "a red circle on the left, white background", "Source prompt", (320, -160))
        tgt = _text(g, load, "a blue circle on the left, white background", "Target prompt", (320, -320))
        image = _drawn(g, load, empty, src)
        node = add_node(g, "CycleEdit", {"steps": 20, "cfg": 20.0, "source_cfg": 20.0, "eta": 1.0,
                                         "strength": 0.4, "seed": 0}, title="CycleDiffusion edit", pos=(1160, 0))
        g.connect(load.id, "model", node.id, "model")
        g.connect(load.id, "vae", node.id, "vae")
        g.connect(image.id, "image", node.id, "image")
        g.connect(src.id, "conditioning", node.id, "source")
        g.connect(tgt.id, "conditioning", node.id, "target")
        _save(g, image, "image", stem + "-source", (1160, 240))
        _save(g, node, "image", stem, (1440, 0))
    else:
        a = _text(g, load, "a red circle", "Prompt A", (320, -160))
        b = _text(g, load, "a blue square", "Prompt B", (320, -320))
        node = add_node(g, "ActivationPatch", {**SAMPLING, "layers": "up_blocks.0", "seed": 7,
                                               "effect_table": True}, title="Activation patch", pos=(640, 0))
        g.connect(load.id, "model", node.id, "model")
        g.connect(load.id, "vae", node.id, "vae")
        g.connect(a.id, "conditioning", node.id, "a")
        g.connect(b.id, "conditioning", node.id, "b")
        g.connect(empty.id, "latent", node.id, "latent")
        _save(g, node, "image", stem, (920, 0))
        _table(g, node, stem, (920, 240))
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

    g = load(GRAPHS / f"{stem}.loom", registry.get)
    assert not [p.message for p in validate(g, registry.get)]
    for node in g.nodes.values():
        assert node.version == registry.get(node.type).version, node.type
    assert sorted(n.type for n in g.nodes.values()) == sorted(n.type for n in build(stem).nodes.values())


SMALL = {"EmptyLatent": {"width": 16, "height": 16}, "Sampler": {"steps": 2}, "SeedScan": {"steps": 2, "count": 2},
         "CycleEdit": {"steps": 2}, "ActivationPatch": {"steps": 2},
         "DiffusionClassifier": {"samples": 2, "first": 1}}


def small_example(stem: str, model: str, text: str | None = None, **params_by_type: dict):
    """An example graph on the tiny model at SMALL's sizes; `text` for every prompt, and extra
    params per node type (SeedScan={"metric": "contrast"})."""
    from app.graph import load
    from nodes import registry

    g = load(GRAPHS / f"{stem}.loom", registry.get)
    for node in g.nodes.values():
        if node.type == "LoadModel":
            node.params["path"] = model
        node.params.update(SMALL.get(node.type, {}))
        if node.type == "TextEncode" and text is not None:
            node.params["text"] = text
        node.params.update(params_by_type.get(node.type, {}))
    return g


@pytest.mark.parametrize("stem", sorted(EXAMPLES))
def test_example_graph_runs_headless(stem, tiny_pixel_model, tmp_path):
    from app.engine import Executor

    # The seed scan's oracle-free metrics need the tiny model's own words.
    g = small_example(stem, tiny_pixel_model, "a blue square" if stem == "analysis-seed-scan" else None)
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values()}
    images = {"analysis-classifier": 0, "analysis-seed-scan": 2, "analysis-cycle-edit": 2,
              "analysis-activation-patch": 1}[stem]
    assert len(report.outputs()) == images
    tables = sorted(p.name for p in tmp_path.glob("*.csv"))
    assert tables == ([] if stem == "analysis-cycle-edit" else [f"{stem}.csv"])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    write_all()
    print("wrote", ", ".join(f"{s}.loom" for s in EXAMPLES))
