"""The node catalogue: typed ports and params, each node a thin call into kernels/. No Qt.

Importing the package registers the built-in node types: each node module registers its own
classes in nodes.registry as it is imported, and the registry imports no node module back.
"""

from . import (  # noqa: F401  (registers the built-in node types)
    adapters,
    analysis,
    controlnet,
    core,
    eraser_tools,
    erasers,
    ip_adapter,
    layout,
    model_files,
    reroute,
    resolution,
    speed,
    t2i_zero,
    upscale,
)
