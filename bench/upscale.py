"""Model upscaling benchmark, tiled against one pass: prints JSON.

A small random Real-ESRGAN Compact model (the ESRGAN family's SRVGG network, x4; `--arch esrgan`
for an RRDB ESRGAN, much slower) upscales a random image to each `--sizes` output side, once in
one pass and once tiled with the tile chosen from `--budget-mb` (or `--tile`). Each case runs in
its own child process, so its peak memory is the operating system's: `resource.getrusage`'s
ru_maxrss of the child, reported as the growth over its peak before the upscale (the imports and
model). Cases are interleaved (size by size, untiled then tiled, repeat by repeat) and medians
reported, with the tiled/untiled ratios; tiled output is checked against untiled first.

Usage: python bench/upscale.py [--sizes 1024,2048,4096] [--repeats 3] [--budget-mb 256]
                               [--tile 0] [--overlap 32] [--arch compact|esrgan] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_model(arch: str):
    import torch

    from kernels.upscale.model_upscale import model_from_state_dict

    torch.manual_seed(0)
    if arch == "compact":
        from spandrel.architectures.Compact import Compact

        net = Compact(num_feat=16, num_conv=4, upscale=4)
    elif arch == "esrgan":
        from spandrel.architectures.ESRGAN import ESRGAN

        net = ESRGAN(num_filters=16, num_blocks=1, scale=4)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    return model_from_state_dict(net.state_dict(), f"random-{arch}")


def run_case(case: dict) -> dict:
    """One upscale in this process: seconds, and peak RSS growth over the start."""
    import torch

    from kernels.upscale.model_upscale import plan_upscale, upscale_images

    torch.set_num_threads(1)
    model = build_model(case["arch"])
    side = case["size"] // model.scale
    image = torch.rand(1, side, side, 3, generator=torch.Generator().manual_seed(0))
    budget = case["budget_mb"] << 20 if case["tiled"] else 1 << 40
    plan = plan_upscale(model, side, side, tile=case["tile"] if case["tiled"] else side,
                        overlap=case["overlap"], memory_budget=budget)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    out = upscale_images(model, image, plan)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"seconds": seconds, "peak_growth_mb": (after - before) / 1024,
              "peak_rss_mb": after / 1024, "tiles": plan.tiles, "tile": plan.tile_h,
              "estimated_mb": plan.estimated_bytes / 2**20}
    if case.get("save"):
        torch.save(out, case["save"])
    return result


def child(case: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(case)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"case {case} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_equal_away_from_seams(args) -> dict:
    """Tiled against one pass at the smallest size, with the tile forced small enough to tile."""
    import tempfile

    import torch

    size = min(args.sizes)
    with tempfile.TemporaryDirectory() as tmp:
        common = {"arch": args.arch, "size": size, "overlap": args.overlap, "budget_mb": args.budget_mb}
        child({**common, "tiled": False, "tile": 0, "save": f"{tmp}/whole.pt"})
        tile = max(64, size // 4 // 3)
        info = child({**common, "tiled": True, "tile": tile, "save": f"{tmp}/tiled.pt"})
        diff = (torch.load(f"{tmp}/whole.pt", weights_only=True)
                - torch.load(f"{tmp}/tiled.pt", weights_only=True)).abs()
    return {"size": size, "tile": tile, "tiles": info["tiles"], "max_abs_diff": diff.max().item(),
            "mean_abs_diff": diff.mean().item()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,2048,4096", help="output sides, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-mb", type=int, default=256, help="memory budget of the tiled runs")
    ap.add_argument("--tile", type=int, default=0, help="tiled runs' tile (0: from the budget)")
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--arch", default="compact", choices=("compact", "esrgan"))
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))))
        return {}
    args.sizes = [int(s) for s in args.sizes.split(",")]
    runs: dict = {(s, v): [] for s in args.sizes for v in ("untiled", "tiled")}
    for _ in range(args.repeats):
        for size in args.sizes:
            for variant in ("untiled", "tiled"):
                runs[size, variant].append(child({
                    "arch": args.arch, "size": size, "tiled": variant == "tiled", "tile": args.tile,
                    "overlap": args.overlap, "budget_mb": args.budget_mb}))
    rows = []
    for size in args.sizes:
        row = {"output": f"{size}x{size}"}
        for variant in ("untiled", "tiled"):
            rs = runs[size, variant]
            row[variant] = {"seconds": statistics.median(r["seconds"] for r in rs),
                            "peak_growth_mb": statistics.median(r["peak_growth_mb"] for r in rs),
                            "tiles": rs[0]["tiles"], "tile": rs[0]["tile"],
                            "estimated_mb": round(rs[0]["estimated_mb"], 1)}
        row["time_ratio_tiled_over_untiled"] = row["tiled"]["seconds"] / row["untiled"]["seconds"]
        row["memory_ratio_tiled_over_untiled"] = (row["tiled"]["peak_growth_mb"]
                                                  / max(row["untiled"]["peak_growth_mb"], 1e-9))
        rows.append(row)
    report = {"bench": "upscale", "arch": args.arch, "repeats": args.repeats,
              "budget_mb": args.budget_mb, "overlap": args.overlap, "threads": 1,
              "memory": "peak RSS growth of a child process per case (resource.getrusage ru_maxrss "
                        "after the upscale minus before it)",
              "check": check_equal_away_from_seams(args), "rows": rows}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
