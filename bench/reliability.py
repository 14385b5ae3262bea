"""Reliability benchmark: prints JSON (and writes it with --out).

- fuzz: the graph-file fuzzer's cases (tests/test_fuzz_graphs.py: mutated .loom files and PNGs
  with embedded graphs) in bulk, counted: loaded, refused cleanly (GraphFileError), crashed (any
  other exception; by kind), hung (past the case limit). With --before REF the same cases run
  against the code at git REF too (a temporary worktree), in a child process.
- validation: seconds to validate a graph of 5,000 and 20,000 nodes (a random tree of
  ImageScale nodes under a LoadImage, so many nodes are ready at once), median of interleaved
  repeats in child processes; with --before, the code at REF once per size, stopped at
  --before-timeout seconds (reported as a lower bound).

Usage: python bench/reliability.py [--cases 10000] [--before main] [--out bench/results/reliability.json]
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
    parser.add_argument("--before-timeout", type=float, default=300.0, help="seconds before a 'before' run is stopped")
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args()

    trees = {"after": ROOT}
    before = worktree_at(args.before) if args.before else None
    if before is not None:
        trees = {"before": before, "after": ROOT}
    try:
        result = {"fuzz": {side: fuzz(tree, args.cases) for side, tree in trees.items()},
                  "validation": validation(trees, args.sizes, args.repeats, args.before_timeout),
                  "before_ref": args.before,
                  "command": " ".join(["python", "bench/reliability.py", *sys.argv[1:]])}
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
