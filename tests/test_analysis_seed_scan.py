"""Seed scan on the tiny pixel model and on world renders.

Exact checks: each seed's image is the Sampler's with that seed; the ranking is a pure function
of the scores (ties by seed) and the same on a second run; the contact sheet holds the images
best first at their grid cells; the oracle metric is 1 on a world render with its own caption
and lower with another colour; the image statistics match hand computations.
"""

import numpy as np
import pytest
import torch
from conftest import QuietContext as Ctx

from kernels.analysis.seed_scan import (
    SHEET_GAP,
    SeedScanError,
    contact_sheet,
    intended_objects,
    oracle_score,
    ranked,
    scorer,
    statistic,
)
from kernels.images import model_to_image
from kernels.models import load_model_folder
from kernels.text import encode_text
from nodes.analysis import SeedScan
from nodes.base import NodeError
from nodes.core import Sampler


def test_ranking_is_by_score_then_seed():
    assert ranked({5: 0.5, 3: 0.9, 7: 0.5, 1: 0.1}) == [3, 5, 7, 1]


def test_contact_sheet_places_images_row_by_row():
    ims = [torch.full((4, 3, 3), float(k) / 10) for k in range(5)]
    sheet = contact_sheet(ims)[0]  # 3 columns, 2 rows
    assert sheet.shape == (2 * 4 + SHEET_GAP, 3 * 3 + 2 * SHEET_GAP, 3)
    for k in range(5):
        r, q = divmod(k, 3)
        y, x = r * (4 + SHEET_GAP), q * (3 + SHEET_GAP)
        assert torch.equal(sheet[y:y + 4, x:x + 3], ims[k])
    assert float(sheet[4:4 + SHEET_GAP].abs().sum()) == 0
    with pytest.raises(SeedScanError, match="one size"):
        contact_sheet([torch.zeros(4, 4, 3), torch.zeros(2, 2, 3)])


def test_oracle_metric_on_a_world_render():
    from kernels.shapes import world

    scene = world.sample_scene(np.random.default_rng(4), 1)
    text = world.caption_for(scene, with_position=True, with_background=True)
    o = scene.objects[0]
    assert intended_objects(text) == [{"colour": o.colour, "shape": o.shape, "cell": o.cell}]
    image = torch.from_numpy(world.render_array(scene, 32)).float() / 255
    assert oracle_score(text, image) == 1.0
    other = "green" if o.colour != "green" else "red"
    assert oracle_score(text.replace(o.colour, other), image) == 0.0  # no object of that colour: nothing right
    with pytest.raises(SeedScanError, match="oracle metric needs"):
        scorer("oracle", "a photo of a cat")


def test_image_statistics():
    img = torch.zeros(4, 4, 3)
    img[:2, :, 0] = 1.0  # top half red
    lum = torch.zeros(4, 4)
    lum[:2] = 0.299
    assert statistic("contrast", img) == pytest.approx(float(lum.std(unbiased=False)))
    assert statistic("colourfulness", img) == pytest.approx(0.5)
    assert statistic("sharpness", torch.zeros(5, 5, 3)) == 0.0
    with pytest.raises(SeedScanError, match="unknown metric"):
        statistic("beauty", img)


def test_node_ranks_the_samplers_own_images(tiny_pixel_model):
    model, clip, vae = load_model_folder(tiny_pixel_model)
    cond = encode_text(clip.tokenizer, clip.text_encoder, "a red circle")
    latent = torch.zeros(1, 3, 16, 16)
    node = SeedScan()
    out = node.run(Ctx(), model, vae, cond, None, latent, "euler", 2, 4.0, 10, 4, "contrast")
    table = out["table"]
    assert sorted(table.column("seed")) == [10, 11, 12, 13] and table.column("rank") == [1, 2, 3, 4]
    scores = table.column("score")
    assert scores == sorted(scores, reverse=True)
    best = table.rows[0][1]
    want = model_to_image(Sampler().run(Ctx(), model, cond, None, latent, "euler", 2, 4.0, best, 1.0)["latent"])
    assert torch.equal(out["best"], want)
    assert torch.equal(out["sheet"][0, :16, :16], want[0])
    assert statistic("contrast", want[0]) == pytest.approx(scores[0], abs=1e-6)
    again = node.run(Ctx(), model, vae, cond, None, latent, "euler", 2, 4.0, 10, 4, "contrast")
    assert again["table"] == table and torch.equal(again["sheet"], out["sheet"])
    with pytest.raises(NodeError, match="SeedScan: the oracle metric"):
        node.run(Ctx(), model, vae, encode_text(clip.tokenizer, clip.text_encoder, "circle"), None, latent,
                 "euler", 2, 4.0, 0, 2, "oracle")
