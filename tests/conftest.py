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


def txt2img_graph(model_path, *, prompt="a red circle on the left", steps=4, size=16, seed=1,
                  scheduler="euler", cfg=4.0, save=True):
    """The standard text-to-image chain as a document; returns (graph, ids by role)."""
    from app.graph import Graph
    from nodes.registry import add_node

    g = Graph()
    ids = {}
    ids["load"] = add_node(g, "LoadModel", {"path": model_path}, title="Load", pos=(0, 0)).id
    ids["text"] = add_node(g, "TextEncode", {"text": prompt}, title="Prompt", pos=(200, 0)).id
    ids["empty"] = add_node(g, "EmptyLatent", {"width": size, "height": size}, title="Empty", pos=(200, 200)).id
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
    from nodes.registry import _REGISTRY, register

    if "TestCaptureLatent" in _REGISTRY:  # this file imported under a second module name
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
