"""A-STAR: attention segregation and retention as a guidance loss (box positions unused).

Segregation keeps the concepts' maps from overlapping; retention keeps each concept's map
covering its previous step's binarised map, so a concept that appeared early is not lost.

Source checked: the ICCV 2023 paper's text (openaccess.thecvf.com, Agarwal et al.; no code
found). Eq. 2 (segregation) and Eq. 3 (retention: 1 - sum min(A_t-1, B_t) / sum (A_t-1 + B_t),
B_t the previous step's binarised map, refreshed every step, both losses weighted equally and
applied at every step) are as written there. Not given in the main text, so our choices: the
binarisation threshold (half the map's max), the 3x3 Gaussian (sigma 0.5, as Attend-and-
Excite), and the step rule, which is ZestGuide's normalised step rather than a plain gradient
step. Our default window is the first half of the steps: with this step rule, guiding to the
last step wrecked ShapesT2I's images (bench/layout.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .defaults import (
    A_STAR_RETENTION,
    A_STAR_SMOOTHING,
    GUIDANCE_END,
    GUIDANCE_ETA,
    GUIDANCE_ITERATIONS,
    GUIDANCE_START,
)
from .guidance import GuidancePatch, GuidanceRun, token_maps


def gaussian_smooth(maps: torch.Tensor, sigma: float = A_STAR_SMOOTHING) -> torch.Tensor:
    """3x3 Gaussian smoothing of (B, n, h, w) maps (Attend-and-Excite's; A-STAR does not say)."""
    if sigma <= 0:
        return maps
    x = torch.tensor([-1.0, 0.0, 1.0])
    k1 = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k1 = k1 / k1.sum()
    k = (k1[:, None] * k1[None, :]).to(maps)
    n = maps.shape[1]
    return F.conv2d(F.pad(maps, (1, 1, 1, 1), mode="reflect"), k.expand(n, 1, 3, 3), groups=n)


def segregation_loss(maps: torch.Tensor) -> torch.Tensor:
    """A-STAR: sum over concept pairs of sum_p min(A_m, A_n) / sum_p (A_m + A_n)."""
    n = maps.shape[1]
    total = maps.new_zeros(())
    for i in range(n):
        for j in range(i + 1, n):
            a, b = maps[:, i], maps[:, j]
            total = total + (torch.minimum(a, b).sum((-2, -1)) /
                             (a + b).sum((-2, -1)).clamp_min(1e-8)).mean()
    return total


def retention_loss(maps: torch.Tensor, previous: Optional[torch.Tensor]) -> torch.Tensor:
    """A-STAR retention (the paper's Eq. 3): each concept's map A should keep covering its
    previous step's binarised map B: sum_m (1 - sum_p min(A, B) / sum_p (A + B))."""
    if previous is None:
        return maps.new_zeros(())
    inter = torch.minimum(maps, previous).sum((-2, -1))
    total = (maps + previous).sum((-2, -1)).clamp_min(1e-8)
    return (1 - inter / total).sum(1).mean()


def binarise(maps: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """A-STAR's B_t: the paper does not give its threshold; half of each map's max is ours."""
    m = maps.detach()
    return (m >= threshold * m.amax(dim=(-2, -1), keepdim=True)).to(m.dtype)


class AStarRun(GuidanceRun):
    """One A-STAR run: it remembers the previous step's binarised maps (retention's target)."""

    patch: "AStarPatch"

    def __init__(self, patch, run, boxes):
        super().__init__(patch, run, boxes)
        self.previous: Optional[torch.Tensor] = None  # the target of this step's retention
        self.previous_step: Optional[int] = None
        self.pending: Optional[torch.Tensor] = None  # the next step's target

    def loss(self, maps, masks, step):
        p = self.patch
        a = gaussian_smooth(token_maps(maps, self.boxes, text_normalise=True, n_text=self.n_text),
                            p.smoothing)
        loss = segregation_loss(a)
        if p.retention:
            loss = loss + p.retention * retention_loss(a, self.previous)
        if self.previous_step != step:  # the first iteration of a step sets the next target
            self.previous_step = step
            self.pending = binarise(a)
        return loss, {}

    def guide(self, t, x):
        out = super().guide(t, x)
        if self.pending is not None:
            self.previous, self.pending = self.pending, None
        return out


class AStarPatch(GuidancePatch):
    """A-STAR segregation + retention over the layout's phrases (box positions are not used)."""

    kind = "a-star"
    run_class = AStarRun

    def __init__(self, layout, eta: float = GUIDANCE_ETA, start: float = GUIDANCE_START,
                 end: float = GUIDANCE_END, iterations: int = GUIDANCE_ITERATIONS,
                 retention: float = A_STAR_RETENTION, smoothing: float = A_STAR_SMOOTHING):
        super().__init__(layout, eta, start, end, iterations)
        self.retention = float(retention)
        self.smoothing = float(smoothing)

    def params_key(self):
        return {**super().params_key(), "ret": self.retention, "smooth": self.smoothing}

    def needs_boxes(self):
        return 1 if self.retention else 2
