"""Speed techniques: FeatureCache (feature inheritance) and MagnitudePrune.

Exact checks on tiny random models: interval 1 and sparsity 0 are bit-identical to no patch; an
inherit step equals a hand-computed DeepCache step (shallow branch on the cached deep output) on
SD1.5- and SDXL-shaped UNets; the cache composes with RegionAttention; pruning hits its target
count, matches torch.nn.utils.prune's L1 pruning, and leaves the shared weights as they were.
"""

import copy

import pytest
import torch
from conftest import TWO_BOX_LAYOUT as LAYOUT
from conftest import QuietContext as Ctx
from conftest import same_state, state_copy

from kernels.layout import RegionAttentionPatch
from kernels.patching import SamplingRun
from kernels.speed.feature_cache import FeatureCacheError, FeatureCachePatch, refresh_steps, skipped_modules
from kernels.speed.magnitude_pruning import (
    MagnitudePrunePatch,
    PruningError,
    achieved_sparsity,
    prunable_weights,
    pruned_weights,
)
from kernels.text import encode_text
from nodes.base import NodeError
from nodes.core import Sampler, TextEncode
from nodes.speed import FeatureCache, MagnitudePrune


def sample(model, cond, steps=4, size=16):
    latent = torch.zeros(1, model.in_channels, size, size)
    return Sampler().run(Ctx(), model, cond, None, latent, "euler", steps, 4.0, 1, 1.0)["latent"]


# ---------------------------------------------------------------- feature cache: schedules

def test_refresh_steps_uniform_and_non_uniform():
    assert refresh_steps(20, 1) == frozenset(range(20))
    assert refresh_steps(20, 3) == frozenset(range(0, 20, 3))
    dense = sorted(refresh_steps(20, 4, "non-uniform"))
    assert len(dense) == len(refresh_steps(20, 4)) and dense[0] == 0 and dense[-1] == 19
    gaps = [b - a for a, b in zip(dense, dense[1:])]
    assert gaps[0] < max(gaps) and gaps[-1] < max(gaps)  # denser at both ends than in the middle
    assert refresh_steps(20, 1, "non-uniform") == frozenset(range(20))
    with pytest.raises(FeatureCacheError, match="interval"):
        refresh_steps(20, 0)
    with pytest.raises(FeatureCacheError, match="schedule"):
        refresh_steps(20, 2, "random")


# ---------------------------------------------------------------- feature cache: exactness

def test_interval_one_is_bit_identical_through_the_sampler(tiny_layout_model):
    model, _clip, cond = tiny_layout_model
    base = sample(model, cond)
    for schedule in ("uniform", "non-uniform"):
        assert torch.equal(sample(model.with_patch(FeatureCachePatch(1, 1, schedule)), cond), base)
    cached = sample(model.with_patch(FeatureCachePatch(2, 1)), cond)
    assert not torch.equal(cached, base)  # interval 2 does reuse something
    assert "forward" not in model.unet.mid_block.__dict__  # the wrappers went with the run


def _sdxl_inputs(unet, batch):
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]] * batch)}


def _manual_inherit_step(unet, x, t, text, added, cached, depth):
    """DeepCache's inherit step by hand: time embedding, conv_in, the first `depth` down blocks,
    then the last `depth` up blocks from the cached deep output with the shallow skips."""
    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=text, added_cond_kwargs=added)
    emb = emb + aug if aug is not None else emb
    h = unet.conv_in(x)
    skips = (h,)
    for block in unet.down_blocks[:depth]:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=text)
        else:
            h, res = block(hidden_states=h, temb=emb)
        skips += res
    h = cached
    n = len(unet.up_blocks)
    # the shallow up blocks take the first skips; the rest (a shallow downsampler's output) fed
    # the deep up blocks, which are skipped
    skips = skips[:sum(len(b.resnets) for b in unet.up_blocks[n - depth:])]
    for block in unet.up_blocks[n - depth:]:
        res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=text)
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


def _check_inherit_step_equals_manual(unet, sdxl: bool):
    depth, batch = 1, 2  # the CFG batch [uncond, cond]
    c, size = unet.config.in_channels, 8
    torch.manual_seed(0)
    x0, x1 = torch.randn(batch, c, size, size), torch.randn(batch, c, size, size)
    text = torch.randn(batch, 5, unet.config.cross_attention_dim)
    kwargs = {"added_cond_kwargs": _sdxl_inputs(unet, batch)} if sdxl else {}
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    t0, t1 = scheduler.timesteps
    deep = unet.up_blocks[len(unet.up_blocks) - depth - 1]
    seen = []
    handle = deep.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        full0 = unet(x0, t0, encoder_hidden_states=text, **kwargs).sample
    handle.remove()
    with torch.no_grad():
        expected = _manual_inherit_step(unet, x1, t1, text, kwargs.get("added_cond_kwargs"), seen[0], depth)
        full1 = unet(x1, t1, encoder_hidden_states=text, **kwargs).sample
    run = SamplingRun(unet=unet, scheduler=scheduler, positive=None, negative=None, cfg=4.0, steps=2,
                      latent_shape=tuple(x0.shape))
    patch = FeatureCachePatch(2, depth)
    with torch.no_grad(), patch.applied(unet, run):
        got0 = unet(x0, t0, encoder_hidden_states=text, **kwargs).sample
        got1 = unet(x1, t1, encoder_hidden_states=text, **kwargs).sample
        assert run.state[patch].inherited_steps == 1
        lone = unet(x1[:1], t1, encoder_hidden_states=text[:1],  # another batch shape: no cache yet
                    **({"added_cond_kwargs": _sdxl_inputs(unet, 1)} if sdxl else {})).sample
    assert torch.equal(got0, full0)  # the refresh step is the plain forward
    assert torch.equal(got1, expected)  # the inherit step is the hand-computed reuse
    assert not torch.equal(got1, full1)
    assert run.state == {} and lone.shape[0] == 1
    for name in skipped_modules(unet, depth):
        assert "forward" not in unet.get_submodule(name).__dict__  # wrappers removed


def test_inherit_step_equals_hand_computed_reuse_sd15(tiny_bundle):
    model, _ = tiny_bundle
    _check_inherit_step_equals_manual(model.unet, sdxl=False)


def test_inherit_step_equals_hand_computed_reuse_sdxl(tmp_path):
    from diffusers import UNet2DConditionModel

    from kernels.tiny import build_tiny_sdxl_model

    unet = UNet2DConditionModel.from_pretrained(build_tiny_sdxl_model(str(tmp_path / "xl")), subfolder="unet")
    assert unet.config.addition_embed_type == "text_time"
    _check_inherit_step_equals_manual(unet.eval(), sdxl=True)


def test_composes_with_region_attention(tiny_layout_model):
    model, _clip, cond = tiny_layout_model
    region = RegionAttentionPatch(LAYOUT, 3.0)
    with_region = sample(model.with_patch(region), cond)
    # interval 1 on top of the layout patch changes nothing, in either order
    assert torch.equal(sample(model.with_patch(region).with_patch(FeatureCachePatch(1)), cond), with_region)
    assert torch.equal(sample(model.with_patch(FeatureCachePatch(1)).with_patch(region), cond), with_region)
    cache_only = sample(model.with_patch(FeatureCachePatch(2)), cond)
    both = sample(model.with_patch(FeatureCachePatch(2)).with_patch(region), cond)
    assert not torch.equal(both, cache_only)  # the layout patch still acts with the cache on
    assert not torch.equal(both, with_region)
    assert torch.equal(sample(model.with_patch(FeatureCachePatch(2)).with_patch(region), cond), both)


def test_feature_cache_node(tiny_layout_model):
    model, _clip, cond = tiny_layout_model
    out = FeatureCache().run(Ctx(), model, 3, 1, "non-uniform")["model"]
    assert out is not model and model.patches == () and len(out.patches) == 1
    keys = {FeatureCachePatch(i, 1, s).cache_key() for i in (1, 2) for s in ("uniform", "non-uniform")}
    assert len(keys) == 4
    with pytest.raises(NodeError, match="depth must be 1..1"):
        FeatureCache().run(Ctx(), model, 3, 2, "uniform")


# ---------------------------------------------------------------- magnitude pruning

@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.2, 0.35, 0.6])
def test_achieved_sparsity_is_the_target(tiny_bundle, scope, sparsity):
    model, clip = tiny_bundle
    for module in (model.unet, clip.text_encoder):
        before = state_copy(module)
        patch = MagnitudePrunePatch(sparsity, scope)
        with patch.applied(module, None):
            assert abs(achieved_sparsity(module) - sparsity) <= 0.005
            if scope == "layer":
                for w in prunable_weights(module).values():
                    assert abs(float((w == 0).float().mean()) - sparsity) <= 0.5 / w.numel() + 1e-9
        assert same_state(module, before)


def test_matches_torch_l1_pruning(tiny_bundle):
    import torch.nn.utils.prune as prune

    model, clip = tiny_bundle
    for module in (model.unet, clip.text_encoder):
        names = list(prunable_weights(module))
        ref = copy.deepcopy(module)
        layers = [ref.get_submodule(n.rsplit(".", 1)[0]) for n in names]
        total = sum(m.weight.numel() for m in layers)
        prune.global_unstructured([(m, "weight") for m in layers], prune.L1Unstructured,
                                  amount=round(0.4 * total))
        ours = pruned_weights(module, 0.4, "global")
        for name, layer in zip(names, layers):
            assert torch.equal(ours.get(name, module.get_parameter(name)), layer.weight)
        first = copy.deepcopy(module.get_submodule(names[0].rsplit(".", 1)[0]))
        prune.l1_unstructured(first, "weight", amount=round(0.3 * first.weight.numel()))
        assert torch.equal(pruned_weights(module, 0.3, "layer")[names[0]], first.weight)


def test_ties_are_cut_to_the_exact_count():
    layer = torch.nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.5)
    out = pruned_weights(layer, 0.33)
    assert int((out["weight"] == 0).sum()) == 33


def test_sparsity_zero_is_identity_and_weights_come_back(tiny_bundle):
    model, clip = tiny_bundle
    cond = encode_text(clip.tokenizer, clip.text_encoder, "a red circle on the left")
    base = sample(model, cond)
    assert pruned_weights(model.unet, 0.0) == {}
    assert torch.equal(sample(model.with_patch(MagnitudePrunePatch(0.0)), cond), base)
    pm, pc = (o for o in MagnitudePrune().run(Ctx(), model, clip, 0.0, "global", "both").values())
    assert pm is model and pc is clip
    before_unet, before_text = state_copy(model.unet), state_copy(clip.text_encoder)
    pm, pc = MagnitudePrune().run(Ctx(), model, clip, 0.4, "layer", "both").values()
    pruned_cond = TextEncode().run(Ctx(), pc, "a red circle on the left")["conditioning"]
    assert not torch.equal(pruned_cond.embeds, cond.embeds)
    assert not torch.equal(sample(pm, pruned_cond), base)
    assert same_state(model.unet, before_unet) and same_state(clip.text_encoder, before_text)
    assert torch.equal(sample(model, cond), base)
    only_unet = MagnitudePrune().run(Ctx(), model, clip, 0.4, "global", "unet")
    assert only_unet["clip"] is clip and only_unet["model"] is not model


def test_bad_pruning_settings_are_named():
    with pytest.raises(PruningError, match="sparsity"):
        MagnitudePrunePatch(1.0)
    with pytest.raises(PruningError, match="scope"):
        MagnitudePrunePatch(0.2, "rows")
    assert MagnitudePrunePatch(0.2).cache_key() != MagnitudePrunePatch(0.2, "layer").cache_key()
