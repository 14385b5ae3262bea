"""Core nodes: load a model, encode text, make/sample/decode latents, load/save/preview images.

Kernels that load torch are imported inside `run`: the catalogue itself must import fast, since
the app builds its palette and inspector from it before torch is loaded.
"""

from __future__ import annotations

from kernels.files import path_fingerprint
from kernels.scheduler_names import SCHEDULER_NAMES  # torch-free, unlike kernels.sampling

from .base import (
    CLIP,
    CONDITIONING,
    IMAGE,
    LATENT,
    MASK,
    MODEL,
    VAE,
    Bool,
    Choice,
    Float,
    Int,
    Node,
    NodeError,
    Path,
    Seed,
    String,
)
from .registry import register

DTYPES = ("float32", "float16", "bfloat16")


@register
class LoadModel(Node):
    """Load a model: a diffusers folder (SD 1.x/2.x, SDXL, SD3, FLUX.1 dev/schnell, or a
    pixel-space model such as the built-in ShapesT2I) or a `.safetensors` single-file checkpoint
    that holds its text encoders and VAE (SD 1.x/2.x, SDXL, SD3; the family is told from the
    file). A transformer or UNet file without them loads with LoadDiffusionModel,
    LoadTextEncoders and LoadVAE. `builtin:NAME` names a model shipped with Loomwork; `ckpt:NAME`
    one found in the models folders (`loomwork models`); a relative path is taken from the
    graph file's folder. Pickled checkpoints (.ckpt, .pt) are refused: convert them first."""

    category = "loaders"
    params = {
        "path": Path("builtin:shapes-t2i", mode="folder",
                     help="a diffusers model folder or a .safetensors checkpoint (SD 1.x/2.x, SDXL, SD3, FLUX.1)"),
        "dtype": Choice(DTYPES, "float32", help="weights precision; float16 halves memory on GPUs"),
        "config": Path("", mode="folder", help="single files only: a diffusers folder whose configs "
                       "and tokenizers replace the shipped ones (e.g. one holding T5's tokenizer)"),
    }
    outputs = {"model": MODEL, "clip": CLIP, "vae": VAE}

    @classmethod
    def fingerprint(cls, params, ctx):
        model = path_fingerprint(ctx.resolve_path(params["path"]))
        config = params.get("config") or ""
        return (*model, path_fingerprint(ctx.resolve_path(config))) if config else model

    def run(self, ctx, path, dtype, config=""):
        from kernels.models import ModelLoadError, load_model_folder

        folder = ctx.resolve_path(path)
        try:
            if config:
                import torch

                from kernels.single_file import load_checkpoint_file

                # The model manager keys a model by its one path, and a config folder changes
                # what a file loads as: with one, it loads here (its bundles' keys name both).
                model, clip, vae = load_checkpoint_file(folder, getattr(torch, dtype), ctx.device,
                                                        config=ctx.resolve_path(config))
            else:
                model, clip, vae = ctx.models.load(folder, dtype, load_model_folder)
        except ModelLoadError as exc:
            raise NodeError(str(exc)) from None
        return {"model": model, "clip": clip, "vae": vae}


@register
class TextEncode(Node):
    """Encode a prompt. The conditioning remembers which tokens each word took, for layout and
    attention tools."""

    category = "conditioning"
    inputs = {"clip": CLIP}
    params = {"text": String("", multiline=True, help="the prompt")}
    outputs = {"conditioning": CONDITIONING}

    def run(self, ctx, clip, text):
        from kernels.patching import applied_patches
        from kernels.text import encode_text

        with applied_patches(clip.patches, clip.text_encoder):
            return {"conditioning": encode_text(clip.tokenizer, clip.text_encoder, text)}


@register
class EmptyLatent(Node):
    """A blank latent of the given image size; its shape comes from the VAE (pixel-space models
    have a 3-channel, full-size "latent")."""

    category = "latent"
    inputs = {"vae": VAE}
    params = {
        "width": Int(512, 8, 8192, step=8, help="image width in pixels"),
        "height": Int(512, 8, 8192, step=8, help="image height in pixels"),
        "batch": Int(1, 1, 64, help="images per run"),
    }
    outputs = {"latent": LATENT}

    def run(self, ctx, vae, width, height, batch):
        import torch

        f = vae.scale_factor
        if width % f or height % f:
            raise NodeError(f"width and height must be multiples of {f} for this model, "
                            f"got {width}x{height}")
        return {"latent": torch.zeros(batch, vae.latent_channels, height // f, width // f)}


def _sampler_v1_to_v2(params: dict) -> dict:
    """v1 called the scheduler `sampler_name` and used ComfyUI-style names."""
    params = dict(params)
    if "sampler_name" in params:
        old = params.pop("sampler_name")
        params["scheduler"] = {"euler_a": "euler_ancestral", "dpmpp_2m_karras": "dpmpp_2m"}.get(old, old)
    return params


@register
class Sampler(Node):
    """Denoise a latent with a scheduler and classifier-free guidance. With denoise < 1 the
    input latent is kept in part (img2img): only the last `denoise` fraction of the schedule runs.
    FLUX takes no negative: cfg is the guidance a "dev" model is distilled for (none for "schnell")."""

    category = "sampling"
    version = 2
    inputs = {"model": MODEL, "positive": CONDITIONING,
              "negative": CONDITIONING.optional("what to steer away from (default: the empty prompt)"),
              "latent": LATENT}
    params = {
        "scheduler": Choice(SCHEDULER_NAMES, "euler", help="the sampling algorithm"),
        "steps": Int(20, 1, 500, help="denoising steps"),
        "cfg": Float(7.0, 0.0, 30.0, step=0.5, help="classifier-free guidance scale; 1 = no guidance"),
        "seed": Seed(),
        "denoise": Float(1.0, 0.0, 1.0, step=0.05, help="1 = from pure noise; less keeps the input latent"),
    }
    outputs = {"latent": LATENT}
    migrations = {1: lambda p: _sampler_v1_to_v2(p)}

    def run(self, ctx, model, positive, negative, latent, scheduler, steps, cfg, seed, denoise):
        import torch

        from kernels.models import latent_preview
        from kernels.patching import ModelPatch, SamplingRun, applied_patches, merged_unet_kwargs
        from kernels.sampling import SchedulerMismatch, make_scheduler, sample

        try:
            sched = make_scheduler(scheduler, model.scheduler_config)
        except SchedulerMismatch as exc:
            raise NodeError(str(exc)) from None
        if latent.shape[1] != model.in_channels:
            raise NodeError(f"the latent has {latent.shape[1]} channels but the model takes "
                            f"{model.in_channels}: is the latent from another model's VAE?")
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32)
        dtype = model.unet.dtype
        device = model.unet.device
        neg = negative.embeds if negative is not None else positive.empty
        init = latent.to(device, dtype) if denoise < 1.0 else None
        pooled = None  # an MM-DiT (SD3) also takes the pooled text projections
        if positive.pooled is not None:
            neg_pooled = negative.pooled if negative is not None else positive.empty_pooled
            pooled = (positive.pooled.to(device, dtype),
                      None if neg_pooled is None else neg_pooled.to(device, dtype))

        def progress(i, n, x):
            ctx.progress(i, n, preview=lambda: latent_preview(x))

        run = SamplingRun(unet=model.unet, scheduler=sched, positive=positive, negative=negative,
                          cfg=cfg, steps=steps, latent_shape=tuple(latent.shape), generator=generator,
                          positive_kwargs=_added_cond_kwargs(model, pooled, tuple(latent.shape), guided=False))
        patches = model.patches
        steering = [p for p in patches if type(p).before_step is not ModelPatch.before_step]

        def before_step(i, t, x):
            for p in steering:
                x = p.before_step(run, i, t, x)
            return x

        added = _added_cond_kwargs(model, pooled, tuple(latent.shape), guided=neg is not None and cfg != 1.0)
        with applied_patches(patches, model.unet, run):
            out = sample(model.unet, sched, positive.embeds.to(device, dtype),
                         None if neg is None else neg.to(device, dtype), noise.to(device, dtype),
                         steps, cfg, generator, denoise=denoise, init=init, progress=progress,
                         unet_kwargs={**merged_unet_kwargs(patches, run), **added} or None,
                         before_step=before_step if steering else None, pooled=pooled)
        return {"latent": out.float().cpu()}


def _added_cond_kwargs(model, pooled, latent_shape: tuple, guided: bool) -> dict:
    """An SDXL UNet's pooled text and time ids, as the unet kwarg `added_cond_kwargs` ({} for
    other models): MODEL bundles that need them say so by having `added_cond_kwargs`."""
    if not hasattr(model, "added_cond_kwargs"):
        return {}
    try:
        return {"added_cond_kwargs": model.added_cond_kwargs(pooled, latent_shape, guided)}
    except ValueError as exc:
        raise NodeError(str(exc)) from None


@register
class VAEDecode(Node):
    """Latents to images."""

    category = "latent"
    inputs = {"vae": VAE, "latent": LATENT}
    outputs = {"image": IMAGE}

    def run(self, ctx, vae, latent):
        import torch

        from kernels.images import model_to_image

        with torch.no_grad():
            return {"image": model_to_image(vae.decode(latent)).cpu()}


@register
class VAEEncode(Node):
    """Images to latents (for img2img)."""

    category = "latent"
    inputs = {"vae": VAE, "image": IMAGE}
    outputs = {"latent": LATENT}

    def run(self, ctx, vae, image):
        import torch

        from kernels.images import image_to_model

        f = vae.scale_factor
        if image.shape[1] % f or image.shape[2] % f:
            raise NodeError(f"image size {image.shape[2]}x{image.shape[1]} is not a multiple of {f}")
        with torch.no_grad():
            return {"latent": vae.encode(image_to_model(image)).float().cpu()}


@register
class LoadImage(Node):
    """Load an image file (PNG, JPEG, WebP...). The mask is its transparency."""

    category = "image"
    params = {"path": Path("", mode="file", filters="Images (*.png *.jpg *.jpeg *.webp *.bmp)",
                           help="the image file")}
    outputs = {"image": IMAGE, "mask": MASK}

    @classmethod
    def fingerprint(cls, params, ctx):
        return path_fingerprint(ctx.resolve_path(params["path"]))

    def run(self, ctx, path):
        from PIL import Image, UnidentifiedImageError

        from kernels.images import from_pil

        file = ctx.resolve_path(path)
        if not path:
            raise NodeError("no image file chosen")
        try:
            with Image.open(file) as im:
                image, mask = from_pil(im)
        except FileNotFoundError:
            raise NodeError(f"image file {file!r} does not exist") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise NodeError(f"cannot read image {file!r}: {exc}") from None
        return {"image": image, "mask": mask}


@register
class ImageScale(Node):
    """Resize images by a factor (nearest keeps hard pixels; lanczos is smooth)."""

    category = "image"
    inputs = {"image": IMAGE}
    params = {"factor": Float(2.0, 0.05, 16.0, step=0.25, help="size multiplier"),
              "method": Choice(("nearest", "bilinear", "bicubic", "lanczos"), "lanczos")}
    outputs = {"image": IMAGE}

    def run(self, ctx, image, factor, method):
        from kernels.images import resize

        h, w = image.shape[1:3]
        return {"image": resize(image, max(1, round(w * factor)), max(1, round(h * factor)), method)}


@register
class SaveImage(Node):
    """Save images as PNG with the graph inside, so opening the PNG reopens the graph."""

    category = "image"
    inputs = {"image": IMAGE}
    params = {"folder": Path("", mode="folder", help="where to save (empty: the run's output folder)"),
              "prefix": String("loomwork", help="file name prefix; a counter follows it"),
              "embed_graph": Bool(True, help="write the graph into the PNG")}
    output_node = True
    always_run = True

    def run(self, ctx, image, folder, prefix, embed_graph):
        paths = ctx.save_images(image, folder=folder or None, prefix=prefix, embed_graph=embed_graph)
        ctx.show_images(image, paths)
        return {}


@register
class PreviewImage(Node):
    """Show images in the app without saving them."""

    category = "image"
    inputs = {"image": IMAGE}
    output_node = True
    always_run = True

    def run(self, ctx, image):
        ctx.show_images(image, [])
        return {}
