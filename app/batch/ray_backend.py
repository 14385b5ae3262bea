"""`--cluster auto|ray://HOST:PORT`: jobs on a Ray cluster.

Each worker is a Ray actor holding one JobRunner (the engine, its model manager and caches), so
a model loads once per worker, not once per job; each job is one task on an actor. The actors
ask for resources (`num_cpus`, `num_gpus`, `memory` per worker), so Ray places them on the nodes
of a mixed farm that can hold them; on a GPU node the executor uses the GPU. A job's graph and
overrides go to the actor as data and its output files come back as bytes, so the nodes need no
shared folder for outputs (models: see the README's "Batch runs").

Ray restarts nothing by itself here (max_restarts=0): a dead actor's task fails with
RayActorError, the driver gives its job to another worker, and this backend starts a
replacement actor (up to `max_restarts`), which takes jobs once it is ready.

Ray is optional (`pip install loomwork[cluster]`); it is imported only when this backend is used.
"""

from __future__ import annotations

from typing import Any, Optional

INSTALL_HINT = "pip install loomwork[cluster]"


def import_ray():
    from .runner import BatchError

    try:
        import ray
    except ImportError as exc:
        raise BatchError(f"Ray is not installed ({exc}); a Ray cluster needs it: {INSTALL_HINT}") from None
    return ray


def connect(cluster: str) -> bool:
    """Join the cluster `auto` (RAY_ADDRESS, or one running on this machine) or `ray://HOST:PORT`;
    True if this call connected (so the caller disconnects), False if Ray was connected already."""
    from .runner import BatchError

    ray = import_ray()
    if ray.is_initialized():
        return False
    address = "auto" if cluster == "auto" else cluster
    try:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise BatchError(f"cannot join the Ray cluster at {cluster}: {exc}") from None
    return True


class _ActorImpl:
    """The actor's body (ray.remote wraps it when the backend starts)."""

    def __init__(self, options: dict):
        from .job import JobRunner

        self.runner = JobRunner(options)

    def info(self) -> dict:
        return self.runner.info()

    def run(self, job: dict) -> dict:
        return self.runner.run(job)


class RayBackend:
    """`workers` actors on the connected Ray cluster, each asking for `num_cpus`, `num_gpus` and
    `memory` (bytes). Start, then idle/submit/wait; close when done (it kills its actors)."""

    name = "ray"

    def __init__(self, workers: Optional[int] = None, options: Optional[dict] = None, *, num_cpus: float = 1,
                 num_gpus: float = 0, memory: Optional[int] = None, max_restarts: Optional[int] = None,
                 disconnect: bool = False):
        self.ray = import_ray()
        self.options = {"threads": max(1, int(num_cpus)), **(options or {})}  # torch threads: its CPUs
        self.resources = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        if memory:
            self.resources["memory"] = int(memory)
        self.workers = workers or self._workers_the_cluster_holds()
        self.max_restarts = 2 * self.workers if max_restarts is None else max_restarts
        self.restarts = 0
        self._disconnect = disconnect
        self._cls = None
        self._actors: dict[int, Any] = {}
        self._starting: dict[Any, int] = {}   # info() ref -> worker id
        self._running: dict[Any, tuple] = {}  # run() ref -> (worker id, job index, job key)
        self._ready: set[int] = set()
        self._job: dict[int, int] = {}
        self._pid: dict[int, int] = {}
        self._next_id = 0

    def _workers_the_cluster_holds(self) -> int:
        total = self.ray.cluster_resources()
        if self.resources["num_gpus"]:
            return max(1, int(total.get("GPU", 0) // self.resources["num_gpus"]))
        return max(1, int(total.get("CPU", 1) // max(self.resources["num_cpus"], 1e-3)))

    def start(self) -> None:
        if self._cls is None:
            self._cls = self.ray.remote(_ActorImpl)
        while len(self._actors) < self.workers:
            self._spawn()

    def _spawn(self) -> None:
        wid = self._next_id
        self._next_id += 1
        actor = self._cls.options(max_restarts=0, max_task_retries=0, **self.resources).remote(self.options)
        self._actors[wid] = actor
        self._starting[actor.info.remote()] = wid

    def pids(self) -> dict[int, int]:
        return dict(self._pid)

    def busy(self) -> dict[int, int]:
        return dict(self._job)

    def idle(self) -> list[int]:
        return [wid for wid in self._actors if wid in self._ready and wid not in self._job]

    def submit(self, wid: int, job: dict) -> None:
        self._job[wid] = job["index"]
        self._running[self._actors[wid].run.remote(job)] = (wid, job["index"], job["key"])

    def wait(self, timeout: float) -> list[tuple[str, int, Any]]:
        from .runner import BatchError

        if not self._actors:
            raise BatchError("every Ray worker died and no more may start")
        refs = [*self._starting, *self._running]
        if not refs:
            return []
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:  # and whatever else is ready by now
            ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        events = []
        for ref in ready:
            if ref in self._starting:
                events += self._started(ref)
            else:
                events += self._finished(ref)
        return events

    def _started(self, ref) -> list:
        wid = self._starting.pop(ref)
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:  # the actor could not start
            self._lose(wid, exc)
            return []
        self._ready.add(wid)
        self._pid[wid] = info["pid"]
        return []

    def _finished(self, ref) -> list:
        wid, index, key = self._running.pop(ref)
        self._job.pop(wid, None)
        try:
            return [("result", index, key, self.ray.get(ref))]
        except self.ray.exceptions.RayActorError as exc:
            self._lose(wid, exc)
            return [("lost", index, key, f"Ray worker {wid} died: {type(exc).__name__}")]
        except self.ray.exceptions.RayError as exc:  # the task itself failed (not the job: it cannot raise)
            return [("result", index, key, {"index": index, "key": key, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                                       "outputs": [], "ran": [], "seconds": 0.0})]

    def _lose(self, wid: int, exc: BaseException) -> None:
        actor = self._actors.pop(wid, None)
        self._ready.discard(wid)
        self._pid.pop(wid, None)
        if actor is not None:
            try:
                self.ray.kill(actor)
            except Exception:  # noqa: BLE001 - it is dead already
                pass
        if self.restarts < self.max_restarts:
            self.restarts += 1
            self._spawn()

    def abort(self) -> None:
        """The driver gave up its jobs in flight (Ctrl-C, stop): busy actors finish theirs, and
        the driver drops what they send."""

    def close(self) -> None:
        for actor in self._actors.values():
            try:
                self.ray.kill(actor)
            except Exception:  # noqa: BLE001
                pass
        self._actors.clear()
        self._starting.clear()
        self._running.clear()
        self._ready.clear()
        self._job.clear()
        if self._disconnect and self.ray.is_initialized():
            self.ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
