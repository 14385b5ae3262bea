"""Multi-Concept T2I-Zero: a multi-object prompt that keeps all its objects, training-free.

EmbeddingTweak corrects the concepts' text embeddings (CONDITIONING -> CONDITIONING);
CrossTokenNMS keeps the concepts' cross-attention apart (MODEL -> MODEL). They chain:
TextEncode -> EmbeddingTweak -> Sampler, LoadModel -> CrossTokenNMS -> Sampler. The math is in
kernels.t2i_zero; the defaults are its (kernels.t2i_zero.defaults, which loads no torch).
"""

from __future__ import annotations

from kernels.t2i_zero import defaults

from .base import CONDITIONING, MODEL, Float, Int, Node, NodeError, String
from .registry import register

_CONCEPTS_HELP = ("comma-separated concept phrases; empty: the noun after each 'a'/'an' of the "
                  "prompt")


def _check_concepts(conditioning, concepts: str) -> None:
    from kernels.t2i_zero.concepts import missing_concepts, split_concepts

    missing = missing_concepts(conditioning, split_concepts(concepts))
    if missing:
        raise NodeError(f"concepts {missing} are not in the prompt {conditioning.prompt!r}")


@register
class EmbeddingTweak(Node):
    """Multi-Concept T2I-Zero's Correction by Similarities: each concept token's embedding is
    rebuilt, feature by feature, from the prompt tokens near it whose features agree with it
    most (element-wise similarity above a threshold), so it carries less of the other concepts.
    Strength 0 passes the conditioning through unchanged."""

    category = "conditioning"
    inputs = {"conditioning": CONDITIONING}
    params = {
        "concepts": String("", help=_CONCEPTS_HELP),
        "window": Int(defaults.CORR_WINDOW, 0, 600,
                      help="prompt tokens on each side of a concept token that may contribute"),
        "threshold": Float(defaults.CORR_THRESHOLD, 0.0, 1.0, step=0.05,
                           help="a token's feature contributes when its similarity is at least "
                           "this share of the largest"),
        "strength": Float(defaults.CORR_STRENGTH, 0.0, 1.0, step=0.05,
                          help="blend of the corrected embedding; 0 = off"),
    }
    outputs = {"conditioning": CONDITIONING}

    def run(self, ctx, conditioning, concepts, window, threshold, strength):
        from kernels.t2i_zero.embedding import correct_conditioning

        if conditioning.links:
            raise NodeError("EmbeddingTweak reads one encoder's token sequence; SD3's joint "
                            "CLIP + T5 sequence is not supported")
        _check_concepts(conditioning, concepts)
        return {"conditioning": correct_conditioning(conditioning, concepts, window, threshold,
                                                     strength)}


@register
class CrossTokenNMS(Node):
    """Multi-Concept T2I-Zero's Cross-Token Non-Maximum Suppression: in every cross-attention
    layer and head, at each pixel only the concept with the highest (smoothed) attention keeps
    it; the other concepts' attention there is suppressed. The concepts are read from the
    positive prompt (the noun after each 'a'/'an', or `concepts`). Strength 0 is off."""

    category = "conditioning"
    inputs = {"model": MODEL, "positive": CONDITIONING}
    params = {
        "concepts": String("", help=_CONCEPTS_HELP),
        "strength": Float(defaults.NMS_STRENGTH, 0.0, 1.0, step=0.05,
                          help="suppression of the non-maximal concepts (1: to zero); 0 = off"),
        "start": Float(defaults.NMS_START, 0.0, 1.0, step=0.05,
                       help="fraction of the steps where it starts"),
        "end": Float(defaults.NMS_END, 0.0, 1.0, step=0.05, help="fraction of the steps where it stops"),
    }
    outputs = {"model": MODEL}

    def run(self, ctx, model, positive, concepts, strength, start, end):
        from kernels.layout import is_mmdit
        from kernels.t2i_zero.concepts import concept_phrases
        from kernels.t2i_zero.nms import CrossTokenNMSPatch

        if start > end:
            raise NodeError(f"start ({start}) is after end ({end})")
        if is_mmdit(model.unet):
            raise NodeError("CrossTokenNMS needs a UNet model (SD 1.x, 2.x, SDXL): an SD3 or "
                            "FLUX model has no cross-attention layers")
        _check_concepts(positive, concepts)
        patch = CrossTokenNMSPatch(concept_phrases(positive, concepts), strength, start, end)
        if patch.is_noop():
            return {"model": model}
        return {"model": model.with_patch(patch)}
