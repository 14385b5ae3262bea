"""The LoRA example graph (resources/graphs/lora.loom): the shipped ShapesT2I with a LoRA made in
Loomwork (EraseFinetune's All-but-One objective on "star", 300 steps, saved by SaveEraser as an
ordinary kohya LoRA file) at strengths 0, 0.5 and 1. Built here, checked and run here; `python tests/test_lora_graph.py`
rewrites the file."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRAPH = ROOT / "resources" / "graphs" / "lora.loom"
LORA = "builtin:loras/shapes-erase-star.safetensors"
PROMPT = "a yellow star in the center, black background"
STRENGTHS = (0.0, 0.5, 1.0)


def build(model_path: str = "builtin:shapes-t2i", lora_path: str = LORA):
    from app.graph import Graph
    from nodes.registry import add_node

    g = Graph(meta={"title": "LoRA: one file at three strengths", "description": (
        "LoadLoRA applies a LoRA to the model and its text encoder, each at its own strength. The "
        "file here was made in Loomwork (EraseFinetune's All-but-One on 'star', saved with "
        "SaveEraser) and is an ordinary kohya LoRA that ComfyUI and A1111 read too: at 0 the star "
        "is drawn, at 0.5 and 1 it is gone.")})
    load = add_node(g, "LoadModel", {"path": model_path}, title="Load ShapesT2I", pos=(0, 220))
    empty = add_node(g, "EmptyLatent", {"width": 32, "height": 32}, title="Canvas 32x32", pos=(0, 460))
    g.connect(load.id, "vae", empty.id, "vae")
    for k, strength in enumerate(STRENGTHS):
        y = k * 240
        lora = add_node(g, "LoadLoRA", {"path": lora_path, "strength_model": strength, "strength_clip": strength},
                        title=f"LoRA x{strength:g}", pos=(320, y))
        text = add_node(g, "TextEncode", {"text": PROMPT}, title=f"Prompt (x{strength:g})", pos=(620, y))
        sampler = add_node(g, "Sampler", {"scheduler": "dpmpp_2m", "steps": 20, "cfg": 4.0, "seed": 7},
                           title=f"Sampler (x{strength:g})", pos=(920, y))
        decode = add_node(g, "VAEDecode", {}, title="Decode", pos=(1220, y))
        scale = add_node(g, "ImageScale", {"factor": 8.0, "method": "nearest"}, title="Scale x8", pos=(1460, y))
        save = add_node(g, "SaveImage", {"prefix": f"lora-x{strength:g}"}, title=f"Save (x{strength:g})",
                        pos=(1700, y))
        g.connect(load.id, "model", lora.id, "model")
        g.connect(load.id, "clip", lora.id, "clip")
        g.connect(lora.id, "clip", text.id, "clip")
        g.connect(lora.id, "model", sampler.id, "model")
        g.connect(text.id, "conditioning", sampler.id, "positive")
        g.connect(empty.id, "latent", sampler.id, "latent")
        g.connect(load.id, "vae", decode.id, "vae")
        g.connect(sampler.id, "latent", decode.id, "latent")
        g.connect(decode.id, "image", scale.id, "image")
        g.connect(scale.id, "image", save.id, "image")
    return g


def test_example_graph_is_current_valid_and_its_lora_ships():
    from app.graph import load
    from app.graph.validate import validate
    from nodes import registry

    g = load(GRAPH, registry.get)
    assert not [p.message for p in validate(g, registry.get)]
    assert sorted(n.type for n in g.nodes.values()) == sorted(n.type for n in build().nodes.values())
    shipped = ROOT / "resources" / "models" / LORA[len("builtin:"):]
    assert shipped.is_file() and shipped.stat().st_size < 2 << 20
    from safetensors import safe_open

    with safe_open(str(shipped), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("lora_unet_") or k.startswith("lora_te_") for k in keys)  # kohya


def test_example_graph_runs_headless_on_a_tiny_model_and_its_lora(tiny_pixel_model, tmp_path):
    """The tiny model cannot take the shipped LoRA, so the test writes one for it (kohya keys)."""
    from test_lora import kohya_keys, peft_factors, write_file

    from app.engine import Executor
    from kernels.models import load_model_folder

    model, _clip, _vae = load_model_folder(tiny_pixel_model)
    state, _config = peft_factors(model.unet, ["to_k", "to_v"])
    lora = write_file(tmp_path / "tiny.safetensors", kohya_keys(state, "lora_unet_", 2.0))
    g = build(tiny_pixel_model, lora)
    for node in g.nodes.values():
        if node.type == "EmptyLatent":
            node.params.update(width=16, height=16)
        if node.type == "Sampler":
            node.params["steps"] = 3
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    assert len(report.outputs()) == 3


if __name__ == "__main__":
    from app.graph import save

    save(build(), GRAPH)
    sys.exit(0)
