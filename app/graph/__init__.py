"""The graph document and its file format. No Qt, no torch."""

from .document import CycleError, Edge, Graph, GraphError, Group, Node, new_id
from .errors import GraphFileError
from .fileformat import FORMAT_VERSION, dumps, load, loads, save
from .validate import Problem, validate

__all__ = ["CycleError", "Edge", "Graph", "GraphError", "Group", "Node", "new_id", "FORMAT_VERSION",
           "GraphFileError", "dumps", "load", "loads", "save", "Problem", "validate"]
