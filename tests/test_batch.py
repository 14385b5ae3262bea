"""Batch runs without worker processes: sweeps as data, validation, the manifest's resume and
retry rules, the contact sheet and the CLI's errors. Jobs run through the in-process backend
(the same JobRunner the workers hold); tests/test_batch_workers.py runs local and Ray workers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.batch import Sweep, SweepError, parse_axis, plan_batch, run_batch
from app.batch.local import InProcessBackend
from app.batch.manifest import MANIFEST_NAME
from app.batch.sweep import Axis, resolve, save_sweep, stored_sweep, sweep_file_for
from app.graph import load
from app.graph.png import read_graph_text
from nodes import registry

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "resources" / "graphs" / "default.loom"
FAST = ["Sampler.steps=2"]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOMWORK_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def backend():
    b = InProcessBackend({"disk_cache": False})
    yield b
    b.close()


def _graph():
    return load(DEFAULT, registry.get)


# -- sweeps as data ------------------------------------------------------------------------
def test_axis_text_forms(tmp_path):
    assert parse_axis("Sampler.seed=0..4").values == [0, 1, 2, 3, 4]
    assert parse_axis("Sampler.seed=10..20:5").values == [10, 15, 20]
    assert parse_axis("Sampler.cfg=1..2:0.25").values == [1.0, 1.25, 1.5, 1.75, 2.0]
    assert parse_axis("Sampler.cfg=[3, 4.5]").values == [3, 4.5]
    assert parse_axis("Sampler.scheduler=euler, ddim").values == ["euler", "ddim"]
    assert parse_axis("Prompt.text=wait... a cat").values == ["wait... a cat"]  # not a range
    (tmp_path / "prompts.txt").write_text("a red circle, big\n\na blue square\n")
    axis = parse_axis("Prompt.text=@prompts.txt", tmp_path)
    assert axis.param == "Prompt.text" and axis.values == ["a red circle, big", "a blue square"]


@pytest.mark.parametrize("item, words", [
    ("Sampler.seed", "expected NODE.PARAM=VALUES"),
    ("seed=1..3", "expected NODE.PARAM=VALUES"),
    ("Sampler.seed=5..1", "ends (1) before it starts (5)"),
    ("Sampler.seed=0..3:0", "step should be above 0"),
    ("Sampler.seed=0..1000000000", "more than"),
    ("Prompt.text=@missing.txt", "cannot read"),
    ("Sampler.cfg=[1, 2", "not a JSON list"),
])
def test_bad_axis_text_names_the_axis(item, words, tmp_path):
    with pytest.raises(SweepError, match="--sweep") as info:
        parse_axis(item, tmp_path)
    assert words in str(info.value)


@pytest.mark.parametrize("axes, mode, words", [
    ([Axis("Nope.seed", [1])], "cross", "no node has id or title 'Nope'"),
    ([Axis("Sampler.sead", [1])], "cross", "Sampler has no param 'sead'"),
    ([Axis("Sampler.steps", ["0"])], "cross", "below the minimum"),
    ([Axis("Sampler.seed", ["x"])], "cross", "'x' is not a whole number"),
    ([parse_axis("Sampler.seed=a..b")], "cross", "'a..b' is not a whole number"),
    ([Axis("Sampler.scheduler", ["eulr"])], "cross", "is not one of"),
    ([Axis("Sampler.seed", [1, 2]), Axis("Sampler.cfg", [3.0])], "zip", "the same number of values"),
    ([Axis("Sampler.seed", [1]), Axis("Sampler.seed", [2])], "cross", "swept twice"),
    ([], "cross", "no axes"),
])
def test_sweep_is_checked_against_the_declarations(axes, mode, words):
    with pytest.raises(SweepError) as info:
        resolve(Sweep(axes, mode), _graph())
    assert words in str(info.value)


def test_values_are_typed_by_the_param_and_crossed_or_zipped():
    g = _graph()
    axes = resolve(Sweep([Axis("Sampler.seed", ["1", 2]), Axis("Sampler.cfg", [3, "4.5"])]), g)
    assert axes[0].values == [1, 2] and axes[1].values == [3.0, 4.5]
    assert all(type(v) is float for v in axes[1].values)
    plan = plan_batch(str(DEFAULT), Sweep([Axis("Sampler.seed", [1, 2]), Axis("Sampler.cfg", [3.0, 4.0])]))
    assert [j.overrides for j in plan.jobs] == [{"Sampler.seed": 1, "Sampler.cfg": 3.0},
                                                 {"Sampler.seed": 1, "Sampler.cfg": 4.0},
                                                 {"Sampler.seed": 2, "Sampler.cfg": 3.0},
                                                 {"Sampler.seed": 2, "Sampler.cfg": 4.0}]
    zipped = plan_batch(str(DEFAULT), Sweep([Axis("Sampler.seed", [1, 2]), Axis("Sampler.cfg", [3.0, 4.0])], "zip"))
    assert [j.overrides for j in zipped.jobs] == [{"Sampler.seed": 1, "Sampler.cfg": 3.0},
                                                   {"Sampler.seed": 2, "Sampler.cfg": 4.0}]
    assert len({j.key for j in plan.jobs}) == 4  # each job its own cache key


def test_every_job_graph_is_validated_before_anything_runs():
    # a lone surrogate passes String's check, but no file (or PNG) can hold it: validation's
    with pytest.raises(SweepError, match=r"job 1 \(Prompt\.text='bad .*'\): Prompt \[c6b27551\]: .*lone surrogate"):
        plan_batch(str(DEFAULT), Sweep([Axis("Prompt.text", ["a red circle", "bad \ud800"])]))


def test_sweep_kept_in_meta_or_beside_the_graph(tmp_path):
    path = tmp_path / "g.loom"
    path.write_text(DEFAULT.read_text())
    sweep = Sweep([parse_axis("Sampler.seed=0..3")])
    save_sweep(sweep, path, "file")
    assert json.loads(sweep_file_for(path).read_text())["axes"] == [{"param": "Sampler.seed", "values": [0, 1, 2, 3]}]
    assert stored_sweep(load(path, registry.get), path).as_dict() == sweep.as_dict()
    sweep_file_for(path).unlink()
    assert stored_sweep(load(path, registry.get), path) is None
    save_sweep(Sweep([parse_axis("Sampler.cfg=1,2")], "zip"), path, "meta")
    again = stored_sweep(load(path, registry.get), path)
    assert again.mode == "zip" and again.axes[0].values == ["1", "2"]
    assert resolve(again, load(path, registry.get))[0].values == [1.0, 2.0]


# -- running: outputs, manifest, resume, retries ---------------------------------------------
def test_jobs_write_pngs_with_graph_and_overrides_and_a_manifest(tmp_path, backend):
    plan = plan_batch(str(DEFAULT), Sweep([parse_axis("Sampler.seed=3..4")]), FAST)
    res = run_batch(plan, tmp_path / "out", backend)
    assert res.ok and res.ran == 2 and res.counts["done"] == 2
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    for rec, seed in zip(manifest["jobs"], (3, 4)):
        assert rec["status"] == "done" and rec["overrides"] == {"Sampler.seed": seed} and rec["attempts"] == 1
        assert len(rec["outputs"]) == 1 and rec["key"] == plan.jobs[rec["index"]].key
        graph = json.loads(read_graph_text(tmp_path / "out" / rec["outputs"][0]))
        sampler = next(n for n in graph["nodes"] if n["type"] == "Sampler")
        assert sampler["params"]["seed"] == seed and sampler["params"]["steps"] == 2
        assert graph["meta"]["batch"]["overrides"] == {"Sampler.seed": seed}
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["counts"]["done"] == 2 and [j["status"] for j in results["jobs"]] == ["done", "done"]
    from PIL import Image

    with Image.open(tmp_path / "out" / "contact_sheet.png") as sheet:
        assert sheet.size == (2 * 128, 128 + 18)  # two columns of one row, captioned
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_interrupted_sweep_resumes_with_only_the_missing_jobs(tmp_path, backend):
    plan = plan_batch(str(DEFAULT), Sweep([parse_axis("Sampler.seed=0..4")]), FAST)
    seen = []

    def ctrl_c_after_two(kind, rec, manifest):
        if kind == "done":
            seen.append(rec["index"])
            if len(seen) == 2:
                raise KeyboardInterrupt

    first = run_batch(plan, tmp_path / "out", backend, on_event=ctrl_c_after_two)
    assert first.interrupted and first.counts == {"pending": 3, "running": 0, "done": 2, "failed": 0}
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "images").iterdir()}
    assert len(kept) == 2
    again = []
    second = run_batch(plan, tmp_path / "out", backend,
                       on_event=lambda kind, rec, m: kind == "started" and again.append(rec["index"]))
    assert second.ok and second.skipped == 2 and second.ran == 3
    assert sorted(again) == [2, 3, 4]
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished work untouched
    assert len(list((tmp_path / "out" / "images").iterdir())) == 5
    third = run_batch(plan, tmp_path / "out", backend)
    assert third.ran == 0 and third.skipped == 5


def test_failed_job_is_retried_on_rerun_up_to_the_limit(tmp_path, backend):
    missing = str(tmp_path / "no-such-model")
    plan = plan_batch(str(DEFAULT), Sweep([Axis("Load ShapesT2I.path", ["builtin:shapes-t2i", missing])]), FAST)
    attempts = []
    for _ in range(3):
        res = run_batch(plan, tmp_path / "out", backend, max_attempts=2, sheet=False)
        attempts.append([r["attempts"] for r in res.records])
        assert [r["status"] for r in res.records] == ["done", "failed"]
    assert attempts == [[1, 1], [1, 2], [1, 2]]  # retried once, then given up without a run
    assert "Load ShapesT2I" in res.records[1]["error"]
    assert res.ran == 0


def test_contact_sheet_of_two_crossed_axes_is_a_labelled_table(tmp_path, backend):
    from PIL import Image

    plan = plan_batch(str(DEFAULT), Sweep([parse_axis("Sampler.seed=0..1"), parse_axis("Sampler.cfg=3,5,7")]),
                      ["Sampler.steps=1"])
    res = run_batch(plan, tmp_path / "out", backend)
    assert res.ok
    with Image.open(tmp_path / "out" / "contact_sheet.png") as sheet:
        assert sheet.size == (64 + 8 + 3 * 128, 18 + 2 * 128)
        # the cell of seed 1, cfg 7 holds that job's image (scaled from 256 to 128 pixels)
        with Image.open(tmp_path / "out" / res.records[5]["outputs"][0]) as img:
            want = img.convert("RGB").resize((128, 128), Image.LANCZOS)
        got = sheet.crop((72 + 2 * 128, 18 + 128, 72 + 3 * 128, 18 + 2 * 128))
        assert got.tobytes() == want.tobytes()


# -- the command -----------------------------------------------------------------------------
def _cli(*args, extra_code=""):
    code = (f"import sys; {extra_code}\nfrom app.main import main\nsys.exit(main({list(args)!r}))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def test_ray_address_without_ray_says_what_to_install(tmp_path):
    proc = _cli("batch", str(DEFAULT), "--sweep", "Sampler.seed=0..1", "--cluster", "ray://127.0.0.1:1",
                "--out", str(tmp_path / "o"), extra_code="sys.modules['ray'] = None  # as if not installed")
    assert proc.returncode == 2, proc.stderr
    assert "pip install loomwork[cluster]" in proc.stderr and proc.stderr.startswith("error: ")


def test_cli_errors_are_one_line(tmp_path):
    from app.cli import main

    out = str(tmp_path / "o")
    assert main(["batch", str(DEFAULT), "--sweep", "Sampler.sead=1..2", "--out", out]) == 2
    assert main(["batch", str(DEFAULT), "--out", out]) == 2  # no sweep given or stored
    assert main(["batch", str(DEFAULT), "--sweep", "Sampler.seed=1..2", "--cluster", "slurm", "--out", out]) == 2
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / MANIFEST_NAME).write_text("{broken")
    assert main(["batch", str(DEFAULT), "--sweep", "Sampler.seed=1..2", "--out", out]) == 2
