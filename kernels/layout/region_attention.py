"""Paint-with-Words (eDiff-I): a layout as a bias on the cross-attention logits.

`RegionAttentionPatch` adds `w * A` to the cross-attention logits before the softmax,
`softmax((QK^T + w A) / sqrt(d))`, where A[p, token] = 1 for the phrase's tokens at pixels
inside its box and `w = w' * log(1 + sigma_t) * max(QK^T)`, so the push is strongest at high
noise. Conditional pass only (the reference implementation gives the unconditional pass weight
0). Option: also suppress the tokens outside their box (-A there).

Source checked (the paper's own text was not reachable here, only its abstract):
cloneofsimo/paint-with-words-sd (bias added to QK^T before the 1/sqrt(d) scale,
w = w' log(1 + sigma) max(QK^T), 0 in the unconditional pass).
"""

from __future__ import annotations

import torch

from kernels.attention import AttentionController, LayerInfo, paint_with_words_weight

from .base import LayoutPatch, LayoutRun
from .defaults import REGION_STRENGTH


class RegionAttentionRun(LayoutRun):
    """One run's Paint-with-Words bias (the processors' `bias` transform)."""

    patch: "RegionAttentionPatch"

    def wants_bias(self, ctl: AttentionController, layer: LayerInfo) -> bool:
        return bool(self.boxes) and ctl.in_range(self.patch.start, self.patch.end)

    def bias(self, ctl: AttentionController, layer: LayerInfo, q: torch.Tensor, k: torch.Tensor):
        a = self.masks.token_matrix(layer.height, layer.width, k.shape[2], q.device).to(q.dtype)
        if self.patch.suppress_outside:
            # tokens that belong to some box, at pixels outside that box, are pushed down
            owned = (a.amax(dim=0, keepdim=True) > 0).to(q.dtype)
            a = a - owned * (1 - a)
        w = paint_with_words_weight(self.patch.strength, ctl.sigma, q, k)
        scale = q.shape[-1] ** -0.5
        # softmax((QK^T + w A) * scale) == SDPA(q, k, v, attn_mask = w * A * scale)
        return (w * scale * a)[None, None]


class RegionAttentionPatch(LayoutPatch):
    """eDiff-I Paint-with-Words logit bias (see module doc)."""

    kind = "region-attention"
    run_class = RegionAttentionRun

    def __init__(self, layout, strength: float = REGION_STRENGTH, start: float = 0.0,
                 end: float = 1.0, suppress_outside: bool = False):
        super().__init__(layout, start, end)
        self.strength = float(strength)
        self.suppress_outside = bool(suppress_outside)

    def params_key(self):
        return {"w": self.strength, "suppress": self.suppress_outside}

    def is_noop(self):
        return super().is_noop() or self.strength == 0.0
