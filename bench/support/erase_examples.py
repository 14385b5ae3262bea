"""The erase-*.loom example graphs (resources/graphs), built through the node registry so their
node versions are recorded: `python bench/erasers.py --graphs DIR` writes them."""

from __future__ import annotations

import os

SHAPES_TEMPLATES = "{}\na red {}\na blue {}\na green {}\na yellow {}\na purple {}\nan orange {}"
TWO_OBJECTS = "a red circle on the left and a blue square at the bottom right, white background"


def _example_base(title, description):
    """A graph with the built-in model's loader and a 32x32 canvas: (graph, ids)."""
    from app.graph import Graph
    from nodes.registry import add_node

    g = Graph()
    g.meta.update(title=title, description=description)
    ids = {"load": add_node(g, "LoadModel", {"path": "builtin:shapes-t2i"}, title="Load ShapesT2I", pos=(0, 0)).id,
           "empty": add_node(g, "EmptyLatent", {"width": 32, "height": 32}, title="Canvas 32x32", pos=(0, 260)).id}
    g.connect(ids["load"], "vae", ids["empty"], "vae")
    return g, ids


def _loaded(ids):
    return (ids["load"], "model"), (ids["load"], "clip")


def _decode_and_save(g, ids, latent_src, prefix, title, x, y):
    """Decode a latent, scale it x8 and save it (nodes from column x on, row y)."""
    from nodes.registry import add_node

    dec = add_node(g, "VAEDecode", {}, title="Decode", pos=(x, y)).id
    scale = add_node(g, "ImageScale", {"factor": 8.0, "method": "bicubic"}, title="Scale x8", pos=(x + 220, y)).id
    out = add_node(g, "SaveImage", {"prefix": prefix}, title=title, pos=(x + 440, y)).id
    g.connect(ids["load"], "vae", dec, "vae")
    g.connect(*latent_src, dec, "latent")
    g.connect(dec, "image", scale, "image")
    g.connect(scale, "image", out, "image")


def _render(g, ids, model_src, clip_src, row, label, prompt=TWO_OBJECTS, seed=7):
    """Prompt, sampler, decode, scale and save one image of `prompt` in row `row`."""
    from nodes.registry import add_node

    y = 320 * row
    text = add_node(g, "TextEncode", {"text": prompt}, title=f"Prompt ({label})", pos=(700, y - 80)).id
    samp = add_node(g, "Sampler", {"scheduler": "dpmpp_2m", "steps": 20, "cfg": 4.0, "seed": seed},
                    title=f"Sampler ({label})", pos=(980, y)).id
    g.connect(*clip_src, text, "clip")
    g.connect(*model_src, samp, "model")
    g.connect(text, "conditioning", samp, "positive")
    g.connect(ids["empty"], "latent", samp, "latent")
    _decode_and_save(g, ids, (samp, "latent"), label.replace(" ", "-"), f"Save ({label})", 1240, y)


def _eraser(g, ids, type_name, params, title, pos, model_src=None, clip_src=None):
    """An eraser node fed by the loader (or the given sources)."""
    from nodes.registry import add_node, get

    n = add_node(g, type_name, params, title=title, pos=pos).id
    g.connect(*(model_src or (ids["load"], "model")), n, "model")
    if "clip" in get(type_name).inputs:
        g.connect(*(clip_src or (ids["load"], "clip")), n, "clip")
    return n


COMPARE_PROMPTS = (("target", "a red circle on the left, white background"),
                   ("other 1", "a blue square at the top right"),
                   ("other 2", "a green star in the center, black background"))


def _compare_graph():
    g, ids = _example_base("Erase circle: original vs erased", "ClosedFormErase at its defaults (circle -> "
                           "triangle on the cross-attention, the model's own phrasing and preserve set) beside the "
                           "original model: the same prompts, seed and four-image batch in each pair of rows. The "
                           "first prompt names the target (its circles should become triangles); the other two do "
                           "not, so any change there is collateral damage.")
    g.nodes[ids["empty"]].params["batch"] = 4
    m, c = _loaded(ids)
    cf = _eraser(g, ids, "ClosedFormErase", {"concept": "circle", "anchor": "triangle", "target": "cross_attention"},
                 "Erase circle (closed form)", (320, 320))
    for i, (label, prompt) in enumerate(COMPARE_PROMPTS):
        _render(g, ids, m, c, 2 * i, f"{label} original", prompt=prompt)
        _render(g, ids, (cf, "model"), (cf, "clip"), 2 * i + 1, f"{label} erased", prompt=prompt)
    return g


def _two_concepts_graph():
    from nodes.registry import add_node

    g, ids = _example_base("Erase two concepts in sequence", "Two closed-form erasers chained: circles become "
                           "squares (text encoder), then red becomes blue (cross-attention, UCE). SaveEraser stores "
                           "both in your erasers folder as 'circle-red'; LoadEraser brings them back.")
    a = _eraser(g, ids, "ClosedFormErase", {"concept": "circle", "anchor": "square", "target": "text_encoder",
                                            "templates": SHAPES_TEMPLATES}, "Erase circle", (320, 0))
    b = _eraser(g, ids, "ClosedFormErase", {"concept": "red", "anchor": "blue", "target": "cross_attention",
                                            "templates": "{}\na {} circle\na {} square\na {} triangle\na {} star",
                                            "preserve": "a green circle\na yellow square\na purple star"},
                "Erase red", (320, 320), model_src=(a, "model"), clip_src=(a, "clip"))
    _render(g, ids, (b, "model"), (b, "clip"), 0, "circle and red erased")
    save_node = add_node(g, "SaveEraser", {"name": "circle-red"}, title="Save erasers", pos=(700, 500)).id
    g.connect(b, "model", save_node, "model")
    g.connect(b, "clip", save_node, "clip")
    return g


def _trained_graph():
    g, ids = _example_base("Membrane and fine-tuned erasers", "Erasers trained on the CPU in a few minutes: an SPM "
                           "membrane for 'circle' (its strength follows the prompt), and an All-but-One LoRA that "
                           "turns stars into triangles while holding the unconditional prediction.")
    _, c = _loaded(ids)
    mem = _eraser(g, ids, "ConceptMembrane", {"concept": "circle", "templates": SHAPES_TEMPLATES,
                                              "anchors": "a red square\na blue triangle\na green star", "steps": 300},
                  "Membrane: circle", (320, 0))
    _render(g, ids, (mem, "model"), c, 0, "membrane")
    abo = _eraser(g, ids, "EraseFinetune", {"objective": "all_but_one", "concept": "star", "alternative": "triangle",
                                            "templates": SHAPES_TEMPLATES, "steps": 300}, "All-but-One: star",
                  (320, 320))
    _render(g, ids, (abo, "model"), c, 1, "all but one", prompt="a yellow star in the center, black background")
    return g


def _redteam_graph():
    from nodes.registry import add_node

    g, ids = _example_base("Red-team an eraser", "Prompting4Debugging against a closed-form eraser: the search may "
                           "not use the word 'circle' and looks for other tokens that bring circles back. The "
                           "ShapesT2I oracle judges the images (set the node's report file to keep the found prompt "
                           "and its success rate).")
    m, c = _loaded(ids)
    cf = _eraser(g, ids, "ClosedFormErase", {"concept": "circle", "anchor": "square", "target": "both",
                                             "templates": SHAPES_TEMPLATES}, "Erase circle", (320, 0))
    rt = add_node(g, "RedTeamPrompt", {"prompt": "a red circle", "avoid_words": "circle", "judge": "shapes-oracle",
                                       "steps": 40}, title="Red team", pos=(700, 0)).id
    g.connect(cf, "model", rt, "model")
    g.connect(cf, "clip", rt, "clip")
    g.connect(*m, rt, "original_model")
    g.connect(*c, rt, "original_clip")
    _decode_and_save(g, ids, (rt, "latent"), "redteam", "Save", 980, 0)
    g.remove_node(ids["empty"])
    return g


EXAMPLE_GRAPHS = {"erase-compare.loom": _compare_graph, "erase-two-concepts.loom": _two_concepts_graph,
                  "erase-trained.loom": _trained_graph, "erase-redteam.loom": _redteam_graph}


def keep_laid_out_positions(graph, path: str) -> int:
    """Move the graph's nodes to where an existing file at `path` has nodes of the same title
    (the n-th node of a title, in the order they were added, to the n-th there): the shipped examples were laid out by hand in
    the app, and regenerating them must not undo that. Returns how many nodes moved."""
    import json

    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    laid_out: dict[str, list] = {}
    for node in old.get("nodes", []):
        laid_out.setdefault(node.get("title", ""), []).append(node.get("pos"))
    seen: dict[str, int] = {}
    moved = 0
    for node in graph.nodes.values():
        places = laid_out.get(node.title, [])
        i = seen.get(node.title, 0)
        seen[node.title] = i + 1
        if i < len(places) and places[i] is not None:
            node.pos = (float(places[i][0]), float(places[i][1]))
            moved += 1
    return moved


def write_example_graphs(folder: str) -> list[str]:
    """The erase-*.loom examples, built through the registry so node versions are recorded;
    nodes keep the places an existing file in `folder` gives them."""
    from app.graph.fileformat import save

    paths = []
    for name, build in EXAMPLE_GRAPHS.items():
        path = os.path.join(folder, name)
        graph = build()
        keep_laid_out_positions(graph, path)
        save(graph, path)
        paths.append(path)
    return paths
