"""The UNet (SD1.x/2.x) text-to-image path against diffusers' StableDiffusionPipeline on the same
tiny random model, seed and scheduler: the graph's latents must equal the pipeline's."""

import pytest
import torch
from conftest import CAPTURED, copy_with_scheduler, txt2img_graph

from app.engine import Executor
from nodes.registry import add_node

PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def sd_epsilon_model(tiny_latent_model, tmp_path_factory):
    """conftest's sd_model (v-prediction, as SD2's 768 models) with epsilon prediction, as SD1.x and SD2-base."""
    return copy_with_scheduler(tiny_latent_model, tmp_path_factory.mktemp("models") / "tiny-sd-eps",
                                steps_offset=1, prediction_type="epsilon")


def sd_pipeline(model_path, scheduler_name):
    """StableDiffusionPipeline over the folder's own components (the tiny folder has no safety
    checker), with the scheduler the graph's Sampler builds for `scheduler_name`."""
    from diffusers import StableDiffusionPipeline

    from kernels.models import load_model_folder
    from kernels.sampling import make_scheduler

    model, clip, vae = load_model_folder(model_path)
    pipe = StableDiffusionPipeline(
        vae=vae.vae, text_encoder=clip.text_encoder, tokenizer=clip.tokenizer, unet=model.unet,
        scheduler=make_scheduler(scheduler_name, model.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def graph_latent(model_path, tmp_path, *, scheduler, steps, cfg, seed, batch=1):
    g, ids = txt2img_graph(model_path, prompt=PROMPT, steps=steps, scheduler=scheduler, cfg=cfg,
                           seed=seed, save=False, batch=batch)
    ids["capture"] = add_node(g, "TestCaptureLatent", {}).id
    g.connect(ids["sampler"], "latent", ids["capture"], "latent")
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    return CAPTURED.pop("latent")


@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpmpp_2m", "euler_ancestral"])
def test_unet_txt2img_graph_matches_stable_diffusion_pipeline(sd_model, tmp_path, scheduler):
    ours = graph_latent(sd_model, tmp_path, scheduler=scheduler, steps=4, cfg=4.0, seed=3)
    pipe = sd_pipeline(sd_model, scheduler)
    ref = pipe(PROMPT, height=16, width=16, num_inference_steps=4, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert ours.shape == ref.shape == (1, 4, 8, 8)
    assert torch.equal(ours, ref), (ours - ref).abs().max()


def test_unet_without_guidance_matches_the_pipeline(sd_model, tmp_path):
    # cfg 1 takes the single-batch path (no uncond half) in both
    ours = graph_latent(sd_model, tmp_path, scheduler="euler", steps=3, cfg=1.0, seed=5)
    ref = sd_pipeline(sd_model, "euler")(
        PROMPT, height=16, width=16, num_inference_steps=3, guidance_scale=1.0,
        generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert torch.equal(ours, ref), (ours - ref).abs().max()


@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpmpp_2m"])
def test_epsilon_prediction_matches_the_pipeline(sd_epsilon_model, tmp_path, scheduler):
    ours = graph_latent(sd_epsilon_model, tmp_path, scheduler=scheduler, steps=3, cfg=4.0, seed=2)
    ref = sd_pipeline(sd_epsilon_model, scheduler)(
        PROMPT, height=16, width=16, num_inference_steps=3, guidance_scale=4.0,
        generator=torch.Generator().manual_seed(2), output_type="latent").images
    assert torch.equal(ours, ref), (ours - ref).abs().max()
    assert sd_pipeline(sd_epsilon_model, scheduler).scheduler.config.prediction_type == "epsilon"


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_a_batch_is_the_pipelines_images_per_prompt(sd_model, tmp_path, cfg):
    ours = graph_latent(sd_model, tmp_path, scheduler="euler", steps=2, cfg=cfg, seed=3, batch=2)
    ref = sd_pipeline(sd_model, "euler")(PROMPT, height=16, width=16, num_inference_steps=2, guidance_scale=cfg,
                                         num_images_per_prompt=2, generator=[torch.Generator().manual_seed(3 + k) for k in range(2)],
                                         output_type="latent").images
    assert ours.shape[0] == 2 and torch.equal(ours, ref)


@pytest.mark.parametrize("scheduler", ["euler", "euler_ancestral", "lcm"])
def test_image_k_of_a_batch_is_the_single_run_with_seed_plus_k(sd_model, tmp_path, scheduler):
    """The documented generator rule: each image draws its start noise, and an ancestral
    sampler's step noise, from its own generator seeded seed + k."""
    batch = graph_latent(sd_model, tmp_path, scheduler=scheduler, steps=3, cfg=4.0, seed=10, batch=3)
    for k in range(3):
        single = graph_latent(sd_model, tmp_path, scheduler=scheduler, steps=3, cfg=4.0, seed=10 + k)
        assert torch.allclose(batch[k:k + 1], single, atol=1e-5), (scheduler, k)
