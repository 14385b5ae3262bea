"""Sweeps as data: a graph's params over lists of values, crossed or zipped, into jobs.

A sweep is `{"format": "loomwork.sweep", "version": 1, "mode": "cross"|"zip",
"axes": [{"param": "NODE.PARAM", "values": [...]}]}`, kept in the `.loom` file's meta (key
`sweep`) or as `GRAPH.sweep.json` beside it. NODE is what `loomwork run --set` takes (an id, an
8+ character id prefix or a unique title). Every axis and value is checked against the node's
declaration (nodes.registry) before anything runs, and so is every job's graph (validation).

On the command line an axis is `NODE.PARAM=VALUES`, VALUES one of: `A..B` (whole numbers, both
ends in), `A..B:STEP` (numbers), `@FILE` (one value a line; blank lines skipped), a JSON list
`[...]`, or a comma-separated list. Text values are read as `--set` reads them (Param.parse).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

SWEEP_FORMAT, SWEEP_VERSION = "loomwork.sweep", 1
META_KEY = "sweep"
MODES = ("cross", "zip")
MAX_JOBS = 100_000  # a typo such as 0..1e9 must not build a billion jobs
MAX_VALUES_FILE = 16 << 20
_NUM = r"\s*-?\d+(?:\.\d*)?\s*"
RANGE = re.compile(rf"^{_NUM}\.\.{_NUM}(?::{_NUM})?$")  # A..B or A..B:STEP; other text is a list


class SweepError(ValueError):
    """A sweep that cannot run, with the axis, value or file named."""


@dataclass
class Axis:
    param: str          # NODE.PARAM as written
    values: list        # parsed (typed) values once resolved; text or JSON values before


@dataclass
class Sweep:
    axes: list[Axis] = field(default_factory=list)
    mode: str = "cross"

    def as_dict(self) -> dict:
        return {"format": SWEEP_FORMAT, "version": SWEEP_VERSION, "mode": self.mode,
                "axes": [{"param": a.param, "values": list(a.values)} for a in self.axes]}

    @classmethod
    def from_dict(cls, doc: Any, where: str = "sweep") -> "Sweep":
        if not isinstance(doc, dict) or doc.get("format", SWEEP_FORMAT) != SWEEP_FORMAT:
            raise SweepError(f"{where}: not a Loomwork sweep (expected format {SWEEP_FORMAT!r})")
        if not isinstance(doc.get("version", 1), int) or doc.get("version", 1) > SWEEP_VERSION:
            raise SweepError(f"{where}: sweep version {doc.get('version')!r} is newer than this build reads")
        mode = doc.get("mode", "cross")
        if mode not in MODES:
            raise SweepError(f"{where}: mode {mode!r} is not one of {', '.join(MODES)}")
        axes = doc.get("axes")
        if not isinstance(axes, list) or not axes:
            raise SweepError(f"{where}: 'axes' should be a non-empty list")
        out = []
        for i, a in enumerate(axes):
            if not isinstance(a, dict) or not isinstance(a.get("param"), str) or not isinstance(a.get("values"), list):
                raise SweepError(f"{where}: axis {i + 1} should be {{\"param\": \"NODE.PARAM\", \"values\": [...]}}")
            out.append(Axis(a["param"], list(a["values"])))
        return cls(out, mode)


@dataclass
class ResolvedAxis:
    param: str      # as written
    node_id: str
    name: str
    label: str      # short, for the contact sheet: PARAM, or NODE.PARAM if two axes share a name
    values: list


# -- text to values --------------------------------------------------------------------------
def _number(text: str, item: str):
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise SweepError(f"--sweep {item!r}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise SweepError(f"--sweep {item!r}: {text!r} is not a finite number")
    return value


def _range(text: str, item: str) -> list:
    ends, _, step_text = text.partition(":")
    lo_text, _, hi_text = ends.partition("..")
    lo, hi = _number(lo_text.strip(), item), _number(hi_text.strip(), item)
    step = _number(step_text.strip(), item) if step_text else 1
    if step <= 0:
        raise SweepError(f"--sweep {item!r}: the step should be above 0")
    if hi < lo:
        raise SweepError(f"--sweep {item!r}: the range ends ({hi}) before it starts ({lo})")
    count = int(math.floor((hi - lo) / step + 1e-9)) + 1
    if count > MAX_JOBS:
        raise SweepError(f"--sweep {item!r}: {count} values, more than {MAX_JOBS}")
    if all(isinstance(v, int) for v in (lo, hi, step)):
        return list(range(lo, hi + 1, step))
    return [round(lo + i * step, 12) for i in range(count)]  # no drift from adding the step up


def _file_values(name: str, item: str, base: Optional[Path]) -> list[str]:
    path = Path(name).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    try:
        if path.stat().st_size > MAX_VALUES_FILE:
            raise SweepError(f"--sweep {item!r}: {path} is larger than {MAX_VALUES_FILE >> 20} MB")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SweepError(f"--sweep {item!r}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SweepError(f"--sweep {item!r}: {path} is not UTF-8 text") from None
    values = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not values:
        raise SweepError(f"--sweep {item!r}: {path} has no values (one a line)")
    return values


def parse_axis(item: str, base: Optional[Path] = None) -> Axis:
    """`NODE.PARAM=VALUES` (see the module docstring); `@FILE` is relative to `base`."""
    target, eq, text = item.partition("=")
    ref, dot, name = target.strip().rpartition(".")
    if not eq or not dot or not ref or not name:
        raise SweepError(f"--sweep {item!r}: expected NODE.PARAM=VALUES")
    text = text.strip()
    if text.startswith("@"):
        values: list = _file_values(text[1:], item, base)
    elif text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SweepError(f"--sweep {item!r}: not a JSON list ({exc.msg})") from None
        if not isinstance(values, list):
            raise SweepError(f"--sweep {item!r}: not a JSON list")
    elif RANGE.match(text):
        values = _range(text, item)
    else:
        values = [v.strip() for v in text.split(",")]
    if not values or values == [""]:
        raise SweepError(f"--sweep {item!r}: no values")
    return Axis(target.strip(), values)


# -- checking against the graph ------------------------------------------------------------
def resolve(sweep: Sweep, graph) -> list[ResolvedAxis]:
    """Each axis's node and param, and its values parsed and checked by the declaration."""
    from app.cli.headless import ParamRefError, find_param
    from nodes.base import ParamError, shown

    if sweep.mode not in MODES:
        raise SweepError(f"sweep mode {sweep.mode!r} is not one of {', '.join(MODES)}")
    if not sweep.axes:
        raise SweepError("the sweep has no axes: give at least one --sweep NODE.PARAM=VALUES")
    out: list[ResolvedAxis] = []
    for axis in sweep.axes:
        ref, _, name = axis.param.rpartition(".")
        try:
            node, param = find_param(graph, ref, name)
        except ParamRefError as exc:
            raise SweepError(f"sweep {axis.param}: {exc}") from None
        if any(a.node_id == node.id and a.name == name for a in out):
            raise SweepError(f"sweep {axis.param}: this param is swept twice")
        values = []
        for raw in axis.values:
            value = raw
            if isinstance(raw, str) and param.kind not in ("string", "path", "choice"):
                try:
                    value = param.parse(raw)
                except ParamError as exc:
                    raise SweepError(f"sweep {axis.param}: {exc}") from None
            if param.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            problem = param.check(value)
            if problem:
                raise SweepError(f"sweep {axis.param}: {shown(raw)}: {problem}")
            values.append(value)
        out.append(ResolvedAxis(axis.param, node.id, name, name, values))
    names = [a.name for a in out]
    for a in out:
        if names.count(a.name) > 1:
            a.label = f"{graph.nodes[a.node_id].title or graph.nodes[a.node_id].type}.{a.name}"
    if sweep.mode == "zip" and len({len(a.values) for a in out}) > 1:
        sizes = ", ".join(f"{a.param}: {len(a.values)}" for a in out)
        raise SweepError(f"zipped axes need the same number of values ({sizes})")
    count = math.prod(len(a.values) for a in out) if sweep.mode == "cross" else len(out[0].values)
    if count > MAX_JOBS:
        raise SweepError(f"the sweep makes {count} jobs, more than {MAX_JOBS}")
    return out


def combinations(axes: list[ResolvedAxis], mode: str) -> list[tuple]:
    """The value tuples, one per job: every combination (first axis slowest) or side by side."""
    lists = [a.values for a in axes]
    return list(itertools.product(*lists)) if mode == "cross" else list(zip(*lists))


def set_text(value: Any) -> str:
    """A param value as `--set` text: Param.parse reads it back to the same value (text as it
    is; numbers, booleans and JSON as JSON, whose float text round-trips exactly)."""
    return value if isinstance(value, str) else json.dumps(value)


# -- where a sweep is kept -------------------------------------------------------------------
def sweep_file_for(graph_path: "str | os.PathLike") -> Path:
    p = Path(graph_path)
    return p.with_name(p.stem + ".sweep.json")


def read_sweep_file(path: "str | os.PathLike") -> Sweep:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SweepError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise SweepError(f"{path}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
    return Sweep.from_dict(doc, str(path))


def stored_sweep(graph, graph_path: "str | os.PathLike | None") -> Optional[Sweep]:
    """The sweep kept with a graph: in its meta, else in GRAPH.sweep.json beside it, else None."""
    if META_KEY in graph.meta:
        return Sweep.from_dict(graph.meta[META_KEY], f"{graph_path}: meta.{META_KEY}")
    if graph_path is not None and sweep_file_for(graph_path).is_file():
        return read_sweep_file(sweep_file_for(graph_path))
    return None


def save_sweep(sweep: Sweep, graph_path: "str | os.PathLike", where: str) -> Path:
    """Keep `sweep` in the .loom file's meta (`where="meta"`) or beside it (`"file"`)."""
    from app.graph import load, save
    from kernels.files import atomic_write
    from nodes import registry

    if where == "file":
        target = sweep_file_for(graph_path)
        atomic_write(target, (json.dumps(sweep.as_dict(), indent=2) + "\n").encode("utf-8"))
        return target
    if Path(graph_path).suffix.lower() != ".loom":
        raise SweepError(f"{graph_path}: a sweep goes into a .loom file's meta; use --save-sweep file")
    graph = load(graph_path, registry.get)
    graph.meta[META_KEY] = sweep.as_dict()
    save(graph, graph_path)
    return Path(graph_path)
