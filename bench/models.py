"""Model families benchmark: prints JSON.

For each family's tiny random folder (SD 1.x latent UNet, SDXL, SD3, FLUX.1 dev): the time to load
it with `load_model_folder`, and the engine's text-to-image latent against the family's diffusers
pipeline on the same folder, seed and steps (latents asserted identical first; then interleaved
repeats, medians and their ratio). Tiny models make the fixed costs around the denoiser loud, so
the ratio is an upper bound on what the engine adds.

Usage: python bench/models.py [--steps N] [--repeats N] [--families sd1,sdxl,sd3,flux]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "a red circle on the left"
SIZE = 16
SEED = 3


def build_family(family: str, folder: str) -> tuple[str, dict]:
    """(the folder built, how the family's graph and pipeline are called)."""
    from kernels import tiny, tiny_flux

    if family == "sd1":
        tiny.build_tiny_model(folder, kind="latent")
        # steps_offset 1, as SD 1.x checkpoints ship it: StableDiffusionPipeline rewrites any other
        # value to 1 when it is built, which would compare two schedules
        config_path = Path(folder) / "scheduler" / "scheduler_config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "steps_offset": 1}))
        return folder, {"scheduler": "euler", "cfg": 4.0}
    if family == "sdxl":
        return tiny.build_tiny_sdxl_model(folder), {"scheduler": "euler", "cfg": 4.0}
    if family == "sd3":
        return tiny.build_tiny_sd3_model(folder), {"scheduler": "flow_match_euler", "cfg": 4.0,
                                                   "pipe": {"max_sequence_length": 16}}
    if family == "flux":
        return tiny_flux.build_tiny_flux_model(folder), {"scheduler": "flow_match_euler", "cfg": 3.5,
                                                         "pipe": {"max_sequence_length": 16}}
    raise ValueError(f"unknown family {family!r}")


def pipeline_for(family: str, folder: str, scheduler: str):
    """The family's own diffusers pipeline over the folder."""
    import diffusers

    from kernels.models import load_model_folder
    from kernels.sampling import make_scheduler

    if family == "sd1":  # the tiny folder is not a StableDiffusionPipeline folder: assemble it
        model, clip, vae = load_model_folder(folder)
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae.vae, text_encoder=clip.text_encoder, tokenizer=clip.tokenizer, unet=model.unet,
            scheduler=make_scheduler(scheduler, model.scheduler_config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    else:
        cls = {"sdxl": diffusers.StableDiffusionXLPipeline, "sd3": diffusers.StableDiffusion3Pipeline,
               "flux": diffusers.FluxPipeline}[family]
        pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def engine_runner(folder: str, how: dict, steps: int):
    """A function that renders the txt2img graph's latent in a fresh executor (models stay loaded)."""
    from app.engine import Executor
    from nodes.registry import add_node
    from tests.conftest import CAPTURED, txt2img_graph

    g, ids = txt2img_graph(folder, prompt=PROMPT, steps=steps, size=SIZE, seed=SEED,
                           scheduler=how["scheduler"], cfg=how["cfg"], save=False)
    capture = add_node(g, "TestCaptureLatent", {}).id
    g.connect(ids["sampler"], "latent", capture, "latent")
    ex = Executor(device="cpu", disk_cache=False)
    out = tempfile.mkdtemp()

    def run():
        ex.memory.clear()  # every repeat encodes and samples again; the model stays loaded
        ex.traces.clear()
        assert ex.run(g, output_dir=out).ok
        return CAPTURED.pop("latent")
    return run


def pipeline_runner(family: str, folder: str, how: dict, steps: int):
    import torch

    pipe = pipeline_for(family, folder, how["scheduler"])

    def run():
        latents = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=how["cfg"],
                       generator=torch.Generator().manual_seed(SEED), output_type="latent",
                       **how.get("pipe", {})).images
        if family == "flux":  # FluxPipeline returns packed latents
            latents = pipe._unpack_latents(latents, SIZE, SIZE, pipe.vae_scale_factor)
        return latents
    return run


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_family(family: str, steps: int, repeats: int) -> dict:
    import torch

    from kernels.models import load_model_folder

    folder, how = build_family(family, os.path.join(tempfile.mkdtemp(), family))
    load_s = statistics.median(timed(lambda: load_model_folder(folder)) for _ in range(3))
    engine, pipe = engine_runner(folder, how, steps), pipeline_runner(family, folder, how, steps)
    ours, theirs = engine(), pipe()
    identical = bool(torch.equal(ours, theirs))
    engine_s, pipe_s = [], []
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits both alike
        engine_s.append(timed(engine))
        pipe_s.append(timed(pipe))
    e, p = statistics.median(engine_s), statistics.median(pipe_s)
    return {"load_folder_s": round(load_s, 4), "latents_identical": identical,
            "engine_s": round(e, 4), "pipeline_s": round(p, 4), "ratio": round(e / p, 4),
            "target_ratio": 1.03, "steps": steps, "size": SIZE}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--families", default="sd1,sdxl,sd3,flux")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from kernels.models import quiet_hub_libraries

    quiet_hub_libraries()
    report = {"bench": "models", "torch_threads": args.threads, "families": {}}
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        report["families"][family] = bench_family(family, args.steps, args.repeats)
        print(family, report["families"][family], file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
