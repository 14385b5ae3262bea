"""Analysis nodes: DiffusionClassifier (which prompt explains an image best), SeedScan (rank
seeds by a metric), CycleEdit (DPM-Encoder editing) and ActivationPatch (prompt B's
cross-attention inputs in prompt A's run). The math is in kernels.analysis and kernels.editing;
tables are kernels.analysis.table.Table values on a TABLE port."""

from __future__ import annotations

from kernels.scheduler_names import SCHEDULER_NAMES  # torch-free

from .base import (
    CLIP,
    CONDITIONING,
    IMAGE,
    LATENT,
    MODEL,
    TABLE,
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

# kernels.analysis.classifier defaults (no torch here)
CLASSIFIER_SAMPLES, CLASSIFIER_FIRST, CLASSIFIER_KEEP = 32, 8, 3
SEED_METRICS = ("oracle", "clip", "contrast", "colourfulness", "sharpness")  # kernels.analysis.seed_scan.METRICS
CYCLE_ETA, CYCLE_STRENGTH = 1.0, 0.4  # kernels.editing.cycle_diffusion.DEFAULT_ETA, DEFAULT_STRENGTH


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _encode(ctx, clip, prompts: list[str]):
    """Each prompt's Conditioning through TextEncode (weighting syntax and CLIP patches apply)."""
    from .core import TextEncode

    encode = TextEncode()
    return [encode.run(ctx, clip, p)["conditioning"] for p in prompts]


def _image_latent(vae, image, node: str):
    import torch

    from kernels.images import image_to_model

    f = vae.scale_factor
    if image.shape[1] % f or image.shape[2] % f:
        raise NodeError(f"{node}: image size {image.shape[2]}x{image.shape[1]} is not a multiple of {f}")
    with torch.no_grad():
        return vae.encode(image_to_model(image)).float()


@register
class DiffusionClassifier(Node):
    """Zero-shot classification by the denoiser (Diffusion Classifier): each candidate prompt is
    scored by how well the model denoises the image with it, over noise and timestep pairs shared
    by all candidates; after `first` pairs only the `keep` best candidates get the rest. Outputs
    the table of scores (lower error is better) and the best prompt's conditioning. The first
    image of the batch is classified."""

    category = "analysis"
    inputs = {"model": MODEL, "clip": CLIP, "vae": VAE, "image": IMAGE}
    params = {
        "prompts": String("a red circle\na red square\na red triangle\na red star", multiline=True,
                          help="the candidate prompts, one per line"),
        "samples": Int(CLASSIFIER_SAMPLES, 1, 1000, help="noise/timestep pairs for the best candidates"),
        "first": Int(CLASSIFIER_FIRST, 1, 1000, help="pairs every candidate is scored on before pruning"),
        "keep": Int(CLASSIFIER_KEEP, 1, 1000, help="candidates kept after the first pairs"),
        "seed": Seed(),
    }
    outputs = {"table": TABLE, "best": CONDITIONING}

    def run(self, ctx, model, clip, vae, image, prompts, samples, first, keep, seed):
        from kernels.analysis.classifier import ClassifierError, classification_table, classify, training_scheduler
        from kernels.denoiser import DenoiserText
        from kernels.patching import SamplingRun, applied_patches

        candidates = _lines(prompts)
        if not candidates:
            raise NodeError("DiffusionClassifier: give at least one candidate prompt, one per line")
        conds = _encode(ctx, clip, candidates)
        clean = _image_latent(vae, image[:1], "DiffusionClassifier")
        unet = model.unet
        clean = clean.to(unet.device, unet.dtype)
        texts = [DenoiserText(c.embeds, c.pooled) for c in conds]
        scheduler = training_scheduler(model.scheduler_config, model)
        run = SamplingRun(unet=unet, scheduler=scheduler, positive=conds[0], negative=None, cfg=1.0,
                          steps=samples, latent_shape=tuple(clean.shape))
        try:
            with applied_patches(model.patches, unet, run):
                result = classify(model, scheduler, clean, texts, candidates, samples, first, keep, seed,
                                  progress=lambda i, n: ctx.progress(i, n))
        except ClassifierError as exc:
            raise NodeError(f"DiffusionClassifier: {exc}") from None
        return {"table": classification_table(result), "best": conds[result.best]}


def _prompt_sampler(ctx, model, positive, negative, steps: int, cfg: float, denoise: float):
    """run(scheduler, noise, init) -> latent: kernels.sampling.sample for one prompt, with the
    text, patches and SDXL kwargs prepared as the Sampler prepares them, and a given scheduler."""
    from kernels.patching import SamplingRun, applied_patches, merged_unet_kwargs
    from kernels.sampling import sample

    from .core import _text_inputs

    unet = model.unet

    def run(scheduler, noise, init):
        shape = tuple(noise.shape)
        text = _text_inputs(model, positive, negative, shape, cfg, unet.device, unet.dtype)
        state = SamplingRun(unet=unet, scheduler=scheduler, positive=positive, negative=negative, cfg=cfg,
                            steps=steps, latent_shape=shape)
        with applied_patches(model.patches, unet, state):
            kwargs = {**merged_unet_kwargs(model.patches, state), **text.unet_kwargs}
            return sample(unet, scheduler, text.positive, text.negative, noise.to(unet.device, unet.dtype),
                          steps, cfg, denoise=denoise, init=init.to(unet.device, unet.dtype),
                          progress=lambda i, n, x: ctx.progress(i, n), unet_kwargs=kwargs or None,
                          pooled=text.pooled, guidance=positive.guidance)

    return run


@register
class CycleEdit(Node):
    """CycleDiffusion editing (DPM-Encoder): the image is encoded with the source prompt into
    DDIM's start noise and per-step noises (eta > 0), then regenerated from that code with the
    target prompt: what the prompts share stays, what differs changes. Regenerating with the
    source prompt gives the image back. strength: how much of the schedule is re-run (1 = all).
    The defaults (eta 1, strength 0.4, cfg 20) are the ones that kept the object's place and
    shape while changing its colour on ShapesT2I. DDPM-family models (not flow matching)."""

    category = "image"
    inputs = {"model": MODEL, "vae": VAE, "image": IMAGE, "source": CONDITIONING, "target": CONDITIONING,
              "negative": CONDITIONING.optional("what to steer away from (default: the empty prompt)")}
    params = {
        "steps": Int(20, 1, 500, help="DDIM steps of the whole schedule"),
        "cfg": Float(20.0, 0.0, 30.0, step=0.5, help="classifier-free guidance of the target prompt (the edit "
                     "needs a strong push at a low strength; lower it if colours burn)"),
        "source_cfg": Float(20.0, 0.0, 30.0, step=0.5, help="guidance of the source prompt while encoding; "
                            "equal to cfg, the source prompt gives the image back exactly"),
        "eta": Float(CYCLE_ETA, 0.0, 1.0, step=0.05, help="DDIM's stochasticity; the code holds its noises"),
        "strength": Float(CYCLE_STRENGTH, 0.0, 1.0, step=0.05, help="the share of the schedule encoded and re-run"),
        "seed": Seed(),
    }
    outputs = {"image": IMAGE, "latent": LATENT}

    def run(self, ctx, model, vae, image, source, target, negative, steps, cfg, source_cfg, eta, strength, seed):
        import torch

        from kernels.editing.cycle_diffusion import CycleEditError, cycle_edit
        from kernels.images import model_to_image
        from kernels.sampling import SchedulerMismatch, make_scheduler

        try:
            ddim = make_scheduler("ddim", model.scheduler_config)
        except SchedulerMismatch:
            raise NodeError("CycleEdit needs a DDPM-family model (DDIM steps); this one is flow matching") from None
        clean = _image_latent(vae, image, "CycleEdit").to(model.unet.device, model.unet.dtype)
        if clean.shape[1] != model.in_channels:
            raise NodeError(f"CycleEdit: the VAE gives {clean.shape[1]} channels but the model takes {model.in_channels}")
        run_source = _prompt_sampler(ctx, model, source, negative, steps, source_cfg, strength)
        run_target = _prompt_sampler(ctx, model, target, negative, steps, cfg, strength)
        try:
            out = cycle_edit(run_source, run_target, ddim, clean, eta, seed).float().cpu()
        except CycleEditError as exc:
            raise NodeError(f"CycleEdit: {exc}") from None
        with torch.no_grad():
            return {"image": model_to_image(vae.decode(out)), "latent": out}


@register
class SeedScan(Node):
    """Render one prompt from `count` seeds (first, first + 1, ...), score each image with a
    metric and rank them (golden seeds): the table of seeds by score, a contact sheet of the
    images best first, and the best image. A seed's image is the Sampler's with that seed.
    Metrics: "oracle" (the ShapesT2I oracle: how much of the prompt's colours, shapes and cells
    it finds), "clip" (image-prompt similarity by the CLIP model in `clip folder`, for real
    models), or image statistics (contrast, colourfulness, sharpness)."""

    category = "analysis"
    inputs = {"model": MODEL, "vae": VAE, "positive": CONDITIONING,
              "negative": CONDITIONING.optional("what to steer away from (default: the empty prompt)"),
              "latent": LATENT}
    params = {
        "scheduler": Choice(SCHEDULER_NAMES, "euler", help="the sampling algorithm"),
        "steps": Int(20, 1, 500, help="denoising steps"),
        "cfg": Float(5.0, 0.0, 30.0, step=0.5, help="classifier-free guidance scale"),
        "first": Seed(help="the first seed scanned"),
        "count": Int(16, 1, 256, help="how many seeds"),
        "metric": Choice(SEED_METRICS, "oracle", help="what ranks the seeds (higher is better)"),
        "clip_folder": Path("", mode="folder", help="the clip metric: a CLIP model folder (transformers "
                            "CLIPModel, safetensors weights and a tokenizer)"),
    }
    outputs = {"table": TABLE, "sheet": IMAGE, "best": IMAGE}

    @classmethod
    def fingerprint(cls, params, ctx):
        # new CLIP weights in the same folder must not give the cached scores
        if params["metric"] != "clip" or not params["clip_folder"]:
            return None
        from kernels.files import path_fingerprint

        return path_fingerprint(ctx.resolve_path(params["clip_folder"]))

    def run(self, ctx, model, vae, positive, negative, latent, scheduler, steps, cfg, first, count, metric,
            clip_folder=""):
        import torch

        from kernels.analysis.clip_score import load_clip
        from kernels.analysis.seed_scan import SeedScanError, contact_sheet, scan, scan_table, scorer
        from kernels.images import model_to_image
        from kernels.models import ModelLoadError

        from .core import Sampler

        models = getattr(ctx, "models", None)  # the app's model manager: CLIP loads once, in its budget
        load = (lambda f: models.load(f, "float32", load_clip)) if models is not None else None
        try:
            folder = ctx.resolve_path(clip_folder) if metric == "clip" and clip_folder else clip_folder
            score = scorer(metric, positive.prompt, folder, load)
        except (SeedScanError, ModelLoadError) as exc:
            raise NodeError(f"SeedScan: {exc}") from None
        sampler = Sampler()

        cancel = getattr(ctx, "check_cancel", lambda: None)

        class Quiet:  # the per-seed sampler's steps are not the scan's progress; cancel still works
            def progress(self, *a, **k):
                cancel()

        def render(seed):
            out = sampler.run(Quiet(), model, positive, negative, latent[:1], scheduler, steps, cfg, seed, 1.0)["latent"]
            with torch.no_grad():
                return model_to_image(vae.decode(out))[0]

        seeds = [int(first) + k for k in range(count)]
        order, scores, images = scan(render, seeds, score, progress=lambda i, n: ctx.progress(i, n))
        return {"table": scan_table(order, scores, metric), "sheet": contact_sheet([images[s] for s in order]),
                "best": images[order[0]][None]}


@register
class ActivationPatch(Node):
    """Activation patching (Precise Parameter Localization): sample prompt A while the chosen
    cross-attention layers read prompt B ("all", "none", or comma-separated layer names or
    prefixes such as "up_blocks.0, mid_block"). Patching all layers gives B's image, none A's.
    With `effect table` on, each layer is also patched alone and the table says how far it moves
    the image from A toward B. UNet models (cross-attention)."""

    category = "analysis"
    inputs = {"model": MODEL, "vae": VAE, "a": CONDITIONING, "b": CONDITIONING,
              "negative": CONDITIONING.optional("what to steer away from (default: the empty prompt)"),
              "latent": LATENT}
    params = {
        "layers": String("up_blocks.0", help="all, none, or comma-separated layer names or prefixes"),
        "scheduler": Choice(SCHEDULER_NAMES, "euler", help="the sampling algorithm"),
        "steps": Int(20, 1, 500, help="denoising steps"),
        "cfg": Float(5.0, 0.0, 30.0, step=0.5, help="classifier-free guidance scale"),
        "seed": Seed(),
        "effect_table": Bool(True, help="also patch each layer alone and tabulate its effect"),
    }
    outputs = {"image": IMAGE, "latent": LATENT, "table": TABLE}

    def run(self, ctx, model, vae, a, b, negative, latent, layers, scheduler, steps, cfg, seed, effect_table):
        import torch

        from kernels.analysis import activation_patch as ap
        from kernels.analysis.table import Table
        from kernels.images import model_to_image

        from .core import Sampler

        try:
            chosen = ap.select_layers(model.unet, layers)
            all_layers = ap.cross_attention_layers(model.unet)
        except ap.ActivationPatchError as exc:
            raise NodeError(f"ActivationPatch: {exc}") from None
        sampler = Sampler()

        def render(names):
            patched = model.with_patch(ap.CrossAttentionPatch(b.embeds, names)) if names else model
            try:
                out = sampler.run(ctx, patched, a, negative, latent, scheduler, steps, cfg, seed, 1.0)["latent"]
            except ap.ActivationPatchError as exc:
                raise NodeError(f"ActivationPatch: {exc}") from None
            with torch.no_grad():
                return out, model_to_image(vae.decode(out))

        out, image = render(chosen)
        table = Table("Activation patching (not computed)", ["layer", "change from A", "toward B"])
        if effect_table:
            image_a, image_b = render(())[1], render(tuple(all_layers))[1]
            table = ap.effect_table(ap.effect_rows(all_layers, lambda n: render(n)[1], image_a, image_b))
        return {"image": image, "latent": out, "table": table}


@register
class SaveTable(Node):
    """Save a result table as CSV in the run's output folder (`prefix`.csv), write it to the
    run log as aligned text, and show it in the app's Table panel."""

    category = "analysis"
    inputs = {"table": TABLE}
    params = {"prefix": String("table", file_name=True, help="the file name, without .csv")}
    output_node = True
    always_run = True

    def run(self, ctx, table, prefix):
        import csv
        import io
        import logging

        from kernels.files import atomic_write

        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(table.columns)
        writer.writerows(table.rows)
        path = ctx.output_file(f"{prefix}.csv")
        atomic_write(path, buffer.getvalue().encode("utf-8"), durable=False)
        logging.getLogger(__name__).info("%s", table.as_text())
        ctx.show_table(table)
        return {}
