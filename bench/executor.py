"""Executor benchmark: prints JSON.

- overhead: the engine rendering a txt2img graph vs a hand-written diffusers loop on the same
  model, steps and seed (pixels asserted identical); median of interleaved repeats.
- last_node_edit: re-run after editing the last computing node, as a fraction of a full run.
- noop_upstream_edit: a whitespace-only prompt edit; counts the sampler steps that ran (0 is right).
- fresh_process: a new process with a warm disk tier vs a new process with an empty one.

Usage: python bench/executor.py [--model FOLDER] [--steps N] [--repeats N]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "a red circle on the left and a blue square at the bottom right, white background"


def build_graph(model: str, steps: int, size: int):
    from app.graph import Graph
    from nodes.registry import add_node

    g = Graph()
    load = add_node(g, "LoadModel", {"path": model}, title="Load")
    text = add_node(g, "TextEncode", {"text": PROMPT}, title="Prompt")
    empty = add_node(g, "EmptyLatent", {"width": size, "height": size}, title="Empty")
    sampler = add_node(g, "Sampler", {"scheduler": "dpmpp_2m", "steps": steps, "cfg": 4.0, "seed": 7},
                       title="Sampler")
    decode = add_node(g, "VAEDecode", {}, title="Decode")
    scale = add_node(g, "ImageScale", {"factor": 4.0, "method": "bicubic"}, title="Scale")
    save = add_node(g, "SaveImage", {"prefix": "bench"}, title="Save")
    for a, ap, b, bp in [(load, "clip", text, "clip"), (load, "vae", empty, "vae"), (load, "model", sampler, "model"),
                         (text, "conditioning", sampler, "positive"), (empty, "latent", sampler, "latent"),
                         (load, "vae", decode, "vae"), (sampler, "latent", decode, "latent"),
                         (decode, "image", scale, "image"), (scale, "image", save, "image")]:
        g.connect(a.id, ap, b.id, bp)
    return g, {"text": text.id, "scale": scale.id, "decode": decode.id}


def hand_written_loop(model_dir: str, steps: int, size: int, out_dir: Path):
    """Text-to-image the way a diffusers user writes it by hand: encode, loop, decode."""
    import torch
    from diffusers import DPMSolverMultistepScheduler
    from PIL import Image

    from kernels.models import load_model_folder

    unet_b, clip_b, vae_b = load_model_folder(model_dir)
    tok, te, unet = clip_b.tokenizer, clip_b.text_encoder, unet_b.unet

    def run():
        with torch.no_grad():
            ids = tok([PROMPT, ""], padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
            hidden = te(ids).last_hidden_state
            cond, uncond = hidden[:1], hidden[1:]
            config = {k: v for k, v in unet_b.scheduler_config.items() if not k.startswith("_")}
            sched = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
            f = vae_b.scale_factor
            shape = (1, vae_b.latent_channels, size // f, size // f)
            gen = torch.Generator("cpu").manual_seed(7)
            x = torch.randn(shape, generator=gen) * 1.0
            sched.set_timesteps(steps)
            x = x * sched.init_noise_sigma
            # Guidance written out, not kernels.sampling.cfg_mix: the reference shares no engine code.
            for t in sched.timesteps:
                inp = sched.scale_model_input(x, t)
                out = unet(torch.cat([inp, inp]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
                u, c = out.chunk(2)
                x = sched.step(u + 4.0 * (c - u), t, x, generator=gen).prev_sample
            img = vae_b.decode(x)
            image = ((img.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
        # The same end product as the graph: scaled x4 and saved as PNG.
        arr = (image[0].numpy() * 255).round().astype("uint8")
        pil = Image.fromarray(arr).resize((arr.shape[1] * 4, arr.shape[0] * 4), Image.Resampling.BICUBIC)
        pil.save(out_dir / "hand.png")
        return image
    return run


FRESH_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
from app.engine import Executor
from app.graph import load
from nodes import registry
from app.cli import set_threads
set_threads()
g = load(sys.argv[1], registry.get)
report = Executor(device="cpu").run(g, output_dir=sys.argv[2], graph_path=sys.argv[1])
print(json.dumps({"run_seconds": report.seconds, "process_seconds": time.perf_counter() - t0,
                  "sampler_steps": report.sampler_steps,
                  "statuses": {r["title"]: r["status"] for r in report.as_json()["nodes"]}}))
"""


def fresh_process(graph_path: Path, cache: Path, out: Path) -> dict:
    env = {**os.environ, "LOOMWORK_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", FRESH_SCRIPT, str(graph_path), str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - start
    return result


def _cold_run(executor, graph, out: Path):
    """One run with the engine's caches emptied: (seconds, report)."""
    executor.memory.clear()
    executor.traces.clear()
    t = time.perf_counter()
    report = executor.run(graph, output_dir=out)
    return time.perf_counter() - t, report


def measure_overhead(executor, graph, reference, repeats: int, out: Path) -> tuple[bool, dict]:
    """1. The engine vs a hand-written loop, the model loaded once for both: (pixels identical,
    medians of interleaved repeats)."""
    import torch

    from app.engine import EngineEvents
    from kernels.images import resize

    captured = {}
    events = EngineEvents(images=lambda nid, im, paths: captured.__setitem__("image", im))
    executor.run(graph, events=events, output_dir=out)  # load the model once
    ref_image = reference()
    ref_scaled = resize(ref_image, ref_image.shape[2] * 4, ref_image.shape[1] * 4, "bicubic")
    identical = bool(torch.equal(captured["image"], ref_scaled))
    assert identical, "engine pixels differ from the hand-written loop"
    engine_times, loop_times = [], []
    for _ in range(repeats):
        engine_times.append(_cold_run(executor, graph, out)[0])
        t = time.perf_counter()
        reference()
        loop_times.append(time.perf_counter() - t)
    engine_s, loop_s = statistics.median(engine_times), statistics.median(loop_times)
    return identical, {"engine_s": round(engine_s, 4), "hand_loop_s": round(loop_s, 4),
                       "ratio": round(engine_s / loop_s, 4), "target": 1.03}


def measure_edits(executor, graph, ids: dict, out: Path) -> tuple[dict, dict]:
    """2. A full run vs re-running after editing the last computing node (the scale factor);
    3. a no-op upstream edit (whitespace in the prompt)."""
    full_s, _ = _cold_run(executor, graph, out)
    graph.set_param(ids["scale"], "factor", 3.0)
    t = time.perf_counter()
    last_report = executor.run(graph, output_dir=out)
    last_s = time.perf_counter() - t
    graph.set_param(ids["text"], "text", PROMPT.replace(" ", "  ") + " ")
    noop = executor.run(graph, output_dir=out)
    return ({"full_run_s": round(full_s, 4), "edit_run_s": round(last_s, 4),
             "ratio": round(last_s / full_s, 4), "ran": [last_report.nodes[n].title for n in last_report.ran()],
             "target": 0.05},
            {"sampler_steps": noop.sampler_steps, "ran": [noop.nodes[n].title for n in noop.ran()], "target": 0})


def measure_fresh_process(graph, tmp: Path) -> dict:
    """4. A new process on an empty disk tier vs one on the warm tier the first one left."""
    from app.graph import save

    path = tmp / "bench.loom"
    save(graph, path)
    cold = fresh_process(path, tmp / "cache", tmp / "out1")
    warm = fresh_process(path, tmp / "cache", tmp / "out2")
    return {"cold_run_s": round(cold["run_seconds"], 4), "warm_run_s": round(warm["run_seconds"], 4),
            "ratio": round(warm["run_seconds"] / cold["run_seconds"], 4),
            "cold_wall_s": round(cold["wall_seconds"], 3), "warm_wall_s": round(warm["wall_seconds"], 3),
            "wall_ratio": round(warm["wall_seconds"] / cold["wall_seconds"], 4),
            "warm_statuses": warm["statuses"], "warm_sampler_steps": warm["sampler_steps"],
            "target": 0.15}


def main() -> None:
    import torch

    from app.cli import set_threads
    from app.engine import Executor
    from kernels.tiny import build_tiny_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / "resources/models/shapes-t2i"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    set_threads()
    tmp = Path(tempfile.mkdtemp(prefix="loomwork-bench-"))
    model = args.model
    if not (Path(model) / "model_index.json").exists():
        model = build_tiny_model(str(tmp / "tiny"), kind="latent")
        args.size = max(args.size, 64)

    reference = hand_written_loop(model, args.steps, args.size, tmp)
    graph, ids = build_graph(model, args.steps, args.size)
    executor = Executor(device="cpu", disk_cache=False)
    identical, overhead = measure_overhead(executor, graph, reference, args.repeats, tmp / "out")
    last_node_edit, noop_upstream_edit = measure_edits(executor, graph, ids, tmp / "out")
    print(json.dumps({
        "model": model, "steps": args.steps, "size": args.size, "torch_threads": torch.get_num_threads(),
        "pixels_identical": identical, "overhead": overhead, "last_node_edit": last_node_edit,
        "noop_upstream_edit": noop_upstream_edit, "fresh_process": measure_fresh_process(graph, tmp),
    }, indent=2))


if __name__ == "__main__":
    main()
