"""The shapes oracle: accuracy on generator images at 64 and 32 px, scoring, the command."""

import json

import numpy as np

from kernels.shapes import oracle
from kernels.shapes.oracle import box_iou, detect, match, score_prompt
from kernels.shapes.world import downsample, render_array, sample_scene


def _oracle_rates(size, n=150, seed=5):
    rng = np.random.default_rng(seed)
    right = total = 0
    ious = []
    for _ in range(n):
        scene = sample_scene(rng)
        img = render_array(scene, 64)
        if size == 32:
            img = downsample(img, 32)
        # with cells, so two objects of the same colour and shape pair up by place
        intended = [{"colour": o.colour, "shape": o.shape, "cell": o.cell} for o in scene.objects]
        for o, d in zip(scene.objects, match(intended, detect(img))):
            total += 1
            if d is not None and d.shape == o.shape:
                right += 1
                ious.append(box_iou(o.box, d.box))
    return right / total, np.array(ious)


def test_oracle_meets_its_bar_at_64px():
    rate, ious = _oracle_rates(64)
    assert rate >= 0.98
    assert ious.mean() >= 0.85 and (ious >= 0.8).mean() >= 0.98


def test_oracle_at_32px():
    # Measured 99.9% colour+shape (one square read as a circle in 1,074 objects), mean IoU
    # 0.92 with 99.7% of boxes at IoU >= 0.8, on 600 scenes; the bar leaves a margin.
    rate, ious = _oracle_rates(32)
    assert rate >= 0.95
    assert ious.mean() >= 0.85


def test_oracle_sees_nothing_in_a_blank_image_and_scores_prompts():
    assert detect(np.full((32, 32, 3), 125, np.uint8)) == []
    rng = np.random.default_rng(3)
    scene = sample_scene(rng, 2)
    img = render_array(scene, 64)
    intended = [{"colour": o.colour, "shape": o.shape, "cell": o.cell} for o in scene.objects]
    assert score_prompt(intended, img) == {"colour": 1.0, "colour_shape": 1.0, "cell": 1.0, "all_right": 1.0}
    wrong = [{"colour": "red" if o.colour != "red" else "blue", "shape": o.shape, "cell": o.cell}
             for o in scene.objects[:1]]
    assert score_prompt(wrong, img)["colour"] == 0.0


def test_noise_is_not_a_scene():
    # A half-trained model's samples: coloured noise over a grey field. Before the region cap the
    # oracle matched prompts against its specks and scored "colour" on most of them.
    rng = np.random.default_rng(0)
    noise = np.clip(128 + rng.normal(0, 35, (32, 32, 3)), 0, 255).astype(np.uint8)
    specks = oracle._components(noise.max(2).astype(int) - noise.min(2) > oracle.CHROMA_MASK)
    assert sum(len(s) >= 2 for s in specks) > oracle.MAX_REGIONS
    assert detect(noise) == []
    assert score_prompt([{"colour": "red", "shape": "circle", "cell": 4}], noise)["colour"] == 0.0
    # ... while the busiest scene the world draws keeps every object.
    scenes = [sample_scene(rng, 3) for _ in range(20)]
    for scene in scenes:
        assert detect(render_array(scene, 32))


def test_oracle_command_prints_json(tmp_path, capsys):
    from PIL import Image

    from app.cli import main

    rng = np.random.default_rng(4)
    scene = sample_scene(rng, 1)
    path = tmp_path / "one.png"
    Image.fromarray(render_array(scene, 64)).save(path)
    assert main(["oracle", str(path)]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    (obj,) = result["objects"]
    assert obj["colour"] == scene.objects[0].colour and obj["shape"] == scene.objects[0].shape
    assert main(["oracle", str(tmp_path / "missing.png")]) == 1
    (missing,) = json.loads(capsys.readouterr().out)
    assert missing["image"] == str(tmp_path / "missing.png") and "error" in missing


def test_oracle_module_main_prints_json(tmp_path, capsys):
    from PIL import Image

    from kernels.shapes.oracle import main

    rng = np.random.default_rng(6)
    scene = sample_scene(rng, 2)
    path = tmp_path / "two.png"
    Image.fromarray(downsample(render_array(scene, 64), 32)).save(path)
    assert main([str(path)]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["size"] == 32
    found = {(o["colour"], o["shape"], o["cell"]) for o in result["objects"]}
    assert found == {(o.colour, o.shape, o.cell) for o in scene.objects}
