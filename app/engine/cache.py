"""The engine's caches: results in memory (byte budget, cost-aware eviction), results on disk
(tensors, plain data and the dataclasses kernels.storage declares storable, such as
conditioning; bounded), and traces (cache key -> output content hashes).

Traces are what make early cutoff and lazy reuse work: knowing a node's output hashes is enough
to compute its downstream keys, so an unchanged upstream never has to be loaded or run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from kernels.files import atomic_write, sweep_stale_temps
from kernels.storage import storable_class, storage_name

log = logging.getLogger(__name__)


# -- memory --------------------------------------------------------------------------------
@dataclass
class _Entry:
    values: dict[str, Any]
    size: int
    cost: float
    priority: float
    node: Optional[str] = None


class MemoryCache:
    """Results by cache key within a byte budget.

    Eviction is GreedyDual-Size: each entry's priority is the clock plus its compute seconds per
    byte, so big results that were cheap to make go first and slow small ones stay; the clock
    rises to each evicted priority, which ages entries that are not used again.

    Each graph node keeps at most `versions_per_node` results (the most recently stored): a
    session of many seeds would otherwise fill the whole budget with results of settings that
    were left behind, and memory would grow run after run; older versions come back from the
    disk cache or are made again.
    """

    def __init__(self, budget_bytes: "int | str | None" = None, versions_per_node: int = 8):
        """`budget_bytes`: bytes or "2G"; None: LOOMWORK_MEMORY_CACHE_BUDGET or a share of RAM."""
        from kernels.run_memory import memory_cache_budget

        if versions_per_node < 1:
            raise ValueError(f"versions_per_node must be at least 1, not {versions_per_node}")
        self.budget = memory_cache_budget(budget_bytes)
        self.versions_per_node = versions_per_node
        self.used = 0
        self._clock = 0.0
        self._entries: dict[str, _Entry] = {}
        self._versions: dict[str, OrderedDict[str, None]] = {}  # node -> its keys, oldest first
        self._lock = threading.Lock()

    def _priority(self, cost: float, size: int) -> float:
        return self._clock + max(cost, 1e-6) / max(size, 1)

    def get(self, key: str) -> Optional[dict[str, Any]]:
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return None
            e.priority = self._priority(e.cost, e.size)
            return e.values

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def _drop(self, key: str) -> _Entry:
        e = self._entries.pop(key)
        self.used -= e.size
        versions = self._versions.get(e.node) if e.node is not None else None
        if versions is not None:
            versions.pop(key, None)
            if not versions:
                del self._versions[e.node]
        return e

    def put(self, key: str, values: dict[str, Any], size: int, cost: float,
            node: Optional[str] = None) -> None:
        """Hold `values` (`size` bytes, `cost` seconds to make) for `key`, made by graph node `node`."""
        with self._lock:
            if key in self._entries:
                self._drop(key)
            if size > self.budget:
                return  # would evict everything and still not fit
            self._entries[key] = _Entry(values, size, cost, self._priority(cost, size), node)
            self.used += size
            if node is not None:
                versions = self._versions.setdefault(node, OrderedDict())
                versions[key] = None
                while len(versions) > self.versions_per_node:
                    self._drop(next(iter(versions)))
            while self.used > self.budget:
                victim = min(self._entries, key=lambda k: self._entries[k].priority)
                self._clock = self._drop(victim).priority

    def discard_if(self, holds: "Callable[[dict[str, Any]], bool]") -> None:
        """Forget the entries whose values `holds` says yes to (values of a dropped model)."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if holds(e.values)]:
                self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._versions.clear()
            self.used = 0


class Traces:
    """Cache key -> output content hashes, the most recent `limit` of them. Unbounded, a session
    of many runs would keep every key it ever made; a forgotten trace only means a node runs
    again (or its trace is read back from the disk cache)."""

    def __init__(self, limit: int = 100_000):
        self.limit = limit
        self._items: "OrderedDict[str, dict[str, str]]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Optional[dict[str, str]]:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def __setitem__(self, key: str, hashes: dict[str, str]) -> None:
        with self._lock:
            self._items[key] = hashes
            self._items.move_to_end(key)
            while len(self._items) > self.limit:
                self._items.popitem(last=False)

    def __getitem__(self, key: str) -> dict[str, str]:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


# -- disk ----------------------------------------------------------------------------------
class NotStorable(TypeError):
    pass


def _encode(value: Any, tensors: dict) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous()
        return {"$t": name}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = storage_name(value)  # only dataclasses the kernels declare storable
        if name is None:
            raise NotStorable(type(value).__name__)
        return {"$c": name, "f": {f.name: _encode(getattr(value, f.name), tensors)
                                 for f in dataclasses.fields(value)}}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise NotStorable("dict with non-string keys")
        return {"$d": {k: _encode(v, tensors) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"$l": [_encode(v, tensors) for v in value], "tuple": isinstance(value, tuple)}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise NotStorable(type(value).__name__)


def _decode(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, dict):
        if "$t" in obj:
            return tensors[obj["$t"]]
        if "$c" in obj:
            cls = storable_class(obj["$c"])
            return cls(**{k: _decode(v, tensors) for k, v in obj["f"].items()})
        if "$d" in obj:
            return {k: _decode(v, tensors) for k, v in obj["$d"].items()}
        if "$l" in obj:
            items = [_decode(v, tensors) for v in obj["$l"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


# A temporary file this old belongs to no writer any more (an entry is written in milliseconds):
# a process killed mid-write (kill -9, a power cut) left it.
TEMP_GRACE_SECONDS = 600.0


class DiskCache:
    """Storable results and all traces under a folder, bounded in bytes (oldest use goes first).
    A result whose tensors exceed `max_entry_bytes` keeps only its trace: writing and reading it
    back would cost more than making it again, and it would push out many small results.
    Temporary files that killed writers left are removed once per process (at the first trim)."""

    def __init__(self, root: os.PathLike | str, budget_bytes: int = 2 << 30,
                 max_entry_bytes: int = 256 << 20):
        self.root = Path(root)
        self.budget = budget_bytes
        self.max_entry_bytes = max_entry_bytes
        self._used: Optional[int] = None
        self._lock = threading.Lock()

    def _paths(self, key: str) -> tuple[Path, Path]:
        d = self.root / key[:2]
        return d / f"{key}.json", d / f"{key}.safetensors"

    def trace(self, key: str) -> Optional[dict[str, str]]:
        return self.entry(key)[0]

    def entry(self, key: str) -> tuple[Optional[dict[str, str]], Optional[str]]:
        """An entry's trace and what the node said making it (NodeContext.summary), from one
        read of its metadata: (None, None) when there is no readable entry."""
        meta_path, _ = self._paths(key)
        try:
            meta = json.loads(meta_path.read_text())
            trace = dict(meta["outputs"])
        except (OSError, ValueError, KeyError, TypeError):
            return None, None
        said = meta.get("summary")
        return trace, said if isinstance(said, str) else None

    def has_values(self, key: str) -> bool:
        meta_path, data_path = self._paths(key)
        return data_path.exists() or (meta_path.exists() and self._stored_inline(meta_path))

    @staticmethod
    def _stored_inline(meta_path: Path) -> bool:
        try:
            return "values" in json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return False

    def get(self, key: str) -> Optional[dict[str, Any]]:
        from safetensors.torch import load_file

        meta_path, data_path = self._paths(key)
        try:
            meta = json.loads(meta_path.read_text())
            if "values" not in meta:
                return None
            tensors = load_file(str(data_path)) if data_path.exists() else {}
            values = _decode(meta["values"], tensors)
        except Exception as exc:  # a damaged entry is a miss, never a failure
            log.warning("disk cache entry %s unreadable (%s); recomputing", key, exc)
            return None
        now = time.time()
        for p in (meta_path, data_path):
            try:
                os.utime(p, (now, now))
            except OSError:
                pass
        return values

    def put(self, key: str, outputs: dict[str, str], values: Optional[dict[str, Any]],
            summary: Optional[str] = None) -> None:
        """Record a trace (with the node's summary line), and the values too when they are storable."""
        from safetensors.torch import save_file

        meta: dict[str, Any] = {"outputs": outputs}
        if summary:
            meta["summary"] = summary
        tensors: dict[str, Any] = {}
        if values is not None:
            try:
                meta["values"] = _encode(values, tensors)
            except NotStorable:
                tensors = {}
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            if size > min(self.max_entry_bytes, self.budget):
                log.info("disk cache: %s is %d bytes, over the %d-byte limit; keeping its trace only",
                         key, size, self.max_entry_bytes)
                meta.pop("values", None)
                tensors = {}
        meta_path, data_path = self._paths(key)
        try:
            meta_path.parent.mkdir(parents=True, exist_ok=True)
            added = 0
            # Unique temporary names: two processes writing the same entry never clobber each
            # other's half-written file. No fsync: an entry lost in a power cut is recomputed.
            if tensors:
                atomic_write(data_path, lambda tmp: save_file(tensors, tmp), durable=False)
                added += data_path.stat().st_size
            atomic_write(meta_path, json.dumps(meta).encode("utf-8"), durable=False)
            added += meta_path.stat().st_size
        except OSError as exc:  # a full disk must not fail the run
            log.warning("cannot write disk cache entry %s: %s", key, exc)
            return
        with self._lock:
            if self._used is not None:
                self._used += added
        self._trim()

    def size_bytes(self) -> int:
        """What the stored results take on disk now."""
        return sum(size for _, size, _ in self._scan())

    def clear(self) -> int:
        """Delete every stored result; returns the bytes freed. Entries are independent files, so
        a run going on at the same time only misses (or stores again) what it asks for."""
        freed = 0
        with self._lock:
            for _mtime, size, path in self._scan():
                try:
                    path.unlink()
                    freed += size
                except OSError:
                    pass
            self._used = None
        return freed

    def _scan(self) -> list[tuple[float, int, Path]]:
        files = []
        for p in self.root.glob("*/*"):
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        return files

    def _sweep_temp(self) -> None:
        sweep_stale_temps((p for p in self.root.glob("*") if p.is_dir()), TEMP_GRACE_SECONDS)

    def _trim(self) -> None:
        with self._lock:
            if self._used is None:
                self._sweep_temp()
                self._used = sum(size for _, size, _ in self._scan())
            if self._used <= self.budget:
                return
            # Trim to 90% so the next few puts do not rescan.
            for _mtime, size, path in sorted(self._scan()):
                if self._used <= self.budget * 0.9:
                    break
                try:
                    path.unlink()
                    self._used -= size
                except OSError:
                    pass
