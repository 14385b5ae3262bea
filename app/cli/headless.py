"""The steps of one headless run, shared by `loomwork run` and each job of `loomwork batch`:
load a graph, apply `--set` overrides, check it can run, make the executor, run it.

Standard library at import; the graph, the catalogue and torch are imported when used.
"""

from __future__ import annotations

import os

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    pass


def _load(path: str):
    from app.graph import GraphFileError, load
    from nodes import registry

    try:
        return load(path, registry.get)
    except GraphFileError as exc:
        raise UsageError(str(exc)) from None


class ParamRefError(ValueError):
    """A `NODE.PARAM` that names no node, a node of unknown type, or no param of it."""


def find_param(graph, ref: str, name: str):
    """The node `ref` names (id or title) and its declared param `name`, for `--set` and sweeps."""
    from app.graph import GraphError
    from nodes import registry

    try:
        node = graph.find(ref)
    except GraphError as exc:
        raise ParamRefError(str(exc)) from None
    spec = registry.get(node.type)
    if spec is None or node.is_placeholder:
        raise ParamRefError(f"node {node.label} is of unknown type {node.type!r}")
    param = spec.params.get(name)
    if param is None:
        raise ParamRefError(f"{node.type} has no param {name!r} (it has: {', '.join(spec.params) or 'none'})")
    return node, param


def apply_sets(graph, sets: list[str]) -> None:
    """Apply `NODE.PARAM=VALUE` overrides; NODE is a node id (or 8+ char prefix) or unique title."""
    from nodes.base import ParamError

    for item in sets:
        target, eq, text = item.partition("=")
        ref, dot, name = target.rpartition(".")
        if not eq or not dot or not ref or not name:
            raise UsageError(f"--set {item!r}: expected NODE.PARAM=VALUE")
        try:
            node, param = find_param(graph, ref, name)
        except ParamRefError as exc:
            raise UsageError(f"--set {item!r}: {exc}") from None
        try:
            value = param.parse(text)
        except ParamError as exc:
            raise UsageError(f"--set {item!r}: {exc}") from None
        problem = param.check(value)
        if problem:
            raise UsageError(f"--set {item!r}: {problem}")
        graph.set_param(node.id, name, value)


def set_threads() -> None:
    """Torch threads for this process: LOOMWORK_THREADS, else 1 (see bench/threads.py: on small
    CPUs batch-1 sampling is not faster with more threads, and contention makes it far slower)."""
    import torch

    text = os.environ.get("LOOMWORK_THREADS", "1")
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"LOOMWORK_THREADS should be a whole number, got {text!r}") from None
    torch.set_num_threads(max(1, n))


def runnable_problems(graph, name) -> list:
    """The validation problems that stop `graph` from running (a graph without an output node is
    a UsageError: the run would do nothing and say "done"). `loomwork run` and each batch job."""
    from app.engine import Executor

    if not Executor.output_nodes(graph):
        raise UsageError(f"{name}: nothing to run: the graph has no output node "
                         f"(add a SaveImage or PreviewImage)")
    return _problems(graph)


def new_executor(*, disk_cache: bool = True, model_roots=None, write_dirs=()):
    """The executor a headless run uses (a batch worker keeps one for all its jobs)."""
    from app.engine import Executor

    return Executor(disk_cache=disk_cache, model_roots=model_roots,
                    write_dirs=[os.path.expanduser(d) for d in write_dirs])


def run_headless(executor, graph, name, out, events=None):
    """One headless run of `graph` (already validated) into folder `out`; its RunReport."""
    from app.graph import GraphError

    try:
        return executor.run(graph, events=events, output_dir=out, graph_path=name)
    except GraphError as exc:
        raise UsageError(f"{name}: {exc}") from None


def _problems(graph):
    from app.engine import Executor
    from app.graph import validate
    from nodes import registry

    return validate(graph, registry.get, set(Executor.output_nodes(graph)) or None)


def model_roots(args) -> list[str]:
    """The model folders: each --models DIR, then those in LOOMWORK_MODELS."""
    from kernels.model_folders import roots_from_env

    return [os.path.expanduser(d) for d in (args.models or [])] + roots_from_env()
