"""Content hashes of values (for early cutoff) and cache keys (Merkle keys over the graph)."""

from __future__ import annotations

import dataclasses
from typing import Any

# One content hash for the engine and the kernels (patches, model keys) alike.
from kernels.hashing import Unhashable, content_hash, key_of  # noqa: F401  (re-exported)


def size_of(value: Any) -> int:
    """Bytes a cached value holds (models are owned by the model manager and count as 0)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if hasattr(value, "content_key"):
        return 0
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(size_of(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return sum(size_of(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(size_of(v) for v in value)
    return 64
