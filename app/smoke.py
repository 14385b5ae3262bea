"""`loomwork --smoke`: prove an installation works, end to end, without a screen.

Imports every layer (Qt and NodeGraphQt included), renders the default graph with the built-in
model into a temporary folder, checks the PNG carries its graph, and exits 0. Installers run it
inside the built bundle and the installed package.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time


def run_smoke() -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    steps = []

    def step(name):
        steps.append((name, round(time.perf_counter() - started, 2)))
        print(f"smoke: {name} ({steps[-1][1]}s)", flush=True)

    try:
        import NodeGraphQt  # noqa: F401
        from PySide6 import QtWidgets  # noqa: F401
        step("Qt and NodeGraphQt import")
        try:
            import app.ui  # noqa: F401
            step("app.ui imports")
        except ImportError as exc:
            print(f"smoke: app.ui not importable: {exc}", file=sys.stderr)
            return 1
        import diffusers  # noqa: F401
        import torch
        import transformers  # noqa: F401
        step(f"torch {torch.__version__}, diffusers, transformers import")

        from app.engine import Executor
        from app.engine.executor import resources_dir
        from app.graph import load
        from nodes import registry

        graph_path = resources_dir() / "graphs" / "default.loom"
        graph = load(graph_path, registry.get)
        with tempfile.TemporaryDirectory(prefix="loomwork-smoke-") as tmp:
            torch.set_num_threads(1)
            report = Executor(disk_cache=False).run(graph, output_dir=tmp, graph_path=graph_path)
            if not report.ok:
                for r in report.nodes.values():
                    if r.error:
                        print(f"smoke: {r.title}: {r.status}: {r.error}", file=sys.stderr)
                return 1
            (png,) = report.outputs()
            reopened = load(png, registry.get)
            assert set(reopened.nodes) == set(graph.nodes), "the PNG does not carry the graph"
            step(f"default graph rendered ({report.sampler_steps} sampler steps) and reopened from its PNG")
    except Exception as exc:  # the point of a smoke test is to say what broke, in one line
        print(f"smoke: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("smoke: ok", flush=True)
    return 0
