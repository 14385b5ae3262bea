"""Safe guidance and patches as values, on the tiny model: the guided prediction is the formula
eps_u + cfg (eps_c - eps_u) - s (eps_concept - eps_u), exactly as the hook computes it, and
applying a patch leaves neither the UNet nor the patch changed."""

import copy

import pytest
import torch

from kernels.erasers import (
    Generator,
    LoraPatch,
    MembranePatch,
    SafeGuidancePatch,
    WeightDeltaPatch,
    encode_embeds,
    model_scheduler,
    uce_edit,
)
from kernels.patching import SamplingRun, applied_patches
from kernels.sampling import cfg_mix, seed_noise


def _run(model, cond, cfg):
    return SamplingRun(unet=model.unet, scheduler=model_scheduler(model), positive=cond, negative=None, cfg=cfg,
                       steps=4, latent_shape=(2,) + tuple(model.unet.config.sample_size for _ in "hw"))


def _predict(unet, x, t, embeds):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=embeds).sample


@pytest.fixture
def scene(tiny_bundle):
    model, clip = tiny_bundle
    gen = Generator(model, clip)
    cond = gen.encode("a red circle")
    concept = encode_embeds(clip.tokenizer, clip.text_encoder, ["red"])
    x = seed_noise(model.unet, [0, 1])
    return model, cond, concept, x


def test_guided_prediction_is_the_reference_formula(scene):
    model, cond, concept, x = scene
    unet, cfg, s = model.unet, 4.0, 3.0
    t = torch.tensor(500.0)
    both = torch.cat([cond.empty.expand(2, -1, -1), cond.embeds.expand(2, -1, -1)])
    e_u, e_c = _predict(unet, torch.cat([x, x]), t, both).chunk(2)  # the sampler's CFG batch
    e_s = _predict(unet, x, t, concept.expand(2, -1, -1))  # the concept, on the conditional half
    with applied_patches([SafeGuidancePatch(concept, scale=s)], unet, _run(model, cond, cfg)):
        guided = _predict(unet, torch.cat([x, x]), t, both)
    uncond, steered = guided.chunk(2)
    assert torch.equal(uncond, e_u)
    assert torch.equal(steered, e_c - (s / cfg) * (e_s - e_u))  # what the sampler's CFG turns into:
    assert torch.allclose(cfg_mix(uncond, steered, cfg), e_u + cfg * (e_c - e_u) - s * (e_s - e_u), atol=1e-5)


def test_unbatched_guidance_steers_with_the_empty_prompt(scene):
    model, cond, concept, x = scene
    unet, s = model.unet, 2.0
    t = torch.tensor(300.0)
    e_c = _predict(unet, x, t, cond.embeds.expand(2, -1, -1))
    e_s = _predict(unet, x, t, concept.expand(2, -1, -1))
    e_u = _predict(unet, x, t, cond.empty.expand(2, -1, -1))
    with applied_patches([SafeGuidancePatch(concept, scale=s)], unet, _run(model, cond, 1.0)):
        guided = _predict(unet, x, t, cond.embeds.expand(2, -1, -1))
        as_tuple = unet(x, t, encoder_hidden_states=cond.embeds.expand(2, -1, -1), return_dict=False)
    assert torch.equal(guided, e_c - s * (e_s - e_u))
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0].detach(), guided)


def test_warmup_leaves_the_noisiest_steps_alone(scene):
    model, cond, concept, x = scene
    unet = model.unet
    t = torch.tensor(900.0)  # above (1 - 0.3) * 1000
    both = torch.cat([cond.empty.expand(2, -1, -1), cond.embeds.expand(2, -1, -1)])
    plain = _predict(unet, torch.cat([x, x]), t, both)
    with applied_patches([SafeGuidancePatch(concept, scale=3.0, warmup=0.3)], unet, _run(model, cond, 4.0)):
        assert torch.equal(_predict(unet, torch.cat([x, x]), t, both), plain)


def test_applying_patches_changes_neither_the_unet_nor_the_patches(tiny_bundle):
    model, clip = tiny_bundle
    emb = encode_embeds(clip.tokenizer, clip.text_encoder, ["circle"])
    deltas = uce_edit(model.unet, clip.tokenizer, clip.text_encoder, "circle", "square", templates=["a red {}"])
    name = "down_blocks.1.attentions.0.proj_in.weight"
    p = model.unet.get_parameter(name)
    loras = {name: (torch.ones(1, p.shape[1]), torch.ones(p.shape[0], 1))}
    patches = [WeightDeltaPatch("unet", deltas), LoraPatch(loras, 0.5), MembranePatch(loras, 0.5, emb, ["circle"]),
               SafeGuidancePatch(emb, 2.0)]
    keys = [q.cache_key() for q in patches]
    fields = [copy.copy(vars(q)) for q in patches]
    m = model
    for q in patches:
        m = m.with_patch(q)
    gen = Generator(m, clip)
    gen.sample(gen.encode("a red circle"), seeds=[0], steps=2)
    assert not model.unet._forward_hooks and "forward" not in model.unet.__dict__
    assert [vars(q) for q in patches] == fields and [q.cache_key() for q in patches] == keys


def test_with_strength_is_a_new_patch(tiny_bundle):
    _, clip = tiny_bundle
    emb = encode_embeds(clip.tokenizer, clip.text_encoder, ["circle"])
    patch = SafeGuidancePatch(emb, 2.0, 0.1, meta={"concept": "circle"})
    key = patch.cache_key()
    half = patch.with_strength(0.5)
    assert type(half) is SafeGuidancePatch and half is not patch
    assert (patch.strength, half.strength) == (1.0, 0.5) and patch.cache_key() == key != half.cache_key()
    assert half.with_strength(1.0).cache_key() == key
    assert (half.scale, half.warmup, half.meta) == (2.0, 0.1, {"concept": "circle"})


# -- SLD: element-wise scale, threshold, momentum (nodes' mode "sld") ---------------------------
def test_sld_term_on_fixed_tensors():
    from kernels.erasers.guidance import safety_term

    e_c = torch.tensor([0.50, 0.00, -0.20, 0.30, 0.10])
    e_s = torch.tensor([0.00, 0.001, 0.00, 0.31, 0.10])
    e_u = torch.tensor([0.25, -0.50, 0.40, 0.00, -1.00])
    got = safety_term(e_c, e_u, e_s, mode="sld", scale=100.0, threshold=0.01, cfg=7.0)
    # e_c - e_s = 0.5 (>= 0.01: left alone), -0.001 (scale 0.1), -0.2 (scale 1, clamped from 20),
    # -0.01 (scale 1), 0.0 (below the threshold but no difference: scale 0)
    want = torch.tensor([0.0, 0.1 * 0.501, 1.0 * -0.40, 1.0 * 0.31, 0.0])
    assert torch.allclose(got, want, atol=1e-6), got
    # with threshold 0.6 the first element is guided too, at the clamped scale 1
    assert torch.isclose(safety_term(e_c, e_u, e_s, mode="sld", scale=100.0, threshold=0.6)[0], torch.tensor(-0.25))
    # uniform: (scale / cfg) everywhere, version 2's
    assert torch.equal(safety_term(e_c, e_u, e_s, mode="uniform", scale=3.5, cfg=7.0), 0.5 * (e_s - e_u))
    with pytest.raises(ValueError, match="mode"):
        safety_term(e_c, e_u, e_s, mode="linear", scale=1.0)


def test_momentum_builds_up_as_sld_does():
    from kernels.erasers.guidance import SafetyMomentum

    m = SafetyMomentum(0.5, 0.7)
    g1, g2, g3 = torch.tensor([1.0, -2.0]), torch.tensor([0.0, 1.0]), torch.tensor([2.0, 0.0])
    nu = torch.zeros(2)
    for g in (g1, g2, g3):
        want = g + 0.5 * nu
        nu = 0.7 * nu + 0.3 * want
        assert torch.allclose(m(g), want)
    assert torch.allclose(m.nu, nu)
    assert torch.equal(SafetyMomentum(0.0, 0.7)(g1), g1)


def test_sld_patch_in_the_sampler_batch_and_its_file_form(scene):
    from kernels.erasers.guidance import safety_term

    model, cond, concept, x = scene
    unet, cfg = model.unet, 4.0
    t = torch.tensor(500.0)
    both = torch.cat([cond.empty.expand(2, -1, -1), cond.embeds.expand(2, -1, -1)])
    e_u, e_c = _predict(unet, torch.cat([x, x]), t, both).chunk(2)
    e_s = _predict(unet, x, t, concept.expand(2, -1, -1))
    patch = SafeGuidancePatch(concept, 50.0, 0.0, 0.5, mode="sld", threshold=0.01, momentum=0.3, beta=0.4)
    gamma = 0.5 * safety_term(e_c, e_u, e_s, mode="sld", scale=50.0, threshold=0.01)
    assert 0 < int((gamma != 0).sum()) < gamma.numel()  # the threshold leaves some elements alone
    with applied_patches([patch], unet, _run(model, cond, cfg)):
        first = _predict(unet, torch.cat([x, x]), t, both)
        second = _predict(unet, torch.cat([x, x]), t, both)  # momentum: the second step adds 0.3 nu
    assert torch.equal(first[:2], e_u) and torch.allclose(first[2:], e_c - gamma, atol=1e-6)
    assert torch.allclose(second[2:], e_c - (gamma + 0.3 * 0.6 * gamma), atol=1e-6)
    tensors, info = patch.to_state()
    assert (info["mode"], info["threshold"], info["momentum"], info["beta"]) == ("sld", 0.01, 0.3, 0.4)
    again = SafeGuidancePatch.from_state(tensors, info)
    assert again.cache_key() == patch.cache_key() != SafeGuidancePatch(concept, 50.0, 0.0, 0.5).cache_key()
    assert "mode" not in SafeGuidancePatch(concept, 2.0).to_state()[1]  # version 2's files are unchanged
    with pytest.raises(ValueError, match="beta"):
        SafeGuidancePatch(concept, 1.0, mode="sld", beta=1.0)


def test_version_2_graphs_keep_their_guidance(tiny_bundle):
    from kernels.denoiser import encode_prompts
    from nodes.base import NodeError
    from nodes.erasers import SafeGuidance

    model, clip = tiny_bundle

    class Ctx:
        def summary(self, _text):
            pass

    def patch_of(params):
        full = {n: p.default for n, p in SafeGuidance.params.items()}
        full.update(params)
        return SafeGuidance().run(Ctx(), model, clip, **full)["model"].patches[-1]

    for saved in ({"concept": "red", "templates": "{}"}, {"concept": "red", "templates": "{}", "scale": 5.0,
                                                          "warmup": 0.2, "strength": 0.5}):
        got = patch_of(SafeGuidance.migrate(saved, 2))
        embeds = encode_prompts(clip.tokenizer, clip.text_encoder, ["red"]).embeds
        # what version 2 built from the same file
        v2 = SafeGuidancePatch(embeds, saved.get("scale", 2.0), saved.get("warmup", 0.0), saved.get("strength", 1.0),
                               {"method": "safe-guidance", "concept": "red", "templates": 1})
        assert got.mode == "uniform" and got.momentum == 0.0 and got.cache_key() == v2.cache_key()
    sld = patch_of({"concept": "red", "mode": "sld", "scale": 300.0, "threshold": 0.02, "momentum": 0.4,
                    "beta": 0.6})
    assert (sld.mode, sld.scale, sld.threshold, sld.momentum, sld.beta) == ("sld", 300.0, 0.02, 0.4, 0.6)
    with pytest.raises(NodeError, match="SafeGuidance.*beta"):
        patch_of({"concept": "red", "beta": 1.0})
