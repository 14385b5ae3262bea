"""The app's name and the files shipped with it that the window shows: the default graph, the
example graphs, the icon."""

from __future__ import annotations

from pathlib import Path

from PySide6 import QtGui

from app.graph import Graph, GraphFileError, load
from nodes import registry

APP_NAME = "Loomwork"


def resources_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "resources"


def default_graph() -> Graph:
    """The graph a new window shows: the shipped default.loom, or the same chain built here."""
    path = resources_dir() / "graphs" / "default.loom"
    if path.exists():
        try:
            return load(path, registry.get)
        except GraphFileError:
            pass
    g = Graph()
    load_id = g.add_node("LoadModel", {"path": "builtin:shapes-t2i"}, title="Model", pos=(0, 80)).id
    text = g.add_node("TextEncode", {"text": "a red circle on the left and a blue square on the right"},
                      title="Prompt", pos=(260, 0)).id
    neg = g.add_node("TextEncode", {"text": ""}, title="Negative", pos=(260, 140)).id
    empty = g.add_node("EmptyLatent", {"width": 32, "height": 32}, title="Size", pos=(260, 280)).id
    sampler = g.add_node("Sampler", {"steps": 20, "cfg": 4.0}, title="Sampler", pos=(560, 60)).id
    decode = g.add_node("VAEDecode", {}, title="Decode", pos=(820, 60)).id
    out = g.add_node("SaveImage", {"prefix": "loomwork"}, title="Save", pos=(1040, 60)).id
    for wire in ((load_id, "clip", text, "clip"), (load_id, "clip", neg, "clip"),
                 (load_id, "vae", empty, "vae"), (load_id, "model", sampler, "model"),
                 (text, "conditioning", sampler, "positive"), (neg, "conditioning", sampler, "negative"),
                 (empty, "latent", sampler, "latent"), (load_id, "vae", decode, "vae"),
                 (sampler, "latent", decode, "latent"), (decode, "image", out, "image")):
        g.connect(*wire)
    return g


def app_icon() -> QtGui.QIcon:
    icon = QtGui.QIcon()
    for name in ("loomwork.svg", "loomwork.png"):
        p = resources_dir() / "icons" / name
        if p.exists():
            icon.addFile(str(p))
    return icon
