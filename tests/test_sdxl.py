"""Stable Diffusion XL folders: load, encode and sample in a graph, each against diffusers'
StableDiffusionXLPipeline on the same tiny random folder, seed and scheduler."""

import pytest
import torch
from conftest import CAPTURED, QuietContext, inputs_fed_to, txt2img_graph

from app.engine import Executor
from kernels.models import load_model_folder
from nodes.registry import add_node

PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    from kernels.tiny import build_tiny_sdxl_model

    return build_tiny_sdxl_model(str(tmp_path_factory.mktemp("models") / "tiny-sdxl"))


@pytest.fixture(scope="module")
def sdxl_refiner(tmp_path_factory):
    from kernels.tiny import build_tiny_sdxl_model

    return build_tiny_sdxl_model(str(tmp_path_factory.mktemp("models") / "tiny-sdxl-refiner"), refiner=True)


def sdxl_pipeline(model_path, scheduler_name=None):
    """The folder's own StableDiffusionXLPipeline; with `scheduler_name`, the scheduler the
    graph's Sampler builds for that name."""
    from diffusers import StableDiffusionXLPipeline

    from kernels.sampling import make_scheduler

    pipe = StableDiffusionXLPipeline.from_pretrained(model_path, local_files_only=True)
    if scheduler_name is not None:
        pipe.scheduler = make_scheduler(scheduler_name, dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def graph_latent(model_path, tmp_path, *, scheduler, steps, cfg, seed, size=16, negative=None, batch=1):
    g, ids = txt2img_graph(model_path, prompt=PROMPT, steps=steps, scheduler=scheduler, cfg=cfg,
                           seed=seed, size=size, save=False, batch=batch)
    if negative is not None:
        ids["negative"] = add_node(g, "TextEncode", {"text": negative}).id
        g.connect(ids["load"], "clip", ids["negative"], "clip")
        g.connect(ids["negative"], "conditioning", ids["sampler"], "negative")
    ids["capture"] = add_node(g, "TestCaptureLatent", {}).id
    g.connect(ids["sampler"], "latent", ids["capture"], "latent")
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    return CAPTURED.pop("latent")


def test_tiny_sdxl_folder_ships_sdxl_scheduler_config(sdxl_model):
    # the pipeline keeps the folder's scheduler config as it is (SDXL ships steps_offset 1)
    pipe = sdxl_pipeline(sdxl_model)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.timestep_spacing == "leading"
    model, _clip, _vae = load_model_folder(sdxl_model)
    assert model.scheduler_config["steps_offset"] == 1


def test_sdxl_folder_loads_and_encodes_as_the_pipeline_feeds_its_unet(sdxl_model):
    from diffusers import UNet2DConditionModel

    from kernels.sdxl import SDXLModelBundle, SDXLTextEncoders, add_time_ids
    from kernels.text import encode_text

    model, clip, vae = load_model_folder(sdxl_model)
    assert isinstance(model, SDXLModelBundle) and isinstance(model.unet, UNet2DConditionModel)
    assert isinstance(clip.text_encoder, SDXLTextEncoders) and not model.is_flow
    assert (vae.latent_channels, vae.scale_factor) == (4, 2) == (4, model.vae_scale_factor)
    cond = encode_text(clip.tokenizer, clip.text_encoder, PROMPT)
    assert cond.embeds.shape == (1, 16, 16 + 32) and cond.pooled.shape == (1, 32)
    pipe = sdxl_pipeline(sdxl_model)
    (text, added), = inputs_fed_to(  # uncond half first
        pipe.unet, ("encoder_hidden_states", "added_cond_kwargs"),
        lambda: pipe(PROMPT, height=16, width=24, num_inference_steps=1, guidance_scale=5.0,
                     output_type="latent"))
    assert torch.equal(text, torch.cat([cond.empty, cond.embeds]))
    assert torch.equal(added["text_embeds"], torch.cat([cond.empty_pooled, cond.pooled]))
    # the folder says force_zeros_for_empty_prompt, as SDXL ships: no negative is zeros
    assert not cond.empty.any() and not cond.empty_pooled.any()
    time_ids, negative_time_ids = add_time_ids(model.unet, (16, 24), torch.float32, 32)
    assert time_ids.tolist() == negative_time_ids.tolist() == [[16, 24, 0, 0, 16, 24]]
    assert torch.equal(added["time_ids"], torch.cat([time_ids, time_ids]))
    guided = model.added_cond_kwargs((cond.pooled, cond.empty_pooled), (1, 4, 8, 12), guided=True)
    assert torch.equal(guided["time_ids"], added["time_ids"])
    # the word map is CLIP-L's token positions (after <bos>)
    assert cond.words["red"] == (2,) and cond.positions("circle on the left") == [3, 4, 5, 6]


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_sdxl_txt2img_graph_matches_the_diffusers_pipeline(sdxl_model, tmp_path, scheduler):
    ours = graph_latent(sdxl_model, tmp_path, scheduler=scheduler, steps=4, cfg=5.0, seed=3)
    ref = sdxl_pipeline(sdxl_model, scheduler)(
        PROMPT, height=16, width=16, num_inference_steps=4, guidance_scale=5.0,
        generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert ours.shape == ref.shape == (1, 4, 8, 8)
    assert torch.equal(ours, ref), (ours - ref).abs().max()


def test_sdxl_without_guidance_matches_the_pipeline(sdxl_model, tmp_path):
    # cfg 1: one batch (no negative half) for the UNet, its pooled text and time ids
    ours = graph_latent(sdxl_model, tmp_path, scheduler="euler", steps=3, cfg=1.0, seed=5, size=24)
    ref = sdxl_pipeline(sdxl_model, "euler")(
        PROMPT, height=24, width=24, num_inference_steps=3, guidance_scale=1.0,
        generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert ours.shape == ref.shape == (1, 4, 12, 12)
    assert torch.equal(ours, ref), (ours - ref).abs().max()


def test_sdxl_negative_prompt_matches_the_pipeline(sdxl_model, tmp_path):
    # a negative prompt replaces the zeros with its own embeddings and pooled embedding
    negative = "a blue square"
    ours = graph_latent(sdxl_model, tmp_path, scheduler="euler", steps=3, cfg=5.0, seed=7, negative=negative)
    ref = sdxl_pipeline(sdxl_model, "euler")(
        PROMPT, negative_prompt=negative, height=16, width=16, num_inference_steps=3,
        guidance_scale=5.0, generator=torch.Generator().manual_seed(7), output_type="latent").images
    assert torch.equal(ours, ref), (ours - ref).abs().max()


@pytest.mark.parametrize("cfg, negative", [(1.0, None), (5.0, None), (5.0, "a blue square")])
def test_sdxl_batch_is_the_pipelines_images_per_prompt(sdxl_model, tmp_path, cfg, negative):
    # the pooled text and time ids go to every image of the batch
    ours = graph_latent(sdxl_model, tmp_path, scheduler="euler", steps=2, cfg=cfg, seed=7, negative=negative,
                        batch=2)
    ref = sdxl_pipeline(sdxl_model, "euler")(
        PROMPT, negative_prompt=negative, height=16, width=16, num_inference_steps=2, guidance_scale=cfg,
        num_images_per_prompt=2, generator=[torch.Generator().manual_seed(7 + k) for k in range(2)], output_type="latent").images
    assert ours.shape[0] == 2 and torch.equal(ours, ref)


def test_sdxl_sampler_refuses_a_conditioning_without_pooled_embeddings(sdxl_model, tiny_latent_model, tmp_path):
    # an SD1.x prompt on an SDXL UNet: a message, not a shape error from inside the UNet
    g, ids = txt2img_graph(sdxl_model, prompt=PROMPT, steps=1, save=False)
    other = add_node(g, "LoadModel", {"path": tiny_latent_model}).id
    g.connect(other, "clip", ids["text"], "clip")
    report = Executor(device="cpu", disk_cache=False).run(g, targets=[ids["sampler"]], output_dir=tmp_path)
    assert not report.ok
    assert "pooled text embeddings" in report.nodes[ids["sampler"]].error


def img2img_pipeline(model_path, scheduler_name):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from kernels.sampling import make_scheduler

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(model_path, local_files_only=True)
    pipe.scheduler = make_scheduler(scheduler_name, dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_refiner_loads_with_clip_g_only_and_encodes_as_its_pipeline(sdxl_refiner):
    from kernels.sdxl import SDXLModelBundle
    from kernels.text import encode_text

    model, clip, _vae = load_model_folder(sdxl_refiner)
    assert isinstance(model, SDXLModelBundle) and model.requires_aesthetics_score
    assert clip.text_encoder.text_encoder is None and clip.tokenizer.tokenizer is None
    cond = encode_text(clip.tokenizer, clip.text_encoder, PROMPT)
    assert cond.embeds.shape == (1, 16, 32) and cond.words["red"] == (2,)
    pipe = img2img_pipeline(sdxl_refiner, "euler")
    (text, added), = inputs_fed_to(
        pipe.unet, ("encoder_hidden_states", "added_cond_kwargs"),
        lambda: pipe(PROMPT, image=torch.zeros(1, 4, 8, 12), strength=0.5, num_inference_steps=2,
                 guidance_scale=5.0, output_type="latent"))
    # the refiner ships force_zeros_for_empty_prompt false: its negative is the encoding of ""
    assert cond.empty.any() and torch.equal(text, torch.cat([cond.empty, cond.embeds]))
    assert torch.equal(added["text_embeds"], torch.cat([cond.empty_pooled, cond.pooled]))
    assert added["time_ids"].tolist() == [[16, 24, 0, 0, 2.5], [16, 24, 0, 0, 6.0]]
    ours = model.added_cond_kwargs((cond.pooled, cond.empty_pooled), (1, 4, 8, 12), guided=True)
    assert torch.equal(ours["time_ids"], added["time_ids"])


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_sdxl_img2img_sampler_matches_the_img2img_pipeline(sdxl_model, sdxl_refiner, which):
    from kernels.text import encode_text
    from nodes.core import Sampler

    path = sdxl_model if which == "base" else sdxl_refiner
    model, clip, _vae = load_model_folder(path)
    cond = encode_text(clip.tokenizer, clip.text_encoder, PROMPT)
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = Sampler().run(QuietContext(), model, cond, None, init, "euler", 4, 5.0, 3, 0.5)["latent"]
    # a 4-channel image is taken as latents by the pipeline, as the Sampler takes its input latent
    ref = img2img_pipeline(path, "euler")(
        PROMPT, image=init, strength=0.5, num_inference_steps=4, guidance_scale=5.0,
        generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert torch.equal(ours, ref), (ours - ref).abs().max()


LAYOUT_BOXES = [{"x0": 0.0, "y0": 0.0, "x1": 0.5, "y1": 1.0, "phrase": "red circle"},
                {"x0": 0.5, "y0": 0.0, "x1": 1.0, "y1": 1.0, "phrase": "blue square"}]


def layout_latent(model_path, tmp_path, patch_type, boxes):
    """txt2img with Layout -> `patch_type` between the loader and the Sampler."""
    g, ids = txt2img_graph(model_path, prompt="a red circle and a blue square", steps=3, save=False)
    capture = add_node(g, "TestCaptureLatent", {}).id
    g.connect(ids["sampler"], "latent", capture, "latent")
    if patch_type is not None:
        layout = add_node(g, "Layout", {"width": 16, "height": 16, "boxes": boxes}).id
        patch = add_node(g, patch_type, {}).id
        g.connect(ids["load"], "model", patch, "model")
        g.connect(layout, "layout", patch, "layout")
        g.connect(patch, "model", ids["sampler"], "model")
    report = Executor(device="cpu", disk_cache=False).run(g, targets=[capture], output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    return CAPTURED.pop("latent")


@pytest.mark.parametrize("patch_type", ["RegionAttention", "ZestGuide", "BoxGuidance"])
def test_layout_patches_steer_sdxl_and_an_empty_layout_changes_nothing(sdxl_model, tmp_path, patch_type):
    # gradient guidance makes its own UNet calls: they need SDXL's pooled text and time ids too
    plain = layout_latent(sdxl_model, tmp_path, None, [])
    assert torch.equal(layout_latent(sdxl_model, tmp_path, patch_type, []), plain)
    steered = layout_latent(sdxl_model, tmp_path, patch_type, LAYOUT_BOXES)
    assert torch.isfinite(steered).all() and not torch.equal(steered, plain)
