"""Tiled inference: run an image-to-image function tile by tile and feather the overlaps.

`tiled_apply(fn, x, scale=..., tile=..., overlap=...)` cuts an NCHW tensor into overlapping
tiles, calls `fn` on each (its output is the tile `scale` times larger), and blends the results
with weights that ramp up over each overlap (smoothstep, so two neighbours' weights add to one).
A pixel that only one tile covers is that tile's output unchanged; only the overlaps are mixed.
The tile grid is a product of two axis plans, so the weight sum is an outer product of two
vectors and no full-size weight buffer is ever made. Written here because no installed library
tiles an arbitrary callable (diffusers tiles only its own VAEs, spandrel not at all).

The result is accumulated into an NHWC buffer (`channels_last=True`) or NCHW, so a caller that
wants IMAGE layout never needs a second full-size copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

TileFn = Callable[[torch.Tensor], torch.Tensor]


Span = tuple[int, int]  # [start, end) along one axis, in input pixels


@dataclass(frozen=True)
class TileGrid:
    """The tiles along each axis, as [start, end) spans of input pixels."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    overlap: int
    rows: tuple[Span, ...]
    cols: tuple[Span, ...]

    @property
    def count(self) -> int:
        return len(self.rows) * len(self.cols)

    @property
    def single(self) -> bool:
        return self.count == 1


def axis_spans(length: int, tile: int, overlap: int, multiple_of: int = 1) -> tuple[Span, ...]:
    """The fewest tiles of about `tile` pixels that cover `length` with at least `overlap`
    shared pixels between neighbours, spread evenly. Every start is a multiple of `multiple_of`
    (a model that unshuffles pixels or works in windows sees each tile on the image's grid);
    the last tile runs to the end."""
    if tile >= length:
        return ((0, length),)
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
    count = -(-(length - overlap) // stride)  # ceil
    # the smallest tile that covers the length in that many: no tile overlaps more than it must
    tile = min(tile, -(-(length + (count - 1) * overlap) // count))
    tile += -tile % multiple_of
    last = length - tile
    starts = sorted({(round(i * last / (count - 1)) // multiple_of) * multiple_of for i in range(count)})
    return tuple((s, min(length, s + tile) if i + 1 < len(starts) else length)
                 for i, s in enumerate(starts))


def plan_tiles(height: int, width: int, tile: int | tuple[int, int], overlap: int,
               multiple_of: int = 1) -> TileGrid:
    """The grid for an image; a tile larger than the image is clamped to it (one tile), and the
    overlap to half the tile."""
    tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tile
    tile_h, tile_w = min(tile_h, height), min(tile_w, width)
    overlap = max(0, min(overlap, tile_h // 2, tile_w // 2))
    rows = axis_spans(height, tile_h, overlap, multiple_of)
    cols = axis_spans(width, tile_w, overlap, multiple_of)
    return TileGrid(height, width, max(e - s for s, e in rows), max(e - s for s, e in cols),
                    overlap, rows, cols)


def _ramp(n: int) -> torch.Tensor:
    """Smoothstep weights over `n` pixels, rising from ~0 to ~1; ramp(n) + ramp(n).flip(0) == 1."""
    u = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    return u * u * (3 - 2 * u)


def axis_weights(spans: tuple[Span, ...], scale: float) -> list[torch.Tensor]:
    """Per tile, its output pixels' blend weights along one axis: 1 where no neighbour overlaps,
    a ramp over each overlap with a neighbour (in output pixels)."""
    weights = []
    for i, (start, end) in enumerate(spans):
        size = round(end * scale) - round(start * scale)
        w = torch.ones(size)
        if i > 0:
            left = round(spans[i - 1][1] * scale) - round(start * scale)
            if left > 0:
                w[:left] = torch.minimum(w[:left], _ramp(left))
        if i + 1 < len(spans):
            right = round(end * scale) - round(spans[i + 1][0] * scale)
            if right > 0:
                w[size - right:] = torch.minimum(w[size - right:], _ramp(right).flip(0))
        weights.append(w)
    return weights


def _weight_sum(spans: tuple[Span, ...], weights: list[torch.Tensor], out_len: int,
                scale: float) -> torch.Tensor:
    total = torch.zeros(out_len)
    for (start, _end), w in zip(spans, weights):
        o = round(start * scale)
        total[o:o + len(w)] += w
    return total


def tiled_apply(fn: TileFn, x: torch.Tensor, *, scale: float, tile: int | tuple[int, int],
                overlap: int, multiple_of: int = 1, channels_last: bool = False,
                out: Optional[torch.Tensor] = None,
                progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """`fn` over `x` (NCHW) tile by tile, overlaps feathered. `fn` maps an (N, C, h, w) tile to
    (N, C', h*scale, w*scale). One tile covering the image is `fn(x)` itself. `out`, when given,
    is the float32 buffer the result is written into (NHWC with `channels_last`)."""
    n, _, height, width = x.shape
    grid = plan_tiles(height, width, tile, overlap, multiple_of)
    out_h, out_w = round(height * scale), round(width * scale)
    if grid.single:
        y = fn(x)
        if progress:
            progress(1, 1)
        y = y.permute(0, 2, 3, 1) if channels_last else y
        if out is None:
            return y.contiguous()
        out.copy_(y)
        return out
    wy, wx = axis_weights(grid.rows, scale), axis_weights(grid.cols, scale)
    if out is not None:
        out.zero_()
    done = 0
    for r, (top, bottom) in enumerate(grid.rows):
        for c, (left, right) in enumerate(grid.cols):
            y = fn(x[:, :, top:bottom, left:right])
            if out is None:
                shape = (n, out_h, out_w, y.shape[1]) if channels_last else (n, y.shape[1], out_h, out_w)
                out = torch.zeros(shape, dtype=torch.float32, device=y.device)
            weight = (wy[r][:, None] * wx[c][None, :]).to(y.device)
            oy, ox = round(top * scale), round(left * scale)
            th, tw = y.shape[2], y.shape[3]
            if (th, tw) != tuple(weight.shape):
                raise ValueError(f"a {bottom - top}x{right - left} tile came back {th}x{tw}, not "
                                 f"{weight.shape[0]}x{weight.shape[1]} (scale {scale})")
            if channels_last:
                out[:, oy:oy + th, ox:ox + tw, :] += (y.float() * weight).permute(0, 2, 3, 1)
            else:
                out[:, :, oy:oy + th, ox:ox + tw] += y.float() * weight
            del y
            done += 1
            if progress:
                progress(done, grid.count)
    # The weight sum is separable: divide by its row and column factors in place, never making
    # the (out_h, out_w) product (64 MB at 4096x4096).
    rows = _weight_sum(grid.rows, wy, out_h, scale).to(out.device)
    cols = _weight_sum(grid.cols, wx, out_w, scale).to(out.device)
    if channels_last:
        out /= rows[None, :, None, None]
        out /= cols[None, None, :, None]
    else:
        out /= rows[None, None, :, None]
        out /= cols[None, None, None, :]
    return out
