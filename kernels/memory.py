"""Memory bookkeeping for loaded models: budgets, the bytes modules hold, and what to evict.

Pure accounting, no policy about when things happen (app/engine/models.py decides that):

- budgets are bytes, read from a setting such as "12G" (`parse_bytes`), an environment variable
  (`budget_from_env`) or the machine (`default_ram_budget`, `default_vram_budget`);
- `module_bytes` measures what modules hold on each device: parameters and buffers, with a
  storage shared by several tensors (tied weights, views into one memory-mapped file) counted
  once;
- `estimate_model_bytes` reads a model's safetensors headers (never its tensors) to say how
  big it will be in a dtype before it is loaded, and whether loading can keep the file's pages
  (no dtype conversion: the OS maps the weights and may page them out again);
- `lru_victims` and `plan_placement` choose what to drop from RAM and what to offload from an
  accelerator, least recently used first, never touching what is in use.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

RAM_BUDGET_ENV = "LOOMWORK_RAM_BUDGET"
VRAM_BUDGET_ENV = "LOOMWORK_VRAM_BUDGET"
# Models get this share of the machine: the rest is the OS, the app, activations and results.
RAM_FRACTION = 0.6
VRAM_FRACTION = 0.85

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


class BudgetError(ValueError):
    """A budget setting that is not a size; the message names the setting and the value."""


class MemoryBudgetError(RuntimeError):
    """A model that cannot fit its memory budget; the message names the model, its size and the budget."""


def parse_bytes(text: "str | int", name: str = "budget") -> int:
    """Bytes from "12G", "1.5GB", "512M", "800k", "12GiB" (binary units) or a plain count of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise BudgetError(f"{name}: a budget must be a positive number of bytes, got {text}")
        return text
    match = _SIZE.match(str(text))
    if match is None:
        raise BudgetError(f"{name}: {text!r} is not a size; write bytes (12884901888) or a number "
                          f"with K, M, G or T (12G, 1.5T)")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise BudgetError(f"{name}: a budget must be more than 0 bytes, got {text!r}")
    return value


def budget_from_env(name: str, default: int, environ: Optional[Mapping[str, str]] = None) -> int:
    """The budget in environment variable `name`, or `default` when it is unset or empty."""
    environ = os.environ if environ is None else environ
    text = environ.get(name, "").strip()
    return parse_bytes(text, name) if text else default


def default_ram_budget(fraction: float = RAM_FRACTION) -> int:
    import psutil

    return int(psutil.virtual_memory().total * fraction)


def default_vram_budget(device: str, fraction: float = VRAM_FRACTION) -> Optional[int]:
    """A share of the accelerator's memory, or None for the CPU (no separate device memory)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    _free, total = torch.cuda.mem_get_info(dev)
    return int(total * fraction)


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


# -- measuring -----------------------------------------------------------------------------

def modules_in(value: Any) -> list:
    """The torch modules a value holds (bundles, tuples, dicts, dataclasses), outermost only,
    each once. A module's own submodules are not listed: they move and count with it."""
    import torch

    found: dict[int, Any] = {}
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, torch.nn.Module):
            found.setdefault(id(v), v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            stack.extend(getattr(v, f.name) for f in dataclasses.fields(v))
    return list(found.values())


def tensor_bytes(tensors: Iterable) -> dict[str, int]:
    """Bytes the tensors hold, by device type. Tensors over one storage are measured by the
    byte ranges they cover, merged, so a tied weight or a view counts once while distinct
    tensors mapped from one file each count. Meta tensors hold nothing."""
    spans: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for t in tensors:
        if t.device.type == "meta" or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        start = t.storage_offset() * t.element_size()
        extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        spans.setdefault((t.device.type, storage.data_ptr()), []).append(
            (start, start + extent * t.element_size()))
    totals: dict[str, int] = {}
    for (device, _ptr), ranges in spans.items():
        ranges.sort()
        covered, end = 0, -1
        for lo, hi in ranges:
            if lo > end:
                covered += hi - lo
                end = hi
            elif hi > end:
                covered += hi - end
                end = hi
        totals[device] = totals.get(device, 0) + covered
    return totals


def module_bytes(modules: Iterable) -> dict[str, int]:
    """Bytes of the modules' parameters and buffers by device type, shared storage counted once."""
    def tensors():
        for m in modules:
            yield from m.parameters()
            yield from m.buffers()
    return tensor_bytes(tensors())


@dataclasses.dataclass(frozen=True)
class ModelEstimate:
    """A model's weights before loading: bytes in the target dtype, and whether every floating
    tensor is already stored in it (then loading maps the file instead of converting it)."""

    bytes: int
    files: tuple[str, ...]
    file_backed: bool


def weight_files(path: str) -> list[str]:
    """The safetensors files a load of `path` reads: the file itself, or in each folder of a
    model folder the plain weights (a variant such as `model.fp16.safetensors` only when the
    folder has nothing else), as diffusers picks them without a variant."""
    if os.path.isfile(path):
        return [path] if path.lower().endswith(".safetensors") else []
    chosen = []
    for folder, _dirs, names in sorted(os.walk(path)):
        if not _loaded_component(path, folder):
            continue
        found = sorted(n for n in names if n.lower().endswith(".safetensors"))
        plain = [n for n in found if "." not in n[: -len(".safetensors")]]
        chosen.extend(os.path.join(folder, n) for n in (plain or found))
    return chosen


def _loaded_component(root: str, folder: str) -> bool:
    """Whether a model folder's load reads `folder`: its model_index.json names the component
    (not `[null, null]`, not one sampling ignores); every folder when there is no index."""
    import json

    from kernels.models import IGNORED_COMPONENTS

    try:
        with open(os.path.join(root, "model_index.json"), encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        return True
    name = os.path.relpath(folder, root).split(os.sep)[0]
    if name == ".":
        return True
    spec = index.get(name) if isinstance(index, dict) else None
    return bool(spec) and spec != [None, None] and name not in IGNORED_COMPONENTS


def estimate_model_bytes(path: str, dtype) -> Optional[ModelEstimate]:
    """Size in `dtype` of the weights at `path` from the safetensors headers alone, or None when
    it has no readable safetensors file (the loader will say what is wrong with it)."""
    import torch
    from safetensors import safe_open

    target = torch.empty((), dtype=dtype).element_size()
    total, backed, files = 0, True, weight_files(path)
    if not files:
        return None
    names = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
    want = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(dtype)
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    part = f.get_slice(key)
                    count = 1
                    for n in part.get_shape():
                        count *= int(n)
                    stored = part.get_dtype()
                    if stored in names:  # floating weights take the load's dtype
                        total += count * target
                        backed = backed and stored == want
                    else:
                        total += count * _integer_size(stored)
        except Exception:  # an unreadable file: the loader reports it, with its own message
            return None
    return ModelEstimate(total, tuple(files), backed)


def _integer_size(name: str) -> int:
    digits = "".join(c for c in name if c.isdigit())
    return max(1, int(digits) // 8) if digits else 1


# -- choosing ------------------------------------------------------------------------------

def lru_victims(entries: Sequence[tuple[str, int]], used: int, need: int, budget: int) -> list[str]:
    """Which entries to drop, least recently used first, so that `need` more bytes fit in
    `budget` with `used` in use. `entries` are the droppable ones, oldest first, with their
    bytes; if dropping all of them is not enough, all of them are returned (the caller decides
    whether the rest may still go ahead)."""
    victims = []
    for key, size in entries:
        if used + need <= budget:
            break
        victims.append(key)
        used -= size
    return victims


@dataclasses.dataclass(frozen=True)
class Placement:
    """What to do on an accelerator before a node runs: `offload` (to the CPU, oldest first) to
    make room, `place` on the device, and `sequential`: too big to place whole, so run layer by
    layer from CPU memory."""

    offload: tuple
    place: tuple
    sequential: tuple


def plan_placement(needed: Mapping[Any, int], resident: Sequence[tuple[Any, int]], budget: int,
                   sequential: Iterable = ()) -> Placement:
    """Plan device memory for a node that needs the components `needed` (id -> bytes).

    `resident` are the components now on the device, least recently used first; `sequential`
    the ones already run layer by layer. Components that cannot share the budget go layer by
    layer, largest first; the rest are placed, offloading resident components the node does not
    need, oldest first, until they fit."""
    done = set(sequential)
    whole = {k: v for k, v in needed.items() if k not in done}
    new_sequential = []
    while whole and sum(whole.values()) > budget:
        largest = max(whole, key=whole.get)
        new_sequential.append(largest)
        del whole[largest]
    on_device = {k for k, _ in resident}
    leaving = [k for k, _ in resident if k in new_sequential]  # its weights go back to the CPU
    place = [k for k in whole if k not in on_device]
    others = [(k, v) for k, v in resident if k not in whole and k not in leaving]
    used = sum(v for k, v in resident if k not in leaving)
    offload = leaving + lru_victims(others, used, sum(whole[k] for k in place), budget)
    return Placement(tuple(offload), tuple(place), tuple(new_sequential))
