"""Memory limits of a run: the estimate from declared sizes refuses what cannot fit before it
starts, LoadImage refuses decompression bombs, huge prompts are refused before parsing, big
results stay off the disk cache, and the memory cache accounts for what it holds."""

from __future__ import annotations

import re
import struct
import zlib

import pytest
import torch
from conftest import txt2img_graph

from app.engine import Executor
from app.engine.cache import DiskCache, MemoryCache, Traces
from app.engine.hashing import size_of
from kernels.run_memory import (
    RUN_BUDGET_ENV,
    Estimate,
    Peak,
    Size,
    load_image_estimate,
    max_image_pixels,
    refusal,
    run_budget,
)
from nodes.base import NodeError
from nodes.registry import add_node


def _preview(g, src: str, port: str = "image") -> str:
    node = add_node(g, "PreviewImage", {}, title="Preview", pos=(1000, 0))
    g.connect(src, port, node.id, "image")
    return node.id


# -- the run estimate ------------------------------------------------------------------------
def test_an_8192_canvas_is_refused_before_any_node_runs(tiny_pixel_model, tmp_path):
    g, ids = txt2img_graph(tiny_pixel_model, size=8192, save=False)
    _preview(g, ids["decode"])
    report = Executor(disk_cache=False).run(g, output_dir=tmp_path)
    assert report.sampler_steps == 0
    error = report.nodes[ids["sampler"]].error
    assert report.nodes[ids["sampler"]].status == "failed"
    assert re.match(r"Sampler \[\w+\]: the run would need about ", error)
    assert "1x3x8192x8192" in error and "768.00 MiB" in error and "over the run budget of" in error
    assert RUN_BUDGET_ENV in error
    # nothing else ran: its work would only feed a run that cannot finish
    assert report.ran() == []
    assert report.nodes[ids["empty"]].status == "skipped"
    assert "over its memory budget at Sampler [" in report.nodes[ids["empty"]].error


def test_an_8192_canvas_decoded_and_scaled_16x_is_refused_at_the_scale(tiny_pixel_model, tmp_path):
    g, ids = txt2img_graph(tiny_pixel_model, size=8192, save=False)
    decode = add_node(g, "VAEDecode", {}, title="Decode big", pos=(600, 300)).id
    scale = add_node(g, "ImageScale", {"factor": 16.0, "method": "nearest"}, title="Scale", pos=(800, 300)).id
    g.connect(ids["load"], "vae", decode, "vae")
    g.connect(ids["empty"], "latent", decode, "latent")
    g.connect(decode, "image", scale, "image")
    report = Executor(disk_cache=False, run_budget="64G").run(g, [_preview(g, scale)], output_dir=tmp_path)
    error = report.nodes[scale].error
    assert re.match(r"Scale \[\w+\]: the run would need about ", error)
    assert "1x3x131072x131072" in error and "64.00 GiB" in error
    assert report.ran() == []


def test_a_normal_32_graph_runs_under_the_default_budget(tiny_pixel_model, tmp_path):
    g, ids = txt2img_graph(tiny_pixel_model, size=32, save=False, steps=2)
    _preview(g, ids["decode"])
    report = Executor(disk_cache=False).run(g, output_dir=tmp_path)
    assert report.ok, report.as_json()
    assert report.sampler_steps == 2


def test_the_same_graph_is_refused_under_a_small_budget_and_the_env_sets_it(tiny_pixel_model, tmp_path, monkeypatch):
    g, ids = txt2img_graph(tiny_pixel_model, size=32, save=False, steps=2)
    _preview(g, ids["decode"])
    monkeypatch.setenv(RUN_BUDGET_ENV, "64K")
    assert run_budget() == 64 << 10
    report = Executor(disk_cache=False).run(g, output_dir=tmp_path)
    assert not report.ok and report.sampler_steps == 0
    assert "over the run budget of 64.00 KiB" in report.nodes[ids["sampler"]].error


def test_the_refusal_names_the_node_its_sizes_and_the_budget():
    peak = Peak("n1", 3 << 30, Estimate({"latent": Size(2, 4, 128, 128, scale=8)}, 2 << 30))
    text = refusal("Big sampler", peak, 1 << 30)
    assert text.startswith("Big sampler: the run would need about 3.00 GiB here (latent: a 2x4x128x128")
    assert "about 2.00 GiB of working memory" in text and "run budget of 1.00 GiB" in text
    assert refusal("Big sampler", peak, 4 << 30) is None


# -- images ----------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_declaring(path, width: int, height: int, bits: int = 8, colour_type: int = 2) -> None:
    """A few hundred bytes whose header says width x height RGB (colour type 2; 6 is RGBA) of
    `bits` per channel (its pixels are not all there)."""
    header = struct.pack(">IIBBBBB", width, height, bits, colour_type, 0, 0, 0)
    pixels = zlib.compress(b"\0" * (1 + 3 * min(width, 64)))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", pixels)
                     + _chunk(b"IEND", b""))


class _Context:
    """What LoadImage.run reads from its NodeContext: the path resolver and the run budget."""

    def __init__(self, budget: int):
        self.run_budget = budget

    def resolve_path(self, path, kinds=None):
        return path


def test_a_decompression_bomb_png_is_refused_by_load_image(tmp_path):
    from nodes.core import LoadImage

    bomb = tmp_path / "bomb.png"
    _png_declaring(bomb, 13000, 13000)
    assert bomb.stat().st_size < 1000
    budget = 1 << 30  # 1 GiB: at most max_image_pixels(budget) pixels, far below 13000^2
    with pytest.raises(NodeError, match="declares more pixels than the run budget allows"):
        LoadImage().run(_Context(budget), path=str(bomb))
    from PIL import Image
    assert Image.MAX_IMAGE_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)  # Pillow's own setting restored


def test_the_bomb_is_refused_before_the_run_from_its_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    _png_declaring(bomb, 13000, 13000)
    from app.graph import Graph

    g = Graph()
    load = add_node(g, "LoadImage", {"path": str(bomb)}, title="Load bomb").id
    report = Executor(disk_cache=False, run_budget="4G").run(g, [_preview(g, load)], output_dir=tmp_path)
    error = report.nodes[load].error
    assert re.match(r"Load bomb \[\w+\]: the run would need about ", error) and "1x3x13000x13000" in error
    assert report.ran() == []


def test_a_9400_rgba16_png_is_estimated_at_what_it_takes_and_refused_under_a_smaller_budget(tmp_path):
    """Below Pillow's own pixel limit (no warning), yet it peaked at 4.4 GB when loaded."""
    from app.graph import Graph

    big = tmp_path / "rgba16.png"
    _png_declaring(big, 9400, 9400, bits=16, colour_type=6)
    g = Graph()
    load = add_node(g, "LoadImage", {"path": str(big)}, title="Load big").id
    report = Executor(disk_cache=False, run_budget="4G").run(g, [_preview(g, load)], output_dir=tmp_path)
    error = report.nodes[load].error
    assert re.match(r"Load big \[\w+\]: the run would need about 4\.\d\d GiB", error), error
    assert "1x3x9400x9400" in error and report.ran() == []


def test_a_small_image_loads_and_its_estimate_reads_the_header(tmp_path):
    from PIL import Image

    from nodes.core import LoadImage

    path = tmp_path / "small.png"
    Image.new("RGBA", (24, 16), (255, 0, 0, 128)).save(path)
    out = LoadImage().run(_Context(1 << 30), path=str(path))
    assert tuple(out["image"].shape) == (1, 16, 24, 3)
    est = LoadImage.memory_estimate({"path": str(path)}, {}, _Context(1 << 30))
    assert est.outputs["image"] == Size(1, 3, 16, 24) and est.outputs["mask"] == Size(1, 1, 16, 24)
    assert est.working == load_image_estimate(24, 16, "RGBA").working > 0
    assert max_image_pixels(1 << 30) * 60 <= 1 << 30


# -- prompts ---------------------------------------------------------------------------------
def test_a_huge_prompt_is_refused_before_the_run(tiny_pixel_model, tmp_path):
    from kernels.prompt_weighting import MAX_PROMPT_CHARS

    g, ids = txt2img_graph(tiny_pixel_model, size=16, save=False, prompt="a red circle " * 100_000)
    _preview(g, ids["decode"])
    report = Executor(disk_cache=False).run(g, output_dir=tmp_path)
    error = report.nodes[ids["text"]].error
    assert report.nodes[ids["text"]].status == "failed"
    assert f"the prompt has 1300000 characters; at most {MAX_PROMPT_CHARS} are read" in error
    assert report.sampler_steps == 0 and report.nodes[ids["sampler"]].status == "skipped"


# -- the disk cache --------------------------------------------------------------------------
def test_a_result_over_the_disk_limit_keeps_only_its_trace(tmp_path):
    disk = DiskCache(tmp_path, max_entry_bytes=4096)
    disk.put("ab" + "1" * 30, {"out": "h1"}, {"out": torch.zeros(1025)})  # 4100 bytes
    disk.put("ab" + "2" * 30, {"out": "h2"}, {"out": torch.zeros(1024)})  # 4096 bytes
    assert disk.trace("ab" + "1" * 30) == {"out": "h1"}
    assert not disk.has_values("ab" + "1" * 30) and disk.get("ab" + "1" * 30) is None
    assert not (tmp_path / "ab" / ("ab" + "1" * 30 + ".safetensors")).exists()
    assert torch.equal(disk.get("ab" + "2" * 30)["out"], torch.zeros(1024))


def test_the_executor_keeps_big_results_off_disk_and_reruns_them(tiny_pixel_model, tmp_path):
    g, ids = txt2img_graph(tiny_pixel_model, size=32, save=False, steps=1)
    _preview(g, ids["decode"])
    ex = Executor(disk_cache=tmp_path / "cache", disk_result_limit=8 << 10)  # a 32x32 image is 12 KiB
    assert ex.run(g, output_dir=tmp_path).ok
    stored = {p.stem for p in (tmp_path / "cache").glob("*/*.safetensors")}
    assert stored and all(ex.disk.trace(k) for k in stored)
    sizes = sorted(p.stat().st_size for p in (tmp_path / "cache").glob("*/*.safetensors"))
    assert sizes[-1] < 8 << 10  # the text conditioning is stored; the 12 KiB latent and image are not
    fresh = Executor(disk_cache=tmp_path / "cache", disk_result_limit=8 << 10)
    report = fresh.run(g, output_dir=tmp_path)
    assert report.ok and report.status(ids["decode"]) == "ran" and report.status(ids["text"]) == "cached-disk"


# -- the memory cache ------------------------------------------------------------------------
def _storage_bytes(values, seen) -> int:
    """What a cache entry's tensors keep alive, measured apart from size_of."""
    total = 0
    stack = [values]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            s = v.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif hasattr(v, "__dataclass_fields__") and not hasattr(v, "content_key"):
            stack.extend(getattr(v, f) for f in v.__dataclass_fields__)
    return total


def test_size_of_counts_whole_storages_once_and_strings():
    big = torch.zeros(1000)
    assert size_of({"a": big[:10]}) >= 4000  # a view keeps its base alive
    assert size_of({"a": big, "b": big[:10]}) < 4000 + 4000  # one storage, once
    assert size_of({"p": "x" * 100_000}) > 100_000


def test_accounted_bytes_match_what_the_cache_holds_after_many_puts_and_evictions():
    cache = MemoryCache(budget_bytes=40_000)
    base = torch.arange(4096, dtype=torch.float32)
    for i in range(500):
        n = 16 + (i * 37) % 2000
        value = {"t": torch.full((n,), float(i))}
        if i % 3 == 0:
            value["view"] = base[: n % 100]  # a view of one shared 16 KiB storage
        if i % 7 == 0:
            cache.put(f"k{i % 11}", value, size_of(value), cost=(i % 5) * 0.01)  # replaces
        else:
            cache.put(f"k{i}", value, size_of(value), cost=(i % 5) * 0.01)
        held = cache._entries.values()
        assert cache.used == sum(e.size for e in held) == sum(size_of(e.values) for e in held)
        assert cache.used <= cache.budget
        # per entry, the accounting covers what its tensors keep alive
        assert all(size_of(e.values) >= _storage_bytes(e.values, set()) for e in held)
    cache.clear()
    assert cache.used == 0


def test_each_node_keeps_its_latest_versions_and_the_accounting_stays_exact():
    cache = MemoryCache(budget_bytes=1 << 30, versions_per_node=3)
    for i in range(20):
        for node in ("sampler", "decode"):
            value = {"t": torch.full((100 + i,), float(i))}
            cache.put(f"{node}{i}", value, size_of(value), cost=1.0, node=node)
        held = cache._entries.values()
        assert cache.used == sum(size_of(e.values) for e in held)
    assert sorted(cache._entries) == sorted(f"{n}{i}" for n in ("sampler", "decode") for i in (17, 18, 19))
    cache.put("decode19", {"t": torch.zeros(1)}, size_of({"t": torch.zeros(1)}), cost=1.0, node="other")
    assert "decode19" in cache and cache.used == sum(size_of(e.values) for e in cache._entries.values())
    small = MemoryCache(budget_bytes=2_000, versions_per_node=100)
    for i in range(50):
        value = {"t": torch.zeros(100)}
        small.put(f"k{i}", value, size_of(value), cost=1.0, node="n")
        assert small.used <= small.budget
    assert 0 < len(small._entries) < 50
    with pytest.raises(ValueError, match="versions_per_node"):
        MemoryCache(versions_per_node=0)


def test_the_memory_cache_budget_is_a_share_of_ram_unless_set(monkeypatch):
    import psutil

    from kernels.memory import BudgetError
    from kernels.run_memory import MEMORY_CACHE_BUDGET_ENV, MEMORY_CACHE_FRACTION

    monkeypatch.delenv(MEMORY_CACHE_BUDGET_ENV, raising=False)
    share = int(psutil.virtual_memory().total * MEMORY_CACHE_FRACTION)
    assert MemoryCache().budget == Executor(disk_cache=False).memory.budget == share
    monkeypatch.setenv(MEMORY_CACHE_BUDGET_ENV, "64M")
    assert MemoryCache().budget == Executor(disk_cache=False).memory.budget == 64 << 20
    # an explicit setting wins over the environment
    assert Executor(disk_cache=False, memory_budget="2G").memory.budget == 2 << 30
    assert MemoryCache(budget_bytes=1000).budget == 1000
    monkeypatch.setenv(MEMORY_CACHE_BUDGET_ENV, "lots")
    with pytest.raises(BudgetError, match=MEMORY_CACHE_BUDGET_ENV):
        Executor(disk_cache=False)
    with pytest.raises(BudgetError, match="memory cache budget"):
        MemoryCache(budget_bytes=0)


def test_fifty_runs_keep_the_cache_accounting_equal_to_what_it_holds(tiny_pixel_model, tmp_path):
    ex = Executor(disk_cache=False, memory_budget=200_000)
    for seed in range(50):
        g, ids = txt2img_graph(tiny_pixel_model, size=16, save=False, steps=1, seed=seed)
        _preview(g, ids["decode"])
        assert ex.run(g, output_dir=tmp_path).ok
        held = list(ex.memory._entries.values())
        assert ex.memory.used == sum(size_of(e.values) for e in held) <= 200_000
        assert ex.memory.used >= _storage_bytes([e.values for e in held], set())
    assert len(ex.memory._entries) < 50 * 2  # evicted as the budget filled


def test_traces_keep_the_most_recent():
    traces = Traces(limit=3)
    for i in range(5):
        traces[f"k{i}"] = {"out": str(i)}
    assert len(traces) == 3 and traces.get("k0") is None and traces["k4"] == {"out": "4"}
    traces.get("k2")
    traces["k5"] = {}
    assert "k2" in traces and "k3" not in traces


def test_t5_tokens_past_the_sequence_length_are_counted_and_warned(tmp_path, caplog):
    from kernels.models import load_model_folder
    from kernels.tiny import build_tiny_sd3_model
    from nodes.core import TextEncode, t5_tokens_dropped

    _model, clip, _vae = load_model_folder(build_tiny_sd3_model(str(tmp_path / "sd3"), t5_max_length=16))
    short, long = "a red circle", " ".join(["a red circle on the left"] * 6)  # 36 words
    assert t5_tokens_dropped(clip.tokenizer, short) == 0
    dropped = t5_tokens_dropped(clip.tokenizer, long)
    assert dropped == 36 + 1 - clip.tokenizer.max_sequence_length  # words and the end token
    with caplog.at_level("WARNING", logger="nodes.core"):
        TextEncode().run(_Context(1 << 30), clip=clip, text=long)
    assert f"the prompt is {dropped} T5 tokens longer than the encoder's" in caplog.text
