"""Reroute: a dot on a wire, so long wires can be led around nodes. No Qt, no torch.

The engine never runs it: `app.graph.passthrough` wires its readers straight to what feeds it,
so a rerouted wire gives exactly what the direct wire gives. Its ports are declared as any
type; the type a reroute carries is the type of the wire into it.
"""

from __future__ import annotations

from .base import DataType, Node
from .registry import register

# "*" and the type name "Reroute" are what app.graph.passthrough knows a reroute by.
ANY = DataType("*", "#9aa0a6", "any type: a reroute carries the type of the wire into it")


@register
class Reroute(Node):
    """A point on a wire: passes its input on unchanged, keeping the wire's type."""

    category = "utils"
    inputs = {"in": ANY}
    outputs = {"out": ANY}

    def run(self, ctx, **inputs):  # only reached if called outside the engine
        return {"out": inputs["in"]}

