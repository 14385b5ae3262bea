"""The shipped erase-*.loom examples are what `bench/erasers.py --graphs` writes: the same nodes,
versions, parameters and wires, at the places laid out by hand in the app."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from support.erase_examples import EXAMPLE_GRAPHS, write_example_graphs  # noqa: E402


def _comparable(doc: dict):
    """The file without its random node ids: nodes in order, wires by node index."""
    index = {n["id"]: i for i, n in enumerate(doc["nodes"])}
    nodes = [(n["type"], n["version"], n["title"], n["params"], n["pos"]) for n in doc["nodes"]]
    edges = sorted((index[e["from"]["node"]], e["from"]["port"], index[e["to"]["node"]], e["to"]["port"])
                   for e in doc["edges"])
    return nodes, edges, doc["meta"]


@pytest.mark.parametrize("name", sorted(EXAMPLE_GRAPHS))
def test_generator_writes_the_shipped_example(tmp_path, name):
    shipped = ROOT / "resources" / "graphs" / name
    (tmp_path / name).write_bytes(shipped.read_bytes())
    write_example_graphs(str(tmp_path))
    written = json.loads((tmp_path / name).read_text(encoding="utf-8"))
    assert _comparable(written) == _comparable(json.loads(shipped.read_text(encoding="utf-8")))


def test_a_new_folder_gets_the_generators_own_places(tmp_path):
    write_example_graphs(str(tmp_path))
    doc = json.loads((tmp_path / "erase-redteam.loom").read_text(encoding="utf-8"))
    assert [n["pos"] for n in doc["nodes"]][:3] == [[0.0, 0.0], [320.0, 0.0], [700.0, 0.0]]
