"""Upscaling nodes: super-resolution models through spandrel (tiled within a memory budget),
latent interpolation, and the hires fix in one node.

Kernels are imported inside `run`, as in nodes/core.py: the catalogue loads without torch.
"""

from __future__ import annotations

import logging

from kernels.files import path_fingerprint
from kernels.scheduler_names import SCHEDULER_NAMES  # torch-free

from .base import (
    CONDITIONING,
    IMAGE,
    LATENT,
    MODEL,
    UPSCALE_MODEL,
    VAE,
    Bool,
    Choice,
    Float,
    Int,
    Node,
    NodeError,
    Path,
    Seed,
)
from .core import DTYPES, VAE_TILE_PARAMS, Sampler, VAEDecode, VAEEncode
from .registry import register

log = logging.getLogger(__name__)

UPSCALE_FILTERS = "Upscale models (*.safetensors *.pth *.pt *.ckpt *.bin)"
# Kept equal to kernels.upscale (checked by a test): the catalogue must not import torch.
DEFAULT_OVERLAP = 32
DEFAULT_MEMORY_BUDGET_MB = 2048
LATENT_METHODS = ("nearest-exact", "bilinear", "bicubic")
PIXEL_METHODS = ("nearest", "bilinear", "bicubic", "lanczos")


def resolve_upscale_path(ctx, path: str) -> str:
    """`ckpt:NAME` is looked up among the upscale models of the model folders."""
    return ctx.resolve_path(path, kinds=("upscale_model",))


@register
class LoadUpscaleModel(Node):
    """Load a super-resolution model file (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, SPAN and the
    other architectures spandrel detects from the weights). `.safetensors`, or a `.pth` that
    holds only tensors: a pickle holding anything else is refused, never run. `ckpt:NAME` names
    a model in the models folders' upscale_models (or ESRGAN) folder."""

    category = "loaders"
    params = {
        "path": Path("", mode="file", filters=UPSCALE_FILTERS, help="the upscale model file"),
        "dtype": Choice(DTYPES, "float32", help="weights precision; float16 halves memory on GPUs"),
    }
    outputs = {"upscale_model": UPSCALE_MODEL}

    @classmethod
    def fingerprint(cls, params, ctx):
        return path_fingerprint(resolve_upscale_path(ctx, params["path"])) if params["path"] else None

    def run(self, ctx, path, dtype):
        from kernels.models import ModelLoadError
        from kernels.upscale.model_upscale import UpscaleModelError, load_upscale_model

        if not path:
            raise NodeError("no upscale model file chosen")
        file = resolve_upscale_path(ctx, path)
        try:
            return {"upscale_model": ctx.models.load(file, dtype, load_upscale_model)}
        except (UpscaleModelError, ModelLoadError) as exc:  # ModelLoadError: the models' RAM budget
            raise NodeError(str(exc)) from None


def upscale_with_model(ctx, upscale_model, image, tile: int, overlap: int, memory_budget_mb: int):
    """The tiled model run of UpscaleWithModel (HiresFix uses it too); logs the tile it used."""
    from kernels.upscale.model_upscale import UpscaleModelError, plan_upscale, upscale_images

    n, h, w, _ = image.shape
    try:
        plan = plan_upscale(upscale_model, h, w, batch=n, tile=tile, overlap=overlap,
                            memory_budget=memory_budget_mb << 20)
        if plan.clamped:
            log.warning("UpscaleWithModel: tile %d is larger than the %dx%d image; used %dx%d",
                        tile, w, h, plan.tile_w, plan.tile_h)
        log.info("UpscaleWithModel: %s x%d, %d tile(s) of %dx%d, overlap %d, about %d MB",
                 upscale_model.architecture, upscale_model.scale, plan.tiles, plan.tile_w,
                 plan.tile_h, plan.overlap, plan.estimated_bytes >> 20)
        return upscale_images(upscale_model, image, plan,
                              progress=lambda i, total: ctx.progress(i, total, sampler_step=False))
    except UpscaleModelError as exc:
        raise NodeError(str(exc)) from None


@register
class UpscaleWithModel(Node):
    """Upscale images with a super-resolution model, tile by tile: overlapping tiles are
    feathered together, so the result matches one pass away from the seams. Tile 0 takes the
    largest tile the memory budget allows; a tile larger than the image is clamped to it (the
    log says what was used)."""

    category = "image"
    inputs = {"upscale_model": UPSCALE_MODEL, "image": IMAGE}
    params = {
        "tile": Int(0, 0, 8192, step=32, help="tile side in input pixels; 0 = largest that fits the budget"),
        "overlap": Int(DEFAULT_OVERLAP, 0, 512, step=8, help="input pixels neighbouring tiles share"),
        "memory_budget_mb": Int(DEFAULT_MEMORY_BUDGET_MB, 64, 1 << 20, step=256,
                                help="memory for the result and one tile's activations"),
    }
    outputs = {"image": IMAGE}

    @classmethod
    def memory_estimate(cls, params, input_sizes, ctx):
        from kernels.run_memory import ASSUMED_UPSCALE, Estimate

        image = input_sizes.get("image")  # the model's scale is not known before it loads
        if image is None:
            return None
        return Estimate({"image": image.scaled(ASSUMED_UPSCALE)}, params["memory_budget_mb"] << 20)

    def run(self, ctx, upscale_model, image, tile, overlap, memory_budget_mb):
        return {"image": upscale_with_model(ctx, upscale_model, image, tile, overlap, memory_budget_mb)}


@register
class LatentUpscale(Node):
    """Resize latents by interpolation (a hires fix's cheap upscale: sample again after it)."""

    category = "latent"
    inputs = {"latent": LATENT}
    params = {"factor": Float(2.0, 0.25, 8.0, step=0.25, help="size multiplier"),
              "method": Choice(LATENT_METHODS, "bilinear")}
    outputs = {"latent": LATENT}

    @classmethod
    def memory_estimate(cls, params, input_sizes, ctx):
        from kernels.run_memory import Estimate

        latent = input_sizes.get("latent")
        return None if latent is None else Estimate({"latent": latent.scaled(params["factor"])})

    def run(self, ctx, latent, factor, method):
        from kernels.upscale.latent import resize_latent

        return {"latent": resize_latent(latent, factor, method)}


@register
class HiresFix(Node):
    """Sample again at a larger size: upscale the first pass's latent (by interpolation of the
    latent, or in pixels by interpolation or with an upscale model), re-noise it to `denoise` and
    denoise it with the same prompts. The same as wiring VAEDecode, an upscale, VAEEncode and a
    Sampler with denoise < 1."""

    category = "sampling"
    inputs = {"model": MODEL, "positive": CONDITIONING,
              "negative": CONDITIONING.optional("what to steer away from (default: the empty prompt)"),
              "vae": VAE, "latent": LATENT,
              "upscale_model": UPSCALE_MODEL.optional("used when upscale is 'model'")}
    params = {
        "upscale": Choice(("latent", "pixels", "model"), "latent",
                          help="latent: interpolate the latent; pixels: decode and interpolate; "
                               "model: decode and run the upscale model"),
        "factor": Float(2.0, 1.0, 8.0, step=0.25, help="size multiplier"),
        "method": Choice(("bilinear", "bicubic", "nearest", "lanczos"), "bicubic",
                         help="interpolation (lanczos: pixels only); with a model, the resize to "
                              "factor after the model's own scale"),
        "scheduler": Choice(SCHEDULER_NAMES, "euler", help="the sampling algorithm"),
        "steps": Int(20, 1, 500, help="steps of the full schedule; denoise runs the last part"),
        "cfg": Float(7.0, 0.0, 30.0, step=0.5, help="classifier-free guidance scale"),
        "seed": Seed(),
        "denoise": Float(0.5, 0.0, 1.0, step=0.05, help="how much of the upscaled image is redrawn"),
        "vae_tiled": Bool(False, help="decode and encode tile by tile (large images)"),
        "vae_tile_size": VAE_TILE_PARAMS["tile_size"],
    }
    outputs = {"latent": LATENT}

    @classmethod
    def memory_estimate(cls, params, input_sizes, ctx):
        from kernels.run_memory import ASSUMED_UPSCALE, Estimate, decoded_size, sampler_working, vae_working

        latent = input_sizes.get("latent")
        if latent is None:
            return None
        big = latent.scaled(params["factor"])
        working = sampler_working(big)
        if params["upscale"] != "latent":  # decoded, upscaled in pixels and encoded again
            image = decoded_size(big)
            tile = params["vae_tile_size"] if params["vae_tiled"] else None
            working += 2 * image.nbytes + vae_working(image.image_pixels, latent.scale, tile)
            if params["upscale"] == "model":
                working += decoded_size(latent).scaled(ASSUMED_UPSCALE).nbytes + (DEFAULT_MEMORY_BUDGET_MB << 20)
        return Estimate({"latent": big}, working)

    def run(self, ctx, model, positive, negative, vae, latent, upscale_model, upscale, factor,
            method, scheduler, steps, cfg, seed, denoise, vae_tiled, vae_tile_size):
        big = self._upscaled(ctx, vae, latent, upscale_model, upscale, factor, method,
                             {"tiled": vae_tiled, "tile_size": vae_tile_size})
        return Sampler().run(ctx, model=model, positive=positive, negative=negative, latent=big,
                             scheduler=scheduler, steps=steps, cfg=cfg, seed=seed, denoise=denoise)

    @staticmethod
    def _upscaled(ctx, vae, latent, upscale_model, upscale, factor, method, vae_tiling):
        from kernels.images import resize

        if upscale == "latent":
            if method == "lanczos":
                raise NodeError("lanczos resizes pixels, not latents: choose upscale 'pixels' or "
                                "another method")
            from kernels.upscale.latent import resize_latent

            return resize_latent(latent, factor, "nearest-exact" if method == "nearest" else method)
        image = VAEDecode().run(ctx, vae=vae, latent=latent, **vae_tiling)["image"]
        h, w = image.shape[1:3]
        f = vae.scale_factor
        size = (max(f, round(w * factor / f) * f), max(f, round(h * factor / f) * f))
        if upscale == "model":
            if upscale_model is None:
                raise NodeError("upscale is 'model' but no upscale_model is connected")
            image = upscale_with_model(ctx, upscale_model, image, 0, DEFAULT_OVERLAP,
                                       DEFAULT_MEMORY_BUDGET_MB)
        if (image.shape[2], image.shape[1]) != size:
            image = resize(image, size[0], size[1], method)
        return VAEEncode().run(ctx, vae=vae, image=image, **vae_tiling)["latent"]
