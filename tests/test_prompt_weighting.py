"""Prompt weighting, BREAK and long prompts (A1111/ComfyUI syntax) on every family's encoders."""

import pytest
import torch
from conftest import CAPTURED, txt2img_graph

from app.engine import Executor
from kernels.models import load_model_folder
from kernels.prompt_weighting import PromptSyntaxError, encode_weighted, line_up, parse_prompt
from kernels.text import encode_text
from nodes.registry import add_node

LONG = ("a red circle on the left and a blue square on the right , a green triangle at the top "
        "with a yellow star in the center")  # 24 tokens: two chunks of the tiny models' 14


@pytest.mark.parametrize("text, plain, weights", [
    ("a (red:1.3) circle", "a red circle", ((2, 5, 1.3),)),
    ("a ((red)) circle", "a red circle", ((2, 5, 1.1 * 1.1),)),
    ("a [blue] square", "a blue square", ((2, 6, 1 / 1.1),)),
    ("(a [b] c:1.5)", "a b c", ((0, 2, 1.5), (2, 3, 1.5 / 1.1), (3, 5, 1.5))),
    (r"a \(red\) circle", "a (red) circle", ()),
    ("(red : 0.5 )", "red ", ((0, 4, 0.5),)),
    ("ratio 16:9 (cat)", "ratio 16:9 cat", ((11, 14, 1.1),)),
])
def test_the_syntax_is_read_as_a1111_writes_it(text, plain, weights):
    parsed = parse_prompt(text)
    assert parsed.plain == plain
    assert [(s, e) for s, e, _ in parsed.weights] == [(s, e) for s, e, _ in weights]
    assert [w for *_, w in parsed.weights] == pytest.approx([w for *_, w in weights])


def test_break_is_a_word_in_capitals():
    assert parse_prompt("a red circle BREAK a blue square").breaks == (13,)
    assert parse_prompt("BREAKFAST and break").breaks == ()


@pytest.mark.parametrize("text, message", [
    ("a (red:abc) circle", "weight 'abc' of the group at position 3 is not a number"),
    ("a (red circle", r"the '\(' at position 3 is never closed"),
    ("a red) circle", r"the '\)' at position 6 closes nothing"),
    ("a [red) circle", r"the '\)' at position 7 closes nothing"),
])
def test_malformed_weighting_is_an_error_with_its_position(text, message):
    with pytest.raises(PromptSyntaxError, match=message):
        parse_prompt(text)


@pytest.fixture(scope="module")
def sd(tiny_latent_model):
    _model, clip, _vae = load_model_folder(tiny_latent_model)
    return clip


def test_weight_one_everywhere_is_bit_identical_to_the_plain_prompt(sd):
    plain = encode_text(sd.tokenizer, sd.text_encoder, "a red circle on the left")
    for text in ("a red circle on the left", "(a red circle on the left:1.0)", "a (red:1) circle on the left"):
        cond = encode_weighted(sd.tokenizer, sd.text_encoder, text)
        assert torch.equal(cond.embeds, plain.embeds) and torch.equal(cond.empty, plain.empty)
        assert cond.words == plain.words and cond.prompt == plain.prompt


def test_a_weight_moves_only_its_words_tokens_away_from_the_empty_prompt(sd):
    plain = encode_text(sd.tokenizer, sd.text_encoder, "a red circle on the left")
    empty = encode_text(sd.tokenizer, sd.text_encoder, "").embeds
    cond = encode_weighted(sd.tokenizer, sd.text_encoder, "a (red:1.5) circle on the left")
    red = list(plain.words["red"])
    others = [p for p in range(plain.embeds.shape[1]) if p not in red]
    assert torch.equal(cond.embeds[:, others], plain.embeds[:, others])
    assert torch.equal(cond.embeds[:, red], empty[:, red] + 1.5 * (plain.embeds[:, red] - empty[:, red]))
    assert cond.positions("red circle") == plain.positions("red circle")  # layout still finds its words


def test_a_long_prompt_is_encoded_in_chunks_with_the_word_map_across_them(sd):
    tok = sd.tokenizer
    n = tok.model_max_length  # 16 on the tiny models: 14 content tokens per chunk
    cond = encode_weighted(tok, sd.text_encoder, LONG)
    assert cond.embeds.shape[1] == 2 * n and cond.empty.shape[1] == 2 * n
    words = LONG.split()
    first, second = " ".join(words[:n - 2]), " ".join(words[n - 2:])
    assert torch.equal(cond.embeds[:, :n], encode_text(tok, sd.text_encoder, first).embeds)
    assert torch.equal(cond.embeds[:, n:], encode_text(tok, sd.text_encoder, " " + second).embeds)
    star = encode_text(tok, sd.text_encoder, second).words["star"]
    assert cond.words["star"] == tuple(n + p for p in star)


def test_break_starts_a_new_chunk(sd):
    tok, enc = sd.tokenizer, sd.text_encoder
    cond = encode_weighted(tok, enc, "a red circle BREAK a blue square")
    n = tok.model_max_length
    assert torch.equal(cond.embeds[:, :n], encode_text(tok, enc, "a red circle ").embeds)
    assert torch.equal(cond.embeds[:, n:], encode_text(tok, enc, " a blue square").embeds)
    assert cond.positions("blue") == [n + p for p in encode_text(tok, enc, "a blue square").positions("blue")]


def test_too_long_a_prompt_is_refused(sd):
    with pytest.raises(PromptSyntaxError, match="at most 8 are encoded"):
        encode_weighted(sd.tokenizer, sd.text_encoder, " ".join(["red circle"] * 80))
    with pytest.raises(PromptSyntaxError, match="characters"):
        encode_weighted(sd.tokenizer, sd.text_encoder, "red " * 10_000)


def test_a_short_negative_is_padded_with_its_empty_chunks():
    pos, neg_empty = torch.randn(1, 32, 4), torch.randn(1, 16, 4)
    neg = torch.randn(1, 16, 4)
    p, n = line_up(pos, neg, None, neg_empty)
    assert p is pos and torch.equal(n, torch.cat([neg, neg_empty], 1))
    with pytest.raises(ValueError, match="cannot be padded"):
        line_up(pos, torch.randn(1, 7, 4), None, None)


def test_a_long_prompt_with_a_short_negative_samples(tiny_latent_model, tmp_path):
    g, ids = txt2img_graph(tiny_latent_model, prompt=LONG, steps=2, save=False)
    neg = add_node(g, "TextEncode", {"text": "a (green:1.2) square"}).id
    g.connect(ids["load"], "clip", neg, "clip")
    g.connect(neg, "conditioning", ids["sampler"], "negative")
    cap = add_node(g, "TestCaptureLatent", {}).id
    g.connect(ids["sampler"], "latent", cap, "latent")
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
    assert torch.isfinite(CAPTURED.pop("latent")).all()


def test_text_encode_names_the_malformed_weight(tiny_latent_model, tmp_path):
    g, ids = txt2img_graph(tiny_latent_model, prompt="a (red:abc) circle", steps=1, save=False)
    report = Executor(device="cpu", disk_cache=False).run(g, targets=[ids["text"]], output_dir=tmp_path)
    assert "the prompt: the weight 'abc'" in report.nodes[ids["text"]].error


@pytest.fixture(scope="module", params=["sdxl", "sd3", "flux"])
def family_clip(request, tmp_path_factory):
    from kernels.tiny import build_tiny_sd3_model, build_tiny_sdxl_model
    from kernels.tiny_flux import build_tiny_flux_model

    build = {"sdxl": build_tiny_sdxl_model, "sd3": build_tiny_sd3_model, "flux": build_tiny_flux_model}
    path = build[request.param](str(tmp_path_factory.mktemp("models") / request.param))
    return request.param, load_model_folder(path)[1]


def test_weighting_on_the_other_families(family_clip):
    """Weight 1 is bit-identical; a weight changes exactly the positions the word map gives it
    (SD3: its CLIP and T5 positions), leaving the pooled embedding as it was."""
    family, clip = family_clip
    tok, enc = clip.tokenizer, clip.text_encoder
    plain = encode_text(tok, enc, "a red circle and a blue square")
    same = encode_weighted(tok, enc, "(a red circle and a blue square:1.0)")
    assert torch.equal(same.embeds, plain.embeds) and same.words == plain.words
    cond = encode_weighted(tok, enc, "a (red:0.5) circle and a blue square")
    changed = sorted(set(torch.nonzero((cond.embeds != plain.embeds).any(-1)[0]).flatten().tolist()))
    assert changed == sorted(plain.words["red"]), family
    assert torch.equal(cond.pooled, plain.pooled)
    if family == "sdxl":  # CLIP-L and CLIP-G chunk together
        long = encode_weighted(tok, enc, LONG)
        assert long.embeds.shape[1] == 2 * plain.embeds.shape[1]


@pytest.mark.parametrize("stem", ["layout-region-attention", "layout-regional-prompts"])
def test_layout_graphs_run_on_a_long_weighted_prompt(stem, tiny_pixel_model, tmp_path, monkeypatch):
    """The word map spans the chunks, so boxes still find their phrases in the second chunk."""
    import test_layout_graphs

    monkeypatch.setattr(test_layout_graphs, "PROMPT", LONG + " , (a red circle:1.3) and a blue square")
    g = test_layout_graphs.build(stem, tiny_pixel_model)
    for node in g.nodes.values():
        if node.type == "Sampler":
            node.params["steps"] = 2
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values() if r.error}
