"""Eraser files: the patches of a chain saved to one safetensors file, and read back.

Tensors are stored under "<i>:<field>..." for the i-th patch; the patches' kinds and plain fields
go in the safetensors metadata as JSON, so loading unpickles nothing.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch

from kernels.files import atomic_write

from .guidance import SafeGuidancePatch
from .membrane import MembranePatch
from .patches import EraserPatch, LoraPatch, WeightDeltaPatch

FORMAT = "loomwork.eraser"

PATCH_KINDS: dict[str, type[EraserPatch]] = {
    c.kind: c for c in (WeightDeltaPatch, LoraPatch, MembranePatch, SafeGuidancePatch)}


class EraserFileError(ValueError):
    pass


def default_eraser_dir() -> str:
    """Where erasers are saved unless a folder is given: $LOOMWORK_ERASER_DIR, else "erasers" in
    the user's data folder (platformdirs, as the rest of the app)."""
    env = os.environ.get("LOOMWORK_ERASER_DIR")
    if env:
        return env
    import platformdirs

    return os.path.join(platformdirs.user_data_dir("loomwork", appauthor=False), "erasers")


def save_erasers(path: str, patches: Sequence[EraserPatch], extra: Optional[dict] = None) -> str:
    """Write patches (in order) to one safetensors file, atomically. Returns the path."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for i, p in enumerate(patches):
        t, info = p.to_state()
        for k, v in t.items():
            tensors[f"{i}:{k}"] = v.detach().to("cpu").clone().contiguous()  # no shared storage
        entries.append({"kind": p.kind, **info})
    metadata = {"format": FORMAT, "version": "1", "patches": json.dumps(entries),
                "extra": json.dumps(extra or {})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), durable=True)
    return path


def load_erasers(path: str) -> list[EraserPatch]:
    """Read the patches saved by `save_erasers` (safetensors only; nothing is unpickled)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise EraserFileError(f"eraser file {path!r} does not exist") from None
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise EraserFileError(f"{path!r} is not a readable safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise EraserFileError(f"{path!r} is not a Loomwork eraser file (no '{FORMAT}' metadata)")
    if meta.get("version") != "1":
        raise EraserFileError(f"{path!r} has eraser format version {meta.get('version')!r}; "
                              f"this Loomwork reads version 1")
    entries = json.loads(meta["patches"])
    out = []
    for i, info in enumerate(entries):
        cls = PATCH_KINDS.get(info.get("kind"))
        if cls is None:
            raise EraserFileError(f"{path!r}: unknown eraser kind {info.get('kind')!r}")
        prefix = f"{i}:"
        mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        out.append(cls.from_state(mine, info))
    return out
