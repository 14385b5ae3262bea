"""`loomwork convert`: a diffusers folder to an original-layout single file, and back.

folder -> file reads each component's safetensors (no module is built) and renames its tensors
with kernels.convert; file -> folder loads the file as LoadModel does (kernels.single_file) and
saves each module with `save_pretrained`, beside the config folder's tokenizers and scheduler.
Both write to a temporary name and rename at the end, so a failed conversion leaves nothing
half-written at the destination.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import torch

from kernels import convert as layout
from kernels.files import atomic_write
from kernels.model_configs import config_folder_family
from kernels.models import ModelLoadError, read_model_index

WRITABLE_FAMILIES = ("sd1", "sd2", "sdxl", "sd3")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def read_component(folder: str, name: str) -> tuple[dict, dict]:
    """(state dict, config) of a folder's component, from its safetensors (sharded or not)."""
    from safetensors.torch import load_file

    sub = os.path.join(folder, name)
    with open(os.path.join(sub, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    for weights in WEIGHT_FILES:
        path = os.path.join(sub, weights)
        if os.path.isfile(path):
            return load_file(path), config
        index_path = path.replace(".safetensors", ".safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state: dict = {}
            for shard in shards:
                state.update(load_file(os.path.join(sub, shard)))
            return state, config
    raise ModelLoadError(f"{sub}: no safetensors weights ({' or '.join(WEIGHT_FILES)})")


def folder_family(folder: str, family: Optional[str] = None) -> str:
    """The family a folder converts as: given, or read from the folder (a folder that says only
    "SD 1 or 2" converts as SD 1, whose CLIP layout it then has)."""
    found = config_folder_family(folder)
    if family:
        if found not in ("unknown", "sd1/sd2") and found != family:
            raise ModelLoadError(f"{folder}: a {found} folder, not {family}")
        return family
    family = {"sd1/sd2": "sd1"}.get(found, found)
    if family == "flux":
        raise ModelLoadError(f"{folder}: writing FLUX single files is not supported yet (FLUX "
                             f"single files load; convert them with --to diffusers)")
    if family not in WRITABLE_FAMILIES:
        raise ModelLoadError(f"{folder}: cannot tell its family ({found}); pass one of {', '.join(WRITABLE_FAMILIES)}")
    return family


def folder_to_original(folder: str, family: Optional[str] = None) -> dict:
    """The folder's weights under the original single-file names of its family."""
    index = read_model_index(folder)
    family = folder_family(folder, family)

    def has(name):
        spec = index.get(name)
        return bool(spec) and spec != [None, None]

    out: dict = {}
    if family in ("sd1", "sd2", "sdxl"):
        state, config = read_component(folder, "unet")
        out.update(layout.prefixed(layout.unet_to_ldm(state, config), layout.UNET_PREFIX))
    else:
        state, config = read_component(folder, "transformer")
        out.update(layout.prefixed(layout.sd3_to_original(state, config), layout.UNET_PREFIX))
    if has("vae"):
        state, config = read_component(folder, "vae")
        out.update(layout.prefixed(layout.vae_to_ldm(state, config), layout.VAE_PREFIX))
    if family == "sd1":
        out.update(layout.clip_to_ldm(read_component(folder, "text_encoder")[0], layout.SD1_CLIP_PREFIX))
    elif family == "sd2":
        out.update(layout.clip_to_open_clip(read_component(folder, "text_encoder")[0], layout.SD2_OPEN_CLIP_PREFIX))
    elif family == "sdxl":
        out.update(layout.clip_to_ldm(read_component(folder, "text_encoder")[0], layout.SDXL_CLIP_PREFIX))
        out.update(layout.clip_to_open_clip(read_component(folder, "text_encoder_2")[0],
                                            layout.SDXL_OPEN_CLIP_PREFIX))
    else:
        for name, prefix in (("text_encoder", layout.SD3_CLIP_L_PREFIX), ("text_encoder_2", layout.SD3_CLIP_G_PREFIX)):
            out.update(layout.prefixed(layout.clip_state(read_component(folder, name)[0]), prefix))
        if has("text_encoder_3"):
            out.update(layout.prefixed(read_component(folder, "text_encoder_3")[0], layout.SD3_T5_PREFIX))
    return out


def folder_to_single_file(folder: str, out_path: str, family: Optional[str] = None,
                          dtype: Optional[torch.dtype] = None) -> str:
    """Write the folder as one original-layout `.safetensors` file at `out_path`."""
    from safetensors.torch import save_file

    tensors = folder_to_original(folder, family)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    atomic_write(out_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    return out_path


def _file_dtype(path: str) -> torch.dtype:
    from kernels.single_file import SingleFile

    sf = SingleFile(path)
    first = next(k for k in sf.keys if k.endswith(".weight"))
    return sf.tensors(lambda k: k == first)[first].dtype


def single_file_to_folder(path: str, out_dir: str, config: Optional[str] = None,
                          dtype: Optional[torch.dtype] = None) -> str:
    """Write a checkpoint file as a diffusers folder at `out_dir` (weights in the file's dtype
    unless `dtype` is given; configs, tokenizers and scheduler from the config folder)."""
    from kernels.single_file import config_source, load_checkpoint_file, open_checkpoint

    if os.path.exists(out_dir):
        raise ModelLoadError(f"{out_dir}: already exists; choose a new folder")
    _sf, family = open_checkpoint(path)
    source = config_source(path, family, config)
    model, clip, vae = load_checkpoint_file(path, dtype or _file_dtype(path), "cpu", config)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert.", dir=parent)
    try:
        index = dict(source.index())
        denoiser = "unet" if family in ("sd1", "sd2", "sdxl") else "transformer"
        modules = {denoiser: model.unet, "vae": vae.vae}
        tokenizers = {}
        encoders, toks = clip.text_encoder, clip.tokenizer
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            module = encoders if name == "text_encoder" and family in ("sd1", "sd2") else getattr(encoders, name, None)
            if module is not None:
                modules[name] = module
                tok_name = name.replace("text_encoder", "tokenizer")
                tokenizers[tok_name] = toks if family in ("sd1", "sd2") else getattr(toks, tok_name)
        for name, module in modules.items():
            if module is not None:
                module.save_pretrained(os.path.join(tmp, name), safe_serialization=True)
        for name, tok in tokenizers.items():
            tok.save_pretrained(os.path.join(tmp, name))
        for name in ("text_encoder_3", "tokenizer_3", "vae"):
            if name in index and name not in modules and name not in tokenizers:
                index[name] = [None, None]
        os.makedirs(os.path.join(tmp, "scheduler"))
        with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
            json.dump(model.scheduler_config, f, indent=2)
        with open(os.path.join(tmp, "model_index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
