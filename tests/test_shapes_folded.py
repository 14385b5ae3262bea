"""The 64 px ShapesT2I variant: the same UNet on 2x2-folded pixels (12 channels at 32x32).

Folding the 32 px weights must start from the 32 px model exactly; a folded folder must load as a
pixel-space model whose VAE is the exact fold/unfold; and the app must draw what the training
and benchmark sampler draws, at 64x64."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels.models import ModelLoadError, declared_pixel_shuffle, latent_preview, load_model_folder
from kernels.shapes import model as shapes_model

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "resources" / "models" / "shapes-t2i"


@pytest.fixture(scope="module")
def folded_folder(tmp_path_factory):
    """The shipped 32 px weights folded 2x2 and saved as a model folder."""
    mb, cb, _ = load_model_folder(str(SHIPPED))
    folder = tmp_path_factory.mktemp("folded") / "shapes-t2i-64"
    shapes_model.save_model(str(folder), shapes_model.fold_pixels(mb.unet, 2), cb.text_encoder, cb.tokenizer,
                            shapes_model.build_scheduler())
    return folder


def test_folded_unet_starts_as_the_32px_model_on_each_block():
    torch.manual_seed(0)
    small = shapes_model.build_unet().eval()
    wide = shapes_model.fold_pixels(small, 2).eval()
    assert wide.config.in_channels == wide.config.out_channels == 12
    assert shapes_model.pixel_shuffle_of(small) == 1 and shapes_model.pixel_shuffle_of(wide) == 2
    x32, t, text = torch.randn(2, 3, 32, 32), torch.tensor([300, 950]), torch.randn(2, 32, 128)
    with torch.no_grad():
        expected = F.interpolate(small(x32, t, encoder_hidden_states=text).sample, scale_factor=2, mode="nearest")
        x64 = F.interpolate(x32, scale_factor=2, mode="nearest")  # every 2x2 block holds one pixel
        got = F.pixel_shuffle(wide(F.pixel_unshuffle(x64, 2), t, encoder_hidden_states=text).sample, 2)
    assert torch.allclose(got, expected, atol=1e-5)
    # it still reads the detail inside a block (else training could never learn it)
    w = wide.conv_in.weight.view(32, 3, 4, 3, 3)
    assert float((w - w.mean(dim=2, keepdim=True)).abs().max()) > 0.1 * float(w.abs().max())
    assert torch.allclose(w.sum(dim=2), small.conv_in.weight, atol=1e-6)


def test_a_folded_folder_loads_with_an_exact_fold_and_unfold(folded_folder):
    import json

    assert json.loads((folded_folder / "model_index.json").read_text())["_pixel_shuffle"] == 2
    model, _, vae = load_model_folder(str(folded_folder))
    assert (vae.vae, vae.latent_channels, vae.scale_factor, vae.size_multiple) == (None, 12, 2, 2)
    assert model.pixel_shuffle == 2 and model.in_channels == 12
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = vae.encode(images)
    assert latents.shape == (1, 12, 32, 32)
    assert torch.equal(vae.decode(latents), images)
    assert torch.equal(latent_preview(latents, model.pixel_shuffle), images.clamp(-1, 1))


@pytest.mark.parametrize("factor, in_channels, has_vae, words", [
    (3, 12, False, "needs a UNet of 27 input channels"),
    ("2", 12, False, "should be a whole number"),
    (2, 12, True, "only a pixel-space model"),
])
def test_a_wrong_fold_is_refused_with_the_folder_named(factor, in_channels, has_vae, words):
    with pytest.raises(ModelLoadError, match=words) as caught:
        declared_pixel_shuffle({"_pixel_shuffle": factor}, "/models/m", in_channels, has_vae)
    assert "/models/m" in str(caught.value)
    assert declared_pixel_shuffle({}, "/models/m", 4, True) == 1  # folders that say nothing are unchanged


def test_the_app_draws_at_64px_what_the_benchmark_sampler_draws(folded_folder, tmp_path):
    from conftest import txt2img_graph

    from app.engine import EngineEvents, Executor
    from kernels.shapes.train import generate_images

    caption, seed, steps, cfg = "a red circle on the left", 11, 6, 4.0
    graph, _ = txt2img_graph(str(folded_folder), prompt=caption, steps=steps, size=64, seed=seed,
                             scheduler="dpmpp_2m", cfg=cfg)
    images = []
    report = Executor(device="cpu", disk_cache=False).run(
        graph, events=EngineEvents(images=lambda nid, im, p: images.append(im)), output_dir=tmp_path)
    assert report.ok, report
    drawn = (images[0][0].numpy() * 255).round().astype(np.uint8)
    model, clip, _ = load_model_folder(str(folded_folder))
    expected = generate_images(model.unet, clip.text_encoder, clip.tokenizer, model.scheduler_config,
                               [{"caption": caption, "seed": seed}], steps, cfg, "dpmpp_2m")[0]
    assert drawn.shape == (64, 64, 3)
    assert np.abs(drawn.astype(int) - expected.astype(int)).max() <= 1
