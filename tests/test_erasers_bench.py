"""bench/erasers.py stays runnable: a smoke run on a tiny random model (numbers are meaningless)."""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import erasers as bench  # noqa: E402


def test_bench_smoke_run_writes_the_table_fields(tiny_pixel_model, tmp_path, capsys):
    out = tmp_path / "erasers.json"
    rc = bench.main(["--model", tiny_pixel_model, "--n", "1", "--steps", "2",
                     "--erasers", "quickfix,safe_guidance,prune,uce@defaults,prune@defaults,safe_guidance@defaults",
                     "--attack-on", "defaults", "--attack-n", "1", "--base-cache", str(tmp_path / "base.json"),
                     "--targets", "red circle", "--attack-steps", "1", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["prompts"] == 24 and len(data["results"]) == 6
    assert data["evaluation"]["prompts"] == 24 and data["tuning"]["prompts"] == 24
    assert data["results"][2]["eraser"] == "prune" and data["results"][2]["pruned"] > 0
    row = data["results"][0]
    for key in ("target_before", "target_after", "others", "min_other_ratio", "seconds", "meets_goal", "tuning"):
        assert key in row
    # the red team attacks the erasers at their node defaults only (--attack-on defaults)
    assert [("attack" in r) for r in data["results"]] == [False, False, False, True, True, True]
    assert data["results"][3]["settings"] == "node defaults" and data["results"][3]["preserved"] > 0
    assert set(row["others"]) >= {"red", "circle", "blue", "square"}  # a pair keeps both halves elsewhere
    assert "tgt after" in capsys.readouterr().err  # the table


def test_bench_judges_with_the_oracle():
    from kernels.shapes import world

    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(40):
        scene = world.sample_scene(rng, n_objects=1)
        found = bench.detect_pairs(world.downsample(world.render_array(scene, 64), 32))
        obj = scene.objects[0]
        hits += found == [(obj.colour, obj.shape)]
    assert hits >= 38


def test_evaluation_prompts_are_held_out_from_tuning_and_preserve_sets(tiny_bundle):
    from kernels.erasers import default_preserve, default_templates

    evaluation = bench.heldout_eval_prompts(1)
    assert len(evaluation) == 24 and len({(c, s) for c, s, _ in evaluation}) == 24
    captions = {p for _, _, p in evaluation}
    tuning = {p for _, _, p in [(c, s, bench.prompt_for(c, s)) for c in bench.COLOURS for s in bench.SHAPES]}
    assert not captions & tuning
    tok = tiny_bundle[1].tokenizer
    for target in ("red", "circle", "red circle"):
        anchor = bench.default_anchor(target)
        for phrased in (True, False):
            assert not captions & set(default_preserve(tok, target, anchor, phrased=phrased))
        for templates in (bench.world_templates(target), default_templates(tok, target, anchor)):
            assert not captions & {t.replace("{}", word) for t in templates for word in (target, anchor)}
