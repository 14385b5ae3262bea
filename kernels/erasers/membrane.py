"""SPM membrane: a rank-1 LoRA eraser whose strength follows the prompt.

Lyu et al., "One-dimensional Adapter to Rule Them All: Concepts, Diffusion Models and Erasing
Applications" (SPM). The membrane is rank 1 on every Linear (and 1x1 Conv) inside the transformer
blocks, trained with the ESD loss with the empty prompt as neutral plus latent anchoring
(kernels.erasers.finetune, objective "spm"). At inference its strength is the facilitated
transport m = max(cos(flat E(prompt), flat E(concept)), |words(prompt) & words(concept)| /
|words(concept)|).

Checked against Con6924/SPM infer_spm.py `calculate_matching_score`; we compare words where SPM
compares non-special token ids, the same thing for word-level tokenizers.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .patches import LoraPatch, loras_from_state


def transport_strength(prompt_embeds: torch.Tensor, prompt_words: Sequence[str],
                       concept_embeds: torch.Tensor, concept_words: Sequence[str]) -> float:
    """SPM's facilitated transport: max(cosine of the flattened embeddings, word overlap)."""
    a = prompt_embeds.detach().float().reshape(-1)
    b = concept_embeds.detach().float().reshape(-1)
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0)) if a.numel() == b.numel() else 0.0
    cw = set(concept_words)
    overlap = len(set(prompt_words) & cw) / len(cw) if cw else 0.0
    return max(0.0, min(1.0, max(cos, overlap)))


class MembranePatch(LoraPatch):
    """SPM: a rank-1 LoRA whose strength follows the prompt (facilitated transport).

    The prompt is the sampler's positive conditioning; with no sampling run (e.g. while another
    eraser is being trained on top) the membrane is closed (strength 0).
    """

    kind = "membrane"

    def __init__(self, loras, scale, concept_embeds: torch.Tensor, concept_words: Sequence[str],
                 strength: float = 1.0, meta: Optional[dict] = None):
        super().__init__(loras, scale, strength, meta)
        self.concept_embeds = concept_embeds.detach().to("cpu", torch.float32).contiguous()
        self.concept_words = [w.lower() for w in concept_words]

    def content(self):
        return super().content() + (self.concept_embeds, self.concept_words)

    def transport(self, cond) -> float:
        """m for a Conditioning (its embeddings and its words)."""
        return transport_strength(cond.embeds, list(cond.words), self.concept_embeds, self.concept_words)

    def effective_strength(self, run):
        if self.strength == 0.0 or run is None or run.positive is None:
            return 0.0
        return self.strength * self.transport(run.positive)

    def to_state(self):
        tensors, info = super().to_state()
        tensors["concept_embeds"] = self.concept_embeds
        info["concept_words"] = self.concept_words
        return tensors, info

    @classmethod
    def from_state(cls, tensors, info):
        return cls(loras_from_state(tensors), info["scale"], tensors["concept_embeds"],
                   info["concept_words"], info.get("strength", 1.0), info.get("meta"))
