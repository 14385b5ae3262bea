"""Diffusion Classifier on tiny random models.

Exact checks: the pairs are shared (a candidate's score is the mean of per-pair errors computed
by hand with the same pairs); a seed gives identical scores and another seed other ones; pruning
keeps exactly `keep` candidates on the later pairs and ranks them first; a candidate that is the
model's own prediction target scores zero. Accuracy on ShapesT2I is measured in bench/speed.py.
"""

import pytest
import torch
from conftest import QuietContext as Ctx

from kernels.analysis.classifier import (
    ClassifierError,
    classify,
    pair_errors,
    prediction_target,
    shared_pairs,
    training_scheduler,
)
from kernels.analysis.table import Table
from kernels.denoiser import Denoiser, DenoiserText
from kernels.text import encode_text
from nodes.analysis import DiffusionClassifier
from nodes.base import NodeError

PROMPTS = ["a red circle", "a blue square", "a green circle", "a red square"]


@pytest.fixture(scope="module")
def setup(tiny_bundle):
    model, clip = tiny_bundle
    texts = [DenoiserText(encode_text(clip.tokenizer, clip.text_encoder, p).embeds) for p in PROMPTS]
    clean = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    return model, clip, texts, clean, training_scheduler(model.scheduler_config, model)


def test_scores_are_means_over_shared_pairs(setup):
    model, _clip, texts, clean, sched = setup
    result = classify(model, sched, clean, texts, PROMPTS, samples=5, first=5, keep=4, seed=11)
    timesteps, noises = shared_pairs(sched, 5, 11, tuple(clean.shape[1:]))
    den = Denoiser.of(model)
    for i, text in enumerate(texts):  # each candidate alone, same pairs: the same mean
        errs = [float(pair_errors(den, sched, clean, text, timesteps[j], noises[j])[0]) for j in range(5)]
        assert result.errors[i] == pytest.approx(sum(errs) / 5, rel=1e-5)
    assert result.samples == (5, 5, 5, 5)
    assert list(result.ranking) == sorted(range(4), key=lambda i: result.errors[i])


def test_same_seed_same_scores_other_seed_other_scores(setup):
    model, _clip, texts, clean, sched = setup
    a = classify(model, sched, clean, texts, PROMPTS, samples=6, first=2, keep=2, seed=5)
    b = classify(model, sched, clean, texts, PROMPTS, samples=6, first=2, keep=2, seed=5)
    c = classify(model, sched, clean, texts, PROMPTS, samples=6, first=2, keep=2, seed=6)
    assert a == b
    assert a.errors != c.errors


def test_pairs_spread_over_the_training_range(setup):
    *_rest, sched = setup
    t, noise = shared_pairs(sched, 16, 0, (3, 4, 4))
    assert noise.shape == (16, 3, 4, 4) and len(set(t.tolist())) == 16
    counts = torch.histc(t.float(), bins=4, min=0, max=1000)
    assert counts.min() >= 3  # stratified: every quarter of the range gets its share
    assert torch.equal(shared_pairs(sched, 8, 0, (3, 4, 4))[0], t[:8])  # a prefix of the same pairs


def test_adaptive_pruning_keeps_the_best_for_the_later_pairs(setup):
    model, _clip, texts, clean, sched = setup
    full_first = classify(model, sched, clean, texts, PROMPTS, samples=2, first=2, keep=4, seed=9)
    pruned = classify(model, sched, clean, texts, PROMPTS, samples=6, first=2, keep=2, seed=9)
    kept = sorted(range(4), key=lambda i: full_first.errors[i])[:2]
    assert sorted(i for i, n in enumerate(pruned.samples) if n == 6) == sorted(kept)
    assert all(pruned.samples[i] == 2 for i in range(4) if i not in kept)
    assert set(pruned.ranking[:2]) == set(kept)
    for i in set(range(4)) - set(kept):  # a pruned candidate keeps its first-pairs score
        assert pruned.errors[i] == pytest.approx(full_first.errors[i], rel=1e-6)


def test_the_target_is_what_the_model_predicts(setup):
    model, _clip, texts, clean, sched = setup
    noise = torch.randn_like(clean)
    t = torch.tensor([500])
    v = prediction_target(sched, clean, noise, t)  # v-prediction: sqrt(a) eps - sqrt(1-a) x0
    a = sched.alphas_cumprod[500]
    assert torch.allclose(v, a.sqrt() * noise - (1 - a).sqrt() * clean, atol=1e-6)

    class Oracle(torch.nn.Module):  # "predicts" the true v for text row 0, zeros for the others
        def forward(self, x, t, encoder_hidden_states):
            rows = (encoder_hidden_states == texts[0].embeds).flatten(1).all(1)
            return v.expand(x.shape[0], -1, -1, -1) * rows[:, None, None, None]

    errs = pair_errors(Denoiser(Oracle(), "unet"), sched, clean, DenoiserText(torch.cat([x.embeds for x in texts[:2]])),
                       t[0], noise[0])
    assert float(errs[0]) == 0.0 and float(errs[1]) > 0


def test_flow_models_are_scored_on_their_velocity(tiny_flow_model):
    from kernels.models import load_model_folder

    model, clip, _vae = load_model_folder(tiny_flow_model)
    sched = training_scheduler(model.scheduler_config, model)
    texts = [DenoiserText(encode_text(clip.tokenizer, clip.text_encoder, p).embeds) for p in PROMPTS[:2]]
    clean = torch.zeros(1, model.in_channels, 16, 16)
    result = classify(model, sched, clean, texts, PROMPTS[:2], samples=2, first=2, keep=2)
    assert all(e > 0 for e in result.errors)
    noise = torch.ones_like(clean)
    assert torch.equal(prediction_target(sched, clean, noise, sched.timesteps[:1]), noise)


def test_bad_input_is_refused(setup):
    model, _clip, texts, clean, sched = setup
    with pytest.raises(ClassifierError, match="one text per prompt"):
        classify(model, sched, clean, texts[:1], PROMPTS)
    with pytest.raises(ClassifierError, match="one image"):
        classify(model, sched, clean.expand(2, -1, -1, -1), texts, PROMPTS)


def test_node_returns_the_table_and_the_best_prompt(tiny_bundle):
    model, clip = tiny_bundle
    from kernels.models import VaeBundle

    vae = VaeBundle(None, "pixel", "pixel")
    image = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(1))
    node = DiffusionClassifier()
    out = node.run(Ctx(), model, clip, vae, image, "\n".join(PROMPTS) + "\n\n", 4, 2, 2, 3)
    table = out["table"]
    assert isinstance(table, Table) and table.columns == ["rank", "prompt", "error", "pairs"]
    assert table.column("rank") == [1, 2, 3, 4] and sorted(table.column("prompt")) == sorted(PROMPTS)
    assert out["best"].prompt == table.rows[0][1]
    assert table.column("pairs") == [4, 4, 2, 2]
    again = node.run(Ctx(), model, clip, vae, image, "\n".join(PROMPTS), 4, 2, 2, 3)
    assert again["table"] == table
    with pytest.raises(NodeError, match="DiffusionClassifier: give at least one"):
        node.run(Ctx(), model, clip, vae, image, " \n ", 4, 2, 2, 3)


def test_a_table_survives_the_disk_cache(tmp_path):
    from app.engine.cache import DiskCache

    table = Table("t", ["rank", "prompt", "error"], [[1, "a red circle", 0.25], [2, "a blue square", 0.5]])
    DiskCache(tmp_path).put("k", {"table": "hash"}, {"table": table})
    back = DiskCache(tmp_path).get("k")["table"]
    assert type(back) is Table and back == table
    assert back.as_text().splitlines()[1].split() == ["rank", "prompt", "error"]
    with pytest.raises(ValueError, match="2 values for 3 columns"):
        Table("t", ["a", "b", "c"], [[1, 2]])
