"""The executor's rules, each pinned with counting nodes or the run report."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from app.engine import EngineEvents, Executor
from app.graph import Graph, save
from nodes.base import IMAGE, Float, Int, Node, NodeError
from nodes.registry import register

RUNS: dict[str, int] = {}


def _count(name):
    RUNS[name] = RUNS.get(name, 0) + 1


@register
class TestValue(Node):
    """Emits a number as a 1x1x1x1 IMAGE."""
    category = "test"
    params = {"value": Float(0.0)}
    outputs = {"out": IMAGE}

    def run(self, ctx, value):
        import torch
        _count("value")
        return {"out": torch.full((1, 1, 1, 1), float(value))}


@register
class TestMod(Node):
    """out = input mod `modulus` (lets an edit change the input yet not the output)."""
    category = "test"
    inputs = {"a": IMAGE}
    params = {"modulus": Float(1000.0)}
    outputs = {"out": IMAGE}

    def run(self, ctx, a, modulus):
        _count("mod")
        return {"out": a % modulus}


@register
class TestAdd(Node):
    category = "test"
    inputs = {"a": IMAGE, "b": IMAGE.optional()}
    params = {"add": Float(0.0)}
    outputs = {"out": IMAGE}

    def run(self, ctx, a, b, add):
        _count("add")
        out = a + add
        return {"out": out if b is None else out + b}


@register
class TestSink(Node):
    """An output node that records what reached it."""
    category = "test"
    inputs = {"a": IMAGE}
    params = {"tag": Int(0)}
    output_node = True
    always_run = True
    seen: list = []

    def run(self, ctx, a, tag):
        _count("sink")
        TestSink.seen.append(float(a.flatten()[0]))
        return {}


@register
class TestFail(Node):
    category = "test"
    inputs = {"a": IMAGE}
    outputs = {"out": IMAGE}

    def run(self, ctx, a):
        _count("fail")
        raise NodeError("this node always fails")


@register
class TestBug(Node):
    """A node with a bug in it: raises something other than a NodeError."""
    category = "test"
    inputs = {"a": IMAGE}
    outputs = {"out": IMAGE}

    def run(self, ctx, a):
        _count("bug")
        return {"out": a * (1 / 0)}


@register
class TestCancel(Node):
    """Cancels the run from inside, as a user pressing Cancel mid-node would."""
    category = "test"
    inputs = {"a": IMAGE}
    outputs = {"out": IMAGE}
    cancel_event = None

    def run(self, ctx, a):
        _count("cancel")
        TestCancel.cancel_event.set()
        ctx.check_cancel()
        return {"out": a}


@pytest.fixture(autouse=True)
def _reset():
    RUNS.clear()
    TestSink.seen.clear()


@pytest.fixture
def executor(tmp_path):
    return Executor(device="cpu", disk_cache=tmp_path / "cache")


def chain(g: Graph, value=1.0, add=10.0, x=0.0):
    v = g.add_node("TestValue", {"value": value}, pos=(x, 0))
    a = g.add_node("TestAdd", {"add": add}, pos=(x + 100, 0))
    s = g.add_node("TestSink", {}, pos=(x + 200, 0))
    g.connect(v.id, "out", a.id, "a")
    g.connect(a.id, "out", s.id, "a")
    return v, a, s


def statuses(report):
    return {r.title: report.status(nid) for nid, r in report.nodes.items()}


def test_identical_chains_share_results(executor):
    g = Graph()
    chain(g, x=0)
    chain(g, x=1000)
    report = executor.run(g)
    assert report.ok
    assert RUNS == {"value": 1, "add": 1, "sink": 2}
    assert TestSink.seen == [11.0, 11.0]


def test_unchanged_graph_runs_nothing_but_sinks(executor):
    g = Graph()
    chain(g)
    executor.run(g)
    RUNS.clear()
    report = executor.run(g)
    assert RUNS == {"sink": 1}
    assert sorted(statuses(report).values()) == ["cached-memory", "cached-memory", "ran"]


def test_last_node_edit_reruns_one_node(executor):
    g = Graph()
    v, a, s = chain(g)
    executor.run(g)
    RUNS.clear()
    g.set_param(a.id, "add", 20.0)
    report = executor.run(g)
    assert RUNS == {"add": 1, "sink": 1}
    assert report.status(v.id) == "cached-memory"
    assert TestSink.seen[-1] == 21.0


def test_upstream_edit_reruns_its_cone_only(executor):
    g = Graph()
    v, a, s = chain(g)
    other = g.add_node("TestValue", {"value": 5.0}, pos=(0, 300))
    sink2 = g.add_node("TestSink", {}, pos=(200, 300))
    g.connect(other.id, "out", sink2.id, "a")
    executor.run(g)
    RUNS.clear()
    g.set_param(v.id, "value", 2.0)
    report = executor.run(g)
    assert RUNS == {"value": 1, "add": 1, "sink": 2}  # the second branch's value stays cached
    assert report.status(other.id) == "cached-memory"
    assert TestSink.seen[-2:] == [12.0, 5.0] or TestSink.seen[-2:] == [5.0, 12.0]


def test_early_cutoff_spares_downstream(executor):
    g = Graph()
    v = g.add_node("TestValue", {"value": 1.0})
    m = g.add_node("TestMod", {"modulus": 3.0}, pos=(100, 0))
    a = g.add_node("TestAdd", {"add": 1.0}, pos=(200, 0))
    s = g.add_node("TestSink", {}, pos=(300, 0))
    g.connect(v.id, "out", m.id, "a")
    g.connect(m.id, "out", a.id, "a")
    g.connect(a.id, "out", s.id, "a")
    executor.run(g)
    RUNS.clear()
    g.set_param(v.id, "value", 4.0)  # 4 mod 3 == 1 mod 3
    report = executor.run(g)
    assert RUNS == {"value": 1, "mod": 1, "sink": 1}
    assert report.status(a.id) == "cached-memory"


def test_run_to_here_pulls_only_the_cone(executor):
    g = Graph()
    v, a, s = chain(g)
    report = executor.run(g, targets=[v.id])
    assert RUNS == {"value": 1}
    assert set(report.nodes) == {v.id}


def test_failure_is_isolated_to_its_cone(executor):
    g = Graph()
    v, a, s = chain(g)
    f = g.add_node("TestFail", {}, pos=(100, 200))
    after = g.add_node("TestAdd", {}, pos=(200, 200))
    sink2 = g.add_node("TestSink", {"tag": 2}, pos=(300, 200))
    g.connect(v.id, "out", f.id, "a")
    g.connect(f.id, "out", after.id, "a")
    g.connect(after.id, "out", sink2.id, "a")
    report = executor.run(g)
    assert not report.ok
    assert report.status(f.id) == "failed"
    assert report.nodes[f.id].error == "this node always fails"
    assert report.status(after.id) == "skipped" and report.status(sink2.id) == "skipped"
    assert report.status(s.id) == "ran"  # the independent branch finished
    assert TestSink.seen == [11.0]


def test_node_raising_a_bug_reports_traceback_without_crashing(executor):
    """A bug (not a NodeError) fails its node with the exception and its traceback in the report;
    the independent branch still runs."""
    g = Graph()
    v, a, s = chain(g)
    bug = g.add_node("TestBug", {}, pos=(100, 200))
    after = g.add_node("TestSink", {"tag": 2}, pos=(200, 200))
    g.connect(v.id, "out", bug.id, "a")
    g.connect(bug.id, "out", after.id, "a")
    report = executor.run(g)
    rep = report.nodes[bug.id]
    assert report.status(bug.id) == "failed" and not report.ok
    assert rep.error == "ZeroDivisionError: division by zero"
    assert rep.traceback.startswith("Traceback (most recent call last)")
    assert "in run" in rep.traceback and "1 / 0" in rep.traceback  # the node's own frame
    assert rep.traceback.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "traceback" not in rep.as_json()  # reports name the error; tracebacks are for --debug
    assert report.status(after.id) == "skipped" and report.status(s.id) == "ran"


def test_invalid_node_fails_but_others_run(executor):
    g = Graph()
    v, a, s = chain(g)
    lonely = g.add_node("TestSink", {}, pos=(0, 500))  # required input not wired
    report = executor.run(g)
    assert report.status(lonely.id) == "failed"
    assert "not connected" in report.nodes[lonely.id].error
    assert report.status(s.id) == "ran"


def test_cancel_keeps_finished_work(executor):
    g = Graph()
    v = g.add_node("TestValue", {"value": 3.0})
    c = g.add_node("TestCancel", {}, pos=(100, 0))
    s = g.add_node("TestSink", {}, pos=(200, 0))
    g.connect(v.id, "out", c.id, "a")
    g.connect(c.id, "out", s.id, "a")
    cancel = threading.Event()
    TestCancel.cancel_event = cancel
    report = executor.run(g, cancel=cancel)
    assert report.cancelled and not report.ok
    assert report.status(v.id) == "ran"
    assert report.status(c.id) == "skipped" and report.status(s.id) == "skipped"
    assert RUNS == {"value": 1, "cancel": 1}
    RUNS.clear()
    TestCancel.cancel_event = threading.Event()  # not the run's event: no cancel this time
    report = executor.run(g)
    assert report.status(v.id) == "cached-memory"
    assert RUNS == {"cancel": 1, "sink": 1}


def test_sampler_cancel_stops_at_a_step_and_keeps_upstream(executor, tiny_pixel_model):
    from conftest import txt2img_graph

    g, ids = txt2img_graph(tiny_pixel_model, steps=6)
    cancel = threading.Event()
    steps = []

    def progress(node_id, step, total):
        steps.append(step)
        if step == 2:
            cancel.set()

    report = executor.run(g, events=EngineEvents(progress=progress), cancel=cancel,
                          output_dir=executor.disk.root.parent / "out")
    assert report.cancelled
    assert steps == [1, 2] and report.sampler_steps == 2
    assert report.status(ids["text"]) == "ran"
    assert report.status(ids["sampler"]) == "skipped"
    again = executor.run(g, output_dir=executor.disk.root.parent / "out")
    assert again.ok
    assert again.status(ids["text"]) == "cached-memory" and again.status(ids["load"]) == "cached-memory"
    assert again.sampler_steps == 6


def test_model_loaded_once_for_two_loaders(executor, tiny_pixel_model, tmp_path):
    from conftest import txt2img_graph

    g, ids = txt2img_graph(tiny_pixel_model, steps=2)
    g2, _ = txt2img_graph(tiny_pixel_model, steps=3)
    g.merge(g2, offset=(0, 500))
    report = executor.run(g, output_dir=tmp_path)
    assert report.ok
    assert executor.models.loads == 1
    assert report.sampler_steps == 5


def test_whitespace_only_prompt_edit_runs_no_sampler_step(executor, tiny_pixel_model, tmp_path):
    from conftest import txt2img_graph

    g, ids = txt2img_graph(tiny_pixel_model, prompt="a red circle", steps=3)
    executor.run(g, output_dir=tmp_path)
    g.set_param(ids["text"], "text", "a red   circle ")
    report = executor.run(g, output_dir=tmp_path)
    assert report.status(ids["text"]) == "ran"
    assert report.status(ids["sampler"]) == "cached-memory"
    assert report.sampler_steps == 0


def test_same_seed_same_pixels(tiny_latent_model, tmp_path):
    from conftest import txt2img_graph

    images = []
    for i in range(2):
        ex = Executor(device="cpu", disk_cache=False)
        g, ids = txt2img_graph(tiny_latent_model, steps=3, size=16)
        captured = {}
        ex.run(g, events=EngineEvents(images=lambda nid, im, paths, captured=captured: captured.setdefault("im", im)),
               output_dir=tmp_path / str(i))
        images.append(captured["im"])
    assert images[0].shape == (1, 16, 16, 3)
    assert (images[0] == images[1]).all()


def test_memory_budget_evicts_and_recomputes(tmp_path):
    ex = Executor(device="cpu", disk_cache=False, memory_budget=2)  # smaller than any tensor entry (4 bytes)
    g = Graph()
    chain(g)
    ex.run(g)
    RUNS.clear()
    g.set_param(next(n.id for n in g.nodes.values() if n.type == "TestAdd"), "add", 1.0)
    report = ex.run(g)
    assert report.ok
    assert RUNS == {"value": 1, "add": 1, "sink": 1}  # value's result was evicted: recomputed


DISK_SCRIPT = r"""
import json, sys
from app.engine import Executor
from app.graph import load
from nodes import registry
g = load(sys.argv[1], registry.get)
report = Executor(device="cpu").run(g, output_dir=sys.argv[2], graph_path=sys.argv[1])
print(json.dumps(report.as_json()))
"""


def _run_in_a_fresh_process(graph_path: Path, out_dir: Path, cache_dir: Path) -> dict:
    """The run report of `graph_path` run by a new Python process on the disk cache `cache_dir`."""
    env = {**os.environ, "LOOMWORK_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", DISK_SCRIPT, str(graph_path), str(out_dir)],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_disk_tier_is_hit_from_a_second_process(tiny_pixel_model, tmp_path):
    from conftest import txt2img_graph

    g, ids = txt2img_graph(tiny_pixel_model, steps=3)
    path = tmp_path / "g.loom"
    save(g, path)
    reports = [_run_in_a_fresh_process(path, tmp_path / f"out{i}", tmp_path / "cache") for i in range(2)]
    first, second = ({n["title"]: n["status"] for n in r["nodes"]} for r in reports)
    assert set(first.values()) == {"ran"}
    assert reports[1]["sampler_steps"] == 0
    assert second["Sampler"] == "cached-disk" and second["Decode"] == "cached-disk"
    assert second["Load"] == "cached-disk"  # the model was not even loaded
    assert second["Save"] == "ran"
    assert (tmp_path / "out1" / "test_00001.png").exists()


def test_a_restart_reads_conditioning_from_disk_instead_of_encoding_again(tiny_pixel_model, tmp_path):
    """A new process that must re-run the sampler takes the prompt's conditioning from the disk
    cache, before anything in that process has imported the conditioning's class."""
    from conftest import txt2img_graph

    g, ids = txt2img_graph(tiny_pixel_model, steps=3)
    Executor(device="cpu", disk_cache=tmp_path / "cache").run(g, output_dir=tmp_path / "out0")
    g.set_param(ids["sampler"], "steps", 2)
    path = tmp_path / "g.loom"
    save(g, path)
    report = _run_in_a_fresh_process(path, tmp_path / "out1", tmp_path / "cache")
    status = {n["title"]: n["status"] for n in report["nodes"]}
    assert status["Prompt"] == "cached-disk"  # read back, not encoded again
    assert status["Sampler"] == "ran" and report["sampler_steps"] == 2
    assert report["ok"]


def test_conditioning_round_trips_through_the_disk_cache_exactly(tmp_path):
    import torch

    from app.engine.cache import DiskCache
    from kernels.text import Conditioning

    cond = Conditioning(embeds=torch.randn(1, 4, 8), prompt="a red circle", words={"red": (2,), "a": (1, 5)},
                        empty=torch.randn(1, 4, 8), pooled=torch.randn(1, 6), links=((2, 79), (3, 80)))
    DiskCache(tmp_path).put("k1", {"conditioning": "hash"}, {"conditioning": cond, "n": 3})
    back = DiskCache(tmp_path).get("k1")  # a new cache object: nothing held in memory
    assert back["n"] == 3
    got = back["conditioning"]
    assert type(got) is Conditioning
    assert got.prompt == cond.prompt and got.words == cond.words and got.links == cond.links
    for name in ("embeds", "empty", "pooled"):
        assert torch.equal(getattr(got, name), getattr(cond, name)), name
    assert got.empty_pooled is None


def test_a_dataclass_not_declared_storable_keeps_only_its_trace_on_disk(tmp_path):
    from dataclasses import dataclass

    from app.engine.cache import DiskCache

    @dataclass
    class Scratch:
        value: int

    cache = DiskCache(tmp_path)
    cache.put("k2", {"out": "hash"}, {"out": Scratch(1)})
    assert cache.trace("k2") == {"out": "hash"}  # downstream keys can still be computed
    assert not cache.has_values("k2") and cache.get("k2") is None


def test_memory_cache_evicts_big_cheap_results_before_small_slow_ones():
    from app.engine.cache import MemoryCache

    cache = MemoryCache(budget_bytes=1000)
    cache.put("slow-small", {"v": 1}, size=100, cost=5.0)
    cache.put("cheap-big", {"v": 2}, size=800, cost=0.01)
    cache.put("new", {"v": 3}, size=300, cost=0.5)  # over budget: one must go
    assert "slow-small" in cache and "new" in cache
    assert "cheap-big" not in cache
    assert cache.used == 400


def test_cycle_fails_its_nodes_and_the_rest_still_runs(executor):
    g = Graph()
    v, a, s = chain(g)
    x = g.add_node("TestAdd", {}, pos=(0, 400))
    y = g.add_node("TestAdd", {}, pos=(100, 400))
    z = g.add_node("TestSink", {}, pos=(200, 400))
    g.connect(x.id, "out", y.id, "a")
    g.connect(y.id, "out", x.id, "a")
    g.connect(y.id, "out", z.id, "a")
    report = executor.run(g)
    assert report.status(x.id) == "failed" and report.status(y.id) == "failed"
    assert "cycle" in report.nodes[x.id].error
    assert report.status(z.id) == "skipped"
    assert report.status(s.id) == "ran"


def test_nan_param_fails_its_node_without_crashing_the_run(executor):
    g = Graph()
    v, a, s = chain(g)
    g.set_param(a.id, "add", float("nan"))
    other = g.add_node("TestValue", {"value": 2.0}, pos=(0, 300))
    sink2 = g.add_node("TestSink", {}, pos=(100, 300))
    g.connect(other.id, "out", sink2.id, "a")
    report = executor.run(g)
    assert report.status(a.id) == "failed" and "finite" in report.nodes[a.id].error
    assert report.status(sink2.id) == "ran"


def test_progress_that_is_not_sampling_is_not_counted(executor):
    @register
    class TestTrainer(Node):
        category = "test"
        outputs = {"out": IMAGE}

        def run(self, ctx):
            import torch
            for i in range(3):
                ctx.progress(i + 1, 3, sampler_step=False)
            return {"out": torch.zeros(1, 1, 1, 1)}

    g = Graph()
    t = g.add_node("TestTrainer", {})
    s = g.add_node("TestSink", {}, pos=(100, 0))
    g.connect(t.id, "out", s.id, "a")
    report = executor.run(g)
    assert report.ok and report.sampler_steps == 0
