"""Which kernel dataclasses may be kept on disk between runs, and under what name.

The engine's disk cache stores tensors and plain data (numbers, strings, lists, string-keyed
dicts) as they are, and a dataclass only if it is declared here; it is rebuilt from its fields,
so every field must itself be storable. Anything else (model bundles, say) stays in memory.

Standard library only: the engine reads this table without importing the kernels it names.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

# storage name -> "module:class". A fixed table rather than registration on import: a fresh
# process must be able to read a stored value before anything has imported its class; and a
# cache file only ever names an entry of this table, never a module to import (cache files are
# data, not code). A name is what stored entries say: never give it to another class.
STORABLE_DATACLASSES: dict[str, str] = {
    "Conditioning": "kernels.text:Conditioning",
    "Table": "kernels.analysis.table:Table",
}

_NAME_OF = {where: name for name, where in STORABLE_DATACLASSES.items()}


def storage_name(value: Any) -> Optional[str]:
    """The name `value` is stored under, or None if its class is not declared storable."""
    cls = type(value)
    return _NAME_OF.get(f"{cls.__module__}:{cls.__qualname__}")


def storable_class(name: str) -> type:
    """The dataclass stored under `name`; KeyError for a name that is not declared."""
    module, _, qualname = STORABLE_DATACLASSES[name].partition(":")
    return getattr(importlib.import_module(module), qualname)
