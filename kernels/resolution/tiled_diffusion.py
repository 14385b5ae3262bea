"""Tiled diffusion for canvases far above a model's native size (MultiDiffusion: Bar-Tal et al.,
"MultiDiffusion: Fusing Diffusion Paths for Controlled Image Generation", ICML 2023).

At every step the canvas latent x_t is cut into overlapping tiles; the denoiser sees each tile at
the same timestep t, and each canvas pixel gets the average of the predictions of the tiles that
cover it. The scheduler then takes one step on the whole canvas. So the whole canvas follows one
noise schedule and one scheduler state, and no denoiser call is larger than a tile.

What is averaged: the model output, not x_{t-1}. MultiDiffusion's reference averages each tile's
x_{t-1} after its own scheduler step; for the deterministic samplers (DDIM, Euler, DPM-Solver)
a step is affine in the model output with the same coefficients at every pixel, so the average of
the tiles' steps is the step of the averaged output: the same result. Averaging the output also
keeps an ancestral sampler's fresh noise at full strength (averaging per-tile x_{t-1} would
average independent noises down) and a multistep solver's history whole, and it makes one tile
covering the canvas exactly the plain sampler. The average is uniform, as in MultiDiffusion
(every tile weight 1); classifier-free guidance is linear per pixel, so averaging the batched
[uncond, cond] outputs before the mix equals averaging the guided outputs.

`TiledDenoiser(unet, grid)` is called as the UNet is (`kernels.sampling.sample` takes it in the
UNet's place); the grid is `kernels.upscale.tiling.plan_tiles`'s, in latent pixels, with every
tile start on the UNet's downsampling grid.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

import torch

from kernels.upscale.tiling import TileGrid, plan_tiles


class TiledDiffusionError(ValueError):
    """A canvas or tile the model cannot take; the message names the sizes."""


def unet_size_multiple(unet) -> int:
    """The factor a UNet's latent sides must be multiples of: 2 per downsampling level."""
    blocks = getattr(unet.config, "down_block_types", ())
    return 2 ** max(len(blocks) - 1, 0)


def plan_latent_tiles(height: int, width: int, tile: tuple[int, int], overlap: int,
                      multiple: int) -> TileGrid:
    """The tile grid of a (height, width) latent: tiles of `tile` (h, w) latent pixels, clamped to
    the canvas, sharing at least `overlap` (at most half a tile), on the `multiple` grid."""
    for name, side in (("canvas height", height), ("canvas width", width),
                       ("tile height", tile[0]), ("tile width", tile[1])):
        if side < multiple or side % multiple:
            raise TiledDiffusionError(f"the {name} of {side} latent pixels is not a multiple of "
                                      f"{multiple}, which this UNet needs")
    if overlap % multiple:
        overlap -= overlap % multiple  # tile starts sit on the UNet's grid
    grid = plan_tiles(height, width, tile, overlap, multiple_of=multiple)
    for s, e in grid.rows + grid.cols:
        if (e - s) % multiple:
            raise TiledDiffusionError(f"a tile of {e - s} latent pixels would not be a multiple of "
                                      f"{multiple}; choose another tile size or overlap")
    if not bool((coverage(grid) > 0).all()):
        raise TiledDiffusionError(f"tiles of {grid.tile_w}x{grid.tile_h} with overlap {grid.overlap} "
                                  f"leave gaps in a {width}x{height} latent; raise the overlap")
    return grid


def coverage(grid: TileGrid) -> torch.Tensor:
    """(H, W) count of the tiles covering each latent pixel (>= 1 everywhere for a valid grid)."""
    rows = torch.zeros(grid.height)
    cols = torch.zeros(grid.width)
    for s, e in grid.rows:
        rows[s:e] += 1
    for s, e in grid.cols:
        cols[s:e] += 1
    return rows[:, None] * cols[None, :]


class TiledDenoiser:
    """The UNet called tile by tile with the same t, outputs averaged per pixel (see module doc)."""

    def __init__(self, unet: Any, grid: TileGrid):
        self.unet = unet
        self.grid = grid
        self.calls = 0  # denoiser calls made (tiles x steps), for benches

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states=None, **kwargs):
        if tuple(sample.shape[-2:]) != (self.grid.height, self.grid.width):
            raise TiledDiffusionError(f"the tile grid is for a {self.grid.width}x{self.grid.height} "
                                      f"latent, not {sample.shape[-1]}x{sample.shape[-2]}")
        if self.grid.single:
            self.calls += 1
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)
        total: Optional[torch.Tensor] = None
        for top, bottom in self.grid.rows:
            for left, right in self.grid.cols:
                tile = sample[:, :, top:bottom, left:right]
                out = self.unet(tile, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs).sample
                self.calls += 1
                if total is None:
                    total = out.new_zeros((*out.shape[:2], *sample.shape[-2:]))
                total[:, :, top:bottom, left:right] += out
        count = coverage(self.grid).to(total.device, total.dtype)
        return SimpleNamespace(sample=total / count)
