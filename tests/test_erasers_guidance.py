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
