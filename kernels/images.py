"""Image conversions at the edges: IMAGE is a float tensor NHWC in 0..1; models see NCHW in -1..1."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def model_to_image(x: torch.Tensor) -> torch.Tensor:
    """NCHW in -1..1 -> NHWC in 0..1."""
    return ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def image_to_model(images: torch.Tensor) -> torch.Tensor:
    """NHWC in 0..1 -> NCHW in -1..1."""
    return images.permute(0, 3, 1, 2).contiguous() * 2 - 1


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def from_pil(image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """(IMAGE 1xHxWx3, MASK 1xHxW) from a PIL image; the mask is 1 where alpha is transparent."""
    image = ImageOps.exif_transpose(image)
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    rgb = torch.from_numpy(rgba[..., :3].copy())[None]
    mask = torch.from_numpy(1.0 - rgba[..., 3].copy())[None]
    return rgb, mask


def resize(images: torch.Tensor, width: int, height: int, method: str = "lanczos") -> torch.Tensor:
    """Resize a batch with Pillow's filters (torch has no Lanczos)."""
    out = []
    for pil in to_pil(images):
        resized = pil.resize((width, height), RESAMPLE[method])
        out.append(torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0))
    return torch.stack(out)
