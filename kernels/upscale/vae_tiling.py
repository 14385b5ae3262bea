"""Tiled VAE encode/decode through diffusers' own tiling (AutoencoderKL's `use_tiling` with its
tile sizes), switched on for one call and put back after: the VAE module is shared by every node
downstream of its loader, so its settings never change for good."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

DEFAULT_VAE_TILE = 512  # pixels per tile side; diffusers' SD default
TILING_ATTRIBUTES = ("use_tiling", "tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")


@contextmanager
def vae_tiling(vae, tile_size: Optional[int], scale_factor: int) -> Iterator[None]:
    """Within the block, `vae` encodes and decodes images larger than `tile_size` pixels tile by
    tile (diffusers blends the tiles over a quarter of a tile); None leaves it as it is."""
    if tile_size is None:
        yield
        return
    if not all(hasattr(vae, a) for a in TILING_ATTRIBUTES):
        raise ValueError(f"{type(vae).__name__} has no tiled mode in diffusers; decode without tiling")
    if tile_size < scale_factor or tile_size % scale_factor:
        raise ValueError(f"VAE tile size {tile_size} must be a multiple of the VAE's scale factor "
                         f"{scale_factor}")
    saved = {a: getattr(vae, a) for a in TILING_ATTRIBUTES}
    vae.use_tiling = True
    vae.tile_sample_min_size = tile_size
    vae.tile_latent_min_size = tile_size // scale_factor
    try:
        yield
    finally:
        for a, v in saved.items():
            setattr(vae, a, v)
