"""FLUX.1 folders (FluxPipeline): load, encode, and sample in a graph exactly as the diffusers
pipeline does, for a guidance-distilled ("dev") and a guidance-free ("schnell") tiny model."""

import json
import os

import pytest
import torch
from conftest import CAPTURED, inputs_fed_to, txt2img_graph

from app.engine import Executor
from kernels.models import ModelLoadError, load_model_folder
from nodes.registry import add_node

PROMPT = "a red circle and a blue square"
BOXES = [{"x0": 0.0, "y0": 0.0, "x1": 0.5, "y1": 1.0, "phrase": "red circle"},
         {"x0": 0.5, "y0": 0.0, "x1": 1.0, "y1": 1.0, "phrase": "blue square"}]
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


def run_graph(path, tmp_path, cfg, *, layout=None, steps=STEPS, executor=None, batch=1):
    """LoadModel -> TextEncode -> EmptyLatent -> Sampler -> capture (+ decode), run on the CPU;
    with a `layout`, a JointAttentionMask (1 image step, 2 text steps) patches the model."""
    g, ids = txt2img_graph(path, prompt=PROMPT, steps=steps, size=SIZE, seed=SEED,
                           scheduler="flow_match_euler", cfg=cfg, save=False, batch=batch)
    capture = add_node(g, "TestCaptureLatent", {}).id
    g.connect(ids["sampler"], "latent", capture, "latent")
    preview = add_node(g, "PreviewImage", {}).id
    g.connect(ids["decode"], "image", preview, "image")
    if layout is not None:
        lay = add_node(g, "Layout", {"width": SIZE, "height": SIZE, "boxes": layout}).id
        mask = add_node(g, "JointAttentionMask", {"image_steps": 1, "text_steps": 2}).id
        g.connect(ids["load"], "model", mask, "model")
        g.connect(lay, "layout", mask, "layout")
        g.connect(ids["text"], "conditioning", mask, "positive")
        g.connect(mask, "model", ids["sampler"], "model")
    executor = executor or Executor(device="cpu", disk_cache=False)
    report = executor.run(g, output_dir=tmp_path)
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
    (text, pooled), = inputs_fed_to(
        pipe.transformer, ("encoder_hidden_states", "pooled_projections"),
        lambda: pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=1, max_sequence_length=16,
                 output_type="latent"))
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


def test_flux_batch_is_the_pipelines_images_per_prompt(flux_dev, tmp_path):
    latent = run_graph(flux_dev, tmp_path, cfg=3.5, batch=2)
    pipe = flux_pipeline(flux_dev)
    packed = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=3.5,
                  num_images_per_prompt=2, generator=[torch.Generator().manual_seed(SEED + k) for k in range(2)], output_type="latent",
                  max_sequence_length=16).images
    assert latent.shape[0] == 2 and torch.equal(latent, pipe._unpack_latents(packed, SIZE, SIZE, pipe.vae_scale_factor))


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


def negative_graph(path, *, cfg, guidance=None):
    """run_graph's txt2img with a negative prompt, and FluxGuidance on the positive if given."""
    g, ids = txt2img_graph(path, prompt=PROMPT, steps=STEPS, size=SIZE, seed=SEED,
                           scheduler="flow_match_euler", cfg=cfg, save=False)
    neg = add_node(g, "TextEncode", {"text": NEGATIVE}).id
    g.connect(ids["load"], "clip", neg, "clip")
    g.connect(neg, "conditioning", ids["sampler"], "negative")
    if guidance is not None:
        fg = add_node(g, "FluxGuidance", {"guidance": guidance}).id
        g.connect(ids["text"], "conditioning", fg, "conditioning")
        g.connect(fg, "conditioning", ids["sampler"], "positive")
    ids["capture"] = add_node(g, "TestCaptureLatent", {}).id
    g.connect(ids["sampler"], "latent", ids["capture"], "latent")
    return g, ids


NEGATIVE = "a green triangle"


@pytest.mark.parametrize("guidance", [None, 2.0])
def test_flux_true_cfg_with_a_negative_matches_the_pipelines_true_cfg_scale(flux_dev, tmp_path, guidance):
    g, ids = negative_graph(flux_dev, cfg=4.0, guidance=guidance)
    report = Executor(device="cpu", disk_cache=False).run(g, targets=[ids["capture"]], output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    pipe = flux_pipeline(flux_dev)
    packed = pipe(PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, height=SIZE, width=SIZE,
                  num_inference_steps=STEPS, guidance_scale=3.5 if guidance is None else guidance,
                  generator=torch.Generator().manual_seed(SEED), output_type="latent",
                  max_sequence_length=16).images
    assert torch.equal(CAPTURED.pop("latent"), pipe._unpack_latents(packed, SIZE, SIZE, pipe.vae_scale_factor))


def test_flux_guidance_without_a_negative_is_the_same_as_that_cfg(flux_dev, tmp_path):
    """FluxGuidance sets the distilled guidance; without a negative, cfg 3.5 is the same thing."""
    plain = run_graph(flux_dev, tmp_path, cfg=3.5).clone()
    g, ids = txt2img_graph(flux_dev, prompt=PROMPT, steps=STEPS, size=SIZE, seed=SEED,
                           scheduler="flow_match_euler", cfg=1.0, save=False)
    fg = add_node(g, "FluxGuidance", {"guidance": 3.5}).id
    g.connect(ids["text"], "conditioning", fg, "conditioning")
    g.connect(fg, "conditioning", ids["sampler"], "positive")
    cap = add_node(g, "TestCaptureLatent", {}).id
    g.connect(ids["sampler"], "latent", cap, "latent")
    assert Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path).ok
    assert torch.equal(CAPTURED.pop("latent"), plain)


def test_flux_true_cfg_needs_the_negatives_pooled_embedding(flux_dev):
    from kernels.flux import sample_flux
    from kernels.sampling import make_scheduler

    model, _clip, _vae = load_model_folder(flux_dev)
    text = torch.zeros(1, 4, 32)
    with pytest.raises(ValueError, match="negative's pooled"):
        sample_flux(model.unet, make_scheduler("flow_match_euler", model.scheduler_config), text, text,
                    torch.zeros(1, 16, 8, 8), 1, 4.0, pooled=(torch.zeros(1, 32), None))


def test_empty_latent_asks_for_sizes_the_packed_latent_can_take(flux_dev):
    from nodes.base import NodeError
    from nodes.core import EmptyLatent

    _model, _clip, vae = load_model_folder(flux_dev)
    assert vae.size_multiple == 2 * vae.scale_factor  # 2x2 packed latent patches
    with pytest.raises(NodeError, match=f"multiples of {vae.size_multiple}.*try 20x16"):
        EmptyLatent().run(None, vae, 19, 16, 1)
    assert EmptyLatent().run(None, vae, 20, 16, 1)["latent"].shape == (1, 16, 8, 10)


def test_other_flux_pipelines_are_refused_clearly(tmp_path):
    folder = tmp_path / "flux-fill"
    os.makedirs(folder)
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "FluxFillPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    with pytest.raises(ModelLoadError, match="FluxFillPipeline"):
        load_model_folder(str(folder))


def test_flux_joint_attention_mask_with_no_boxes_is_bit_identical(flux_dev, tmp_path):
    plain = run_graph(flux_dev, tmp_path, cfg=3.5)
    assert torch.equal(run_graph(flux_dev, tmp_path, cfg=3.5, layout=[]), plain)


def test_flux_joint_attention_mask_blocks_other_instances_during_its_steps(flux_dev, tmp_path,
                                                                            monkeypatch):
    from kernels import layout as kl
    from kernels.text import encode_text

    records = []
    original = kl.FluxLayoutAttnProcessor.__call__

    def recording(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        self.record = True
        out = original(self, attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        records.append((self.ctl.step, self.last_probs))
        return out

    monkeypatch.setattr(kl.FluxLayoutAttnProcessor, "__call__", recording)
    ex = Executor(device="cpu", disk_cache=False)
    plain = run_graph(flux_dev, tmp_path, cfg=3.5, steps=4, executor=ex)
    assert not torch.equal(run_graph(flux_dev, tmp_path, cfg=3.5, steps=4, layout=BOXES, executor=ex), plain)

    _model, clip, _vae = load_model_folder(flux_dev)
    cond = encode_text(clip.tokenizer, clip.text_encoder, PROMPT)
    groups = [b["tokens"] for b in kl.resolve_layout({"boxes": BOXES}, cond)]
    assert groups == [[1, 2], [5, 6]]  # T5 positions: FLUX's text is T5's sequence alone
    n_text, n_img = cond.embeds.shape[1], (SIZE // 4) ** 2  # 16 px / VAE 2 / 2x2 packing
    region = torch.arange(n_img).view(SIZE // 4, SIZE // 4)
    rows = [region[:, :2].flatten() + n_text, region[:, 2:].flatten() + n_text]  # FLUX: text first
    assert sorted({step for step, _ in records}) == [0, 1, 2, 3]
    assert len(records) == 4 * 2  # 4 steps x (1 double + 1 single block)
    for step, probs in records:
        assert probs.shape[-1] == n_text + n_img and probs.shape[0] == 1  # no CFG batch
        for i, j in ((0, 1), (1, 0)):
            to_other = probs[:, :, rows[i]][:, :, :, torch.tensor(groups[j])]
            own = probs[:, :, rows[i]][:, :, :, torch.tensor(groups[i])]
            if step < 2:
                assert torch.all(to_other == 0), step
                assert torch.all(own > 0)
            else:
                assert torch.all(to_other > 0), step
