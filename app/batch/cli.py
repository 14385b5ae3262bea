"""`loomwork batch`: the sweep from the command line (or the graph's stored one), the backend
from `--cluster`, progress one line per job."""

from __future__ import annotations

import sys
from pathlib import Path


def make_backend(cluster: str, workers, options: dict, *, cpus: float = 1, gpus: float = 0, memory=None):
    """The backend `--cluster` names: `local` processes, or Ray (`auto`: RAY_ADDRESS or a Ray
    already connected; `ray://HOST:PORT`). `auto` without a cluster to join runs locally."""
    import os

    from .local import LocalBackend, worker_count
    from .runner import BatchError

    if cluster == "local":
        return LocalBackend(worker_count(workers), options)
    if cluster == "auto" or cluster.startswith("ray://"):
        from .ray_backend import RayBackend, connect, import_ray

        if cluster == "auto" and not os.environ.get("RAY_ADDRESS"):
            try:
                ray = import_ray()
            except BatchError:
                ray = None
            if ray is None or not ray.is_initialized():
                print("no RAY_ADDRESS: running on this machine (--cluster local)", file=sys.stderr)
                return LocalBackend(worker_count(workers), options)
        joined = connect(cluster)
        return RayBackend(workers, options, num_cpus=cpus, num_gpus=gpus, memory=memory, disconnect=joined)
    raise BatchError(f"--cluster {cluster!r}: expected local, auto or ray://HOST:PORT")


def _byte_size(text):
    if text is None:
        return None
    from app.cli.headless import UsageError
    from kernels.memory import parse_bytes

    try:
        return parse_bytes(text, "--memory-per-job")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_batch(args) -> int:
    from app.cli.headless import EXIT_FAILED, EXIT_OK, UsageError, _load, model_roots

    from .manifest import ManifestError
    from .runner import BatchError, plan_batch, run_batch
    from .sweep import Sweep, SweepError, parse_axis, read_sweep_file, save_sweep, stored_sweep

    if args.retries < 0:
        raise UsageError(f"--retries {args.retries}: give 0 or more")
    graph = _load(args.graph)
    try:
        if args.sweep:
            sweep = Sweep([parse_axis(s, Path.cwd()) for s in args.sweep], "zip" if args.zip else "cross")
        elif args.sweep_file:
            sweep = read_sweep_file(args.sweep_file)
        else:
            sweep = stored_sweep(graph, args.graph)
            if sweep is None:
                raise SweepError(f"{args.graph}: no sweep: give --sweep NODE.PARAM=VALUES (or keep one in "
                                 f"the graph's meta or in {Path(args.graph).stem}.sweep.json beside it)")
        plan = plan_batch(args.graph, sweep, args.set or [], graph=graph)
        if args.save_sweep:
            print(f"sweep saved in {save_sweep(sweep, args.graph, args.save_sweep)}", file=sys.stderr)
        options = {"disk_cache": not args.no_disk_cache, "model_roots": model_roots(args) or None}
        backend = make_backend(args.cluster, args.workers, options, cpus=args.cpus_per_job,
                               gpus=args.gpus_per_job, memory=_byte_size(args.memory_per_job))
    except (SweepError, BatchError) as exc:
        raise UsageError(str(exc)) from None
    total = len(plan.jobs)
    print(f"{total} jobs on {backend.name} with {backend.workers} workers -> {args.out}", file=sys.stderr)

    def on_event(kind, rec, manifest):
        if kind == "started":
            return
        done = manifest.counts()["done"]
        values = ", ".join(f"{k}={v!r}" for k, v in rec["overrides"].items())
        extra = f" ({rec['seconds']:.2f}s)" if kind == "done" and rec.get("seconds") is not None else ""
        err = f": {rec['error']}" if kind == "failed" and rec.get("error") else ""
        print(f"[{done}/{total}] job {rec['index']} {values} {kind}{extra}{err}", file=sys.stderr, flush=True)

    try:
        result = run_batch(plan, args.out, backend, max_attempts=args.retries + 1, on_event=on_event)
    except (ManifestError, BatchError) as exc:
        raise UsageError(str(exc)) from None
    finally:
        backend.close()
    c = result.counts
    print(f"{c['done']} done, {c['failed']} failed, {c['pending'] + c['running']} not run "
          f"({result.skipped} done before, {result.ran} this run) in {result.seconds:.1f}s; "
          f"{args.out}/results.json", file=sys.stderr)
    if result.interrupted:
        print("interrupted: rerun the same command to finish", file=sys.stderr)
        return 130
    return EXIT_OK if result.ok else EXIT_FAILED


def add_parser(sub, models_help: str) -> None:
    p = sub.add_parser("batch", help="render a graph over a sweep of param values (here or on Ray)")
    p.add_argument("graph")
    p.add_argument("--sweep", action="append", metavar="NODE.PARAM=VALUES",
                   help="an axis: A..B, A..B:STEP, @FILE (one value a line), a JSON list or a,b,c (repeatable)")
    p.add_argument("--zip", action="store_true", help="pair the axes' values side by side (default: every combination)")
    p.add_argument("--sweep-file", metavar="FILE", help="a sweep JSON file (default: the graph's stored sweep)")
    p.add_argument("--save-sweep", choices=("meta", "file"),
                   help="keep the sweep in the .loom file's meta, or as GRAPH.sweep.json beside it")
    p.add_argument("--set", action="append", metavar="NODE.PARAM=VALUE", help="an override for every job (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR", help="the batch folder: images, manifest, results")
    p.add_argument("--cluster", default="local", metavar="local|auto|ray://HOST:PORT",
                   help="local worker processes (default); auto: the Ray cluster in RAY_ADDRESS; ray://HOST:PORT")
    p.add_argument("--workers", type=int, metavar="N",
                   help="workers (local: default one per core up to 4; Ray: what the cluster holds)")
    p.add_argument("--retries", type=int, default=2, metavar="N", help="retries of a failed job over reruns (default 2)")
    p.add_argument("--cpus-per-job", type=float, default=1, metavar="N", help="Ray: CPUs each worker asks for")
    p.add_argument("--gpus-per-job", type=float, default=0, metavar="N", help="Ray: GPUs each worker asks for")
    p.add_argument("--memory-per-job", metavar="SIZE", help="Ray: memory each worker asks for (e.g. 6G)")
    p.add_argument("--no-disk-cache", action="store_true", help="workers do not read or write the disk cache")
    p.add_argument("--models", action="append", metavar="DIR", help=models_help)
    p.set_defaults(func=cmd_batch)
