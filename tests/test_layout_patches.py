"""Layout patches are values: a cached patched MODEL runs the same every time, and nothing of a
run stays on a patch. Also: patch defaults are the nodes' defaults, and the shared step window
decides as the guidance patches always did."""

import copy
import inspect

import torch
from conftest import TWO_BOX_LAYOUT as LAYOUT
from conftest import QuietContext as Ctx

from kernels.layout import (
    AStarPatch,
    AttentionRecordPatch,
    BoxGuidancePatch,
    GuidanceTrace,
    RegionalPromptPatch,
    RegionAttentionPatch,
    ZestGuidePatch,
)
from kernels.sampling import in_step_window
from kernels.text import encode_text
from nodes.core import Sampler


def sample(model, cond, steps=4):
    latent = torch.zeros(1, 3, 16, 16)
    return Sampler().run(Ctx(), model, cond, None, latent, "euler", steps, 4.0, 1, 1.0)["latent"]


def same(a, b) -> bool:
    """Deep equality that compares tensors by value."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_cached_patched_model_runs_the_same_twice_and_keeps_no_run_state(tiny_layout_model):
    model, clip, cond = tiny_layout_model
    embeds = [encode_text(clip.tokenizer, clip.text_encoder, b["phrase"]).embeds for b in LAYOUT["boxes"]]
    patches = [
        RegionAttentionPatch(LAYOUT, 2.0, suppress_outside=True),
        RegionalPromptPatch(LAYOUT, embeds, emphasis=2.0, region_tokens=[[2, 3], [7, 8]]),
        ZestGuidePatch(LAYOUT, eta=1.0),
        BoxGuidancePatch(LAYOUT, eta=1.0, redistribute=True),  # CSG losses on (the node default)
        AStarPatch(LAYOUT, eta=0.3, end=0.75),  # retention: memory across steps
        AttentionRecordPatch(),
    ]
    patched = model
    for p in patches:
        patched = patched.with_patch(p)
    before = [copy.deepcopy(vars(p)) for p in patches]
    keys = [p.cache_key() for p in patches]
    first = sample(patched, cond)
    second = sample(patched, cond)
    assert torch.equal(first, second)
    assert not torch.equal(first, sample(model, cond))  # the patches did act
    for p, old, key in zip(patches, before, keys):
        assert same(vars(p), old), type(p).__name__
        assert p.cache_key() == key
    # each technique alone, run twice, is also the same (no state handed between its runs)
    for p in patches[2:5]:
        once = model.with_patch(p)
        assert torch.equal(sample(once, cond), sample(once, cond)), type(p).__name__


def test_guidance_trace_is_the_callers_and_changes_nothing(tiny_layout_model):
    model, _clip, cond = tiny_layout_model
    patch = ZestGuidePatch(LAYOUT, eta=1.0)
    plain = sample(model.with_patch(patch), cond)
    trace: list = []
    traced = sample(model.with_patch(patch).with_patch(GuidanceTrace(trace)), cond)
    assert torch.equal(traced, plain)
    assert [t["step"] for t in trace] == [0, 1]  # the first half of 4 steps
    assert "trace" not in vars(patch)


def test_attention_record_sink_gets_each_runs_maps(tiny_layout_model):
    model, _clip, cond = tiny_layout_model
    sink: list = []
    patched = model.with_patch(AttentionRecordPatch(sink=sink))
    sample(patched, cond, steps=2)
    sample(patched, cond, steps=2)
    assert len(sink) == 2 and torch.equal(sink[0], sink[1])  # a fresh store per run
    assert sink[0].shape[:2] == (1, cond.embeds.shape[1])


def test_patch_defaults_are_the_node_defaults():
    from nodes import registry

    def defaults_of(cls):
        return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}

    cases = [("RegionAttention", RegionAttentionPatch), ("RegionalPrompts", RegionalPromptPatch),
             ("ZestGuide", ZestGuidePatch), ("BoxGuidance", BoxGuidancePatch), ("AStar", AStarPatch)]
    for node_name, cls in cases:
        params = registry.get(node_name).params
        patch_defaults = defaults_of(cls)
        shared = set(params) & set(patch_defaults)
        assert len(shared) >= 3, node_name
        for name in shared:
            assert patch_defaults[name] == params[name].default, (node_name, name)
    joint = registry.get("JointAttentionMask").params
    from kernels.layout import JointAttentionMaskPatch

    jd = defaults_of(JointAttentionMaskPatch)
    assert jd["i2i_steps"] == joint["image_steps"].default
    assert jd["i2t_steps"] == jd["t2i_steps"] == jd["t2t_steps"] == joint["text_steps"].default


def test_attention_maps_offers_the_samplers_schedulers():
    from kernels.sampling import SCHEDULER_NAMES
    from nodes import registry

    choice = registry.get("AttentionMaps").params["scheduler"]
    assert tuple(choice.options) == SCHEDULER_NAMES and choice.default == "euler"


def test_step_window_decides_as_the_guidance_check_did():
    """Guidance used `start <= i / n < end`; the shared window adds `end >= 1` as "to the last
    step", which i / n < 1 never needs: the same decision for every step that can occur."""
    bounds = [k / 20 for k in range(21)] + [0.3, 0.7, 1.0 / 3]
    for n in range(1, 61):
        for i in range(n):
            frac = i / max(n, 1)
            for start in bounds:
                for end in bounds:
                    assert in_step_window(frac, start, end) == (start <= frac < end), (i, n, start, end)
