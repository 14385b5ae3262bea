"""Content hashes of values (for early cutoff) and cache keys (Merkle keys over the graph)."""

from __future__ import annotations

import dataclasses
from typing import Any

# One content hash for the engine and the kernels (patches, model keys) alike.
from kernels.hashing import Unhashable, content_hash, key_of  # noqa: F401  (re-exported)

# What a Python object beside its tensors takes in a cache entry (a dict slot, a small object).
OBJECT_BYTES = 64


def size_of(value: Any) -> int:
    """Bytes a cached value keeps alive (models are owned by the model manager and count as 0).

    A tensor counts its whole storage, once: a view keeps all of its base alive, and tensors
    sharing a storage (a conditioning's stages, a replaced field) hold it only once. Strings and
    bytes count their length, so a long prompt held in a conditioning is not free."""
    return _size(value, set())


def _size(value: Any, seen: set) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            return OBJECT_BYTES
        storage = value.untyped_storage()
        ident = (value.device.type, storage.data_ptr(), storage.nbytes())
        if ident in seen:
            return OBJECT_BYTES
        seen.add(ident)
        return OBJECT_BYTES + storage.nbytes()
    if hasattr(value, "content_key"):
        return 0
    if isinstance(value, (str, bytes)):
        return OBJECT_BYTES + len(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return OBJECT_BYTES + sum(_size(getattr(value, f.name), seen) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return OBJECT_BYTES + sum(_size(k, seen) + _size(v, seen) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return OBJECT_BYTES + sum(_size(v, seen) for v in value)
    return OBJECT_BYTES
