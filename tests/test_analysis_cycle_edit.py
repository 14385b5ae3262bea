"""CycleDiffusion editing (DPM-Encoder) on tiny random models.

Exact checks: regenerating with the source prompt gives the input latent back within 1e-4 (pixel
and latent models, several eta, strength and cfg values, cfg 20 too; within 1e-6 on the pixel model); the encoder's steps are samples of the
forward posterior (the DDIM step at the true x0); eta 0 is deterministic DDIM with residuals;
the code depends on the seed; another prompt changes the image. The ShapesT2I red -> blue edit
rate is measured in bench/speed.py.
"""

import pytest
import torch
from conftest import QuietContext as Ctx

from kernels.editing.cycle_diffusion import CycleEditError, CycleScheduler, decode, encode, true_prediction
from kernels.models import load_model_folder
from kernels.sampling import make_scheduler
from kernels.text import encode_text
from nodes.analysis import CycleEdit, _prompt_sampler
from nodes.base import NodeError


@pytest.fixture(scope="module")
def pixel(tiny_pixel_model):
    model, clip, vae = load_model_folder(tiny_pixel_model)
    enc = lambda p: encode_text(clip.tokenizer, clip.text_encoder, p)  # noqa: E731
    return model, vae, enc("a red circle"), enc("a blue circle")


def runners(model, source, target, steps, cfg, strength):
    return (_prompt_sampler(Ctx(), model, source, None, steps, cfg, strength),
            _prompt_sampler(Ctx(), model, target, None, steps, cfg, strength))


@pytest.mark.parametrize("eta,strength,cfg", [(0.1, 1.0, 3.0), (1.0, 0.6, 1.0), (0.0, 0.8, 5.0), (1.0, 0.4, 20.0)])
def test_source_prompt_reproduces_the_input(pixel, eta, strength, cfg):
    model, _vae, red, blue = pixel
    clean = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ddim = make_scheduler("ddim", model.scheduler_config)
    run_src, run_tgt = runners(model, red, blue, 6, cfg, strength)
    code = encode(run_src, ddim, clean, eta, seed=4)
    assert len(code.residuals) == int(6 * strength)
    again = decode(run_src, ddim, clean, code, eta)
    assert (again - clean).abs().max() < 1e-4
    # the decoder repeats the encoder's steps to the bit, so nothing is left for cfg to amplify
    assert (again - clean).abs().max() < 1e-6
    edited = decode(run_tgt, ddim, clean, code, eta)
    assert (edited - clean).abs().max() > 1e-3  # another prompt: another image


def test_latent_model_round_trip_through_the_node(tiny_latent_model):
    model, clip, vae = load_model_folder(tiny_latent_model)
    red = encode_text(clip.tokenizer, clip.text_encoder, "a red circle")
    image = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(5))
    clean = vae.encode(image.permute(0, 3, 1, 2) * 2 - 1).detach()
    out = CycleEdit().run(Ctx(), model, vae, image, red, red, None, 5, 2.0, 2.0, 0.3, 1.0, 7)
    assert (out["latent"] - clean).abs().max() < 1e-4
    assert out["image"].shape == (1, 16, 16, 3)


def test_encoder_steps_sample_the_forward_posterior(pixel):
    model, *_ = pixel
    ddim = make_scheduler("ddim", model.scheduler_config)
    ddim.set_timesteps(4)
    t, t_prev = int(ddim.timesteps[1]), int(ddim.timesteps[2])
    g = torch.Generator().manual_seed(0)
    clean, x_t = torch.randn(1, 3, 4, 4, generator=g), torch.randn(1, 3, 4, 4, generator=g)
    fresh = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(9))
    sched = CycleScheduler(ddim, 0.5, clean=clean, generator=torch.Generator().manual_seed(9))
    model_out = torch.randn(1, 3, 4, 4, generator=g)
    prev = sched.step(model_out, ddim.timesteps[1], x_t).prev_sample
    # q_sigma(x_prev | x_t, x0) by hand: mean sqrt(a') x0 + sqrt(1 - a' - s^2) eps_true, std s
    a, a_prev = ddim.alphas_cumprod[t], ddim.alphas_cumprod[t_prev]
    eps = (x_t - a.sqrt() * clean) / (1 - a).sqrt()
    s = 0.5 * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    want = a_prev.sqrt() * clean + (1 - a_prev - s ** 2).sqrt() * eps + s * fresh
    assert torch.allclose(prev, want, atol=1e-5)
    mean = ddim.step(model_out, ddim.timesteps[1], x_t, eta=0.5, variance_noise=torch.zeros_like(x_t)).prev_sample
    assert sched.residuals[0].dtype == torch.float64  # exact differences of float32 values
    assert torch.equal(sched.residuals[0], prev.double() - mean.double())
    v = true_prediction(ddim, clean, x_t, t)  # the v that implies x0 = clean
    assert torch.allclose(a.sqrt() * x_t - (1 - a).sqrt() * v, clean, atol=1e-5)


def test_the_code_depends_on_the_seed_and_eta_zero_is_deterministic(pixel):
    model, _vae, red, _blue = pixel
    clean = torch.zeros(1, 3, 16, 16)
    ddim = make_scheduler("ddim", model.scheduler_config)
    run_src, _ = runners(model, red, red, 4, 2.0, 0.75)
    a, b = encode(run_src, ddim, clean, 0.5, seed=1), encode(run_src, ddim, clean, 0.5, seed=2)
    assert not torch.equal(a.residuals[0], b.residuals[0])
    assert all(torch.equal(x, y) for x, y in zip(a.residuals, encode(run_src, ddim, clean, 0.5, seed=1).residuals))
    z1, z2 = encode(run_src, ddim, clean, 0.0, seed=1), encode(run_src, ddim, clean, 0.0, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(z1.residuals[1:], z1.residuals[1:]))
    assert torch.equal(z1.residuals[-1], encode(run_src, ddim, clean, 0.0, seed=1).residuals[-1])
    assert not torch.equal(z1.noise, z2.noise)  # the start noise still follows the seed


def test_bad_settings_are_refused(pixel, tiny_flow_model):
    model, vae, red, blue = pixel
    ddim = make_scheduler("ddim", model.scheduler_config)
    run_src, _ = runners(model, red, blue, 4, 2.0, 1.0)
    with pytest.raises(CycleEditError, match="eta"):
        encode(run_src, ddim, torch.zeros(1, 3, 16, 16), 1.5)
    code = encode(run_src, ddim, torch.zeros(1, 3, 16, 16), 0.2)
    longer, _ = runners(model, red, blue, 8, 2.0, 1.0)
    with pytest.raises(CycleEditError, match="steps"):
        decode(longer, ddim, torch.zeros(1, 3, 16, 16), code, 0.2)
    flow, flow_clip, flow_vae = load_model_folder(tiny_flow_model)
    cond = encode_text(flow_clip.tokenizer, flow_clip.text_encoder, "a red circle")
    with pytest.raises(NodeError, match="CycleEdit needs a DDPM-family"):
        CycleEdit().run(Ctx(), flow, flow_vae, torch.zeros(1, 16, 16, 3), cond, cond, None, 4, 2.0, 2.0, 0.1, 1.0, 0)
