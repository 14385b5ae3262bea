"""Neuron-pruning eraser on tiny models: exact properties, never semantics."""

import os
from types import SimpleNamespace

import pytest
import torch
from conftest import eraser_graph, run_captured, same_state, state_copy

from app.engine import Executor
from kernels.erasers import (
    Generator,
    WeightDeltaPatch,
    concept_neuron_scores,
    ffn_output_layers,
    load_erasers,
    probe_timesteps,
    prune_concept_neurons,
    pruned_count,
    save_erasers,
)
from kernels.models import load_model_folder
from kernels.patching import applied_patches
from kernels.sampling import make_scheduler
from nodes.registry import add_node

CONCEPT = ["a red circle", "a blue circle", "a circle on the left"]
GENERAL = ["a red square", "a blue star", "a green triangle on the left"]


def _prune(model, clip, fraction=0.05):
    return prune_concept_neurons(model.unet, clip.tokenizer, clip.text_encoder, CONCEPT, GENERAL, fraction=fraction,
                                 scheduler=make_scheduler("ddim", model.scheduler_config), timesteps=2, samples=1)


def test_probe_timesteps_and_counts():
    assert probe_timesteps(4, 1000) == [999, 749, 499, 249]
    assert probe_timesteps(1, 1000) == [999]
    assert pruned_count(0.0, 128) == 0 and pruned_count(0.001, 128) == 1 and pruned_count(0.02, 128) == 3
    with pytest.raises(ValueError, match="fraction"):
        pruned_count(1.5, 10)


def test_prune_leaves_the_model_alone_and_strength_zero_is_identity(tiny_bundle):
    model, clip = tiny_bundle
    before = state_copy(model.unet)
    deltas = _prune(model, clip)
    assert deltas and same_state(model.unet, before)
    gen = Generator(model, clip)
    cond = gen.encode("a red circle")
    plain = gen.sample(cond, seeds=[0], steps=2)
    zero = Generator(model.with_patch(WeightDeltaPatch("unet", deltas, strength=0.0)), clip)
    assert torch.equal(plain, zero.sample(cond, seeds=[0], steps=2))
    on = Generator(model.with_patch(WeightDeltaPatch("unet", deltas)), clip)
    assert not torch.equal(plain, on.sample(cond, seeds=[0], steps=2))
    assert same_state(model.unet, before)
    assert torch.equal(plain, gen.sample(cond, seeds=[0], steps=2))


def test_prune_zeroes_exactly_the_top_scoring_columns(tiny_bundle):
    model, clip = tiny_bundle
    fraction = 0.05
    layers = ffn_output_layers(model.unet)
    assert layers and all(n.endswith(".ff.net.2") for n in layers)
    deltas = _prune(model, clip, fraction)
    scores = concept_neuron_scores(model.unet, clip.tokenizer, clip.text_encoder, CONCEPT, GENERAL,
                                   scheduler=make_scheduler("ddim", model.scheduler_config), timesteps=2, samples=1)
    assert set(deltas) == {f"{n}.weight" for n in layers} == set(scores)
    patch = WeightDeltaPatch("unet", deltas)
    for name, delta in deltas.items():
        w = model.unet.get_parameter(name).detach().clone()
        k = pruned_count(fraction, w.shape[1])
        expected = set(torch.topk(scores[name], k).indices.tolist())
        assert all(scores[name][j] > 0 for j in expected)  # a random model has enough positive contrasts
        changed = set(torch.nonzero(delta.abs().sum(dim=0)).flatten().tolist())
        assert changed == expected
        with applied_patches([patch], model.unet):
            patched = model.unet.get_parameter(name).detach().clone()
        zero_cols = set(torch.nonzero(patched.abs().sum(dim=0) == 0).flatten().tolist())
        assert zero_cols == expected and len(zero_cols) == k
        keep = [j for j in range(w.shape[1]) if j not in expected]
        assert torch.equal(patched[:, keep], w[:, keep])
        assert torch.equal(model.unet.get_parameter(name), w)


# -- a constructed case: one FeedForward whose neurons are wired to words ------------------------
class _OneHotEncoder(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, vocab)
        self.emb.weight.data = torch.eye(vocab)

    @property
    def device(self):
        return self.emb.weight.device

    def forward(self, ids):
        return SimpleNamespace(last_hidden_state=self.emb(ids))


class _FFOnlyUNet(torch.nn.Module):
    """A 'UNet' whose only layer is a diffusers FeedForward on the text embeddings."""

    def __init__(self, dim, hidden):
        super().__init__()
        from diffusers.models.attention import FeedForward

        self.config = SimpleNamespace(in_channels=1, sample_size=2)
        self.block = torch.nn.Module()
        self.block.ff = FeedForward(dim, inner_dim=hidden, activation_fn="geglu")

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.block.ff(encoder_hidden_states)


def test_the_concepts_own_neurons_are_pruned():
    from kernels.tiny import TINY_WORDS, build_word_tokenizer

    tok = build_word_tokenizer(TINY_WORDS, 8)
    vocab = len(tok)
    te = _OneHotEncoder(vocab)
    hidden = 8
    unet = _FFOnlyUNet(vocab, hidden)
    proj = unet.block.ff.net[0].proj  # GEGLU: value rows 0..hidden-1, gate rows hidden..2*hidden-1
    out = unet.block.ff.net[2]
    with torch.no_grad():
        proj.weight.zero_()
        proj.bias.zero_()
        proj.bias[hidden:] = 3.0  # every gate open: neuron j = value_j * gelu(3)
        word = lambda w: tok.convert_tokens_to_ids(w)  # noqa: E731
        proj.weight[0, word("circle")] = 1.0   # concept only
        proj.weight[1, word("a")] = 2.0        # the strongest, but in every prompt: no contrast
        proj.weight[2, word("circle")] = 1.0   # concept only, but its output weights are tiny
        proj.weight[3, word("square")] = 1.0   # general only: negative contrast
        proj.weight[4, word("red")] = 1.0      # as often in both sets
        proj.weight[5, word("circle")] = 0.5   # concept only, half as strong as neuron 0
        out.weight.fill_(1.0 / vocab ** 0.5)   # unit columns ...
        out.weight[:, 2] *= 0.01               # ... except neuron 2's
    before = state_copy(unet)
    name = "block.ff.net.2.weight"
    scores = concept_neuron_scores(unet, tok, te, CONCEPT, GENERAL, timesteps=[999, 500], samples=1)[name]
    assert torch.argsort(scores, descending=True)[:3].tolist() == [0, 5, 2]
    assert scores[1] == 0 and scores[4] == 0 and scores[3] < 0
    pruned = lambda d: torch.nonzero(d[name].abs().sum(dim=0)).flatten().tolist()  # noqa: E731
    assert pruned(prune_concept_neurons(unet, tok, te, CONCEPT, GENERAL, fraction=0.125, timesteps=2)) == [0]
    assert pruned(prune_concept_neurons(unet, tok, te, CONCEPT, GENERAL, fraction=0.25, timesteps=2)) == [0, 5]
    # every neuron allowed: only the three the concept uses more than the general prompts go
    assert pruned(prune_concept_neurons(unet, tok, te, CONCEPT, GENERAL, fraction=1.0, timesteps=2)) == [0, 2, 5]
    assert same_state(unet, before)
    with pytest.raises(ValueError, match="general prompts"):
        prune_concept_neurons(unet, tok, te, CONCEPT, [], fraction=0.1)


# -- the node, saving and loading -------------------------------------------------------------------


PRUNE = {"concept": "circle", "fraction": 0.05, "timesteps": 2, "samples": 1}


def test_prune_node_saves_and_reloads_bit_identical(tiny_pixel_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOMWORK_ERASER_DIR", str(tmp_path / "erasers"))
    ex = Executor(device="cpu", disk_cache=False)
    plain, _, _ = run_captured(*eraser_graph(tiny_pixel_model), tmp_path, ex)
    zero, _, _ = run_captured(*eraser_graph(tiny_pixel_model, ("PruneConcept", {**PRUNE, "strength": 0.0})),
                              tmp_path, ex)
    assert torch.equal(plain, zero)
    direct, _, _ = run_captured(*eraser_graph(tiny_pixel_model, ("PruneConcept", PRUNE)), tmp_path, ex)
    assert not torch.equal(plain, direct)
    g, ids = eraser_graph(tiny_pixel_model, ("PruneConcept", PRUNE))
    save = add_node(g, "SaveEraser", {"name": "pruned"})
    g.connect(ids["erasers"][0], "model", save.id, "model")
    report = ex.run(g, targets=[save.id], output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    path = tmp_path / "erasers" / "pruned.safetensors"
    assert os.path.exists(path)
    (patch,) = load_erasers(str(path))
    assert isinstance(patch, WeightDeltaPatch) and patch.target == "unet" and patch.meta["method"] == "prune"
    assert patch.meta["pruned"] > 0
    again = load_erasers(save_erasers(str(tmp_path / "copy.safetensors"), [patch]))[0]
    assert again.cache_key() == patch.cache_key()
    loaded, _, _ = run_captured(*eraser_graph(tiny_pixel_model, ("LoadEraser", {"path": "pruned"})), tmp_path, ex)
    assert torch.equal(direct, loaded)
    off, _, _ = run_captured(*eraser_graph(tiny_pixel_model, ("LoadEraser", {"path": "pruned", "strength": 0.0})),
                             tmp_path, ex)
    assert torch.equal(plain, off)
    model, clip, _ = ex.models.load(tiny_pixel_model, "float32", load_model_folder)
    fresh = load_model_folder(tiny_pixel_model)[0]
    assert same_state(model.unet, fresh.unet.state_dict())


def test_prune_node_errors_name_the_problem(tiny_pixel_model, tmp_path):
    ex = Executor(device="cpu", disk_cache=False)
    for params, words in (({**PRUNE, "general": "a red circle\na circle on the left", "auto_general": "off"},
                           "PruneConcept"),
                          ({**PRUNE, "general": "", "auto_general": "off"}, "general"),
                          ({**PRUNE, "concept": " "}, "concept")):
        g, ids = eraser_graph(tiny_pixel_model, ("PruneConcept", params))
        report = ex.run(g, targets=[ids["capture"]], output_dir=tmp_path)
        assert words in (report.nodes[ids["erasers"][0]].error or ""), report.nodes[ids["erasers"][0]].error


def test_prune_node_defaults_use_the_model_phrasing_and_vocabulary(tiny_bundle):
    from kernels.erasers import default_preserve, default_templates, model_scheduler, prune_concept_neurons
    from nodes.erasers import DEFAULT_GENERAL, DEFAULT_TEMPLATES, PruneConcept

    model, clip = tiny_bundle
    tok = clip.tokenizer

    class Ctx:
        said = ""

        def summary(self, text):
            self.said = text

    params = {n: p.default for n, p in PruneConcept.params.items()}
    params.update(concept="circle", timesteps=1, samples=1)
    ctx = Ctx()
    got = PruneConcept().run(ctx, model, clip, **params)["model"].patches[-1]
    temps = default_templates(tok, "circle")
    keep = default_preserve(tok, "circle")
    ref = prune_concept_neurons(model.unet, tok, clip.text_encoder, [t.replace("{}", "circle") for t in temps], keep,
                                fraction=params["fraction"], scheduler=model_scheduler(model), timesteps=1, seed=0,
                                samples=1)
    assert got.deltas.keys() == ref.keys() and all(torch.equal(got.deltas[k], ref[k]) for k in ref)
    assert got.meta["general"] == len(keep) and got.meta["templates"] == len(temps)
    assert f"preserved {len(keep)} general prompts" in ctx.said and ctx.said.endswith("(auto)")
    # a version-1 file keeps the photo templates, the fixed general list, its fraction, no vocabulary
    old = PruneConcept.migrate({"concept": "circle"}, 1)
    assert old == {"concept": "circle", "templates": DEFAULT_TEMPLATES, "general": DEFAULT_GENERAL,
                   "fraction": 0.02, "auto_general": "off", "site": "feed-forward"}
    assert PruneConcept.migrate({"concept": "circle", "fraction": 0.1}, 1)["fraction"] == 0.1


def test_cross_attention_site_prunes_the_value_channels(tiny_bundle):
    from kernels.erasers import cross_attention_output_layers, prune_layers

    model, clip = tiny_bundle
    layers = cross_attention_output_layers(model.unet)
    assert layers and all(n.endswith(".attn2.to_out.0") for n in layers)
    assert prune_layers(model.unet, "feed_forward") == ffn_output_layers(model.unet)
    with pytest.raises(ValueError, match="site"):
        prune_layers(model.unet, "attention")
    sched = make_scheduler("ddim", model.scheduler_config)
    fraction = 0.1
    deltas = prune_concept_neurons(model.unet, clip.tokenizer, clip.text_encoder, CONCEPT, GENERAL, fraction=fraction,
                                   scheduler=sched, timesteps=2, samples=1, site="cross_attention_values")
    scores = concept_neuron_scores(model.unet, clip.tokenizer, clip.text_encoder, CONCEPT, GENERAL, scheduler=sched,
                                   timesteps=2, samples=1, layers=layers)
    assert set(deltas) == {f"{n}.weight" for n in layers}
    for name, delta in deltas.items():
        w = model.unet.get_parameter(name).detach()
        top = torch.topk(scores[name], pruned_count(fraction, w.shape[1])).indices
        expected = set(top[scores[name][top] > 0].tolist())
        assert expected and set(torch.nonzero(delta.abs().sum(dim=0)).flatten().tolist()) == expected
        assert torch.equal(delta[:, sorted(expected)], -w[:, sorted(expected)])


def test_prune_node_site_and_version_2_files(tiny_bundle):
    from kernels.erasers import default_preserve, default_templates, model_scheduler
    from nodes.erasers import PruneConcept

    model, clip = tiny_bundle

    class Ctx:
        def summary(self, _text):
            pass

    params = {n: p.default for n, p in PruneConcept.params.items()}
    params.update(concept="circle", timesteps=1, samples=1, site="cross-attention values", fraction=0.1)
    got = PruneConcept().run(Ctx(), model, clip, **params)["model"].patches[-1]
    temps, keep = default_templates(clip.tokenizer, "circle"), default_preserve(clip.tokenizer, "circle")
    ref = prune_concept_neurons(model.unet, clip.tokenizer, clip.text_encoder, [t.replace("{}", "circle") for t in temps],
                                keep, fraction=0.1, scheduler=model_scheduler(model), timesteps=1, samples=1,
                                site="cross_attention_values")
    assert got.deltas.keys() == ref.keys() and all(torch.equal(got.deltas[k], ref[k]) for k in ref)
    assert got.meta["site"] == "cross-attention values"
    # a version-2 file pruned the feed-forward neurons, at its own fraction or version 2's default
    assert PruneConcept.migrate({"concept": "circle"}, 2) == {"concept": "circle", "fraction": 0.02,
                                                              "site": "feed-forward"}
    assert PruneConcept.migrate({"concept": "circle", "fraction": 0.1}, 2)["fraction"] == 0.1
