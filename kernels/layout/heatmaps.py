"""Attention heat maps (the AttentionMaps node): where each word of the prompt looked.

`AttentionRecordPatch` records the conditional rows' per-token cross-attention maps of a run
(averaged over heads, layers and the steps in [start, end)) into an `AttentionStore` made for
that run, and hands the run's maps to the caller's `sink` list when the run ends; the rest draws
them as a row of heat-map tiles.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from kernels.attention import AttentionStore, controller_for, registered
from kernels.patching import ModelPatch

from .boxes import prompt_tokens


class AttentionRecordPatch(ModelPatch):
    """Records the conditional rows' per-token cross-attention maps over [start, end) of a run;
    at the end of each run its maps (B, L, h, w), or None, are appended to `sink` if given.
    Recording never changes the output."""

    kind = "attention-record"

    def __init__(self, start: float = 0.0, end: float = 1.0, sink: Optional[list] = None):
        self.start, self.end = float(start), float(end)
        self.sink = sink

    def cache_key(self):
        return f"{self.kind}:{self.start}:{self.end}"

    @contextlib.contextmanager
    def applied(self, unet, run) -> Iterator[Optional[AttentionStore]]:
        if run is None:
            yield None
            return
        store = AttentionStore("observe", self.start, self.end)
        with controller_for(unet, run) as ctl, registered(ctl, store):
            yield store
        if self.sink is not None:
            self.sink.append(store.maps())


def select_word_tokens(cond, words: str = "") -> tuple[list[str], list[int]]:
    """Labels and token positions to show: the comma-separated `words` (or every prompt word)."""
    wanted = [w.strip().lower() for w in words.split(",") if w.strip()]
    labels, tokens = [], []
    for pos, word in prompt_tokens(cond):
        if wanted and word not in wanted:
            continue
        labels.append(word)
        tokens.append(pos)
    return labels, tokens


def heat_colours(values: torch.Tensor) -> torch.Tensor:
    """0..1 values (..., h, w) -> RGB (..., h, w, 3): black, red, yellow, white."""
    v = values.clamp(0, 1)[..., None]
    r = (v * 3).clamp(0, 1)
    g = (v * 3 - 1).clamp(0, 1)
    b = (v * 3 - 2).clamp(0, 1)
    return torch.cat([r, g, b], dim=-1)


def heatmap_grid(maps: torch.Tensor, tile: int = 64, gap: int = 2) -> torch.Tensor:
    """(T, h, w) maps -> one IMAGE (1, tile, T*(tile+gap)-gap, 3), each map stretched over its
    own range (min black, max white), tiles in a row separated by gray gaps."""
    t, h, w = maps.shape
    m = maps.detach().float()
    lo = m.flatten(1).amin(dim=1)[:, None, None]
    hi = m.flatten(1).amax(dim=1)[:, None, None]
    m = (m - lo) / (hi - lo).clamp_min(1e-12)
    th = max(1, round(tile * h / max(h, w)))
    tw = max(1, round(tile * w / max(h, w)))
    big = F.interpolate(m[:, None], size=(th, tw), mode="nearest")[:, 0]
    tiles = heat_colours(big)  # (T, th, tw, 3)
    width = t * tw + (t - 1) * gap
    out = torch.full((1, th, width, 3), 0.5)
    for i in range(t):
        x = i * (tw + gap)
        out[0, :, x:x + tw] = tiles[i]
    return out
