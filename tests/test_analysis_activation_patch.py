"""Activation patching of cross-attention on the tiny pixel model.

Exact checks: patching every cross-attention layer with B is bit-identical to sampling B;
patching none is A; one layer gives neither; the unconditional rows are left alone; the layer
spec selects by name and prefix and refuses unknown names; the effect table has one row per
layer with the all-layers end points; the shared UNet has no hook left afterwards.
"""

import pytest
import torch
from conftest import QuietContext as Ctx

from kernels.analysis.activation_patch import (
    ActivationPatchError,
    CrossAttentionPatch,
    cross_attention_layers,
    select_layers,
)
from kernels.models import load_model_folder
from kernels.patching import SamplingRun
from kernels.text import encode_text
from nodes.analysis import ActivationPatch
from nodes.base import NodeError
from nodes.core import Sampler


@pytest.fixture(scope="module")
def tiny(tiny_pixel_model):
    model, clip, vae = load_model_folder(tiny_pixel_model)
    enc = lambda p: encode_text(clip.tokenizer, clip.text_encoder, p)  # noqa: E731
    return model, vae, enc("a red circle"), enc("a blue square")


def sample(model, cond, seed=3):
    return Sampler().run(Ctx(), model, cond, None, torch.zeros(1, 3, 16, 16), "euler", 3, 4.0, seed, 1.0)["latent"]


def test_all_layers_is_b_and_none_is_a(tiny):
    model, _vae, a, b = tiny
    layers = cross_attention_layers(model.unet)
    assert len(layers) >= 2 and all(n.endswith("attn2") for n in layers)
    want_a, want_b = sample(model, a), sample(model, b)
    assert not torch.equal(want_a, want_b)
    assert torch.equal(sample(model.with_patch(CrossAttentionPatch(b.embeds, layers)), a), want_b)
    assert torch.equal(sample(model.with_patch(CrossAttentionPatch(b.embeds, ())), a), want_a)
    one = sample(model.with_patch(CrossAttentionPatch(b.embeds, layers[:1])), a)
    assert not torch.equal(one, want_a) and not torch.equal(one, want_b)
    assert all(not m._forward_pre_hooks for m in model.unet.modules())


def test_unconditional_rows_are_kept(tiny):
    model, _vae, a, b = tiny
    patch = CrossAttentionPatch(b.embeds, ())
    run = SamplingRun(unet=model.unet, scheduler=None, positive=a, negative=None, cfg=4.0, steps=1,
                      latent_shape=(1, 3, 16, 16))
    both = torch.cat([a.empty, a.embeds])
    out = patch.replaced(both, run)
    assert torch.equal(out[:1], a.empty) and torch.equal(out[1:], b.embeds)
    assert torch.equal(patch.replaced(a.embeds, run), b.embeds)
    with pytest.raises(ActivationPatchError, match="same chunk count"):
        patch.replaced(torch.cat([a.embeds, a.embeds], dim=1), run)


def test_layer_specs(tiny):
    model, *_ = tiny
    layers = cross_attention_layers(model.unet)
    assert select_layers(model.unet, "all") == tuple(layers)
    assert select_layers(model.unet, "none") == select_layers(model.unet, " ") == ()
    up = select_layers(model.unet, "up_blocks.0")
    assert up and all(n.startswith("up_blocks.0.") for n in up)
    assert select_layers(model.unet, f"{layers[-1]}, {layers[0]}") == (layers[0], layers[-1])
    with pytest.raises(ActivationPatchError, match="no cross-attention layer matches 'up_blocks.9'"):
        select_layers(model.unet, "up_blocks.9")


def test_node_image_and_effect_table(tiny):
    model, vae, a, b = tiny
    node = ActivationPatch()
    latent = torch.zeros(1, 3, 16, 16)
    out = node.run(Ctx(), model, vae, a, b, None, latent, "all", "euler", 3, 4.0, 3, True)
    assert torch.equal(out["latent"], sample(model, b))
    table = out["table"]
    layers = cross_attention_layers(model.unet)
    assert sorted(table.column("layer")) == sorted(layers)
    toward = table.column("toward B")
    assert toward == sorted(toward, reverse=True) and all(v < 1.0 for v in toward)
    none = node.run(Ctx(), model, vae, a, b, None, latent, "none", "euler", 3, 4.0, 3, False)
    assert torch.equal(none["latent"], sample(model, a)) and none["table"].rows == []
    with pytest.raises(NodeError, match="ActivationPatch: no cross-attention layer"):
        node.run(Ctx(), model, vae, a, b, None, latent, "attn9", "euler", 3, 4.0, 3, False)
