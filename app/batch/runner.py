"""A batch: a graph and a sweep planned into jobs, then run on a backend with a manifest.

The driver hands one job at a time to each idle worker of a backend (local processes or Ray
actors), writes each finished job's files and record, and hands a lost worker's job to another.
Rules:
- each job is validated before anything runs; a job already `done` (same key, files present)
  is skipped; a `failed` one is retried on a rerun, up to `max_attempts` attempts in all;
- a worker that dies mid-job costs that job one attempt and it goes back to the front of the
  queue; its result, if one still arrives, is dropped, so every job finishes exactly once;
- Ctrl-C (or `stop`, or `timeout`) puts the jobs in flight back to pending (that attempt does
  not count; what their workers still send is dropped) and still writes results.json and the
  contact sheet; closing the backend then stops the busy workers.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .manifest import DONE, FAILED, PENDING, RUNNING, Manifest, output_name
from .sweep import ResolvedAxis, Sweep, SweepError, combinations, resolve, set_text

RESULTS_NAME, SHEET_NAME = "results.json", "contact_sheet.png"
DEFAULT_ATTEMPTS = 3


class BatchError(RuntimeError):
    """A batch that cannot go on (no worker could start, a cluster that cannot be reached)."""


@dataclass
class Job:
    index: int
    key: str
    overrides: dict     # NODE.PARAM as written -> value
    sets: list          # the `--set` texts a worker applies: the batch's own, then the axes'


@dataclass
class BatchPlan:
    graph_path: str
    graph_text: str
    sweep: Sweep
    axes: list[ResolvedAxis]
    sets: list[str]
    jobs: list[Job]


def job_key(graph) -> str:
    """A job's cache key: its graph's nodes (type, version, params) and wires, overrides applied;
    titles, positions and meta do not change a result, so they are not in it."""
    from kernels.hashing import key_of

    nodes = sorted((nid, n.type, n.version, n.params) for nid, n in graph.nodes.items())
    edges = sorted((e.src, e.src_port, e.dst, e.dst_port) for e in graph.edges)
    return key_of("loomwork.batch.job", 1, nodes, edges)


def plan_batch(graph_path: str, sweep: Sweep, sets: list[str] = (), graph=None) -> BatchPlan:
    """Check the sweep against the graph's declarations and validate every job's graph; raises
    SweepError (or app.cli.UsageError for a bad --set) naming the axis, value or job."""
    from app.cli.headless import _load, apply_sets, runnable_problems
    from app.graph import dumps

    graph = graph if graph is not None else _load(graph_path)
    base = graph.copy()
    apply_sets(base, list(sets))
    axes = resolve(sweep, base)
    jobs = []
    for index, values in enumerate(combinations(axes, sweep.mode)):
        g = base.copy()
        job_sets = list(sets)
        for axis, value in zip(axes, values):
            g.set_param(axis.node_id, axis.name, value)
            job_sets.append(f"{axis.node_id}.{axis.name}={set_text(value)}")
        problems = runnable_problems(g, graph_path)
        overrides = {a.param: v for a, v in zip(axes, values)}
        if problems:
            raise SweepError(f"job {index} ({_shown(overrides)}): {problems[0]}")
        jobs.append(Job(index, job_key(g), overrides, job_sets))
    return BatchPlan(str(graph_path), dumps(graph), sweep, axes, list(sets), jobs)


def _shown(overrides: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in overrides.items())


@dataclass
class BatchResult:
    out_dir: Path
    records: list[dict]
    ran: int = 0            # jobs finished in this run (done or failed)
    skipped: int = 0        # done before this run
    lost: int = 0           # worker losses in this run
    interrupted: bool = False
    seconds: float = 0.0
    counts: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(r["status"] == DONE for r in self.records)


Event = Callable[[str, dict, "Manifest"], None]  # (kind, record, manifest): started, done, failed, lost


class _Stop(Exception):
    pass


def run_batch(plan: BatchPlan, out_dir: "str | Path", backend, *, max_attempts: int = DEFAULT_ATTEMPTS,
              on_event: Optional[Event] = None, stop: Optional[threading.Event] = None,
              timeout: Optional[float] = None, sheet: bool = True) -> BatchResult:
    """Run the plan's unfinished jobs on `backend` (started here if it is not; the caller closes
    it). Returns when every job is done or failed, or on Ctrl-C/stop/timeout (interrupted)."""
    from kernels.files import atomic_write

    from .job import job_payload

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifest = Manifest.open(out, plan)
    emit = on_event or (lambda kind, rec, m: None)
    todo: deque = deque()
    result = BatchResult(out, [])
    for job in plan.jobs:
        rec = manifest.record(job)
        if rec["status"] == DONE:
            result.skipped += 1
        elif rec["attempts"] >= max_attempts:
            rec["status"] = FAILED
            rec["error"] = rec.get("error") or f"gave up after {rec['attempts']} attempts"
        else:
            rec["status"] = PENDING
            todo.append(job)
    manifest.save()
    started = time.perf_counter()
    flight: dict[int, tuple] = {}  # job index -> (job, submitted at)
    try:
        backend.start()
        while todo or flight:
            if (stop is not None and stop.is_set()) or (timeout is not None and time.perf_counter() - started > timeout):
                raise _Stop()
            changed = False
            for wid in backend.idle():
                if not todo:
                    break
                job = todo.popleft()
                rec = manifest.record(job)
                rec["status"], rec["attempts"] = RUNNING, rec["attempts"] + 1
                backend.submit(wid, job_payload(plan, job))
                flight[job.index] = (job, time.perf_counter())
                changed = True
                emit("started", rec, manifest)
            if changed:
                manifest.save()
            for kind, index, key, payload in backend.wait(0.25):
                if index not in flight or flight[index][0].key != key:  # of a job given up or interrupted
                    continue
                job, submitted = flight.pop(index)
                rec = manifest.record(job)
                if kind == "lost":
                    result.lost += 1
                    rec["lost"] += 1
                    if rec["attempts"] >= max_attempts:
                        rec["status"] = FAILED
                        rec["error"] = f"its worker died during each of {rec['attempts']} attempts ({payload})"
                        result.ran += 1
                    else:
                        rec["status"] = PENDING
                        todo.appendleft(job)
                    manifest.save()
                    emit("lost", rec, manifest)
                    continue
                _accept(rec, payload, out, time.perf_counter() - submitted, atomic_write)
                result.ran += 1
                manifest.save()
                emit(rec["status"], rec, manifest)
    except (KeyboardInterrupt, _Stop):
        result.interrupted = True
        backend.abort()
        for job, _t in flight.values():
            rec = manifest.record(job)
            rec["status"], rec["attempts"] = PENDING, max(0, rec["attempts"] - 1)
        manifest.save()
    result.seconds = time.perf_counter() - started
    result.records = manifest.in_order()
    result.counts = manifest.counts()
    write_results(plan, manifest, result, sheet=sheet)
    return result


def _accept(rec: dict, result: dict, out: Path, turnaround: float, atomic_write) -> None:
    """A finished job's files (written atomically, named by the job) and record."""
    outputs = []
    if result.get("ok"):
        for name, data in result.get("outputs", []):
            rel = output_name(rec, name)
            atomic_write(out / rel, data, durable=False)
            outputs.append(rel)
    rec.update(status=DONE if result.get("ok") else FAILED, outputs=outputs, error=result.get("error"),
               seconds=round(result.get("seconds", 0.0), 4), turnaround=round(turnaround, 4),
               worker=result.get("worker"), ran=list(result.get("ran", [])))
    if result.get("traceback"):
        rec["traceback"] = result["traceback"]


def write_results(plan: BatchPlan, manifest: Manifest, result: BatchResult, sheet: bool = True) -> None:
    """results.json and the contact sheet, from the manifest's records."""
    import json

    from kernels.files import atomic_write

    out = manifest.out_dir
    if sheet:
        from .contact_sheet import write_contact_sheet

        write_contact_sheet(out / SHEET_NAME, manifest.in_order(), plan.axes, plan.sweep.mode, out)
    ran = result.ran
    doc = {"format": "loomwork.batch-results", "version": 1, "graph": str(plan.graph_path),
           "sweep": plan.sweep.as_dict(), "set": plan.sets, "counts": manifest.counts(),
           "ran_this_run": ran, "skipped_done": result.skipped, "worker_losses": result.lost,
           "interrupted": result.interrupted, "seconds": round(result.seconds, 3),
           "jobs_per_minute": round(60.0 * ran / result.seconds, 3) if result.seconds > 0 and ran else None,
           "contact_sheet": SHEET_NAME if sheet else None,
           "jobs": [{k: r.get(k) for k in ("index", "overrides", "status", "outputs", "error", "seconds",
                                          "key", "attempts", "worker")} for r in manifest.in_order()]}
    atomic_write(out / RESULTS_NAME, (json.dumps(doc, indent=1) + "\n").encode("utf-8"))


__all__ = ["BatchError", "BatchPlan", "BatchResult", "Job", "plan_batch", "run_batch", "job_key",
           "DONE", "FAILED", "PENDING", "RUNNING"]
