"""The layering, read from the source: no import cycles in app/ and nodes/, kernels import only
kernels, and the document layer and the node catalogue import without torch or Qt."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "kernels", "nodes")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _our_modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def _imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that `name` imports anywhere in its file (in functions too: a lazy import is
    still a dependency). `from X import y` depends on X.y when that is a module, else on X."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in modules:
                    out.add(target)
                elif base in modules:
                    out.add(base)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _our_modules()
    return {name: _imports_of(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle, as the modules along it, or [] if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_the_walker_sees_lazy_and_relative_imports():
    graph = _graph()
    assert "nodes.registry" in graph["nodes.core"]  # from .registry import register
    assert "app.graph.png" in graph["app.graph.fileformat"]
    assert "kernels.models" in graph["app.engine.models"]  # imported inside a method
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles_in_app_and_nodes():
    graph = {name: {d for d in deps if not d.startswith("kernels")}
             for name, deps in _graph().items() if not name.startswith("kernels")}
    assert _cycle(graph) == []


def test_kernels_import_only_kernels():
    for name, deps in _graph().items():
        if name.startswith("kernels"):
            assert all(d.startswith("kernels") for d in deps), (name, deps)


def _fresh(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


PAIRED = ["app.graph.fileformat", "app.graph.png", "nodes.registry", "nodes.base", "nodes.core",
          "nodes.erasers", "nodes.eraser_tools", "nodes.layout", "nodes.adapters", "nodes.upscale", "nodes.ip_adapter",
          "nodes.controlnet", "nodes.model_files", "nodes.t2i_zero", "nodes.resolution", "nodes.speed",
          "nodes.reroute", "nodes.analysis"]


@pytest.mark.parametrize("first", PAIRED)
def test_each_module_imports_first_in_a_fresh_interpreter(first):
    """Whichever module comes first, the rest import after it and the catalogue is complete."""
    rest = [m for m in PAIRED if m != first]
    code = "\n".join([f"import {first}"] + [f"import {m}" for m in rest] + [
        "from nodes import registry",
        "assert {'LoadModel', 'Sampler', 'SaveImage'} <= set(registry.all_types())",
        "import sys",
        "loaded = [m for m in ('torch', 'PySide6') if m in sys.modules]",
        "assert not loaded, loaded"])
    out = _fresh(code)
    assert out.returncode == 0, out.stderr
