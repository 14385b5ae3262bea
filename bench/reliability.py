"""Reliability benchmark: prints JSON (and writes it with --out).

- fuzz: the graph-file fuzzer's cases (tests/test_fuzz_graphs.py: mutated .loom files and PNGs
  with embedded graphs) in bulk, counted: loaded, refused cleanly (GraphFileError), crashed (any
  other exception; by kind), hung (past the case limit). With --before REF the same cases run
  against the code at git REF too (a temporary worktree), in a child process.
- validation: seconds to validate a graph of 5,000 and 20,000 nodes (a random tree of
  ImageScale nodes under a LoadImage, so many nodes are ready at once), median of interleaved
  repeats in child processes; with --before, the code at REF once per size, stopped at
  --before-timeout seconds (reported as a lower bound).

- rss: one process runs a small txt2img graph of the shipped ShapesT2I (--rss-size pixels,
  2 steps) --rss-runs times, a new seed each run (so every run adds results to the memory
  cache, whose budget --rss-memory-budget sets), in a child process; the RSS after
  --rss-warmup runs and at the end, the growth in percent, and whether the memory cache's
  accounted bytes equal the sizes of what it holds. Each size and budget is its own entry.
- run_memory: the Sampler's working memory per pixel that kernels.run_memory's floor is taken
  from: the peak RSS of a one-step guided ShapesT2I run at each --act-sizes side over a 16x16
  run, in a child process per size.
- refusals: the hostile resource cases (an 8192 canvas, the same decoded and scaled x16, a
  header-only 13000^2 PNG and 9400^2 RGBA16 PNG, a 50 MB prompt) each run once under the run
  budget --refusal-budget (default: this machine's), in a child process: refused before running
  (by the memory estimate or the prompt cap) or not, the estimated memory, the seconds to refuse
  and the child's peak RSS.
- repetition: the rss section at 128 px over 200 runs (--rss-size 128 --rss-runs 200).
- cancel_storm: --cancels runs of a tiny random-weight model, each cancelled at a random moment,
  each followed by a re-run on the same executor (and every 5th by one on a fresh executor over
  the same disk cache) compared pixel by pixel with a clean run.
- kill: --kills kill -9s of a headless `loomwork run` child, in turn at a random moment, inside
  a disk-cache write and inside the output PNG's write (an attempt whose run finished before
  its kill is retried with a new seed, at most --kills retries; `attempts`, `retried_attempts`);
  after each attempt, the PNGs under final names are checked whole and right, and a fresh
  executor's run over the same disk cache is compared with a clean run.
- app_kill: --app-kills times the app (offscreen) is edited on a timer for 6-15 s and killed
  with SIGKILL: the seconds of edits lost, and whether the next start offers the autosave back.
  With --before, the code at REF too.
The probe functions are tests/test_reliability_probes.py's and test_reliability_app_probes.py's
(whose tests run them a few times).

--sections picks sections; with --out, the sections not run keep their numbers in the file.

Usage: python bench/reliability.py [--cases 10000] [--before main] [--sections rss kill] [--out bench/results/reliability.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FUZZ_CHILD = r"""
import collections, json, random, sys, tempfile, traceback, pathlib
sys.path.insert(0, sys.argv[1])          # the code under test
sys.path.insert(1, sys.argv[2])          # the fuzzer's cases (this tree's tests/)
import test_fuzz_graphs as fuzz
counts, kinds = collections.Counter(), collections.Counter()
path = pathlib.Path(tempfile.mkdtemp()) / "case"
for i in range(int(sys.argv[3])):
    try:
        counts[fuzz.run_case(random.Random(i), path)] += 1
    except fuzz.Hang:
        counts["hung"] += 1
    except Exception as exc:
        counts["crashed"] += 1
        where = traceback.extract_tb(exc.__traceback__)[-1]
        kinds[f"{type(exc).__name__} at {pathlib.Path(where.filename).name}:{where.lineno}"] += 1
print(json.dumps({"counts": counts, "crash_kinds": dict(kinds.most_common())}))
"""

VALIDATE_CHILD = r"""
import random, sys, time, json
sys.path.insert(0, sys.argv[1])
from app.graph import Graph, validate
from nodes import registry
from nodes.registry import add_node
n = int(sys.argv[2])
rng = random.Random(0)
g = Graph()
ids = [add_node(g, "LoadImage", {"path": "x.png"}, pos=(0, 0)).id]
for i in range(1, n):
    node = add_node(g, "ImageScale", {}, pos=(rng.random() * 1000, rng.random() * 1000))
    g.connect(ids[rng.randrange(len(ids))], "image", node.id, "image")
    ids.append(node.id)
t = time.perf_counter()
problems = validate(g, registry.get)
print(json.dumps({"seconds": time.perf_counter() - t, "problems": len(problems)}))
"""


RSS_CHILD = r"""
import gc, json, sys, torch, psutil
sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[1] + "/tests")
torch.set_num_threads(1)
from conftest import txt2img_graph
from app.engine import Executor
from app.engine.hashing import size_of
from nodes.registry import add_node
runs, warmup, size = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
budget = {"memory_budget": int(sys.argv[5])} if sys.argv[5] != "default" else {}
ex, proc = Executor(device="cpu", disk_cache=False, **budget), psutil.Process()
def rss():
    gc.collect()
    return proc.memory_info().rss
start = None
# One graph whose seed moves on each run, as an artist's does in the app (seed control
# "increment"): the cache keeps each node's latest versions, not every result ever made.
g, ids = txt2img_graph("builtin:shapes-t2i", seed=0, save=False, size=size, steps=2)
pv = add_node(g, "PreviewImage", {}, pos=(900, 0)).id
g.connect(ids["decode"], "image", pv, "image")
for i in range(runs):
    g.set_param(ids["sampler"], "seed", i)
    assert ex.run(g).ok
    if i + 1 == warmup:
        start, cache_start = rss(), ex.memory.used
end = rss()
held = sum(size_of(e.values) for e in ex.memory._entries.values())
print(json.dumps({"rss_after_warmup_mb": start / 2**20, "rss_end_mb": end / 2**20,
                  "cache_after_warmup_mb": cache_start / 2**20, "cache_end_mb": ex.memory.used / 2**20,
                  "cache_entries": len(ex.memory._entries), "accounted_equals_held": held == ex.memory.used}))
"""

ACT_CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[1] + "/tests")
torch.set_num_threads(1)
from conftest import txt2img_graph
from app.engine import Executor
size = int(sys.argv[2])
ex = Executor(device="cpu", disk_cache=False, run_budget="1T")
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
g, ids = txt2img_graph("builtin:shapes-t2i", seed=0, save=False, size=16, steps=1)
assert ex.run(g, [ids["sampler"]]).ok
base = peak()
g, ids = txt2img_graph("builtin:shapes-t2i", seed=0, save=False, size=size, steps=1)
assert ex.run(g, [ids["sampler"]]).ok
print(json.dumps({"bytes_per_pixel": (peak() - base) / (size * size)}))
"""


REFUSAL_CHILD = r"""
import json, re, resource, struct, sys, tempfile, time, zlib, torch
sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[1] + "/tests")
torch.set_num_threads(1)
from conftest import txt2img_graph
from app.engine import Executor
from app.graph import Graph
from nodes.registry import add_node
case, work = sys.argv[2], tempfile.mkdtemp()
def png_declaring(width, height, bits, colour_type):  # a header-only PNG: its pixels are not there
    chunk = lambda k, d: struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d))
    path = work + "/big.png"
    header = struct.pack(">IIBBBBB", width, height, bits, colour_type, 0, 0, 0)
    open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                           + chunk(b"IDAT", zlib.compress(b"\0" * 200)) + chunk(b"IEND", b""))
    return path
def preview(g, src):
    pv = add_node(g, "PreviewImage", {}, pos=(1200, 0)).id
    g.connect(src, "image", pv, "image")
model = "builtin:shapes-t2i"
if case in ("canvas 8192", "canvas 8192 decoded, scaled x16", "prompt 50 MB"):
    size, prompt = (16, "a red circle " * 4_000_000) if case == "prompt 50 MB" else (8192, "a red circle")
    g, ids = txt2img_graph(model, size=size, steps=2, save=False, prompt=prompt)
    preview(g, ids["decode"])
    if case.startswith("canvas 8192 decoded"):
        scale = add_node(g, "ImageScale", {"factor": 16.0, "method": "nearest"}, pos=(800, 300)).id
        g.connect(ids["decode"], "image", scale, "image")
        preview(g, scale)
else:
    w, bits, colour = {"png 13000 (493 KB bomb)": (13000, 8, 2), "png 9400 RGBA16": (9400, 16, 6)}[case]
    g = Graph()
    load = add_node(g, "LoadImage", {"path": png_declaring(w, w, bits, colour)}).id
    preview(g, load)
ex = Executor(device="cpu", disk_cache=False, **({"run_budget": sys.argv[3]} if sys.argv[3] != "default" else {}))
t = time.perf_counter()
report = ex.run(g, output_dir=work)
seconds = time.perf_counter() - t
errors = [r.error for r in report.nodes.values() if r.status == "failed"]
need = re.search(r"would need about ([\d.]+ \w+)", errors[0]) if errors else None
refused = any("would need about" in e or "are read" in e for e in errors)  # the budget's or the prompt cap's
print(json.dumps({"refused_before_running": refused and report.sampler_steps == 0, "seconds": round(seconds, 3),
                  "estimated": need.group(1) if need else None, "run_budget_bytes": ex.run_budget,
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "message": errors[0][:400] if errors else None}))
"""

REFUSAL_CASES = ("canvas 8192", "canvas 8192 decoded, scaled x16", "png 13000 (493 KB bomb)", "png 9400 RGBA16",
                 "prompt 50 MB")


def refusals(trees: dict[str, Path], budget: str) -> dict:
    """Each hostile resource case of the probe, run under run budget `budget` in a child process."""
    return {side: {case: _child(REFUSAL_CHILD, [str(tree), case, budget], timeout=900) for case in REFUSAL_CASES}
            for side, tree in trees.items()}


def rss_growth(tree: Path, runs: int, warmup: int, size: int, memory_budget: str) -> dict:
    r = _child(RSS_CHILD, [str(tree), str(runs), str(warmup), str(size), memory_budget], timeout=4 * 3600)
    growth = 100 * (r["rss_end_mb"] - r["rss_after_warmup_mb"]) / r["rss_after_warmup_mb"]
    return {"runs": runs, "warmup_runs": warmup, "size": size, "steps": 2, "new_seed_each_run": True,
            "memory_cache_budget": memory_budget,
            **{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()},
            "rss_growth_percent_after_warmup": round(growth, 2)}


def sampler_working_memory(sizes: list[int]) -> dict:
    from kernels.run_memory import SAMPLER_BYTES_PER_PIXEL

    measured = {str(n): round(_child(ACT_CHILD, [str(ROOT), str(n)], timeout=3600)["bytes_per_pixel"])
                for n in sizes}
    return {"model": "builtin:shapes-t2i", "steps": 1, "cfg": "guided (batch of 2)",
            "measured_bytes_per_pixel": measured, "floor_used": SAMPLER_BYTES_PER_PIXEL}


def _probes(module: str = "test_reliability_probes"):
    import importlib

    sys.path.insert(0, str(ROOT / "tests"))
    return importlib.import_module(module)


def _tiny_model(work: Path) -> str:
    from kernels.tiny import build_tiny_model

    return build_tiny_model(str(work / "tiny-pixel"))


def cancel_storm(cancels: int, size: int, steps: int) -> dict:
    import random

    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="loomwork-storm-"))
    started = time.perf_counter()
    r = _probes().cancel_storm(_tiny_model(work), cancels, work / "cache", random.Random(0), size=size,
                               steps=steps, seconds=3 * 3600)
    return {"model": "tiny random-weight pixel model", "size": size, "steps": steps, **r,
            "seconds": round(time.perf_counter() - started, 1)}


def kill_runs(kills: int, size: int, steps: int, seconds: float) -> dict:
    import random

    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="loomwork-kill-"))
    started = time.perf_counter()
    r = _probes().kill_probe(_tiny_model(work), kills, work, random.Random(0), size=size, steps=steps,
                             seconds=seconds)
    return {"model": "tiny random-weight pixel model", "size": size, "steps": steps, **r,
            "seconds": round(time.perf_counter() - started, 1)}


def app_kills(trees: dict[str, Path], kills: int) -> dict:
    import random

    from app.ui.session import AUTOSAVE_IDLE_MS, AUTOSAVE_MAX_WAIT_MS

    out: dict = {"autosave_idle_ms": AUTOSAVE_IDLE_MS, "autosave_max_wait_ms": AUTOSAVE_MAX_WAIT_MS}
    for side, tree in trees.items():
        work = Path(tempfile.mkdtemp(prefix=f"loomwork-appkill-{side}-"))
        out[side] = _probes("test_reliability_app_probes").app_kill_probe(kills, work, random.Random(0), tree=tree, seconds=3 * 3600)
    return out


def _child(code: str, args: list[str], timeout: float) -> dict | None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    try:
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=args[0])
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fuzz(tree: Path, cases: int) -> dict:
    started = time.perf_counter()
    result = _child(FUZZ_CHILD, [str(tree), str(ROOT / "tests"), str(cases)], timeout=24 * 3600)
    counts = result["counts"]
    return {"cases": cases, "loaded": counts.get("loaded", 0), "clean_errors": counts.get("refused", 0),
            "crashes": counts.get("crashed", 0), "hangs": counts.get("hung", 0),
            "crash_kinds": result["crash_kinds"], "seconds": round(time.perf_counter() - started, 1)}


def validation(trees: dict[str, Path], sizes: list[int], repeats: int, before_timeout: float) -> dict:
    out: dict = {}
    for n in sizes:
        runs: dict[str, list] = {side: [] for side in trees}
        for r in range(repeats):
            for side, tree in trees.items():  # interleaved
                if side == "before" and r > 0:
                    continue  # once: it is the slow one
                result = _child(VALIDATE_CHILD, [str(tree), str(n)],
                                timeout=before_timeout if side == "before" else 600)
                runs[side].append(None if result is None else result["seconds"])
        row = {}
        for side, times in runs.items():
            done = [t for t in times if t is not None]
            row[f"{side}_seconds"] = round(statistics.median(done), 3) if done else None
            if len(done) < len(times):
                row[f"{side}_seconds_at_least"] = before_timeout
        if row.get("before_seconds") and row.get("after_seconds"):
            row["speedup"] = round(row["before_seconds"] / row["after_seconds"], 1)
        out[str(n)] = row
    return out


def worktree_at(ref: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="loomwork-before-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(folder), ref], check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000, help="fuzz cases per side")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 20_000], help="graph sizes to validate")
    parser.add_argument("--repeats", type=int, default=3, help="validation repeats (after; before runs once)")
    parser.add_argument("--before", metavar="REF", help="also measure the code at this git ref")
    parser.add_argument("--before-tree", metavar="DIR", help="as --before, with a checkout already on disk")
    parser.add_argument("--before-timeout", type=float, default=300.0, help="seconds before a 'before' run is stopped")
    sections = ["fuzz", "validation", "rss", "run_memory", "refusals", "cancel_storm", "kill", "app_kill"]
    parser.add_argument("--sections", nargs="+", default=sections, choices=sections, help="what to measure")
    parser.add_argument("--refusal-budget", default="default",
                        help="the run budget of the refusals cases (e.g. 4G: a machine of 8 GB)")
    parser.add_argument("--cancels", type=int, default=100, help="cancelled runs (cancel_storm)")
    parser.add_argument("--kills", type=int, default=20, help="kill -9s of loomwork run (kill)")
    parser.add_argument("--kill-seconds", type=float, default=3 * 3600,
                        help="time limit of the kill section (stopped_by_time_limit says it was reached)")
    parser.add_argument("--app-kills", type=int, default=10, help="kill -9s of the app mid-edit (app_kill)")
    parser.add_argument("--probe-size", type=int, default=16, help="image side (cancel_storm, kill)")
    parser.add_argument("--probe-steps", type=int, default=8, help="sampler steps (cancel_storm, kill)")
    parser.add_argument("--rss-runs", type=int, default=200, help="runs in one process (rss)")
    parser.add_argument("--rss-warmup", type=int, default=20, help="runs before the first RSS reading")
    parser.add_argument("--rss-size", type=int, default=32, help="image side of the rss graph")
    parser.add_argument("--rss-memory-budget", help="the memory cache's budget in the rss runs (e.g. 64M)")
    parser.add_argument("--act-sizes", type=int, nargs="+", default=[128, 256], help="image sides (run_memory)")
    parser.add_argument("--out", help="write the JSON here too (merged with the sections there)")
    args = parser.parse_args()

    from kernels.memory import parse_bytes

    trees = {"after": ROOT}
    before = worktree_at(args.before) if args.before else None
    if before is None and args.before_tree:
        trees = {"before": Path(args.before_tree).resolve(), "after": ROOT}
    if before is not None:
        trees = {"before": before, "after": ROOT}
    result: dict = {}
    if args.out and Path(args.out).exists():
        result = json.loads(Path(args.out).read_text())
    command = " ".join(["python", "bench/reliability.py", *sys.argv[1:]])
    try:
        if "fuzz" in args.sections:
            result["fuzz"] = {side: fuzz(tree, args.cases) for side, tree in trees.items()}
        if "validation" in args.sections:
            result["validation"] = validation(trees, args.sizes, args.repeats, args.before_timeout)
        if "fuzz" in args.sections or "validation" in args.sections:
            result["before_ref"], result["command"] = args.before, command
        if "rss" in args.sections:
            budget = "default" if args.rss_memory_budget is None else str(parse_bytes(args.rss_memory_budget))
            label = f"{args.rss_size}px, memory cache budget {args.rss_memory_budget or 'default (20% of RAM)'}"
            # update, not replace: an entry's other measurements (say, before a fix) stay
            result.setdefault("rss", {}).setdefault(label, {}).update({
                **{side: rss_growth(tree, args.rss_runs, args.rss_warmup, args.rss_size, budget)
                   for side, tree in trees.items()}, "before_ref": args.before, "command": command})
        if "run_memory" in args.sections:
            result["run_memory"] = {**sampler_working_memory(args.act_sizes), "command": command}
        if "refusals" in args.sections:
            from kernels.run_memory import run_budget

            result["refusals"] = {**refusals(trees, args.refusal_budget), "model": "builtin:shapes-t2i",
                                  "run_budget": args.refusal_budget, "default_run_budget_bytes": run_budget(),
                                  "command": command}
        if "cancel_storm" in args.sections:
            result["cancel_storm"] = {**cancel_storm(args.cancels, args.probe_size, args.probe_steps),
                                      "command": command}
        if "kill" in args.sections:
            result["kill"] = {**kill_runs(args.kills, args.probe_size, args.probe_steps, args.kill_seconds), "command": command}
        if "app_kill" in args.sections:
            result["app_kill"] = {**app_kills(trees, args.app_kills), "before_ref": args.before or args.before_tree,
                                  "command": command}
    except Exception:
        traceback.print_exc()
        raise
    finally:
        if before is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
