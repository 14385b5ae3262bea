"""Layout techniques on tiny random models: exact identities, exact zeros, falling losses.

Random weights only support structural claims; what the techniques do for
placement is measured on ShapesT2I by bench/layout.py.
"""

import contextlib

import pytest
import torch
from conftest import LAYOUT_PROMPT as PROMPT
from conftest import TWO_BOX_LAYOUT as LAYOUT
from conftest import QuietContext as Ctx

from app.engine import Executor
from kernels.attention import controller_for, registered
from kernels.layout import (
    AStarPatch,
    AttentionRecordPatch,
    BoxGuidancePatch,
    GuidanceTrace,
    RegionalPromptPatch,
    RegionAttentionPatch,
    ZestGuidePatch,
    box_mask,
    heatmap_grid,
    joint_attention_mask,
    phrase_positions,
    resolve_layout,
)
from kernels.models import load_model_folder
from kernels.patching import ModelPatch
from kernels.text import encode_text
from nodes.core import Sampler
from nodes.layout import check_boxes
from nodes.registry import add_node


def sample(model, cond, steps=3, cfg=4.0, seed=1, scheduler="euler"):
    latent = torch.zeros(1, 3, 16, 16)
    return Sampler().run(Ctx(), model, cond, None, latent, scheduler, steps, cfg, seed, 1.0)["latent"]


def traced(model, patch):
    """The model with `patch` and the list its guidance losses go to."""
    trace: list = []
    return model.with_patch(patch).with_patch(GuidanceTrace(trace)), trace


def region_embeds(clip, layout):
    return [encode_text(clip.tokenizer, clip.text_encoder, b["phrase"]).embeds for b in layout["boxes"]]


# -- identities ------------------------------------------------------------------------------
def test_strength_zero_or_empty_layout_is_bit_identical(tiny_layout_model):
    model, clip, cond = tiny_layout_model
    base = sample(model, cond)
    empty = {"width": 16, "height": 16, "boxes": []}
    patches = [
        RegionAttentionPatch(LAYOUT, strength=0.0),
        RegionAttentionPatch(empty, strength=2.0),
        # processors installed, but the step range excludes every step: the fast path
        RegionAttentionPatch(LAYOUT, strength=2.0, start=0.95, end=0.99),
        RegionalPromptPatch(LAYOUT, region_embeds(clip, LAYOUT), mix=0.0),
        RegionalPromptPatch(empty, [], mix=1.0),
        ZestGuidePatch(LAYOUT, eta=0.0),
        ZestGuidePatch(empty, eta=1.0),
        BoxGuidancePatch(LAYOUT, eta=0.0),
        AStarPatch(LAYOUT, eta=0.0),
        AttentionRecordPatch(),  # recording never changes the output
    ]
    for p in patches:
        assert torch.equal(sample(model.with_patch(p), cond), base), p.cache_key()
    both = model.with_patch(patches[0]).with_patch(patches[2]).with_patch(patches[5])
    assert torch.equal(sample(both, cond), base)


def test_layouts_change_the_image_and_compose(tiny_layout_model):
    model, clip, cond = tiny_layout_model
    base = sample(model, cond)
    pww = model.with_patch(RegionAttentionPatch(LAYOUT, strength=1.0))
    out = sample(pww, cond)
    assert not torch.equal(out, base)
    combo = pww.with_patch(ZestGuidePatch(LAYOUT, eta=0.5))
    assert not torch.equal(sample(combo, cond), out)
    # a run leaves the UNet's processors as they were
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in model.unet.attn_processors.values())


# -- attention probes --------------------------------------------------------------------------
class Recorder:
    """Keeps every conditional cross-attention probability tensor of a run, per layer."""

    def __init__(self):
        self.calls = []

    def wants_probs(self, ctl, layer):
        return not ctl.guiding

    def record(self, ctl, layer, probs):
        self.calls.append((layer, ctl.step, probs.detach().clone()))


class RecordPatch(ModelPatch):
    def __init__(self, recorder):
        self.recorder = recorder

    def cache_key(self):
        return f"record:{id(self)}"

    @contextlib.contextmanager
    def applied(self, unet, run):
        with controller_for(unet, run) as ctl, registered(ctl, self.recorder):
            yield


def in_box_share(calls, boxes, n_tokens=None):
    """Mean over layers of the share of each box token's attention mass inside its box."""
    shares = []
    for layer, _step, probs in calls:
        for b in boxes:
            m = box_mask(b, layer.height, layer.width).flatten().bool()
            p = probs[..., b["tokens"]].sum(-1)  # (B, heads, N)
            shares.append(float((p[..., m].sum() / p.sum())))
    return sum(shares) / len(shares)


def test_paint_with_words_moves_attention_mass_into_the_box(tiny_layout_model):
    model, clip, cond = tiny_layout_model
    boxes = resolve_layout(LAYOUT, cond)
    shares = []
    for patch in (None, RegionAttentionPatch(LAYOUT, 4.0),
                  RegionAttentionPatch(LAYOUT, 4.0, suppress_outside=True)):
        rec = Recorder()
        m = model if patch is None else model.with_patch(patch)
        sample(m.with_patch(RecordPatch(rec)), cond, steps=2)
        # the first step (sigma ~ 1 here); w = w' log(1 + sigma) max(QK^T) fades with the noise
        shares.append(in_box_share([c for c in rec.calls if c[1] == 0], boxes))
    base, plus, both = shares
    assert base == pytest.approx(0.25, abs=0.1)  # boxes cover a quarter of the image
    assert plus > base + 0.3  # measured 0.25 -> 0.69
    assert both > plus and both > 0.9  # measured 0.96


def test_csg_redistribution_gives_exactly_zero_attention_outside_the_box(tiny_layout_model):
    model, clip, cond = tiny_layout_model
    boxes = resolve_layout(LAYOUT, cond)
    rec = Recorder()
    patch = BoxGuidancePatch(LAYOUT, eta=0.0, redistribute=True, redistribute_end=0.5)
    sample(model.with_patch(patch).with_patch(RecordPatch(rec)), cond, steps=4)
    active = [c for c in rec.calls if c[1] < 2]  # steps 0 and 1 are in [0, 0.5)
    later = [c for c in rec.calls if c[1] >= 2]
    assert active and later
    for layer, _step, probs in active:
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
        for b in boxes:
            outside = ~box_mask(b, layer.height, layer.width).flatten().bool()
            assert torch.all(probs[..., outside, :][..., b["tokens"]] == 0)
    assert in_box_share(later, boxes) < 0.99  # after its window, attention is free again


def test_regional_prompt_has_exactly_zero_weight_outside_its_box(tiny_layout_model):
    model, clip, cond = tiny_layout_model
    outputs = {}

    def grab(key):
        def hook(module, args, out):
            outputs.setdefault(key, []).append(out.detach().clone())
        return hook

    name = next(n for n, _ in model.unet.named_modules() if n.endswith("attn2"))
    attn2 = model.unet.get_submodule(name)
    layout = {"boxes": [LAYOUT["boxes"][0]]}
    for key, m in (("base", model),
                   ("regional", model.with_patch(RegionalPromptPatch(layout, region_embeds(clip, layout))))):
        handle = attn2.register_forward_hook(grab(key))
        try:
            sample(m, cond, steps=1)
        finally:
            handle.remove()
    base, regional = outputs["base"][0], outputs["regional"][0]  # first forward: same input
    n = base.shape[1]
    side = int(n ** 0.5)
    inside = box_mask(layout["boxes"][0], side, side).flatten().bool()
    cond_row = 1  # CFG batches [uncond, cond]
    assert torch.equal(regional[:, ~inside], base[:, ~inside])
    assert torch.equal(regional[0], base[0])  # the unconditional half is untouched
    assert not torch.allclose(regional[cond_row, inside], base[cond_row, inside])


# -- guidance ------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,drop", [
    (lambda: ZestGuidePatch(LAYOUT, eta=1.0, end=0.2, iterations=6), 0.1),
    (lambda: BoxGuidancePatch(LAYOUT, eta=1.0, end=0.2, iterations=6, inter=0.0,
                              self_attention=0.0), 0.1),
    (lambda: BoxGuidancePatch(LAYOUT, eta=1.0, end=0.2, iterations=6, inter=1.0,
                              self_attention=1.0), 0.1),
    # random weights barely separate two concepts' maps: measured -7%
    (lambda: AStarPatch(LAYOUT, eta=1.0, end=0.2, iterations=6, retention=0.0), 0.05),
], ids=["zestguide", "box", "box-csg", "a-star"])
def test_guidance_losses_fall_over_guided_steps(tiny_layout_model, make, drop):
    model, clip, cond = tiny_layout_model
    guided, trace = traced(model, make())
    sample(guided, cond, steps=5)
    losses = [t["loss"] for t in trace]
    assert len(losses) == 6 and all(t["step"] == 0 for t in trace)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < (1 - drop) * losses[0], losses


def test_a_star_retention_uses_the_previous_step(tiny_layout_model):
    model, clip, cond = tiny_layout_model
    guided, trace = traced(model, AStarPatch(LAYOUT, eta=0.3, end=0.6, iterations=1, retention=1.0))
    sample(guided, cond, steps=5)
    assert [t["step"] for t in trace] == [0, 1, 2]
    seg_only, seg_trace = traced(model, AStarPatch(LAYOUT, eta=0.3, end=0.6, iterations=1,
                                                   retention=0.0))
    sample(seg_only, cond, steps=5)
    assert trace[0]["loss"] == pytest.approx(seg_trace[0]["loss"])  # no target yet
    assert trace[1]["loss"] != pytest.approx(seg_trace[1]["loss"])


def test_a_star_losses_follow_the_paper_equations():
    from kernels.layout import retention_loss, segregation_loss

    b = torch.zeros(1, 2, 4, 4)
    b[0, 0, :2], b[0, 1, 2:] = 1.0, 1.0
    # Eq. 3: 1 - sum min(A, B) / sum (A + B) per concept, summed: a map equal to B gives 1/2 each,
    # an empty map gives 1 each.
    assert float(retention_loss(b.clone(), b)) == pytest.approx(1.0)
    assert float(retention_loss(torch.zeros_like(b), b)) == pytest.approx(2.0)
    assert float(retention_loss(b, None)) == 0.0
    # Eq. 2: disjoint concept maps do not overlap; identical ones give 1/2 per pair.
    assert float(segregation_loss(b)) == 0.0
    same = b[:, :1].expand(1, 3, 4, 4)
    assert float(segregation_loss(same)) == pytest.approx(1.5)


# -- CSG inter-token and self-attention losses ---------------------------------------------------
def test_csg_inter_token_loss_matches_hand_computed_values():
    from kernels.layout import inter_token_loss

    # one-pixel boxes: k = max(1, floor(0.8)) = 1 and r = 1, so the sampling is exact
    maps = torch.tensor([[0.5, 0.1, 0.2], [0.3, 0.6, 0.6], [0.45, 0.2, 0.3]]).view(1, 3, 1, 3)
    masks = torch.eye(3).view(3, 1, 3)
    # box 0: mean_in 0.5, max_other 0.45 -> 50 (min(0.4, 0.45) - 0.45)^2 = 0.125
    # box 1: mean_in 0.6 leads max_other 0.2 by more than the margin -> 0
    # box 2: mean_in 0.3, max_other 0.6 -> 50 (0.2 - 0.6)^2 = 8
    assert float(inter_token_loss(maps, masks)) == pytest.approx(8.125)
    assert float(inter_token_loss(maps[:, :1], masks[:1])) == 0.0  # one box: nothing to compare
    # two-pixel boxes, every in-box pixel kept (topk = dropout = 1): means over the box
    maps = torch.tensor([[0.5, 0.3, 0.1, 0.0], [0.4, 0.4, 0.6, 0.2]]).view(1, 2, 2, 2)
    masks = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]]).view(2, 2, 2)
    # box 0: 0.4 vs 0.4 -> 50 * 0.1^2 = 0.5; box 1: 0.4 vs 0.05 -> 0
    assert float(inter_token_loss(maps, masks, topk=1.0, dropout=1.0)) == pytest.approx(0.5)
    assert float(inter_token_loss(maps, masks, topk=1.0, dropout=1.0, margin=0.0)) == 0.0


def test_csg_sampling_is_a_seeded_half_of_the_top_k():
    from kernels.layout import csg_sample

    values = torch.arange(16.0)
    inside = torch.zeros(16, dtype=torch.bool)
    inside[:10] = True
    picks = [csg_sample(values, inside, 0.8, 0.5, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(picks[0], picks[1])  # the same seed, the same pixels
    assert len(picks[0]) == 4 and set(picks[0].tolist()) <= {2, 3, 4, 5, 6, 7, 8, 9}  # k = 8, r = 4


def test_csg_self_attention_loss_is_zero_in_the_box_and_one_out_of_it():
    from kernels.layout import self_attention_loss

    box = torch.tensor([[1.0, 1.0], [0.0, 0.0]])[None]  # the top row of a 2x2 map
    stay = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]])
    swap = stay[[2, 3, 0, 1]]  # in-box pixels look only outside, outside pixels only inside
    assert float(self_attention_loss(stay[None], box)) == 0.0
    assert float(self_attention_loss(swap[None], box)) == 1.0
    none_in = stay.clone()
    none_in[:2] = swap[:2]  # nobody looks into the box: in = out = 0 counts as the worst case
    assert float(self_attention_loss(none_in[None], box)) == 1.0
    mixed = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2],
                          [0.1, 0.1, 0.4, 0.4], [0.05, 0.05, 0.45, 0.45]])
    both = torch.stack([box[0], 1 - box[0]])
    # box 0: a = (0.6, 0.6, 0.2, 0.1): in 0.6 (k = r = 1), out 0.2 -> (1 - 0.6/0.8)^2
    # box 1: a = (0.4, 0.4, 0.8, 0.9): in 0.9, out 0.4 -> (1 - 0.9/1.3)^2
    expected = (1 - 0.6 / 0.8) ** 2 + (1 - 0.9 / 1.3) ** 2
    assert float(self_attention_loss(mixed[None], both)) == pytest.approx(expected)


def test_box_guidance_records_self_attention_only_in_its_guidance_forward(tiny_layout_model, monkeypatch):
    import torch.nn.functional as F

    from kernels.layout import GuidanceRun

    model, clip, cond = tiny_layout_model
    n_layers = len(model.unet.attn_processors)
    forwards = []  # per UNet forward: [SDPA calls, processor types]
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        forwards[-1][0] += 1
        return sdpa(*args, **kwargs)

    def pre_hook(module, args):
        forwards.append([0, {type(p).__name__ for p in module.attn_processors.values()}])

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    handle = model.unet.register_forward_pre_hook(pre_hook)
    try:
        sample(model, cond, steps=2)  # no layout patch: diffusers' own SDPA processors
        plain, forwards[:] = list(forwards), []
        guided, trace = traced(model, BoxGuidancePatch(LAYOUT, eta=1.0, end=0.5, inter=1.0,
                                                       self_attention=1.0))
        calls = []
        record_self = GuidanceRun.record_self

        def spy(self, ctl, layer, probs):
            calls.append((ctl.guiding, layer, probs.shape, probs.requires_grad))
            record_self(self, ctl, layer, probs)

        monkeypatch.setattr(GuidanceRun, "record_self", spy)
        sample(guided, cond, steps=2)
    finally:
        handle.remove()
    assert len(plain) == 2 and all(n == n_layers and t == {"AttnProcessor2_0"} for n, t in plain)
    # one guidance forward (step 0) and two denoising forwards, every one of them through SDPA:
    # the self-attention probabilities are computed on the side, in the guidance forward only
    assert len(forwards) == 3 and all(n == n_layers for n, _ in forwards)
    assert "SelfAttnRecorder" in forwards[0][1]
    assert calls and all(guiding and grad for guiding, _, _, grad in calls)
    assert {c[1].name.split(".")[0] for c in calls} == {"up_blocks"}  # CSG reads the up blocks
    assert all(c[2][-2:] == (64, 64) for c in calls)  # the tiny UNet attends at 8x8 only
    assert trace[-1]["parts"]["self_attention"] > 0 and "inter" in trace[-1]["parts"]
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in model.unet.attn_processors.values())
    # with the CSG weights at 0 no self-attention layer is touched
    old, trace = traced(model, BoxGuidancePatch(LAYOUT, eta=1.0, end=0.5, inter=0.0,
                                                self_attention=0.0))
    forwards[:] = []
    handle = model.unet.register_forward_pre_hook(pre_hook)
    try:
        sample(old, cond, steps=2)
    finally:
        handle.remove()
    assert all("SelfAttnRecorder" not in t for _, t in forwards)
    assert set(trace[-1]["parts"]) == {"inner", "outer", "within", "corner"}


def test_box_guidance_v1_nodes_load_without_the_csg_losses():
    import json

    from app.graph import dumps, loads
    from nodes import registry

    spec = registry.get("BoxGuidance")
    assert spec.version == 2
    assert spec.params["inter"].default == 1.0 and spec.params["self_attention"].default == 1.0
    doc = {"format": "loomwork.graph", "version": 2, "nodes": [
        {"id": "b0c5a1e2-0000-4000-8000-000000000001", "type": "BoxGuidance", "version": 1,
         "params": {"eta": 1.0, "redistribute": True, "redistribute_end": 0.3}}], "edges": []}
    g = loads(json.dumps(doc), registry.get)
    node = g.nodes["b0c5a1e2-0000-4000-8000-000000000001"]
    assert node.version == 2 and not node.is_placeholder
    assert node.params == {"eta": 1.0, "redistribute": True, "redistribute_end": 0.3,
                           "inter": 0.0, "self_attention": 0.0}
    resolved = spec.resolved_params(node.params)
    assert resolved["inter"] == 0.0 and resolved["self_attention"] == 0.0
    # a migrated node is saved as v2 and read back unchanged; a new v2 node gets CSG's weights
    assert dumps(loads(dumps(g), registry.get)) == dumps(g)
    assert spec.resolved_params({})["inter"] == 1.0


# -- tokens, masks, maps ---------------------------------------------------------------------------
def test_phrases_find_their_own_tokens(tiny_layout_model):
    _, clip, _ = tiny_layout_model
    cond = encode_text(clip.tokenizer, clip.text_encoder, "a red circle and a red square")
    taken = set()
    first = phrase_positions(cond, "a red circle", taken)
    second = phrase_positions(cond, "a red square", taken)
    assert first == [2, 3] and second == [6, 7]  # <bos> is 0; "a" is dropped
    assert phrase_positions(cond, "a green star") == []


def test_box_masks_and_validator():
    m = box_mask({"x0": 0.0, "y0": 0.0, "x1": 0.5, "y1": 0.25}, 8, 8)
    assert m.sum() == 8 and m[0, :4].sum() == 4 and m[2:].sum() == 0
    tiny_box = box_mask({"x0": 0.1, "y0": 0.1, "x1": 0.11, "y1": 0.11}, 4, 4)
    assert tiny_box.sum() == 1  # never lost at a coarse resolution
    masked = box_mask({"x0": 0, "y0": 0, "x1": 1, "y1": 1, "mask": [[1, 0], [0, 0]]}, 4, 4)
    assert masked.sum() == 4 and masked[:2, :2].sum() == 4
    assert check_boxes([{"x0": 0, "y0": 0, "x1": 1, "y1": 1, "phrase": "x", "mask": [[0, 1]]}]) is None
    assert "mask" in check_boxes([{"x0": 0, "y0": 0, "x1": 1, "y1": 1, "mask": [[0, 2]]}])
    assert "unknown" in check_boxes([{"x0": 0, "y0": 0, "x1": 1, "y1": 1, "colour": 1}])


def test_heatmap_grid_shape():
    grid = heatmap_grid(torch.rand(3, 4, 4), tile=8)
    assert grid.shape == (1, 8, 3 * 8 + 2 * 2, 3) and 0 <= grid.min() and grid.max() <= 1


# -- MM-DiT joint attention (3DIS-FLUX) -------------------------------------------------------
def test_joint_attention_mask_kernel():
    masks = [torch.tensor([[1, 0], [1, 0]]), torch.tensor([[0, 1], [0, 1]])]
    allow = joint_attention_mask(5, (2, 2), [[1, 2], [3, 4]], masks)  # the I2I window
    img = 5 + torch.arange(4)
    left, right = img[[0, 2]], img[[1, 3]]
    assert allow[left][:, [1, 2]].all() and not allow[left][:, [3, 4]].any()
    assert not allow[left][:, [0]].any()  # global text closed in the I2I window
    assert allow[left][:, left].all() and not allow[left][:, right].any()
    assert not allow[[1, 2]][:, right].any() and allow[[1, 2]][:, left].all()
    assert allow[0].all()  # the global text is unrestricted
    later = joint_attention_mask(5, (2, 2), [[1, 2], [3, 4]], masks, image_to_image=False,
                                 global_text=[0])
    assert later[left][:, [0, 1, 2]].all() and not later[left][:, [3, 4]].any()
    assert later[left][:, img].all()
    sd3 = joint_attention_mask(5, (2, 2), [[1, 2], [3, 4]], masks, text_first=False)
    assert not sd3[[0, 2]][:, [4 + 3, 4 + 4]].any() and sd3[[0, 2]][:, [4 + 1, 4 + 2]].all()


def test_flux_joint_attention_mask_gives_exactly_zero_attention_to_other_instances():
    from diffusers import FluxTransformer2DModel

    from kernels.layout import JointAttentionMaskPatch

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)).eval()
    h = w = 4
    n_text = 6
    x, ehs, pooled = torch.randn(1, h * w, 4), torch.randn(1, n_text, 16), torch.randn(1, 16)
    grid = torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    img_ids, txt_ids = torch.stack(grid, -1).reshape(-1, 3), torch.zeros(n_text, 3)
    layout = {"boxes": [{"x0": 0, "y0": 0, "x1": 0.5, "y1": 1, "phrase": "a"},
                        {"x0": 0.5, "y0": 0, "x1": 1, "y1": 1, "phrase": "b"}]}
    groups = [[2, 3], [4, 5]]
    patch = JointAttentionMaskPatch(layout, groups, n_text, (h, w), i2i_steps=1, i2t_steps=2,
                                    t2i_steps=2, t2t_steps=2, global_text=[0, 1])
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(3)
    run = SimpleNamespace(scheduler=scheduler)
    kwargs = dict(hidden_states=x, encoder_hidden_states=ehs, pooled_projections=pooled,
                  img_ids=img_ids, txt_ids=txt_ids)
    before = dict(tr.attn_processors)
    with torch.no_grad():
        plain = tr(**kwargs, timestep=scheduler.timesteps[2:] / 1000).sample
        with patch.applied(tr, run) as joint:
            procs = list(joint.processors.values())
            for p in procs:
                p.record = True
            for step in range(3):  # the pre-hook finds the step from the timestep (FLUX: t/1000)
                out = tr(**kwargs, timestep=scheduler.timesteps[step:step + 1] / 1000).sample
                assert joint.controller.step == step
                region = torch.arange(h * w).view(h, w)
                for i, j in ((0, 1), (1, 0)):
                    cols = region[:, :2] if i == 0 else region[:, 2:]
                    rows = cols.flatten() + n_text
                    for p in procs:
                        to_other = p.last_probs[0][:, rows][:, :, groups[j]]
                        if step < 2:  # controlled steps: exactly zero
                            assert torch.all(to_other == 0)
                        else:
                            assert torch.all(to_other > 0)
                if step == 2:  # every window closed: the plain attention again
                    assert torch.allclose(out, plain, atol=1e-5)
    assert {n: type(p) for n, p in tr.attn_processors.items()} == {n: type(p) for n, p in before.items()}


# -- nodes through the executor ----------------------------------------------------------------------
from conftest import CAPTURED  # noqa: E402  (filled by the TestCaptureLatent node)


def layout_graph(model_path, technique="RegionAttention", params=None):
    from conftest import txt2img_graph

    g, ids = txt2img_graph(model_path, prompt=PROMPT, steps=3, save=False)
    ids["layout"] = add_node(g, "Layout", {"width": 16, "height": 16, "boxes": LAYOUT["boxes"]}).id
    ids["tech"] = add_node(g, technique, params or {}).id
    ids["capture"] = add_node(g, "TestCaptureLatent", {}).id
    g.connect(ids["load"], "model", ids["tech"], "model")
    g.connect(ids["layout"], "layout", ids["tech"], "layout")
    g.connect(ids["tech"], "model", ids["sampler"], "model")
    g.connect(ids["sampler"], "latent", ids["capture"], "latent")
    return g, ids


def test_layout_region_attention_sampler_graph(tiny_pixel_model, tmp_path):
    g, ids = layout_graph(tiny_pixel_model, "RegionAttention", {"strength": 1.0})
    ex = Executor(device="cpu", disk_cache=False)
    first = ex.run(g, output_dir=tmp_path)
    assert first.ok, {r.title: r.error for r in first.nodes.values()}
    a = CAPTURED["latent"]
    again = ex.run(g, output_dir=tmp_path)
    assert again.status(ids["sampler"]) == "cached-memory"
    boxes = [dict(b) for b in LAYOUT["boxes"]]
    boxes[0]["x1"] = 0.75
    g.set_param(ids["layout"], "boxes", boxes)
    moved = ex.run(g, output_dir=tmp_path)
    assert moved.status(ids["layout"]) == "ran" and moved.status(ids["sampler"]) == "ran"
    assert not torch.equal(CAPTURED["latent"], a)
    # the loaded model is untouched: weights and processors as a fresh load
    model = ex.models.load(tiny_pixel_model, "float32", load_model_folder)[0]
    fresh = load_model_folder(tiny_pixel_model)[0]
    for (n, p), (_, q) in zip(model.unet.named_parameters(), fresh.unet.named_parameters()):
        assert torch.equal(p, q), n
    assert {n: type(p) for n, p in model.unet.attn_processors.items()} == \
        {n: type(p) for n, p in fresh.unet.attn_processors.items()}


@pytest.mark.parametrize("technique,params", [
    ("ZestGuide", {"eta": 0.5}), ("BoxGuidance", {"redistribute": True}), ("AStar", {}),
])
def test_guidance_nodes_run_in_a_graph(tiny_pixel_model, tmp_path, technique, params):
    g, ids = layout_graph(tiny_pixel_model, technique, params)
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values()}


def test_regional_prompts_and_attention_maps_nodes(tiny_pixel_model, tmp_path):
    g, ids = layout_graph(tiny_pixel_model, "RegionalPrompts", {"mix": 1.0})
    g.connect(ids["load"], "clip", ids["tech"], "clip")
    maps = add_node(g, "AttentionMaps", {"steps": 2, "words": "red, square", "tile": 16}).id
    preview = add_node(g, "PreviewImage", {}).id
    g.connect(ids["tech"], "model", maps, "model")
    g.connect(ids["text"], "conditioning", maps, "positive")
    g.connect(ids["empty"], "latent", maps, "latent")
    g.connect(maps, "image", preview, "image")
    shown = []
    from app.engine import EngineEvents

    events = EngineEvents(images=lambda nid, images, paths: shown.append(images))
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path, events=events)
    assert report.ok, {r.title: r.error for r in report.nodes.values()}
    assert shown and shown[0].shape == (1, 16, 2 * 16 + 2, 3)


def test_joint_attention_mask_node_explains_unet_models(tiny_pixel_model, tmp_path):
    g, ids = layout_graph(tiny_pixel_model, "JointAttentionMask", {})
    g.connect(ids["text"], "conditioning", ids["tech"], "positive")
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path)
    assert report.status(ids["tech"]) == "failed"
    assert "SD3 or FLUX" in report.nodes[ids["tech"]].error


def test_step_ranges_are_fractions_of_the_full_schedule_in_img2img(tiny_layout_model):
    model, clip, cond = tiny_layout_model
    latent = torch.rand(1, 3, 16, 16) * 2 - 1

    def img2img(m):
        return Sampler().run(Ctx(), m, cond, None, latent, "euler", 4, 4.0, 3, 0.5)["latent"]

    # steps 0-1 of 4 are skipped by denoise 0.5
    early, early_trace = traced(model, ZestGuidePatch(LAYOUT, eta=1.0, end=0.5))
    late, late_trace = traced(model, ZestGuidePatch(LAYOUT, eta=1.0, start=0.5, end=1.0))
    base = img2img(model)
    assert torch.equal(img2img(early), base) and early_trace == []
    assert not torch.equal(img2img(late), base)
    assert [t["step"] for t in late_trace] == [2, 3]
