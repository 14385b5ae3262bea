"""A mutation fuzzer over graph files and PNGs with embedded graphs (hypothesis).

Each case takes a real graph (the shipped example graphs, a format-1 file, a PNG Loomwork saved),
mutates it (structure-aware: values replaced by hostile ones, keys dropped, misspelt or added,
records duplicated; or byte-level: flips, cuts, splices) and opens it as a file. What may
happen: the graph loads, or `GraphFileError`. A loaded graph then validates without raising,
saves and loads back to the same text. Anything else is a crash; a case that takes more than
CASE_SECONDS is a hang. `bench/reliability.py` runs the same cases in bulk and counts them.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.graph import GraphFileError, dumps, load, loads, validate
from app.graph.png import png_bytes
from nodes import registry

REPO = Path(__file__).resolve().parents[1]
CASE_SECONDS = 10  # a case past this is a hang (a real one takes milliseconds)


class Hang(Exception):
    """A case that did not finish in CASE_SECONDS."""


# -- the corpus ------------------------------------------------------------------------------
def corpus() -> list[tuple[str, bytes]]:
    """(name, file bytes): every shipped example graph, a format-1 file, and PNGs carrying a graph."""
    files = [(p.name, p.read_bytes()) for p in sorted((REPO / "resources" / "graphs").glob("*.loom"))]
    v1 = {"format": "loomwork.graph", "version": 1,
          "nodes": [{"id": "a", "type": "EmptyLatent", "params": {"width": 64}, "pos": [0, 0]},
                    {"id": "b", "type": "Sampler", "version": 1, "params": {"sampler_name": "euler_a"}},
                    {"id": "c", "type": "FutureNode", "version": 3, "params": {"x": [1, {"y": None}]}}],
          "edges": [{"from": "a:latent", "to": "b:latent"}],
          "groups": [{"id": "g", "title": "G", "nodes": ["a", "b"], "rect": [0, 0, 10, 10]}]}
    files.append(("v1.loom", json.dumps(v1).encode()))
    from PIL import Image

    for name, data in files[:3]:
        files.append((name + ".png", png_bytes(Image.new("RGB", (8, 8), (9, 99, 199)), data.decode("utf-8"))))
    return files


CORPUS = corpus()

# -- mutations -------------------------------------------------------------------------------
HUGE = "HUGE_INTEGER_TOKEN"


def hostile_values(rng: random.Random) -> Any:
    """A value that has broken loaders: huge or odd numbers, bad text, deep or wide containers."""
    choices: list[Callable[[], Any]] = [
        lambda: 10 ** rng.choice((20, 309, 400, 4000)),
        lambda: HUGE,  # replaced by an integer of more than 4,300 digits in the text
        lambda: rng.choice((math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324)),
        lambda: rng.choice((True, False, None, 0, -1, 2**63, -(2**63) - 1)),
        lambda: rng.choice(("", "\udfff", "\ud800x", "\x00", "../../x", "/etc/passwd", "~/x",
                            "a" * rng.choice((300, 70_000)), "ti<le", "😀" * 50, "\u202e", "builtin:../../x")),
        lambda: nested(rng.choice((50, 120, 400))),
        lambda: {},
        lambda: list(range(rng.choice((0, 3, 1000)))),
        lambda: {"node": "x", "port": "y"},
        lambda: rng.random() * 10 ** rng.randint(-5, 5),
    ]
    return rng.choice(choices)()


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def paths_in(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and indices) to a value in a JSON document."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.extend(paths_in(v, prefix + (k,)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:50]):
            out.extend(paths_in(v, prefix + (i,)))
    return out


def _parent(doc: Any, path: tuple) -> tuple[Any, Any]:
    for key in path[:-1]:
        doc = doc[key]
    return doc, path[-1]


def mutate_structure(rng: random.Random, doc: Any) -> Any:
    """One structural edit of the parsed document."""
    paths = paths_in(doc)
    # Mostly a node's own fields (params, title, pos): edits there load, so they reach validation
    # and saving; the wires and the frame get the rest.
    in_nodes = [p for p in paths if len(p) >= 3 and p[0] == "nodes" and p[2] in ("params", "title", "pos", "meta")]
    path = rng.choice(in_nodes if in_nodes and rng.random() < 0.7 else paths)
    if not path:
        return hostile_values(rng) if rng.random() < 0.2 else doc
    parent, key = _parent(doc, path)
    op = rng.randrange(6)
    if op == 0:  # replace with a hostile value
        parent[key] = hostile_values(rng)
    elif op == 1:  # drop it
        del parent[key]
    elif op == 2 and isinstance(parent, dict):  # misspell the key
        value = parent.pop(key)
        parent[str(key)[:-1] + rng.choice("<>x_") if str(key) else "x"] = value
    elif op == 3 and isinstance(parent, list):  # duplicate a record (same id twice, say)
        parent.insert(key, json.loads(json.dumps(parent[key])))
    elif op == 4:  # the value of another place
        other = rng.choice(paths)
        try:
            src_parent, src_key = _parent(doc, other) if other else (None, None)
            value = doc if src_parent is None else src_parent[src_key]
            parent[key] = json.loads(json.dumps(value, allow_nan=True))
        except (KeyError, IndexError, TypeError, RecursionError):
            pass
    else:  # a new key
        target = parent[key] if isinstance(parent[key], dict) else parent
        if isinstance(target, dict):
            target[rng.choice(("extra", "ti<le", "version", "raw", "__proto__"))] = hostile_values(rng)
    return doc


def to_text(rng: random.Random, doc: Any, ascii: bool = False) -> str:
    text = json.dumps(doc, ensure_ascii=ascii or rng.random() < 0.5, allow_nan=True)
    return text.replace(f'"{HUGE}"', "7" * 4400)


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """Byte-level damage: flips, cuts, splices, repeats."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not data:
            break
        op = rng.randrange(5)
        i = rng.randrange(len(data))
        if op == 0:
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            del data[i:]
        elif op == 2:
            data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3:
            j = rng.randrange(len(data))
            data[i:i] = data[j:j + rng.randint(1, 64)]
        else:
            data[i:i + 4] = rng.choice((b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"))
    return bytes(data)


def make_case(rng: random.Random) -> tuple[str, bytes]:
    """One mutated file: (what it came from, its bytes)."""
    from PIL import Image

    name, data = rng.choice(CORPUS)
    is_png = name.endswith(".png")
    if rng.random() < 0.3:
        return name + " (bytes)", mutate_bytes(rng, data)
    source = CORPUS[[n for n, _ in CORPUS].index(name[:-4])][1] if is_png else data
    doc = json.loads(source)
    for _ in range(rng.choice((1, 1, 2, 3, 6))):
        doc = mutate_structure(rng, doc)
    if is_png:  # a PNG's text is UTF-8: a lone surrogate can be there only as a JSON escape
        return name + " (graph)", png_bytes(Image.new("RGB", (4, 4)), to_text(rng, doc, ascii=True))
    text = to_text(rng, doc)
    if rng.random() < 0.1:
        return name + " (bom)", b"\xef\xbb\xbf" + text.encode("utf-8", "surrogatepass")
    return name + " (graph)", text.encode("utf-8", "surrogatepass")


# -- one case --------------------------------------------------------------------------------
@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise Hang in this (main) thread if the block runs past `seconds`."""
    def on_alarm(signum, frame):
        raise Hang(f"no answer in {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check_file(path: Path) -> str:
    """Open `path` as the app would and use the graph: "loaded" or "refused" (GraphFileError).
    Raises anything else (a crash) and Hang."""
    with time_limit(CASE_SECONDS):
        try:
            graph = load(path, registry.get)
        except GraphFileError:
            return "refused"
        for problem in validate(graph, registry.get):
            assert len(problem.message) < 2100
        text = dumps(graph, strict=False)
        again = loads(text, registry.get)
        assert dumps(again, strict=False) == text, "a save does not load back to itself"
        try:
            dumps(graph)  # what File > Save writes: NaN is refused, cleanly
        except ValueError:
            pass
        return "loaded"


def run_case(rng: random.Random, path: Path) -> str:
    name, data = make_case(rng)
    path.write_bytes(data)
    return check_file(path)


# -- the test --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def case_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "case"


def test_the_corpus_loads_as_it_is(case_file):
    for name, data in CORPUS:
        case_file.write_bytes(data)
        assert check_file(case_file) == "loaded", name


@pytest.mark.slow  # about 15 s: the 2,000 cases CI runs
@settings(max_examples=2000, deadline=CASE_SECONDS * 1000, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rng=st.randoms(use_true_random=True))  # seeded by hypothesis: diverse, and derandomized in CI
def test_mutated_graph_files_load_or_are_refused_cleanly(rng, case_file):
    run_case(rng, case_file)


def test_hostile_bytes_are_refused_cleanly(case_file):
    for data in (b"", b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, b"\xef\xbb\xbf",
                 b"\xff\xfe{}", b"{" * 100_000, b"[" * 100_000, b'{"format": "loomwork.graph", "version": 2, "nodes": [' +
                 b'{"id": "a", "type": "X"},' * 10 + b"]}"):
        case_file.write_bytes(data)
        assert check_file(case_file) in ("loaded", "refused")
