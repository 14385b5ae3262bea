"""The one content hash: what a value is (tensor bytes, not identity), for cache keys and
early cutoff in the engine and for the keys of patches and models in the kernels.

torch is imported only when a tensor is hashed, so hashing plain data never loads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from typing import Any

DIGEST_SIZE = 20


class Unhashable(TypeError):
    pass


def key_of(*parts: Any) -> str:
    """A stable hash of JSON-able parts (params, fingerprints, input hashes)."""
    text = json.dumps(parts, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=DIGEST_SIZE).hexdigest()


def _feed_tensor(h, value) -> None:
    import torch

    t = value.detach().cpu().contiguous()
    h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _feed(h, value: Any) -> None:
    torch = sys.modules.get("torch")  # a tensor exists only if torch is loaded already
    if torch is not None and isinstance(value, torch.Tensor):
        _feed_tensor(h, value)
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


def content_hash(*values: Any) -> str:
    """A hash of what the values are: tensors by dtype, shape and bytes; dataclasses, dicts,
    lists and plain values by content; objects with `content_key()` by that key. Raises
    Unhashable for anything else."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for value in values:
        _feed(h, value)
    return h.hexdigest()
