"""The training loss weights: plain min-SNR-5 by default, and an x0-space floor that keeps the
high-noise steps (where a 32x32 pixel model places its objects) in the loss."""

import torch

from kernels.shapes.model import build_scheduler
from kernels.shapes.train import loss_weights, parse_args, resumed_step


def _snr():
    a = build_scheduler().alphas_cumprod.float()
    return a / (1 - a)


def test_default_weights_are_min_snr_5():
    snr = _snr()
    assert parse_args(["--workdir", "x"]).snr_floor == 0.0
    assert torch.allclose(loss_weights(snr), torch.clamp(snr, max=5.0) / (snr + 1))


def test_floor_keeps_high_noise_steps_in_the_loss():
    snr = _snr()
    plain, floored = loss_weights(snr), loss_weights(snr, floor=1.0)
    assert float(plain[950]) < 0.01 and float(floored[950]) > 0.99  # x0 weight 1 at SNR ~0
    assert torch.equal(plain[:300], floored[:300])  # SNR > 1: unchanged
    assert float(floored[700:].sum() / floored.sum()) > 3 * float(plain[700:].sum() / plain.sum())


def test_a_committed_run_resumes_at_its_recorded_step(tmp_path):
    assert resumed_step(tmp_path) == 0  # shipped weights carry no training state
    (tmp_path / "training_state.json").write_text('{"run": "run3", "step": 1158}')
    assert resumed_step(tmp_path) == 1158
    (tmp_path / "training_state.json").write_text("not json")
    assert resumed_step(tmp_path) == 0
