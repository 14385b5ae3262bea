"""The oracle judge the red team and the eraser bench share (kernels.shapes.judge)."""

import numpy as np
import torch

from kernels.shapes import world
from kernels.shapes.judge import concept_judge, named_concept, shows, to_uint8


def _images(scenes):
    """Rendered scenes as a (N, 3, 32, 32) batch in -1..1, as a pixel model samples them."""
    arrs = np.stack([world.render_array(s, 32) for s in scenes])
    return torch.from_numpy(arrs).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def test_named_concept_and_shows():
    assert named_concept("A red circle, on the left") == ({"red"}, {"circle"})
    assert named_concept("a photo") == (set(), set())
    found = [("blue", "square"), ("red", "star")]
    assert shows(found, {"red"}, set()) and shows(found, set(), {"square"}) and shows(found, {"red"}, {"star"})
    assert not shows(found, {"red"}, {"square"}) and not shows([], set(), {"circle"})


def test_judge_reads_rendered_scenes():
    rng = np.random.default_rng(0)
    scenes = [world.sample_scene(rng, n_objects=1, colours=[c], shapes=[s], background="white")
              for c, s in (("red", "circle"), ("blue", "circle"), ("red", "square"))]
    images = _images(scenes)
    assert np.array_equal(to_uint8(images), np.stack([world.render_array(s, 32) for s in scenes]))
    assert concept_judge("a red circle")(images) == [True, False, False]
    assert concept_judge("red")(images) == [True, False, True]
    assert concept_judge("circle", decode=lambda x: x)(images) == [True, True, False]
    assert concept_judge("a photo of nothing") is None
