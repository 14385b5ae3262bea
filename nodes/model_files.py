"""Loaders for a model kept as separate files, as artists keep FLUX and SD3: the diffusion
model (a transformer or UNet file), its text encoders (CLIP-L, CLIP-G, T5 files) and its VAE.

The diffusion model and each text encoder go through the model manager by their own path, so
a text encoder shared by two graphs loads once (a VAE file is small and loads in its node); a
`config` folder (a diffusers folder whose configs and tokenizers replace
the shipped ones) changes what a file loads as, so with one the files load here instead.
"""

from __future__ import annotations

import functools

from kernels.files import path_fingerprint

from .base import CLIP, MODEL, VAE, Choice, Node, NodeError, Path
from .core import DTYPES
from .registry import register

FAMILIES = ("flux", "sd3", "sdxl", "sd1", "sd2")
CONFIG_HELP = ("a diffusers folder whose configs and tokenizers replace the shipped ones "
               "(e.g. one holding T5's tokenizer as tokenizer_2 for FLUX, tokenizer_3 for SD3)")


# the models-folder kinds each loader's `ckpt:NAME` is looked up among
DENOISER_KINDS = ("diffusion_model", "checkpoint")
TEXT_ENCODER_KINDS = ("text_encoder",)
VAE_KINDS = ("vae",)


def _fingerprint(ctx, *paths, kinds=None):
    return tuple(path_fingerprint(ctx.resolve_path(p, kinds=kinds)) if p else None for p in paths)


def _dtype(name: str):
    import torch

    return getattr(torch, name)


@register
class LoadDiffusionModel(Node):
    """Load the denoiser alone from a `.safetensors` file: a FLUX.1 or SD3 transformer file as
    published (flux1-dev.safetensors, ...), a UNet file, or a whole checkpoint (its other parts
    are not read). The family is told from the file; pair it with LoadTextEncoders and LoadVAE."""

    category = "loaders"
    params = {
        "path": Path("", mode="file", filters="Safetensors (*.safetensors *.sft)", models=DENOISER_KINDS,
                     help="a transformer or UNet .safetensors file"),
        "dtype": Choice(DTYPES, "float32", help="weights precision; float16 halves memory on GPUs"),
        "config": Path("", mode="folder", help=CONFIG_HELP),
    }
    outputs = {"model": MODEL}

    @classmethod
    def fingerprint(cls, params, ctx):
        return _fingerprint(ctx, params["path"], kinds=DENOISER_KINDS) + _fingerprint(ctx, params.get("config"))

    def run(self, ctx, path, dtype, config=""):
        from kernels.models import ModelLoadError
        from kernels.single_file import load_diffusion_model_file

        file = ctx.resolve_path(path, kinds=DENOISER_KINDS)
        try:
            if config:
                model = load_diffusion_model_file(file, _dtype(dtype), ctx.device, ctx.resolve_path(config))
            else:
                model = ctx.models.load(file, dtype, load_diffusion_model_file)
        except ModelLoadError as exc:
            raise NodeError(str(exc)) from None
        return {"model": model}


@register
class LoadTextEncoders(Node):
    """Load a family's text encoders from separate files (transformers' layout, as ComfyUI's
    `text_encoders` folder holds them): FLUX takes CLIP-L and T5, SD3 CLIP-L, CLIP-G and
    optionally T5, SDXL CLIP-L and CLIP-G. T5's tokenizer is not shipped with Loomwork: give a
    config folder that holds it."""

    category = "loaders"
    params = {
        "family": Choice(FAMILIES, "flux", help="the model family the encoders are for"),
        "clip_l": Path("", mode="file", filters="Safetensors (*.safetensors *.sft)", models=TEXT_ENCODER_KINDS, help="CLIP-L (ViT-L/14) file"),
        "clip_g": Path("", mode="file", filters="Safetensors (*.safetensors *.sft)", models=TEXT_ENCODER_KINDS, help="CLIP-G (bigG) file: SD3, SDXL"),
        "t5": Path("", mode="file", filters="Safetensors (*.safetensors *.sft)", models=TEXT_ENCODER_KINDS, help="T5-XXL encoder file: FLUX, SD3"),
        "dtype": Choice(DTYPES, "float32", help="weights precision; float16 halves memory on GPUs"),
        "config": Path("", mode="folder", help=CONFIG_HELP),
    }
    outputs = {"clip": CLIP}

    @classmethod
    def fingerprint(cls, params, ctx):
        return _fingerprint(ctx, params.get("clip_l"), params.get("clip_g"), params.get("t5"),
                            kinds=TEXT_ENCODER_KINDS) + _fingerprint(ctx, params.get("config"))

    def run(self, ctx, family, clip_l, clip_g, t5, dtype, config=""):
        from kernels.models import ModelLoadError
        from kernels.single_file import load_text_encoder_files
        from kernels.text_encoder_files import load_text_encoder_file

        files = {role: ctx.resolve_path(p, kinds=TEXT_ENCODER_KINDS) for role, p in (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5)) if p}
        load = None
        if not config:
            def load(path, role):  # one file, shared through the model manager
                return ctx.models.load(path, dtype, functools.partial(load_text_encoder_file, role=role))
        try:
            clip = load_text_encoder_files(family, files, _dtype(dtype), ctx.device,
                                           ctx.resolve_path(config) if config else None, load=load)
        except ModelLoadError as exc:
            raise NodeError(str(exc)) from None
        return {"clip": clip}


@register
class LoadVAE(Node):
    """Load a VAE from a `.safetensors` file in the original layout (FLUX's ae.safetensors,
    sdxl_vae.safetensors, ...) or a checkpoint's VAE part; the family gives its latent scaling."""

    category = "loaders"
    params = {
        "path": Path("", mode="file", filters="Safetensors (*.safetensors *.sft)", models=VAE_KINDS,
                     help="a VAE .safetensors file"),
        "family": Choice(FAMILIES, "flux", help="the model family the VAE belongs to (its latent scale and shift)"),
        "dtype": Choice(DTYPES, "float32", help="weights precision; float16 halves memory on GPUs"),
        "config": Path("", mode="folder", help=CONFIG_HELP),
    }
    outputs = {"vae": VAE}

    @classmethod
    def fingerprint(cls, params, ctx):
        return _fingerprint(ctx, params["path"], kinds=VAE_KINDS) + _fingerprint(ctx, params.get("config"))

    def run(self, ctx, path, family, dtype, config=""):
        from kernels.models import ModelLoadError
        from kernels.single_file import load_vae_file

        try:
            vae = load_vae_file(ctx.resolve_path(path, kinds=VAE_KINDS), family, _dtype(dtype), ctx.device,
                                ctx.resolve_path(config) if config else None)
        except ModelLoadError as exc:
            raise NodeError(str(exc)) from None
        return {"vae": vae}
