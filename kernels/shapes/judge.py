"""Judging generated images with the oracle: does an image show a named colour and/or shape?

What the erasers' red team and bench ask of a ShapesT2I image: a concept is the world's colours
and shapes named in a text ("red", "circle", "a red circle"), and an image shows it when the
oracle finds an object of one of those colours (if any is named) and one of those shapes (if any).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np
import torch

from kernels.shapes import world
from kernels.shapes.oracle import detect
from kernels.text import words_of

Pair = tuple[str, str]  # (colour, shape) of one object


def named_concept(text: str) -> tuple[set[str], set[str]]:
    """The world's colours and shapes named in `text`."""
    words = words_of(text)
    return {w for w in words if w in world.COLOURS}, {w for w in words if w in world.SHAPES}


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, H, W, 3) uint8 images from a (N, 3, H, W) batch in -1..1."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(arr)


def detected_pairs(image: np.ndarray) -> list[Pair]:
    """(colour, shape) of every object the oracle finds in a uint8 HxWx3 image."""
    return [(d.colour, d.shape) for d in detect(image)]


def shows(found: Iterable[Pair], colours: set[str], shapes: set[str]) -> bool:
    """Whether any found object has one of `colours` (or any colour if none is named) and one of
    `shapes` (likewise)."""
    return any((not colours or c in colours) and (not shapes or s in shapes) for c, s in found)


def concept_judge(concept: str, decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                  ) -> Optional[Callable[[torch.Tensor], list[bool]]]:
    """images -> [each image shows `concept`], for images in -1..1 (after `decode`, for a model
    that samples latents); None when `concept` names no colour or shape of the world."""
    colours, shapes = named_concept(concept)
    if not colours and not shapes:
        return None

    def judge(images: torch.Tensor) -> list[bool]:
        if decode is not None:
            with torch.no_grad():
                images = decode(images)
        return [shows(detected_pairs(a), colours, shapes) for a in to_uint8(images)]

    return judge
