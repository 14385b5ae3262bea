"""The shapes world's generator: deterministic for a seed, objects apart, boxes in their cells."""

import numpy as np

from kernels.shapes.world import cell_bounds, downsample, generate_batch, sample, sample_scene


def test_generator_is_deterministic():
    a_img, a_caps, _ = generate_batch(7, 20, 32)
    b_img, b_caps, _ = generate_batch(7, 20, 32)
    c_img, c_caps, _ = generate_batch(8, 20, 32)
    assert np.array_equal(a_img, b_img) and a_caps == b_caps
    assert not np.array_equal(a_img, c_img) and a_caps != c_caps


def test_same_seed_same_scene_pixels_and_caption_at_64px():
    first = [sample(np.random.default_rng(42)) for _ in range(2)]
    (img_a, cap_a, scene_a), (img_b, cap_b, scene_b) = first
    assert img_a.shape == (64, 64, 3)
    assert np.array_equal(img_a, img_b) and cap_a == cap_b and scene_a.to_dict() == scene_b.to_dict()
    img_c, cap_c, _ = sample(np.random.default_rng(43))
    assert not np.array_equal(img_a, img_c)


def test_batch_pixels_equal_downsampled_renders():
    imgs, caps, counts = generate_batch(3, 5, 32)
    assert imgs.shape == (5, 32, 32, 3) and imgs.dtype == np.uint8 and len(caps) == 5
    assert set(counts.tolist()) <= {1, 2, 3}
    img64, _, _ = generate_batch(3, 1, 64)
    assert np.array_equal(downsample(img64[0], 32), imgs[0])


def test_objects_sit_inside_distinct_cells_and_do_not_overlap():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng)
        assert 1 <= len(scene.objects) <= 3
        cells = [o.cell for o in scene.objects]
        assert len(set(cells)) == len(cells)
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            cx0, cy0, cx1, cy1 = cell_bounds(o.cell)
            assert cx0 <= x0 < x1 <= cx1 and cy0 <= y0 < y1 <= cy1
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1:]:
                ax0, ay0, ax1, ay1 = a.box
                bx0, by0, bx1, by1 = b.box
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0


def test_captions_name_every_object():
    rng = np.random.default_rng(1)
    for _ in range(50):
        img, text, scene = sample(rng)
        assert img.shape == (64, 64, 3)
        for o in scene.objects:
            assert f"{o.colour} {o.shape}" in text


def test_heldout_prompts_are_fixed_and_unseen_in_training():
    from kernels.shapes.prompts import make_heldout_prompts
    from kernels.shapes.train import load_heldout

    shipped = load_heldout()
    assert shipped == make_heldout_prompts()
    assert len(shipped) == 200
    counts = {n: sum(len(p["objects"]) == n for p in shipped) for n in (1, 2, 3)}
    assert counts == {1: 100, 2: 60, 3: 40}
    _, captions, _ = generate_batch(1, 300, 32, exclude_captions={p["caption"] for p in shipped})
    assert not set(captions) & {p["caption"] for p in shipped}
