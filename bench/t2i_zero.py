"""Multi-Concept T2I-Zero on ShapesT2I: how often do both objects of a two-object prompt appear?

    python bench/t2i_zero.py --n 40 --seeds 2 --out bench/results/t2i_zero.json
    python bench/t2i_zero.py --source world --world-seed 777 --n 16 --seeds 1   # tuning stream

Prompts: the two-object prompts of resources/shapes/heldout_prompts.json (drawn from a seed the
training data never uses; the first --n of its 60), each rendered from its own seed and the next
--seeds - 1 seeds; or, for tuning, two-object captions from the world's generator on another
seed. Arms: baseline, corr_emb (EmbeddingTweak), nms (CrossTokenNMS), both, every arm through
the nodes' own code and the Sampler at the built-in model's native 32x32 and the default graph's
sampling (euler, 20 steps, cfg 5). Arms are interleaved per render (rotating their order).

The oracle (kernels.shapes.oracle.score_prompt) judges each image: "both_present" is the share
of renders where both objects appear with their colour and shape (the paper's claim is fewer
missing objects); "both_colours" counts colour alone. Each arm is compared with the baseline on
the same renders: wins and losses, and an exact two-sided sign test over the discordant pairs.
"""

from __future__ import annotations

import argparse
import json
import math
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

from kernels.t2i_zero import defaults  # noqa: E402  (no torch)

MODEL = ROOT / "resources" / "models" / "shapes-t2i"
HELDOUT = ROOT / "resources" / "shapes" / "heldout_prompts.json"
ARMS = ("baseline", "corr_emb", "nms", "both")


def heldout_two_object(n: int) -> list[dict]:
    prompts = json.loads(HELDOUT.read_text())["prompts"]
    return [p for p in prompts if len(p["objects"]) == 2][:n]


def world_two_object(n: int, seed: int) -> list[dict]:
    """Two-object captions (with positions, half with a background) from the world's generator."""
    import numpy as np

    from kernels.shapes.world import caption_for, sample_scene

    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        scene = sample_scene(rng, 2)
        text = caption_for(scene, with_position=True, with_background=bool(rng.random() < 0.5))
        out.append({"caption": text, "seed": int(rng.integers(2**31)),
                    "objects": [{"colour": o.colour, "shape": o.shape, "cell": o.cell}
                                for o in scene.objects]})
    return out


class _QuietContext:
    def progress(self, *a, **k):
        pass


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial p-value of `wins` against `losses` at p = 1/2."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def render(args, model, vae, cond, arm: str, seed: int):
    """One uint8 image of `cond` under `arm`, through the nodes' own code."""
    import numpy as np
    import torch

    from kernels.images import model_to_image
    from nodes.core import Sampler
    from nodes.t2i_zero import CrossTokenNMS, EmbeddingTweak

    ctx = _QuietContext()
    if arm in ("corr_emb", "both"):
        cond = EmbeddingTweak().run(ctx, cond, "", args.corr_window, args.corr_threshold,
                                    args.corr_strength)["conditioning"]
    if arm in ("nms", "both"):
        model = CrossTokenNMS().run(ctx, model, cond, "", args.nms_strength, 0.0,
                                    args.nms_end)["model"]
    size = int(model.unet.config.sample_size)
    latent = torch.zeros(1, vae.latent_channels, size, size)
    out = Sampler().run(ctx, model, cond, None, latent, args.scheduler, args.steps, args.cfg,
                        seed, 1.0)["latent"]
    with torch.no_grad():
        image = model_to_image(vae.decode(out))[0]
    return (image.numpy() * 255).round().clip(0, 255).astype(np.uint8)


def summarise(rows: dict, seconds: dict, changes: dict) -> dict:
    base = rows["baseline"]
    out = {}
    for arm, scores in rows.items():
        n = len(scores)
        entry = {"renders": n,
                 "both_present": round(sum(s["all_right"] for s in scores) / n, 4),
                 "both_colours": round(sum(s["colour"] == 1.0 for s in scores) / n, 4),
                 "objects_present": round(sum(s["colour_shape"] for s in scores) / n, 4),
                 "sec_per_image_median": round(statistics.median(seconds[arm]), 3)}
        if arm != "baseline":
            # does the arm change the image at all: mean |pixel - baseline's| in 0..255, and the
            # share of renders that differ from the baseline's anywhere
            entry.update(mean_abs_pixel_change=round(statistics.fmean(c for c, _ in changes[arm]), 3),
                         renders_changed=round(sum(d for _, d in changes[arm]) / n, 4))
            wins = sum(s["all_right"] > b["all_right"] for s, b in zip(scores, base))
            losses = sum(s["all_right"] < b["all_right"] for s, b in zip(scores, base))
            entry.update(both_present_minus_baseline_points=round(
                100 * (entry["both_present"] - out["baseline"]["both_present"]), 1),
                wins=wins, losses=losses, sign_test_p=round(sign_test(wins, losses), 4))
        out[arm] = entry
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--source", choices=("heldout", "world"), default="heldout")
    ap.add_argument("--world-seed", type=int, default=777, help="the tuning stream (--source world)")
    ap.add_argument("--n", type=int, default=40, help="two-object prompts")
    ap.add_argument("--seeds", type=int, default=2, help="renders per prompt (its seed, seed + 1, ...)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--scheduler", default="euler")
    ap.add_argument("--corr-window", type=int, default=defaults.CORR_WINDOW)
    ap.add_argument("--corr-threshold", type=float, default=defaults.CORR_THRESHOLD)
    ap.add_argument("--corr-strength", type=float, default=defaults.CORR_STRENGTH)
    ap.add_argument("--nms-strength", type=float, default=defaults.NMS_STRENGTH)
    ap.add_argument("--nms-end", type=float, default=defaults.NMS_END)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="also write the JSON here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from kernels.models import load_model_folder
    from kernels.shapes.oracle import score_prompt
    from kernels.text import encode_text

    torch.set_num_threads(args.threads)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if "baseline" not in arms:
        arms.insert(0, "baseline")
    model, clip, vae = load_model_folder(args.model)
    prompts = heldout_two_object(args.n) if args.source == "heldout" else \
        world_two_object(args.n, args.world_seed)
    rows = {a: [] for a in arms}
    seconds = {a: [] for a in arms}
    changes = {a: [] for a in arms}
    k = 0
    for p in prompts:
        cond = encode_text(clip.tokenizer, clip.text_encoder, p["caption"])
        for r in range(args.seeds):
            order = arms[k % len(arms):] + arms[:k % len(arms)]  # interleaved, rotating
            k += 1
            images = {}
            for arm in order:
                t0 = time.perf_counter()
                images[arm] = render(args, model, vae, cond, arm, p["seed"] + r)
                seconds[arm].append(time.perf_counter() - t0)
                rows[arm].append(score_prompt(p["objects"], images[arm]))
            for arm, img in images.items():
                diff = np.abs(img.astype(np.int16) - images["baseline"].astype(np.int16))
                changes[arm].append((float(diff.mean()), bool(diff.any())))
        done = {a: sum(s["all_right"] for s in rows[a]) for a in arms}
        print(f"{len(rows['baseline']):4d} renders/arm  both present: {done}", file=sys.stderr,
              flush=True)
    report = {"bench": "t2i_zero", "model": args.model, "oracle": "kernels.shapes.oracle.score_prompt",
              "prompts": {"source": "resources/shapes/heldout_prompts.json (two-object, first n)"
                          if args.source == "heldout" else f"world generator, seed {args.world_seed}",
                          "n": len(prompts), "seeds_per_prompt": args.seeds},
              "settings": {"steps": args.steps, "cfg": args.cfg, "scheduler": args.scheduler,
                           "size": int(model.unet.config.sample_size),
                           "corr_window": args.corr_window, "corr_threshold": args.corr_threshold,
                           "corr_strength": args.corr_strength, "nms_strength": args.nms_strength,
                           "nms_end": args.nms_end, "concepts": "default (noun after a/an)",
                           "threads": args.threads},
              "arms": summarise(rows, seconds, changes)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
