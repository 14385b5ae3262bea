"""Resizing latents by interpolation (the "latent" upscale of a hires fix)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LATENT_METHODS = ("nearest-exact", "bilinear", "bicubic")


def resize_latent(latent: torch.Tensor, factor: float, method: str = "bilinear") -> torch.Tensor:
    """An NCHW latent `factor` times larger (each side rounded, at least 1)."""
    if method not in LATENT_METHODS:
        raise ValueError(f"latent resize method {method!r} is not one of {', '.join(LATENT_METHODS)}")
    h, w = latent.shape[-2:]
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    if size == (h, w):
        return latent
    extra = {} if method == "nearest-exact" else {"align_corners": False}
    return F.interpolate(latent.float(), size=size, mode=method, **extra).to(latent.dtype)
