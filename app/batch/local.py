"""`--cluster local`: jobs in worker processes on this machine, one torch thread each.

Each worker is a process holding one JobRunner (so a model loads once per worker) and a pipe to
the driver; it takes one job at a time. The driver waits on the pipes and on the processes'
sentinels together, so a worker that dies (killed, out of memory) is noticed at once: its job is
reported lost and a replacement starts, up to `max_restarts` in all.

Workers come from a forkserver that imports torch and diffusers once (job.WARM_MODULES), so a
worker or a replacement starts in a fraction of a cold interpreter's time; the forkserver is a
fresh process, so no Qt or torch threads of the driver are forked. A frozen app uses spawn.
concurrent.futures' process pool is not used: one dead worker breaks the whole pool and every
job in it, and it cannot say which job was on the dead worker.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_any
from typing import Any, Optional


def _worker_main(conn, options: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    from .job import JobRunner

    runner = JobRunner(options)
    conn.send(("ready", runner.info()))
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the driver is gone
            return
        if job is None:
            return
        conn.send(("result", runner.run(job)))


@dataclass
class _Worker:
    process: Any
    conn: Any
    ready: bool = False
    job: Optional[tuple] = None  # (index, key) of the job it runs
    pid: Optional[int] = None


class LocalBackend:
    """`workers` processes on this machine. Start, then idle/submit/wait; close when done."""

    name = "local"

    def __init__(self, workers: int = 2, options: Optional[dict] = None, max_restarts: Optional[int] = None,
                 method: Optional[str] = None):
        if workers < 1:
            raise ValueError("workers should be 1 or more")
        self.workers, self.options = workers, dict(options or {})
        self.max_restarts = 2 * workers if max_restarts is None else max_restarts
        self.restarts = 0
        self.method = method or ("spawn" if getattr(sys, "frozen", False) else "forkserver")
        self._ctx = multiprocessing.get_context(self.method)
        self._pool: dict[int, _Worker] = {}
        self._next_id = 0
        self._started = False

    def start(self) -> None:
        """Start workers up to `workers` (a backend is started once and may run many batches)."""
        if not self._started and self.method == "forkserver":
            self._ctx.set_forkserver_preload(["app.batch.warm"])
        self._started = True
        while len(self._pool) < self.workers:
            self._spawn()

    def _spawn(self) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, self.options), daemon=True,
                                 name=f"loomwork-batch-{self._next_id}")
        proc.start()
        child.close()
        self._pool[self._next_id] = _Worker(proc, parent)
        self._next_id += 1

    def pids(self) -> dict[int, int]:
        return {wid: w.process.pid for wid, w in self._pool.items()}

    def busy(self) -> dict[int, int]:
        """worker id -> the index of the job it runs."""
        return {wid: w.job[0] for wid, w in self._pool.items() if w.job is not None}

    def idle(self) -> list[int]:
        return [wid for wid, w in self._pool.items() if w.ready and w.job is None]

    def submit(self, wid: int, job: dict) -> None:
        w = self._pool[wid]
        w.job = (job["index"], job["key"])
        try:
            w.conn.send(job)
        except (BrokenPipeError, OSError):  # died since; wait() reports the loss
            pass

    def wait(self, timeout: float) -> list[tuple[str, int, Any]]:
        """What happened within `timeout` seconds: ("result", job index, job key, result) or
        ("lost", job index, job key, why)."""
        from .runner import BatchError

        if not self._pool:
            raise BatchError("every batch worker died and no more may start")
        handles = {}
        for wid, w in self._pool.items():
            handles[w.conn] = wid
            handles[w.process.sentinel] = wid
        events = []
        for handle in wait_any(list(handles), timeout):
            wid = handles[handle]
            w = self._pool.get(wid)
            if w is None:
                continue
            if handle is w.conn or w.conn.poll():
                try:
                    kind, payload = w.conn.recv()
                except (EOFError, OSError):
                    events += self._lost(wid)
                    continue
                if kind == "ready":
                    w.ready, w.pid = True, payload["pid"]
                elif kind == "result":
                    w.job = None
                    events.append(("result", payload["index"], payload["key"], payload))
            elif not w.process.is_alive():
                events += self._lost(wid)
        return events

    def _lost(self, wid: int) -> list:
        w = self._pool.pop(wid)
        code = w.process.exitcode
        w.conn.close()
        w.process.join(timeout=1)
        why = f"worker process {w.process.pid} ended" + (f" (exit {code})" if code is not None else "")
        if self.restarts < self.max_restarts:
            self.restarts += 1
            self._spawn()
        return [("lost", *w.job, why)] if w.job is not None else []

    def abort(self) -> None:
        """The driver gave up its jobs in flight (Ctrl-C, stop): busy workers finish theirs, and
        the driver drops what they send."""

    def close(self) -> None:
        """Idle workers are told to stop; busy ones are killed (their jobs stay pending)."""
        for w in self._pool.values():
            if w.job is not None or not w.ready:
                w.process.kill()
            else:
                try:
                    w.conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
        for w in self._pool.values():
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=5)
            w.conn.close()
        self._pool.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def worker_count(text: Optional[int]) -> int:
    """Workers for `local` when --workers is not given: one per core, at most 4."""
    return text if text else max(1, min(4, os.cpu_count() or 1))


class InProcessBackend:
    """One worker in this process, in turn with the driver: jobs run one after another (the
    serial baseline of bench/batch.py; quick batches where a process start would dominate)."""

    name = "in-process"
    workers = 1

    def __init__(self, options: Optional[dict] = None):
        self.options = dict(options or {})
        self._runner = None
        self._job: Optional[dict] = None

    def start(self) -> None:
        if self._runner is None:
            from .job import JobRunner

            self._runner = JobRunner(self.options)

    def pids(self) -> dict[int, int]:
        return {0: os.getpid()}

    def busy(self) -> dict[int, int]:
        return {0: self._job["index"]} if self._job else {}

    def idle(self) -> list[int]:
        return [] if self._job else [0]

    def submit(self, wid: int, job: dict) -> None:
        self._job = job

    def wait(self, timeout: float) -> list[tuple[str, int, Any]]:
        job, self._job = self._job, None
        return [("result", job["index"], job["key"], self._runner.run(job))] if job else []

    def abort(self) -> None:
        self._job = None

    def close(self) -> None:
        self._runner = None
