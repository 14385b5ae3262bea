"""DiffuseHigh: the Haar DWT, the x0 <-> model output conversions, the guided step's exact
low-band property on a pixel-space model, and the node."""

from __future__ import annotations

import pytest
import torch
from conftest import QuietContext


def test_haar_dwt_is_orthonormal_and_inverted_exactly():
    from kernels.upscale.diffusehigh import haar_dwt, haar_idwt, with_low_band

    x = torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    bands = haar_dwt(x)
    assert all(b.shape == (2, 3, 4, 3) for b in bands)
    assert torch.allclose(haar_idwt(*bands), x, atol=1e-6)
    energy = sum((b ** 2).sum() for b in bands)
    assert torch.allclose(energy, (x ** 2).sum(), rtol=1e-6)  # orthonormal
    # LL is twice the 2x2 block mean
    assert torch.allclose(bands[0], 2 * torch.nn.functional.avg_pool2d(x, 2), atol=1e-6)
    ll = torch.randn(2, 3, 4, 3)
    edited = with_low_band(x, ll)
    assert torch.allclose(haar_dwt(edited)[0], ll, atol=1e-6)
    for kept, before in zip(haar_dwt(edited)[1:], bands[1:]):
        assert torch.allclose(kept, before, atol=1e-6)
    with pytest.raises(ValueError, match="even"):
        haar_dwt(torch.zeros(1, 1, 5, 4))


@pytest.mark.parametrize("config", [
    {"_class_name": "DDPMScheduler", "prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2"},
    {"_class_name": "DDPMScheduler", "prediction_type": "epsilon"},
    {"_class_name": "DDPMScheduler", "prediction_type": "sample"},
    {"_class_name": "FlowMatchEulerDiscreteScheduler"}])
def test_a_model_output_and_the_x0_it_implies_convert_both_ways(config):
    from kernels.upscale.diffusehigh import PredictionSpace

    space = PredictionSpace.of(config)
    g = torch.Generator().manual_seed(1)
    x, pred = torch.randn(1, 3, 4, 4, generator=g), torch.randn(1, 3, 4, 4, generator=g)
    for t in (torch.tensor(700), torch.tensor(250.5)):
        x0 = space.x0(x, t, pred)
        assert torch.allclose(space.prediction(x, t, x0), pred, atol=1e-5)


def test_the_progression_is_every_whole_multiple_then_the_scale():
    from kernels.upscale.diffusehigh import DiffuseHighError, stage_scales, stage_size

    assert stage_scales(2) == [2.0]
    assert stage_scales(4) == [2.0, 3.0, 4.0]
    assert stage_scales(2.5) == [2.0, 2.5]
    assert stage_scales(1.5) == [1.5]
    with pytest.raises(DiffuseHighError):
        stage_scales(1.0)
    assert stage_size(32, 20, 2.2, 4) == (72, 44)  # each side rounded to the multiple


def _plain_sampler(model, cond, scheduler_name, steps, denoise, seed=3):
    """A sample_fn over kernels.sampling.sample that records the scheduler's own x0 per step."""
    from kernels.sampling import batch_noise, make_scheduler, sample

    seen: list = []

    def sample_fn(z, edit):
        sched = make_scheduler(scheduler_name, model.scheduler_config)
        step = sched.step

        def recording_step(*args, **kwargs):
            out = step(*args, **kwargs)
            seen.append(out.pred_original_sample)
            return out

        sched.step = recording_step
        generator, noise = batch_noise(seed, tuple(z.shape))
        return sample(model.unet, sched, cond.embeds, cond.empty, noise, steps, 4.0, generator,
                      denoise=denoise, init=z, edit_prediction=edit)

    return sample_fn, seen


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_after_each_guided_step_the_low_band_of_x0_is_the_guidance_band(tiny_layout_model, scheduler):
    """The issue's exact test: on a pixel-space model (VAE round trip exact) the scheduler's own
    x0 after every guided step has the sharpened upsample's Haar LL band within 1e-5."""
    from kernels.upscale.diffusehigh import PredictionSpace, diffusehigh, haar_dwt, sharpen

    model, _clip, cond = tiny_layout_model
    steps, denoise = 10, 0.6  # 6 steps run, the first 3 guided
    sample_fn, seen = _plain_sampler(model, cond, scheduler, steps, denoise)
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    identity = lambda x: x  # noqa: E731
    record: list = []
    out = diffusehigh(image, identity, identity, sample_fn, PredictionSpace.of(model.scheduler_config),
                      scale=2, run_steps=6, guidance_end=0.5, record=record)
    assert out.shape == (1, 3, 16, 16)
    up = torch.nn.functional.interpolate(image, size=(16, 16), mode="bicubic", align_corners=False)
    guidance = haar_dwt(sharpen(up))[0]
    assert len(seen) == 6 and len(record) == 3
    for x0 in seen[:3]:
        assert (haar_dwt(x0)[0] - guidance).abs().max() < 1e-5
    for x0 in seen[3:]:  # unguided steps: the model's own x0
        assert (haar_dwt(x0)[0] - guidance).abs().max() > 1e-3


def test_diffusehigh_without_guidance_or_sharpening_is_plain_img2img(tiny_layout_model):
    """guidance_end 0 and sharpness 0: one stage is the bicubic upsample denoised by the plain
    sampler, bit for bit."""
    from kernels.upscale.diffusehigh import PredictionSpace, diffusehigh

    model, _clip, cond = tiny_layout_model
    sample_fn, _ = _plain_sampler(model, cond, "euler", 10, 0.5)
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    identity = lambda x: x  # noqa: E731
    out = diffusehigh(image, identity, identity, sample_fn, PredictionSpace.of(model.scheduler_config),
                      scale=2, run_steps=5, guidance_end=0.0, sharpness=0.0)
    up = torch.nn.functional.interpolate(image, size=(16, 16), mode="bicubic", align_corners=False)
    assert torch.equal(out, sample_fn(up, None))


def _node_inputs(model_path):
    from kernels.models import load_model_folder
    from kernels.text import encode_text

    model, clip, vae = load_model_folder(model_path)
    return model, vae, encode_text(clip.tokenizer, clip.text_encoder, "a red circle")


def test_the_node_upscales_an_image_or_a_latent_and_equals_the_kernel(tiny_pixel_model):
    from nodes.resolution import DiffuseHighUpscale

    model, vae, cond = _node_inputs(tiny_pixel_model)
    image = torch.rand(1, 8, 8, 3, generator=torch.Generator().manual_seed(5))
    params = dict(scale=2.0, scheduler="euler", steps=10, cfg=4.0, seed=1, denoise=0.5,
                  guidance_end=0.4, sharpness=1.0)
    node = DiffuseHighUpscale()
    from_image = node.run(QuietContext(), model=model, positive=cond, negative=None, vae=vae,
                          image=image, latent=None, **params)
    assert from_image["latent"].shape == (1, 3, 16, 16)
    assert from_image["image"].shape == (1, 16, 16, 3)
    from_latent = node.run(QuietContext(), model=model, positive=cond, negative=None, vae=vae,
                           image=None, latent=image.permute(0, 3, 1, 2) * 2 - 1, **params)
    assert torch.allclose(from_latent["latent"], from_image["latent"], atol=1e-5)
    again = node.run(QuietContext(), model=model, positive=cond, negative=None, vae=vae,
                     image=image, latent=None, **params)
    assert torch.equal(again["latent"], from_image["latent"])  # deterministic


def test_the_node_wants_exactly_one_of_image_and_latent(tiny_pixel_model):
    from nodes.base import NodeError
    from nodes.resolution import DiffuseHighUpscale

    model, vae, cond = _node_inputs(tiny_pixel_model)
    params = dict(scale=2.0, scheduler="euler", steps=10, cfg=4.0, seed=1, denoise=0.5,
                  guidance_end=0.4, sharpness=1.0)
    for image, latent in ((None, None), (torch.rand(1, 8, 8, 3), torch.rand(1, 3, 8, 8))):
        with pytest.raises(NodeError, match="exactly one"):
            DiffuseHighUpscale().run(QuietContext(), model=model, positive=cond, negative=None,
                                     vae=vae, image=image, latent=latent, **params)
    with pytest.raises(NodeError, match="runs no step"):
        DiffuseHighUpscale().run(QuietContext(), model=model, positive=cond, negative=None, vae=vae,
                                 image=torch.rand(1, 8, 8, 3), latent=None,
                                 **{**params, "steps": 1, "denoise": 0.5})


def test_the_node_runs_on_a_latent_model(tiny_latent_model):
    from nodes.resolution import DiffuseHighUpscale

    model, vae, cond = _node_inputs(tiny_latent_model)
    out = DiffuseHighUpscale().run(QuietContext(), model=model, positive=cond, negative=None, vae=vae,
                                   image=torch.rand(1, 16, 16, 3), latent=None, scale=2.0,
                                   scheduler="ddim", steps=4, cfg=4.0, seed=1, denoise=0.5,
                                   guidance_end=0.5, sharpness=1.0)
    assert out["image"].shape == (1, 32, 32, 3)
    assert out["latent"].shape[-2:] == (32 // vae.scale_factor,) * 2


def test_node_defaults_are_the_kernels_constants():
    from kernels.upscale import diffusehigh
    from nodes import resolution

    assert resolution.DIFFUSEHIGH_DENOISE == diffusehigh.DEFAULT_DENOISE
    assert resolution.DIFFUSEHIGH_GUIDANCE_END == diffusehigh.DEFAULT_GUIDANCE_END
    assert resolution.DIFFUSEHIGH_SHARPNESS == diffusehigh.DEFAULT_SHARPNESS
