"""Core nodes and the sampling kernel on tiny random models (nothing downloaded)."""

import numpy as np
import pytest
import torch
from PIL import Image

from app.engine import EngineEvents, Executor
from kernels.models import ModelLoadError, load_model_folder
from kernels.sampling import FLOW_SCHEDULERS, SCHEDULERS, SchedulerMismatch, make_scheduler, sample
from kernels.text import encode_text
from nodes.registry import add_node

DDPM_SCHEDULERS = [s for s in SCHEDULERS if s not in FLOW_SCHEDULERS]


@pytest.fixture(scope="module")
def pixel(tiny_pixel_model):
    return load_model_folder(tiny_pixel_model)


def test_sampler_node_offers_exactly_the_samplers_schedulers():
    from nodes.core import Sampler

    assert tuple(Sampler.params["scheduler"].options) == tuple(SCHEDULERS)
    assert Sampler.params["scheduler"].default in SCHEDULERS


@pytest.mark.parametrize("name", DDPM_SCHEDULERS)
def test_every_ddpm_scheduler_samples_deterministically(pixel, name):
    model, clip, vae = pixel
    cond = encode_text(clip.tokenizer, clip.text_encoder, "a red circle")
    outs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(3)
        noise = torch.randn(1, 3, 16, 16, generator=g)
        outs.append(sample(model.unet, make_scheduler(name, model.scheduler_config), cond.embeds,
                           cond.empty, noise, 3, 4.0, g))
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])


def test_flow_model_samples_with_flow_match_euler_only(tiny_flow_model):
    model, clip, vae = load_model_folder(tiny_flow_model)
    assert model.is_flow
    cond = encode_text(clip.tokenizer, clip.text_encoder, "a blue star")
    g = torch.Generator().manual_seed(0)
    out = sample(model.unet, make_scheduler("flow_match_euler", model.scheduler_config), cond.embeds,
                 cond.empty, torch.randn(1, 3, 16, 16, generator=g), 3, 3.0, g)
    assert torch.isfinite(out).all()
    with pytest.raises(SchedulerMismatch, match="flow-matching"):
        make_scheduler("euler", model.scheduler_config)


def test_flow_scheduler_on_ddpm_model_is_a_clear_node_error(tiny_pixel_model, tmp_path):
    from conftest import txt2img_graph

    g, ids = txt2img_graph(tiny_pixel_model, scheduler="flow_match_euler")
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path)
    assert report.status(ids["sampler"]) == "failed"
    assert "flow_match_euler" in report.nodes[ids["sampler"]].error
    assert "DDPM" in report.nodes[ids["sampler"]].error
    assert report.nodes[ids["sampler"]].traceback is None  # a user error, not a bug


def test_denoise_zero_returns_the_input_latent(pixel):
    model, clip, vae = pixel
    cond = encode_text(clip.tokenizer, clip.text_encoder, "a red circle")
    init = torch.rand(1, 3, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(0)
    out = sample(model.unet, make_scheduler("euler", model.scheduler_config), cond.embeds, cond.empty,
                 torch.randn(1, 3, 16, 16, generator=g), 10, 4.0, g, denoise=0.0, init=init)
    assert torch.equal(out, init)


def test_img2img_runs_fewer_steps(tiny_latent_model, tmp_path):
    from conftest import txt2img_graph

    g, ids = txt2img_graph(tiny_latent_model, steps=10, size=16, save=False)
    img = np.zeros((16, 16, 3), np.uint8)
    img[4:12, 4:12] = (220, 35, 35)
    Image.fromarray(img).save(tmp_path / "in.png")
    load_img = add_node(g, "LoadImage", {"path": str(tmp_path / "in.png")}, title="In")
    enc = add_node(g, "VAEEncode", {}, title="Enc")
    g.connect(load_img.id, "image", enc.id, "image")
    g.connect(ids["load"], "vae", enc.id, "vae")
    g.connect(enc.id, "latent", ids["sampler"], "latent")
    g.set_param(ids["sampler"], "denoise", 0.5)
    preview = add_node(g, "PreviewImage", {}, title="Preview")
    g.connect(ids["decode"], "image", preview.id, "image")
    shown = []
    report = Executor(device="cpu", disk_cache=False).run(
        g, events=EngineEvents(images=lambda nid, im, paths: shown.append(im)), output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values()}
    assert report.sampler_steps == 5
    assert shown[0].shape == (1, 16, 16, 3)


def test_previews_arrive_during_sampling(tiny_pixel_model, tmp_path):
    from conftest import txt2img_graph

    g, ids = txt2img_graph(tiny_pixel_model, steps=3)
    events_seen = []  # previews and node states, in the order they arrive
    events = EngineEvents(preview=lambda nid, im: events_seen.append(("preview", nid, im.shape)),
                          node_state=lambda nid, state, info: events_seen.append((state, nid, None)))
    Executor(device="cpu", disk_cache=False).run(g, events=events, output_dir=tmp_path)
    previews = [(i, nid, shape) for i, (kind, nid, shape) in enumerate(events_seen) if kind == "preview"]
    assert previews and all(nid == ids["sampler"] for _, nid, _ in previews)
    assert previews[-1][2] == (1, 16, 16, 3)
    started = events_seen.index(("running", ids["sampler"], None))
    finished = events_seen.index(("done", ids["sampler"], None))
    assert started < previews[0][0] and previews[-1][0] < finished  # while the sampler runs


def test_save_image_embeds_the_graph(tiny_pixel_model, tmp_path):
    from conftest import txt2img_graph

    from app.graph import load
    from nodes import registry

    g, ids = txt2img_graph(tiny_pixel_model, steps=2)
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path)
    (path,) = report.outputs()
    reopened = load(path, registry.get)
    assert set(reopened.nodes) == set(g.nodes)
    assert reopened.nodes[ids["sampler"]].params["steps"] == 2
    again = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path)
    assert again.outputs()[0].endswith("test_00002.png")  # never overwrites


def test_token_map_finds_words(pixel):
    model, clip, vae = pixel
    cond = encode_text(clip.tokenizer, clip.text_encoder, "a red circle and a blue star")
    assert cond.words["red"] == (2,) and cond.words["star"] == (7,)
    assert cond.positions("blue star") == [6, 7]
    assert cond.words["a"] == (1, 5)


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "no model_index.json"),
    (lambda p: (p.mkdir(), (p / "model_index.json").write_text("{oops")), "not valid JSON"),
    (lambda p: (p.mkdir(), (p / "model_index.json").write_text('{"unet": ["os", "system"]}')),
     "only diffusers and transformers"),
    (lambda p: (p.mkdir(), (p / "model_index.json").write_text('{"unet": ["diffusers", "NoSuchModel"]}')),
     "does not have"),
    (lambda p: (p.mkdir(), (p / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"]}')),
     "folder"),
])
def test_bad_model_folders_give_clear_errors(tmp_path, setup, message):
    folder = tmp_path / "model"
    setup(folder)
    with pytest.raises(ModelLoadError, match=message):
        load_model_folder(str(folder))


@pytest.mark.parametrize("name, message", [
    ("model.ckpt", "pickled checkpoint, which Loomwork never opens"),
    ("model.safetensors", "single-file checkpoint"),
    ("notes.txt", "is a file; LoadModel takes a diffusers model folder"),
])
def test_a_file_instead_of_a_folder_says_what_to_do(tmp_path, name, message):
    path = tmp_path / name
    path.write_bytes(b"not read")  # never opened: the suffix decides the message
    with pytest.raises(ModelLoadError, match=message):
        load_model_folder(str(path))


def test_missing_model_fails_the_loader_node_with_its_path(tmp_path):
    from conftest import txt2img_graph

    g, ids = txt2img_graph(str(tmp_path / "nowhere"))
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path)
    assert report.status(ids["load"]) == "failed"
    assert "nowhere" in report.nodes[ids["load"]].error
    assert report.status(ids["save"]) == "skipped"


def test_pickled_weights_are_refused(tiny_pixel_model, tmp_path):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_pixel_model, folder)
    unet = folder / "unet"
    state = {}
    from safetensors.torch import load_file
    state = load_file(str(unet / "diffusion_pytorch_model.safetensors"))
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, unet / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="unet"):
        load_model_folder(str(folder))
