"""The model manager's budgets: LRU dropping, what the running graph holds, models over the
budget, size accounting, budget settings, and bf16 renders on the tiny models."""

import gc
import logging
import weakref

import pytest
import torch

from app.engine import EngineEvents, Executor
from app.engine.models import ModelManager
from kernels.memory import (
    BudgetError,
    budget_from_env,
    estimate_model_bytes,
    format_bytes,
    lru_victims,
    module_bytes,
    modules_in,
    parse_bytes,
    plan_placement,
    tensor_bytes,
    weight_files,
)
from kernels.models import ModelLoadError, load_model_folder


@pytest.fixture(scope="module")
def three_models(tmp_path_factory):
    from kernels.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("memory")
    return [build_tiny_model(str(root / f"m{i}"), seed=i) for i in range(3)]


def model_bytes(path, dtype=torch.float32) -> int:
    return sum(module_bytes(modules_in(load_model_folder(path, dtype, "cpu"))).values())


def sources(manager):
    return [m["source"] for m in manager.usage()["models"]]


# -- dropping ------------------------------------------------------------------------------

def test_models_past_the_ram_budget_are_dropped_least_recently_used_first(three_models):
    a, b, c = three_models
    size = model_bytes(a)
    manager = ModelManager("cpu", ram_budget=int(size * 2.5))
    first = manager.load(a, "float32", load_model_folder)
    manager.load(b, "float32", load_model_folder)
    assert manager.load(a, "float32", load_model_folder) is first  # a hit, and now the newest
    manager.load(c, "float32", load_model_folder)
    assert sources(manager) == [a, c]  # b was the least recently used
    assert manager.loads == 3 and manager.drops == 1
    assert manager.ram_used() <= manager.ram_budget
    manager.load(b, "float32", load_model_folder)
    assert sources(manager) == [c, b] and manager.loads == 4


def test_using_a_model_in_a_node_makes_it_the_most_recent(three_models):
    a, b, c = three_models
    manager = ModelManager("cpu", ram_budget=int(model_bytes(a) * 2.5))
    model_a = manager.load(a, "float32", load_model_folder)[0]
    manager.load(b, "float32", load_model_folder)
    manager.prepare({"model": model_a.with_patch(object())})  # a patched bundle shares the UNet
    manager.load(c, "float32", load_model_folder)
    assert sources(manager) == [a, c]


def test_sizes_are_measured_and_estimated_from_the_headers(three_models):
    a = three_models[0]
    manager = ModelManager("cpu", ram_budget="1G")
    value = manager.load(a, "float32", load_model_folder)
    measured = manager.usage()["models"][0]["bytes"]["cpu"]
    params = sum(p.numel() * p.element_size() for m in modules_in(value) for p in m.parameters())
    assert measured >= params and measured == manager.ram_used()
    for dtype in (torch.float32, torch.bfloat16):
        estimate = estimate_model_bytes(a, dtype)
        assert abs(estimate.bytes - model_bytes(a, dtype)) < 1024  # unsaved buffers only
        assert estimate.file_backed == (dtype == torch.float32)  # the files store float32
    assert estimate_model_bytes(a, torch.bfloat16).bytes * 2 == estimate_model_bytes(a, torch.float32).bytes


def test_estimate_reads_the_files_a_load_reads(tmp_path):
    import json

    from safetensors.torch import save_file

    (tmp_path / "model_index.json").write_text(json.dumps({
        "unet": ["diffusers", "UNet2DConditionModel"], "safety_checker": ["x", "y"],
        "text_encoder_3": [None, None]}))
    for name in ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                 "safety_checker/model.safetensors", "text_encoder_3/model.safetensors"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        save_file({"w": torch.zeros(10, 10), "step": torch.zeros(3, dtype=torch.int64)}, str(tmp_path / name))
    assert weight_files(str(tmp_path)) == [str(tmp_path / "unet/diffusion_pytorch_model.safetensors")]
    estimate = estimate_model_bytes(str(tmp_path), torch.float16)
    assert estimate.bytes == 100 * 2 + 3 * 8 and not estimate.file_backed


def test_dropped_model_leaves_the_executor_and_its_memory_is_freed(three_models, tmp_path):
    from conftest import txt2img_graph

    a, b, _ = three_models
    executor = Executor(device="cpu", disk_cache=False, ram_budget=int(model_bytes(a) * 1.5))
    graph_a, ids_a = txt2img_graph(a, steps=2)
    graph_b, _ = txt2img_graph(b, steps=2)
    images = []
    events = EngineEvents(images=lambda nid, im, paths: images.append(im))
    assert executor.run(graph_a, events=events, output_dir=tmp_path).ok
    unet_a = weakref.ref(executor.models.load(a, "float32", load_model_folder)[0].unet)
    assert executor.run(graph_b, output_dir=tmp_path).ok
    gc.collect()
    assert unet_a() is None, "the dropped UNet is still referenced"
    assert sources(executor.models) == [b] and executor.models.drops == 1
    graph_a.set_param(ids_a["sampler"], "seed", 2)  # the sampler needs MODEL again: reloaded
    again = executor.run(graph_a, events=events, output_dir=tmp_path)
    assert again.ok and again.status(ids_a["load"]) == "ran" and executor.models.loads == 3
    fresh = Executor(device="cpu", disk_cache=False)
    assert fresh.run(graph_a, events=events, output_dir=tmp_path).ok
    assert torch.equal(images[1], images[2])


def test_a_model_the_running_graph_holds_is_never_dropped(three_models, tmp_path):
    from conftest import txt2img_graph

    a, b, _ = three_models
    executor = Executor(device="cpu", disk_cache=False, ram_budget=int(model_bytes(a) * 1.5))
    graph, _ = txt2img_graph(a, steps=2)
    other, _ = txt2img_graph(b, steps=2)
    graph.merge(other, offset=(0, 500))
    report = executor.run(graph, output_dir=tmp_path)
    # Both fit only over the budget; float32 files loaded as float32 stay mapped, so both load.
    assert report.ok and executor.models.drops == 0 and sources(executor.models) == [a, b]


def test_no_room_beside_models_in_use_names_them(three_models):
    a, b, _ = three_models
    held = []
    manager = ModelManager("cpu", ram_budget=int(model_bytes(a, torch.bfloat16) * 1.5),
                           in_use=lambda: held)
    held.append(manager.load(a, "bfloat16", load_model_folder))
    with pytest.raises(ModelLoadError, match=f"{b}.*held by models this run uses \\({a}\\)"):
        manager.load(b, "bfloat16", load_model_folder)
    assert sources(manager) == [a] and manager.loads == 1
    held.clear()
    manager.load(b, "bfloat16", load_model_folder)
    assert sources(manager) == [b]


# -- over the budget -----------------------------------------------------------------------

def test_a_model_over_the_budget_that_needs_conversion_is_refused_clearly(three_models):
    a = three_models[0]
    manager = ModelManager("cpu", ram_budget=100_000)
    with pytest.raises(ModelLoadError) as info:
        manager.load(a, "bfloat16", load_model_folder)
    message = str(info.value)
    size = estimate_model_bytes(a, torch.bfloat16).bytes
    assert a in message and "bfloat16" in message and format_bytes(size) in message
    assert format_bytes(100_000) in message and "LOOMWORK_RAM_BUDGET" in message
    assert manager.loads == 0


def test_a_model_over_the_budget_in_its_files_dtype_loads_mapped(three_models, caplog):
    a = three_models[0]
    manager = ModelManager("cpu", ram_budget=100_000)
    with caplog.at_level(logging.WARNING, logger="app.engine.models"):
        model, clip, vae = manager.load(a, "float32", load_model_folder)
    assert "stays mapped" in caplog.text or "stay mapped" in caplog.text
    reference = load_model_folder(a, torch.float32, "cpu")[0].unet
    for (name, p), q in zip(model.unet.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(p, q), name


# -- accounting ----------------------------------------------------------------------------

def test_shared_and_tied_tensors_count_once():
    emb = torch.nn.Embedding(100, 16)
    head = torch.nn.Linear(16, 100, bias=False)
    head.weight = emb.weight  # tied, as language models tie input and output embeddings
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    assert module_bytes([model]) == {"cpu": 100 * 16 * 4}
    assert module_bytes([emb, head, model]) == {"cpu": 100 * 16 * 4}
    base = torch.zeros(1000)
    assert tensor_bytes([base[:600], base[400:]]) == {"cpu": 4000}  # overlapping views
    assert tensor_bytes([base[:100], base[500:600]]) == {"cpu": 800}  # disjoint parts of one storage
    assert tensor_bytes([base[::2]]) == {"cpu": 3996}  # a strided view spans its range
    assert tensor_bytes([torch.empty(10, device="meta"), torch.zeros(3, dtype=torch.float16)]) == {"cpu": 6}


def test_tensors_mapped_from_one_safetensors_file_each_count(tmp_path):
    from safetensors.torch import load_file, save_file

    save_file({"a": torch.ones(256), "b": torch.zeros(128)}, str(tmp_path / "w.safetensors"))
    loaded = load_file(str(tmp_path / "w.safetensors"))
    assert tensor_bytes(loaded.values()) == {"cpu": 384 * 4}


def test_modules_in_finds_each_module_once():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    found = modules_in(({"x": a, "y": [a, b]}, (b, torch.ones(2), "text")))
    assert sorted(map(id, found)) == sorted([id(a), id(b)])


# -- settings ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("12G", 12 << 30), ("12g", 12 << 30), ("12GB", 12 << 30), ("12GiB", 12 << 30),
    ("1.5G", 3 << 29), ("512M", 512 << 20), ("800k", 800 << 10), ("2T", 2 << 40),
    ("123456", 123456), (" 64 MB ", 64 << 20), (4096, 4096)])
def test_budget_sizes_parse(text, expected):
    assert parse_bytes(text, "X") == expected


@pytest.mark.parametrize("text", ["lots", "12X", "-1G", "0", "1.2.3G", "G", 0, -5])
def test_bad_budget_names_the_setting(text):
    with pytest.raises(BudgetError, match="LOOMWORK_RAM_BUDGET"):
        parse_bytes(text, "LOOMWORK_RAM_BUDGET")


def test_budgets_come_from_arguments_then_the_environment_then_the_machine(monkeypatch):
    import psutil

    assert budget_from_env("LOOMWORK_RAM_BUDGET", 7, environ={}) == 7
    assert budget_from_env("LOOMWORK_RAM_BUDGET", 7, environ={"LOOMWORK_RAM_BUDGET": ""}) == 7
    monkeypatch.delenv("LOOMWORK_RAM_BUDGET", raising=False)
    machine = ModelManager("cpu").ram_budget
    assert 0 < machine < psutil.virtual_memory().total
    monkeypatch.setenv("LOOMWORK_RAM_BUDGET", "3G")
    assert ModelManager("cpu").ram_budget == 3 << 30
    assert ModelManager("cpu", ram_budget="1G").ram_budget == 1 << 30
    assert Executor(device="cpu", disk_cache=False, ram_budget=5 << 20).models.ram_budget == 5 << 20
    assert ModelManager("cpu").vram_budget is None  # the CPU has no separate device memory
    monkeypatch.setenv("LOOMWORK_RAM_BUDGET", "twelve gigs")
    with pytest.raises(BudgetError, match="LOOMWORK_RAM_BUDGET: 'twelve gigs' is not a size"):
        ModelManager("cpu")


# -- device placement (the plan; this machine has no GPU to run it on) -----------------------

def test_placement_offloads_the_least_recently_used_components_the_node_does_not_need():
    plan = plan_placement({"unet": 50}, [("clip", 30), ("vae", 20), ("other", 40)], budget=100)
    assert plan.offload == ("clip", "vae") and plan.place == ("unet",) and plan.sequential == ()
    plan = plan_placement({"unet": 50, "clip": 30}, [("clip", 30), ("vae", 20)], budget=100)
    assert plan.offload == () and plan.place == ("unet",)


def test_placement_runs_a_component_bigger_than_the_budget_layer_by_layer():
    plan = plan_placement({"transformer": 240, "vae": 2}, [("t5", 95), ("transformer", 0)], budget=200)
    assert plan.sequential == ("transformer",) and plan.place == ("vae",) and plan.offload == ("transformer",)
    again = plan_placement({"transformer": 240}, [("vae", 2)], budget=200, sequential={"transformer"})
    assert again == type(again)((), (), ())


def test_lru_victims_stop_once_there_is_room():
    entries = [("old", 10), ("mid", 10), ("new", 10)]
    assert lru_victims(entries, used=30, need=5, budget=30) == ["old"]
    assert lru_victims(entries, used=30, need=15, budget=30) == ["old", "mid"]
    assert lru_victims(entries, used=30, need=0, budget=30) == []
    assert lru_victims(entries, used=30, need=50, budget=30) == ["old", "mid", "new"]


# -- dtype ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["tiny_pixel_model", "tiny_latent_model"])
def test_bfloat16_tiny_render(fixture, request, tmp_path):
    from conftest import txt2img_graph

    path = request.getfixturevalue(fixture)
    images = {}
    executor = Executor(device="cpu", disk_cache=False)
    for dtype in ("float32", "bfloat16"):
        graph, ids = txt2img_graph(path, steps=3)
        graph.set_param(ids["load"], "dtype", dtype)
        events = EngineEvents(images=lambda nid, im, paths, dtype=dtype: images.setdefault(dtype, im))
        report = executor.run(graph, events=events, output_dir=tmp_path)
        assert report.ok, report
    assert executor.models.loads == 2  # one entry per dtype
    bf16, fp32 = images["bfloat16"], images["float32"]
    assert torch.isfinite(bf16).all() and bf16.shape == fp32.shape
    assert not torch.equal(bf16, fp32) and (bf16 - fp32).abs().mean() < 0.05
