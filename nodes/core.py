"""Core nodes: load a model, encode text, make/sample/decode latents, load/save/preview images.

Kernels that load torch are imported inside `run`: the catalogue itself must import fast, since
the app builds its palette and inspector from it before torch is loaded.
"""

from __future__ import annotations

import logging

from kernels.files import path_fingerprint
from kernels.model_folders import CHECKPOINT_KINDS  # standard library only
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

log = logging.getLogger(__name__)

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
        "path": Path("builtin:shapes-t2i", mode="folder", models=CHECKPOINT_KINDS,
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
    """Encode a prompt. `(words:1.3)`, `(words)` (1.1x) and `[words]` (1/1.1x) weigh words, `\\(`
    is a literal bracket, BREAK starts a new 75-token chunk, and a longer prompt is encoded in
    chunks, as in A1111 and ComfyUI. `[from:to:when]` edits the prompt during sampling: `from`
    until `when` (a fraction of the steps, or a step number from 1 up), then `to`. The conditioning remembers which tokens each word took, for
    layout and attention tools."""

    category = "conditioning"
    inputs = {"clip": CLIP}
    params = {"text": String("", multiline=True, help="the prompt; (words:1.3) weighs words")}
    outputs = {"conditioning": CONDITIONING}

    @classmethod
    def memory_estimate(cls, params, input_sizes, ctx):
        _check_prompt_length(params["text"])  # before the run: parsing a huge prompt is what is costly
        return None

    def run(self, ctx, clip, text):
        from kernels.patching import applied_patches
        from kernels.prompt_schedule import PromptEditError, scheduled_texts, with_stage
        from kernels.prompt_weighting import PromptSyntaxError, encode_weighted

        _check_prompt_length(text)
        try:
            first, later = scheduled_texts(text)
            for stage_text in [first] + [stage[0] for stage in later]:
                _warn_dropped_tokens(clip.tokenizer, stage_text)
            with applied_patches(clip.patches, clip.text_encoder):
                cond = encode_weighted(clip.tokenizer, clip.text_encoder, first)
                for stage_text, start, end, in_steps in later:
                    stage = encode_weighted(clip.tokenizer, clip.text_encoder, stage_text)
                    cond = with_stage(cond, stage, start, end, in_steps)
        except (PromptSyntaxError, PromptEditError) as exc:
            raise NodeError(f"the prompt: {exc}") from None
        return {"conditioning": cond}


def _check_prompt_length(text: str) -> None:
    from kernels.prompt_weighting import MAX_PROMPT_CHARS

    if len(text) > MAX_PROMPT_CHARS:
        raise NodeError(f"the prompt has {len(text)} characters; at most {MAX_PROMPT_CHARS} are read "
                        f"(no encoder uses more tokens than that)")


def t5_tokens_dropped(tokenizer, text: str) -> int:
    """How many T5 tokens of `text` an SD3 or FLUX encoder drops past its sequence length (CLIP
    families encode long prompts in chunks, kernels.prompt_weighting, and drop none)."""
    from kernels.flux import FluxTokenizers
    from kernels.prompt_weighting import parse_prompt
    from kernels.text import SD3Tokenizers

    if isinstance(tokenizer, SD3Tokenizers):
        t5 = tokenizer.tokenizer_3
    elif isinstance(tokenizer, FluxTokenizers):
        t5 = tokenizer.tokenizer_2
    else:
        return 0
    if t5 is None:
        return 0
    ids = t5(parse_prompt(text).plain, add_special_tokens=True, verbose=False)["input_ids"]
    return max(0, len(ids) - tokenizer.max_sequence_length)


def _warn_dropped_tokens(tokenizer, text: str) -> None:
    dropped = t5_tokens_dropped(tokenizer, text)
    if dropped:
        log.warning("TextEncode: the prompt is %d T5 tokens longer than the encoder's %d; they are "
                    "dropped", dropped, tokenizer.max_sequence_length)


@register
class ConditioningStage(Node):
    """Stage-wise prompts (eDiff-I's expert windows, ProSpect's stages): from `start` to `end` of
    the sampling, the sampler reads `stage` instead of `conditioning`. Chain for more stages;
    a later stage wins where windows overlap. Layout nodes read the base prompt's words."""

    category = "conditioning"
    inputs = {"conditioning": CONDITIONING, "stage": CONDITIONING}
    params = {"start": Float(0.0, 0.0, 1.0, step=0.05, help="where the stage begins, as a fraction of the steps"),
              "end": Float(1.0, 0.0, 1.0, step=0.05, help="where it ends (exclusive)")}
    outputs = {"conditioning": CONDITIONING}

    def run(self, ctx, conditioning, stage, start, end):
        from kernels.prompt_schedule import with_stage

        if end <= start:
            raise NodeError(f"end ({end}) must come after start ({start})")
        return {"conditioning": with_stage(conditioning, stage, start, end)}


@register
class FluxGuidance(Node):
    """Set the guidance a FLUX "dev" model is distilled for on a conditioning, apart from the
    Sampler's cfg (which then only scales true guidance against a negative). Other models ignore it."""

    category = "conditioning"
    inputs = {"conditioning": CONDITIONING}
    params = {"guidance": Float(3.5, 0.0, 100.0, step=0.5, help="FLUX dev's distilled guidance scale")}
    outputs = {"conditioning": CONDITIONING}

    def run(self, ctx, conditioning, guidance):
        from dataclasses import replace

        return {"conditioning": replace(conditioning, guidance=float(guidance))}


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

    @classmethod
    def memory_estimate(cls, params, input_sizes, ctx):
        from kernels.run_memory import Estimate, latent_size

        return Estimate({"latent": latent_size(params["width"], params["height"], params["batch"])})

    def run(self, ctx, vae, width, height, batch):
        import torch

        f, multiple = vae.scale_factor, vae.size_multiple
        if width % multiple or height % multiple:
            raise NodeError(f"width and height must be multiples of {multiple} for this model, got "
                            f"{width}x{height}: try {_nearest_multiple(width, multiple)}x"
                            f"{_nearest_multiple(height, multiple)}")
        return {"latent": torch.zeros(batch, vae.latent_channels, height // f, width // f)}


def _nearest_multiple(n: int, multiple: int) -> int:
    return max(multiple, round(n / multiple) * multiple)


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
    Image k of a batch is the image a batch of one gives with seed + k.
    FLUX: with no negative, cfg is the guidance a "dev" model is distilled for (none for
    "schnell"); with a negative, cfg is true classifier-free guidance (two model calls per step)
    and the distilled guidance is the positive's FluxGuidance (3.5 if it has none)."""

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

    @classmethod
    def memory_estimate(cls, params, input_sizes, ctx):
        from kernels.run_memory import Estimate, sampler_working

        latent = input_sizes.get("latent")
        return None if latent is None else Estimate({"latent": latent}, sampler_working(latent))

    def run(self, ctx, model, positive, negative, latent, scheduler, steps, cfg, seed, denoise,
            denoiser=None, edit_prediction=None):
        """denoiser: called instead of model.unet (tiled diffusion); edit_prediction: see
        kernels.sampling.sample (DiffuseHigh). Both for nodes built on this one."""
        from dataclasses import replace

        from kernels.models import latent_preview
        from kernels.patching import ModelPatch, SamplingRun, applied_patches, merged_unet_kwargs
        from kernels.prompt_schedule import stage_at
        from kernels.sampling import SchedulerMismatch, batch_noise, make_scheduler, sample

        try:
            sched = make_scheduler(scheduler, model.scheduler_config)
        except SchedulerMismatch as exc:
            raise NodeError(str(exc)) from None
        if latent.shape[1] != model.in_channels:
            raise NodeError(f"the latent has {latent.shape[1]} channels but the model takes "
                            f"{model.in_channels}: is the latent from another model's VAE?")
        generator, noise = batch_noise(seed, tuple(latent.shape))
        dtype = model.unet.dtype
        device = model.unet.device
        shape = tuple(latent.shape)
        base = _text_inputs(model, positive, negative, shape, cfg, device, dtype)
        stages = [_text_inputs(model, stage[0], negative, shape, cfg, device, dtype) for stage in positive.stages]
        init = latent.to(device, dtype) if denoise < 1.0 else None

        def progress(i, n, x):
            ctx.progress(i, n, preview=lambda: latent_preview(x, model.pixel_shuffle))

        run = SamplingRun(unet=model.unet, scheduler=sched, positive=positive, negative=negative,
                          cfg=cfg, steps=steps, latent_shape=shape, generator=generator,
                          positive_kwargs=_added_cond_kwargs(model, base.pooled, shape, guided=False))
        patches = model.patches
        steering = [p for p in patches if type(p).before_step is not ModelPatch.before_step]

        def before_step(i, t, x):
            for p in steering:
                x = p.before_step(run, i, t, x)
            return x

        with applied_patches(patches, model.unet, run):
            patch_kwargs = merged_unet_kwargs(patches, run)

            def text_at(i, n):  # a prompt schedule: the stage read at step i of n, if any
                k = stage_at(positive.stages, i, n)
                return None if k is None else replace(stages[k], unet_kwargs={**patch_kwargs, **stages[k].unet_kwargs})

            unet = model.unet if denoiser is None else denoiser
            out = sample(unet, sched, base.positive, base.negative, noise.to(device, dtype),
                         steps, cfg, generator, denoise=denoise, init=init, progress=progress,
                         unet_kwargs={**patch_kwargs, **base.unet_kwargs} or None,
                         before_step=before_step if steering else None, pooled=base.pooled,
                         guidance=positive.guidance, text_at=text_at if stages else None,
                         edit_prediction=edit_prediction)
        return {"latent": out.float().cpu()}


def _text_inputs(model, positive, negative, shape: tuple, cfg: float, device, dtype):
    """A kernels.sampling.StepText of what the denoiser reads for `positive`: its embeddings and
    the negative's (the empty prompt's by default) of one length, the pooled pair (SD3, SDXL,
    FLUX) and SDXL's added kwargs."""
    from kernels.sampling import StepText

    neg = negative.embeds if negative is not None else positive.empty
    pos = positive.embeds
    if neg is not None and neg.shape[1] != pos.shape[1] and negative is not None:
        pos, neg = _lined_up(model, positive, negative)
    pooled = None  # an MM-DiT (SD3) also takes the pooled text projections
    if positive.pooled is not None:
        neg_pooled = negative.pooled if negative is not None else positive.empty_pooled
        pooled = (positive.pooled.to(device, dtype), None if neg_pooled is None else neg_pooled.to(device, dtype))
    added = _added_cond_kwargs(model, pooled, shape, guided=neg is not None and cfg != 1.0)
    return StepText(pos.to(device, dtype), None if neg is None else neg.to(device, dtype), pooled, added)


def _lined_up(model, positive, negative):
    """Prompt and negative of different chunk counts padded to one length (FLUX calls them apart)."""
    from kernels.flux import is_flux_transformer
    from kernels.prompt_weighting import line_up

    if is_flux_transformer(model.unet):
        return positive.embeds, negative.embeds
    try:
        return line_up(positive.embeds, negative.embeds, positive.empty, negative.empty)
    except ValueError as exc:
        raise NodeError(str(exc)) from None


def _added_cond_kwargs(model, pooled, latent_shape: tuple, guided: bool) -> dict:
    """An SDXL UNet's pooled text and time ids, as the unet kwarg `added_cond_kwargs` ({} for
    other models): MODEL bundles that need them say so by having `added_cond_kwargs`."""
    if not hasattr(model, "added_cond_kwargs"):
        return {}
    try:
        return {"added_cond_kwargs": model.added_cond_kwargs(pooled, latent_shape, guided)}
    except ValueError as exc:
        raise NodeError(str(exc)) from None


# Tiled VAE: an image larger than the tile is coded tile by tile, so 2048x2048 and up fit.
VAE_TILE_PARAMS = {
    "tiled": Bool(False, help="code large images tile by tile (less memory; seams are blended)"),
    "tile_size": Int(512, 64, 4096, step=64, help="tile side in pixels, when tiled"),
}


def _vae_tile(vae, tiled: bool, tile_size: int):
    """The tile size to hand the VAE (None: untiled), or a NodeError saying why not."""
    if not tiled:
        return None
    if vae.vae is not None and not hasattr(vae.vae, "use_tiling"):
        raise NodeError(f"this VAE ({type(vae.vae).__name__}) has no tiled mode; turn tiled off")
    if tile_size % vae.scale_factor:
        raise NodeError(f"tile_size {tile_size} is not a multiple of this VAE's scale factor "
                        f"{vae.scale_factor}")
    return tile_size


@register
class VAEDecode(Node):
    """Latents to images."""

    category = "latent"
    inputs = {"vae": VAE, "latent": LATENT}
    params = dict(VAE_TILE_PARAMS)
    outputs = {"image": IMAGE}

    @classmethod
    def memory_estimate(cls, params, input_sizes, ctx):
        from kernels.run_memory import Estimate, decoded_size, vae_working

        latent = input_sizes.get("latent")
        if latent is None:
            return None
        image = decoded_size(latent)
        tile = params.get("tile_size") if params.get("tiled") else None
        return Estimate({"image": image}, vae_working(image.image_pixels, latent.scale, tile))

    def run(self, ctx, vae, latent, tiled=False, tile_size=512):
        import torch

        from kernels.images import model_to_image

        tile = _vae_tile(vae, tiled, tile_size)
        with torch.no_grad():
            return {"image": model_to_image(vae.decode(latent, tile_size=tile)).cpu()}


@register
class VAEEncode(Node):
    """Images to latents (for img2img)."""

    category = "latent"
    inputs = {"vae": VAE, "image": IMAGE}
    params = dict(VAE_TILE_PARAMS)
    outputs = {"latent": LATENT}

    @classmethod
    def memory_estimate(cls, params, input_sizes, ctx):
        from kernels.run_memory import Estimate, Size

        image = input_sizes.get("image")  # the VAE is not known yet: a pixel-space latent, the largest
        return None if image is None else Estimate({"latent": Size(image.batch, 3, image.height, image.width)})

    def run(self, ctx, vae, image, tiled=False, tile_size=512):
        import torch

        from kernels.images import image_to_model

        f = vae.scale_factor
        if image.shape[1] % f or image.shape[2] % f:
            raise NodeError(f"image size {image.shape[2]}x{image.shape[1]} is not a multiple of {f}")
        tile = _vae_tile(vae, tiled, tile_size)
        with torch.no_grad():
            return {"latent": vae.encode(image_to_model(image), tile_size=tile).float().cpu()}


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

    @classmethod
    def memory_estimate(cls, params, input_sizes, ctx):
        from kernels.run_memory import image_header, load_image_estimate

        if not params["path"]:
            return None
        file = ctx.resolve_path(params["path"])
        try:
            _need_regular_file(file)  # never open a pipe, even for its header
        except NodeError:
            return None  # the node says why when it runs
        header = image_header(file)
        return None if header is None else load_image_estimate(*header)

    def run(self, ctx, path):
        from PIL import Image, UnidentifiedImageError

        from kernels.images import from_pil
        from kernels.run_memory import max_image_pixels, pillow_pixel_limit

        file = ctx.resolve_path(path)
        if not path:
            raise NodeError("no image file chosen")
        _need_regular_file(file)
        limit = max_image_pixels(ctx.run_budget)
        try:
            with pillow_pixel_limit(limit), Image.open(file) as im:
                image, mask = from_pil(im)
        except FileNotFoundError:
            raise NodeError(f"image file {file!r} does not exist") from None
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise NodeError(f"image file {file!r} declares more pixels than the run budget allows "
                            f"(at most {limit} pixels); a file this size is refused as a "
                            f"decompression bomb") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise NodeError(f"cannot read image {file!r}: {exc}") from None
        return {"image": image, "mask": mask}



def _need_regular_file(file: str) -> None:
    """A NodeError unless `file` is a regular file: a folder says so, and a pipe or device is
    refused before it is opened (reading a FIFO would wait forever)."""
    import os
    import stat

    try:
        mode = os.stat(file).st_mode
    except FileNotFoundError:
        raise NodeError(f"image file {file!r} does not exist") from None
    except OSError as exc:
        raise NodeError(f"cannot read image {file!r}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise NodeError(f"{file!r} is a folder; choose an image file in it")
    if not stat.S_ISREG(mode):
        raise NodeError(f"{file!r} is not a regular file (a pipe, socket or device); choose an image file")


@register
class ImageScale(Node):
    """Resize images by a factor (nearest keeps hard pixels; lanczos is smooth)."""

    category = "image"
    inputs = {"image": IMAGE}
    params = {"factor": Float(2.0, 0.05, 16.0, step=0.25, help="size multiplier"),
              "method": Choice(("nearest", "bilinear", "bicubic", "lanczos"), "lanczos")}
    outputs = {"image": IMAGE}

    @classmethod
    def memory_estimate(cls, params, input_sizes, ctx):
        from kernels.run_memory import Estimate

        image = input_sizes.get("image")
        if image is None:
            return None
        out = image.scaled(params["factor"])
        # kernels.images.resize: float copies of the input on the way to Pillow, and the stack
        return Estimate({"image": out}, 3 * image.nbytes + out.nbytes)

    def run(self, ctx, image, factor, method):
        from kernels.images import resize

        h, w = image.shape[1:3]
        return {"image": resize(image, max(1, round(w * factor)), max(1, round(h * factor)), method)}


@register
class SaveImage(Node):
    """Save images as PNG with the graph inside, so opening the PNG reopens the graph."""

    category = "image"
    inputs = {"image": IMAGE}
    params = {"folder": Path("", mode="folder", help="where to save: empty or a relative folder is in the run's "
                             "output folder; another place only if allowed in the app"),
              "prefix": String("loomwork", file_name=True, help="file name prefix; a counter follows it"),
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
