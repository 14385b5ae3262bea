"""FLUX.1 folders (FluxPipeline): load, encode, and sample in a graph exactly as the diffusers
pipeline does, for a guidance-distilled ("dev") and a guidance-free ("schnell") tiny model."""

import json
import os

import pytest
import torch
from conftest import CAPTURED, txt2img_graph

from app.engine import Executor
from kernels.models import ModelLoadError, load_model_folder
from nodes.registry import add_node

PROMPT = "a red circle and a blue square"
SIZE, STEPS, SEED = 16, 3, 1


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory):
    from kernels.tiny_flux import build_tiny_flux_model

    return build_tiny_flux_model(str(tmp_path_factory.mktemp("models") / "tiny-flux-dev"))


@pytest.fixture(scope="module")
def flux_schnell(tmp_path_factory):
    from kernels.tiny_flux import build_tiny_flux_model

    return build_tiny_flux_model(str(tmp_path_factory.mktemp("models") / "tiny-flux-schnell"),
                                 guidance_embeds=False)


def flux_pipeline(path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_graph(path, tmp_path, cfg):
    """LoadModel -> TextEncode -> EmptyLatent -> Sampler -> capture (+ decode), run on the CPU."""
    g, ids = txt2img_graph(path, prompt=PROMPT, steps=STEPS, size=SIZE, seed=SEED,
                           scheduler="flow_match_euler", cfg=cfg, save=False)
    capture = add_node(g, "TestCaptureLatent", {}).id
    g.connect(ids["sampler"], "latent", capture, "latent")
    preview = add_node(g, "PreviewImage", {}).id
    g.connect(ids["decode"], "image", preview, "image")
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    return CAPTURED["latent"]


def pipeline_latent(path, guidance_scale):
    """What FluxPipeline makes of the same prompt, size, steps and seed, unpacked to (B, 16, h, w)."""
    pipe = flux_pipeline(path)
    packed = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                  guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(SEED),
                  output_type="latent", max_sequence_length=16).images
    return pipe._unpack_latents(packed, SIZE, SIZE, pipe.vae_scale_factor)


def test_flux_folder_loads_as_model_clip_and_vae(flux_dev):
    from diffusers import FluxTransformer2DModel

    from kernels.flux import FluxTextEncoders, FluxTokenizers

    model, clip, vae = load_model_folder(flux_dev)
    assert isinstance(model.unet, FluxTransformer2DModel) and model.is_flow
    assert model.in_channels == 16  # the transformer's 64 are 2x2 patches of 16 channels
    assert isinstance(clip.text_encoder, FluxTextEncoders)
    assert isinstance(clip.tokenizer, FluxTokenizers) and clip.tokenizer.max_sequence_length == 16
    assert (vae.latent_channels, vae.scale_factor) == (16, 2)
    assert vae.vae.config.shift_factor == pytest.approx(0.1159)


def test_flux_encoding_is_what_the_pipeline_feeds_its_transformer(flux_dev):
    from kernels.text import encode_text

    _model, clip, _vae = load_model_folder(flux_dev)
    cond = encode_text(clip.tokenizer, clip.text_encoder, PROMPT)
    assert cond.empty is None and cond.empty_pooled is None  # no negative: no CFG batch
    pipe = flux_pipeline(flux_dev)
    fed = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda _m, _args, kwargs: fed.append((kwargs["encoder_hidden_states"], kwargs["pooled_projections"])),
        with_kwargs=True)
    try:
        pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=1, max_sequence_length=16,
             output_type="latent")
    finally:
        hook.remove()
    (text, pooled), = fed
    assert torch.equal(text, cond.embeds) and torch.equal(pooled, cond.pooled)
    # the word map is over T5's tokens (no start token: "a" is token 0)
    assert cond.words["a"] == (0, 4) and cond.words["red"] == (1,) and cond.words["square"] == (6,)
    assert cond.positions("blue square") == [5, 6]


def test_flux_dev_txt2img_graph_matches_the_diffusers_pipeline(flux_dev, tmp_path):
    latent = run_graph(flux_dev, tmp_path, cfg=3.5)
    assert latent.shape == (1, 16, SIZE // 2, SIZE // 2)
    assert torch.equal(latent, pipeline_latent(flux_dev, guidance_scale=3.5))
    # the guidance scale reaches the transformer: another cfg gives another latent
    assert not torch.equal(run_graph(flux_dev, tmp_path, cfg=5.0), latent)


def test_flux_schnell_txt2img_graph_matches_the_diffusers_pipeline(flux_schnell, tmp_path):
    latent = run_graph(flux_schnell, tmp_path, cfg=1.0)
    assert torch.equal(latent, pipeline_latent(flux_schnell, guidance_scale=0.0))


@pytest.mark.parametrize("steps, denoise", [(4, 0.5), (3, 0.6)])
def test_flux_img2img_matches_the_diffusers_img2img_pipeline(flux_dev, steps, denoise):
    """denoise < 1 keeps the schedule's tail as FluxImg2ImgPipeline's strength does (which, unlike
    SD's, does not round steps * strength down); the pipeline takes the init latent as is."""
    from diffusers import FluxImg2ImgPipeline

    from kernels.sampling import make_scheduler, sample
    from kernels.text import encode_text

    model, clip, _vae = load_model_folder(flux_dev)
    cond = encode_text(clip.tokenizer, clip.text_encoder, PROMPT)
    init = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(SEED)
    noise = torch.randn(init.shape, generator=generator)
    out = sample(model.unet, make_scheduler("flow_match_euler", model.scheduler_config), cond.embeds,
                 None, noise, steps, 3.5, generator, denoise=denoise, init=init, pooled=(cond.pooled, None))
    pipe = FluxImg2ImgPipeline.from_pretrained(flux_dev, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    packed = pipe(PROMPT, image=init, strength=denoise, height=SIZE, width=SIZE,
                  num_inference_steps=steps, guidance_scale=3.5, max_sequence_length=16,
                  generator=torch.Generator().manual_seed(SEED), output_type="latent").images
    assert torch.equal(out, pipe._unpack_latents(packed, SIZE, SIZE, pipe.vae_scale_factor))


def test_flux_sampler_refuses_a_negative_prompt(flux_dev):
    from kernels.flux import sample_flux
    from kernels.sampling import make_scheduler

    model, _clip, _vae = load_model_folder(flux_dev)
    text = torch.zeros(1, 4, 32)
    with pytest.raises(ValueError, match="negative"):
        sample_flux(model.unet, make_scheduler("flow_match_euler", model.scheduler_config), text, text,
                    torch.zeros(1, 16, 8, 8), 1, 1.0, pooled=(torch.zeros(1, 32), None))


def test_other_flux_pipelines_are_refused_clearly(tmp_path):
    folder = tmp_path / "flux-fill"
    os.makedirs(folder)
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "FluxFillPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    with pytest.raises(ModelLoadError, match="FluxFillPipeline"):
        load_model_folder(str(folder))
