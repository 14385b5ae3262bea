"""Speed techniques on ShapesT2I: feature inheritance (FeatureCache) and magnitude pruning.

    nice python bench/speed.py --n 30 --out bench/results/speed.json

Prompts: the first --n one-object prompts of resources/shapes/heldout_prompts.json (a seed the
training data never uses), each rendered once from its own seed at the built-in model's native
32x32 with euler, 20 steps, cfg 5 (the default graph's sampling), through the nodes' own code.

Arms: "baseline" (no patch); "cache_i<k>" FeatureCache every k steps, depth 1, uniform, k = 1..5;
"cache_i3_nonuniform" and "cache_i3_depth2"; "prune_<p>" MagnitudePrune of the UNet and the text
encoder at p% global sparsity (20, 40, 60) and "prune_unet_35" (the UNet alone); "prune_70",
"prune_80" and "prune_90" run only when named in --arms. The arms of a
prompt run back to back in a rotating order (interleaved), so machine load falls on all alike.

Scores: the oracle (kernels.shapes.oracle.score_prompt) judges each image; "accuracy" is the
share of renders whose object has the prompt's colour and shape. "sampling_sec_median" is the
wall-clock time of the Sampler node per image (the text encoding and the decode are not in
it); "speedup" is the baseline's median over the arm's. Unstructured sparsity saves no time with
dense kernels, so the pruning arms report accuracy only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MODEL = ROOT / "resources" / "models" / "shapes-t2i"
HELDOUT = ROOT / "resources" / "shapes" / "heldout_prompts.json"
CACHE_ARMS = {**{f"cache_i{k}": (k, 1, "uniform") for k in range(1, 6)},
              "cache_i3_nonuniform": (3, 1, "non-uniform"), "cache_i3_depth2": (3, 2, "uniform")}
PRUNE_ARMS = {"prune_20": (0.2, "both"), "prune_40": (0.4, "both"), "prune_60": (0.6, "both"),
              "prune_unet_35": (0.35, "unet")}
ARMS = ("baseline", *CACHE_ARMS, *PRUNE_ARMS)
# where the curve breaks (not in the default run): --arms baseline,prune_70,prune_80,prune_90
PRUNE_ARMS.update({f"prune_{p}": (p / 100, "both") for p in (70, 80, 90)})


class _QuietContext:
    def progress(self, *a, **k):
        pass


def heldout_one_object(n: int) -> list[dict]:
    prompts = json.loads(HELDOUT.read_text())["prompts"]
    return [p for p in prompts if len(p["objects"]) == 1][:n]


def arm_bundles(arm: str, model, clip):
    """(MODEL, CLIP) of an arm, through the nodes."""
    from nodes.speed import FeatureCache, MagnitudePrune

    if arm in CACHE_ARMS:
        return FeatureCache().run(_QuietContext(), model, *CACHE_ARMS[arm])["model"], clip
    if arm in PRUNE_ARMS:
        sparsity, target = PRUNE_ARMS[arm]
        out = MagnitudePrune().run(_QuietContext(), model, clip, sparsity, "global", target)
        return out["model"], out["clip"]
    return model, clip


def render(args, model, clip, vae, caption: str, seed: int):
    """(uint8 image, seconds in the Sampler) of one prompt."""
    import numpy as np
    import torch

    from kernels.images import model_to_image
    from nodes.core import Sampler, TextEncode

    ctx = _QuietContext()
    cond = TextEncode().run(ctx, clip, caption)["conditioning"]
    size = int(model.unet.config.sample_size)
    latent = torch.zeros(1, vae.latent_channels, size, size)
    t0 = time.perf_counter()
    out = Sampler().run(ctx, model, cond, None, latent, args.scheduler, args.steps, args.cfg, seed, 1.0)["latent"]
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        image = model_to_image(vae.decode(out))[0]
    return (image.numpy() * 255).round().clip(0, 255).astype(np.uint8), seconds


def summarise(rows: dict, seconds: dict, changed: dict) -> dict:
    base_sec = statistics.median(seconds["baseline"])
    base_acc = sum(s["all_right"] for s in rows["baseline"]) / len(rows["baseline"])
    out = {}
    for arm, scores in rows.items():
        n = len(scores)
        acc = sum(s["all_right"] for s in scores) / n
        med = statistics.median(seconds[arm])
        entry = {"renders": n, "accuracy": round(acc, 4),
                 "colour_accuracy": round(sum(s["colour"] for s in scores) / n, 4),
                 "accuracy_minus_baseline_points": round(100 * (acc - base_acc), 1),
                 "renders_changed": round(sum(changed[arm]) / n, 4)}
        if arm in CACHE_ARMS:
            entry["setting"] = dict(zip(("interval", "depth", "schedule"), CACHE_ARMS[arm]))
        if arm in PRUNE_ARMS:
            entry["setting"] = dict(zip(("sparsity", "target"), PRUNE_ARMS[arm]), scope="global")
        if arm not in PRUNE_ARMS:
            entry.update(sampling_sec_median=round(med, 4), speedup=round(base_sec / med, 3))
        out[arm] = entry
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--n", type=int, default=30, help="one-object held-out prompts")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--scheduler", default="euler")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="also write the JSON here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from kernels.models import load_model_folder
    from kernels.shapes.oracle import score_prompt

    torch.set_num_threads(args.threads)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if "baseline" not in arms:
        arms.insert(0, "baseline")
    model, clip, vae = load_model_folder(args.model)
    bundles = {a: arm_bundles(a, model, clip) for a in arms}
    prompts = heldout_one_object(args.n)
    rows, seconds, changed = ({a: [] for a in arms} for _ in range(3))
    render(args, model, clip, vae, prompts[0]["caption"], 0)  # warm-up, not counted
    for k, p in enumerate(prompts):
        order = arms[k % len(arms):] + arms[:k % len(arms)]  # interleaved, rotating
        images = {}
        for arm in order:
            images[arm], sec = render(args, *bundles[arm], vae, p["caption"], p["seed"])
            seconds[arm].append(sec)
            rows[arm].append(score_prompt(p["objects"], images[arm]))
        for arm, img in images.items():
            changed[arm].append(bool((img != images["baseline"]).any()))
        print(f"{k + 1:3d}/{len(prompts)} right: " + " ".join(
            f"{a}={int(sum(s['all_right'] for s in rows[a]))}" for a in arms), file=sys.stderr, flush=True)
    report = {"bench": "speed", "model": str(Path(args.model).relative_to(ROOT)) if Path(args.model).is_relative_to(ROOT) else args.model,
              "oracle": "kernels.shapes.oracle.score_prompt (colour and shape of the one object)",
              "prompts": {"source": "resources/shapes/heldout_prompts.json (one-object, first n)",
                          "n": len(prompts)},
              "settings": {"steps": args.steps, "cfg": args.cfg, "scheduler": args.scheduler,
                           "size": int(model.unet.config.sample_size), "threads": args.threads,
                           "timing": "Sampler node wall clock per image, arms interleaved, medians"},
              "arms": summarise(rows, seconds, changed)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
