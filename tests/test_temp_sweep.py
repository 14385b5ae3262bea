"""Every folder a node writes in with atomic_write (SaveImage's output folder, SaveEraser's
erasers folder, SaveTable's CSV folder) loses the temporary files killed writers left there, the
first time each executor writes there; young temp files (a live writer's) stay."""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import txt2img_graph

from app.engine import Executor
from kernels.files import STALE_TEMP_SECONDS
from nodes.registry import add_node


def _plant(folder: Path, name: str, *, stale: bool = True) -> Path:
    """A temp file of atomic_write's naming, as a writer killed mid-write leaves it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{name}.a1b2c3d4.tmp"
    path.write_bytes(b"half a file")
    if stale:
        old = time.time() - STALE_TEMP_SECONDS - 60
        os.utime(path, (old, old))
    return path


def test_each_executor_sweeps_an_output_folder_once(tiny_pixel_model, tmp_path):
    out = tmp_path / "out"
    first = _plant(out, "test_00001.png")
    live = _plant(out, "test_00002.png", stale=False)
    g, _ids = txt2img_graph(tiny_pixel_model, steps=1, save=True)
    ex = Executor(device="cpu", disk_cache=False)
    assert ex.run(g, output_dir=out).ok
    assert not first.exists() and live.exists()
    # A second run of the same executor does not look again (the first sweep was enough) ...
    later = _plant(out, "test_00009.png")
    g.set_param(_ids["sampler"], "seed", 2)
    assert ex.run(g, output_dir=out).ok
    assert later.exists()
    # ... a second executor in the same process sweeps on its own first write there.
    assert Executor(device="cpu", disk_cache=False).run(g, output_dir=out).ok
    assert not later.exists() and live.exists()


def test_save_eraser_sweeps_the_erasers_folder(tiny_pixel_model, tmp_path, monkeypatch):
    from conftest import eraser_graph

    erasers = tmp_path / "erasers"
    monkeypatch.setenv("LOOMWORK_ERASER_DIR", str(erasers))
    left, sub_left = _plant(erasers, "e.safetensors"), _plant(erasers / "sub", "f.safetensors")
    g, ids = eraser_graph(tiny_pixel_model, ("ClosedFormErase", {"concept": "circle", "anchor": "square",
                                                                 "target": "text_encoder"}))
    save = add_node(g, "SaveEraser", {"name": "e"}, title="SaveE").id
    g.connect(ids["erasers"][0], "clip", save, "clip")
    ex = Executor(device="cpu", disk_cache=False)
    report = ex.run(g, targets=[save], output_dir=tmp_path / "out")
    assert report.ok, report.nodes[save].error
    assert (erasers / "e.safetensors").is_file() and not left.exists()
    assert sub_left.exists()  # a folder it did not write in is not touched
    g.set_param(save, "folder", "sub")
    assert ex.run(g, targets=[save], output_dir=tmp_path / "out").ok
    assert (erasers / "sub" / "e.safetensors").is_file() and not sub_left.exists()


def test_save_table_sweeps_its_folder(tiny_pixel_model, tmp_path):
    out = tmp_path / "out"
    left = _plant(out / "tables", "scan.csv")
    g, ids = txt2img_graph(tiny_pixel_model, steps=1, save=False)
    scan = add_node(g, "SeedScan", {"steps": 1, "count": 1, "metric": "contrast"}, title="Scan").id
    for src, port, dst in ((ids["load"], "model", "model"), (ids["load"], "vae", "vae"),
                           (ids["text"], "conditioning", "positive"), (ids["empty"], "latent", "latent")):
        g.connect(src, port, scan, dst)
    table = add_node(g, "SaveTable", {"prefix": "scan"}, title="Table").id
    g.connect(scan, "table", table, "table")
    report = Executor(device="cpu", disk_cache=False).run(g, targets=[table], output_dir=out / "tables")
    assert report.ok, report.nodes[table].error
    assert (out / "tables" / "scan.csv").is_file() and not left.exists()
