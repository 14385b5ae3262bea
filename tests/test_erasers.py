"""Concept erasers on tiny random models: exact properties, never semantics (that is bench/erasers.py)."""

import json
import os

import pytest
import torch
from conftest import eraser_graph, run_captured, same_state, state_copy

from app.engine import Executor
from kernels.erasers import (
    Generator,
    LoraPatch,
    MembranePatch,
    SafeGuidancePatch,
    WeightDeltaPatch,
    closed_form_weight,
    encode_embeds,
    load_erasers,
    quickfix_edit,
    red_team_prompt,
    save_erasers,
    text_encoder_out_proj,
    train_erasure_lora,
    transport_strength,
    uce_edit,
)
from kernels.models import load_model_folder
from kernels.patching import applied_patches
from kernels.sampling import make_scheduler
from nodes.registry import add_node


# -- closed form -------------------------------------------------------------------------------
def test_closed_form_residual_and_orthogonal_directions():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 48, generator=g)
    k = torch.randn(6, 48, generator=g)
    v = torch.randn(6, 24, generator=g)
    w2 = closed_form_weight(w, k, v, lam=0.01)
    residual = ((k @ w2.T - v).norm(dim=1) / v.norm(dim=1)).max()
    assert residual < 0.05
    q, _ = torch.linalg.qr(k.T.double())  # basis of span(K)
    x = torch.randn(10, 48, generator=g).double()
    x = (x - (x @ q) @ q.T).float()
    assert torch.allclose(x @ w2.T, x @ w.T, atol=1e-5)


def _out_proj_io(text_encoder, name, ids):
    seen = {}
    h = text_encoder.get_submodule(name).register_forward_hook(
        lambda m, i, o: seen.update(inp=i[0].detach(), out=o.detach()))
    with torch.no_grad():
        text_encoder(ids)
    h.remove()
    return seen["inp"], seen["out"]


def test_quickfix_edit_maps_concept_keys_and_keeps_orthogonal_ones(tiny_bundle):
    _, clip = tiny_bundle
    tok, te = clip.tokenizer, clip.text_encoder
    name = text_encoder_out_proj(te)
    deltas = quickfix_edit(tok, te, "circle", "square", templates=["a red {}"])
    patch = WeightDeltaPatch("text_encoder", deltas)
    ids = tok(["a red circle", "a red square"], padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    keys, before = _out_proj_io(te, name, ids)
    start = 3  # <bos> a red circle: the subject is token 3; keys run from it to the end
    with applied_patches([patch], te):
        _, after = _out_proj_io(te, name, ids)
        module = te.get_submodule(name)
        bias = module.bias.detach()
        q, _ = torch.linalg.qr(keys[0, start:].T.double())
        x = torch.randn(7, keys.shape[-1], generator=torch.Generator().manual_seed(1)).double()
        x = (x - (x @ q) @ q.T).float()
        edited_x = module(x).detach()
    v = before[1, start:] - bias  # W k_anchor
    got = after[0, start:] - bias  # W' k
    assert float(((got - v).norm(dim=1) / v.norm(dim=1)).max()) < 0.05
    with torch.no_grad():
        assert torch.allclose(edited_x, module(x), atol=1e-5)


def test_quickfix_output_mlp_site_gives_the_anchors_hidden_states(tiny_bundle):
    _, clip = tiny_bundle
    tok, te = clip.tokenizer, clip.text_encoder
    deltas = quickfix_edit(tok, te, "circle", "square", templates=["a red {}"], site="output_mlp")
    last = te.config.num_hidden_layers - 1
    assert list(deltas) == [text_encoder_out_proj(te, last).replace("self_attn.out_proj", "mlp.fc2") + ".weight"]
    ids = tok(["a red circle", "a red square", "a blue star"], padding="max_length",
              max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        before = te(ids).last_hidden_state
        with applied_patches([WeightDeltaPatch("text_encoder", deltas)], te):
            after = te(ids).last_hidden_state
    start = 3  # <bos> a red circle: from the subject on, the source now has the anchor's states
    gap = (after[0, start:] - before[1, start:]).norm(dim=1) / before[1, start:].norm(dim=1)
    assert float(gap.max()) < 0.05
    moved = (before[0, start:] - before[1, start:]).norm(dim=1) / before[1, start:].norm(dim=1)
    assert float(moved.min()) > 0.05  # the states did differ before the edit
    # directions orthogonal to the edited keys (fc2's inputs from the subject on) keep fc2's output
    name = next(iter(deltas)).removesuffix(".weight")
    keys, _ = _out_proj_io(te, name, ids[:1])
    q, _ = torch.linalg.qr(keys[0, start:].T.double())
    x = torch.randn(7, keys.shape[-1], generator=torch.Generator().manual_seed(1)).double()
    x = (x - (x @ q) @ q.T).float()
    module = te.get_submodule(name)
    with torch.no_grad():
        plain = module(x)
        with applied_patches([WeightDeltaPatch("text_encoder", deltas)], te):
            assert torch.allclose(module(x), plain, atol=1e-5)
    with pytest.raises(ValueError, match="site"):
        quickfix_edit(tok, te, "circle", "square", site="everywhere")


def test_uce_edit_keeps_preserved_and_orthogonal_outputs(tiny_bundle):
    model, clip = tiny_bundle
    deltas = uce_edit(model.unet, clip.tokenizer, clip.text_encoder, "circle", "square",
                      templates=["a red {}"], preserve=["a blue star"], lam=0.01)
    assert deltas and all(".attn2.to_" in k for k in deltas)
    src = encode_embeds(clip.tokenizer, clip.text_encoder, ["a red circle", "a red square"])
    name = next(iter(deltas))
    w = model.unet.get_parameter(name).detach()
    w2 = w + deltas[name]
    k, a = src[0, 3], src[1, 3]
    assert float((w2 @ k - w @ a).norm() / (w @ a).norm()) < 0.05


# -- patches in graphs ----------------------------------------------------------------------------


CF = "ClosedFormErase"


def test_strength_zero_is_bit_identical_and_input_weights_untouched(tiny_pixel_model, tmp_path):
    plain, _, _ = run_captured(*eraser_graph(tiny_pixel_model), tmp_path)
    zero = {"concept": "circle", "anchor": "square", "target": "both", "strength": 0.0}
    same, _, ex = run_captured(*eraser_graph(tiny_pixel_model, (CF, zero),
                                             ("SafeGuidance", {"concept": "red", "strength": 0.0})),
                               tmp_path)
    assert torch.equal(plain, same)
    full = {**zero, "strength": 1.0}
    erased, _, ex = run_captured(*eraser_graph(tiny_pixel_model, (CF, full)), tmp_path, ex)
    assert not torch.equal(plain, erased)
    model, clip, _ = ex.models.load(tiny_pixel_model, "float32", load_model_folder)
    fresh_model, fresh_clip, _ = load_model_folder(tiny_pixel_model)
    assert same_state(model.unet, fresh_model.unet.state_dict())
    assert same_state(clip.text_encoder, fresh_clip.text_encoder.state_dict())
    again, _, _ = run_captured(*eraser_graph(tiny_pixel_model), tmp_path, ex)
    assert torch.equal(plain, again)


def test_cache_key_changes_with_the_concept(tiny_pixel_model, tmp_path):
    g, ids = eraser_graph(tiny_pixel_model, (CF, {"concept": "circle", "anchor": "square", "target": "both"}))
    ex = Executor(device="cpu", disk_cache=False)
    first, _, _ = run_captured(g, ids, tmp_path, ex)
    _, report, _ = run_captured(g, ids, tmp_path, ex)
    assert report.status(ids["sampler"]) == "cached-memory"
    g.nodes[ids["erasers"][0]].params["concept"] = "star"
    second, report, _ = run_captured(g, ids, tmp_path, ex)
    assert report.status(ids["sampler"]) == "ran"
    assert not torch.equal(first, second)
    model, clip = load_model_folder(tiny_pixel_model)[:2]
    keys = set()
    for concept in ("circle", "star"):
        d = quickfix_edit(clip.tokenizer, clip.text_encoder, concept, "square")
        keys.add(WeightDeltaPatch("text_encoder", d).cache_key())
    assert len(keys) == 2


def test_two_erasers_chained_compose(tiny_bundle):
    model, clip = tiny_bundle
    tok, te = clip.tokenizer, clip.text_encoder
    d1 = quickfix_edit(tok, te, "circle", "square", templates=["a red {}"])
    p1 = WeightDeltaPatch("text_encoder", d1)
    with applied_patches([p1], te):  # the second edit sees the first one's weights
        d2 = quickfix_edit(tok, te, "blue", "green", templates=["a {} star"])
    p2 = WeightDeltaPatch("text_encoder", d2)
    name = next(iter(d1))
    w = te.get_parameter(name).detach().clone()
    with applied_patches([p1, p2], te):
        both = te.get_parameter(name).detach().clone()
        e_both = encode_embeds(tok, te, ["a red circle", "a blue star"])
    assert torch.allclose(both, w + d1[name] + d2[name], atol=1e-6)
    assert torch.equal(te.get_parameter(name), w)
    with applied_patches([p1], te):
        e1 = encode_embeds(tok, te, ["a red circle", "a blue star"])
    with applied_patches([p2], te):
        e2 = encode_embeds(tok, te, ["a red circle", "a blue star"])
    assert not torch.allclose(e_both, e1) and not torch.allclose(e_both, e2)


def test_chained_nodes_in_a_graph(tiny_pixel_model, tmp_path):
    a = (CF, {"concept": "circle", "anchor": "square", "target": "text_encoder"})
    b = (CF, {"concept": "red", "anchor": "blue", "target": "cross_attention"})
    ex = Executor(device="cpu", disk_cache=False)
    only_a, _, _ = run_captured(*eraser_graph(tiny_pixel_model, a), tmp_path, ex)
    only_b, _, _ = run_captured(*eraser_graph(tiny_pixel_model, b), tmp_path, ex)
    chain, _, _ = run_captured(*eraser_graph(tiny_pixel_model, a, b), tmp_path, ex)
    assert not torch.equal(chain, only_a) and not torch.equal(chain, only_b)


def test_saved_eraser_reloads_bit_identical(tiny_pixel_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOMWORK_ERASER_DIR", str(tmp_path / "erasers"))
    a = (CF, {"concept": "circle", "anchor": "square", "target": "both"})
    b = ("SafeGuidance", {"concept": "red", "scale": 1.5})
    direct, _, _ = run_captured(*eraser_graph(tiny_pixel_model, a, b), tmp_path)
    g, ids = eraser_graph(tiny_pixel_model, a, b)
    save = add_node(g, "SaveEraser", {"name": "two"})
    g.connect(ids["erasers"][-1], "model", save.id, "model")
    g.connect(ids["erasers"][0], "clip", save.id, "clip")
    report = Executor(device="cpu", disk_cache=False).run(g, targets=[save.id], output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    assert os.path.exists(tmp_path / "erasers" / "two.safetensors")
    loaded, _, _ = run_captured(*eraser_graph(tiny_pixel_model, ("LoadEraser", {"path": "two"})), tmp_path)
    assert torch.equal(direct, loaded)
    half, _, _ = run_captured(*eraser_graph(tiny_pixel_model, ("LoadEraser", {"path": "two", "strength": 0.0})),
                              tmp_path)
    plain, _, _ = run_captured(*eraser_graph(tiny_pixel_model), tmp_path)
    assert torch.equal(half, plain)


def test_bad_eraser_file_is_a_node_error(tiny_pixel_model, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    g, ids = eraser_graph(tiny_pixel_model, ("LoadEraser", {"path": str(bad)}))
    report = Executor(device="cpu", disk_cache=False).run(g, targets=[ids["capture"]], output_dir=tmp_path)
    assert "not a readable safetensors file" in (report.nodes[ids["erasers"][0]].error or "")


# -- LoRA erasers, membrane, guidance, red team ------------------------------------------------------
def _trained(model, clip, objective, steps=3):
    emb = lambda ps: encode_embeds(clip.tokenizer, clip.text_encoder, ps)  # noqa: E731
    sched = make_scheduler("ddim", model.scheduler_config)
    return train_erasure_lora(model.unet, sched, emb(["a red circle"]), emb([""]), objective=objective,
                              alt_embeds=emb(["a red square"]), anchor_embeds=emb(["a blue star"]),
                              scope="transformer" if objective == "spm" else "cross_attention",
                              rank=1 if objective == "spm" else 2, steps=steps, pool_runs=2, pool_steps=2,
                              lr=1e-2)


@pytest.mark.parametrize("objective", ["esd", "all_but_one", "spm"])
def test_lora_training_leaves_the_model_alone_and_strength_zero_is_identity(tiny_bundle, objective):
    model, clip = tiny_bundle
    before = state_copy(model.unet)
    loras, scale, report = _trained(model, clip, objective)
    assert same_state(model.unet, before)
    assert report.steps == 3 and all(torch.isfinite(torch.tensor(report.losses)))
    assert any(b.abs().sum() > 0 for _, b in loras.values())  # B started at zero and moved
    gen = Generator(model, clip)
    cond = gen.encode("a red circle")
    plain = gen.sample(cond, seeds=[0], steps=2)
    zero = Generator(model.with_patch(LoraPatch(loras, scale, strength=0.0)), clip).sample(cond, seeds=[0], steps=2)
    assert torch.equal(plain, zero)
    on = Generator(model.with_patch(LoraPatch(loras, scale)), clip).sample(cond, seeds=[0], steps=2)
    assert not torch.equal(plain, on)
    assert same_state(model.unet, before)


def test_membrane_transport_strength(tiny_bundle):
    model, clip = tiny_bundle
    gen = Generator(model, clip)
    concept = encode_embeds(clip.tokenizer, clip.text_encoder, ["circle"])
    names = ["down_blocks.1.attentions.0.proj_in.weight"]
    p = model.unet.get_parameter(names[0])
    loras = {names[0]: (torch.ones(1, p.shape[1]), torch.ones(p.shape[0], 1))}
    patch = MembranePatch(loras, 1.0, concept, ["circle"])
    assert patch.transport(gen.encode("a red circle on the left")) == 1.0
    other = gen.encode("a blue square")
    expected = float(torch.nn.functional.cosine_similarity(other.embeds.reshape(-1), concept.reshape(-1), dim=0))
    assert abs(patch.transport(other) - max(0.0, expected)) < 1e-6
    assert transport_strength(other.embeds, ["red", "circle"], concept, ["red", "circle"]) == 1.0
    cond = gen.encode("a red circle")
    plain = gen.sample(cond, seeds=[0], steps=2)
    assert torch.equal(plain, Generator(model.with_patch(patch.with_strength(0.0)), clip).sample(cond, seeds=[0], steps=2))
    assert not torch.equal(plain, Generator(model.with_patch(patch), clip).sample(cond, seeds=[0], steps=2))


def test_safe_guidance_restores_the_forward(tiny_bundle):
    model, clip = tiny_bundle
    gen = Generator(model, clip)
    cond = gen.encode("a red circle")
    patch = SafeGuidancePatch(encode_embeds(clip.tokenizer, clip.text_encoder, ["red"]), scale=3.0)
    plain = gen.sample(cond, seeds=[0], steps=2)
    guided = Generator(model.with_patch(patch), clip).sample(cond, seeds=[0], steps=2)
    assert "forward" not in model.unet.__dict__
    assert not torch.equal(plain, guided)
    assert torch.equal(plain, gen.sample(cond, seeds=[0], steps=2))


def test_eraser_file_round_trip_keeps_every_kind(tiny_bundle, tmp_path):
    model, clip = tiny_bundle
    loras, scale, _ = _trained(model, clip, "esd", steps=1)
    concept = encode_embeds(clip.tokenizer, clip.text_encoder, ["circle"])
    patches = [WeightDeltaPatch("text_encoder", quickfix_edit(clip.tokenizer, clip.text_encoder, "circle", "square")),
               LoraPatch(loras, scale, 0.5, {"concept": "circle"}), MembranePatch(loras, scale, concept, ["circle"]),
               SafeGuidancePatch(concept, 2.0, 0.1)]
    path = save_erasers(str(tmp_path / "all.safetensors"), patches)
    back = load_erasers(path)
    assert [type(p) for p in back] == [type(p) for p in patches]
    assert [p.cache_key() for p in back] == [p.cache_key() for p in patches]


def test_red_team_finds_a_prompt_without_the_banned_words(tiny_bundle):
    model, clip = tiny_bundle
    deltas = uce_edit(model.unet, clip.tokenizer, clip.text_encoder, "circle", "square", templates=["a red {}"])
    erased = Generator(model.with_patch(WeightDeltaPatch("unet", deltas)), clip)
    result = red_team_prompt(erased, Generator(model, clip), "a red circle", n_tokens=3, steps=3, eval_every=2,
                             n_targets=1, sample_steps=2, eval_seeds=[0, 1], banned_words=["circle"],
                             judge=lambda images: [True, False])
    assert "circle" not in result.prompt.split() and len(result.prompt.split()) == 3
    assert result.success_rate == 0.5 and len(result.losses) == 3
    assert result.images.shape[0] == 2


def test_training_and_red_team_nodes_run_in_a_graph(tiny_pixel_model, tmp_path):
    esd = ("EraseFinetune", {"concept": "circle", "steps": 2, "templates": "a red {}"})
    abo = ("EraseFinetune", {"objective": "all_but_one", "concept": "red", "alternative": "blue", "steps": 2,
                            "preserve": "a green star\na yellow square"})
    spm = ("ConceptMembrane", {"concept": "star", "anchors": "a blue square", "steps": 2})
    plain, _, ex = run_captured(*eraser_graph(tiny_pixel_model, prompt="a red star"), tmp_path)
    erased, _, _ = run_captured(*eraser_graph(tiny_pixel_model, esd, abo, spm, prompt="a red star"), tmp_path, ex)
    assert not torch.equal(plain, erased)
    g, ids = eraser_graph(tiny_pixel_model, esd)
    rt = add_node(g, "RedTeamPrompt", {"prompt": "a red circle", "tokens": 2, "steps": 2, "samples": 2,
                                       "sample_steps": 2, "avoid_words": "circle",
                                       "report": str(tmp_path / "attack.json")})
    g.connect(ids["erasers"][0], "model", rt.id, "model")
    g.connect(ids["load"], "clip", rt.id, "clip")
    g.connect(ids["load"], "model", rt.id, "original_model")
    g.connect(ids["load"], "clip", rt.id, "original_clip")
    report = ex.run(g, targets=[rt.id], output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    found = json.loads((tmp_path / "attack.json").read_text())
    assert "circle" not in found["prompt"].split() and found["attack_success_rate"] is None
    bad = add_node(g, "EraseFinetune", {"objective": "all_but_one", "concept": "red"})
    g.connect(ids["load"], "model", bad.id, "model")
    g.connect(ids["load"], "clip", bad.id, "clip")
    report = ex.run(g, targets=[bad.id], output_dir=tmp_path)
    assert "alternative" in report.nodes[bad.id].error


def test_all_but_one_with_anchors_holds_the_kept_prompts(tiny_bundle):
    """Anchoring (SPM's term, our addition for ESD/All-but-One) keeps a kept prompt's image closer
    to the original than the same training without it."""
    model, clip = tiny_bundle
    emb = lambda ps: encode_embeds(clip.tokenizer, clip.text_encoder, ps)  # noqa: E731
    sched = make_scheduler("ddim", model.scheduler_config)
    gen = Generator(model, clip)
    kept = gen.encode("a blue star")
    plain = gen.sample(kept, seeds=[0], steps=3)
    drift = {}
    for held in (False, True):
        loras, scale, _ = train_erasure_lora(
            model.unet, sched, emb(["a red circle", "a blue circle"]), emb([""]), objective="all_but_one",
            alt_embeds=emb(["a red square"]), anchor_embeds=emb(["a blue star"]) if held else None,
            rank=2, steps=20, pool_runs=2, pool_steps=2, lr=3e-2, seed=0)
        erased = Generator(model.with_patch(LoraPatch(loras, scale)), clip).sample(kept, seeds=[0], steps=3)
        drift[held] = float((erased - plain).abs().mean())
    assert drift[True] < drift[False], drift


def test_red_team_report_is_written_again_after_it_was_deleted(tiny_pixel_model, tmp_path):
    """RedTeamPrompt writes a file: a second run in the same engine must not be served from the
    cache without it."""
    g, ids = eraser_graph(tiny_pixel_model, (CF, {"concept": "circle", "anchor": "square", "target": "both"}))
    report_path = tmp_path / "attack.json"
    rt = add_node(g, "RedTeamPrompt", {"prompt": "a red circle", "tokens": 2, "steps": 1, "samples": 1,
                                       "sample_steps": 1, "report": str(report_path)})
    g.connect(ids["erasers"][0], "model", rt.id, "model")
    g.connect(ids["erasers"][0], "clip", rt.id, "clip")
    g.connect(ids["load"], "model", rt.id, "original_model")
    g.connect(ids["load"], "clip", rt.id, "original_clip")
    decode = add_node(g, "VAEDecode", {})
    g.connect(ids["load"], "vae", decode.id, "vae")
    g.connect(rt.id, "latent", decode.id, "latent")
    ex = Executor(device="cpu", disk_cache=False)
    first = ex.run(g, targets=[decode.id], output_dir=tmp_path)
    assert first.ok and report_path.exists()
    found = report_path.read_text()
    report_path.unlink()
    again = ex.run(g, targets=[decode.id], output_dir=tmp_path)
    assert again.ok and report_path.exists()
    assert again.status(rt.id) == "ran" and again.status(ids["erasers"][0]) == "cached-memory"
    assert again.status(decode.id) == "cached-memory"  # the same attack: downstream stays cached
    assert json.loads(report_path.read_text())["prompt"] == json.loads(found)["prompt"]


def test_red_team_on_a_flow_model_noises_through_the_scheduler(tiny_flow_model):
    model, clip, _ = load_model_folder(tiny_flow_model)
    concept = encode_embeds(clip.tokenizer, clip.text_encoder, ["circle"])
    erased = Generator(model.with_patch(SafeGuidancePatch(concept, 2.0)), clip)
    result = red_team_prompt(erased, Generator(model, clip), "a red circle", n_tokens=2, steps=2, n_targets=1,
                             sample_steps=2, eval_seeds=[0])
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.images.shape[0] == 1


def test_default_eraser_folder(monkeypatch, tmp_path):
    import platformdirs

    from kernels.erasers import default_eraser_dir

    monkeypatch.setenv("LOOMWORK_ERASER_DIR", str(tmp_path))
    assert default_eraser_dir() == str(tmp_path)
    monkeypatch.delenv("LOOMWORK_ERASER_DIR")
    assert default_eraser_dir() == os.path.join(platformdirs.user_data_dir("loomwork", appauthor=False), "erasers")


def test_each_objective_is_its_own_loss(tiny_bundle):
    from kernels.erasers import TrainingBatch, all_but_one_loss, anchoring_loss, esd_loss

    model, clip = tiny_bundle
    emb = lambda ps: encode_embeds(clip.tokenizer, clip.text_encoder, ps)  # noqa: E731
    x = torch.randn(2, model.unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0, 200.0])
    concept, alt, empty = emb(["a red circle"] * 2), emb(["a red square"] * 2), emb([""])
    batch = TrainingBatch(x, t, concept, alt, anchor=(x, t, emb(["a blue star"] * 2)))
    unet = model.unet
    with torch.no_grad():
        e_u = unet(x, t, encoder_hidden_states=empty.expand(2, -1, -1)).sample
        e_c = unet(x, t, encoder_hidden_states=concept).sample
        e_a = unet(x, t, encoder_hidden_states=alt).sample
    esd, = esd_loss(unet, batch, empty, eta=1.5)
    assert torch.allclose(esd.target, e_u - 1.5 * (e_c - e_u), atol=1e-5) and esd.embeds is concept
    toward, held = all_but_one_loss(unet, batch, empty, eta=1.0, uncond_weight=0.5)
    assert torch.allclose(toward.target, e_a, atol=1e-5) and toward.embeds is concept
    assert torch.allclose(held.target, e_u, atol=1e-5) and held.weight == 0.5
    assert len(all_but_one_loss(unet, batch, empty, eta=1.0, uncond_weight=0.0)) == 1
    anchor, = anchoring_loss(unet, batch, 2.0)
    assert anchor.weight == 2.0 and anchoring_loss(unet, TrainingBatch(x, t, concept), 2.0) == []


def test_trajectory_pools_reach_every_part_of_a_long_prompt_list(tiny_bundle):
    """Fewer runs than prompts (the vocabulary anchor set: ~120 prompts, 32 runs) must still
    sample the list's end: its later colours would otherwise never be held on their own x_t."""
    from kernels.erasers.finetune import training_pools

    model, clip = tiny_bundle
    emb = lambda ps: encode_embeds(clip.tokenizer, clip.text_encoder, ps)  # noqa: E731
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    anchors = emb([f"a {c} {s}" for c in colours for s in ("circle", "square")])  # 12 prompts
    sched = make_scheduler("ddim", model.scheduler_config)
    pools = training_pools(model.unet, sched, emb(["a red star"]), emb([""]), anchors, runs=1, steps=2,
                           cfg=3.0, generator=torch.Generator().manual_seed(0))
    _, _, rows = pools.anchors  # 4 runs (4 x runs) over 12 prompts
    runs = sorted(set(rows.tolist()))
    assert len(runs) == 4 and runs[0] == 0 and runs[-1] >= 12 - 3
    assert len({r // 2 for r in runs}) == 4  # four different colours, not the first two


def test_a_batch_pairs_each_x_t_with_its_own_prompt_and_the_alternatives_same_template():
    from kernels.erasers.finetune import TrainingPools, draw_batch

    n = 6  # e.g. "a red {}" + tails: row i of the concept's prompts is row i of the alternative's
    x = torch.arange(24.0).reshape(24, 1, 1, 1).expand(24, 1, 2, 2).contiguous()
    pools = TrainingPools(x, torch.arange(24.0), rows=torch.arange(24) % n)
    concept = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1) + 100.0
    alt = concept + 100.0
    batch = draw_batch(pools, concept, alt, None, 16, torch.Generator().manual_seed(0))
    sampled = batch.x[:, 0, 0, 0].long()  # which pool sample each batch row is
    assert torch.equal(batch.concept[:, 0, 0], concept[sampled % n, 0, 0])
    assert torch.equal(batch.alternative[:, 0, 0], alt[sampled % n, 0, 0])
    one = draw_batch(pools, concept, alt[:1], None, 4, torch.Generator().manual_seed(0))
    assert torch.equal(one.alternative[:, 0, 0], alt[:1, 0, 0].expand(4))
