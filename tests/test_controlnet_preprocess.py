"""The control images that need no model (kernels/adapters/preprocess.py): Canny edges on shapes
whose edges are known, a depth map's stretch and normals on a ramp, and layout scribbles."""

import pytest
import torch

from kernels.adapters.preprocess import canny, layout_scribble, normalised_depth, normals_from_depth


def square_image(size=16, lo=4, hi=12, value=1.0):
    img = torch.zeros(1, size, size, 3)
    img[:, lo:hi, lo:hi] = value
    return img


# -- the control images ---------------------------------------------------------------------------
def test_canny_on_a_square_gives_edges_exactly_on_its_border():
    edges = canny(square_image(size=16, lo=4, hi=12))
    expected = torch.zeros(16, 16)
    expected[4:12, 4:12] = 1.0
    expected[5:11, 5:11] = 0.0
    assert edges.shape == (1, 16, 16, 3)
    assert torch.equal(edges[0, ..., 0], expected) and torch.equal(edges[..., 0], edges[..., 2])
    # a step of 0.2 (51 grey levels) has an L1 Sobel magnitude of 204 along a side: above 200
    assert torch.equal(canny(square_image(value=0.2))[0, ..., 0], expected)
    # at 0.19 the sides' 194 starts no edge; the corners' 291 do, and continue through sides above low
    corners = torch.zeros(16, 16)
    corners[[4, 4, 11, 11], [4, 11, 4, 11]] = 1.0
    assert torch.equal(canny(square_image(value=0.19), low=195, high=200)[0, ..., 0], corners)
    assert torch.equal(canny(square_image(value=0.19), low=100, high=200)[0, ..., 0], expected)
    assert canny(square_image(value=0.19), low=195, high=300).sum() == 0


def test_canny_hysteresis_continues_a_strong_edge_through_weak_pixels():
    img = torch.zeros(1, 16, 16, 3)
    img[:, 4:12, 4:8] = 1.0    # left half: a strong step
    img[:, 4:12, 8:12] = 0.1  # right half: 25.5 levels, magnitude 102 along its sides, 153 at its corners
    strong_only = canny(img, low=200, high=200)[0, ..., 0]
    joined = canny(img, low=100, high=200)[0, ..., 0]
    assert strong_only[4, 9:12].sum() == 0 and joined[4, 9:12].sum() == 3
    lone = torch.zeros(1, 16, 16, 3)
    lone[:, 4:12, 8:12] = 0.1  # the weak square alone starts no edge
    assert canny(lone, low=100, high=200).sum() == 0


def test_depth_is_stretched_to_0_1_and_a_ramp_gives_one_tilted_normal():
    ramp = torch.linspace(0.2, 0.6, 8).expand(1, 8, 8)[..., None].expand(1, 8, 8, 3)
    depth = normalised_depth(ramp)
    assert torch.allclose(depth[0, 0], torch.linspace(0, 1, 8), atol=1e-6)
    assert torch.allclose(normalised_depth(ramp, invert=True), 1 - depth, atol=1e-6)
    assert torch.equal(normalised_depth(torch.full((1, 4, 4, 3), 0.3)), torch.zeros(1, 4, 4))
    normal = normals_from_depth(depth, strength=2.0)
    slope = 2.0 * (1 / 7) * 8  # dz per pixel times pixels per image width
    n = torch.tensor([-slope, 0.0, 1.0]) / (slope ** 2 + 1) ** 0.5
    assert torch.allclose(normal[0], ((n + 1) / 2).expand(8, 8, 3), atol=1e-6)  # facing left, toward the viewer
    flat = normals_from_depth(torch.zeros(1, 4, 4))
    assert torch.equal(flat, torch.tensor([0.5, 0.5, 1.0]).expand(1, 4, 4, 3))


def test_layout_scribble_draws_the_boxes_outlines_or_fills_them():
    from kernels.layout.boxes import box_mask

    box = {"x0": 0.25, "y0": 0.25, "x1": 0.75, "y1": 0.75, "phrase": "a red circle"}
    edge = {"x0": 0.0, "y0": 0.0, "x1": 1.0, "y1": 0.5, "phrase": "a blue square"}
    outline = layout_scribble({"boxes": [box]}, 16, 16, line_width=1)[0, ..., 0]
    expected = torch.zeros(16, 16)
    expected[4:12, 4:12] = 1.0
    expected[5:11, 5:11] = 0.0
    assert torch.equal(outline, expected)
    filled = layout_scribble({"boxes": [box, edge]}, 16, 16, filled=True)[0, ..., 0]
    assert torch.equal(filled, torch.maximum(box_mask(box, 16, 16), box_mask(edge, 16, 16)))
    at_border = layout_scribble({"boxes": [edge]}, 8, 8, line_width=1)[0, ..., 0]
    assert at_border[0].sum() == 8 and at_border[3].sum() == 8 and at_border[1:3, 1:7].sum() == 0
    thick = layout_scribble({"boxes": [box]}, 16, 16, line_width=2)[0, ..., 0]
    assert thick[4:12, 4:12].sum() == 64 - 16 and thick[6:10, 6:10].sum() == 0
    assert layout_scribble({"boxes": []}, 8, 8).sum() == 0


def test_the_nodes_return_what_the_kernels_make():
    from nodes.base import NodeError
    from nodes.controlnet import CannyEdges, DepthFromImage, LayoutScribble

    image = square_image(value=0.5)
    assert torch.equal(CannyEdges().run(None, image, 50, 100)["image"], canny(image, 50.0, 100.0))
    with pytest.raises(NodeError, match="low .* must not exceed high"):
        CannyEdges().run(None, image, 200, 100)
    out = DepthFromImage().run(None, image, True, 2.0)
    depth = normalised_depth(image, invert=True)
    assert torch.equal(out["depth"], depth[..., None].expand(1, 16, 16, 3))
    assert torch.equal(out["normal"], normals_from_depth(depth, 2.0))
    layout = {"boxes": [{"x0": 0.1, "y0": 0.2, "x1": 0.6, "y1": 0.9, "phrase": "a cat"}]}
    scribble = LayoutScribble().run(None, layout, 32, 24, False, 2)["image"]
    assert scribble.shape == (1, 24, 32, 3)
    assert torch.equal(scribble, layout_scribble(layout, 32, 24, filled=False, line_width=2))
