import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pixel_model(tmp_path_factory):
    from kernels.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-pixel"))


@pytest.fixture(scope="session")
def tiny_latent_model(tmp_path_factory):
    from kernels.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-latent"), kind="latent")


@pytest.fixture(scope="session")
def tiny_flow_model(tmp_path_factory):
    from kernels.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-flow"), flow=True)


def copy_with_scheduler(src, dst, **changes) -> str:
    """A copy of model folder `src` at `dst` with `changes` in its scheduler config."""
    import json
    import shutil

    shutil.copytree(src, dst)
    config_path = dst / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))
    return str(dst)


@pytest.fixture(scope="module")
def sd_model(tiny_latent_model, tmp_path_factory):
    """The tiny latent model with `steps_offset` 1, as SD checkpoints ship it: the SD pipelines
    rewrite any other value to 1 when they are built, which would compare two schedules."""
    return copy_with_scheduler(tiny_latent_model, tmp_path_factory.mktemp("models") / "tiny-sd", steps_offset=1)


def txt2img_graph(model_path, *, prompt="a red circle on the left", steps=4, size=16, seed=1,
                  scheduler="euler", cfg=4.0, save=True, batch=1):
    """The standard text-to-image chain as a document; returns (graph, ids by role)."""
    from app.graph import Graph
    from nodes.registry import add_node

    g = Graph()
    ids = {}
    ids["load"] = add_node(g, "LoadModel", {"path": model_path}, title="Load", pos=(0, 0)).id
    ids["text"] = add_node(g, "TextEncode", {"text": prompt}, title="Prompt", pos=(200, 0)).id
    ids["empty"] = add_node(g, "EmptyLatent", {"width": size, "height": size, "batch": batch}, title="Empty", pos=(200, 200)).id
    ids["sampler"] = add_node(g, "Sampler", {"steps": steps, "seed": seed, "scheduler": scheduler, "cfg": cfg},
                                title="Sampler", pos=(400, 0)).id
    ids["decode"] = add_node(g, "VAEDecode", {}, title="Decode", pos=(600, 0)).id
    g.connect(ids["load"], "clip", ids["text"], "clip")
    g.connect(ids["load"], "vae", ids["empty"], "vae")
    g.connect(ids["load"], "model", ids["sampler"], "model")
    g.connect(ids["text"], "conditioning", ids["sampler"], "positive")
    g.connect(ids["empty"], "latent", ids["sampler"], "latent")
    g.connect(ids["load"], "vae", ids["decode"], "vae")
    g.connect(ids["sampler"], "latent", ids["decode"], "latent")
    if save:
        ids["save"] = add_node(g, "SaveImage", {"prefix": "test"}, title="Save", pos=(800, 0)).id
        g.connect(ids["decode"], "image", ids["save"], "image")
    return g, ids


@pytest.fixture
def window(qtbot, tmp_path, monkeypatch):
    """The main window on private data, cache and output folders (the UI tests' common start)."""
    monkeypatch.setenv("LOOMWORK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LOOMWORK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LOOMWORK_OUTPUT_DIR", str(tmp_path / "out"))
    from app.ui import create_app
    from app.ui.window import MainWindow

    create_app()
    w = MainWindow(autosave=False)
    w._closing_ok = True  # no unsaved-changes dialog when the test ends
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    yield w
    w.runner.cancel()
    w.runner.wait(30)


# A test node that keeps the latent it receives (layout and eraser tests compare samples).
CAPTURED: dict = {}


def _register_capture_node():
    from nodes.base import LATENT, Node
    from nodes.registry import get, register

    if get("TestCaptureLatent") is not None:  # this file imported under a second module name
        return

    @register
    class TestCaptureLatent(Node):
        """Test node: keeps the latent it receives in conftest.CAPTURED["latent"]."""
        category = "test"
        inputs = {"latent": LATENT}
        output_node = True
        always_run = True

        def run(self, ctx, latent):
            CAPTURED["latent"] = latent.clone()
            return {}


_register_capture_node()


# -- erasers: a tiny model bundle, weight snapshots, txt2img with eraser nodes chained in ----------
@pytest.fixture(scope="module")
def tiny_bundle(tiny_pixel_model):
    """(model, clip) of the tiny pixel-space model, loaded once per test module."""
    from kernels.models import load_model_folder

    model, clip, _ = load_model_folder(tiny_pixel_model)
    return model, clip


def state_copy(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(module, state: dict) -> bool:
    import torch

    now = module.state_dict()
    return set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)


def eraser_graph(model_path, *erasers, prompt="a red circle"):
    """txt2img with (type, params) eraser nodes chained between the loader and the sampler / text
    encoder, and a TestCaptureLatent after the sampler."""
    from nodes.registry import add_node, get

    g, ids = txt2img_graph(model_path, prompt=prompt, steps=2, save=False)
    cap = add_node(g, "TestCaptureLatent", {})
    g.connect(ids["sampler"], "latent", cap.id, "latent")
    ids["capture"] = cap.id
    model_src, clip_src = (ids["load"], "model"), (ids["load"], "clip")
    ids["erasers"] = []
    for type_name, params in erasers:
        n = add_node(g, type_name, params)
        spec = get(type_name)
        if "model" in spec.inputs:
            g.connect(*model_src, n.id, "model")
        if "clip" in spec.inputs:
            g.connect(*clip_src, n.id, "clip")
        if "model" in spec.outputs:
            model_src = (n.id, "model")
        if "clip" in spec.outputs:
            clip_src = (n.id, "clip")
        ids["erasers"].append(n.id)
    g.connect(*model_src, ids["sampler"], "model")
    g.connect(*clip_src, ids["text"], "clip")
    return g, ids


def run_captured(g, ids, tmp_path, ex=None):
    """Run an eraser_graph to its capture node: (latent, report, executor)."""
    from app.engine import Executor

    ex = ex or Executor(device="cpu", disk_cache=False)
    report = ex.run(g, targets=[ids["capture"]], output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    return CAPTURED.pop("latent"), report, ex


def load_and_encode_on_canvas(w):
    """LoadModel -> TextEncode through the canvas, as a drag would."""
    from PySide6 import QtCore

    doc = w.doc
    load = w.add_node("LoadModel", QtCore.QPointF(0, 0))
    text = w.add_node("TextEncode", QtCore.QPointF(300, 0))
    return doc, load, text


# -- layout tests: one prompt, two boxes, the tiny pixel model ---------------------------------
LAYOUT_PROMPT = "a red circle on the left and a blue square"
TWO_BOX_LAYOUT = {"width": 16, "height": 16, "boxes": [
    {"x0": 0.0, "y0": 0.0, "x1": 0.5, "y1": 0.5, "phrase": "a red circle"},
    {"x0": 0.5, "y0": 0.5, "x1": 1.0, "y1": 1.0, "phrase": "a blue square"}]}


class QuietContext:
    """A node context for calling a node's run directly: no progress, no cancel."""

    def progress(self, *args, **kwargs):
        pass


@pytest.fixture(scope="module")
def tiny_layout_model(tiny_pixel_model):
    """(model, clip, the layout prompt's conditioning) of the tiny pixel model."""
    from kernels.models import load_model_folder
    from kernels.text import encode_text

    model, clip, _vae = load_model_folder(tiny_pixel_model)
    return model, clip, encode_text(clip.tokenizer, clip.text_encoder, LAYOUT_PROMPT)


def inputs_fed_to(module, names, call) -> list[tuple]:
    """The keyword arguments `names` that `module` received in each forward while `call()` ran:
    what a diffusers pipeline itself feeds its denoiser."""
    fed = []
    hook = module.register_forward_pre_hook(
        lambda _m, _args, kwargs: fed.append(tuple(kwargs[n] for n in names)), with_kwargs=True)
    try:
        call()
    finally:
        hook.remove()
    return fed
