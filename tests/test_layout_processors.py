"""The layout attention processors against diffusers' own, bit for bit, on tiny models.

Where no patch acts at a layer and step, each processor must give exactly what diffusers'
processor gives (it delegates); where it only records probabilities, the output must still be
diffusers' (the probabilities are computed on the side).
"""

from types import SimpleNamespace

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from kernels.attention import AttentionController, LayoutCrossAttnProcessor, SelfAttnRecorder
from kernels.layout import FluxLayoutAttnProcessor, JointMaskController, SD3LayoutAttnProcessor

BOXES = [{"x0": 0.0, "y0": 0.0, "x1": 0.5, "y1": 1.0, "phrase": "a"},
         {"x0": 0.5, "y0": 0.0, "x1": 1.0, "y1": 1.0, "phrase": "b"}]


class Recorder:
    """A transform that only records (cross- and self-attention) probabilities."""

    def __init__(self):
        self.cross, self.self_ = [], []

    def wants_probs(self, ctl, layer):
        return True

    def record(self, ctl, layer, probs):
        self.cross.append(probs)

    def wants_self_probs(self, ctl, layer):
        return True

    def record_self(self, ctl, layer, probs):
        self.self_.append(probs)


class Inactive:
    """A Paint-with-Words-like transform whose step window excludes every step."""

    def wants_bias(self, ctl, layer):
        return False

    def bias(self, ctl, layer, q, k):
        raise AssertionError("bias asked for outside its window")

    def edit_active(self, ctl, layer):
        return False

    def edit_probs(self, ctl, layer, probs):
        raise AssertionError("edit asked for outside its window")

    def regions(self, ctl, layer):
        return []


@pytest.fixture(scope="module")
def unet(tiny_pixel_model):
    from kernels.models import load_model_folder

    return load_model_folder(tiny_pixel_model)[0].unet


def controller(transforms, batch=2, latent_hw=(16, 16)):
    run = SimpleNamespace(steps=1, latent_shape=(batch, 3, *latent_hw), scheduler=None)
    ctl = AttentionController(run)
    ctl.transforms = list(transforms)
    ctl.cond_rows = slice(batch // 2, batch)  # CFG batches [uncond, cond]
    return ctl


def attention_layer(unet, suffix):
    name = next(n for n in unet.attn_processors if n.endswith(suffix))
    return name, unet.get_submodule(name[:-len(".processor")])


def test_unet_cross_attention_processor_is_diffusers_own_when_idle_or_recording(unet):
    torch.manual_seed(0)
    name, attn = attention_layer(unet, "attn2.processor")
    hidden = torch.randn(2, 64, attn.to_q.in_features)
    context = torch.randn(2, 16, attn.to_k.in_features)
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, hidden, context)
        idle = LayoutCrossAttnProcessor(name, controller([Inactive()]))(attn, hidden, context)
        recorder = Recorder()
        recorded = LayoutCrossAttnProcessor(name, controller([recorder]))(attn, hidden, context)
    assert torch.equal(idle, expected)
    # the written-out path (taken for recording) keeps diffusers' order of operations
    assert torch.equal(recorded, expected)
    (probs,) = recorder.cross
    assert probs.shape == (1, attn.heads, 64, 16)  # the conditional row only
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-6)


def test_unet_processor_is_diffusers_own_on_self_attention_too(unet):
    torch.manual_seed(1)
    name, attn = attention_layer(unet, "attn1.processor")
    hidden = torch.randn(2, 64, attn.to_q.in_features)
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, hidden)
        recorded = LayoutCrossAttnProcessor(name, controller([Recorder()]))(attn, hidden)
    assert torch.equal(recorded, expected)


def test_self_attention_recorder_keeps_diffusers_output_and_records_its_probabilities(unet):
    torch.manual_seed(2)
    name, attn = attention_layer(unet, "attn1.processor")
    hidden = torch.randn(2, 64, attn.to_q.in_features)
    recorder = Recorder()
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, hidden)
        out = SelfAttnRecorder(name, controller([recorder]), AttnProcessor2_0())(attn, hidden)
        cond = hidden[1:]
        scores = attn.get_attention_scores(attn.head_to_batch_dim(attn.to_q(cond)),
                                           attn.head_to_batch_dim(attn.to_k(cond)))
    assert torch.equal(out, expected)
    (probs,) = recorder.self_
    assert torch.allclose(probs.flatten(0, 1), scores, atol=1e-6)  # diffusers' own softmax


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4,
                                 num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                 joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=8, pos_embed_max_size=8,
                                 dual_attention_layers=(0,)).eval()


def sd3_inputs(n_text=6):
    return dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, n_text, 16),
                pooled_projections=torch.randn(1, 8), timestep=torch.tensor([500.0]), return_dict=False)


def test_sd3_processor_is_diffusers_joint_processor_when_no_mask_is_on():
    from kernels.patching import attention_processors

    tr = tiny_sd3()
    assert {type(p) for p in tr.attn_processors.values()} == {JointAttnProcessor2_0}
    n_text = 6
    # every window closed: no mask for any call (joint attention and SD3.5's image-only attn2)
    closed = JointMaskController(n_text, (4, 4), [[1, 2], [3, 4]], BOXES, i2i_steps=0, i2t_steps=0,
                                 t2i_steps=0, t2t_steps=0, text_first=False)
    torch.manual_seed(3)
    kwargs = sd3_inputs(n_text)
    with torch.no_grad():
        expected = tr(**kwargs)[0]
        procs = {n: SD3LayoutAttnProcessor(closed) for n in tr.attn_processors}
        assert any(n.endswith("attn2.processor") for n in procs)
        with attention_processors(tr, procs):
            out = tr(**kwargs)[0]
    assert torch.equal(out, expected)


def test_sd3_masked_path_with_nothing_blocked_matches_diffusers():
    """The written-out masked path is diffusers' computation: an all-True mask changes nothing
    but SDPA's kernel choice."""
    tr = tiny_sd3()
    n_text = 6
    ctl = SimpleNamespace(mask_for=lambda seq: torch.ones(seq, seq, dtype=torch.bool),
                          image_mask_for=lambda seq: torch.ones(seq, seq, dtype=torch.bool))
    attn = tr.transformer_blocks[0].attn
    torch.manual_seed(4)
    hidden, context = torch.randn(1, 16, 16), torch.randn(1, n_text, 16)
    with torch.no_grad():
        expected = JointAttnProcessor2_0()(attn, hidden, context)
        out = SD3LayoutAttnProcessor(ctl)(attn, hidden, context)
        image_only = tr.transformer_blocks[0].attn2
        expected_2 = JointAttnProcessor2_0()(image_only, hidden)
        out_2 = SD3LayoutAttnProcessor(ctl)(image_only, hidden)
    for a, b in zip(out, expected):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(out_2, expected_2, atol=1e-6)


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)).eval()


def flux_inputs(h=4, w=4, n_text=6):
    grid = torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    return dict(hidden_states=torch.randn(1, h * w, 4), encoder_hidden_states=torch.randn(1, n_text, 16),
                pooled_projections=torch.randn(1, 16), img_ids=torch.stack(grid, -1).reshape(-1, 3),
                txt_ids=torch.zeros(n_text, 3), timestep=torch.tensor([0.5]))


def test_flux_processor_is_diffusers_flux_processor_when_no_mask_is_on():
    from kernels.patching import attention_processors

    tr = tiny_flux()
    assert {type(p) for p in tr.attn_processors.values()} == {FluxAttnProcessor}
    n_text = 6
    closed = JointMaskController(n_text, (4, 4), [[2, 3], [4, 5]], BOXES, i2i_steps=0, i2t_steps=0,
                                 t2i_steps=0, t2t_steps=0)
    torch.manual_seed(5)
    kwargs = flux_inputs(n_text=n_text)
    with torch.no_grad():
        expected = tr(**kwargs).sample
        with attention_processors(tr, {n: FluxLayoutAttnProcessor(closed) for n in tr.attn_processors}):
            out = tr(**kwargs).sample
    assert torch.equal(out, expected)


def test_flux_mask_goes_through_diffusers_processor_and_matches_the_recording_path():
    """With a mask on, diffusers' processor gets it as its attention mask; the written-out
    recording path computes the same attention."""
    from kernels.patching import attention_processors

    tr = tiny_flux()
    n_text = 6
    ctl = JointMaskController(n_text, (4, 4), [[2, 3], [4, 5]], BOXES, global_text=[0, 1])
    torch.manual_seed(6)
    kwargs = flux_inputs(n_text=n_text)
    with torch.no_grad():
        plain = tr(**kwargs).sample
        procs = {n: FluxLayoutAttnProcessor(ctl) for n in tr.attn_processors}
        with attention_processors(tr, procs):
            masked = tr(**kwargs).sample
            for p in procs.values():
                p.record = True
            recorded = tr(**kwargs).sample
    assert not torch.allclose(masked, plain, atol=1e-4)
    assert torch.allclose(recorded, masked, atol=1e-5)
    assert all(p.last_probs is not None for p in procs.values())
