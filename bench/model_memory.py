"""Model memory: one copy of each weight when loading, and the RAM budget's drop order.

Cases (each measured in a child process of its own, so one case's memory is not another's):

- `tiny-eviction` (always): three tiny random models under a RAM budget of 2.5 models, loaded
  A, B, A, C, B through app.engine.models.ModelManager: which models stay, in LRU order, the
  measured bytes and the drops after each load.
- `sdxl-unet` (`--full`: needs about 6 GB of RAM and a few minutes): a full-size SDXL UNet
  (diffusers UNet2DConditionModel with SDXL base's config, random weights, float16) saved as one
  safetensors file in a diffusers folder, then loaded in float16 through the model manager and
  kernels.models.load_components, the loader LoadModel uses. The child's peak RSS
  (getrusage ru_maxrss) is reported before loading (the interpreter, torch and diffusers),
  after loading, and after reading every weight once (all its pages resident), beside the
  file's size: one copy of the weights means peak minus baseline is about the file's size,
  not twice it.
- `sdxl-unet-copying` (`--full --contrast`): the same file loaded the copying way (the UNet
  built in float16, then `load_state_dict` from `safetensors.torch.load_file`), for scale.

    python bench/model_memory.py                 # tiny eviction only, seconds
    python bench/model_memory.py --full --out bench/results/model_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Stable Diffusion XL base 1.0's UNet config (its unet/config.json), written out so nothing is fetched.
SDXL_UNET_CONFIG = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
    "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None, "use_linear_projection": True,
}
SDXL_UNET_PARAMETERS = 2_567_463_684  # SDXL base's UNet, for a check that the config is right
UNET_INDEX = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}


def peak_rss() -> int:
    """This process's peak resident set in bytes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gib(n: float) -> float:
    return round(n / 2**30, 3)


# -- children --------------------------------------------------------------------------------

def build_sdxl_unet(folder: str) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)  # build in float16: a float32 build would need 10 GB
    unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    params = sum(p.numel() for p in unet.parameters())
    unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True, max_shard_size="20GB")
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(UNET_INDEX, f)
    return {"parameters": params}


def load_unet_through_manager(folder: str) -> dict:
    import torch

    from app.engine.models import ModelManager
    from kernels.memory import module_bytes
    from kernels.models import load_components

    def load_unet(path, dtype, device):
        return load_components(path, UNET_INDEX, ("unet",), dtype, device)["unet"]

    import accelerate  # noqa: F401  (the libraries the load imports belong to the baseline)
    import diffusers

    diffusers.UNet2DConditionModel  # noqa: B018  (its module is imported on first access)
    baseline = peak_rss()
    started = time.perf_counter()
    manager = ModelManager("cpu", ram_budget="16G")
    unet = manager.load(folder, "float16", load_unet)
    loaded_s = time.perf_counter() - started
    after_load = peak_rss()
    checksum = 0.0
    with torch.no_grad():
        for p in unet.parameters():  # reads every page of every weight
            checksum += float(p.sum(dtype=torch.float32))  # no float32 copy of the weight
    return {"baseline_rss": baseline, "peak_rss_after_load": after_load,
            "peak_rss_after_reading_all_weights": peak_rss(), "load_seconds": round(loaded_s, 2),
            "weights_bytes": sum(module_bytes([unet]).values()), "ram_used": manager.ram_used(),
            "dtype": str(unet.dtype), "checksum_finite": checksum == checksum}


def write_single_file(folder: str) -> dict:
    """The UNet as an original-layout (SGM) single file, `model.diffusion_model.*` keys, written
    by our converter from the folder's weights (mapped, so nothing is copied twice)."""
    from safetensors.torch import load_file, save_file

    from kernels.convert import prefixed, unet_to_ldm

    with open(os.path.join(folder, "unet", "config.json")) as f:
        config = json.load(f)
    state = load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    save_file(prefixed(unet_to_ldm(state, config), "model.diffusion_model."), os.path.join(folder, "sdxl-unet.safetensors"))
    return {"tensors": len(state)}


def load_single_file_through_manager(folder: str) -> dict:
    """The same UNet loaded from the single file through LoadDiffusionModel's loader."""
    import diffusers
    import torch

    from app.engine.models import ModelManager
    from kernels.memory import module_bytes
    from kernels.single_file import load_diffusion_model_file

    diffusers.UNet2DConditionModel  # noqa: B018  (its module is imported on first access)
    file = os.path.join(folder, "sdxl-unet.safetensors")
    baseline = peak_rss()
    started = time.perf_counter()
    manager = ModelManager("cpu", ram_budget="16G")
    unet = manager.load(file, "float16", load_diffusion_model_file).unet
    loaded_s = time.perf_counter() - started
    after_load = peak_rss()
    checksum = 0.0
    with torch.no_grad():
        for p in unet.parameters():
            checksum += float(p.sum(dtype=torch.float32))
    return {"baseline_rss": baseline, "peak_rss_after_load": after_load,
            "peak_rss_after_reading_all_weights": peak_rss(), "load_seconds": round(loaded_s, 2),
            "weights_bytes": sum(module_bytes([unet]).values()), "dtype": str(unet.dtype),
            "checksum_finite": checksum == checksum}


def load_unet_by_copying(folder: str) -> dict:
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    baseline = peak_rss()
    torch.set_default_dtype(torch.float16)
    unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    unet.load_state_dict(load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")))
    return {"baseline_rss": baseline, "peak_rss_after_load": peak_rss(),
            "peak_rss_after_reading_all_weights": peak_rss()}


def tiny_eviction(folder: str) -> dict:
    from app.engine.models import ModelManager
    from kernels.memory import module_bytes, modules_in
    from kernels.models import load_model_folder
    from kernels.tiny import build_tiny_model

    paths = {name: build_tiny_model(os.path.join(folder, name), seed=i) for i, name in enumerate("ABC")}
    size = sum(module_bytes(modules_in(load_model_folder(paths["A"]))).values())
    manager = ModelManager("cpu", ram_budget=int(size * 2.5))
    names = {p: n for n, p in paths.items()}
    steps = []
    for name in "ABACB":
        manager.load(paths[name], "float32", load_model_folder)
        usage = manager.usage()
        steps.append({"load": name, "kept_oldest_first": [names[m["source"]] for m in usage["models"]],
                      "ram_used": usage["ram_used"], "loads": manager.loads, "drops": manager.drops})
    return {"model_bytes": size, "ram_budget": manager.ram_budget, "steps": steps}


CASES = {"build": build_sdxl_unet, "sdxl-unet": load_unet_through_manager,
         "sdxl-unet-copying": load_unet_by_copying, "tiny-eviction": tiny_eviction,
         "write-single-file": write_single_file, "sdxl-unet-single-file": load_single_file_through_manager}


def run_child(case: str, folder: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, __file__, "--child", case, "--dir", folder],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize_load(result: dict, file_bytes: int) -> dict:
    added = result["peak_rss_after_reading_all_weights"] - result["baseline_rss"]
    out = {f"{k}_gib" if "rss" in k or k.endswith("_bytes") else k: gib(v) if "rss" in k or k.endswith("_bytes") else v
           for k, v in result.items()}
    return {**out, "added_peak_gib": gib(added), "added_peak_over_file_size": round(added / file_bytes, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also the full-size SDXL UNet (about 6 GB RAM)")
    parser.add_argument("--contrast", action="store_true", help="with --full: also load it by copying")
    parser.add_argument("--single-file", action="store_true",
                        help="with --full: also write it as an original-layout single file and load that")
    parser.add_argument("--dir", help="where to write the models (default: a temporary folder)")
    parser.add_argument("--out", help="write the JSON here too")
    parser.add_argument("--child", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(CASES[args.child](args.dir)))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        report: dict = {"tiny_eviction": run_child("tiny-eviction", os.path.join(folder, "tiny"))}
        if args.full:
            unet_folder = os.path.join(folder, "sdxl-unet")
            built = run_child("build", unet_folder)
            if built["parameters"] != SDXL_UNET_PARAMETERS:
                raise SystemExit(f"the UNet has {built['parameters']} parameters, not SDXL's {SDXL_UNET_PARAMETERS}")
            file = os.path.join(unet_folder, "unet", "diffusion_pytorch_model.safetensors")
            size = os.path.getsize(file)
            report["sdxl_unet"] = {"parameters": built["parameters"], "file_gib": gib(size),
                                   "format": "diffusers folder, unet/diffusion_pytorch_model.safetensors (one file)",
                                   "through_model_manager": summarize_load(run_child("sdxl-unet", unet_folder), size)}
            if args.contrast:
                report["sdxl_unet"]["by_copying"] = summarize_load(run_child("sdxl-unet-copying", unet_folder), size)
            if args.single_file:
                run_child("write-single-file", unet_folder)
                single = os.path.join(unet_folder, "sdxl-unet.safetensors")
                report["sdxl_unet"]["single_file"] = {
                    "format": "original (SGM) layout, model.diffusion_model.* keys, written by kernels.convert",
                    "file_gib": gib(os.path.getsize(single)),
                    "through_model_manager": summarize_load(run_child("sdxl-unet-single-file", unet_folder),
                                                            os.path.getsize(single))}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
