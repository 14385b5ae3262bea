"""Batch throughput: a sweep of the default graph's seed run serially (one in-process worker),
on `local` worker processes and on Ray actors (a Ray instance of this machine), in one run.

Each backend is started and warmed by a 2-job sweep first (its start-up is reported apart),
then every round sweeps `--jobs` fresh seeds on each backend, the backends' order rotating from
round to round; the figures are medians over rounds. Per-job overhead is what the driver sees
beyond the job's own run (turnaround minus the worker's run time), median over all jobs.

    PYTHONPATH=. python bench/batch.py --jobs 32 --rounds 2 --out bench/results/batch.json

Ray's servers listen on every interface, so the bench runs itself inside a network namespace
that holds only loopback (app.batch.loopback) and refuses to start Ray where it cannot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT = REPO / "resources" / "graphs" / "default.loom"


def _sweep(first: int, count: int, sets):
    from app.batch import Sweep, parse_axis, plan_batch

    return plan_batch(str(DEFAULT), Sweep([parse_axis(f"Sampler.seed={first}..{first + count - 1}")]), sets)


def _start(name: str, workers: int, options: dict):
    from app.batch.local import InProcessBackend, LocalBackend

    if name == "serial":
        return InProcessBackend(options)
    if name == "local":
        return LocalBackend(workers, options)
    from app.batch.ray_backend import RayBackend

    return RayBackend(workers, options)


def _run(backend, plan, out: Path) -> dict:
    from app.batch import run_batch

    t0 = time.perf_counter()
    res = run_batch(plan, out, backend, timeout=3600, sheet=False)
    wall = time.perf_counter() - t0
    if not res.ok:
        raise SystemExit(f"a bench sweep did not finish: {res.counts}")
    over = [r["turnaround"] - r["seconds"] for r in res.records]
    return {"seconds": round(wall, 3), "jobs_per_minute": round(60.0 * len(res.records) / wall, 3),
            "job_seconds_median": round(statistics.median(r["seconds"] for r in res.records), 4),
            "overhead_ms_median": round(1000 * statistics.median(over), 2),
            "workers_used": len({r["worker"] for r in res.records})}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="override Sampler.steps (default: the graph's 20)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from app.batch.loopback import isolated, loopback_only_command

    if not isolated():
        command = loopback_only_command([sys.executable, *sys.argv])
        if command is None:
            print("bench/batch.py: no network namespace here (needs unshare and ip): not starting Ray "
                  "where it would listen beyond loopback", file=sys.stderr)
            return 2
        import subprocess

        return subprocess.run(command, check=False).returncode
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    import torch

    torch.set_num_threads(1)
    import ray

    # Ray runs its workers at nice 15 (so its own daemons stay responsive); local workers run at
    # the driver's niceness, so on a shared machine Ray's would lose the CPU to everything else
    # (measured here: the same job 3x slower). The bench compares the backends, not the nicenesses.
    ray.init(num_cpus=args.workers, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             logging_level="ERROR", _system_config={"worker_niceness": 0})
    sets = [f"Sampler.steps={args.steps}"] if args.steps else []
    options = {"disk_cache": False}
    names = ["serial", "local", "ray"]
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="loomwork-bench-batch-"))
    backends, startup = {}, {}
    for i, name in enumerate(names):
        t0 = time.perf_counter()
        backends[name] = _start(name, args.workers, options)
        _run(backends[name], _sweep(90_000 + 10 * i, 2, sets), tmp / f"warm-{name}")
        startup[name] = round(time.perf_counter() - t0, 2)
        print(f"{name}: started and warm in {startup[name]}s", file=sys.stderr, flush=True)
    rounds = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % 3:] + names[:r % 3]
        for name in order:
            row = _run(backends[name], _sweep(1000 * r, args.jobs, sets), tmp / f"r{r}-{name}")
            rounds[name].append(row)
            print(f"round {r} {name}: {row}", file=sys.stderr, flush=True)
    for b in backends.values():
        b.close()
    ray.shutdown()

    def med(name, key):
        return round(statistics.median(row[key] for row in rounds[name]), 3)

    jpm = {n: med(n, "jobs_per_minute") for n in names}
    result = {
        "bench": "batch", "graph": "resources/graphs/default.loom", "jobs": args.jobs, "rounds": args.rounds,
        "workers": args.workers, "steps": args.steps or 20, "torch_threads_per_worker": 1,
        "cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "note": ("noisy: a shared 2-core machine running other jobs and a training run (see the load "
                 "averages); compare the ratios, measured side by side in one run, not the seconds. "
                 "Throughput is of warm backends (each started and warmed by a 2-job sweep first, "
                 "its start-up under startup_seconds); serial is one in-process worker on the same "
                 "JobRunner path; overhead = driver turnaround minus the worker's own run time."),
        "startup_seconds": startup,
        "jobs_per_minute": jpm,
        "ratio_vs_serial": {n: round(jpm[n] / jpm["serial"], 3) for n in names},
        "ray_vs_local": round(jpm["ray"] / jpm["local"], 3),
        "job_seconds_median": {n: med(n, "job_seconds_median") for n in names},
        "per_job_overhead_ms_median": {n: med(n, "overhead_ms_median") for n in names},
        "ray_minus_local_overhead_ms": round(med("ray", "overhead_ms_median") - med("local", "overhead_ms_median"), 2),
        "rounds_raw": rounds,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
