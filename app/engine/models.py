"""The model manager: loads each model once per (folder, its files' sizes and mtimes, dtype, device)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable


class ModelManager:
    """Keeps the most recently used models loaded, up to `max_models`.

    A model shared by two graphs (or two nodes) is loaded once; a folder whose files changed on
    disk gets a new key and is loaded again.
    """

    def __init__(self, device: str = "cpu", max_models: int = 3):
        self.device = device
        self.max_models = max_models
        self._loaded: "OrderedDict[str, Any]" = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # how many times a loader actually ran (tests and benches read it)

    def load(self, folder: str, dtype: str, loader: Callable[..., Any]) -> Any:
        import torch

        from kernels.models import model_folder_key

        key = model_folder_key(folder, dtype, self.device)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
        value = loader(folder, dtype=getattr(torch, dtype), device=self.device)
        with self._lock:
            self.loads += 1
            self._loaded[key] = value
            while len(self._loaded) > self.max_models:
                self._loaded.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._loaded.clear()
