"""The model manager: loaded models within a RAM budget and, on an accelerator, a device budget.

A model is loaded once per (folder, its files' sizes and mtimes, dtype, device); a folder whose
files changed on disk gets a new key and is loaded again. What each loaded model holds is
measured (kernels.memory.module_bytes: parameters and buffers, shared storage once).

- **RAM.** Before a load, the model's size in its dtype is read from its safetensors headers;
  least recently used models are dropped until it fits, never one the running graph holds
  (`in_use`). A model bigger than the whole budget still loads when its files already store
  that dtype: diffusers then maps the safetensors file instead of copying it, so the weights
  exist once, as file pages the OS can page out and back in. Otherwise (a conversion would
  need the full size in memory) the load is refused with the model, its size and the budget.
- **Device memory** (CUDA): models load to the CPU; before a node runs, the components in its
  inputs are put on the device (`prepare`), offloading the least recently used other
  components to the CPU to stay within the device budget. A component that cannot fit the
  device budget runs layer by layer from CPU memory through diffusers' group offloading hooks
  (leaf level, the sequential CPU offload of `enable_sequential_cpu_offload`, which keeps the
  module's device readable for callers), so no second copy of its weights is made.

Budgets: the constructor's arguments, else LOOMWORK_RAM_BUDGET / LOOMWORK_VRAM_BUDGET (bytes or
"12G"), else a share of the machine (kernels.memory).
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from kernels.memory import (
    RAM_BUDGET_ENV,
    VRAM_BUDGET_ENV,
    MemoryBudgetError,
    budget_from_env,
    default_ram_budget,
    default_vram_budget,
    estimate_model_bytes,
    format_bytes,
    lru_victims,
    module_bytes,
    modules_in,
    parse_bytes,
    plan_placement,
)

log = logging.getLogger(__name__)

__all__ = ["ModelManager", "MemoryBudgetError"]


@dataclass
class _Loaded:
    source: str
    dtype: str
    value: Any
    modules: list


class ModelManager:
    """Loaded models, least recently used dropped first when the RAM budget needs room.

    `in_use()` returns the values the running graph holds (their models are never dropped);
    `on_drop(value)` is told of each dropped model's value, so holders of it (the engine's
    memory cache) can let it go and its memory is freed.
    """

    def __init__(self, device: str = "cpu", *, ram_budget: "int | str | None" = None,
                 vram_budget: "int | str | None" = None,
                 in_use: Optional[Callable[[], Iterable[Any]]] = None,
                 on_drop: Optional[Callable[[Any], None]] = None):
        self.device = str(device)
        self.accelerated = not self.device.startswith("cpu")
        self.ram_budget = (parse_bytes(ram_budget, "ram_budget") if ram_budget is not None
                           else budget_from_env(RAM_BUDGET_ENV, default_ram_budget()))
        self.vram_budget: Optional[int] = None
        if self.accelerated:
            # None (a device torch cannot measure, and no setting): no device limit.
            self.vram_budget = (parse_bytes(vram_budget, "vram_budget") if vram_budget is not None
                                else budget_from_env(VRAM_BUDGET_ENV, 0) or default_vram_budget(self.device))
        self._in_use = in_use or (lambda: ())
        self._on_drop = on_drop
        self._loaded: "OrderedDict[str, _Loaded]" = OrderedDict()  # oldest use first
        self._owner: dict[int, str] = {}  # id(component) -> key
        self._on_device: "OrderedDict[int, Any]" = OrderedDict()  # components on the accelerator
        self._sequential: set[int] = set()  # components run layer by layer
        self._lock = threading.RLock()
        self.loads = 0  # how many times a loader actually ran (tests and benches read it)
        self.drops = 0  # how many models were dropped to make room

    # -- loading -------------------------------------------------------------------------
    def load(self, folder: str, dtype: str, loader: Callable[..., Any]) -> Any:
        """`loader(folder, dtype=torch.dtype, device=str)`'s value, loaded once per key."""
        import torch

        from kernels.models import model_folder_key

        key = model_folder_key(folder, dtype, self.device)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key].value
        from kernels.models import ModelLoadError

        torch_dtype = getattr(torch, dtype)
        try:
            dropped = self._make_room(folder, dtype, estimate_model_bytes(folder, torch_dtype))
        except MemoryBudgetError as exc:  # a load's errors are ModelLoadError: LoadModel shows them
            raise ModelLoadError(str(exc)) from exc
        self._dropped(dropped)
        # On an accelerator the weights land in RAM; `prepare` moves them per node.
        value = loader(folder, dtype=torch_dtype, device="cpu" if self.accelerated else self.device)
        with self._lock:
            self.loads += 1
            entry = _Loaded(folder, dtype, value, modules_in(value))
            self._loaded[key] = entry
            for m in entry.modules:
                self._owner[id(m)] = key
            dropped = self._fit_measured(key)
        self._dropped(dropped)
        return value

    def _make_room(self, folder: str, dtype: str, estimate) -> list[_Loaded]:
        """Drop models so `estimate` fits; raise MemoryBudgetError when it cannot."""
        if estimate is None:
            return []
        with self._lock:
            pinned = self._pinned_keys()
            used = self.ram_used()
            droppable = [(k, self._ram_bytes(e)) for k, e in self._loaded.items() if k not in pinned]
            victims = lru_victims(droppable, used, estimate.bytes, self.ram_budget)
            left = used - sum(size for k, size in droppable if k in victims)
            if left + estimate.bytes > self.ram_budget:
                if not estimate.file_backed:
                    raise MemoryBudgetError(self._no_room_message(folder, dtype, estimate.bytes, pinned, left))
                log.warning("%s: %s in %s is over the RAM budget of %s; its weights stay mapped "
                            "from the file and the OS pages them", folder,
                            format_bytes(estimate.bytes), dtype, format_bytes(self.ram_budget))
            return [self._forget(k) for k in victims]

    def _no_room_message(self, folder: str, dtype: str, size: int, pinned: set, held: int) -> str:
        head = (f"{folder}: its weights take {format_bytes(size)} in {dtype}, and the RAM budget "
                f"for models is {format_bytes(self.ram_budget)} (set {RAM_BUDGET_ENV}, e.g. 24G)")
        if size > self.ram_budget:
            return (head + "; its files store another dtype, so loading would convert every "
                    "weight in memory: load it in the dtype its files hold, or raise the budget")
        users = ", ".join(sorted({self._loaded[k].source for k in pinned})) or "other models"
        return head + f"; {format_bytes(held)} of it is held by models this run uses ({users})"

    def _fit_measured(self, new_key: str) -> list[_Loaded]:
        """After a load, drop older models if the measured size says the estimate was short."""
        pinned = self._pinned_keys() | {new_key}
        droppable = [(k, self._ram_bytes(e)) for k, e in self._loaded.items() if k not in pinned]
        victims = lru_victims(droppable, self.ram_used(), 0, self.ram_budget)
        return [self._forget(k) for k in victims]

    def _pinned_keys(self) -> set[str]:
        held = {id(m) for m in modules_in(list(self._in_use()))}
        return {self._owner[i] for i in held if i in self._owner}

    def _forget(self, key: str, evicted: bool = True) -> _Loaded:
        entry = self._loaded.pop(key)
        for m in entry.modules:
            self._owner.pop(id(m), None)
            self._on_device.pop(id(m), None)
            self._sequential.discard(id(m))
        if evicted:
            self.drops += 1
            log.info("dropped model %s (%s) to make room", entry.source, entry.dtype)
        return entry

    def _dropped(self, entries: list[_Loaded]) -> None:
        if not entries:
            return
        if self._on_drop is not None:
            for entry in entries:
                self._on_drop(entry.value)
        del entries[:]
        gc.collect()  # modules with hooks hold reference cycles; free their memory now
        if self.accelerated:
            import torch

            torch.cuda.empty_cache()

    # -- per node ------------------------------------------------------------------------
    def prepare(self, values: Any) -> None:
        """Before a node runs on `values`: mark their models used now and, on an accelerator,
        put their components on the device within the device budget."""
        with self._lock:
            needed = [m for m in modules_in(values) if id(m) in self._owner]
            for m in needed:
                self._loaded.move_to_end(self._owner[id(m)])
            if not self.accelerated or not needed:
                return
            self._place(needed)

    def _place(self, needed: list) -> None:
        import torch

        if self.vram_budget is None:  # no device limit known: everything goes on the device
            for m in needed:
                m.to(self.device)
                self._on_device[id(m)] = m
            return
        budget = self.vram_budget
        sizes = {id(m): sum(module_bytes([m]).values()) for m in needed}
        resident = [(i, sum(module_bytes([m]).values())) for i, m in self._on_device.items()]
        plan = plan_placement(sizes, resident, budget, self._sequential)
        by_id = {id(m): m for m in needed} | dict(self._on_device)
        for i in plan.offload:
            by_id[i].to("cpu")
            self._on_device.pop(i, None)
        for i in plan.sequential:
            self._run_sequentially(by_id[i])
        for i in plan.place:
            by_id[i].to(self.device)
        for i in sizes:
            if i not in self._sequential:
                self._on_device[i] = by_id[i]
                self._on_device.move_to_end(i)
        if plan.offload:
            torch.cuda.empty_cache()

    def _run_sequentially(self, module) -> None:
        import torch
        from diffusers.hooks import apply_group_offloading

        device = torch.device(self.device)
        module.to("cpu")
        # Streams need pinned memory per layer; low_cpu_mem_usage pins each layer as it moves
        # instead of keeping a pinned copy of every weight beside the original.
        apply_group_offloading(module, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="leaf_level", use_stream=device.type == "cuda",
                               low_cpu_mem_usage=True)
        self._sequential.add(id(module))
        log.info("%s is bigger than the device budget of %s: it runs layer by layer",
                 type(module).__name__, format_bytes(self.vram_budget or 0))

    # -- accounting ----------------------------------------------------------------------
    @staticmethod
    def _ram_bytes(entry: _Loaded) -> int:
        return module_bytes(entry.modules).get("cpu", 0)

    def ram_used(self) -> int:
        with self._lock:
            return sum(self._ram_bytes(e) for e in self._loaded.values())

    def usage(self) -> dict:
        """Budgets, bytes in use and the loaded models, least recently used first."""
        with self._lock:
            pinned = self._pinned_keys()
            models = [{"source": e.source, "dtype": e.dtype, "bytes": module_bytes(e.modules),
                       "in_use": k in pinned} for k, e in self._loaded.items()]
            device_used = sum(sum(v for d, v in m["bytes"].items() if d != "cpu") for m in models)
            return {"ram_budget": self.ram_budget, "vram_budget": self.vram_budget,
                    "ram_used": sum(m["bytes"].get("cpu", 0) for m in models),
                    "vram_used": device_used, "models": models}

    def clear(self) -> None:
        with self._lock:
            dropped = [self._forget(k, evicted=False) for k in list(self._loaded)]
        self._dropped(dropped)

