"""Boxes and the prompt tokens they claim: the geometry every layout technique shares.

Boxes are {"x0","y0","x1","y1" in 0..1, "phrase"}; a box may carry "mask": a 2-D list of 0/1
rows (any size) used instead of the rectangle. `resolve_layout` finds each box's phrase among
the prompt's tokens, and a `MaskCache` keeps the boxes' masks at each attention resolution a run
meets.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from kernels.hashing import key_of
from kernels.text import words_of

STOPWORDS = frozenset("a an the and of with at on in to".split())


def box_mask(box: dict, height: int, width: int) -> torch.Tensor:
    """A (height, width) 0/1 mask: pixels whose centre lies in the box (or the box's own mask).

    A box smaller than one pixel still gets the pixel under its centre, so no phrase is lost at
    coarse attention resolutions.
    """
    if box.get("mask") is not None:
        m = torch.as_tensor(box["mask"], dtype=torch.float32)[None, None]
        return (F.interpolate(m, size=(height, width), mode="area")[0, 0] >= 0.5).float()
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    inside_y = (ys >= box["y0"]) & (ys < box["y1"])
    inside_x = (xs >= box["x0"]) & (xs < box["x1"])
    mask = (inside_y[:, None] & inside_x[None, :]).float()
    if mask.sum() == 0:
        cy = min(height - 1, int((box["y0"] + box["y1"]) / 2 * height))
        cx = min(width - 1, int((box["x0"] + box["x1"]) / 2 * width))
        mask[cy, cx] = 1.0
    return mask


def layout_key(layout: Optional[dict]) -> str:
    """A stable hash of a layout, for patch cache keys."""
    return key_of(layout)


def prompt_tokens(cond) -> list[tuple[int, str]]:
    """(position, word) of every word token of the prompt, in order."""
    return sorted((p, w) for w, ps in cond.words.items() for p in ps)


def phrase_positions(cond, phrase: str, taken: Optional[set] = None) -> list[int]:
    """Token positions of `phrase` in the prompt, content words only ("a", "the"... dropped).

    The phrase is looked for as a run of consecutive prompt words (the first run not already
    `taken` by an earlier box), so "a red circle and a red square" gives each box its own "red".
    If it is not there verbatim, every occurrence of each content word is used.
    """
    words = words_of(phrase)
    if not words:
        return []
    content = [w for w in words if w not in STOPWORDS] or words
    seq = prompt_tokens(cond)
    toks = [w for _, w in seq]
    taken = taken if taken is not None else set()
    for start in range(len(toks) - len(words) + 1):
        if toks[start:start + len(words)] == words:
            pos = [seq[start + j][0] for j, w in enumerate(words) if w in content]
            if not set(pos) & taken:
                taken.update(pos)
                return pos
    out = sorted({p for w in content for p in cond.words.get(w, ())})
    taken.update(out)
    return out


def resolve_layout(layout: Optional[dict], cond) -> list[dict]:
    """Boxes with their token positions in `cond`; boxes whose phrase is not in the prompt
    (or empty) are dropped for token-based techniques."""
    if not layout:
        return []
    taken: set = set()
    out = []
    for box in layout.get("boxes", []):
        pos = phrase_positions(cond, box.get("phrase", ""), taken)
        if pos:
            out.append({**box, "tokens": pos})
    return out


class MaskCache:
    """The masks of a run's boxes at each attention resolution, made once per resolution."""

    def __init__(self, boxes: Sequence[dict]):
        self.boxes = list(boxes)
        self._cache: dict = {}

    def masks(self, h: int, w: int, device=None) -> torch.Tensor:
        """(n_boxes, h*w) masks."""
        key = (h, w)
        if key not in self._cache:
            self._cache[key] = torch.stack([box_mask(b, h, w).flatten() for b in self.boxes]) \
                if self.boxes else torch.zeros(0, h * w)
        m = self._cache[key]
        return m.to(device) if device is not None else m

    def token_matrix(self, h: int, w: int, n_tokens: int, device=None) -> torch.Tensor:
        """A (h*w, n_tokens) matrix: 1 where a box's token meets a pixel inside that box."""
        key = ("A", h, w, n_tokens)
        if key not in self._cache:
            a = torch.zeros(h * w, n_tokens)
            masks = self.masks(h, w)
            for b, m in zip(self.boxes, masks):
                for t in b["tokens"]:
                    if t < n_tokens:
                        a[:, t] = torch.maximum(a[:, t], m)
            self._cache[key] = a
        a = self._cache[key]
        return a.to(device) if device is not None else a
