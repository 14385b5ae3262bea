"""Content hashes of values (for early cutoff) and cache keys (Merkle keys over the graph)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


class Unhashable(TypeError):
    pass


def key_of(*parts: Any) -> str:
    """A stable hash of JSON-able parts (params, fingerprints, input hashes)."""
    text = json.dumps(parts, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


def _feed(h, value: Any) -> None:
    import torch  # values are only hashed after a node ran, so torch is loaded by then

    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif hasattr(value, "content_key"):
        h.update(b"K" + value.content_key().encode())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        h.update(f"D{type(value).__qualname__}".encode())
        for f in dataclasses.fields(value):
            h.update(f.name.encode())
            _feed(h, getattr(value, f.name))
    elif isinstance(value, dict):
        h.update(b"M%d" % len(value))
        for k in sorted(value, key=repr):
            _feed(h, k)
            _feed(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(b"L%d" % len(value))
        for v in value:
            _feed(h, v)
    elif value is None or isinstance(value, (str, int, float, bool, bytes)):
        h.update(f"P{type(value).__name__}:{value!r}".encode())
    else:
        raise Unhashable(f"cannot hash a {type(value).__name__}")


def content_hash(value: Any) -> str:
    """A hash of what a value is (tensor bytes, not identity). Raises Unhashable."""
    h = hashlib.blake2b(digest_size=20)
    _feed(h, value)
    return h.hexdigest()


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
