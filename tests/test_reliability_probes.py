"""Cancel and kill -9 probes, at a few repetitions (bench/reliability.py runs the same probe
functions at full count: 100 cancels, 20 kills; the app's probes are in
test_reliability_app_probes.py).

- Cancel storm: runs cancelled at random moments never leave a result that a later run serves
  wrong: every re-run (same executor, and a fresh one on the same disk cache) gives the pixels of
  a clean run.
- kill -9 of a headless `loomwork run`, at random moments and inside a write of the disk cache
  or of the output PNG: no half-written PNG under a final name, no entry the next run serves
  wrong (its pixels equal a clean run's).

Every loop is bounded in count and time; every subprocess is reaped.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest, when the bench imports this file

from conftest import txt2img_graph  # noqa: E402


# -- shared ---------------------------------------------------------------------------------
def probe_graph(model: str, seed: int, *, size: int = 32, steps: int = 6, save: bool = False):
    """txt2img on `model`; a SaveImage (prefix "probe") or a PreviewImage at the end."""
    from nodes.registry import add_node

    g, ids = txt2img_graph(model, seed=seed, size=size, steps=steps, save=False)
    out = add_node(g, "SaveImage" if save else "PreviewImage", {"prefix": "probe"} if save else {},
                   title="Out", pos=(800, 0)).id
    g.connect(ids["decode"], "image", out, "image")
    ids["out"] = out
    return g, ids


def run_images(executor, graph, cancel: Optional[threading.Event] = None, output_dir=None):
    """(report, the output node's image tensor or None)."""
    from app.engine import EngineEvents

    got = []
    events = EngineEvents(images=lambda _nid, images, _paths: got.append(images.detach().clone()))
    report = executor.run(graph, events=events, cancel=cancel, output_dir=output_dir)
    return report, (got[0] if got else None)


def _same(a, b) -> bool:
    import torch

    return a is not None and b is not None and a.shape == b.shape and bool(torch.equal(a, b))


def _temp_files(*folders: Path) -> set[Path]:
    return {p for f in folders if f.exists() for p in f.rglob(".*.tmp")}


def damaged_cache_entries(cache: Path) -> int:
    """Entries whose files do not read back (each is a miss for the executor, never served)."""
    from safetensors.torch import load_file

    bad = 0
    for meta_path in cache.glob("*/*.json"):
        try:
            meta = json.loads(meta_path.read_text())
            data = meta_path.with_suffix(".safetensors")
            if "values" in meta and data.exists():
                load_file(str(data))
        except Exception:  # noqa: BLE001 - any unreadable file counts
            bad += 1
    return bad


# -- cancel storm ---------------------------------------------------------------------------
def cancel_storm(model: str, cancels: int, cache: Path, rng: random.Random, *, size: int = 32,
                 steps: int = 6, fresh_every: int = 5, seconds: float = 1800.0) -> dict:
    """`cancels` runs, each of a new seed, cancelled after a random part of a run's time; after
    each, a re-run on the same executor (what the cancelled run left in memory and on disk) and,
    every `fresh_every`, one on a fresh executor over the same disk cache, compared with a clean
    run of that seed (an executor that is never cancelled and has no disk cache)."""
    from app.engine import Executor

    storm = Executor(device="cpu", disk_cache=cache)
    clean = Executor(device="cpu", disk_cache=False)
    run_images(storm, probe_graph(model, 10_000, size=size, steps=steps)[0])  # model loaded
    span = run_images(storm, probe_graph(model, 10_001, size=size, steps=steps)[0])[0].seconds
    out = {"cancels": 0, "cancelled_runs": 0, "finished_before_cancel": 0, "reruns_checked": 0,
           "fresh_executor_reruns_checked": 0, "mismatched": 0, "rerun_failed": 0, "hung": 0,
           "damaged_entries_on_disk": 0, "run_seconds": round(span, 3), "stopped_by_time_limit": False}
    deadline = time.monotonic() + seconds
    for i in range(cancels):
        if time.monotonic() > deadline:
            out["stopped_by_time_limit"] = True
            break
        graph, _ = probe_graph(model, i, size=size, steps=steps)
        cancel, box = threading.Event(), {}
        worker = threading.Thread(target=lambda g=graph, c=cancel, b=box: b.update(r=run_images(storm, g, c)),
                                  daemon=True)
        worker.start()
        time.sleep(rng.uniform(0.0, span))
        cancel.set()
        worker.join(timeout=max(60.0, 20 * span))
        out["cancels"] += 1
        if worker.is_alive():
            out["hung"] += 1
            break
        out["cancelled_runs" if box["r"][0].cancelled else "finished_before_cancel"] += 1
        _, reference = run_images(clean, graph)
        checks = [("reruns_checked", storm)]
        if (i + 1) % fresh_every == 0:
            checks.append(("fresh_executor_reruns_checked", Executor(device="cpu", disk_cache=cache)))
        for name, ex in checks:
            report, image = run_images(ex, graph)
            out[name] += 1
            out["rerun_failed"] += not report.ok
            out["mismatched"] += not _same(image, reference)
    out["damaged_entries_on_disk"] = damaged_cache_entries(cache)
    return out


# -- kill -9 of `loomwork run` --------------------------------------------------------------
# The child is `loomwork run` itself (app.main.main) with an audit hook that, for the kills
# aimed inside a write, says on stdout when a file under LOOMWORK_PROBE_WATCH has been written
# and is about to be given its final name (the chmod and rename of an atomic write; a writer
# that wrote in place would be caught with its file half done) and holds it there for
# LOOMWORK_PROBE_PAUSE seconds, so the parent's kill -9 lands inside the write. Python's audit
# hooks see these calls whoever makes them.
KILL_CHILD = r"""
import os, sys, time
watch, pause = os.environ.get("LOOMWORK_PROBE_WATCH", ""), float(os.environ.get("LOOMWORK_PROBE_PAUSE", "0"))
report = os.dup(1)
def hook(event, args):
    if not watch or event not in ("os.chmod", "os.rename"):
        return
    path = args[0]
    if isinstance(path, int):
        return
    path = os.fsdecode(path)
    if path.startswith(watch):
        os.write(report, ("WRITE " + event + " " + path + "\n").encode())
        time.sleep(pause)
sys.addaudithook(hook)
from app.main import main
sys.exit(main(sys.argv[1:]))
"""

KILL_MODES = ("random", "cache-write", "png-write")


def _child_env(tree: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOMWORK_PROBE")}
    env.update({"PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
                "HF_HUB_OFFLINE": "1", "LOOMWORK_THREADS": "1", **extra})
    return env


def _reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a kill -9'd process is gone within seconds
        pass
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _cli_run(tree: Path, graph_file: Path, out: Path, cache: Path, seed: int, *, mode: str,
             kill_at: Optional[float], write_number: int, delay: float, pause: float,
             timeout: float) -> dict:
    """One `loomwork run` child: killed at `kill_at` seconds (random mode), or `delay` seconds
    after its `write_number`-th write under the watched folder was announced. `timed_out` (a
    hang) is by the clock: the child was still alive `timeout` seconds after it started."""
    watch = {"cache-write": str(cache), "png-write": str(out)}.get(mode, "")
    # stderr to a file, not a pipe nobody reads: a child filling the pipe would block (a false hang)
    with open(out.parent / f"run-{seed}.stderr", "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_CHILD, "run", str(graph_file), "--out", str(out),
             "--set", f"Sampler.seed={seed}"],
            cwd=str(tree), stdout=subprocess.PIPE, stderr=stderr,
            env=_child_env(tree, LOOMWORK_CACHE_DIR=str(cache), LOOMWORK_PROBE_WATCH=watch,
                           LOOMWORK_PROBE_PAUSE=str(pause)))
    started, writes, killed, buffer = time.monotonic(), 0, False, b""
    try:
        while proc.poll() is None and time.monotonic() - started < timeout:
            if kill_at is not None and time.monotonic() - started >= kill_at:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            ready, _, _ = select.select([proc.stdout], [], [], 0.005)
            if not ready:
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buffer += chunk
            writes = buffer.count(b"WRITE ")
            if watch and writes >= write_number:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
        if not killed and proc.poll() is None:
            # stdout closed: the child is exiting; wait for it up to the deadline, not kill it
            try:
                proc.wait(timeout=max(0.0, timeout - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                pass
        timed_out = not killed and proc.poll() is None
        seconds = time.monotonic() - started
    finally:
        _reap(proc)
    return {"killed": killed, "returncode": proc.returncode, "timed_out": timed_out, "seconds": seconds}


def _png_problems(out: Path, references: dict) -> int:
    """PNGs under final names that are not whole, or whose pixels differ from a clean run's."""
    import numpy as np
    from PIL import Image

    from app.graph import GraphFileError, load
    from nodes import registry

    bad = 0
    for path in out.glob("[!.]*.png"):
        try:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"))
            graph = load(str(path), registry.get)
            seed = next(n.params["seed"] for n in graph.nodes.values() if n.type == "Sampler")
            if not np.array_equal(pixels, references[seed]):
                bad += 1
        except (OSError, ValueError, GraphFileError, KeyError, StopIteration):
            bad += 1
    return bad


def kill_probe(model: str, kills: int, work: Path, rng: random.Random, *, tree: Path = REPO,
               size: int = 32, steps: int = 6, pause: float = 0.5, seconds: float = 1800.0,
               max_retries: Optional[int] = None) -> dict:
    """`kills` kill -9s of `loomwork run` (a new seed each attempt), modes in turn: at a random
    moment of a run, inside a disk-cache write, inside the output PNG's write. An attempt whose
    run finished before its kill is retried with a new seed (at most `max_retries` times in all,
    default `kills`), a random kill time then drawn within the last finished run's time. After
    each attempt: every PNG under a final name is whole and shows a clean run's pixels, and a run
    in a fresh executor over the same disk cache gives a clean run's pixels."""
    import numpy as np

    from app.engine import Executor
    from app.graph import save
    from kernels.images import to_pil

    cache, out, verify = work / "cache", work / "out", work / "verify"
    graph, _ = probe_graph(model, 0, size=size, steps=steps, save=True)
    graph_file = work / "probe.loom"
    save(graph, graph_file)
    clean = Executor(device="cpu", disk_cache=False)
    references: dict[int, np.ndarray] = {}
    tensors: dict = {}

    def reference(seed: int):
        if seed not in tensors:
            g, _ = probe_graph(model, seed, size=size, steps=steps, save=True)
            tensors[seed] = run_images(clean, g, output_dir=work / "clean")[1]
            references[seed] = np.asarray(to_pil(tensors[seed])[0].convert("RGB"))
        return tensors[seed]

    reference(0)
    full = _cli_run(tree, graph_file, out, cache, 0, mode="none", kill_at=None, write_number=0,
                    delay=0, pause=0, timeout=600)
    span = full["seconds"]  # a random kill time is drawn within the latest finished run's time
    max_retries = kills if max_retries is None else max_retries
    result = {"kills": 0, "by_mode": {m: 0 for m in KILL_MODES}, "attempts": 0,
              "finished_before_kill": 0, "retried_attempts": 0, "failed_without_kill": 0,
              "left_a_temp_file": 0, "half_written_or_wrong_pngs": 0, "damaged_entries_on_disk": 0,
              "next_runs_checked": 0, "next_run_mismatched": 0, "next_run_failed": 0,
              "next_run_nodes_from_disk": 0, "hung": 0, "full_run_seconds": round(span, 2),
              "stopped_by_time_limit": False, "retries_exhausted": False}
    deadline = time.monotonic() + seconds
    seed = 0
    while result["kills"] < kills:
        if time.monotonic() > deadline:
            result["stopped_by_time_limit"] = True
            break
        if result["attempts"] >= kills + max_retries:
            result["retries_exhausted"] = True
            break
        seed, mode = seed + 1, KILL_MODES[result["kills"] % len(KILL_MODES)]
        before = _temp_files(cache, out)
        r = _cli_run(tree, graph_file, out, cache, seed, mode=mode,
                     kill_at=rng.uniform(0.2 * span, 0.9 * span) if mode == "random" else None,
                     write_number=rng.randint(1, 6) if mode == "cache-write" else rng.randint(1, 2),
                     delay=rng.uniform(0.0, 0.8 * pause), pause=pause, timeout=max(120.0, 4 * span))
        result["attempts"] += 1
        result["kills"] += r["killed"]
        result["by_mode"][mode] += r["killed"]
        result["hung"] += r["timed_out"]
        finished = not r["killed"] and r["returncode"] == 0
        result["finished_before_kill"] += finished
        result["failed_without_kill"] += not r["killed"] and not finished and not r["timed_out"]
        if finished:
            span = r["seconds"]
        result["retried_attempts"] += not r["killed"]  # the next attempt takes its place
        result["left_a_temp_file"] += bool(_temp_files(cache, out) - before)
        g, ids = probe_graph(model, seed, size=size, steps=steps, save=True)
        expected = reference(seed)
        result["half_written_or_wrong_pngs"] = _png_problems(out, references)
        report, image = run_images(Executor(device="cpu", disk_cache=cache), g, output_dir=verify)
        result["next_runs_checked"] += 1
        result["next_run_failed"] += not report.ok
        result["next_run_mismatched"] += not _same(image, expected)
        result["next_run_nodes_from_disk"] += sum(r.status == "cached-disk" for r in report.nodes.values())
    result["damaged_entries_on_disk"] = damaged_cache_entries(cache)
    result["temp_files_left"] = len(_temp_files(cache, out))
    return result


def test_the_disk_cache_removes_temp_files_a_killed_writer_left(tmp_path):
    from app.engine.cache import TEMP_GRACE_SECONDS, DiskCache

    folder = tmp_path / "ab"
    folder.mkdir()
    left, live = folder / ".ab12.safetensors.k3j_9x0q.tmp", folder / ".ab34.json.p0o1i2u3.tmp"
    left.write_bytes(b"half an entry")
    live.write_bytes(b"another process is writing this one")
    old = time.time() - TEMP_GRACE_SECONDS - 60
    os.utime(left, (old, old))
    DiskCache(tmp_path).put("ab" + "5" * 62, {"out": "hash"}, None)
    assert not left.exists() and live.exists()


def test_stale_temp_sweep_deletes_only_old_files_of_the_atomic_write_pattern(tmp_path):
    import tempfile

    from kernels.files import STALE_TEMP_SECONDS, atomic_write, sweep_stale_temps

    fd, ours = tempfile.mkstemp(prefix=".img_00001.png.", suffix=".tmp", dir=tmp_path)  # atomic_write's naming
    os.close(fd)
    fresh = tmp_path / ".img_00002.png.abcd1234.tmp"
    foreign = [tmp_path / ".notes.tmp", tmp_path / "photo.png.abcd1234.tmp", tmp_path / ".x.toolong123.tmp"]
    nested = tmp_path / "sub" / ".a.png.abcd1234.tmp"
    nested.parent.mkdir()
    old = time.time() - STALE_TEMP_SECONDS - 60
    for p in [fresh, *foreign, nested]:
        p.write_bytes(b"x")
    for p in [Path(ours), *foreign, nested]:
        os.utime(p, (old, old))
    assert sweep_stale_temps([tmp_path, tmp_path / "missing"]) == 1
    assert not Path(ours).exists() and fresh.exists() and nested.exists() and all(p.exists() for p in foreign)
    atomic_write(tmp_path / "done.png", b"png")
    assert sweep_stale_temps([tmp_path], max_age=0) == 1 and not fresh.exists()  # atomic_write leaves none


def test_saving_into_an_output_folder_removes_the_temp_files_killed_writers_left(tiny_pixel_model, tmp_path):
    from app.engine import Executor
    from kernels.files import STALE_TEMP_SECONDS

    out = tmp_path / "out"
    out.mkdir()
    left, live = out / ".loomwork_00003.png.a1b2c3d4.tmp", out / ".loomwork_00004.png.e5f6g7h8.tmp"
    for p in (left, live):
        p.write_bytes(b"half a png")
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(left, (old, old))
    g, _ids = txt2img_graph(tiny_pixel_model, steps=1, save=True)
    report = Executor(disk_cache=False).run(g, output_dir=out)
    assert report.ok and list(out.glob("*.png"))
    assert not left.exists() and live.exists()  # a writer may still be writing the young one


# -- tests ----------------------------------------------------------------------------------
def test_a_cancel_storm_never_leaves_a_result_that_is_served_wrong(tiny_pixel_model, tmp_path):
    r = cancel_storm(tiny_pixel_model, 10, tmp_path / "cache", random.Random(0), size=16, steps=8,
                     fresh_every=3, seconds=300)
    assert r["cancels"] == 10 and r["hung"] == 0 and not r["stopped_by_time_limit"]
    assert r["cancelled_runs"] >= 3  # the storm did cancel runs (not only finished ones)
    assert r["reruns_checked"] == 10 and r["fresh_executor_reruns_checked"] == 3
    assert r["mismatched"] == 0 and r["rerun_failed"] == 0 and r["damaged_entries_on_disk"] == 0


def test_kill_9_of_loomwork_run_leaves_no_half_png_and_no_served_corruption(tiny_pixel_model, tmp_path):
    r = kill_probe(tiny_pixel_model, 3, tmp_path, random.Random(0), size=16, steps=8, seconds=900)
    assert r["hung"] == 0 and not r["stopped_by_time_limit"] and not r["retries_exhausted"]
    assert r["kills"] == 3 and r["by_mode"] == {"random": 1, "cache-write": 1, "png-write": 1}
    assert r["attempts"] == 3 + r["retried_attempts"] == 3 + r["finished_before_kill"]  # runs that beat their kill were retried
    assert r["left_a_temp_file"] >= 2  # ... inside the writes: their files were left unfinished
    assert r["half_written_or_wrong_pngs"] == 0
    assert r["next_runs_checked"] == r["attempts"] and r["next_run_failed"] == 0 and r["next_run_mismatched"] == 0
    assert r["next_run_nodes_from_disk"] > 0  # the next runs did read what the killed ones wrote
