"""Prompt schedules: `[from:to:when]` prompt editing and stage-wise prompts, read by the Sampler at
exactly their steps on every family."""

import pytest
import torch
from conftest import CAPTURED, inputs_fed_to, txt2img_graph

from app.engine import Executor
from kernels.models import load_model_folder
from kernels.prompt_schedule import PromptEditError, scheduled_texts, stage_at, step_range
from kernels.text import encode_text
from nodes.registry import add_node


@pytest.mark.parametrize("text, first, later", [
    ("a [red:blue:0.5] circle", "a red circle", [("a blue circle", 0.5, 1.0, False)]),
    ("a [red:0.25] circle", "a  circle", [("a red circle", 0.25, 1.0, False)]),
    ("a [red::0.25] circle", "a red circle", [("a  circle", 0.25, 1.0, False)]),
    ("a [red:blue:0.5] [circle:square:0.25]", "a red circle",
     [("a red square", 0.25, 0.5, False), ("a blue square", 0.5, 1.0, False)]),
    ("a [red:blue:10] circle", "a red circle", [("a blue circle", 10.0, float("inf"), True)]),
    ("a [(red:1.2):blue:0.5] circle", "a (red:1.2) circle", [("a blue circle", 0.5, 1.0, False)]),
    ("a [blue] circle, [big:red]", "a [blue] circle, [big:red]", []),  # weighting, not edits
])
def test_prompt_edits_are_read_as_a1111_writes_them(text, first, later):
    assert scheduled_texts(text) == (first, later)


@pytest.mark.parametrize("text, message", [
    ("a [red:blue:soon] circle", "ends in 'soon'"),
    ("a [red:blue:0.5] [circle:square:10]", "mix fractions"),
])
def test_malformed_edits_are_errors(text, message):
    with pytest.raises(PromptEditError, match=message):
        scheduled_texts(text)


def test_windows_cover_the_steps_as_a1111_counts_them():
    assert list(step_range(0.5, 1.0, False, 20)) == list(range(10, 20))
    assert list(step_range(0.0, 0.5, False, 5)) == [0, 1]
    assert list(step_range(3, float("inf"), True, 5)) == [3, 4]
    stages = [(None, 0.0, 1.0, False), (None, 0.5, 1.0, False)]
    assert [stage_at(stages, i, 4) for i in range(4)] == [0, 0, 1, 1]  # the later stage wins


def run_latent(path, tmp_path, prompt, *, steps=4, cfg=4.0, stage=None, scheduler="euler", **kw):
    """txt2img with `prompt`; with `stage` = (text, start, end), a ConditioningStage on it."""
    g, ids = txt2img_graph(path, prompt=prompt, steps=steps, cfg=cfg, scheduler=scheduler, save=False, **kw)
    if stage is not None:
        text, start, end = stage
        other = add_node(g, "TextEncode", {"text": text}).id
        g.connect(ids["load"], "clip", other, "clip")
        node = add_node(g, "ConditioningStage", {"start": start, "end": end}).id
        g.connect(ids["text"], "conditioning", node, "conditioning")
        g.connect(other, "conditioning", node, "stage")
        g.connect(node, "conditioning", ids["sampler"], "positive")
    cap = add_node(g, "TestCaptureLatent", {}).id
    g.connect(ids["sampler"], "latent", cap, "latent")
    report = Executor(device="cpu", disk_cache=False).run(g, targets=[cap], output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    return CAPTURED.pop("latent")


def test_the_sampler_reads_each_prompt_at_exactly_its_steps(tiny_latent_model, tmp_path):
    """The UNet's own inputs, step by step: the first text for steps 0-1 of 4, the second after."""
    model, clip, _vae = load_model_folder(tiny_latent_model)
    red = encode_text(clip.tokenizer, clip.text_encoder, "a red circle").embeds
    blue = encode_text(clip.tokenizer, clip.text_encoder, "a blue circle").embeds
    ex = Executor(device="cpu", disk_cache=False)
    ex.models.load(tiny_latent_model, "float32", lambda *a, **k: (model, clip, _vae))  # this very UNet
    g, ids = txt2img_graph(tiny_latent_model, prompt="a [red:blue:0.5] circle", steps=4, save=False)
    fed = inputs_fed_to(model.unet, ["encoder_hidden_states"],
                        lambda: ex.run(g, targets=[ids["sampler"]], output_dir=tmp_path))
    positives = [e[0][1:] for e in fed]  # each call is [negative, positive]
    assert len(positives) == 4
    assert all(torch.equal(p, red) for p in positives[:2]) and all(torch.equal(p, blue) for p in positives[2:])


def test_a_schedule_of_one_conditioning_is_bit_identical(tiny_latent_model, tmp_path):
    plain = run_latent(tiny_latent_model, tmp_path, "a red circle")
    same = run_latent(tiny_latent_model, tmp_path, "a red circle", stage=("a red circle", 0.0, 1.0))
    assert torch.equal(plain, same)
    # a stage over every step is the same as that prompt alone; over half of them it is not
    blue = run_latent(tiny_latent_model, tmp_path, "a blue square")
    assert torch.equal(run_latent(tiny_latent_model, tmp_path, "a red circle", stage=("a blue square", 0.0, 1.0)),
                       blue)
    half = run_latent(tiny_latent_model, tmp_path, "a red circle", stage=("a blue square", 0.5, 1.0))
    assert not torch.equal(half, blue) and not torch.equal(half, plain)
    # prompt editing is the same schedule as the stage node
    assert torch.equal(run_latent(tiny_latent_model, tmp_path, "a [red circle:blue square:0.5]"), half)


def test_a_stage_must_end_after_it_starts(tiny_latent_model, tmp_path):
    g, ids = txt2img_graph(tiny_latent_model, steps=2, save=False)
    node = add_node(g, "ConditioningStage", {"start": 0.5, "end": 0.5}).id
    g.connect(ids["text"], "conditioning", node, "conditioning")
    g.connect(ids["text"], "conditioning", node, "stage")
    report = Executor(device="cpu", disk_cache=False).run(g, targets=[node], output_dir=tmp_path)
    assert "must come after start" in report.nodes[node].error


@pytest.fixture(scope="module", params=["sdxl", "sd3", "flux"])
def family_model(request, tmp_path_factory):
    from kernels.tiny import build_tiny_sd3_model, build_tiny_sdxl_model
    from kernels.tiny_flux import build_tiny_flux_model

    build = {"sdxl": build_tiny_sdxl_model, "sd3": build_tiny_sd3_model, "flux": build_tiny_flux_model}
    return request.param, build[request.param](str(tmp_path_factory.mktemp("models") / request.param))


def test_stages_on_the_other_families_carry_their_pooled_text(family_model, tmp_path):
    """A stage over every step equals its prompt alone: its sequence and pooled embedding (SDXL's
    added text embeds, SD3's and FLUX's pooled projections) both reach the denoiser."""
    family, path = family_model
    scheduler = "euler" if family == "sdxl" else "flow_match_euler"
    kw = dict(steps=2, cfg=4.0, scheduler=scheduler)
    blue = run_latent(path, tmp_path, "a blue square", **kw)
    staged = run_latent(path, tmp_path, "a red circle", stage=("a blue square", 0.0, 1.0), **kw)
    assert torch.equal(staged, blue), family
    assert not torch.equal(run_latent(path, tmp_path, "a [red circle:blue square:0.5]", **kw), blue)
