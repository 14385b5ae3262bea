"""Stable Diffusion 3 (MM-DiT) folders: load, encode, sample in a graph, and the 3DIS joint
attention mask (JointAttentionMask) on SD3's [image, text] joint attention. Tiny random models."""

import pytest
import torch
from conftest import CAPTURED, inputs_fed_to, txt2img_graph

from app.engine import Executor
from kernels.models import load_model_folder
from nodes.registry import add_node

PROMPT = "a red circle and a blue square"
BOXES = [{"x0": 0.0, "y0": 0.0, "x1": 0.5, "y1": 1.0, "phrase": "red circle"},
         {"x0": 0.5, "y0": 0.0, "x1": 1.0, "y1": 1.0, "phrase": "blue square"}]


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory):
    from kernels.tiny import build_tiny_sd3_model

    return build_tiny_sd3_model(str(tmp_path_factory.mktemp("models") / "tiny-sd3"))


def sd3_graph(path, *, layout=None, steps=3, image_steps=1, text_steps=2, batch=1):
    """LoadModel -> TextEncode -> EmptyLatent -> Sampler -> VAEDecode (+ JointAttentionMask)."""
    g, ids = txt2img_graph(path, prompt=PROMPT, steps=steps, scheduler="flow_match_euler",
                           cfg=4.0, save=False, batch=batch)
    ids["capture"] = add_node(g, "TestCaptureLatent", {}).id
    g.connect(ids["sampler"], "latent", ids["capture"], "latent")
    ids["preview"] = add_node(g, "PreviewImage", {}).id
    g.connect(ids["decode"], "image", ids["preview"], "image")
    if layout is not None:
        ids["layout"] = add_node(g, "Layout", {"width": 16, "height": 16, "boxes": layout}).id
        ids["mask"] = add_node(g, "JointAttentionMask", {"image_steps": image_steps,
                                                         "text_steps": text_steps}).id
        g.connect(ids["load"], "model", ids["mask"], "model")
        g.connect(ids["layout"], "layout", ids["mask"], "layout")
        g.connect(ids["text"], "conditioning", ids["mask"], "positive")
        g.connect(ids["mask"], "model", ids["sampler"], "model")
    return g, ids


def run_ok(g, tmp_path, events=None, executor=None):
    ex = executor or Executor(device="cpu", disk_cache=False)
    report = ex.run(g, output_dir=tmp_path, events=events)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    return report


def test_sd3_folder_loads_with_all_text_encoders(sd3_model):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from kernels.text import SD3TextEncoders, encode_text

    model, clip, vae = load_model_folder(sd3_model)
    assert isinstance(model.unet, SD3Transformer2DModel) and model.is_flow
    assert isinstance(clip.text_encoder, SD3TextEncoders) and clip.text_encoder.text_encoder_3 is not None
    assert (vae.latent_channels, vae.scale_factor) == (4, 2)
    assert vae.size_multiple == 2 * model.unet.config.patch_size  # image sizes in whole patches
    cond = encode_text(clip.tokenizer, clip.text_encoder, PROMPT)
    # the joint sequence and pooled projections are what the pipeline itself feeds its
    # transformer (uncond half first), caught on the way in
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    (text, pooled), = inputs_fed_to(
        pipe.transformer, ("encoder_hidden_states", "pooled_projections"),
        lambda: pipe(PROMPT, height=16, width=16, num_inference_steps=1, guidance_scale=4.0,
                 max_sequence_length=16, output_type="latent"))
    assert torch.equal(text, torch.cat([cond.empty, cond.embeds]))
    assert torch.equal(pooled, torch.cat([cond.empty_pooled, cond.pooled]))
    # each word sits in the CLIP part (0..15 here) and in the T5 part after it; links pair them
    n_clip = clip.tokenizer.tokenizer.model_max_length
    assert cond.words["red"] == (2, n_clip + 1) and cond.words["a"] == (1, 5, n_clip, n_clip + 4)
    assert cond.linked([2, 3]) == [2, 3, n_clip + 1, n_clip + 2]


def test_sd3_txt2img_graph_matches_the_diffusers_pipeline(sd3_model, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    g, ids = sd3_graph(sd3_model)
    shown = []
    from app.engine import EngineEvents

    run_ok(g, tmp_path, EngineEvents(images=lambda nid, images, paths: shown.append(images)))
    assert shown and shown[0].shape == (1, 16, 16, 3)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPT, height=16, width=16, num_inference_steps=3, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(1), output_type="latent",
               max_sequence_length=16).images
    assert torch.equal(CAPTURED["latent"], ref)


def test_sd3_batch_is_the_pipelines_images_per_prompt(sd3_model, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    g, _ids = sd3_graph(sd3_model, steps=2, batch=2)
    run_ok(g, tmp_path)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPT, height=16, width=16, num_inference_steps=2, guidance_scale=4.0, num_images_per_prompt=2,
               generator=[torch.Generator().manual_seed(1 + k) for k in range(2)], output_type="latent", max_sequence_length=16).images
    assert CAPTURED["latent"].shape[0] == 2 and torch.equal(CAPTURED["latent"], ref)


def test_joint_attention_mask_with_no_boxes_is_bit_identical(sd3_model, tmp_path):
    run_ok(sd3_graph(sd3_model)[0], tmp_path)
    plain = CAPTURED["latent"]
    run_ok(sd3_graph(sd3_model, layout=[])[0], tmp_path)
    assert torch.equal(CAPTURED["latent"], plain)


def test_joint_attention_mask_blocks_other_instances_during_its_steps(sd3_model, tmp_path, monkeypatch):
    from kernels import layout as kl
    from kernels.text import encode_text

    records = []
    original = kl.SD3LayoutAttnProcessor.__call__

    def recording(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        self.record = True
        out = original(self, attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        if encoder_hidden_states is not None:
            records.append((self.ctl.step, self.last_probs))
        return out

    monkeypatch.setattr(kl.SD3LayoutAttnProcessor, "__call__", recording)
    ex = Executor(device="cpu", disk_cache=False)
    run_ok(sd3_graph(sd3_model, steps=4)[0], tmp_path, executor=ex)
    plain = CAPTURED["latent"]
    g, ids = sd3_graph(sd3_model, layout=BOXES, steps=4, image_steps=1, text_steps=2)
    run_ok(g, tmp_path, executor=ex)
    assert not torch.equal(CAPTURED["latent"], plain)

    # the phrases' tokens, CLIP and T5 parts (what the node resolved)
    _model, clip, _vae = load_model_folder(sd3_model)
    cond = encode_text(clip.tokenizer, clip.text_encoder, PROMPT)
    boxes = kl.resolve_layout({"boxes": BOXES}, cond)
    groups = [cond.linked(b["tokens"]) for b in boxes]
    assert all(len(gr) == 4 for gr in groups)  # two words, each in CLIP and in T5
    h = w = 4  # 16 px / VAE 2 / patch 2
    n_img = h * w
    region = torch.arange(n_img).view(h, w)
    rows = [region[:, :2].flatten(), region[:, 2:].flatten()]  # SD3: image tokens come first
    assert sorted({step for step, _ in records}) == [0, 1, 2, 3]
    assert len(records) == 4 * 2  # 4 steps x 2 blocks
    for step, probs in records:
        assert probs.shape[-1] == n_img + cond.embeds.shape[1] and probs.shape[0] == 2  # CFG
        for i, j in ((0, 1), (1, 0)):
            other = torch.tensor(groups[j]) + n_img
            to_other = probs[:, :, rows[i]][:, :, :, other]
            own = probs[:, :, rows[i]][:, :, :, torch.tensor(groups[i]) + n_img]
            if step < 2:
                assert torch.all(to_other == 0), step
                assert torch.all(own > 0)
            else:
                assert torch.all(to_other > 0), step
    # the loaded model is left as it was: SD3's own processors back in place
    model = ex.models.load(sd3_model, "float32", load_model_folder)[0]
    assert all(type(p).__name__ == "JointAttnProcessor2_0" for p in model.unet.attn_processors.values())


def test_sd3_processor_masks_joint_and_dual_attention_and_is_exact_when_off():
    """Kernel level: SD3.5's image-only attn2 gets the image->image part of the mask, and once
    every window has closed the processor gives the unpatched transformer's output exactly."""
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from kernels.layout import JointAttentionMaskPatch

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4,
                               num_layers=2, attention_head_dim=8, num_attention_heads=2,
                               joint_attention_dim=16, caption_projection_dim=16,
                               pooled_projection_dim=8, pos_embed_max_size=8,
                               dual_attention_layers=(0,)).eval()
    n_text, h, w = 6, 4, 4
    kwargs = dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, n_text, 16),
                  pooled_projections=torch.randn(1, 8), return_dict=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(3)
    run = SimpleNamespace(scheduler=scheduler, latent_shape=(1, 4, 8, 8))
    groups = [[1, 2], [3, 4]]
    patch = JointAttentionMaskPatch({"boxes": BOXES}, groups, n_text, None, i2i_steps=1,
                                    i2t_steps=2, t2i_steps=2, t2t_steps=2)
    ts = scheduler.timesteps
    region = torch.arange(h * w).view(h, w)
    left, right = region[:, :2].flatten(), region[:, 2:].flatten()
    with torch.no_grad():
        plain = tr(**kwargs, timestep=ts[2:])[0]
        with patch.applied(tr, run) as joint:
            procs = joint.processors
            assert any(n.endswith("attn2.processor") for n in procs)
            for p in procs.values():
                p.record = True
            tr(**kwargs, timestep=ts[:1])
            assert joint.controller.step == 0 and joint.controller.image_hw == (4, 4)
            for p in procs.values():  # image->image: [image, text] in attn, image only in attn2
                assert torch.all(p.last_probs[0][:, left][:, :, right] == 0)
                assert torch.all(p.last_probs[0][:, left][:, :, left] > 0)
            for p in procs.values():
                p.record = False
            off = tr(**kwargs, timestep=ts[2:])[0]
            assert joint.controller.step == 2
    assert torch.equal(off, plain)
