"""The node registry: every node type by its type name.

Node modules register their classes here when they are imported (the `nodes` package imports the
built-in ones, none of which loads torch); the registry imports no node module, so the
dependency goes one way.
"""

from __future__ import annotations

from typing import Optional

from .base import Node

_REGISTRY: dict[str, type[Node]] = {}


def register(cls: type[Node]) -> type[Node]:
    name = cls.type_name()
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"node type {name!r} is registered twice")
    _REGISTRY[name] = cls
    return cls


def get(name: str) -> Optional[type[Node]]:
    return _REGISTRY.get(name)


def add_node(graph, type_name: str, params: Optional[dict] = None, **kwargs):
    """Add a node of a registered type to a graph document, recording the type's current version."""
    cls = get(type_name)
    if cls is None:
        raise ValueError(f"unknown node type {type_name!r}")
    return graph.add_node(type_name, params, version=cls.version, **kwargs)


def all_types() -> dict[str, type[Node]]:
    return dict(sorted(_REGISTRY.items()))
