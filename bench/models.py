"""Model families benchmark: prints JSON.

For each family's tiny random folder (SD 1.x latent UNet, SDXL, SD3, FLUX.1 dev): the time to load
it with `load_model_folder`, and the engine's text-to-image latent against the family's diffusers
pipeline on the same folder, seed and steps (latents asserted identical first; then interleaved
repeats, medians and their ratio). Tiny models make the fixed costs around the denoiser loud, so
the ratio is an upper bound on what the engine adds.

Single files (`--load-repeats N`, 0 to skip): for each family, the time and peak RSS of loading
its single file (our converter's original-layout file; FLUX as a transformer file, CLIP-L/T5
files and an ae-layout VAE file) against loading its diffusers folder, each load in a fresh
child process (so its peak RSS is its own: VmHWM, with the peak after imports beside it),
the folder and file runs interleaved, medians. `--full sd1` adds a full-size SD 1.5 model of
random fp16 weights loaded through the shipped config skeleton (no config folder).

Usage: python bench/models.py [--steps N] [--repeats N] [--families sd1,sdxl,sd3,flux]
                              [--load-repeats N] [--full sd1]
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


# -- single files: load time and peak RSS, one child process per load ----------------------

def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM, which starts afresh at exec (ru_maxrss would carry the
    parent's peak into the child on Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_load(kind: str, path: str, config: str, dtype: str) -> dict:
    """Run in a child: import everything, then load once; the time and the peak RSS."""
    import torch

    from kernels.models import load_model_folder, quiet_hub_libraries
    from kernels.single_file import (
        load_checkpoint_file,
        load_diffusion_model_file,
        load_text_encoder_files,
        load_vae_file,
    )

    torch.set_num_threads(1)
    quiet_hub_libraries()
    import diffusers
    import transformers
    from diffusers.loaders import single_file_utils  # noqa: F401

    for name in ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel", "AutoencoderKL"):
        getattr(diffusers, name)  # diffusers imports its model modules on first use: not a load's cost
    for name in ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel", "CLIPTokenizer"):
        getattr(transformers, name)
    before = peak_rss_mb()
    t0 = time.perf_counter()
    dt = getattr(torch, dtype)
    if kind == "folder":
        bundles = load_model_folder(path, dt)
    elif kind == "file":
        bundles = load_checkpoint_file(path, dt, config=config or None)
    else:  # "parts": FLUX kept as files, `path` a JSON of them
        files = json.loads(path)
        bundles = (load_diffusion_model_file(files["transformer"], dt, config=config or None),
                   load_text_encoder_files("flux", {"clip_l": files["clip_l"], "t5": files["t5"]}, dt,
                                           config=config or None),
                   load_vae_file(files["vae"], "flux", dt, config=config or None))
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    # A folder's weights are mapped from its files and read in at first use: touch one element
    # per page of every weight, so both sides are compared with their weights resident.
    modules = (bundles[0].unet, bundles[1].text_encoder, bundles[2].vae)
    for module in modules:
        for p in module.parameters():
            p.detach().reshape(-1)[:: max(1, 4096 // p.element_size())].sum()
    return {"load_s": seconds, "peak_rss_mb": peak, "rss_after_imports_mb": before,
            "peak_rss_after_use_mb": peak_rss_mb()}


def _child_load(kind: str, path: str, config: str = "", dtype: str = "float32") -> dict:
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--measure-load", kind, path, config, dtype],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def single_file_cases(family: str, root: str) -> tuple[tuple, tuple]:
    """((kind, path, config) for the folder, the same for its single file)."""
    from safetensors.torch import save_file

    from kernels import convert as layout
    from kernels.convert_files import folder_to_single_file, read_component

    folder, _how = build_family(family, os.path.join(root, family))
    if family != "flux":
        file = folder_to_single_file(folder, os.path.join(root, f"{family}.safetensors"))
        return ("folder", folder, ""), ("file", file, folder)
    vae, config = read_component(folder, "vae")
    save_file(layout.vae_to_ldm(vae, config), os.path.join(root, "ae.safetensors"))
    files = {"transformer": os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"),
             "clip_l": os.path.join(folder, "text_encoder", "model.safetensors"),
             "t5": os.path.join(folder, "text_encoder_2", "model.safetensors"),
             "vae": os.path.join(root, "ae.safetensors")}
    return ("folder", folder, ""), ("parts", json.dumps(files), folder)


def build_full_sd1(root: str) -> tuple[tuple, tuple]:
    """A full-size SD 1.5 diffusers folder of patterned fp16 weights (no random init: it is slow
    and the values do not matter to a load) and its single file, loaded with the shipped
    skeleton."""
    import shutil

    import diffusers
    import torch
    import transformers

    from kernels.convert_files import folder_to_single_file
    from kernels.model_configs import ConfigSource, load_tokenizer

    source, folder = ConfigSource("sd1"), os.path.join(root, "sd15")
    shutil.copytree(source.shipped, folder)
    for name, spec in source.index().items():
        if name.startswith("_") or name in ("tokenizer", "scheduler"):
            continue
        cls = getattr(diffusers if spec[0] == "diffusers" else transformers, spec[1])
        with torch.device("meta"):
            module = cls.from_config(source.config(name)) if spec[0] == "diffusers" else \
                cls(cls.config_class.from_pretrained(source.shipped, subfolder=name))
        module = module.to_empty(device="cpu").half()
        with torch.no_grad():
            for i, p in enumerate(module.parameters()):
                p.copy_((torch.arange(p.numel()) % 251 + i).view(p.shape) / 256)
        module.save_pretrained(os.path.join(folder, name), safe_serialization=True)
        del module
    shutil.rmtree(os.path.join(folder, "tokenizer"))
    load_tokenizer(source, "tokenizer", folder).save_pretrained(os.path.join(folder, "tokenizer"))
    file = folder_to_single_file(folder, os.path.join(root, "sd15.safetensors"))
    return ("folder", folder, "", "float16"), ("file", file, "", "float16")


def bench_single_files(families, repeats: int, full) -> dict:
    root = tempfile.mkdtemp()
    cases = {f: single_file_cases(f, root) for f in families}
    if "sd1" in full:
        cases["sd1_full_fp16"] = build_full_sd1(root)
    report = {}
    for name, (folder_case, file_case) in cases.items():
        runs = {"folder": [], "file": []}
        for _ in range(repeats):  # interleaved
            runs["folder"].append(_child_load(*folder_case))
            runs["file"].append(_child_load(*file_case))
        med = {side: {key: round(statistics.median(r[key] for r in rs), 4) for key in rs[0]}
               for side, rs in runs.items()}
        report[name] = {"folder": med["folder"], "single_file": med["file"], "file_kind": file_case[0],
                        "load_ratio": round(med["file"]["load_s"] / med["folder"]["load_s"], 3),
                        "peak_rss_ratio": round(med["file"]["peak_rss_mb"] / med["folder"]["peak_rss_mb"], 3),
                        "peak_rss_after_use_ratio": round(med["file"]["peak_rss_after_use_mb"]
                                                          / med["folder"]["peak_rss_after_use_mb"], 3),
                        "repeats": repeats}
        print(name, report[name], file=sys.stderr, flush=True)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--families", default="sd1,sdxl,sd3,flux")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--load-repeats", type=int, default=3, help="single-file load runs per side; 0 skips")
    parser.add_argument("--full", default="", help="full-size models to add to the load measurement: sd1")
    parser.add_argument("--measure-load", nargs=4, metavar=("KIND", "PATH", "CONFIG", "DTYPE"),
                        help=argparse.SUPPRESS)  # the child process of a load measurement
    args = parser.parse_args(argv)
    if args.measure_load:
        print(json.dumps(measure_load(*args.measure_load)))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    from kernels.models import quiet_hub_libraries

    quiet_hub_libraries()
    report = {"bench": "models", "torch_threads": args.threads, "families": {}}
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        report["families"][family] = bench_family(family, args.steps, args.repeats)
        print(family, report["families"][family], file=sys.stderr, flush=True)
    if args.load_repeats:
        families = [f.strip() for f in args.families.split(",") if f.strip()]
        report["single_file_loads"] = bench_single_files(families, args.load_repeats,
                                                         [f for f in args.full.split(",") if f])
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
