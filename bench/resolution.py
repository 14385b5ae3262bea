"""Resolution techniques on the built-in ShapesT2I model, scored by its oracle (JSON on stdout,
and to --out): one section per measurement, each run through the nodes' own code.

Sections (`--sections`, comma-separated):
- diffusehigh_2x, diffusehigh_4x: base images (32x32, one per held-out one-object prompt, from
  its own seed) upscaled by DiffuseHighUpscale and by a plain img2img hires fix (bicubic
  upsample, the same steps, denoise, seed and scheduler, one pass: what HiresFix does in
  pixels), then area-downsampled back to 32x32. `agreement` is the share of images whose oracle
  reading (the multiset of (colour, shape) of every object found) is the input's; `colour` the
  share whose colours are. Methods alternate prompt by prompt; seconds are medians per image.
- entropy_2x: text-to-image at 64x64 (2x the native size) with and without
  AttentionEntropyScale, scored with the oracle against each prompt's objects (bench/shapes.py's
  rates); methods alternate prompt by prompt.
- tiled: TiledSampler (the native 32 px tile, overlap 16: 3x3 tiles) against the plain Sampler
  on one 64x64 canvas; interleaved repeats, median seconds.

    python bench/resolution.py --n 20 --out bench/results/resolution.json

`--suffix _g1 --guidance-end 1` adds a section per setting. One torch thread (the machine is
shared); `--out` keeps the sections of an earlier file that
this run leaves out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MODEL = ROOT / "resources" / "models" / "shapes-t2i"
HELDOUT = ROOT / "resources" / "shapes" / "heldout_prompts.json"
SECTIONS = ("diffusehigh_2x", "diffusehigh_4x", "entropy_2x", "tiled")


class Ctx:
    def progress(self, *args, **kwargs):
        pass


def load():
    from kernels.models import load_model_folder

    return load_model_folder(str(MODEL))


def encode(clip, text):
    from nodes.core import TextEncode

    return TextEncode().run(Ctx(), clip=clip, text=text)["conditioning"]


def prompts(n: int, single: bool, multi: bool = False) -> list[dict]:
    """The first n held-out prompts: one-object ones only (`single`), several-object ones only
    (`multi`), or any."""
    items = json.loads(HELDOUT.read_text())["prompts"]
    keep = [p for p in items if (not single or len(p["objects"]) == 1) and (not multi or len(p["objects"]) > 1)]
    return keep[:n]


def txt2img(model, cond, size: int, seed: int, steps: int, cfg: float, scheduler: str):
    import torch

    from nodes.core import Sampler

    latent = torch.zeros(1, 3, size, size)
    return Sampler().run(Ctx(), model=model, positive=cond, negative=None, latent=latent,
                         scheduler=scheduler, steps=steps, cfg=cfg, seed=seed, denoise=1.0)["latent"]


def uint8(x):
    """(H, W, 3) uint8 of a (1, 3, H, W) sample in -1..1."""
    from kernels.shapes.judge import to_uint8

    return to_uint8(x)[0]


def reading(image) -> Counter:
    from kernels.shapes.judge import detected_pairs

    return Counter(detected_pairs(image))


def hires_fix(model, cond, vae, x, scale, args):
    """The plain img2img hires fix: bicubic upsample, re-noise to denoise, sample once."""
    import torch.nn.functional as F

    from nodes.core import Sampler

    side = x.shape[-1] * scale
    up = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)
    return Sampler().run(Ctx(), model=model, positive=cond, negative=None, latent=vae.encode(up),
                         scheduler=args.scheduler_upscale, steps=args.upscale_steps, cfg=args.cfg,
                         seed=args.seed, denoise=args.denoise)["latent"]


def diffusehigh(model, cond, vae, x, scale, args):
    from kernels.images import model_to_image
    from nodes.resolution import DiffuseHighUpscale

    return DiffuseHighUpscale().run(
        Ctx(), model=model, positive=cond, negative=None, vae=vae, image=model_to_image(x), latent=None,
        scale=float(scale), scheduler=args.scheduler_upscale, steps=args.upscale_steps, cfg=args.cfg,
        seed=args.seed, denoise=args.denoise, guidance_end=args.guidance_end,
        sharpness=args.sharpness)["latent"]


def upscale_section(scale: int, args) -> dict:
    import torch.nn.functional as F

    model, clip, vae = load()
    methods = {"diffusehigh": diffusehigh, "hires_fix": hires_fix}
    stats = {m: {"agreement": [], "colour": [], "seconds": []} for m in methods}
    inputs_found = 0
    for k, p in enumerate(prompts(args.n, single=True)):
        cond = encode(clip, p["caption"])
        base = txt2img(model, cond, 32, p["seed"], args.steps, args.cfg, args.scheduler)
        want = reading(uint8(base))
        inputs_found += bool(want)
        order = list(methods) if k % 2 == 0 else list(methods)[::-1]
        for name in order:
            t0 = time.perf_counter()
            out = methods[name](model, cond, vae, base, scale, args)
            stats[name]["seconds"].append(time.perf_counter() - t0)
            got = reading(uint8(F.interpolate(out.clamp(-1, 1), size=(32, 32), mode="area")))
            stats[name]["agreement"].append(got == want)
            stats[name]["colour"].append(Counter(c for c, _ in got) == Counter(c for c, _ in want))
    n = len(stats["diffusehigh"]["agreement"])
    return {"scale": scale, "n": n, "inputs_with_an_object": inputs_found,
            "steps": args.upscale_steps, "denoise": args.denoise, "guidance_end": args.guidance_end,
            "sharpness": args.sharpness, "cfg": args.cfg, "scheduler": args.scheduler_upscale,
            **{name: {"agreement": round(sum(s["agreement"]) / n, 4), "colour": round(sum(s["colour"]) / n, 4),
                      "seconds_median": round(statistics.median(s["seconds"]), 3)}
               for name, s in stats.items()},
            "target": "diffusehigh agreement >= 0.95"}


def entropy_section(args) -> dict:
    from kernels.shapes.oracle import score_prompt
    from nodes.resolution import AttentionEntropyScale

    model, clip, _vae = load()
    scaled = AttentionEntropyScale().run(Ctx(), model=model, vae=None, training_size=0)["model"]
    methods = {"without": model, "with": scaled}
    scores = {m: [] for m in methods}
    items = prompts(args.n, single=False, multi=args.multi)
    for k, p in enumerate(items):
        cond = encode(clip, p["caption"])
        for name in (list(methods) if k % 2 == 0 else list(methods)[::-1]):
            x = txt2img(methods[name], cond, 64, p["seed"], args.steps, args.cfg, args.scheduler)
            scores[name].append(score_prompt(p["objects"], uint8(x)))

    def rates(rows):
        return {key: round(statistics.mean(r[key] for r in rows), 4)
                for key in ("colour", "colour_shape", "cell", "all_right")}

    return {"size": 64, "native": 32, "n": len(items), "prompts": "several objects" if args.multi else "any", "steps": args.steps, "cfg": args.cfg,
            "scheduler": args.scheduler, "rates": "mean per prompt of bench/shapes.py's per-object rates",
            **{name: rates(rows) for name, rows in scores.items()}}


def tiled_section(args) -> dict:
    import torch

    from nodes.core import Sampler
    from nodes.resolution import TiledSampler

    model, clip, vae = load()
    cond = encode(clip, prompts(1, single=True)[0]["caption"])
    latent = torch.zeros(1, 3, 64, 64)
    common = dict(model=model, positive=cond, negative=None, latent=latent, scheduler=args.scheduler,
                  steps=args.tiled_steps, cfg=args.cfg, seed=args.seed, denoise=1.0)
    runs = {"plain": lambda: Sampler().run(Ctx(), **common),
            "tiled": lambda: TiledSampler().run(Ctx(), vae=vae, tile_width=32, tile_height=32, overlap=16,
                                                **common)}
    times = {m: [] for m in runs}
    for m in runs:  # warm-up
        runs[m]()
    for _ in range(args.repeats):
        for m, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(ts) for m, ts in times.items()}
    return {"canvas": "64x64", "tile": "32x32", "overlap": 16, "tiles": 9, "steps": args.tiled_steps,
            "repeats": args.repeats, "plain_seconds": round(med["plain"], 3),
            "tiled_seconds": round(med["tiled"], 3), "ratio_tiled_over_plain": round(med["tiled"] / med["plain"], 3)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--n", type=int, default=20, help="prompts per section")
    ap.add_argument("--steps", type=int, default=20, help="text-to-image steps")
    ap.add_argument("--scheduler", default="dpmpp_2m", help="text-to-image scheduler")
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=11, help="the upscales' and tiled runs' seed")
    ap.add_argument("--upscale-steps", type=int, default=20, help="full schedule of an upscale pass")
    ap.add_argument("--scheduler-upscale", default="euler")
    ap.add_argument("--denoise", type=float, default=0.3)
    ap.add_argument("--guidance-end", type=float, default=1 / 3)
    ap.add_argument("--sharpness", type=float, default=1.0)
    ap.add_argument("--tiled-steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--multi", action="store_true", help="entropy_2x: only prompts of several objects")
    ap.add_argument("--suffix", default="", help="appended to each section's key (a settings sweep)")
    ap.add_argument("--out", default="", help="write the JSON here, keeping sections this run leaves out")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    chosen = [s for s in args.sections.split(",") if s]
    keys = [s + args.suffix for s in chosen]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    report: dict = {}
    if args.out and Path(args.out).exists():
        report = json.loads(Path(args.out).read_text())
    report.update({"bench": "resolution", "model": "resources/models/shapes-t2i", "threads": 1})
    for section in chosen:
        t0 = time.perf_counter()
        if section.startswith("diffusehigh_"):
            result = upscale_section(int(section.split("_")[1].rstrip("x")), args)
        elif section == "entropy_2x":
            result = entropy_section(args)
        else:
            result = tiled_section(args)
        result["bench_seconds"] = round(time.perf_counter() - t0, 1)
        report[section + args.suffix] = result
        print(json.dumps({section + args.suffix: result}), file=sys.stderr, flush=True)
    if args.out:  # re-read: a parallel run of other sections may have written meanwhile
        merged = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        merged.update({k: v for k, v in report.items() if k in keys or k not in merged})
        Path(args.out).write_text(json.dumps(merged, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
