"""Multi-Concept T2I-Zero's Correction by Similarities ("Corr-Emb") on a Conditioning.

The paper finds that a concept token's text embedding also carries other concepts' features
(non-localised contribution) and rebuilds it from the prompt tokens most similar to it. For a
concept token c with embedding f_c and the prompt's tokens f_i:

    S_i = f_c * f_i                       element-wise similarity, one value per feature
    S^_i = S_i / max_i S_i                per feature, over the contributing tokens (<= 1)
    w_i = S_i  where S^_i >= threshold, else 0
    f~_c = sum_i w_i f_i / sum_i w_i      per feature (f_c where no weight is left)
    f_c <- (1 - strength) f_c + strength f~_c

Contributing tokens are the prompt's word tokens within `window` positions of c (c itself
included); start, end and padding tokens never contribute. Every concept token is corrected
from the input embeddings, so the order of the concepts does not matter. Nothing else changes:
the other tokens, the empty prompt's embeddings, the pooled projections and the word map.

Sources checked: the paper's abstract and project page, and its OpenReview reviews, which quote
Algorithm 1: the similarities are an element-wise product of text embeddings (not cosine), a
score threshold in [0, 1], a window size and a correction strength. The paper's own text was not
reachable here, so these are our choices: the per-feature normalisation by the largest
similarity (what makes a threshold in [0, 1] meaningful), the weighted average (weights that sum
to one keep the embedding's scale, for every encoder in SDXL's side-by-side features), and
leaving the special tokens out. The paper's other adjustment (padding/end tokens against
concept dominance) is not implemented. Hand-written: no library implements the paper.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from kernels.text import Conditioning

from .concepts import concept_groups, concept_phrases
from .defaults import CORR_STRENGTH, CORR_THRESHOLD, CORR_WINDOW


class EmbeddingTweakError(ValueError):
    """Settings of Corr-Emb that cannot be used; the message names the value."""


def check_settings(window: int, threshold: float, strength: float) -> None:
    if window < 0:
        raise EmbeddingTweakError(f"window must be 0 or more, got {window}")
    if not 0.0 <= threshold <= 1.0:
        raise EmbeddingTweakError(f"threshold must be in 0..1, got {threshold}")
    if not 0.0 <= strength <= 1.0:
        raise EmbeddingTweakError(f"strength must be in 0..1, got {strength}")


def corrected_token(embeds: torch.Tensor, c: int, contributors: Sequence[int],
                    threshold: float) -> torch.Tensor:
    """f~_c of one (L, D) sequence: the similarity-weighted average of `contributors`' embeddings
    (see the module doc), in float32."""
    f = embeds.float()
    idx = torch.as_tensor(sorted(set(contributors) | {c}), dtype=torch.long, device=embeds.device)
    rows = f[idx]                                     # (n, D)
    sims = f[c] * rows                                # (n, D)
    top = sims.amax(dim=0)                            # (D,) >= f_c ** 2 >= 0
    normalised = sims / torch.where(top > 0, top, torch.ones_like(top))
    weights = torch.where((normalised >= threshold) & (sims > 0), sims, torch.zeros_like(sims))
    total = weights.sum(dim=0)
    averaged = (weights * rows).sum(dim=0) / torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, averaged, f[c])


def correct_by_similarities(embeds: torch.Tensor, concept_positions: Sequence[int],
                            word_positions: Sequence[int], window: int = CORR_WINDOW,
                            threshold: float = CORR_THRESHOLD,
                            strength: float = CORR_STRENGTH) -> torch.Tensor:
    """(B, L, D) embeddings with each concept position corrected (a new tensor; the input is
    not changed). `word_positions` are the prompt's word tokens, the possible contributors."""
    check_settings(window, threshold, strength)
    out = embeds.clone()
    length = embeds.shape[1]
    concepts = sorted({c for c in concept_positions if 0 <= c < length})
    words = sorted({p for p in word_positions if 0 <= p < length})
    for b in range(embeds.shape[0]):
        for c in concepts:
            near = [i for i in words if abs(i - c) <= window]
            fixed = corrected_token(embeds[b], c, near, threshold)
            blended = (1.0 - strength) * embeds[b, c].float() + strength * fixed
            out[b, c] = blended.to(embeds.dtype)
    return out


def correct_conditioning(cond: Conditioning, concepts: str = "", window: int = CORR_WINDOW,
                         threshold: float = CORR_THRESHOLD,
                         strength: float = CORR_STRENGTH) -> Conditioning:
    """A new Conditioning whose concept tokens are corrected (the module doc), its word map,
    empty prompt and pooled projections kept. `concepts`: comma-separated phrases, or "" for
    the prompt's nouns (kernels.t2i_zero.concepts). Strength 0, or no concept in the prompt,
    returns `cond` itself. A prompt schedule's stages are corrected likewise, each against its
    own prompt."""
    check_settings(window, threshold, strength)
    if strength == 0.0:
        return cond
    groups = concept_groups(cond, concept_phrases(cond, concepts))
    positions = [p for g in groups for p in g]
    stages = tuple((correct_conditioning(stage, concepts, window, threshold, strength), *rest)
                   for stage, *rest in cond.stages)
    if not positions and all(new[0] is old[0] for new, old in zip(stages, cond.stages)):
        return cond
    words = [p for ps in cond.words.values() for p in ps]
    embeds = correct_by_similarities(cond.embeds, positions, words, window, threshold, strength) \
        if positions else cond.embeds
    return replace(cond, embeds=embeds, stages=stages)
