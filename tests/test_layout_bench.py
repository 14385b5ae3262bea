"""bench/layout.py: its layouts are deterministic and scoreable, and it runs end to end."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_layout", ROOT / "bench" / "layout.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_layouts_are_deterministic_and_the_detector_scores_the_true_scenes():
    from kernels.shapes import world

    bench = load_bench()
    a, b = bench.make_layouts(6), bench.make_layouts(6)
    assert [x[0] for x in a] == [x[0] for x in b] and [x[2] for x in a] == [x[2] for x in b]
    for prompt, _positioned, layout, _scene in a:
        assert 1 <= len(layout["boxes"]) <= 3
        assert not any(p in prompt for p in world.CELL_PHRASES)  # only the layout says where
        for box in layout["boxes"]:
            assert box["phrase"] in prompt
    _, detect = bench.oracle_detector()
    hits = [h for _, _, lay, sc in a
            for h in bench.box_hits(detect(world.downsample(world.render_array(sc, 64), 32)), lay, sc)]
    assert sum(hits) >= len(hits) - 1


def test_bench_runs_on_a_tiny_model(tiny_pixel_model, capsys, tmp_path):
    from kernels.tiny import build_tiny_model

    bench = load_bench()
    model = build_tiny_model(str(tmp_path / "tiny32"), sample_size=32)
    assert bench.main(["--model", model, "--n", "1", "--steps", "2",
                       "--methods", "baseline,baseline_positions,region_attention,zestguide,"
                                    "region_attention_early_with_positions"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["methods"]) == {"baseline", "baseline_positions", "region_attention", "zestguide",
                                      "region_attention_early_with_positions"}
    assert "best_minus_baseline_points" in report["summary"]
    assert "best_minus_baseline_positions_points" in report["summary"]
