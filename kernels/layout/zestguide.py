"""ZestGuide: gradient guidance that fits each phrase's cross-attention map to its mask.

In the first half of the steps, one extra forward with gradients; the loss is
sum_i BCE(S_i / max S_i, M_i) between the max-normalised cross-attention map of segment i's
tokens (softmax over tokens, averaged over heads and layers, upsampled) and its mask; the latent
moves by a gradient step normalised by its largest entry, scaled by sqrt(1 - abar_t) (as in the
official code; the step is kernels.layout.guidance's).

Source checked (the paper's own text was not reachable here, only its abstract): the authors'
gcouairon/zestguide (first tau = 0.5 of the steps, maps from the 16x16/8x8(/32x32) layers
softmaxed over tokens and averaged, L-inf-normalised gradient, lr * sqrt(1 - abar_t), used
together with the eDiff-I bias). Their released configs add a BCE term on scaled, unnormalised
maps and skip gradients of near-correct pixels; we keep the paper's max-normalised BCE only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .guidance import GuidancePatch, GuidanceRun, token_maps


def zest_loss(box_maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """sum_i BCE(S_i / max S_i, M_i), mean over pixels; box_maps (B, n, h, w), masks (n, h, w)."""
    s = box_maps / box_maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-8)
    s = s.clamp(1e-6, 1 - 1e-6)
    target = masks[None].expand_as(s)
    return F.binary_cross_entropy(s, target, reduction="none").mean(dim=(-2, -1)).sum(dim=1).mean()


class ZestGuideRun(GuidanceRun):
    def loss(self, maps, masks, step):
        return zest_loss(token_maps(maps, self.boxes), masks), {}


class ZestGuidePatch(GuidancePatch):
    """ZestGuide: BCE between max-normalised token maps and the masks."""

    kind = "zestguide"
    run_class = ZestGuideRun
