"""How well a ShapesT2I model follows prompts, scored by the oracle over the 200 held-out prompts.

    python bench/shapes.py [--model DIR] [--log TRAIN_DIR/log.jsonl] [--steps 20] [--cfg 4]

Prints one JSON object:
- "scores": per-object rates (colour, colour+shape, cell) for one-object prompts, for
  multi-object prompts and for all; "two_object_both_right" / "three_object_all_right": the
  share of prompts whose every object has the right colour and shape. Cell rates count an object
  right only when the oracle puts it in the cell its caption names.
- "curve": the training log's eval records (oracle figures on a 48-prompt subset against
  training minutes), when --log is given.
- "seconds_per_image": batched generation time per image, and one prompt alone (batch 1).
- "default_graph_seconds": the default graph rendered by a fresh engine (model load included).

Each prompt is sampled once from its own seed, so two runs on one machine give the same figures.
The model folder is read by the app's own loader (kernels.models.load_model_folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEFAULT_MODEL = ROOT / "resources" / "models" / "shapes-t2i"
HELDOUT = ROOT / "resources" / "shapes" / "heldout_prompts.json"


def load_components(folder: str):
    from kernels.models import load_model_folder

    model, clip, _ = load_model_folder(folder)
    return clip.tokenizer, clip.text_encoder, model.unet, model.scheduler_config


def generate(components, prompts: list[dict], steps: int, cfg: float, scheduler: str) -> np.ndarray:
    """One 32x32 uint8 image per prompt, from the prompt's own noise seed."""
    from kernels.shapes.train import generate_images

    tokenizer, text_encoder, unet, scheduler_config = components
    return generate_images(unet, text_encoder, tokenizer, scheduler_config, prompts, steps, cfg, scheduler)


def aggregate(prompts: list[dict], per_prompt: list[dict]) -> dict:
    """Per-object rates for one-object, multi-object and all prompts, and all-right rates."""
    def rates(subset):
        objs = [(p, s) for p, s in zip(prompts, per_prompt) if subset(p)]
        n_objects = sum(len(p["objects"]) for p, _ in objs)
        if not n_objects:
            return None
        total = lambda key: sum(s[key] * len(p["objects"]) for p, s in objs)  # noqa: E731
        with_cell = sum(sum(o.get("cell") is not None for o in p["objects"]) for p, _ in objs)
        return {"prompts": len(objs), "objects": n_objects,
                "colour": round(total("colour") / n_objects, 4),
                "colour_shape": round(total("colour_shape") / n_objects, 4),
                "cell": round(total("cell") / with_cell, 4) if with_cell else None}

    def all_right(n):
        vals = [s["all_right"] for p, s in zip(prompts, per_prompt) if len(p["objects"]) == n]
        return round(float(np.mean(vals)), 4) if vals else None

    return {"single": rates(lambda p: len(p["objects"]) == 1),
            "multi": rates(lambda p: len(p["objects"]) > 1),
            "all": rates(lambda p: True),
            "two_object_both_right": all_right(2),
            "three_object_all_right": all_right(3)}


def default_graph_seconds() -> dict:
    """The README's main job in-process: resources/graphs/default.loom with a fresh engine
    (model load, text, 20 sampler steps, decode, scale, save), no disk cache."""
    import tempfile

    from app.engine import Executor
    from app.graph import load
    from nodes import registry

    path = ROOT / "resources" / "graphs" / "default.loom"
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        report = Executor(device="cpu", disk_cache=False).run(load(path, registry.get), output_dir=out,
                                                             graph_path=path)
        total = time.perf_counter() - t0
    return {"total": round(total, 3), "ok": report.ok, "target": 5.0,
            "nodes": {r.title: round(r.seconds, 3) for r in report.nodes.values()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="a ShapesT2I folder (diffusers layout)")
    ap.add_argument("--log", help="a training log.jsonl: adds its eval curve")
    ap.add_argument("--prompts", default=str(HELDOUT))
    ap.add_argument("--limit", type=int, default=0, help="score only the first N prompts (0: all)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--scheduler", default="dpmpp_2m")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from kernels.shapes.oracle import score_prompt

    result: dict = {"model": args.model, "steps": args.steps, "cfg": args.cfg, "scheduler": args.scheduler}
    if args.log:
        from kernels.shapes.train import training_curve

        result["curve"] = training_curve(args.log)
    if not os.path.isdir(args.model):
        result["error"] = f"no model folder at {args.model}"
        print(json.dumps(result, indent=2))
        return 1

    prompts = json.loads(Path(args.prompts).read_text())["prompts"]
    if args.limit:
        prompts = prompts[:args.limit]
    components = load_components(args.model)
    generate(components, prompts[:1], 2, args.cfg, args.scheduler)  # warm-up

    t0 = time.perf_counter()
    images = np.concatenate([generate(components, prompts[i:i + args.batch], args.steps, args.cfg, args.scheduler)
                             for i in range(0, len(prompts), args.batch)])
    batched = (time.perf_counter() - t0) / len(prompts)
    t0 = time.perf_counter()
    generate(components, prompts[:1], args.steps, args.cfg, args.scheduler)
    alone = time.perf_counter() - t0

    result["default_graph_seconds"] = default_graph_seconds()
    per_prompt = [score_prompt(p["objects"], img) for p, img in zip(prompts, images)]
    result["n_prompts"] = len(prompts)
    result["scores"] = aggregate(prompts, per_prompt)
    result["seconds_per_image"] = {"batched": round(batched, 4), "batch_1": round(alone, 4),
                                   "threads": args.threads}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
