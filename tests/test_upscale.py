"""Upscalers: spandrel models read safely and run tile by tile within a memory budget, latent
resize, the HiresFix node, tiled VAE coding, and the hires-fix example graph.

Models are tiny random ones built here from spandrel's own architecture classes (their state
dicts are what a real file holds), so spandrel detects them from the weights' names and shapes.
`python tests/test_upscale.py` rewrites resources/graphs/hires-fix.loom.
"""

from __future__ import annotations

import logging
import pickle
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HIRES_GRAPH = ROOT / "resources" / "graphs" / "hires-fix.loom"


def tiny_esrgan(scale=2, seed=0):
    import torch
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    return ESRGAN(num_filters=8, num_blocks=1, scale=scale).state_dict()


def tiny_compact(scale=4, seed=0):
    import torch
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(seed)
    return Compact(num_feat=4, num_conv=2, upscale=scale).state_dict()


def save_model(state_dict, path: Path) -> str:
    import torch
    from safetensors.torch import save_file

    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, str(path))
    return str(path)


def rand_image(h, w, seed=0):
    import torch

    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def blend_mask(grid, scale):
    """Output pixels inside some overlap of neighbouring tiles."""
    import torch

    mask = torch.zeros(grid.height * scale, grid.width * scale, dtype=torch.bool)
    for (_, end), (start, _) in zip(grid.rows, grid.rows[1:]):
        mask[start * scale:end * scale, :] = True
    for (_, end), (start, _) in zip(grid.cols, grid.cols[1:]):
        mask[:, start * scale:end * scale] = True
    return mask


# -- the tiling loop ----------------------------------------------------------------------------

def test_tiling_of_a_pixelwise_function_is_exact_and_one_tile_is_the_function_itself():
    import torch

    from kernels.upscale.tiling import plan_tiles, tiled_apply

    def up2(t):  # pixel-wise, so any tiling must give the same result
        calls.append(tuple(t.shape))
        return (t * 3 - 1).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)

    x = torch.rand(2, 3, 50, 37)
    calls = []
    whole = up2(x)
    for tile, overlap, multiple in ((16, 4, 1), (24, 10, 1), (20, 8, 4), (37, 8, 1)):
        calls.clear()
        out = tiled_apply(up2, x, scale=2, tile=tile, overlap=overlap, multiple_of=multiple)
        grid = plan_tiles(50, 37, tile, overlap, multiple)
        assert len(calls) == grid.count > 1
        assert all(s % multiple == 0 for s, _ in grid.rows + grid.cols)
        assert torch.allclose(out, whole, atol=1e-6), (tile, overlap)
        nhwc = tiled_apply(up2, x, scale=2, tile=tile, overlap=overlap, channels_last=True)
        assert torch.allclose(nhwc, whole.permute(0, 2, 3, 1), atol=1e-6)
    calls.clear()
    assert torch.equal(tiled_apply(up2, x, scale=2, tile=64, overlap=8), whole)
    assert calls == [tuple(x.shape)]


def test_tile_grid_covers_the_image_with_at_least_the_overlap():
    from kernels.upscale.tiling import axis_spans, plan_tiles

    for length, tile, overlap in ((100, 64, 16), (120, 64, 16), (1000, 96, 32), (65, 64, 8)):
        spans = axis_spans(length, tile, overlap)
        assert spans[0][0] == 0 and spans[-1][1] == length
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end - start >= overlap
    grid = plan_tiles(40, 30, 512, 32)
    assert (grid.tile_h, grid.tile_w, grid.count, grid.overlap) == (40, 30, 1, 15)


# -- spandrel models ----------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_spandrel_detects_tiny_models_from_safetensors_and_pth(tmp_path, suffix):
    import torch

    from kernels.upscale.model_upscale import load_upscale_model

    for name, sd, arch, scale in (("esrgan", tiny_esrgan(2), "ESRGAN", 2),
                                  ("compact", tiny_compact(4), "RealESRGAN Compact", 4)):
        model = load_upscale_model(save_model(sd, tmp_path / f"{name}{suffix}"))
        assert (model.architecture, model.scale, model.input_channels) == (arch, scale, 3)
        loaded = model.descriptor.model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in sd.items() if k in loaded)


def test_untiled_upscale_equals_spandrel_called_directly(tmp_path):
    import torch

    from kernels.upscale.model_upscale import load_upscale_model, plan_upscale, upscale_images

    model = load_upscale_model(save_model(tiny_esrgan(2), tmp_path / "m.safetensors"))
    image = rand_image(20, 24)
    plan = plan_upscale(model, 20, 24, tile=0)
    assert plan.tiles == 1
    ours = upscale_images(model, image, plan)
    reference = model.descriptor(image.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert torch.equal(ours, reference)


def test_tiled_esrgan_equals_untiled_away_from_the_blend_and_is_close_inside_it(tmp_path):

    from kernels.upscale.model_upscale import load_upscale_model, plan_upscale, upscale_images
    from kernels.upscale.tiling import plan_tiles

    model = load_upscale_model(save_model(tiny_esrgan(2), tmp_path / "m.safetensors"))
    image = rand_image(70, 90)
    whole = upscale_images(model, image, plan_upscale(model, 70, 90, tile=0))
    assert whole.std() > 0.01  # a model that draws something
    plan = plan_upscale(model, 70, 90, tile=48, overlap=24)
    assert plan.tiles == 6
    tiled = upscale_images(model, image, plan)
    diff = (tiled - whole).abs()[0].amax(-1)
    inside = blend_mask(plan_tiles(70, 90, 48, 24), 2)
    assert diff[~inside].max() <= 1e-4
    assert diff[inside].max() <= 2e-2
    seams = upscale_images(model, image, plan_upscale(model, 70, 90, tile=48, overlap=0))
    assert (seams - whole).abs().max() > diff.max()  # the overlap is what keeps seams away


@pytest.mark.slow
def test_a_4096_result_stays_within_the_memory_budget_that_chose_its_tile():
    from kernels.upscale.model_upscale import (
        TensorMemoryMeter,
        model_from_state_dict,
        plan_upscale,
        upscale_images,
    )

    model = model_from_state_dict(tiny_compact(4), "tiny-compact")
    image = rand_image(1024, 1024)
    budget = 400 << 20
    plan = plan_upscale(model, 1024, 1024, memory_budget=budget)
    assert plan.tiles > 1
    with TensorMemoryMeter() as meter:
        out = upscale_images(model, image, plan)
    assert out.shape == (1, 4096, 4096, 3)
    assert meter.peak <= plan.estimated_bytes <= budget
    whole = plan_upscale(model, 1024, 1024, memory_budget=4 << 30)
    assert whole.tiles == 1 and whole.estimated_bytes > budget
    del out
    with TensorMemoryMeter() as untiled:
        upscale_images(model, image[:, :512, :512], plan_upscale(model, 512, 512, tile=0))
    # one pass over a quarter of the pixels needs a quarter of what the whole would: over budget
    assert untiled.peak * 4 > budget


# -- bad input ----------------------------------------------------------------------------------

class WritesAFile:
    """Unpickling this runs `open(path, "w")`, which creates the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, how):
    import torch

    from kernels.upscale.model_upscale import UpscaleModelError, load_upscale_model

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    if how == "torch.save":
        torch.save({**tiny_esrgan(2), "extra": WritesAFile(str(marker))}, path)
    else:  # a bare pickle, in the oldest protocol torch's weights-only reader walks
        with open(path, "wb") as f:
            pickle.dump({"extra": WritesAFile(str(marker))}, f, protocol=2)
    with pytest.raises(UpscaleModelError, match="refused") as info:
        load_upscale_model(str(path))
    assert str(path) in str(info.value) and "open" in str(info.value)
    assert not marker.exists()
    with open(path, "rb") as f:  # the payload is live: a free unpickle does write the file
        if how == "torch.save":
            torch.load(f, weights_only=False)
        else:
            pickle.load(f)
    assert marker.exists()


def test_a_pickle_through_the_node_is_refused_with_the_nodes_error(tmp_path):
    import torch

    from app.engine import Executor
    from app.graph import Graph
    from nodes.registry import add_node

    marker = tmp_path / "marker"
    torch.save({**tiny_esrgan(2), "extra": WritesAFile(str(marker))}, tmp_path / "evil.pth")
    g = Graph()
    load = add_node(g, "LoadUpscaleModel", {"path": str(tmp_path / "evil.pth")})
    up = add_node(g, "UpscaleWithModel", {})
    image = add_node(g, "LoadImage", {"path": str(_png(tmp_path))})
    preview = add_node(g, "PreviewImage", {})
    g.connect(load.id, "upscale_model", up.id, "upscale_model")
    g.connect(image.id, "image", up.id, "image")
    g.connect(up.id, "image", preview.id, "image")
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path)
    assert not report.ok
    error = report.nodes[load.id].error
    assert "refused" in error and "evil.pth" in error and report.nodes[load.id].traceback is None
    assert not marker.exists()


def _png(folder: Path, size=(24, 20)) -> Path:
    from kernels.images import to_pil

    path = folder / "in.png"
    to_pil(rand_image(size[1], size[0]))[0].save(path)
    return path


def test_a_file_spandrel_cannot_identify_is_a_clear_error(tmp_path):
    import torch

    from kernels.upscale.model_upscale import UpscaleModelError, load_upscale_model

    unknown = save_model({"encoder.layer.weight": torch.zeros(4, 4)}, tmp_path / "text.safetensors")
    with pytest.raises(UpscaleModelError, match="cannot identify"):
        load_upscale_model(unknown)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a weights file at all")
    with pytest.raises(UpscaleModelError, match="garbage.pth: not a readable PyTorch weights file"):
        load_upscale_model(str(garbage))
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\0" * 16)
    with pytest.raises(UpscaleModelError, match="unsupported file type"):
        load_upscale_model(str(onnx))
    with pytest.raises(UpscaleModelError, match="does not exist"):
        load_upscale_model(str(tmp_path / "missing.pth"))


def test_a_scale_whose_result_exceeds_the_budget_is_refused(tmp_path):
    from kernels.upscale.model_upscale import UpscaleModelError, model_from_state_dict, plan_upscale

    model = model_from_state_dict(tiny_compact(4), "tiny-compact")
    with pytest.raises(UpscaleModelError, match="more than the memory budget"):
        plan_upscale(model, 2048, 2048, memory_budget=512 << 20)  # 8192^2 x 3 floats = 768 MB
    with pytest.raises(UpscaleModelError, match="raise the budget"):
        plan_upscale(model, 1024, 1024, memory_budget=(192 << 20) + (1 << 20))  # no room for 64x64
    with pytest.raises(UpscaleModelError, match="use a smaller tile"):
        plan_upscale(model, 1024, 1024, tile=1024, memory_budget=400 << 20)
    report, ids = _run_upscale_graph(tmp_path, tiny_compact(4), {"memory_budget_mb": 64}, size=(1200, 1200))
    assert "more than the memory budget" in report.nodes[ids["up"]].error


def test_a_tile_larger_than_the_image_is_clamped_and_the_node_says_so(tmp_path, caplog):
    import torch

    from kernels.images import from_pil
    from kernels.upscale.model_upscale import load_upscale_model, plan_upscale, upscale_images

    with caplog.at_level(logging.INFO, logger="nodes.upscale"):
        report, ids = _run_upscale_graph(tmp_path, tiny_esrgan(2), {"tile": 4096}, size=(24, 20))
    assert report.ok, {r.title: r.error for r in report.nodes.values()}
    assert "tile 4096 is larger than the 24x20 image; used 24x20" in caplog.text
    from PIL import Image

    with Image.open(report.nodes[ids["save"]].outputs[0]) as im:
        saved, _ = from_pil(im)
    model = load_upscale_model(str(tmp_path / "m.safetensors"))
    with Image.open(tmp_path / "in.png") as im:
        image, _ = from_pil(im)
    expected = upscale_images(model, image, plan_upscale(model, 20, 24, tile=0))
    assert saved.shape == (1, 40, 48, 3)
    assert torch.allclose(saved, expected, atol=1 / 255 + 1e-6)  # PNG rounding


def _run_upscale_graph(tmp_path, state_dict, up_params, size=(24, 20), executor=None):
    from app.engine import Executor
    from app.graph import Graph
    from nodes.registry import add_node

    path = save_model(state_dict, tmp_path / "m.safetensors")
    g = Graph()
    ids = {"load": add_node(g, "LoadUpscaleModel", {"path": path}).id,
           "image": add_node(g, "LoadImage", {"path": str(_png(tmp_path, size))}).id,
           "up": add_node(g, "UpscaleWithModel", up_params).id,
           "save": add_node(g, "SaveImage", {"prefix": "up", "embed_graph": False}).id}
    g.connect(ids["load"], "upscale_model", ids["up"], "upscale_model")
    g.connect(ids["image"], "image", ids["up"], "image")
    g.connect(ids["up"], "image", ids["save"], "image")
    executor = executor or Executor(device="cpu", disk_cache=False)
    return executor.run(g, output_dir=tmp_path / "out"), ids


def test_load_upscale_model_goes_through_the_model_manager_and_finds_ckpt_names(tmp_path):
    from app.engine import Executor
    from nodes.registry import get

    root = tmp_path / "models"
    (root / "upscale_models").mkdir(parents=True)
    save_model(tiny_esrgan(2), root / "upscale_models" / "tiny-x2.safetensors")
    executor = Executor(device="cpu", disk_cache=False, model_roots=[str(root)])

    class Ctx:  # a node context over the executor, without a graph run
        models = executor.models

        def resolve_path(self, p, kinds=None):
            return executor.resolve_path(p, kinds=kinds)

    node = get("LoadUpscaleModel")()
    first = node.run(Ctx(), path="ckpt:tiny-x2", dtype="float32")["upscale_model"]
    again = node.run(Ctx(), path="ckpt:tiny-x2.safetensors", dtype="float32")["upscale_model"]
    assert first is again and executor.models.loads == 1 and first.scale == 2
    from kernels.memory import modules_in

    assert modules_in(first) == [first.module]  # the manager can count and move it
    from nodes.base import NodeError

    with pytest.raises(NodeError, match="no model called 'nothing'"):
        node.run(Ctx(), path="ckpt:nothing", dtype="float32")


def test_node_defaults_are_the_kernels_constants():
    from kernels.upscale import latent, model_upscale
    from nodes import upscale

    assert upscale.DEFAULT_OVERLAP == model_upscale.DEFAULT_OVERLAP
    assert upscale.DEFAULT_MEMORY_BUDGET_MB == model_upscale.DEFAULT_MEMORY_BUDGET_MB
    assert upscale.LATENT_METHODS == latent.LATENT_METHODS


# -- latents, tiled VAE, hires fix --------------------------------------------------------------

def test_latent_resize_factor_one_is_identity_and_nearest_doubles_pixels():
    import torch

    from kernels.upscale.latent import resize_latent

    x = torch.randn(1, 4, 6, 5)
    assert resize_latent(x, 1.0, "bicubic") is x
    assert torch.equal(resize_latent(x, 2.0, "nearest-exact"),
                       x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert resize_latent(x, 1.5, "bilinear").shape == (1, 4, 9, 8)


@pytest.fixture(scope="module")
def tiny_vae(tiny_latent_model):
    from kernels.models import load_model_folder

    return load_model_folder(tiny_latent_model)[2]


def test_tiled_vae_decode_with_a_tile_over_the_image_is_plain_and_a_larger_one_is_close(tiny_vae):
    import torch

    from kernels.upscale.vae_tiling import TILING_ATTRIBUTES

    vae, f = tiny_vae, tiny_vae.scale_factor
    before = {a: getattr(vae.vae, a) for a in TILING_ATTRIBUTES}
    small = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(vae.decode(small, tile_size=8 * f), vae.decode(small))
        big = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(1))
        plain, tiled = vae.decode(big), vae.decode(big, tile_size=32 * f)  # 2x2 tiles
        image = plain.clamp(-1, 1)
        plain_latent = vae.encode(image)
        tiled_latent = vae.encode(image, tile_size=32 * f)
    # A random VAE's mid-block attention sees the whole image, so tiles differ from one pass by
    # a few percent (what diffusers' tiling gives).
    assert not torch.equal(plain, tiled)  # it did tile
    assert (plain - tiled).abs().mean() < 0.1 * plain.abs().mean()
    assert not torch.equal(plain_latent, tiled_latent)
    assert (plain_latent - tiled_latent).abs().mean() < 0.1 * plain_latent.abs().mean()
    assert {a: getattr(vae.vae, a) for a in TILING_ATTRIBUTES} == before


def test_vae_decode_node_untiled_is_unchanged_and_rejects_an_off_grid_tile(tiny_vae):
    import torch

    from kernels.images import model_to_image
    from nodes.base import NodeError
    from nodes.core import VAEDecode

    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model_to_image(tiny_vae.decode(latent))
    assert torch.equal(VAEDecode().run(None, vae=tiny_vae, latent=latent)["image"], plain)
    assert torch.equal(VAEDecode().run(None, vae=tiny_vae, latent=latent, tiled=True, tile_size=512)["image"], plain)
    if tiny_vae.scale_factor > 1:
        with pytest.raises(NodeError, match="multiple of"):
            VAEDecode().run(None, vae=tiny_vae, latent=latent, tiled=True, tile_size=64 + 1)


def _hires_graph(model_path, upscale: str, upscale_path=None):
    """txt2img, then its second pass twice: by the HiresFix node, and wired from plain nodes
    (LatentUpscale, or VAEDecode -> UpscaleWithModel -> VAEEncode) and a Sampler; returns the
    graph and the ids of the two latents to compare."""
    from conftest import txt2img_graph

    from nodes.registry import add_node

    g, ids = txt2img_graph(model_path, steps=2, size=16, save=False)
    common = {"scheduler": "euler", "steps": 4, "cfg": 4.0, "seed": 3, "denoise": 0.5}
    hires = add_node(g, "HiresFix", {**common, "upscale": upscale, "factor": 2.0, "method": "bilinear"})
    sampler = add_node(g, "Sampler", common)
    for node in (hires, sampler):
        g.connect(ids["load"], "model", node.id, "model")
        g.connect(ids["text"], "conditioning", node.id, "positive")
    g.connect(ids["load"], "vae", hires.id, "vae")
    g.connect(ids["sampler"], "latent", hires.id, "latent")
    if upscale == "latent":
        resize = add_node(g, "LatentUpscale", {"factor": 2.0, "method": "bilinear"})
        g.connect(ids["sampler"], "latent", resize.id, "latent")
        g.connect(resize.id, "latent", sampler.id, "latent")
        return g, hires.id, sampler.id
    up_load = add_node(g, "LoadUpscaleModel", {"path": upscale_path})
    decode, up, encode = (add_node(g, t, {}) for t in ("VAEDecode", "UpscaleWithModel", "VAEEncode"))
    for src, sp, dst, dp in ((up_load, "upscale_model", hires, "upscale_model"),
                             (up_load, "upscale_model", up, "upscale_model"),
                             (decode, "image", up, "image"), (up, "image", encode, "image"),
                             (encode, "latent", sampler, "latent")):
        g.connect(src.id, sp, dst.id, dp)
    for node in (decode, encode):
        g.connect(ids["load"], "vae", node.id, "vae")
    g.connect(ids["sampler"], "latent", decode.id, "latent")
    return g, hires.id, sampler.id


def _second_passes(g, hires, sampler):
    """Run the graph once per capture; the latents HiresFix and the wired Sampler made."""
    import conftest

    from app.engine import Executor
    from nodes.registry import add_node

    executor = Executor(device="cpu", disk_cache=False)
    out = []
    for src in (hires, sampler):
        cap = add_node(g, "TestCaptureLatent", {})
        g.connect(src, "latent", cap.id, "latent")
        report = executor.run(g, targets=[cap.id])
        assert report.ok, {r.title: r.error for r in report.nodes.values()}
        out.append(conftest.CAPTURED["latent"])
    return out


def test_hires_fix_node_equals_the_wired_latent_hires_fix(tiny_latent_model):
    import torch

    node_out, wired_out = _second_passes(*_hires_graph(tiny_latent_model, "latent"))
    assert node_out.shape[-1] == 2 * 8  # 16 px at VAE scale factor 2 is 8 latent px, doubled
    assert torch.equal(node_out, wired_out)


def test_hires_fix_node_with_a_model_equals_decode_upscale_encode_sample(tiny_pixel_model, tmp_path):
    import torch

    path = save_model(tiny_esrgan(2), tmp_path / "x2.safetensors")
    node_out, wired_out = _second_passes(*_hires_graph(tiny_pixel_model, "model", path))
    assert node_out.shape[-1] == 32
    assert torch.equal(node_out, wired_out)


# -- the example graph --------------------------------------------------------------------------

PROMPT = "a red circle on the left and a blue square at the bottom right, white background"


def build_hires_graph(model_path: str = "builtin:shapes-t2i"):
    from app.graph import Graph
    from nodes.registry import add_node

    g = Graph(meta={
        "title": "Hires fix (built-in ShapesT2I)",
        "description": "Sample at 32x32, upscale the image 2x, re-noise it halfway (denoise 0.5) "
                       "and sample again at 64x64, so the second pass adds detail at the new size "
                       "while keeping the first pass's composition. Swap ImageScale for "
                       "LoadUpscaleModel + UpscaleWithModel to upscale with an ESRGAN-style model, "
                       "or use the HiresFix node for the whole second pass in one node; turn on "
                       "tiled in the VAE nodes for 2048x2048 and larger."})
    load = add_node(g, "LoadModel", {"path": model_path}, title="Load ShapesT2I", pos=(0, 0))
    text = add_node(g, "TextEncode", {"text": PROMPT}, title="Prompt", pos=(320, -160))
    empty = add_node(g, "EmptyLatent", {"width": 32, "height": 32}, title="Canvas 32x32", pos=(320, 80))
    first = add_node(g, "Sampler", {"scheduler": "euler", "steps": 20, "cfg": 5.0, "seed": 75},
                     title="First pass", pos=(640, 0))
    decode = add_node(g, "VAEDecode", {}, title="Decode", pos=(940, 0))
    scale = add_node(g, "ImageScale", {"factor": 2.0, "method": "lanczos"}, title="Upscale x2", pos=(1180, 0))
    encode = add_node(g, "VAEEncode", {}, title="Encode", pos=(1420, 0))
    second = add_node(g, "Sampler", {"scheduler": "euler", "steps": 20, "cfg": 5.0, "seed": 76,
                                     "denoise": 0.5}, title="Second pass (denoise 0.5)", pos=(1660, 0))
    decode2 = add_node(g, "VAEDecode", {}, title="Decode 64x64", pos=(1960, 0))
    show = add_node(g, "ImageScale", {"factor": 4.0, "method": "nearest"}, title="Scale x4", pos=(2200, 0))
    save = add_node(g, "SaveImage", {"prefix": "hires-fix"}, title="Save", pos=(2440, 0))
    for src, sp, dst, dp in (
            (load, "clip", text, "clip"), (load, "vae", empty, "vae"), (load, "model", first, "model"),
            (text, "conditioning", first, "positive"), (empty, "latent", first, "latent"),
            (load, "vae", decode, "vae"), (first, "latent", decode, "latent"),
            (decode, "image", scale, "image"), (load, "vae", encode, "vae"),
            (scale, "image", encode, "image"), (load, "model", second, "model"),
            (text, "conditioning", second, "positive"), (encode, "latent", second, "latent"),
            (load, "vae", decode2, "vae"), (second, "latent", decode2, "latent"),
            (decode2, "image", show, "image"), (show, "image", save, "image")):
        g.connect(src.id, sp, dst.id, dp)
    return g


def test_hires_fix_graph_is_current_and_valid():
    from app.graph import load
    from app.graph.validate import validate
    from nodes import registry

    g = load(HIRES_GRAPH, registry.get)
    assert not [p.message for p in validate(g, registry.get)]
    for node in g.nodes.values():
        assert node.version == registry.get(node.type).version, node.type
    fresh = build_hires_graph()
    assert sorted(n.type for n in g.nodes.values()) == sorted(n.type for n in fresh.nodes.values())
    denoise = sorted(n.params.get("denoise", 1.0) for n in g.nodes.values() if n.type == "Sampler")
    assert denoise == [0.5, 1.0]


def test_hires_fix_graph_runs_headless_and_doubles_the_size(tiny_pixel_model, tmp_path):
    from app.engine import EngineEvents, Executor
    from app.graph import load
    from nodes import registry

    g = load(HIRES_GRAPH, registry.get)
    for node in g.nodes.values():
        if node.type == "LoadModel":
            node.params["path"] = tiny_pixel_model
        if node.type == "EmptyLatent":
            node.params.update(width=16, height=16)
        if node.type == "Sampler":
            node.params["steps"] = 2
    images = []
    report = Executor(device="cpu", disk_cache=False).run(
        g, events=EngineEvents(images=lambda nid, im, p: images.append(im)), output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values()}
    assert images[0].shape == (1, 16 * 2 * 4, 16 * 2 * 4, 3)


if __name__ == "__main__":
    from app.graph import save

    save(build_hires_graph(), HIRES_GRAPH)
    print(f"wrote {HIRES_GRAPH}", file=sys.stderr)
