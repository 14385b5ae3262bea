"""Concept erasers on every family (SD 1.x, SDXL, SD3, FLUX.1), tiny random models: each eraser
node runs, changes the sample when on and is bit-identical to no eraser at strength 0; the one
denoiser call (kernels.denoiser) is what each diffusers pipeline feeds its denoiser and gives
its first-step prediction; UCE's edit of an MM-DiT's context_embedder is the closed form."""


import pytest
import torch
from conftest import eraser_graph, inputs_fed_to, run_captured

from app.engine import Executor
from kernels.denoiser import Denoiser, DenoiserText, cat_text, encode_prompts, encode_unconditional
from kernels.models import load_model_folder

PROMPT = "a red circle"
FAMILIES = ("sdxl", "sd3", "flux")


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    from kernels.tiny import build_tiny_sd3_model, build_tiny_sdxl_model
    from kernels.tiny_flux import build_tiny_flux_model

    root = tmp_path_factory.mktemp("family-models")
    return {"sdxl": build_tiny_sdxl_model(str(root / "sdxl")), "sd3": build_tiny_sd3_model(str(root / "sd3")),
            "flux": build_tiny_flux_model(str(root / "flux"))}


@pytest.fixture(scope="module")
def executor():
    return Executor(device="cpu", disk_cache=False)


def family_graph(path, family, *erasers):
    g, ids = eraser_graph(path, *erasers, prompt=PROMPT)
    if family != "sdxl":
        g.nodes[ids["sampler"]].params["scheduler"] = "flow_match_euler"
    return g, ids


ERASERS = {
    "quickfix": ("ClosedFormErase", {"concept": "red", "anchor": "blue"}),
    "uce": ("ClosedFormErase", {"concept": "red", "anchor": "blue", "target": "cross_attention"}),
    "prune": ("PruneConcept", {"concept": "red", "samples": 1, "timesteps": 1, "fraction": 0.1}),
    "membrane": ("ConceptMembrane", {"concept": "red", "steps": 2, "lr": 0.05}),
    "esd": ("EraseFinetune", {"concept": "red", "steps": 2, "lr": 0.05}),
    "all_but_one": ("EraseFinetune", {"objective": "all_but_one", "concept": "red", "alternative": "blue",
                                      "steps": 2, "lr": 0.05, "scope": "attention"}),
    "safe_guidance": ("SafeGuidance", {"concept": "red", "scale": 3.0}),
    "prune_values": ("PruneConcept", {"concept": "red", "samples": 1, "timesteps": 1, "fraction": 0.1,
                                      "site": "cross-attention values"}),
    "safe_guidance_sld": ("SafeGuidance", {"concept": "red", "mode": "sld", "scale": 100.0, "threshold": 0.01,
                                           "momentum": 0.3, "beta": 0.4, "warmup": 0.2}),
}


# FLUX's trainings sample their pools at its native 64 x 64 latent: seconds each, twice a test
SLOW = {("flux", "esd"), ("flux", "membrane"), ("flux", "all_but_one")}


@pytest.mark.parametrize("family, eraser", [
    pytest.param(f, e, marks=[pytest.mark.slow] if (f, e) in SLOW else []) for f in FAMILIES for e in sorted(ERASERS)])
def test_each_eraser_node_runs_changes_the_sample_and_is_exact_at_strength_zero(
        family_models, executor, tmp_path, family, eraser):
    path = family_models[family]
    node, params = ERASERS[eraser]
    plain, _, _ = run_captured(*family_graph(path, family), tmp_path, executor)
    erased, _, _ = run_captured(*family_graph(path, family, (node, params)), tmp_path, executor)
    off, _, _ = run_captured(*family_graph(path, family, (node, {**params, "strength": 0.0})), tmp_path, executor)
    assert torch.isfinite(erased).all()
    assert not torch.equal(erased, plain)
    assert torch.equal(off, plain)
    # the shared model is left as it was
    again, _, _ = run_captured(*family_graph(path, family), tmp_path, executor)
    assert torch.equal(again, plain)


# -- the one denoiser call is the pipelines' ------------------------------------------------------
def first_call(module, call):
    """(args, kwargs, output) of `module`'s first forward while `call()` runs."""
    seen = []
    hook = module.register_forward_hook(lambda _m, args, kwargs, out: seen.append((args, kwargs, out)),
                                        with_kwargs=True)
    try:
        call()
    finally:
        hook.remove()
    return seen[0]


def _texts(clip):
    """The unconditional and the prompt's text, one batch [uncond, cond] as the pipelines make it."""
    return cat_text([encode_unconditional(clip.tokenizer, clip.text_encoder),
                     encode_prompts(clip.tokenizer, clip.text_encoder, [PROMPT])])


def test_unet_prediction_is_stable_diffusion_pipelines_first_step(sd_model):
    from diffusers import StableDiffusionPipeline

    model, clip, vae = load_model_folder(sd_model)
    pipe = StableDiffusionPipeline(vae=vae.vae, text_encoder=clip.text_encoder, tokenizer=clip.tokenizer,
                                   unet=model.unet, scheduler=_scheduler(model, "euler"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe(PROMPT, height=16, width=16, num_inference_steps=1, guidance_scale=4.0,  # noqa: E731
                       output_type="latent")
    (text,), = inputs_fed_to(model.unet, ("encoder_hidden_states",), run)
    ours = _texts(clip)
    assert ours.pooled is None and torch.equal(text, ours.embeds)
    (x, t), _kwargs, out = first_call(model.unet, run)
    with torch.no_grad():
        assert torch.equal(Denoiser.of(model).predict(x, t, ours), out[0])


def _scheduler(model, name):
    from kernels.sampling import make_scheduler

    return make_scheduler(name, model.scheduler_config)


def test_sdxl_prediction_is_the_sdxl_pipelines_first_step(family_models):
    from diffusers import StableDiffusionXLPipeline

    path = family_models["sdxl"]
    model, clip, _vae = load_model_folder(path)
    pipe = StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe(PROMPT, height=16, width=24, num_inference_steps=1, guidance_scale=5.0,  # noqa: E731
                       output_type="latent")
    (text, added), = inputs_fed_to(pipe.unet, ("encoder_hidden_states", "added_cond_kwargs"), run)
    ours = _texts(clip)
    denoiser = Denoiser.of(model)
    assert torch.equal(text, ours.embeds) and torch.equal(added["text_embeds"], ours.pooled)
    (x, t), _kwargs, out = first_call(pipe.unet, run)
    assert torch.equal(denoiser.added_cond_kwargs(x, ours.pooled)["time_ids"], added["time_ids"])
    with torch.no_grad():
        # the folder's UNet (the pipeline loaded its own copy of the same weights)
        assert torch.equal(denoiser.predict(x, t, ours), out[0])


def test_sd3_prediction_is_the_sd3_pipelines_first_step(family_models):
    from diffusers import StableDiffusion3Pipeline

    path = family_models["sd3"]
    model, clip, _vae = load_model_folder(path)
    pipe = StableDiffusion3Pipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe(PROMPT, height=16, width=16, num_inference_steps=1, guidance_scale=4.0,  # noqa: E731
                       max_sequence_length=16, output_type="latent")
    (text, pooled), = inputs_fed_to(pipe.transformer, ("encoder_hidden_states", "pooled_projections"), run)
    ours = _texts(clip)
    assert torch.equal(text, ours.embeds) and torch.equal(pooled, ours.pooled)
    _args, fed, out = first_call(pipe.transformer, run)
    with torch.no_grad():
        assert torch.equal(Denoiser.of(model).predict(fed["hidden_states"], fed["timestep"][0], ours), out[0])


def test_flux_prediction_is_the_flux_pipelines_first_step_unpacked(family_models):
    from diffusers import FluxPipeline

    path = family_models["flux"]
    model, clip, _vae = load_model_folder(path)
    pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe(PROMPT, height=16, width=16, num_inference_steps=2, guidance_scale=3.5,  # noqa: E731
                       max_sequence_length=16, output_type="latent")
    (text, pooled), = inputs_fed_to(pipe.transformer, ("encoder_hidden_states", "pooled_projections"), run)[:1]
    ours = encode_prompts(clip.tokenizer, clip.text_encoder, [PROMPT])
    assert torch.equal(text, ours.embeds) and torch.equal(pooled, ours.pooled)
    _args, fed, out = first_call(pipe.transformer, run)
    t = pipe.scheduler.timesteps[0]  # the first step's, in the scheduler's units
    assert torch.equal(fed["timestep"], t.expand(1) / 1000)
    unpack = lambda z: FluxPipeline._unpack_latents(z, 16, 16, pipe.vae_scale_factor)  # noqa: E731
    with torch.no_grad():
        pred = Denoiser.of(model).predict(unpack(fed["hidden_states"]), t, ours)
    assert pred.shape == (1, 16, 8, 8) and torch.equal(pred, unpack(out[0]))


# -- the closed-form edits on each family ---------------------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_uce_on_an_mmdit_maps_the_concept_to_the_anchors_context_embedding(family_models, family):
    from kernels.erasers import uce_edit
    from kernels.erasers.closed_form import sequence_parts

    model, clip, _vae = load_model_folder(family_models[family])
    lam, keep = 1e-8, ["a green star", "a blue square on the left"]
    deltas = uce_edit(model.unet, clip.tokenizer, clip.text_encoder, "red", "yellow", templates=["a {} circle"],
                      preserve=keep, lam=lam, positions="last")
    assert list(deltas) == ["context_embedder.weight"]
    layer = model.unet.context_embedder
    w = layer.weight.detach()
    w2 = w + deltas["context_embedder.weight"]
    # the concept's last token in each encoder's part of the sequence (SD3: CLIP and T5)
    src = encode_prompts(clip.tokenizer, clip.text_encoder, ["a red circle"]).embeds[0]
    anc = encode_prompts(clip.tokenizer, clip.text_encoder, ["a yellow circle"]).embeds[0]
    parts = sequence_parts(clip.tokenizer, clip.text_encoder, src.shape[0])
    assert len(parts) == (2 if family == "sd3" else 1)
    rows = [start + (1 if tok.bos_token_id is None else 2) for tok, start, _ in parts]  # "red"
    k, v = src[rows].double(), anc[rows].double() @ w.double().T
    assert float(((k @ w2.double().T - v).norm(dim=1) / v.norm(dim=1)).max()) < 1e-5
    kept = encode_prompts(clip.tokenizer, clip.text_encoder, keep).embeds.reshape(-1, w.shape[1]).double()
    before, after = kept @ w.double().T, kept @ w2.double().T
    assert float((after - before).norm() / before.norm()) < 1e-5
    # the normal equations of the closed form, (lam W + V^T K + W Kp^T Kp) = W' (lam I + K^T K + Kp^T Kp)
    k64, v64, kp, w64 = k, v, kept, w.double()
    lhs = lam * w64 + v64.T @ k64 + w64 @ kp.T @ kp
    rhs = w2.double() @ (lam * torch.eye(w.shape[1], dtype=torch.float64) + k64.T @ k64 + kp.T @ kp)
    assert float((lhs - rhs).norm() / lhs.norm()) < 1e-5


def test_uce_on_sdxl_edits_its_cross_attention_on_the_concatenated_text(family_models):
    from kernels.erasers import uce_edit

    model, clip, _vae = load_model_folder(family_models["sdxl"])
    deltas = uce_edit(model.unet, clip.tokenizer, clip.text_encoder, "red", "blue", templates=["a {} circle"],
                      lam=0.01, positions="last")
    assert deltas and all(".attn2.to_" in k for k in deltas)
    name = next(iter(deltas))
    w = model.unet.get_parameter(name).detach()
    assert w.shape[1] == 16 + 32  # both encoders' hidden states side by side
    src = encode_prompts(clip.tokenizer, clip.text_encoder, ["a red circle", "a blue circle"]).embeds
    k, a = src[0, 2], src[1, 2]
    assert float(((w + deltas[name]) @ k - w @ a).norm() / (w @ a).norm()) < 0.05


@pytest.mark.parametrize("family, encoders", [("sdxl", ("text_encoder.", "text_encoder_2.")),
                                              ("sd3", ("text_encoder.", "text_encoder_2.")),
                                              ("flux", ("text_encoder.",))])
def test_quickfix_edits_every_clip_of_the_set_and_names_its_parameters(family_models, family, encoders):
    from kernels.erasers import WeightDeltaPatch, quickfix_edit
    from kernels.patching import applied_patches

    _model, clip, _vae = load_model_folder(family_models[family])
    deltas = quickfix_edit(clip.tokenizer, clip.text_encoder, "red", "blue", templates=["a {} circle"])
    assert sorted({k.split(".", 1)[0] + "." for k in deltas}) == list(encoders)
    assert all(k.endswith("encoder.layers.0.self_attn.out_proj.weight") for k in deltas)
    for name, delta in deltas.items():  # each name addresses a parameter of the CLIP bundle's module
        assert clip.text_encoder.get_parameter(name).shape == delta.shape and delta.abs().sum() > 0
    before = encode_prompts(clip.tokenizer, clip.text_encoder, [PROMPT])
    with applied_patches([WeightDeltaPatch("text_encoder", deltas)], clip.text_encoder):
        after = encode_prompts(clip.tokenizer, clip.text_encoder, [PROMPT])
    assert not torch.equal(before.pooled, after.pooled)
    assert torch.equal(before.embeds, encode_prompts(clip.tokenizer, clip.text_encoder, [PROMPT]).embeds)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_scopes_and_pruned_layers_name_the_denoisers_parameters(family_models, family):
    from kernels.erasers import ffn_output_layers, lora_targets
    from kernels.erasers.patches import text_input_layers

    model, _clip, _vae = load_model_folder(family_models[family])
    unet = model.unet
    kv = lora_targets(unet, "cross_attention")
    if family == "sdxl":
        assert all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in kv)
    else:
        assert all(n.endswith(("attn.add_k_proj", "attn.add_v_proj")) for n in kv)
        assert text_input_layers(unet) == ["context_embedder"]
    attention, transformer = lora_targets(unet, "attention"), lora_targets(unet, "transformer")
    assert set(kv) < set(attention) < set(transformer)
    for name in transformer + ffn_output_layers(unet):
        assert isinstance(unet.get_submodule(name), (torch.nn.Linear, torch.nn.Conv2d))


# -- guidance reads each family's call ---------------------------------------------------------------
def test_safe_guidance_on_sdxl_steers_the_conditional_half_by_the_formula(family_models):
    from kernels.erasers import SafeGuidancePatch, model_scheduler
    from kernels.patching import SamplingRun, applied_patches
    from kernels.text import encode_text

    model, clip, _vae = load_model_folder(family_models["sdxl"])
    denoiser = Denoiser.of(model)
    cond = encode_text(clip.tokenizer, clip.text_encoder, PROMPT)
    concept = encode_prompts(clip.tokenizer, clip.text_encoder, ["red"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, cfg, s = torch.tensor(500.0), 4.0, 3.0
    both = DenoiserText(torch.cat([cond.empty, cond.embeds]), torch.cat([cond.empty_pooled, cond.pooled]))
    run = SamplingRun(unet=model.unet, scheduler=model_scheduler(model), positive=cond, negative=None, cfg=cfg,
                      steps=4, latent_shape=tuple(x.shape))
    with torch.no_grad():
        e_u, e_c = denoiser.predict(torch.cat([x, x]), t, both).chunk(2)
        e_s = denoiser.predict(x, t, concept)
        with applied_patches([SafeGuidancePatch(concept.embeds, s, concept_pooled=concept.pooled)], model.unet, run):
            uncond, steered = denoiser.predict(torch.cat([x, x]), t, both).chunk(2)
    assert torch.equal(uncond, e_u) and torch.equal(steered, e_c - (s / cfg) * (e_s - e_u))
    assert not model.unet._forward_hooks


def test_safe_guidance_on_flux_steers_against_its_own_empty_prompt(family_models):
    from kernels.erasers import SafeGuidancePatch, model_scheduler
    from kernels.patching import SamplingRun, applied_patches
    from kernels.text import encode_text

    model, clip, _vae = load_model_folder(family_models["flux"])
    denoiser = Denoiser.of(model)
    cond = encode_text(clip.tokenizer, clip.text_encoder, PROMPT)
    concept = encode_prompts(clip.tokenizer, clip.text_encoder, ["red"])
    empty = encode_unconditional(clip.tokenizer, clip.text_encoder)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t, s = torch.tensor(700.0), 2.0
    patch = SafeGuidancePatch(concept.embeds, s, concept_pooled=concept.pooled, uncond_embeds=empty.embeds,
                              uncond_pooled=empty.pooled)
    run = SamplingRun(unet=model.unet, scheduler=model_scheduler(model), positive=cond, negative=None, cfg=3.5,
                      steps=4, latent_shape=tuple(x.shape))
    text = DenoiserText(cond.embeds, cond.pooled)
    with torch.no_grad():
        e_c, e_s, e_u = (denoiser.predict(x, t, c) for c in (text, concept, empty))
        with applied_patches([patch], model.unet, run):
            steered = denoiser.predict(x, t, text)
    assert torch.equal(steered, e_c - s * (e_s - e_u))


# -- the kernels on a family, outside a graph --------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_trained_lora_and_pruning_leave_the_denoiser_alone(family_models, family):
    from kernels.erasers import model_scheduler, prune_concept_neurons, train_erasure_lora

    model, clip, _vae = load_model_folder(family_models[family])
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    denoiser = Denoiser.of(model)
    text = lambda ps: encode_prompts(clip.tokenizer, clip.text_encoder, ps)  # noqa: E731
    loras, scale, report = train_erasure_lora(
        denoiser, model_scheduler(model), text(["a red circle"]), encode_unconditional(clip.tokenizer, clip.text_encoder),
        anchor_embeds=text(["a blue star"]), rank=1, steps=2, pool_runs=1, pool_steps=2, batch=2, lr=0.05)
    assert report.steps == 2 and all(torch.isfinite(torch.tensor(report.losses)))
    assert all(model.unet.get_parameter(name).shape == (b.shape[0], a.shape[1]) for name, (a, b) in loras.items())
    deltas = prune_concept_neurons(denoiser, clip.tokenizer, clip.text_encoder, ["a red circle"], ["a blue star"],
                                   fraction=0.1, scheduler=model_scheduler(model), timesteps=1, samples=1)
    assert deltas and all(model.unet.get_parameter(n).shape == d.shape for n, d in deltas.items())
    now = model.unet.state_dict()
    assert all(torch.equal(now[k], v) for k, v in before.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_generator_samples_each_family_with_its_patches(family_models, family):
    from kernels.erasers import Generator, SafeGuidancePatch

    model, clip, _vae = load_model_folder(family_models[family])
    gen = Generator(model, clip)
    cond = gen.encode(PROMPT)
    plain = gen.sample(cond, seeds=[0, 1], steps=1)
    assert plain.shape == (2,) + tuple(Denoiser.of(model).sample_shape())
    concept = encode_prompts(clip.tokenizer, clip.text_encoder, ["red"])
    empty = encode_unconditional(clip.tokenizer, clip.text_encoder)
    patch = SafeGuidancePatch(concept.embeds, 3.0, concept_pooled=concept.pooled, uncond_embeds=empty.embeds,
                              uncond_pooled=empty.pooled)
    assert torch.equal(Generator(model.with_patch(patch.with_strength(0.0)), clip).sample(cond, seeds=[0, 1], steps=1),
                       plain)
    assert not torch.equal(Generator(model.with_patch(patch), clip).sample(cond, seeds=[0, 1], steps=1), plain)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_family_erasers_survive_a_file_round_trip(family_models, family, tmp_path):
    from kernels.erasers import (
        LoraPatch,
        SafeGuidancePatch,
        WeightDeltaPatch,
        load_erasers,
        quickfix_edit,
        save_erasers,
        uce_edit,
    )

    model, clip, _vae = load_model_folder(family_models[family])
    concept = encode_prompts(clip.tokenizer, clip.text_encoder, ["red"])
    name = "transformer_blocks.0.attn.add_k_proj.weight"
    p = model.unet.get_parameter(name)
    patches = [WeightDeltaPatch("unet", uce_edit(model.unet, clip.tokenizer, clip.text_encoder, "red", "blue")),
               WeightDeltaPatch("text_encoder", quickfix_edit(clip.tokenizer, clip.text_encoder, "red", "blue")),
               LoraPatch({name: (torch.ones(1, p.shape[1]), torch.ones(p.shape[0], 1))}, 0.5),
               SafeGuidancePatch(concept.embeds, 2.0, concept_pooled=concept.pooled)]
    back = load_erasers(save_erasers(str(tmp_path / "family.safetensors"), patches))
    assert [q.cache_key() for q in back] == [q.cache_key() for q in patches]


def test_red_team_on_a_family_is_a_clear_node_error(family_models, tmp_path):
    from nodes.registry import add_node

    g, ids = family_graph(family_models["sdxl"], "sdxl")
    rt = add_node(g, "RedTeamPrompt", {"prompt": PROMPT, "tokens": 1, "steps": 1, "samples": 1, "sample_steps": 1})
    for port in ("model", "original_model"):
        g.connect(ids["load"], "model", rt.id, port)
    for port in ("clip", "original_clip"):
        g.connect(ids["load"], "clip", rt.id, port)
    report = Executor(device="cpu", disk_cache=False).run(g, targets=[rt.id], output_dir=tmp_path)
    assert "several text encoders" in (report.nodes[rt.id].error or "")
