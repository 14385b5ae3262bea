"""Multi-Concept T2I-Zero: Correction by Similarities (EmbeddingTweak) and Cross-Token NMS
(CrossTokenNMS), exactly, on hand-built tensors and tiny random models."""

from types import SimpleNamespace

import pytest
import torch
from conftest import LAYOUT_PROMPT, TWO_BOX_LAYOUT, QuietContext
from diffusers.models.attention_processor import AttnProcessor2_0

from kernels.attention import AttentionController, LayoutCrossAttnProcessor, attention_probs
from kernels.t2i_zero.concepts import article_nouns, concept_groups
from kernels.t2i_zero.embedding import (
    EmbeddingTweakError,
    correct_by_similarities,
    correct_conditioning,
    corrected_token,
)
from kernels.t2i_zero.nms import CrossTokenNMSPatch, CrossTokenNMSRun, cross_token_nms
from kernels.text import Conditioning
from nodes.base import NodeError
from nodes.core import Sampler
from nodes.t2i_zero import CrossTokenNMS, EmbeddingTweak

# -- Correction by Similarities on a hand-built embedding --------------------------------------
F = torch.tensor([[1.0, 2.0], [2.0, -1.0], [3.0, 1.0], [0.0, 0.0]])


def test_corrected_token_is_the_similarity_weighted_average_computed_by_hand():
    # c = 0 with tokens 0, 1, 2: S = f0 * f = [[1, 4], [2, -2], [3, 2]], max per feature [3, 4]
    # threshold 0: feature 0 weights 1, 2, 3 -> (1 + 4 + 9) / 6; feature 1 weights 4, 0, 2 ->
    # (8 + 2) / 6 (token 1 disagrees in sign and is left out)
    got = corrected_token(F, 0, [0, 1, 2], threshold=0.0)
    assert torch.allclose(got, torch.tensor([14 / 6, 10 / 6]), atol=1e-6)
    # threshold 0.5 on S / max = [[1/3, 1], [2/3, -1/2], [1, 1/2]]: feature 0 keeps tokens 1, 2
    # -> (4 + 9) / 5; feature 1 keeps tokens 0, 2 -> 10 / 6
    got = corrected_token(F, 0, [0, 1, 2], threshold=0.5)
    assert torch.allclose(got, torch.tensor([13 / 5, 10 / 6]), atol=1e-6)
    # threshold 1 keeps only each feature's most similar token: token 2 for feature 0, itself for 1
    assert torch.allclose(corrected_token(F, 0, [0, 1, 2], threshold=1.0), torch.tensor([3.0, 2.0]))


def test_corrected_token_keeps_a_feature_no_token_agrees_on():
    f = torch.tensor([[0.0, 1.0], [5.0, 1.0]])  # feature 0 of the concept is 0: every S is 0
    assert torch.equal(corrected_token(f, 0, [1], threshold=0.5), torch.tensor([0.0, 1.0]))


def test_correction_blends_by_strength_and_changes_only_the_concept_tokens():
    embeds = F[None].clone()
    before = embeds.clone()
    out = correct_by_similarities(embeds, [0], [0, 1, 2], window=2, threshold=0.0, strength=0.5)
    assert torch.equal(embeds, before)  # the input is not changed
    assert torch.allclose(out[0, 0], 0.5 * F[0] + 0.5 * torch.tensor([14 / 6, 10 / 6]), atol=1e-6)
    assert torch.equal(out[0, 1:], F[1:])
    assert torch.equal(correct_by_similarities(embeds, [0], [0, 1, 2], strength=0.0), embeds)


def test_only_word_tokens_within_the_window_contribute():
    huge = torch.tensor([[1.0, 1.0], [1.0, 1.0], [50.0, 50.0], [2.0, 2.0]])[None]
    # token 2 is huge but not a word of the prompt (a start/end token): it never contributes;
    # weights S = 1, 1, 2 on values 1, 1, 2
    out = correct_by_similarities(huge, [0], [0, 1, 3], window=5, threshold=0.0, strength=1.0)
    assert torch.allclose(out[0, 0], torch.tensor([(1 + 1 + 4) / 4] * 2))
    # window 1: token 3 is too far
    out = correct_by_similarities(huge, [0], [0, 1, 3], window=1, threshold=0.0, strength=1.0)
    assert torch.allclose(out[0, 0], torch.tensor([1.0, 1.0]))


def test_concepts_are_corrected_from_the_input_so_their_order_does_not_matter():
    torch.manual_seed(0)
    e = torch.randn(1, 8, 6)
    a = correct_by_similarities(e, [2, 5], range(1, 7), window=3, threshold=0.2, strength=0.7)
    b = correct_by_similarities(e, [5, 2], range(1, 7), window=3, threshold=0.2, strength=0.7)
    assert torch.equal(a, b)
    assert torch.equal(a[0, 5], correct_by_similarities(e, [5], range(1, 7), 3, 0.2, 0.7)[0, 5])


@pytest.mark.parametrize("bad", [dict(window=-1), dict(threshold=1.5), dict(strength=-0.1)])
def test_bad_settings_are_refused_by_name(bad):
    settings = {"window": 3, "threshold": 0.5, "strength": 0.5, **bad}
    with pytest.raises(EmbeddingTweakError, match=next(iter(bad))):
        correct_by_similarities(F[None], [0], [0, 1], **settings)


# -- concepts -----------------------------------------------------------------------------------
def test_default_concepts_are_the_noun_of_each_indefinite_noun_phrase():
    assert article_nouns("a red circle at the bottom and a red star in the center, white "
                         "background") == ["circle", "star"]
    assert article_nouns("A photo of a cat and an old dog") == ["photo", "cat", "dog"]
    assert article_nouns("a blue square, a green circle") == ["square", "circle"]
    assert article_nouns("the red circle") == []


def test_repeated_nouns_are_separate_concepts():
    cond = Conditioning(embeds=torch.zeros(1, 10, 2), prompt="a red star and a blue star",
                        words={"a": (1, 5), "red": (2,), "star": (3, 7), "and": (4,), "blue": (6,)})
    assert concept_groups(cond, ["star", "star"]) == [[3], [7]]
    assert concept_groups(cond, ["red star", "blue star"]) == [[2, 3], [6, 7]]
    assert concept_groups(cond, ["cat"]) == []


# -- EmbeddingTweak on the tiny models ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_pixel_model):
    from kernels.models import load_model_folder
    from kernels.prompt_weighting import encode_weighted

    model, clip, _vae = load_model_folder(tiny_pixel_model)
    return model, clip, encode_weighted(clip.tokenizer, clip.text_encoder, LAYOUT_PROMPT)


def test_embedding_tweak_off_passes_the_conditioning_through(tiny):
    _model, _clip, cond = tiny
    out = EmbeddingTweak().run(QuietContext(), cond, "", 3, 0.5, 0.0)["conditioning"]
    assert out is cond
    cond_none = EmbeddingTweak().run(QuietContext(), cond, "", 3, 0.5, 1.0)["conditioning"]
    assert cond_none is not cond  # it acts at strength > 0


def test_embedding_tweak_changes_only_the_concept_tokens_and_keeps_the_word_map(tiny):
    _model, _clip, cond = tiny  # "a red circle on the left and a blue square": circle, square
    out = EmbeddingTweak().run(QuietContext(), cond, "", 3, 0.0, 1.0)["conditioning"]
    changed = (out.embeds != cond.embeds).any(-1)[0].nonzero().flatten().tolist()
    assert changed == [cond.words["circle"][0], cond.words["square"][0]]
    assert out.words == cond.words and out.prompt == cond.prompt
    assert torch.equal(out.empty, cond.empty)
    c = cond.words["circle"][0]
    words = [p for ps in cond.words.values() for p in ps]
    expected = corrected_token(cond.embeds[0], c, [p for p in words if abs(p - c) <= 3], 0.0)
    assert torch.equal(out.embeds[0, c], expected)


def test_embedding_tweak_refuses_a_concept_the_prompt_lacks(tiny):
    with pytest.raises(NodeError, match="dog"):
        EmbeddingTweak().run(QuietContext(), tiny[2], "circle, dog", 3, 0.5, 0.5)


def test_a_prompt_schedule_stage_is_corrected_against_its_own_prompt(tiny):
    from kernels.prompt_schedule import with_stage
    from kernels.text import encode_text

    _model, clip, cond = tiny
    stage = encode_text(clip.tokenizer, clip.text_encoder, "a green star and a red cat")
    scheduled = with_stage(cond, stage, 0.5, 1.0)
    out = correct_conditioning(scheduled, "", 3, 0.0, 1.0)
    assert torch.equal(out.embeds, correct_conditioning(cond, "", 3, 0.0, 1.0).embeds)
    assert torch.equal(out.stages[0][0].embeds, correct_conditioning(stage, "", 3, 0.0, 1.0).embeds)
    assert out.stages[0][1:] == scheduled.stages[0][1:]


def sample(model, cond, steps=3, seed=4):
    latent = torch.zeros(1, model.in_channels, 16, 16)
    return Sampler().run(QuietContext(), model, cond, None, latent, "euler", steps, 4.0, seed,
                         1.0)["latent"]


def test_sampling_with_the_tweak_off_is_bit_identical_and_on_differs(tiny):
    model, _clip, cond = tiny
    base = sample(model, cond)
    off = EmbeddingTweak().run(QuietContext(), cond, "", 3, 0.5, 0.0)["conditioning"]
    assert torch.equal(sample(model, off), base)
    on = EmbeddingTweak().run(QuietContext(), cond, "", 3, 0.0, 1.0)["conditioning"]
    assert not torch.equal(sample(model, on), base)


# -- Cross-Token NMS on hand-built probabilities -------------------------------------------------
def test_nms_keeps_only_the_per_pixel_maximum_concept():
    # 1 x 2 image, tokens: 0 start, 1-2 concept A ("red circle"), 3 concept B, 4 another word
    probs = torch.tensor([[[[0.1, 0.3, 0.1, 0.2, 0.3],     # pixel 0: A = 0.4 > B = 0.2
                            [0.1, 0.1, 0.1, 0.5, 0.2]]]])  # pixel 1: B = 0.5 > A = 0.2
    out = cross_token_nms(probs, [[1, 2], [3]], height=1, width=2, strength=1.0, sigma=0.0)
    expected = torch.tensor([[[[0.1, 0.3, 0.1, 0.0, 0.3],
                               [0.1, 0.0, 0.0, 0.5, 0.2]]]])
    assert torch.equal(out, expected)
    half = cross_token_nms(probs, [[1, 2], [3]], 1, 2, strength=0.5, sigma=0.0)
    assert torch.allclose(half, torch.tensor([[[[0.1, 0.3, 0.1, 0.1, 0.3],
                                                [0.1, 0.05, 0.05, 0.5, 0.2]]]]))
    assert torch.equal(cross_token_nms(probs, [[1, 2], [3]], 1, 2, strength=0.0), probs)
    assert torch.equal(cross_token_nms(probs, [[1, 2]], 1, 2), probs)  # one concept: nothing to do


def test_nms_decides_on_the_smoothed_maps_per_head():
    # a 3 x 3 image, two heads: A has a lone spike at the centre, B a ring around it
    a = torch.zeros(3, 3)
    a[1, 1] = 0.6
    b = torch.full((3, 3), 0.5)
    b[1, 1] = 0.4
    head = torch.stack([torch.zeros(9), a.flatten(), b.flatten()], dim=-1)  # (N, L)
    probs = torch.stack([head, head[:, [0, 2, 1]]])[None]  # head 2 swaps the two maps
    raw = cross_token_nms(probs, [[1], [2]], 3, 3, sigma=0.0)
    assert raw[0, 0, 4, 1] == 0.6 and raw[0, 0, 4, 2] == 0  # unsmoothed: A wins the centre
    smooth = cross_token_nms(probs, [[1], [2]], 3, 3, sigma=0.5)
    assert smooth[0, 0, 4, 1] == 0 and smooth[0, 0, 4, 2] == 0.4  # smoothed: B's ring wins
    assert smooth[0, 1, 4, 1] == 0.4 and smooth[0, 1, 4, 2] == 0  # per head: token 1 wins


# -- the processor: idle is diffusers', composed with Paint-with-Words it is the written math -----
@pytest.fixture(scope="module")
def unet(tiny_pixel_model):
    from kernels.models import load_model_folder

    return load_model_folder(tiny_pixel_model)[0].unet


def controller(transforms, latent_hw=(16, 16), step=0, steps=4):
    run = SimpleNamespace(steps=steps, latent_shape=(1, 3, *latent_hw), scheduler=None)
    ctl = AttentionController(run)
    ctl.transforms = list(transforms)
    ctl.cond_rows = slice(1, 2)  # CFG batches [uncond, cond]
    ctl.step = step
    ctl.sigma = 2.0
    return ctl


def cross_attention(unet):
    name = next(n for n in unet.attn_processors if n.endswith("attn2.processor"))
    return name, unet.get_submodule(name[:-len(".processor")])


def test_nms_processor_is_diffusers_attnprocessor2_0_when_idle(unet):
    torch.manual_seed(0)
    name, attn = cross_attention(unet)
    hidden = torch.randn(2, 64, attn.to_q.in_features)
    context = torch.randn(2, 16, attn.to_k.in_features)
    late = CrossTokenNMSRun(CrossTokenNMSPatch(["a", "b"], start=0.5, end=1.0), [[1], [2]])
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, hidden, context)
        idle = LayoutCrossAttnProcessor(name, controller([late], step=0))(attn, hidden, context)
        acting = LayoutCrossAttnProcessor(name, controller([late], step=2))(attn, hidden, context)
    assert torch.equal(idle, expected)
    assert not torch.allclose(acting, expected)


def test_nms_after_a_region_attention_bias_is_the_written_out_attention(unet):
    from kernels.layout import RegionAttentionPatch, resolve_layout
    from kernels.layout.region_attention import RegionAttentionRun

    torch.manual_seed(1)
    name, attn = cross_attention(unet)
    hidden = torch.randn(2, 64, attn.to_q.in_features)
    context = torch.randn(2, 16, attn.to_k.in_features)
    cond = SimpleNamespace(words={"red": (2,), "circle": (3,), "blue": (7,), "square": (8,)})
    pww_patch = RegionAttentionPatch(TWO_BOX_LAYOUT, strength=1.0)
    pww = RegionAttentionRun(pww_patch, None, resolve_layout(TWO_BOX_LAYOUT, cond))
    nms = CrossTokenNMSRun(CrossTokenNMSPatch(["circle", "square"]), [[3], [8]])
    ctl = controller([pww, nms], latent_hw=(8, 8))
    with torch.no_grad():
        out = LayoutCrossAttnProcessor(name, ctl)(attn, hidden, context)
        q = attn.head_to_batch_dim(attn.to_q(hidden), out_dim=4)
        k = attn.head_to_batch_dim(attn.to_k(context), out_dim=4)
        v = attn.head_to_batch_dim(attn.to_v(context), out_dim=4)
        layer = ctl.layer(name, 64)
        bias = pww.bias(ctl, layer, q[1:], k[1:])
        scale = q.shape[-1] ** -0.5
        probs = torch.cat([attention_probs(q[:1], k[:1], scale),
                           cross_token_nms(attention_probs(q[1:], k[1:], scale, bias), [[3], [8]],
                                           layer.height, layer.width)])
        heads = (probs @ v).transpose(1, 2).reshape(2, 64, -1)
        expected = attn.to_out[1](attn.to_out[0](heads)) / attn.rescale_output_factor
        if attn.residual_connection:
            expected = expected + hidden
    assert torch.allclose(out, expected, atol=1e-6)


# -- CrossTokenNMS through the Sampler ----------------------------------------------------------
def test_nms_node_off_returns_the_model_and_sampling_is_bit_identical(tiny):
    model, _clip, cond = tiny
    base = sample(model, cond)
    assert CrossTokenNMS().run(QuietContext(), model, cond, "", 0.0, 0.0, 1.0)["model"] is model
    idle = model.with_patch(CrossTokenNMSPatch(["circle", "square"], start=0.0, end=0.0))
    assert torch.equal(sample(idle, cond), base)
    lone = model.with_patch(CrossTokenNMSPatch(["circle", "dog"]))  # one concept in the prompt
    assert torch.equal(sample(lone, cond), base)


def test_nms_node_acts_repeats_exactly_and_restores_the_processors(tiny):
    model, _clip, cond = tiny
    procs = dict(model.unet.attn_processors)
    patched = CrossTokenNMS().run(QuietContext(), model, cond, "", 1.0, 0.0, 1.0)["model"]
    (patch,) = patched.patches
    assert patch.concepts == ("circle", "square")
    first = sample(patched, cond)
    assert not torch.equal(first, sample(model, cond))
    assert torch.equal(sample(patched, cond), first)  # no state carried between runs
    assert dict(model.unet.attn_processors) == procs and model.patches == ()


def test_nms_composes_with_region_attention(tiny):
    from kernels.layout import RegionAttentionPatch

    model, _clip, cond = tiny
    pww = RegionAttentionPatch(TWO_BOX_LAYOUT, strength=1.0)
    nms = CrossTokenNMSPatch(["circle", "square"])
    alone = {"pww": sample(model.with_patch(pww), cond), "nms": sample(model.with_patch(nms), cond)}
    both = sample(model.with_patch(pww).with_patch(nms), cond)
    other_order = sample(model.with_patch(nms).with_patch(pww), cond)
    assert not any(torch.equal(both, x) for x in alone.values())
    assert torch.equal(both, other_order)  # one controller: the bias, then the suppression


def test_nms_cache_key_follows_every_setting():
    keys = {CrossTokenNMSPatch(["a", "b"]).cache_key(),
            CrossTokenNMSPatch(["a", "c"]).cache_key(),
            CrossTokenNMSPatch(["a", "b"], strength=0.5).cache_key(),
            CrossTokenNMSPatch(["a", "b"], start=0.2).cache_key(),
            CrossTokenNMSPatch(["a", "b"], end=0.8).cache_key(),
            CrossTokenNMSPatch(["a", "b"], sigma=1.0).cache_key()}
    assert len(keys) == 6
    assert CrossTokenNMSPatch(["a", "b"]).cache_key() == CrossTokenNMSPatch(("a", "b")).cache_key()


def test_nms_node_refuses_bad_input(tiny):
    model, _clip, cond = tiny
    with pytest.raises(NodeError, match="dog"):
        CrossTokenNMS().run(QuietContext(), model, cond, "circle, dog", 1.0, 0.0, 1.0)
    with pytest.raises(NodeError, match="after end"):
        CrossTokenNMS().run(QuietContext(), model, cond, "", 1.0, 0.8, 0.2)


# -- SDXL: two encoders' hidden states side by side -------------------------------------------
@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from kernels.models import load_model_folder
    from kernels.prompt_weighting import encode_weighted
    from kernels.tiny import build_tiny_sdxl_model

    path = build_tiny_sdxl_model(str(tmp_path_factory.mktemp("models") / "tiny-sdxl"))
    model, clip, _vae = load_model_folder(path)
    return model, encode_weighted(clip.tokenizer, clip.text_encoder, LAYOUT_PROMPT)


def test_sdxl_tweak_and_nms_run_and_keep_the_pooled_embedding(sdxl):
    model, cond = sdxl
    assert cond.embeds.shape[-1] == 48 and cond.pooled is not None  # CLIP-L 16 + CLIP-G 32
    tweaked = EmbeddingTweak().run(QuietContext(), cond, "", 3, 0.5, 1.0)["conditioning"]
    assert torch.equal(tweaked.pooled, cond.pooled) and tweaked.words == cond.words
    changed = (tweaked.embeds != cond.embeds).any(-1)[0].nonzero().flatten().tolist()
    assert changed == [cond.words["circle"][0], cond.words["square"][0]]
    patched = CrossTokenNMS().run(QuietContext(), model, cond, "", 1.0, 0.0, 1.0)["model"]
    base = sample(model, cond, steps=2)
    out = sample(patched, tweaked, steps=2)
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert not torch.equal(out, base)
    assert torch.equal(sample(model, cond, steps=2), base)


# -- through the engine --------------------------------------------------------------------------
def t2i_zero_graph(model_path, corr_strength, nms_strength):
    """txt2img with EmbeddingTweak after TextEncode and CrossTokenNMS before the Sampler."""
    from conftest import txt2img_graph

    from nodes.registry import add_node

    g, ids = txt2img_graph(model_path, prompt=LAYOUT_PROMPT, steps=2, save=False)
    tweak = add_node(g, "EmbeddingTweak", {"strength": corr_strength})
    nms = add_node(g, "CrossTokenNMS", {"strength": nms_strength})
    cap = add_node(g, "TestCaptureLatent", {})
    g.connect(ids["text"], "conditioning", tweak.id, "conditioning")
    g.connect(tweak.id, "conditioning", ids["sampler"], "positive")
    g.connect(ids["load"], "model", nms.id, "model")
    g.connect(tweak.id, "conditioning", nms.id, "positive")
    g.connect(nms.id, "model", ids["sampler"], "model")
    g.connect(ids["sampler"], "latent", cap.id, "latent")
    return g, cap.id


def test_graph_with_both_nodes_off_renders_the_plain_graph(tiny_pixel_model, tmp_path):
    from conftest import CAPTURED, txt2img_graph

    from app.engine import Executor

    ex = Executor(device="cpu", disk_cache=False)
    latents = []
    for corr, nms in ((0.0, 0.0), (1.0, 1.0)):
        g, cap = t2i_zero_graph(tiny_pixel_model, corr, nms)
        assert ex.run(g, targets=[cap], output_dir=tmp_path).ok
        latents.append(CAPTURED.pop("latent"))
    from nodes.registry import add_node

    g, ids = txt2img_graph(tiny_pixel_model, prompt=LAYOUT_PROMPT, steps=2, save=False)
    cap = add_node(g, "TestCaptureLatent", {})
    g.connect(ids["sampler"], "latent", cap.id, "latent")
    assert ex.run(g, targets=[cap.id], output_dir=tmp_path).ok
    assert torch.equal(latents[0], CAPTURED.pop("latent"))  # off: the plain graph's latent
    assert not torch.equal(latents[0], latents[1])
