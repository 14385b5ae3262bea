"""ClosedFormErase's defaults: the automatic preserve set, its weight and lam, and old files."""

import json

import torch
from conftest import eraser_graph, run_captured

from kernels.erasers import (
    QUICKFIX_TEMPLATES,
    common_concepts,
    default_preserve,
    default_templates,
    is_shapes_world,
    quickfix_edit,
    uce_edit,
    world_prompts,
    world_templates,
)
from kernels.text import words_of
from nodes.erasers import ClosedFormErase


def test_world_preserve_set_leaves_out_only_prompts_naming_the_concept(tiny_bundle):
    tok = tiny_bundle[1].tokenizer
    assert is_shapes_world(tok)
    red = default_preserve(tok, "red", "blue")
    assert red and not any("red" in words_of(p) for p in red)
    assert {"a blue circle", "a green star", "circle", "yellow", "a green star on the left"} <= set(red)
    assert len(red) == len(world_prompts(tails=True)) - 4 * 6 - 1  # red's 4 pairs x 6 phrasings, and "red"
    pair = default_preserve(tok, "red circle", "red triangle")
    assert "a red circle" not in pair and {"a red square", "a blue circle", "red", "circle"} <= set(pair)
    # the halves are held plain only: their phrased tails would pin the pair's own
    assert "a green square at the top right" in pair and "a red square at the top right" not in pair
    assert "a blue circle on the left" not in pair
    assert default_preserve(tok, "red", extra=["a red thing on grass"])[-1] == "a red thing on grass"
    # version 2's plain set
    # for an edit that tells a pair from its halves (the output-MLP site) the halves' phrasings stay
    halves = default_preserve(tok, "red circle", "red triangle", phrased_halves=True)
    assert {"a red square at the top right", "a blue circle on the left", "a red square"} <= set(halves)
    assert not any({"red", "circle"} <= set(words_of(p)) for p in halves)
    assert default_preserve(tok, "red", phrased_halves=True) == red
    plain = default_preserve(tok, "red circle", "red triangle", phrased=False)
    assert len(plain) == len(world_prompts()) - 1 and "a green star on the left" not in plain


def test_default_templates_follow_the_model_phrasing(tiny_bundle):
    tok = tiny_bundle[1].tokenizer
    circle = default_templates(tok, "circle", "triangle")
    assert circle == world_templates("circle") and "a red {} on the left" in circle and "an orange {}" in circle
    assert "an {} star at the top right" in default_templates(tok, "orange", "blue")
    assert default_templates(tok, "red circle")[:2] == ["a {}", "a {} on the left"]
    assert default_templates(tok, "dog", "cat") == list(QUICKFIX_TEMPLATES)  # not a world concept
    assert world_templates("circle red") is None and world_templates("red", "a cat") is None


def test_common_concepts_for_other_models(tmp_path):
    class BigVocab:  # a real model's tokenizer: tens of thousands of tokens
        def get_vocab(self):
            return {f"tok{i}": i for i in range(50000)}

    assert not is_shapes_world(BigVocab())
    keep = default_preserve(BigVocab(), "cat")
    assert "a dog" in keep and "a cat" not in keep and "a black cat" not in keep
    assert len(keep) == len(common_concepts()) - 2
    lst = tmp_path / "c.txt"
    lst.write_text("# comment\na fox\n\n a hen \n", encoding="utf-8")
    assert common_concepts(lst) == ["a fox", "a hen"]


class _Ctx:
    said = None

    def summary(self, text):
        self.said = text

    def progress(self, *_args, **_kwargs):
        pass


def _node(model, clip, ctx=None, **params):
    full = {n: p.default for n, p in ClosedFormErase.params.items()}
    full.update(params)
    return ClosedFormErase().run(ctx or _Ctx(), model, clip, **full)


def test_node_defaults_equal_the_kernels_with_the_vocabulary_preserve_set(tiny_bundle):
    model, clip = tiny_bundle
    tok, te = clip.tokenizer, clip.text_encoder
    assert ClosedFormErase.params["templates"].default == ""
    temps = default_templates(tok, "red", "blue")
    keep = default_preserve(tok, "red", "blue")
    ctx = _Ctx()
    out = _node(model, clip, ctx, concept="red", anchor="blue", target="both")
    assert ctx.said.startswith(f"{len(temps)} edit templates; preserved {len(keep)} prompts") and \
        ctx.said.endswith("(auto); lam 0.5, preserve weight 1")
    ref_uce = uce_edit(model.unet, tok, te, "red", "blue", templates=temps, preserve=keep, lam=0.5,
                       positions="to_end", preserve_scale=1.0)
    ref_qf = quickfix_edit(tok, te, "red", "blue", templates=temps, preserve=keep, lam=0.5, site="output_mlp")
    got_uce, got_qf = out["model"].patches[-1].deltas, out["clip"].patches[-1].deltas
    assert got_uce.keys() == ref_uce.keys() and all(torch.equal(got_uce[k], ref_uce[k]) for k in ref_uce)
    assert got_qf.keys() == ref_qf.keys() and all(torch.equal(got_qf[k], ref_qf[k]) for k in ref_qf)
    meta = out["model"].patches[-1].meta
    assert meta["preserved"] == len(keep) and meta["templates"] == len(temps)
    assert meta["summary"].startswith(f"{len(temps)} edit templates; preserved {len(keep)} prompts ('a green circle'")
    # auto_preserve off with v1's lam and the photo templates is the edit version 1 made
    old = _node(model, clip, concept="red", anchor="blue", target="cross_attention", auto_preserve="off", lam=0.01,
                templates="\n".join(QUICKFIX_TEMPLATES))
    ref_old = uce_edit(model.unet, tok, te, "red", "blue", templates=QUICKFIX_TEMPLATES, lam=0.01, positions="to_end")
    assert all(torch.equal(old["model"].patches[-1].deltas[k], ref_old[k]) for k in ref_old)
    # "plain vocabulary" is version 2's preserve set
    v2 = _node(model, clip, concept="red", anchor="blue", target="text_encoder", auto_preserve="plain vocabulary",
               templates="\n".join(QUICKFIX_TEMPLATES), text_site="first attention")
    ref_v2 = quickfix_edit(tok, te, "red", "blue", templates=QUICKFIX_TEMPLATES, lam=0.5,
                           preserve=default_preserve(tok, "red", "blue", phrased=False))
    assert all(torch.equal(v2["clip"].patches[-1].deltas[k], ref_v2[k]) for k in ref_v2)
    # a pair on the text encoder: the output-MLP site with its halves' phrasings held; the first
    # attention site with the halves held plain
    pair = _node(model, clip, concept="red circle", anchor="red triangle", target="text_encoder")
    ptemps = default_templates(tok, "red circle", "red triangle")
    ref_pair = quickfix_edit(tok, te, "red circle", "red triangle", templates=ptemps, lam=0.5, site="output_mlp",
                             preserve=default_preserve(tok, "red circle", "red triangle", phrased_halves=True))
    assert all(torch.equal(pair["clip"].patches[-1].deltas[k], ref_pair[k]) for k in ref_pair)
    first = _node(model, clip, concept="red circle", anchor="red triangle", target="text_encoder",
                  text_site="first attention")
    ref_first = quickfix_edit(tok, te, "red circle", "red triangle", templates=ptemps, lam=0.5,
                              preserve=default_preserve(tok, "red circle", "red triangle"))
    assert all(torch.equal(first["clip"].patches[-1].deltas[k], ref_first[k]) for k in ref_first)
    # the preserve weight changes the edit
    heavy = _node(model, clip, concept="red", anchor="blue", target="cross_attention", preserve_weight=10.0)
    assert any(not torch.equal(heavy["model"].patches[-1].deltas[k], got_uce[k]) for k in got_uce)


def test_older_files_keep_their_behaviour():
    assert ClosedFormErase.version == 4
    photo = "\n".join(QUICKFIX_TEMPLATES)
    migrated = ClosedFormErase.migrate({"concept": "red", "anchor": "blue"}, 1)
    assert migrated == {"text_site": "first attention", "templates": photo, "concept": "red", "anchor": "blue",
                        "lam": 0.01, "auto_preserve": "off", "preserve_weight": 1.0}
    assert ClosedFormErase.migrate({"concept": "red", "lam": 0.3}, 1)["lam"] == 0.3
    v2 = ClosedFormErase.migrate({"concept": "red", "auto_preserve": "vocabulary", "lam": 0.5}, 2)
    assert v2 == {"text_site": "first attention", "templates": photo, "concept": "red",
                  "auto_preserve": "plain vocabulary", "lam": 0.5}
    kept = ClosedFormErase.migrate({"templates": "a {} thing", "auto_preserve": "off"}, 2)
    assert kept == {"text_site": "first attention", "templates": "a {} thing", "auto_preserve": "off"}
    # version 3 edited the text encoder at its first attention; a file that chose a site keeps it
    assert ClosedFormErase.migrate({"concept": "red"}, 3) == {"text_site": "first attention", "concept": "red"}
    assert ClosedFormErase.migrate({"text_site": "output MLP"}, 3) == {"text_site": "output MLP"}


def test_a_saved_version_1_graph_loads_with_the_old_defaults(tiny_pixel_model, tmp_path):
    from app.graph.fileformat import load, save
    from nodes import registry

    g, ids = eraser_graph(tiny_pixel_model, ("ClosedFormErase", {"concept": "circle", "anchor": "square"}))
    path = tmp_path / "old.loom"
    save(g, path)
    data = json.loads(path.read_text())
    for node in data["nodes"]:
        if node["type"] == "ClosedFormErase":
            node["version"] = 1
    path.write_text(json.dumps(data))
    old = load(path, registry.get)
    params = old.nodes[ids["erasers"][0]].params
    assert params["lam"] == 0.01 and params["auto_preserve"] == "off" and "A photo of {}" in params["templates"]
    # strength 0 with the new defaults is still bit-identical to no eraser
    plain, _, _ = run_captured(*eraser_graph(tiny_pixel_model), tmp_path)
    zero, _, _ = run_captured(*eraser_graph(tiny_pixel_model, ("ClosedFormErase", {
        "concept": "circle", "anchor": "square", "target": "both", "strength": 0.0})), tmp_path)
    assert torch.equal(plain, zero)


def test_an_eraser_run_reports_what_it_preserved(tiny_pixel_model, tmp_path):
    g, ids = eraser_graph(tiny_pixel_model, ("ClosedFormErase", {"concept": "circle", "anchor": "square"}))
    from app.engine import EngineEvents, Executor

    events = []
    ex = Executor(device="cpu", disk_cache=False)
    report = ex.run(g, targets=[ids["capture"]], output_dir=tmp_path,
                    events=EngineEvents(node_state=lambda nid, state, info: events.append((nid, state, info))))
    assert report.ok
    nid = ids["erasers"][0]
    said = report.nodes[nid].summary
    assert "preserved" in said and "(auto); lam 0.5" in said and report.nodes[nid].as_json()["summary"] == said
    assert [info.get("summary") for n, state, info in events if n == nid and state == "done"] == [said]
    assert report.nodes[ids["sampler"]].summary is None  # a node that says nothing reports nothing


def test_a_cached_eraser_result_says_its_summary_again(tiny_pixel_model, tmp_path):
    from app.engine import EngineEvents, Executor

    g, ids = eraser_graph(tiny_pixel_model, ("ClosedFormErase", {"concept": "circle", "anchor": "square"}))
    nid = ids["erasers"][0]

    def run(ex):
        events = []
        report = ex.run(g, targets=[ids["capture"]], output_dir=tmp_path,
                        events=EngineEvents(node_state=lambda n, state, info: events.append((n, state, info))))
        assert report.ok
        return report, [(state, info.get("summary")) for n, state, info in events if n == nid and state not in ("queued", "running")]

    cache = tmp_path / "cache"
    first, said_first = run(Executor(device="cpu", disk_cache=cache))
    said = first.nodes[nid].summary
    assert said and said_first == [("done", said)]
    again = Executor(device="cpu", disk_cache=cache)  # a new session: the trace comes from the disk
    report, states = run(again)
    assert states[0] == ("cached-disk", said) and report.nodes[nid].summary == said
    again.disk = None  # and from the session's own record
    report, states = run(again)
    assert report.nodes[nid].status == "cached-memory" and states == [("cached-memory", said)]
    assert report.nodes[ids["sampler"]].summary is None


def test_example_erase_graphs_are_current_and_valid():
    from pathlib import Path

    from app.graph.fileformat import load
    from app.graph.validate import validate
    from nodes import registry

    files = sorted((Path(__file__).resolve().parents[1] / "resources" / "graphs").glob("erase-*.loom"))
    assert len(files) == 4
    for path in files:
        g = load(path, registry.get)
        assert validate(g, registry.get) == [], path.name
        for node in g.nodes.values():
            if node.type == "ClosedFormErase":
                assert node.version == ClosedFormErase.version, path.name  # rewritten by bench/erasers.py --graphs


def test_compare_example_draws_each_prompt_original_and_erased_on_the_same_seeds(tiny_pixel_model, tmp_path):
    from pathlib import Path

    from app.engine import Executor
    from app.graph import load
    from nodes import registry

    g = load(Path(__file__).resolve().parents[1] / "resources" / "graphs" / "erase-compare.loom", registry.get)
    prompts = sorted(n.params["text"] for n in g.nodes.values() if n.type == "TextEncode")
    assert len(prompts) == 6 and len(set(prompts)) == 3  # each prompt twice: original and erased
    assert sum("circle" not in p for p in set(prompts)) == 2  # two never name the target
    assert len({n.params["seed"] for n in g.nodes.values() if n.type == "Sampler"}) == 1
    for node in g.nodes.values():
        if node.type == "LoadModel":
            node.params["path"] = tiny_pixel_model
        if node.type == "EmptyLatent":
            node.params.update(width=16, height=16)
        if node.type == "Sampler":
            node.params["steps"] = 2
    report = Executor(device="cpu", disk_cache=False).run(g, output_dir=tmp_path)
    assert report.ok, {r.title: r.error for r in report.nodes.values()}
    assert len(report.outputs()) == 6 * 4  # six rows of the four-image batch


def _run_defaults(node, model, clip, **params):
    full = {n: p.default for n, p in node.params.items()}
    full.update(params)
    ctx = _Ctx()
    return node().run(ctx, model, clip, **full), ctx.said


def test_trained_erasers_and_guidance_default_to_the_model_phrasing_and_vocabulary(tiny_bundle):
    from kernels.denoiser import encode_prompts
    from nodes.erasers import ConceptMembrane, EraseFinetune, SafeGuidance

    model, clip = tiny_bundle
    tok = clip.tokenizer
    temps, keep = default_templates(tok, "circle"), default_preserve(tok, "circle")
    out, said = _run_defaults(ConceptMembrane, model, clip, concept="circle", steps=1)
    meta = out["model"].patches[-1].meta
    assert (meta["templates"], meta["preserved"]) == (len(temps), len(keep)) and said.count("(auto)") == 1
    assert f"preserved {len(keep)} anchor prompts" in said
    out, said = _run_defaults(EraseFinetune, model, clip, concept="circle", steps=1, objective="all_but_one",
                              alternative="triangle")
    meta = out["model"].patches[-1].meta
    abo_keep = default_preserve(tok, "circle", "triangle")
    assert meta["templates"] == len(default_templates(tok, "circle", "triangle")) and meta["preserved"] == len(abo_keep)
    # safe guidance steers away from the mean text of the model's phrasing; "{}" is the concept alone
    guided, said = _run_defaults(SafeGuidance, model, clip, concept="circle")
    mean = encode_prompts(tok, clip.text_encoder, [t.replace("{}", "circle") for t in temps]).embeds.mean(0, True)
    assert torch.allclose(guided["model"].patches[-1].concept_embeds, mean) and f"mean of {len(temps)}" in said
    alone, _ = _run_defaults(SafeGuidance, model, clip, concept="circle", templates="{}")
    assert torch.equal(alone["model"].patches[-1].concept_embeds, encode_prompts(tok, clip.text_encoder, ["circle"]).embeds)


def test_older_trained_and_guidance_files_keep_their_behaviour():
    from nodes.erasers import ConceptMembrane, EraseFinetune, SafeGuidance

    assert ConceptMembrane.migrate({"concept": "red"}, 1) == {"templates": "{}", "concept": "red",
                                                                "auto_anchors": "off"}
    assert EraseFinetune.migrate({"concept": "red", "templates": "a {}"}, 1) == {
        "templates": "a {}", "concept": "red", "auto_preserve": "off"}
    v2 = {"mode": "uniform", "threshold": 0.0, "momentum": 0.0, "beta": 0.0}  # and on to version 3
    assert SafeGuidance.migrate({"concept": "red"}, 1) == {"templates": "{}", "scale": 2.0, "warmup": 0.0,
                                                            "concept": "red", **v2}
    assert SafeGuidance.migrate({"concept": "red", "scale": 5.0}, 1)["scale"] == 5.0


def test_erase_finetune_preserve_weight_weighs_the_preserve_loss(tiny_bundle):
    from nodes.erasers import EraseFinetune

    model, clip = tiny_bundle

    def loras(**params):
        out, _ = _run_defaults(EraseFinetune, model, clip, concept="circle", steps=2, lr=0.05, **params)
        return out["model"].patches[-1].loras

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k][1], b[k][1]) for k in a)

    held, heavy = loras(), loras(preserve_weight=4.0)
    assert not same(held, heavy)
    assert same(loras(preserve_weight=0.0), loras(auto_preserve="off"))  # weight 0: nothing held
    assert not same(held, loras(auto_preserve="off"))
