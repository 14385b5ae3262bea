"""Analysis nodes: DiffusionClassifier (which prompt explains an image best), SeedScan (rank
seeds by a metric), CycleEdit (DPM-Encoder editing) and ActivationPatch (prompt B's
cross-attention inputs in prompt A's run). The math is in kernels.analysis and kernels.editing;
tables are kernels.analysis.table.Table values on a TABLE port."""

from __future__ import annotations

from .base import (
    CLIP,
    CONDITIONING,
    IMAGE,
    MODEL,
    VAE,
    DataType,
    Int,
    Node,
    NodeError,
    Seed,
    String,
)
from .registry import register

TABLE = DataType("TABLE", "#90a4ae", "a small table of results (columns and rows)")

# kernels.analysis.classifier defaults (no torch here)
CLASSIFIER_SAMPLES, CLASSIFIER_FIRST, CLASSIFIER_KEEP = 32, 8, 3


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
