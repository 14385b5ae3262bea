"""Multi-Concept T2I-Zero's Cross-Token Non-Maximum Suppression: the attention re-balancing.

In every cross-attention layer, for each attention head and the conditional rows only: each
concept's map is the sum of its tokens' attention probabilities over the image; the maps are
smoothed with a 3x3 Gaussian; at each pixel the concept whose smoothed map is highest keeps its
tokens' probabilities and every other concept's are scaled by (1 - strength) (0 at strength 1,
the paper's suppression). Other tokens are untouched and the rows are not renormalised.

It is a transform on the one cross-attention processor stack (kernels.attention: `edit_active`,
`edit_probs`), so it composes with the layout patches (a Paint-with-Words bias is added before
the softmax, the suppression edits the probabilities after it) and a step outside its window
runs diffusers' own AttnProcessor2_0. UNet families (SD 1.x/2.x, SDXL); an MM-DiT has no
cross-attention layer for it.

Sources checked: the paper's abstract and its OpenReview reviews, which quote Algorithm 2: the
concept tokens' attention maps of one head, Gaussian smoothing with kernel size 3, the per-pixel
maximum concept kept and the others suppressed. Our choices where that is all we could read: the
sigma (0.5, Attend-and-Excite's), multi-token concepts summed, every layer and step by default,
no renormalisation. The patch holds only its settings; each run resolves the concepts against
the run's own prompt.
"""

from __future__ import annotations

import contextlib
import json
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from kernels.attention import AttentionController, LayerInfo, controller_for, registered
from kernels.layout.a_star import gaussian_smooth
from kernels.patching import ModelPatch, SamplingRun

from .concepts import concept_groups
from .defaults import NMS_END, NMS_SIGMA, NMS_START, NMS_STRENGTH


def concept_maps(probs: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, heads, n_concepts, N): each concept's summed token probabilities at every pixel."""
    return torch.stack([probs[..., list(g)].sum(-1) for g in groups], dim=2)


def winners(maps: torch.Tensor, height: int, width: int, sigma: float = NMS_SIGMA) -> torch.Tensor:
    """(B, heads, N) index of the concept with the highest smoothed map at each pixel."""
    b, h, n, _ = maps.shape
    grid = maps.reshape(b * h, n, height, width)
    if sigma > 0 and min(height, width) >= 2:  # reflect padding needs two pixels a side
        grid = gaussian_smooth(grid, sigma)
    return grid.reshape(b, h, n, height * width).argmax(dim=2)


def cross_token_nms(probs: torch.Tensor, groups: Sequence[Sequence[int]], height: int, width: int,
                    strength: float = NMS_STRENGTH, sigma: float = NMS_SIGMA) -> torch.Tensor:
    """(B, heads, N, L) probabilities with every non-maximal concept's tokens scaled by
    (1 - strength) at each pixel (see the module doc); fewer than two concepts: unchanged."""
    groups = [[t for t in g if t < probs.shape[-1]] for g in groups]
    groups = [g for g in groups if g]
    if len(groups) < 2 or strength == 0.0:
        return probs
    win = winners(concept_maps(probs, groups), height, width, sigma)
    kept = F.one_hot(win, len(groups)).to(probs.dtype)       # (B, heads, N, n_concepts)
    scale = torch.ones_like(probs)
    for j, g in enumerate(groups):
        factor = 1.0 - strength * (1.0 - kept[..., j])       # (B, heads, N)
        scale[..., g] = scale[..., g] * factor[..., None]
    return probs * scale


class CrossTokenNMSRun:
    """One sampling run's suppression: the concepts' token groups in the run's prompt (the
    processors' `edit_probs` transform)."""

    def __init__(self, patch: "CrossTokenNMSPatch", groups: list[list[int]]):
        self.patch = patch
        self.groups = groups

    def edit_active(self, ctl: AttentionController, layer: LayerInfo) -> bool:
        return len(self.groups) >= 2 and ctl.in_range(self.patch.start, self.patch.end)

    def edit_probs(self, ctl: AttentionController, layer: LayerInfo, probs: torch.Tensor) -> torch.Tensor:
        return cross_token_nms(probs, self.groups, layer.height, layer.width,
                               self.patch.strength, self.patch.sigma)


class CrossTokenNMSPatch(ModelPatch):
    """Cross-Token Non-Maximum Suppression over `concepts` (phrases; see the module doc)."""

    kind = "cross-token-nms"

    def __init__(self, concepts: Sequence[str], strength: float = NMS_STRENGTH,
                 start: float = NMS_START, end: float = NMS_END, sigma: float = NMS_SIGMA):
        self.concepts = tuple(str(c) for c in concepts)
        self.strength = float(strength)
        self.start, self.end = float(start), float(end)
        self.sigma = float(sigma)

    def cache_key(self) -> str:
        return f"{self.kind}:" + json.dumps({"concepts": self.concepts, "strength": self.strength,
                                             "start": self.start, "end": self.end,
                                             "sigma": self.sigma})

    def is_noop(self) -> bool:
        return self.strength == 0.0 or len(self.concepts) < 2 or self.start >= self.end

    def describe(self) -> str:
        return f"{self.kind}({', '.join(self.concepts)}; strength {self.strength})"

    @contextlib.contextmanager
    def applied(self, unet, run: Optional[SamplingRun]) -> Iterator[Optional[CrossTokenNMSRun]]:
        if run is None or self.is_noop():
            yield None
            return
        groups = concept_groups(run.positive, list(self.concepts))
        if len(groups) < 2:
            yield None
            return
        state = CrossTokenNMSRun(self, groups)
        with controller_for(unet, run) as ctl, registered(ctl, state):
            yield state
