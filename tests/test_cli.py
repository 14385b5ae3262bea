"""The headless runner: `loomwork nodes|validate|run`, in-process through app.cli.main and once
as a real process (exit codes, no tracebacks)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import txt2img_graph

from app.cli import main
from app.graph import Graph, load, save
from nodes import registry

REPO = Path(__file__).resolve().parents[1]
# Every node type nodes/core.py declares, read from the registry so a new one is not left out.
CORE = tuple(name for name, cls in registry.all_types().items() if cls.__module__ == "nodes.core")
STATUSES = {"ran", "cached-memory", "cached-disk", "failed", "skipped"}


def catalog(name):
    return registry.get(name)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Never touch the user's cache folder."""
    monkeypatch.setenv("LOOMWORK_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def graph_file(tiny_pixel_model, tmp_path_factory):
    """txt2img on the tiny model, plus a negative prompt identical to the positive one (so one
    node of a single run is served from memory); returns (path, ids by role)."""
    g, ids = txt2img_graph(tiny_pixel_model, steps=4)
    neg = registry.add_node(g, "TextEncode", {"text": g.nodes[ids["text"]].params["text"]},
                            title="Negative", pos=(200, 100))
    g.connect(ids["load"], "clip", neg.id, "clip")
    g.connect(neg.id, "conditioning", ids["sampler"], "negative")
    ids["neg"] = neg.id
    path = tmp_path_factory.mktemp("graphs") / "t2i.loom"
    save(g, path)
    return path, ids


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _report(path: Path) -> dict:
    rep = json.loads(path.read_text())
    return rep


def _by_title(rep: dict) -> dict[str, dict]:
    return {n["title"]: n for n in rep["nodes"]}


# -- nodes -------------------------------------------------------------------------------------
def test_nodes_lists_every_core_node_with_ports_and_params(capsys):
    assert set(CORE) >= {"LoadModel", "TextEncode", "EmptyLatent", "Sampler", "VAEEncode", "VAEDecode",
                         "LoadImage", "ImageScale", "SaveImage", "PreviewImage"}
    assert main(["nodes"]) == 0
    out = capsys.readouterr().out
    blocks: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        if line and not line.startswith(" "):
            current = line.split()[0]
            blocks[current] = line + "\n"
        elif current:
            blocks[current] += line + "\n"
    for name in CORE:
        assert name in blocks, name
        desc = registry.get(name).describe()
        head = blocks[name].splitlines()[0]
        for port, info in desc["inputs"].items():
            assert f"{port}: {info['type']}" in head
        for port, type_name in desc["outputs"].items():
            assert f"{port}: {type_name}" in head
        for param in desc["params"]:
            assert f"    {param}: " in blocks[name]
    assert "steps: int 1..500 = 20" in blocks["Sampler"]
    assert "euler_ancestral" in blocks["Sampler"] and "flow_match_euler" in blocks["Sampler"]
    assert "negative: CONDITIONING?" in blocks["Sampler"]


def test_nodes_json(capsys):
    assert main(["nodes", "--json"]) == 0
    listed = {d["type"]: d for d in json.loads(capsys.readouterr().out)}
    for name in CORE:
        assert listed[name] == json.loads(json.dumps(registry.get(name).describe()))
    sampler = listed["Sampler"]
    assert sampler["version"] == 2 and sampler["category"] == "sampling" and sampler["doc"]
    assert sampler["inputs"]["negative"] == {"type": "CONDITIONING", "optional": True}
    assert sampler["outputs"] == {"latent": "LATENT"}
    assert sampler["params"]["steps"]["min"] == 1 and sampler["params"]["steps"]["max"] == 500
    assert set(sampler["params"]["scheduler"]["options"]) >= {
        "ddim", "euler", "euler_ancestral", "dpmpp_2m", "unipc", "lcm", "flow_match_euler"}
    assert listed["SaveImage"]["output_node"] is True
    assert all(p["help"] for p in sampler["params"].values())


# -- validate ----------------------------------------------------------------------------------
def test_validate_ok(graph_file, capsys):
    path, _ = graph_file
    assert main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert f"{path}: ok" in out and "7 nodes" in out and err == ""


def test_validate_reports_every_problem(graph_file, tmp_path, capsys):
    path, ids = graph_file
    g = load(path, catalog)
    g.disconnect(ids["decode"], "latent")
    g.set_param(ids["empty"], "width", 3)
    bad = tmp_path / "bad.loom"
    save(g, bad)
    assert main(["validate", str(bad), "--set", "Sampler.scheduler=ddim"]) == 2
    out, err = capsys.readouterr()
    lines = _lines(err)
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert any(f"Decode [{ids['decode'][:8]}]" in line and "'latent'" in line for line in lines)
    assert any(f"Empty [{ids['empty'][:8]}]" in line and "minimum" in line for line in lines)
    assert out == ""


def test_validate_with_a_bad_set_value(graph_file, capsys):
    path, _ = graph_file
    assert main(["validate", str(path), "--set", "Sampler.steps=0"]) == 2
    assert _lines(capsys.readouterr().err) == ["error: --set 'Sampler.steps=0': 0 is below the minimum 1"]


# -- run ---------------------------------------------------------------------------------------
def test_run_writes_png_with_graph_and_report(graph_file, tmp_path, capsys):
    path, ids = graph_file
    out_dir, report_path = tmp_path / "out", tmp_path / "report.json"
    code = main(["run", str(path), "--set", "Sampler.steps=2", "--out", str(out_dir),
                 "--report", str(report_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err
    [png] = sorted(out_dir.glob("*.png"))
    assert f"saved {png}" in out
    assert "step 2/2" in err and "done in" in err  # progress (plain lines when not a terminal)

    # The PNG carries the graph that ran, --set included.
    ran = load(png, catalog)
    assert ran.nodes[ids["sampler"]].params["steps"] == 2
    assert set(ran.nodes) == set(load(path, catalog).nodes)
    assert load(path, catalog).nodes[ids["sampler"]].params["steps"] == 4  # the file is untouched

    rep = _report(report_path)
    assert rep["ok"] is True and rep["sampler_steps"] == 2
    assert len(rep["nodes"]) == 7
    for node in rep["nodes"]:
        assert set(node) >= {"title", "type", "status", "seconds", "error"}
        assert node["status"] in STATUSES
        assert isinstance(node["seconds"], (int, float)) and node["seconds"] >= 0
        assert node["error"] is None
    by = _by_title(rep)
    assert {t: n["type"] for t, n in by.items()} == {
        "Load": "LoadModel", "Prompt": "TextEncode", "Negative": "TextEncode", "Empty": "EmptyLatent",
        "Sampler": "Sampler", "Decode": "VAEDecode", "Save": "SaveImage"}
    # The two identical prompts share one result: whichever comes second is a memory hit.
    assert sorted([by["Prompt"]["status"], by["Negative"]["status"]]) == ["cached-memory", "ran"]
    for title in ("Load", "Empty", "Sampler", "Decode", "Save"):
        assert by[title]["status"] == "ran", title
    assert by["Save"]["outputs"] == [str(png)]


def test_second_run_hits_the_disk_cache_and_set_by_id(graph_file, tmp_path, capsys):
    """Each CLI run builds a fresh Executor (empty memory): the second is served from the disk
    tier; a --set by node id (full, then an 8-char prefix) re-runs the sampler with new steps."""
    path, ids = graph_file
    out_dir = tmp_path / "out"
    reports = []
    for i, sets in enumerate([[], [], [f"{ids['sampler']}.steps=3"], [f"{ids['sampler'][:8]}.steps=1"]]):
        rep_path = tmp_path / f"r{i}.json"
        argv = ["run", str(path), "--out", str(out_dir), "--report", str(rep_path)]
        for s in sets:
            argv += ["--set", s]
        assert main(argv) == 0, capsys.readouterr().err
        reports.append(_report(rep_path))
    capsys.readouterr()
    first, second, by_id, by_prefix = reports
    assert first["sampler_steps"] == 4
    assert second["sampler_steps"] == 0
    by = _by_title(second)
    for title in ("Prompt", "Negative", "Empty", "Sampler", "Decode"):
        assert by[title]["status"] == "cached-disk", (title, by[title])
    assert by["Save"]["status"] == "ran"  # an output node always runs
    assert by_id["sampler_steps"] == 3 and _by_title(by_id)["Sampler"]["status"] == "ran"
    assert by_prefix["sampler_steps"] == 1 and _by_title(by_prefix)["Sampler"]["status"] == "ran"
    assert _by_title(by_prefix)["Prompt"]["status"] in ("cached-disk", "cached-memory")
    assert len(list(out_dir.glob("*.png"))) == 4  # a counter, never an overwrite


def test_no_disk_cache_writes_nothing(graph_file, tmp_path, capsys):
    path, _ = graph_file
    rep_path = tmp_path / "r.json"
    assert main(["run", str(path), "--no-disk-cache", "--set", "Sampler.steps=1", "--out", str(tmp_path / "o"),
                 "--report", str(rep_path)]) == 0
    capsys.readouterr()
    assert not (tmp_path / "cache").exists()
    assert {n["status"] for n in _report(rep_path)["nodes"]} <= {"ran", "cached-memory"}


def _ambiguous_graph(tmp_path) -> Path:
    g = Graph()
    for i in range(2):
        registry.add_node(g, "TextEncode", {"text": f"p{i}"}, title="Prompt", pos=(0, i))
    path = tmp_path / "two.loom"
    save(g, path)
    return path


@pytest.mark.parametrize("item, words", [
    ("Nobody.steps=2", "no node has id or title 'Nobody'"),
    ("Sampler.sampler_name=euler", "Sampler has no param 'sampler_name'"),
    ("Sampler.steps=two", "'two' is not a whole number"),
    ("Sampler.steps=2.5", "'2.5' is not a whole number"),
    ("Sampler.cfg=lots", "'lots' is not a number"),
    ("Sampler.steps=0", "0 is below the minimum 1"),
    ("Sampler.steps=100000", "100000 is above the maximum 500"),
    ("Sampler.cfg=nan", "finite"),
    ("Sampler.scheduler=euler_a", "'euler_a' is not one of"),
    ("Sampler.steps", "expected NODE.PARAM=VALUE"),
    ("steps=2", "expected NODE.PARAM=VALUE"),
    ("Sampler.=2", "expected NODE.PARAM=VALUE"),
    ("Save.embed_graph=maybe", "'maybe' is not true or false"),
])
def test_bad_set_value_is_one_clear_line(graph_file, capsys, item, words):
    path, _ = graph_file
    assert main(["run", str(path), "--set", item, "--no-disk-cache"]) == 2
    out, err = capsys.readouterr()
    lines = _lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: --set {item!r}: ") and words in lines[0], lines[0]
    assert out == ""


def test_ambiguous_title_asks_for_an_id(tmp_path, capsys):
    path = _ambiguous_graph(tmp_path)
    assert main(["validate", str(path), "--set", "Prompt.text=x"]) == 2
    [line] = _lines(capsys.readouterr().err)
    assert "2 nodes are titled 'Prompt'" in line and "by id" in line


def test_missing_model_path_fails_clearly(graph_file, tmp_path, capsys):
    path, ids = graph_file
    missing = tmp_path / "no-such-model"
    rep_path = tmp_path / "r.json"
    code = main(["run", str(path), "--set", f"Load.path={missing}", "--no-disk-cache",
                 "--out", str(tmp_path / "o"), "--report", str(rep_path)])
    out, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in err
    errors = [line for line in _lines(err) if line.startswith("error:")]
    assert len(errors) == 1 and str(missing) in errors[0] and "Load" in errors[0]
    # The progress printer writes to the (redirected) stderr: one line per node state.
    assert any(line.startswith("Load") and "failed" in line for line in _lines(err))
    assert any(line.startswith("Sampler") and "skipped" in line for line in _lines(err))
    by = _by_title(_report(rep_path))
    assert by["Load"]["status"] == "failed" and str(missing) in by["Load"]["error"]
    for title in ("Prompt", "Negative", "Empty", "Sampler", "Decode", "Save"):
        assert by[title]["status"] == "skipped" and by[title]["error"], title
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())
    assert "saved" not in out


def test_malformed_graph_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.loom"
    bad.write_text('{"format": "loomwork.graph", "version": 2, "nodes": [}')
    for verb in ("run", "validate"):
        assert main([verb, str(bad)]) == 2
        out, err = capsys.readouterr()
        assert _lines(err) == [f"error: {bad}: not valid JSON (line 1, column 54: Expecting value)"]
    assert main(["run", str(tmp_path / "missing.loom")]) == 2
    assert _lines(capsys.readouterr().err) == [f"error: {tmp_path / 'missing.loom'}: no such file"]


def test_graph_without_output_node_is_refused(tmp_path, capsys):
    path = _ambiguous_graph(tmp_path)
    assert main(["run", str(path), "--no-disk-cache"]) == 2
    [line] = _lines(capsys.readouterr().err)
    assert line.startswith(f"error: {path}: nothing to run") and "SaveImage" in line


def test_bad_thread_count_is_one_line(graph_file, monkeypatch, capsys):
    path, _ = graph_file
    monkeypatch.setenv("LOOMWORK_THREADS", "many")
    assert main(["run", str(path), "--no-disk-cache"]) == 2
    assert _lines(capsys.readouterr().err) == ["error: LOOMWORK_THREADS should be a whole number, got 'many'"]


def test_a_bug_is_one_line_unless_debug(monkeypatch, capsys):
    def broken():
        raise RuntimeError("catalogue exploded")

    monkeypatch.setattr(registry, "all_types", broken)
    assert main(["nodes"]) == 1
    [line] = _lines(capsys.readouterr().err)
    assert "RuntimeError: catalogue exploded" in line and "--debug" in line
    with pytest.raises(RuntimeError):
        main(["--debug", "nodes"])


# -- a real process ----------------------------------------------------------------------------
def _cli(*args, cwd=REPO, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "app.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_process_exit_codes_and_no_traceback(graph_file, tmp_path):
    path, _ = graph_file
    env = {"LOOMWORK_CACHE_DIR": str(tmp_path / "cache")}
    bad = tmp_path / "bad.loom"
    bad.write_text("[]")

    nodes = _cli("nodes", env_extra=env)
    assert nodes.returncode == 0 and "Sampler" in nodes.stdout and nodes.stderr == ""

    malformed = _cli("validate", str(bad), env_extra=env)
    assert malformed.returncode == 2
    assert _lines(malformed.stderr) == [f"error: {bad}: the top level should be a JSON object, got list"]

    bad_set = _cli("run", str(path), "--set", "Sampler.steps=x", env_extra=env)
    assert bad_set.returncode == 2 and len(_lines(bad_set.stderr)) == 1

    missing = tmp_path / "nowhere"
    run = _cli("run", str(path), "--set", f"Load.path={missing}", "--out", str(tmp_path / "o"), env_extra=env)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and str(missing) in run.stderr
    for proc in (nodes, malformed, bad_set, run):
        assert "Traceback" not in proc.stdout + proc.stderr


def test_every_cli_verb_runs_headless_from_the_loomwork_command():
    """`loomwork VERB` must reach the CLI, not open the app, for every verb the parser has."""
    from app.cli import COMMANDS, build_parser
    from app.main import CLI_COMMANDS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS) and set(COMMANDS) <= CLI_COMMANDS
