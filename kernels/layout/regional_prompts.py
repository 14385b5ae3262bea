"""Per-region prompts: inside each box the cross-attention reads that box's own phrase.

`RegionalPromptPatch`: inside box i the cross-attention output is that of box i's own encoded
phrase (mixed with the global prompt by `mix`), elsewhere the global prompt's (the
multi-context attention of Spatial-Temporal attention control, with user-given weights instead
of its CLIP-optimised ones). `emphasis` adds a Paint-with-Words push on the region's own phrase
tokens: without it the phrase alone barely moved objects on the proxy model (a phrase says what,
not where).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from kernels.attention import AttentionController, LayerInfo
from kernels.hashing import content_hash

from .base import LayoutPatch, LayoutRun
from .defaults import REGIONAL_EMPHASIS, REGIONAL_MIX


class RegionalPromptRun(LayoutRun):
    """One run's regions (the processors' `regions` transform)."""

    patch: "RegionalPromptPatch"

    def regions(self, ctl: AttentionController, layer: LayerInfo):
        p = self.patch
        if not ctl.in_range(p.start, p.end):
            return []
        masks = self.masks.masks(layer.height, layer.width)
        out = []
        for i, e in enumerate(p.region_embeds[:len(self.boxes)]):
            tokens = torch.zeros(e.shape[1])
            toks = [t for t in p.region_tokens[i] if t < e.shape[1]] if i < len(p.region_tokens) else []
            tokens[toks] = 1.0
            out.append((masks[i], e, p.mix, p.emphasis if toks else 0.0, tokens))
        return out


class RegionalPromptPatch(LayoutPatch):
    """Each box's own phrase conditioning attended inside the box; the global prompt elsewhere."""

    kind = "regional-prompts"
    run_class = RegionalPromptRun

    def __init__(self, layout, region_embeds: Sequence[torch.Tensor], mix: float = REGIONAL_MIX,
                 start: float = 0.0, end: float = 1.0, emphasis: float = REGIONAL_EMPHASIS,
                 region_tokens: Optional[Sequence[Sequence[int]]] = None):
        super().__init__(layout, start, end)
        self.region_embeds = list(region_embeds)
        self.mix = float(mix)
        # emphasis: a Paint-with-Words push (w') on each region's own phrase tokens inside it
        self.emphasis = float(emphasis)
        self.region_tokens = [list(t) for t in (region_tokens or [[] for _ in self.region_embeds])]

    def params_key(self):
        return {"mix": self.mix, "embeds": content_hash(self.region_embeds),
                "emphasis": self.emphasis, "tokens": self.region_tokens}

    def is_noop(self):
        return super().is_noop() or self.mix == 0.0 or not self.region_embeds

    def boxes_for(self, run):
        # regions do not need the phrase in the global prompt: keep every box
        return [dict(b) for b in self.layout.get("boxes", [])]
