"""Resolution nodes: DiffuseHigh's guided progressive upscale, attention-entropy scaling for other
sizes than the training size, and tiled (MultiDiffusion) sampling for large canvases.

Kernels are imported inside `run`, as in nodes/core.py: the catalogue loads without torch.
"""

from __future__ import annotations

import logging

from kernels.scheduler_names import SCHEDULER_NAMES  # torch-free

from .base import CONDITIONING, IMAGE, LATENT, MODEL, VAE, Choice, Float, Int, Node, NodeError, Seed
from .core import Sampler
from .registry import register

log = logging.getLogger(__name__)

# Kept equal to kernels.upscale.diffusehigh (checked by a test): the catalogue must not import torch.
DIFFUSEHIGH_DENOISE = 0.3
DIFFUSEHIGH_GUIDANCE_END = 1 / 3
DIFFUSEHIGH_SHARPNESS = 1.0


def _text_inputs():
    return {"model": MODEL, "positive": CONDITIONING,
            "negative": CONDITIONING.optional("what to steer away from (default: the empty prompt)")}


def _sampler_params(steps: int = 20, cfg: float = 7.0) -> dict:
    return {"scheduler": Choice(SCHEDULER_NAMES, "euler", help="the sampling algorithm"),
            "steps": Int(steps, 1, 500, help="steps of the full schedule; denoise runs the last part"),
            "cfg": Float(cfg, 0.0, 30.0, step=0.5, help="classifier-free guidance scale"),
            "seed": Seed()}


def _unet_multiple(model) -> int:
    from kernels.resolution.tiled_diffusion import unet_size_multiple

    return unet_size_multiple(model.unet) if hasattr(model.unet, "config") else 1


def _refuse_transformers(node: str, model) -> None:
    from kernels.flux import is_flux_transformer
    from kernels.sampling import takes_pooled_projections

    if is_flux_transformer(model.unet) or takes_pooled_projections(model.unet):
        raise NodeError(f"{node} works with UNet models (SD 1.x/2.x, SDXL, ShapesT2I), not "
                        f"{type(model.unet).__name__}")


@register
class DiffuseHighUpscale(Node):
    """DiffuseHigh: upscale by `scale` in stages (2x, 3x, ... as the paper does): each stage
    upsamples and sharpens the image, re-noises it to `denoise` and samples it again, replacing
    the low-frequency wavelet band of the predicted clean image with the sharpened upsample's
    for the first `guidance_end` of the steps, so the structure stays the input's while the
    model draws the detail. Give an image or a latent."""

    category = "sampling"
    inputs = {**_text_inputs(), "vae": VAE,
              "image": IMAGE.optional("the image to upscale"),
              "latent": LATENT.optional("or the latent to upscale (decoded first)")}
    params = {
        "scale": Float(2.0, 1.25, 8.0, step=0.25, help="size multiplier; stages at every whole multiple"),
        **_sampler_params(steps=50),
        "denoise": Float(DIFFUSEHIGH_DENOISE, 0.05, 1.0, step=0.05,
                         help="how much of each stage is redrawn (the paper: 15 of 50 steps)"),
        "guidance_end": Float(DIFFUSEHIGH_GUIDANCE_END, 0.0, 1.0, step=0.05,
                              help="fraction of each stage's steps that keep the input's structure"),
        "sharpness": Float(DIFFUSEHIGH_SHARPNESS, 0.0, 4.0, step=0.25,
                           help="unsharp mask strength of the upsampled image (0: none)"),
    }
    outputs = {"latent": LATENT, "image": IMAGE}

    def run(self, ctx, model, positive, negative, vae, image, latent, scale, scheduler, steps,
            cfg, seed, denoise, guidance_end, sharpness):
        import torch

        from kernels.images import image_to_model, model_to_image
        from kernels.sampling import SchedulerMismatch, denoise_timesteps, make_scheduler
        from kernels.upscale.diffusehigh import DiffuseHighError, PredictionSpace, diffusehigh

        if (image is None) == (latent is None):
            raise NodeError("connect either an image or a latent to upscale (exactly one)")
        from kernels.flux import is_flux_transformer

        if is_flux_transformer(model.unet):
            raise NodeError("DiffuseHighUpscale does not guide FLUX's sampling loop")
        try:
            run_steps = len(denoise_timesteps(make_scheduler(scheduler, model.scheduler_config), steps, denoise))
            space = PredictionSpace.of(model.scheduler_config)
        except (SchedulerMismatch, DiffuseHighError) as exc:
            raise NodeError(str(exc)) from None
        if run_steps == 0:
            raise NodeError(f"denoise {denoise} of {steps} steps runs no step: raise either")

        def encode(x):
            return vae.encode(x.to(torch.float32)).float()

        def decode(z):
            return vae.decode(z).float()

        def sample_fn(z, edit):
            return Sampler().run(ctx, model=model, positive=positive, negative=negative, latent=z,
                                 scheduler=scheduler, steps=steps, cfg=cfg, seed=seed,
                                 denoise=denoise, edit_prediction=edit)["latent"]

        with torch.no_grad():
            pixels = image_to_model(image) if image is not None else decode(latent).clamp(-1, 1)
            try:
                out = diffusehigh(pixels, encode, decode, sample_fn, space, scale=scale,
                                  run_steps=run_steps, guidance_end=guidance_end, sharpness=sharpness,
                                  vae_multiple=vae.size_multiple * _unet_multiple(model))
            except DiffuseHighError as exc:
                raise NodeError(str(exc)) from None
            result = model_to_image(decode(out)).cpu()
        return {"latent": out, "image": result}


@register
class AttentionEntropyScale(Node):
    """Attention-entropy scaling: at sizes other than the one the model was trained at, scale
    its self-attention so each layer's attention entropy stays what it was in training (fewer
    repeated objects above that size, fewer cut-off ones below it). At the training size it
    changes nothing. UNet models; cross-attention is left alone."""

    category = "model"
    inputs = {"model": MODEL,
              "vae": VAE.optional("reads training_size in image pixels (needed when it is not 0)")}
    params = {"training_size": Int(0, 0, 8192, step=8,
                                   help="the side the model was trained at, in image pixels; "
                                        "0 = its native size (UNet sample size)")}
    outputs = {"model": MODEL}

    def run(self, ctx, model, vae, training_size):
        from kernels.resolution.entropy import EntropyScaleError, EntropyScalePatch, scaled_processors

        if training_size == 0:
            size = getattr(getattr(model.unet, "config", None), "sample_size", None)
            if size is None:
                raise NodeError(f"{type(model.unet).__name__} names no native size: set training_size")
            hw = (size, size) if isinstance(size, int) else tuple(size)
        else:
            if vae is None:
                raise NodeError("training_size is in image pixels: connect the model's VAE, or set 0")
            if training_size % vae.scale_factor:
                raise NodeError(f"training_size {training_size} is not a multiple of the VAE's "
                                f"scale factor {vae.scale_factor}")
            hw = (training_size // vae.scale_factor,) * 2
        try:
            patch = EntropyScalePatch(hw)
            scaled_processors(model.unet, hw, None)  # refuses a model without UNet self-attention
        except EntropyScaleError as exc:
            raise NodeError(str(exc)) from None
        return {"model": model.with_patch(patch)}


@register
class TiledSampler(Node):
    """Sample a canvas larger than the model's native size in overlapping tiles (MultiDiffusion):
    every step denoises each tile at the same noise level and averages the overlaps, so the
    canvas follows one schedule and no model call is larger than a tile. A tile larger than the
    canvas is clamped to it (the log says what was used); one tile is the plain Sampler."""

    category = "sampling"
    inputs = {**_text_inputs(), "vae": VAE, "latent": LATENT}
    params = {
        **_sampler_params(),
        "denoise": Float(1.0, 0.0, 1.0, step=0.05, help="1 = from pure noise; less keeps the input latent"),
        "tile_width": Int(0, 0, 16384, step=8, help="tile width in image pixels; 0 = the model's native size"),
        "tile_height": Int(0, 0, 16384, step=8, help="tile height in image pixels; 0 = the model's native size"),
        "overlap": Int(64, 0, 8192, step=8, help="image pixels neighbouring tiles share (at most half a tile)"),
    }
    outputs = {"latent": LATENT}

    def run(self, ctx, model, positive, negative, vae, latent, scheduler, steps, cfg, seed, denoise,
            tile_width, tile_height, overlap):
        from kernels.resolution.tiled_diffusion import TiledDenoiser, TiledDiffusionError, plan_latent_tiles

        _refuse_transformers("TiledSampler", model)
        f = vae.scale_factor
        native = model.unet.config.sample_size
        native_hw = (native, native) if isinstance(native, int) else tuple(native)
        tile = (tile_height // f if tile_height else native_hw[0], tile_width // f if tile_width else native_hw[1])
        for name, px in (("tile_width", tile_width), ("tile_height", tile_height), ("overlap", overlap)):
            if px % f:
                raise NodeError(f"{name} {px} is not a multiple of the VAE's scale factor {f}")
        height, width = latent.shape[-2:]
        try:
            grid = plan_latent_tiles(height, width, tile, overlap // f, _unet_multiple(model))
        except TiledDiffusionError as exc:
            raise NodeError(f"TiledSampler: {exc} (the canvas is {width * f}x{height * f} pixels)") from None
        if tile[0] > height or tile[1] > width:
            log.warning("TiledSampler: the %dx%d tile is larger than the %dx%d canvas; used %dx%d",
                        tile[1] * f, tile[0] * f, width * f, height * f, grid.tile_w * f, grid.tile_h * f)
        log.info("TiledSampler: %d tile(s) of %dx%d pixels, overlap %d", grid.count,
                 grid.tile_w * f, grid.tile_h * f, grid.overlap * f)
        if not grid.single:
            _refuse_spatial_patches(model)
        return Sampler().run(ctx, model=model, positive=positive, negative=negative, latent=latent,
                             scheduler=scheduler, steps=steps, cfg=cfg, seed=seed, denoise=denoise,
                             denoiser=TiledDenoiser(model.unet, grid))


def _refuse_spatial_patches(model) -> None:
    """Patches that place things on the canvas would see each tile as the whole canvas."""
    from kernels.layout import AttentionRecordPatch, LayoutPatch

    for p in model.patches:
        masked_ip = getattr(p, "kind", "") == "ip-adapter" and getattr(p, "mask", None) is not None
        if isinstance(p, (LayoutPatch, AttentionRecordPatch)) or masked_ip:
            raise NodeError(f"TiledSampler cannot tile a model with {p.describe()}: its boxes or "
                            f"masks are for the whole canvas; use one tile or the plain Sampler")
