"""Batch runs on worker processes and on a local Ray cluster started here: a 16-job seed sweep
equals 16 serial `loomwork run` calls pixel for pixel; a worker killed mid-sweep costs one retry
and every job still finishes exactly once; an interrupted sweep resumes with only the missing
jobs. The same checks for `local` and `ray`; each backend (two workers) serves all its tests, as
one would serve several sweeps from the app. Every wait is bounded (run_batch's timeout).

Ray's servers listen on every interface, so the Ray checks run in a second pytest inside a
network namespace that holds only loopback (app.batch.loopback); this file's own run checks
`local` and starts that one."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.batch import Sweep, parse_axis, plan_batch, run_batch
from app.batch.local import LocalBackend
from app.batch.loopback import isolated, loopback_only_command

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "resources" / "graphs" / "default.loom"
STEPS = "Sampler.steps=2"  # the default graph's 20 steps would make the file minutes long
TIMEOUT = 300.0


def _pixels(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOMWORK_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def serial(tmp_path_factory, started):
    """Seed -> pixels of `loomwork run default.loom --set Sampler.seed=SEED` (16 runs in turn),
    made while the backends' workers start."""
    from app.cli import main

    out = tmp_path_factory.mktemp("serial")
    images = {}
    for seed in range(16):
        folder = out / str(seed)
        assert main(["run", str(DEFAULT), "--set", STEPS, "--set", f"Sampler.seed={seed}", "--out", str(folder),
                     "--no-disk-cache"]) == 0
        (png,) = folder.glob("*.png")
        images[seed] = _pixels(png)
    return images


@pytest.fixture(scope="module")
def local():
    backend = LocalBackend(2, {"disk_cache": False})
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray instance of 2 CPUs for this module, shut down after it."""
    ray = pytest.importorskip("ray")
    saved = os.environ.get("PYTHONPATH")
    # the workers Ray starts import this tree, not an installed copy
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), saved) if p)
    for attempt in range(2):  # Ray gives its raylet 30 s to come up, which a loaded machine can miss
        try:
            ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                     logging_level="ERROR")
            break
        except Exception:
            ray.shutdown()
            if attempt:
                raise
    try:
        yield ray
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def ray_backend(ray_cluster):
    from app.batch.ray_backend import RayBackend

    backend = RayBackend(2, {"disk_cache": False})
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def started(request, local):
    """Both backends' workers asked to start before the serial runs (they come up meanwhile);
    Ray's first, since its own start has a time limit."""
    if isolated():
        request.getfixturevalue("ray_backend").start()
    else:
        request.getfixturevalue("local").start()


# Inside the loopback-only namespace the checks run on Ray; outside, on local workers.
@pytest.fixture(params=["ray"] if isolated() else ["local"])
def backend(request):
    return request.getfixturevalue("local" if request.param == "local" else "ray_backend")


@pytest.mark.skipif(isolated(), reason="this is the run inside the namespace")
def test_the_same_checks_on_a_local_ray_cluster_reachable_from_loopback_only():
    pytest.importorskip("ray")
    argv = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__]
    command = loopback_only_command(argv)
    if command is None:
        pytest.skip("no network namespace here (needs unshare and ip, as root or with user "
                    "namespaces): Ray is not started where it would listen beyond loopback")
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=2 * TIMEOUT + 600,
                          check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert " passed" in done.stdout and "3 passed" in done.stdout, done.stdout[-2000:]


def _plan(seeds: str):
    return plan_batch(str(DEFAULT), Sweep([parse_axis(f"Sampler.seed={seeds}")]), [STEPS])


def _seed(rec):
    return rec["overrides"]["Sampler.seed"]


def test_sixteen_seed_sweep_equals_sixteen_serial_runs(backend, serial, tmp_path):
    res = run_batch(_plan("0..15"), tmp_path / "out", backend, timeout=TIMEOUT)
    assert res.ok and res.ran == 16 and res.lost == 0, res.counts
    for rec in res.records:
        (out,) = rec["outputs"]
        assert np.array_equal(_pixels(tmp_path / "out" / out), serial[_seed(rec)]), rec
    workers = {rec["worker"] for rec in res.records}
    loads = [rec for rec in res.records if "Load ShapesT2I" in rec["ran"]]
    assert len(loads) <= len(workers) <= 2  # the model loads once per worker, not once per job
    assert len(list((tmp_path / "out" / "images").iterdir())) == 16


def test_a_worker_killed_mid_sweep_is_retried_and_every_job_finishes_once(backend, serial, tmp_path):
    killed = []

    def kill_the_busy_worker(kind, rec, manifest):
        if kind != "done" or killed:
            return
        busy, pids = backend.busy(), backend.pids()
        for wid, index in busy.items():
            if wid in pids:
                os.kill(pids[wid], signal.SIGKILL)
                killed.append(index)
                return

    # seeds no earlier test rendered: the workers' caches hold none of them, so each job samples
    res = run_batch(_plan("100..107"), tmp_path / "out", backend, on_event=kill_the_busy_worker, timeout=TIMEOUT)
    assert killed, "no worker was busy when the first job finished"
    assert res.ok and res.lost == 1 and res.counts["done"] == 8, res.counts
    # the job lost is the one the worker held when it died: the job `busy` named, or (on a loaded
    # machine) the next one, when the named job's result was already sent before the kill
    (victim,) = [r for r in res.records if r["lost"] == 1]
    assert victim["index"] >= killed[0] and victim["attempts"] == 2
    assert all(r["attempts"] == 1 and r["lost"] == 0 for r in res.records if r is not victim)
    files = sorted(p.name for p in (tmp_path / "out" / "images").iterdir())
    assert len(files) == 8 and sorted(f for r in res.records for f in r["outputs"]) == [f"images/{f}" for f in files]


def test_an_interrupted_sweep_resumes_with_only_the_missing_jobs(backend, serial, tmp_path):
    plan = _plan("200..207")
    finished = []

    def ctrl_c_after_three(kind, rec, manifest):
        if kind == "done":
            finished.append(rec["index"])
            if len(finished) == 3:
                raise KeyboardInterrupt

    first = run_batch(plan, tmp_path / "out", backend, on_event=ctrl_c_after_three, timeout=TIMEOUT)
    assert first.interrupted and first.counts["done"] == 3 and first.counts["running"] == 0
    done_first = {r["index"] for r in first.records if r["status"] == "done"}
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "images").iterdir()}
    started = []
    second = run_batch(plan, tmp_path / "out", backend, timeout=TIMEOUT,
                       on_event=lambda kind, rec, m: kind == "started" and started.append(rec["index"]))
    assert second.ok and second.skipped == 3
    assert sorted(started) == sorted(set(range(8)) - done_first)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert len(list((tmp_path / "out" / "images").iterdir())) == 8
