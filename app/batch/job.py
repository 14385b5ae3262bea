"""One batch job, run in a worker: the graph with its `--set` overrides, one headless run.

The run is `loomwork run`'s own path (app.cli.headless: apply_sets, runnable_problems, run_headless on an
executor from new_executor), into a private temporary folder; the output files come back as
bytes, so a worker on another machine needs no shared folder, and the driver writes them into
the batch folder atomically. A worker keeps its JobRunner (one executor, its model manager and
caches) for all its jobs: a model loads once per worker, not once per job.

The job's graph carries its overrides in `meta.batch`, so the graph each PNG embeds says which
job it was as well as holding the overridden params.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

# Third-party modules every job needs, imported ahead by worker pools that can (a forkserver):
# importing torch and diffusers is most of a cold worker's start.
WARM_MODULES = ("torch", "diffusers.models.unets.unet_2d_condition", "diffusers.schedulers",
                "diffusers.models.autoencoders.autoencoder_kl", "transformers.models.clip.modeling_clip")


def warm_imports() -> None:
    import importlib

    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # only makes the first job slower
            pass


def job_payload(plan, job) -> dict:
    """What a worker gets for one job: plain data (it may cross machines)."""
    return {"index": job.index, "key": job.key, "sets": list(job.sets), "overrides": dict(job.overrides),
            "graph": plan.graph_text, "graph_path": str(plan.graph_path)}


class JobRunner:
    """A worker's engine: one executor for every job it runs."""

    def __init__(self, options: Optional[dict] = None):
        from app.cli.headless import new_executor, set_threads

        options = options or {}
        if options.get("threads"):  # a Ray worker's CPUs, unless the node's LOOMWORK_THREADS says otherwise
            os.environ.setdefault("LOOMWORK_THREADS", str(options["threads"]))
        set_threads()  # LOOMWORK_THREADS, else one torch thread
        self.executor = new_executor(disk_cache=options.get("disk_cache", True),
                                     model_roots=options.get("model_roots"))
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def info(self) -> dict:
        return {"pid": os.getpid(), "worker": self.worker}

    def run(self, job: dict) -> dict:
        """The job's result: ok, error, outputs as [(relative name, bytes)], seconds, the nodes
        that ran (not cached). Never raises for the job's own failure."""
        started = time.perf_counter()
        result = {"index": job["index"], "key": job["key"], "ok": False, "error": None, "outputs": [],
                  "ran": [], "worker": self.worker, "pid": os.getpid()}
        try:
            result.update(self._run(job))
        except Exception as exc:  # noqa: BLE001 - a job's failure is its record's, not the worker's
            from app.cli.headless import UsageError

            result["error"] = str(exc) if isinstance(exc, UsageError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, UsageError):
                result["traceback"] = traceback.format_exc()
        result["seconds"] = time.perf_counter() - started
        return result

    def _run(self, job: dict) -> dict:
        from app.cli.headless import apply_sets, run_headless, runnable_problems
        from app.graph import loads
        from nodes import registry

        name = job["graph_path"]
        graph = loads(job["graph"], registry.get, path=name)
        apply_sets(graph, job["sets"])
        graph.meta["batch"] = {"job": job["index"], "key": job["key"], "overrides": job["overrides"],
                               "set": job["sets"]}
        problems = runnable_problems(graph, name)
        if problems:
            return {"error": "; ".join(str(p) for p in problems)}
        with tempfile.TemporaryDirectory(prefix="loomwork-job-") as tmp:
            report = run_headless(self.executor, graph, name, tmp)
            outputs = []
            for p in report.outputs():
                rel = os.path.relpath(p, tmp)
                if not rel.startswith(".."):
                    outputs.append((rel, Path(p).read_bytes()))
        failed = [r for r in report.nodes.values() if r.status == "failed"]
        error = None
        if not report.ok:
            error = "; ".join(f"{r.title} failed: {r.error}" for r in failed) or "not every node finished"
        ran = [r.title for r in report.nodes.values() if r.status == "done"]
        return {"ok": report.ok, "error": error, "outputs": outputs, "ran": ran}
