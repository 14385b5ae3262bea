"""The executor: lazy, cached, cancellable evaluation of a graph document.

Rules (each pinned by a test):
- Lazy pull: only the upstream cone of the targets is considered (all output nodes, or one node).
- Cache key = hash(node type, type version, params, outside-world fingerprint, the content
  hashes of its inputs). Node ids, titles and positions are not in it, so identical chains share
  results. Because inputs enter by *content* hash, a node that re-runs and produces the same
  outputs leaves its downstream keys unchanged: early cutoff.
- A node whose key has a trace (memory or disk) is not run; its values are loaded only if a node
  that must run needs them.
- Bypassed, muted and reroute nodes never run: their readers are rewired to the real sources
  first (`app.graph.passthrough`), so a bypass is the graph with the node removed.
- Failure is local: a failing node fails itself, its downstream cone is skipped, and
  independent branches finish. Cancel is cooperative; finished nodes stay cached.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from app.graph import CycleError, Graph, dumps, passthrough, validate
from app.graph.errors import MESSAGE_CHARS, brief
from kernels.files import sweep_stale_temps
from nodes import registry
from nodes.base import TABLE, NodeError

from .cache import DiskCache, MemoryCache, Traces
from .context import Cancelled, NodeContext
from .hashing import Unhashable, content_hash, key_of, size_of
from .models import ModelManager

log = logging.getLogger(__name__)

# Node states, as events and the report name them.
QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
CACHED_MEMORY, CACHED_DISK, SKIPPED = "cached-memory", "cached-disk", "skipped"
# Report statuses: "ran" for DONE.
REPORT_STATUS = {DONE: "ran"}


@dataclass
class EngineEvents:
    """Plain callbacks; the UI wraps them in Qt signals. All are optional."""

    node_state: Callable[[str, str, dict], None] = lambda node_id, state, info: None
    progress: Callable[[str, int, int], None] = lambda node_id, step, total: None
    preview: Optional[Callable[[str, Any], None]] = None  # (node_id, IMAGE tensor NHWC)
    images: Callable[[str, Any, list], None] = lambda node_id, images, paths: None
    tables: Callable[[str, Any], None] = lambda node_id, table: None  # (node_id, analysis Table)


@dataclass
class NodeReport:
    node_id: str
    title: str
    type: str
    status: str = "skipped"
    seconds: float = 0.0
    error: Optional[str] = None
    traceback: Optional[str] = None
    outputs: list[str] = field(default_factory=list)
    summary: Optional[str] = None  # what the node says it did (NodeContext.summary)

    def as_json(self) -> dict:
        return {"id": self.node_id, "title": self.title, "type": self.type,
                "status": REPORT_STATUS.get(self.status, self.status),
                "seconds": round(self.seconds, 4), "error": self.error, "outputs": self.outputs,
                "summary": self.summary}


@dataclass
class RunReport:
    nodes: dict[str, NodeReport] = field(default_factory=dict)
    cancelled: bool = False
    seconds: float = 0.0
    sampler_steps: int = 0  # model steps actually run (what re-run benchmarks count)

    @property
    def ok(self) -> bool:
        return not self.cancelled and all(r.status not in (FAILED, SKIPPED) for r in self.nodes.values())

    def status(self, node_id: str) -> str:
        return REPORT_STATUS.get(self.nodes[node_id].status, self.nodes[node_id].status)

    def ran(self) -> list[str]:
        return [n for n, r in self.nodes.items() if r.status == DONE]

    def outputs(self) -> list[str]:
        return [p for r in self.nodes.values() for p in r.outputs]

    def as_json(self) -> dict:
        return {"ok": self.ok, "cancelled": self.cancelled, "seconds": round(self.seconds, 4),
                "sampler_steps": self.sampler_steps,
                "nodes": [r.as_json() for r in self.nodes.values()]}


def default_cache_dir() -> Path:
    """LOOMWORK_CACHE_DIR, else the user cache folder (platformdirs)."""
    import os

    if os.environ.get("LOOMWORK_CACHE_DIR"):
        return Path(os.environ["LOOMWORK_CACHE_DIR"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("loomwork", appauthor=False)) / "results"


def resources_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "resources"


@dataclass
class _Run:
    graph: Graph
    events: EngineEvents
    cancel: threading.Event
    output_dir: Path
    graph_dir: Optional[Path]
    graph_text: str
    report: RunReport
    write_dirs: list = field(default_factory=list)  # folders beyond the output folder a node may write in
    inputs: dict = field(default_factory=dict)  # node -> {port: edge}, read once per run
    keys: dict[str, str] = field(default_factory=dict)
    hashes: dict[str, dict[str, str]] = field(default_factory=dict)
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    blocked: dict[str, str] = field(default_factory=dict)  # node -> why it cannot run
    skips: dict[str, str] = field(default_factory=dict)  # node -> why it is skipped (reads a muted node)
    refused: Optional[str] = None  # why the whole run is refused (its memory estimate)
    shown_tables: list = field(default_factory=list)  # tables sent to the app this run, each once


class Executor:
    """Runs graphs. Keep one per app session: its caches are what make re-runs cheap."""

    def __init__(self, *, device: Optional[str] = None, memory_budget: "int | str | None" = None,
                 disk_cache: "DiskCache | str | Path | None | bool" = True,
                 disk_budget: int = 2 << 30, resources: Optional[Path] = None,
                 model_roots: Optional[Iterable[str]] = None,
                 ram_budget: "int | str | None" = None, vram_budget: "int | str | None" = None,
                 write_dirs: Iterable["str | Path"] = (), run_budget: "int | str | None" = None,
                 disk_result_limit: "int | str | None" = None):
        self._device = device
        # Folders the user picked (in the app) that graphs may write in, beside each run's output folder.
        self.write_dirs = [Path(d) for d in write_dirs]
        # Models' budgets (bytes or "12G"); None: LOOMWORK_RAM_BUDGET / _VRAM_ or the machine's.
        self._model_budgets = (ram_budget, vram_budget)
        self._current: Optional[_Run] = None  # the run in progress: its values' models stay loaded
        # None: LOOMWORK_MODELS, read when a `ckpt:` path is resolved.
        self.model_roots = None if model_roots is None else list(model_roots)
        # The memory cache's bytes (or "2G"); None: LOOMWORK_MEMORY_CACHE_BUDGET or a share of RAM.
        self.memory = MemoryCache(memory_budget)
        # A run's estimated peak (kernels.run_memory); None: LOOMWORK_RUN_BUDGET or a share of RAM.
        self._run_budget_setting = run_budget
        self._run_budget: Optional[int] = None
        if disk_cache is True:
            disk_cache = default_cache_dir()
        if isinstance(disk_cache, (str, Path)):
            from kernels.run_memory import disk_result_limit as result_limit

            disk_cache = DiskCache(disk_cache, disk_budget, max_entry_bytes=result_limit(disk_result_limit))
        self.disk: Optional[DiskCache] = disk_cache or None
        self.traces = Traces()  # key -> output content hashes, the most recent ones
        # key -> what the node said making it (NodeContext.summary): a cached result says it again
        self.summaries = Traces()
        self._models: Optional[ModelManager] = None
        self.resources = resources or resources_dir()
        self._lock = threading.Lock()  # one run at a time
        # Folders this executor's nodes wrote in and swept of stale temp files: once is enough.
        self._swept: set[Path] = set()
        self._swept_lock = threading.Lock()

    def sweep_stale_temps_once(self, folder: Path) -> int:
        """Delete the temporary files writers killed mid-write (kill -9) left in `folder`, the
        first time this executor writes there (kernels.files.sweep_stale_temps: only files older
        than any write). Returns how many were deleted."""
        with self._swept_lock:
            if folder in self._swept:
                return 0
            self._swept.add(folder)
        removed = sweep_stale_temps([folder])
        if removed:
            log.info("removed %d stale temporary file(s) from %s", removed, folder)
        return removed

    # -- environment ---------------------------------------------------------------------
    @property
    def device(self) -> str:
        if self._device is None:
            import torch

            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    @property
    def run_budget(self) -> int:
        if self._run_budget is None:
            from kernels.run_memory import run_budget

            self._run_budget = run_budget(self._run_budget_setting, self.device)
        return self._run_budget

    @property
    def models(self) -> ModelManager:
        if self._models is None:
            ram, vram = self._model_budgets
            self._models = ModelManager(self.device, ram_budget=ram, vram_budget=vram,
                                        in_use=self._values_in_use, on_drop=self._forget_model)
        return self._models

    def _values_in_use(self) -> list:
        run = self._current
        return list(run.values.values()) if run is not None else []

    def _forget_model(self, value: Any) -> None:
        """A dropped model leaves the memory cache too, so its memory is really freed."""
        from kernels.memory import modules_in

        dropped = {id(m) for m in modules_in(value)}
        self.memory.discard_if(lambda values: any(id(m) in dropped for m in modules_in(values)))

    def resolve_path(self, path: str, graph_dir: Optional[Path] = None, kinds: Optional[tuple] = None) -> str:
        """`builtin:NAME` -> a shipped model; `ckpt:NAME` -> a model in the model folders (of
        `kinds`, default checkpoints and diffusers folders); `~` expanded; relative -> the graph's folder."""
        if not path:
            return path
        if path.startswith("builtin:"):
            return str(self.resources / "models" / path[len("builtin:"):])
        if path.startswith("ckpt:"):
            return self._find_model(path[len("ckpt:"):], kinds)
        p = Path(path).expanduser()
        if not p.is_absolute() and graph_dir is not None:
            p = graph_dir / p
        return str(p)

    def _find_model(self, name: str, kinds: Optional[tuple]) -> str:
        from kernels.model_folders import CHECKPOINT_KINDS, ModelNotFound, find_model, roots_from_env

        roots = roots_from_env() if self.model_roots is None else self.model_roots
        try:
            return find_model(name, roots, kinds or CHECKPOINT_KINDS)
        except ModelNotFound as exc:
            raise NodeError(str(exc)) from None

    # -- planning ------------------------------------------------------------------------
    @staticmethod
    def output_nodes(graph: Graph) -> list[str]:
        out = []
        for nid, node in graph.nodes.items():
            spec = registry.get(node.type)
            if spec is not None and spec.output_node and not node.is_placeholder \
                    and not passthrough.is_passthrough(node):
                out.append(nid)
        return out

    def run(self, graph: Graph, targets: Optional[Iterable[str]] = None, *,
            events: Optional[EngineEvents] = None, cancel: Optional[threading.Event] = None,
            output_dir: "str | Path | None" = None, graph_path: "str | Path | None" = None,
            write_dirs: Iterable["str | Path"] = ()) -> RunReport:
        """Run `targets` (default: every output node) and what they need. Never raises for a
        node's failure: the report says what happened to each node. Nodes write only inside
        `output_dir`, the executor's `write_dirs` and this run's `write_dirs` (say, the folders
        the user picked for this graph)."""
        with self._lock:
            try:
                return self._run_locked(graph, targets, events, cancel, output_dir, graph_path,
                                        [*self.write_dirs, *map(Path, write_dirs)])
            finally:
                self._current = None
                from kernels.run_memory import release_free_memory

                release_free_memory()

    def _run_locked(self, graph, targets, events, cancel, output_dir, graph_path, write_dirs) -> RunReport:
        started = time.perf_counter()
        targets = list(targets) if targets is not None else self.output_nodes(graph)
        for t in targets:
            graph.node(t)
        graph_dir = Path(graph_path).resolve().parent if graph_path else None
        # Bypassed, muted and reroute nodes are taken out and their readers rewired (the file
        # the run embeds is the graph as drawn).
        shown, resolved = graph, passthrough.resolve(graph, registry.get)
        graph = resolved.graph
        run = _Run(graph=graph, events=events or EngineEvents(), cancel=cancel or threading.Event(),
                   output_dir=Path(output_dir) if output_dir else Path.cwd(), graph_dir=graph_dir,
                   graph_text=dumps(shown, strict=False), report=RunReport(), write_dirs=write_dirs,
                   inputs=graph.inputs_by_node(), skips=dict(resolved.skipped))
        self._current = run
        passed = sorted(shown.upstream(targets) & set(resolved.passed), key=lambda n: shown.nodes[n].pos)
        targets = [t for t in targets if t in graph.nodes]
        cone = graph.upstream(targets)
        on_cycle: set[str] = set()
        try:
            order, stuck = graph.topological_order(cone), []
        except CycleError as exc:
            on_cycle = set(exc.on_cycle)
            # Nodes on a cycle (and fed through one) cannot run; the rest of the cone still can.
            stuck = sorted(graph.downstream(exc.nodes) & cone, key=lambda n: graph.nodes[n].pos)
            order = graph.topological_order(cone - set(stuck))
            for nid in stuck:
                run.blocked[nid] = (f"{graph.nodes[nid].label}: is on a cycle" if nid in on_cycle
                                    else "not run: it is fed through a cycle")
        for nid in order + stuck:
            node = graph.nodes[nid]
            run.report.nodes[nid] = NodeReport(nid, node.title or node.type, node.type)
        for nid in passed:  # reported, never run
            node = shown.nodes[nid]
            run.report.nodes[nid] = NodeReport(nid, node.title or node.type, node.type)
            if nid in resolved.failed:
                self._finish(run, nid, FAILED, error=resolved.failed[nid])
            elif resolved.passed[nid] == passthrough.REROUTED:
                run.report.nodes[nid].status = passthrough.REROUTED  # a dot on a wire: no badge
            else:
                self._finish(run, nid, resolved.passed[nid])
        for problem in validate(graph, registry.get, set(targets)):
            if problem.node_id in run.report.nodes:
                run.blocked.setdefault(problem.node_id, problem.message)
        self._check_memory(run, order)
        for nid in stuck:
            self._finish(run, nid, FAILED if nid in on_cycle else SKIPPED, error=run.blocked[nid])
        for nid in order:
            run.events.node_state(nid, QUEUED, {})
        for nid in order:
            if run.cancel.is_set():  # cancelled before this node (or before the run began)
                run.report.cancelled = True
                self._finish(run, nid, SKIPPED, error="cancelled")
                continue
            try:
                self._visit(run, nid, targets)
            except Cancelled:
                run.report.cancelled = True
                self._finish(run, nid, SKIPPED, error="cancelled")
        run.report.seconds = time.perf_counter() - started
        return run.report

    def _check_memory(self, run: _Run, order: list[str]) -> None:
        """Refuse a run whose estimated peak exceeds the run budget, before any node runs: the
        node where it peaks fails with the sizes and the budget, the others are skipped (their
        work would only feed a run that cannot finish). A node's estimate may also refuse its
        own params (a NodeError), before the run like validation."""
        from kernels.run_memory import plan_peak, refusal

        graph = run.graph

        def estimate(nid: str, sizes: dict):
            if nid in run.blocked:
                return None
            node = graph.nodes[nid]
            spec = registry.get(node.type)
            if spec is None:
                return None
            try:
                return spec.memory_estimate(spec.resolved_params(node.params), sizes, NodeContext(self, run, nid))
            except NodeError as exc:
                run.blocked[nid] = f"{node.label}: {exc}"
                return None
            except Exception:  # an estimate's own bug must not fail the run: unknown, as if none
                log.exception("memory estimate of %s failed", node.label)
                return None

        wires = {nid: {port: (e.src, e.src_port) for port, e in ports.items()}
                 for nid, ports in run.inputs.items()}
        peak = plan_peak(order, wires, estimate)
        message = peak and refusal(graph.nodes[peak.node_id].label, peak, self.run_budget)
        if message:
            run.blocked[peak.node_id] = message
            run.refused = f"not run: the run is over its memory budget at {graph.nodes[peak.node_id].label}"

    def _finish(self, run: _Run, nid: str, state: str, error: Optional[str] = None,
                tb: Optional[str] = None, seconds: float = 0.0) -> None:
        rep = run.report.nodes[nid]
        if error is not None and len(error) > MESSAGE_CHARS:  # a 50 MB name must not make a 50 MB report
            error = brief(error, MESSAGE_CHARS)
        rep.status, rep.error, rep.traceback = state, error, tb
        rep.seconds += seconds
        info = {"error": error} if error else {}
        if seconds:
            info["seconds"] = seconds
        if state in (DONE, CACHED_MEMORY, CACHED_DISK) and rep.summary:
            info["summary"] = rep.summary
        run.events.node_state(nid, state, info)

    # -- evaluation ----------------------------------------------------------------------
    def _visit(self, run: _Run, nid: str, targets: list[str]) -> None:
        graph = run.graph
        node = graph.nodes[nid]
        if nid in run.skips:
            self._finish(run, nid, SKIPPED, error=run.skips[nid])
            return
        if nid in run.blocked:
            self._finish(run, nid, FAILED, error=run.blocked[nid])
            return
        if run.refused is not None:
            self._finish(run, nid, SKIPPED, error=run.refused)
            return
        wired = run.inputs.get(nid, {})
        for port, edge in wired.items():
            if edge.src in run.blocked or run.report.nodes[edge.src].status in (FAILED, SKIPPED):
                why = f"not run: its input {port!r} comes from {graph.nodes[edge.src].label}, which did not finish"
                run.blocked[nid] = why
                self._finish(run, nid, SKIPPED, error=why)
                return
        spec = registry.get(node.type)
        params = spec.resolved_params(node.params)
        ctx = NodeContext(self, run, nid)
        special = _special_path_param(spec, params, ctx)
        if special:
            return self._fail(run, nid, NodeError(special))
        try:
            fingerprint = spec.fingerprint(params, ctx)
        except Exception as exc:
            return self._fail(run, nid, exc)
        key = key_of(spec.type_name(), spec.version, params, fingerprint,
                     {port: run.hashes[e.src][e.src_port] for port, e in sorted(wired.items())})
        run.keys[nid] = key
        trace, where = self.traces.get(key), CACHED_MEMORY
        if trace is None and self.disk is not None:
            (trace, said), where = self.disk.entry(key), CACHED_DISK
            if trace is not None:
                self.traces[key] = trace
                self.summaries[key] = said or ""
        if trace is not None and not spec.always_run:
            run.hashes[nid] = trace
            run.report.nodes[nid].summary = self._summary_of(key)
            in_memory = key in self.memory or (where == CACHED_MEMORY and self.disk is None)
            self._finish(run, nid, CACHED_MEMORY if in_memory else CACHED_DISK)
            return
        self._execute(run, nid, spec, params, ctx)

    def _summary_of(self, key: str) -> Optional[str]:
        """What the node said making this result; "" is remembered for "nothing", so a cached
        node without a summary does not read its disk entry again on every visit."""
        said = self.summaries.get(key)
        if said is None and self.disk is not None:
            said = self.disk.entry(key)[1] or ""
            self.summaries[key] = said
        return said or None

    def _inputs(self, run: _Run, nid: str) -> dict[str, Any]:
        spec = registry.get(run.graph.nodes[nid].type)
        values: dict[str, Any] = {name: None for name in spec.inputs}  # optional, unwired
        for port, edge in run.inputs.get(nid, {}).items():
            values[port] = self._materialize(run, edge.src)[edge.src_port]
        return values

    def _materialize(self, run: _Run, nid: str) -> dict[str, Any]:
        """The values of a node that was visited: from this run, memory, disk, or by re-running."""
        if nid in run.values:
            return run.values[nid]
        key = run.keys[nid]
        values = self.memory.get(key)
        if values is None and self.disk is not None:
            values = self.disk.get(key)
            if values is not None:
                self.memory.put(key, values, size_of(values), cost=0.0, node=nid)
        if values is None:  # evicted everywhere: run it again (its inputs likewise)
            spec = registry.get(run.graph.nodes[nid].type)
            params = spec.resolved_params(run.graph.nodes[nid].params)
            self._execute(run, nid, spec, params, NodeContext(self, run, nid))
            if run.report.nodes[nid].status != DONE:
                raise _UpstreamFailed(nid)
            values = run.values[nid]
        run.values[nid] = values
        return values

    def _execute(self, run: _Run, nid: str, spec, params: dict, ctx: NodeContext) -> None:
        run.events.node_state(nid, RUNNING, {})
        started = time.perf_counter()
        try:
            inputs = self._inputs(run, nid)
        except _UpstreamFailed as exc:
            self._finish(run, nid, SKIPPED, error=f"not run: {run.graph.nodes[exc.node_id].label} failed")
            return
        node_impl = spec()
        try:
            ctx.check_cancel()
            ctx.models.prepare(inputs)  # its models count as used now; on a GPU, they go there
            outputs = node_impl.run(ctx, **inputs, **params) or {}
            missing = set(spec.outputs) - set(outputs)
            if missing:
                raise NodeError(f"{spec.type_name()} returned no {sorted(missing)} output")
        except Cancelled:
            raise
        except (Exception, SystemExit) as exc:  # a library's sys.exit() fails the node, not the app
            self._fail(run, nid, exc, seconds=time.perf_counter() - started)
            return
        seconds = time.perf_counter() - started
        key = run.keys[nid]
        hashes = {}
        for port, value in outputs.items():
            try:
                hashes[port] = content_hash(value)
            except Unhashable:
                hashes[port] = key_of(key, port)  # no early cutoff for this output
        run.values[nid] = outputs
        run.hashes[nid] = hashes
        for port, kind in spec.outputs.items():  # a result table shows when its node finishes
            if kind is TABLE and outputs.get(port) is not None:
                ctx.show_table(outputs[port])
        if not spec.always_run:
            said = run.report.nodes[nid].summary
            self.traces[key] = hashes
            self.summaries[key] = said or ""
            self.memory.put(key, outputs, size_of(outputs), seconds, node=nid)
            if self.disk is not None:
                self.disk.put(key, hashes, outputs, summary=said)
        self._finish(run, nid, DONE, seconds=seconds)

    def _fail(self, run: _Run, nid: str, exc: BaseException, seconds: float = 0.0) -> None:
        if isinstance(exc, NodeError):
            message, tb = str(exc), None
        else:
            message = f"{type(exc).__name__}: {exc}"
            tb = "".join(traceback.format_exception(exc))
        self._finish(run, nid, FAILED, error=message, tb=tb, seconds=seconds)

    def clear(self) -> None:
        self.memory.clear()
        self.traces.clear()
        self.summaries.clear()


class _UpstreamFailed(Exception):
    def __init__(self, node_id: str):
        super().__init__(node_id)
        self.node_id = node_id


def _special_path_param(spec, params: dict, ctx) -> Optional[str]:
    """A message if a path param names a pipe, socket or device: every loader would hang or
    misread on it, so no node gets to open one (checked here once, not in each loader)."""
    from kernels.files import special_file_reason
    from nodes.base import Path as PathParam

    for name, param in spec.params.items():
        value = params.get(name)
        if not isinstance(param, PathParam) or not isinstance(value, str) or not value:
            continue
        try:
            resolved = ctx.resolve_path(value, kinds=tuple(param.models) or None)
        except Exception:  # noqa: BLE001 (an unresolvable name is the node's own error to give)
            continue
        reason = special_file_reason(resolved)
        if reason:
            return f"{name}: {resolved!r} {reason}"
    return None
