"""Reliability and safety: each defect a probe found, pinned by a regression test.

Writes stay in the output folder; huge numbers, deep nesting and misspelt keys load as clean
errors or are kept; big graphs validate in linear time; pipes and folders are refused; strings
no file can hold are found before a run; cancel is reported; no loader unpickles a file; an
unknown command never starts Qt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from app.engine import Executor
from app.graph import Graph, GraphFileError, dumps, load, loads, save, validate
from app.graph.png import png_bytes
from nodes import registry
from nodes.registry import add_node

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _private_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOMWORK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LOOMWORK_ERASER_DIR", str(tmp_path / "erasers"))


def _image_file(folder: Path) -> Path:
    path = folder / "in.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


def _save_graph(image: Path, **save_params) -> tuple[Graph, str]:
    g = Graph()
    src = add_node(g, "LoadImage", {"path": str(image)}, title="Load")
    out = add_node(g, "SaveImage", {"prefix": "out", **save_params}, title="Save", pos=(200, 0))
    g.connect(src.id, "image", out.id, "image")
    return g, out.id


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


# -- 1. writes stay inside the output folder ------------------------------------------------
@pytest.mark.parametrize("folder", ["../../escaped", "ABSOLUTE", "~/escaped"])
def test_save_image_refuses_a_folder_outside_the_output_folder(tmp_path, monkeypatch, folder):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    out = tmp_path / "work" / "a" / "out"
    out.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    folder = str(elsewhere) if folder == "ABSOLUTE" else folder
    g, save_id = _save_graph(_image_file(tmp_path), folder=folder)
    before = _files_under(tmp_path)
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=out)
    error = report.nodes[save_id].error
    assert report.status(save_id) == "failed" and "refused to write" in error
    assert "Save [" in error and folder in error  # names the node and the path
    assert _files_under(tmp_path) == before  # nothing written anywhere


@pytest.mark.parametrize("folder", ["a\x00b", "x\udfffy"])
def test_a_folder_no_system_can_name_is_a_node_error(tmp_path, folder):
    g, save_id = _save_graph(_image_file(tmp_path), folder=folder)
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path / "out")
    assert report.status(save_id) == "failed" and report.nodes[save_id].traceback is None


def test_save_image_writes_a_relative_folder_inside_the_output_folder(tmp_path):
    out = tmp_path / "out"
    g, save_id = _save_graph(_image_file(tmp_path), folder="renders/today")
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=out)
    assert report.ok, report.nodes[save_id].error
    [written] = report.outputs()
    assert Path(written).parent == (out / "renders" / "today").resolve()


def test_a_symlink_in_the_output_folder_does_not_lead_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (out / "link").symlink_to(tmp_path / "elsewhere")
    g, save_id = _save_graph(_image_file(tmp_path), folder="link")
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=out)
    assert "refused to write" in report.nodes[save_id].error
    assert not list((tmp_path / "elsewhere").iterdir())


def test_folders_the_user_allowed_may_be_written(tmp_path):
    picked = tmp_path / "picked"
    g, save_id = _save_graph(_image_file(tmp_path), folder=str(picked))
    for ex, extra in ((Executor(device="cpu", disk_cache=False, write_dirs=[picked]), []),
                      (Executor(device="cpu", disk_cache=False), [picked])):
        report = ex.run(g, output_dir=tmp_path / "out", write_dirs=extra)
        assert report.ok, report.nodes[save_id].error
        assert all(Path(p).parent == picked for p in report.outputs())


def test_a_graph_in_a_shared_png_cannot_write_outside(tmp_path, capsys):
    from app.cli import main

    g, _ = _save_graph(_image_file(tmp_path), folder=str(tmp_path / "victim"))
    evil = tmp_path / "evil.png"
    evil.write_bytes(png_bytes(Image.new("RGB", (4, 4)), dumps(g)))
    out = tmp_path / "out"
    assert main(["run", str(evil), "--out", str(out), "--no-disk-cache"]) == 1
    err = capsys.readouterr().err
    assert "refused to write" in err and str(tmp_path / "victim") in err
    assert not (tmp_path / "victim").exists()


def _eraser_save_graph(model, **save_params):
    from conftest import eraser_graph

    g, ids = eraser_graph(model, ("ClosedFormErase", {"concept": "circle", "anchor": "square",
                                                      "target": "text_encoder"}))
    save_node = add_node(g, "SaveEraser", save_params, title="SaveE")
    g.connect(ids["erasers"][0], "clip", save_node.id, "clip")
    return g, save_node.id


def test_save_eraser_name_cannot_leave_the_erasers_folder(tiny_pixel_model, tmp_path):
    g, sid = _eraser_save_graph(tiny_pixel_model, name="../../../escaped")
    problems = [p.message for p in validate(g, registry.get) if p.node_id == sid]
    assert problems and "plain file name" in problems[0]
    report = Executor(device="cpu", disk_cache=False).run(g, targets=[sid], output_dir=tmp_path / "out")
    assert report.status(sid) == "failed" and "plain file name" in report.nodes[sid].error
    assert not list(tmp_path.rglob("escaped*"))


def test_save_eraser_folder_outside_is_refused_inside_is_written(tiny_pixel_model, tmp_path):
    ex = Executor(device="cpu", disk_cache=False)
    g, sid = _eraser_save_graph(tiny_pixel_model, name="e", folder=str(tmp_path / "victim"))
    report = ex.run(g, targets=[sid], output_dir=tmp_path / "out")
    assert "refused to write" in report.nodes[sid].error and "SaveE [" in report.nodes[sid].error
    assert not (tmp_path / "victim").exists()
    g, sid = _eraser_save_graph(tiny_pixel_model, name="e", folder="sub")
    report = ex.run(g, targets=[sid], output_dir=tmp_path / "out")
    assert report.ok, report.nodes[sid].error
    assert (tmp_path / "erasers" / "sub" / "e.safetensors").is_file()


def test_red_team_report_outside_the_output_folder_is_refused(tiny_pixel_model, tmp_path):
    from conftest import eraser_graph

    g, ids = eraser_graph(tiny_pixel_model)
    rt = add_node(g, "RedTeamPrompt", {"prompt": "a red circle", "tokens": 1, "steps": 1, "samples": 1,
                                       "sample_steps": 1, "report": str(tmp_path / "victim.json")})
    for port, src in (("model", "model"), ("clip", "clip"), ("original_model", "model"), ("original_clip", "clip")):
        g.connect(ids["load"], src, rt.id, port)
    report = Executor(device="cpu", disk_cache=False).run(g, targets=[rt.id], output_dir=tmp_path / "out")
    assert "refused to write" in report.nodes[rt.id].error
    assert not (tmp_path / "victim.json").exists()


# -- 3. huge numbers, deep nesting: the loader's own error, naming node and field ------------
def _doc(node: dict, **top) -> str:
    """A one-node file; the string "DIGITS:N" stands for an integer of N digits (written as
    text, since Python will not make one of more than 4,300 digits from text)."""
    base = {"id": "n1", "type": "Sampler", "version": 2, "params": {}}
    text = json.dumps({"format": "loomwork.graph", "version": 2, "nodes": [{**base, **node}], **top})
    return re.sub(r'"DIGITS:(-?)(\d+)"', lambda m: m.group(1) + "9" * int(m.group(2)), text)


@pytest.mark.parametrize("text, words", [
    (_doc({"pos": [10**400, 0]}), ["n1", "pos", "two numbers", "digits"]),
    (_doc({"params": {"seed": "DIGITS:5000"}}), ["node n1 (Sampler)", "params.seed", "5,000 digits"]),
    (_doc({"pos": ["DIGITS:-4400", 1]}), ["node n1 (Sampler)", "pos", "4,400 digits"]),
    (_doc({}, meta={"x": ["DIGITS:4301"]}), ["meta.x", "4,301 digits"]),
    (_doc({"params": {"boxes": json.loads("[" * 150 + "]" * 150)}}),
     ["node n1 (Sampler)", "params.boxes", "nested"]),
])
def test_huge_or_deep_values_are_graph_file_errors_naming_where(text, words):
    with pytest.raises(GraphFileError) as info:
        loads(text, registry.get)
    message = str(info.value)
    assert all(w in message for w in words), message
    assert len(message) < 500


def test_a_huge_float_param_is_a_validation_problem_not_a_crash():
    g = loads(_doc({"params": {"cfg": 10**400, "denoise": -(10**309)}}), registry.get)
    messages = [p.message for p in validate(g, registry.get)]
    assert any("'cfg'" in m and "float can hold" in m for m in messages), messages
    assert any("'denoise'" in m and "float can hold" in m for m in messages), messages
    assert all(len(m) < 300 for m in messages)
    big_int = loads(_doc({"params": {"steps": "DIGITS:4000"}}), registry.get)
    [steps] = [p.message for p in validate(big_int, registry.get) if "'steps'" in p.message]
    assert "above the maximum" in steps and len(steps) < 300


# -- 4. big graphs validate in linear time; pipes and folders --------------------------------
class _CountingList(list):
    """A list of edges that counts full passes over it."""

    passes = 0

    def __iter__(self):
        type(self).passes += 1
        return super().__iter__()


def _chain_graph(n: int, cycle: bool = False) -> Graph:
    g = Graph()
    ids = [add_node(g, "ImageScale", {}, pos=(i % 7, i // 7)).id for i in range(n)]
    first = add_node(g, "LoadImage", {"path": "x.png"}, pos=(-1, 0))
    g.connect(first.id, "image", ids[0], "image")
    for a, b in zip(ids, ids[1:]):
        g.connect(a, "image", b, "image")
    if cycle:  # the last nodes feed back into the 10th from the end
        g.disconnect(ids[-10], "image")
        g.connect(ids[-1], "image", ids[-10], "image")
    return g


def test_validation_reads_the_wires_a_fixed_number_of_times_whatever_the_size():
    passes = {}
    for n in (100, 2000):
        g = _chain_graph(n)
        g.edges = _CountingList(g.edges)
        _CountingList.passes = 0
        assert validate(g, registry.get) == []
        passes[n] = _CountingList.passes
    assert passes[2000] == passes[100] and passes[100] < 10, passes


def test_twenty_thousand_nodes_with_a_cycle_validate_and_name_the_cycle():
    g = _chain_graph(20_000, cycle=True)
    problems = validate(g, registry.get)
    on_cycle = [p for p in problems if "is on a cycle" in p.message]
    assert len(on_cycle) == 10 and len(problems) == 10
    assert all(len(p.message) < 1000 for p in problems)  # ten names, not twenty thousand


def test_a_self_wire_from_a_file_is_on_a_cycle():
    g = _chain_graph(3)
    last = list(g.nodes)[2]
    g.edges = [e for e in g.edges if e.dst != last]
    g2 = loads(dumps(g), registry.get)
    g2.edges.append(type(g2.edges[0])(last, "image", last, "image"))
    problems = [p.message for p in validate(g2, registry.get) if p.node_id == last]
    assert any("is on a cycle" in m for m in problems), problems


def _finishes(fn, seconds=60):
    """fn() run in a thread that must end within `seconds`; its result, or its exception raised."""
    result = {}

    def call():
        try:
            result["value"] = fn()
        except BaseException as exc:  # handed to the test's thread
            result["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "hung"
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_by_load_image_and_by_the_graph_loader(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    g = Graph()
    src = add_node(g, "LoadImage", {"path": str(fifo)}, title="Load")
    prev = add_node(g, "PreviewImage", {}, pos=(100, 0))
    g.connect(src.id, "image", prev.id, "image")
    report = _finishes(lambda: Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path))
    assert "not a regular file" in report.nodes[src.id].error
    with pytest.raises(GraphFileError, match="not a regular file"):
        _finishes(lambda: load(fifo, registry.get))


def test_load_image_of_a_folder_is_a_clear_node_error(tmp_path):
    g = Graph()
    src = add_node(g, "LoadImage", {"path": str(tmp_path)}, title="Load")
    prev = add_node(g, "PreviewImage", {}, pos=(100, 0))
    g.connect(src.id, "image", prev.id, "image")
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path)
    error = report.nodes[src.id].error
    assert "is a folder" in error and "FileNotFoundError" not in error and report.nodes[src.id].traceback is None


# -- 5. text no file can hold is found before the run; messages stay short -------------------
def test_a_lone_surrogate_in_a_title_is_found_by_validation(tmp_path):
    g, save_id = _save_graph(_image_file(tmp_path))
    text = dumps(g).replace('"title": "Save"', '"title": "Sa\\udfffve"')
    g = loads(text, registry.get)
    [problem] = [p.message for p in validate(g, registry.get) if p.node_id == save_id]
    assert "title" in problem and "surrogate" in problem
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path / "out")
    assert report.status(save_id) == "failed" and "surrogate" in report.nodes[save_id].error
    assert not (tmp_path / "out").exists()


def test_a_fifty_megabyte_prefix_is_refused_before_the_run_in_a_short_message(tmp_path):
    g, save_id = _save_graph(_image_file(tmp_path), prefix="p" * (50 << 20))
    g.nodes[save_id].title = "t" * (50 << 20)
    [problem] = [p.message for p in validate(g, registry.get) if p.node_id == save_id]
    assert "52428800 bytes" in problem and len(problem) < 300
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path / "out")
    assert report.status(save_id) == "failed" and len(report.nodes[save_id].error) < 2100


def test_graph_file_errors_are_capped():
    with pytest.raises(GraphFileError) as info:
        loads(json.dumps({"format": "x" * (10 << 20)}))
    assert len(str(info.value)) < 2500


# -- 6. a canvas batch of N is N single runs, seed + k -------------------------------------
@pytest.mark.parametrize("family, scheduler", [
    (family, scheduler) for family in ("tiny_pixel_model", "tiny_latent_model", "builtin:shapes-t2i")
    for scheduler in ("euler", "euler_ancestral")] + [("tiny_flow_model", "flow_match_euler")])
def test_a_batch_of_two_at_32_is_two_single_runs_with_seed_plus_k(request, family, scheduler):
    from conftest import CAPTURED, txt2img_graph

    model = family if family.startswith("builtin:") else request.getfixturevalue(family)
    ex = Executor(device="cpu", disk_cache=False)

    def latent(seed: int, batch: int) -> torch.Tensor:
        g, ids = txt2img_graph(model, size=32, steps=2, seed=seed, batch=batch, save=False, scheduler=scheduler)
        cap = add_node(g, "TestCaptureLatent", {})
        g.connect(ids["sampler"], "latent", cap.id, "latent")
        report = ex.run(g)
        assert report.ok, [r.error for r in report.nodes.values() if r.error]
        return CAPTURED.pop("latent")

    both = latent(7, 2)
    assert both.shape[0] == 2
    for k in range(2):
        # a batch sums its matmuls in another order: equal to float rounding (ShapesT2I: up to 3e-4
        # of values near 1.5; another seed rule would differ by O(1))
        assert torch.allclose(both[k:k + 1], latent(7 + k, 1), atol=1e-3), k


# -- 7. cancel before the start --------------------------------------------------------------
def test_cancel_before_start_is_reported_as_cancelled(tmp_path):
    g, save_id = _save_graph(_image_file(tmp_path))
    cancel = threading.Event()
    cancel.set()
    report = Executor(device="cpu", disk_cache=False).run(g, cancel=cancel, output_dir=tmp_path / "out")
    assert all(r.error == "cancelled" for r in report.nodes.values())
    assert report.cancelled and report.as_json()["cancelled"] is True and not report.ok


# -- 8. no loader unpickles a file -----------------------------------------------------------
class _Marker:
    """Unpickling this creates a file: the proof that a pickle ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _marker_pickle(file: Path, marker: Path) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": _Marker(marker)}, file)
    # The marker works: a free unpickling does create the file.
    probe = marker.with_name(marker.name + ".probe")
    torch.save({"weight": _Marker(probe)}, file.with_name(file.name + ".probe"))
    torch.load(file.with_name(file.name + ".probe"), weights_only=False)
    assert probe.exists()
    probe.unlink()
    file.with_name(file.name + ".probe").unlink()
    return file


def _model_folder_with(tmp_path, tiny_pixel_model, component: str, weights: str, index_entry=None) -> str:
    folder = tmp_path / "model"
    shutil.copytree(tiny_pixel_model, folder)
    if index_entry is not None:
        index = json.loads((folder / "model_index.json").read_text())
        index[component] = index_entry
        (folder / "model_index.json").write_text(json.dumps(index))
        shutil.rmtree(folder / component)
        (folder / component).mkdir()
        (folder / component / "config.json").write_text((Path(tiny_pixel_model) / "text_encoder" / "config.json").read_text())
    for f in (folder / component).glob("*.safetensors"):
        f.unlink()
    _marker_pickle(folder / component / weights, tmp_path / "marker")
    return str(folder)


@pytest.mark.parametrize("component, weights, entry", [
    ("unet", "diffusion_pytorch_model.bin", None),
    ("text_encoder", "pytorch_model.bin", None),
    ("tokenizer", "pytorch_model.bin", ["transformers", "CLIPTextModel"]),  # a model in the tokenizer slot
])
def test_model_folder_pickles_are_never_unpickled(tmp_path, tiny_pixel_model, component, weights, entry):
    from kernels.models import ModelLoadError, load_model_folder

    folder = _model_folder_with(tmp_path, tiny_pixel_model, component, weights, entry)
    with pytest.raises(ModelLoadError, match="pickles") as info:
        load_model_folder(folder)
    assert component in str(info.value)
    assert not (tmp_path / "marker").exists()


def test_a_pipeline_class_in_a_component_slot_is_refused(tmp_path, tiny_pixel_model):
    from kernels.models import ModelLoadError, load_model_folder

    folder = tmp_path / "model"
    shutil.copytree(tiny_pixel_model, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["diffusers", "StableDiffusionPipeline"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="not a model or tokenizer class"):
        load_model_folder(str(folder))


@pytest.mark.parametrize("name", ["lora.pt", "lora.safetensors"])
def test_lora_pickles_are_never_unpickled(tmp_path, name):
    from kernels.adapters.lora import LoraFileError, read_lora_file

    path = _marker_pickle(tmp_path / name, tmp_path / "marker")
    with pytest.raises(LoraFileError, match="lora"):
        read_lora_file(str(path))
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("name", ["x4.pth", "x4.safetensors"])
def test_upscaler_pickles_are_never_unpickled(tmp_path, name):
    from kernels.upscale.model_upscale import UpscaleModelError, read_state_dict

    path = _marker_pickle(tmp_path / name, tmp_path / "marker")
    with pytest.raises(UpscaleModelError) as info:
        read_state_dict(str(path))
    assert str(path) in str(info.value)
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("name", ["e.safetensors", "e.pt"])
def test_eraser_pickles_are_never_unpickled(tmp_path, name):
    from kernels.erasers import EraserFileError, load_erasers

    path = _marker_pickle(tmp_path / name, tmp_path / "marker")
    with pytest.raises(EraserFileError, match="safetensors"):
        load_erasers(str(path))
    assert not (tmp_path / "marker").exists()


def test_ip_adapter_pickles_are_never_unpickled(tmp_path):
    from kernels.adapters.ip_adapter import IPAdapterError, load_image_encoder, read_ip_adapter_file

    adapter = _marker_pickle(tmp_path / "ip-adapter.bin", tmp_path / "marker")
    with pytest.raises(IPAdapterError, match="pickle"):
        read_ip_adapter_file(str(adapter))
    encoder = tmp_path / "encoder"
    _marker_pickle(encoder / "pytorch_model.bin", tmp_path / "marker")
    (encoder / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(IPAdapterError, match="model.safetensors"):
        load_image_encoder(str(encoder))
    assert not (tmp_path / "marker").exists()


def _controlnet_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "cn"
    _marker_pickle(folder / "diffusion_pytorch_model.bin", tmp_path / "marker")
    (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    return folder


@pytest.mark.parametrize("what", ["controlnet file", "controlnet as safetensors", "controlnet folder",
                                  "checkpoint", "checkpoint as safetensors", "vae"])
def test_controlnet_checkpoint_and_vae_pickles_are_never_unpickled(tmp_path, what):
    from kernels.adapters.controlnet import ControlNetError, load_control_net
    from kernels.models import ModelLoadError
    from kernels.single_file import load_checkpoint_file, load_vae_file

    marker = tmp_path / "marker"
    load, path = {
        "controlnet file": (load_control_net, lambda: _marker_pickle(tmp_path / "cn.pth", marker)),
        "controlnet as safetensors": (load_control_net, lambda: _marker_pickle(tmp_path / "cn.safetensors", marker)),
        "controlnet folder": (load_control_net, lambda: _controlnet_folder(tmp_path)),
        "checkpoint": (load_checkpoint_file, lambda: _marker_pickle(tmp_path / "m.ckpt", marker)),
        "checkpoint as safetensors": (load_checkpoint_file, lambda: _marker_pickle(tmp_path / "m.safetensors", marker)),
        "vae": (lambda p: load_vae_file(p, "sd1"), lambda: _marker_pickle(tmp_path / "vae.pt", marker)),
    }[what]
    path = str(path())
    with pytest.raises((ControlNetError, ModelLoadError)) as info:
        load(path)
    assert path in str(info.value)
    assert not marker.exists()


# -- 9. an unknown command never starts Qt ---------------------------------------------------
def _loomwork(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO), "QT_QPA_PLATFORM": "offscreen"}
    env.pop("DISPLAY", None)
    return subprocess.run([sys.executable, "-m", "app.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, words", [
    (["bake", "--help"], ["'bake' is not a command", "run"]),
    (["missing.loom"], ["missing.loom: no such file"]),
    (["some/where/graph"], ["no such file"]),
])
def test_unknown_command_or_missing_file_is_one_error_line_without_qt(args, words):
    proc = _loomwork(*args)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(w in lines[0] for w in words), lines
    assert proc.stdout == ""


def test_the_dispatch_never_imports_qt_for_an_unknown_word():
    code = ("import sys; from app.main import main; rc = main(['bake']); "
            "print(rc, 'PySide6' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr


# -- 10. unknown keys are kept ---------------------------------------------------------------
def test_misspelt_and_unknown_keys_round_trip(tmp_path):
    text = json.dumps({"format": "loomwork.graph", "version": 2, "future": {"a": 1},
                       "nodes": [{"id": "n1", "type": "Sampler", "version": 2, "ti<le": "My sampler",
                                  "params": {}, "pos": [0, 0]}],
                       "groups": [{"id": "g1", "nodes": ["n1"], "colour": "#fff"}]})
    g = loads(text, registry.get)
    assert g.nodes["n1"].extra == {"ti<le": "My sampler"}
    path = tmp_path / "g.loom"
    save(g, path)
    again = json.loads(path.read_text())
    assert again["nodes"][0]["ti<le"] == "My sampler" and again["future"] == {"a": 1}
    assert again["groups"][0]["colour"] == "#fff"
    assert load(path, registry.get).nodes["n1"].extra == {"ti<le": "My sampler"}


@pytest.mark.parametrize("node_type, param", [("LoadLoRA", "path"), ("LoadUpscaleModel", "path"),
                                              ("LoadEraser", "path"), ("LoadVAE", "path"),
                                              ("LoadControlNet", "path"), ("LoadModel", "path")])
def test_no_loader_opens_a_pipe(tmp_path, tiny_pixel_model, node_type, param):
    """A FIFO as any path param fails its node at once (opening one waits for a writer forever)."""
    import os
    import threading

    from app.engine import Executor
    from app.graph import Graph
    from nodes.registry import add_node

    fifo = tmp_path / "weights.safetensors"
    os.mkfifo(fifo)
    from nodes.registry import get

    g = Graph()
    node = add_node(g, node_type, {param: str(fifo)})
    if set(get(node_type).inputs) & {"model", "clip"}:  # wired to a tiny model, so only the path is wrong
        load = add_node(g, "LoadModel", {"path": tiny_pixel_model})
        for port in set(get(node_type).inputs) & {"model", "clip"}:
            g.connect(load.id, port, node.id, port)
    result = {}

    def run():
        result["report"] = Executor(device="cpu", disk_cache=False).run(g, targets=[node.id], output_dir=tmp_path)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the node opened the pipe"
    error = result["report"].nodes[node.id].error
    assert "pipe, socket or device" in error and "weights.safetensors" in error
