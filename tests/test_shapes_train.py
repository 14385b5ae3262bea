"""The training loss weights: plain min-SNR-5 by default, and an x0-space floor that keeps the
high-noise steps (where a 32x32 pixel model places its objects) in the loss."""

from pathlib import Path

import torch

from kernels.shapes.model import build_scheduler, build_text_encoder
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


def _one_step(tmp_path, *flags):
    import numpy as np

    from kernels.shapes.train import SpikeGuard, start_run, train_step

    args = parse_args(["--workdir", str(tmp_path), "--batch", "2", "--warmup", "0", *flags])
    run = start_run(args, tmp_path, lambda event: None)
    before = {k: v.clone() for k, v in run.text_encoder.state_dict().items()}
    unet_before = {k: v.clone() for k, v in run.unet.state_dict().items()}

    class Batch:  # two fixed samples: the step is what is tested, not the world
        def batch(self, rng, size, p_single, p_drop):
            ids = run.tokenizer(["a red circle on the left", "a blue square"], padding="max_length",
                                max_length=run.tokenizer.model_max_length, return_tensors="pt").input_ids
            return torch.rand((size, 3, 32, 32)) * 2 - 1, ids[:size]

    alphas = run.scheduler.alphas_cumprod.float()
    train_step(run, Batch(), np.random.default_rng(0), args, alphas, loss_weights(alphas / (1 - alphas)),
               SpikeGuard(args.spike, args.warmup))
    text_changed = any(not torch.equal(before[k], v) for k, v in run.text_encoder.state_dict().items())
    unet_changed = any(not torch.equal(unet_before[k], v) for k, v in run.unet.state_dict().items())
    return run, text_changed, unet_changed


def test_text_lr_scale_zero_freezes_the_encoder_and_trains_the_unet(tmp_path):
    _, text_changed, unet_changed = _one_step(tmp_path / "frozen", "--text-lr-scale", "0")
    assert not text_changed and unet_changed
    _, text_changed, unet_changed = _one_step(tmp_path / "joint")
    assert text_changed and unet_changed


def test_global_text_unet_pools_the_caption_into_the_time_embedding(tmp_path):
    run, _, _ = _one_step(tmp_path, "--global-text", "--text-lr-scale", "0")
    assert run.unet.config.addition_embed_type == "text" and run.unet.add_embedding is not None


def test_fresh_text_encoder_keeps_the_resumed_unet_and_starts_the_encoder_anew(tmp_path):
    from kernels.models import load_model_folder
    from kernels.shapes.train import start_run

    shipped = str(Path(__file__).resolve().parents[1] / "resources" / "models" / "shapes-t2i")
    mb, cb, _ = load_model_folder(shipped)
    args = parse_args(["--workdir", str(tmp_path), "--resume", shipped, "--fresh-text-encoder", "--text-lr-scale", "0"])
    run = start_run(args, tmp_path, lambda event: None)
    assert all(torch.equal(a, b.float()) for a, b in zip(run.unet.state_dict().values(), mb.unet.state_dict().values()))
    fresh = run.text_encoder.state_dict()
    shipped_te = cb.text_encoder.state_dict()
    assert fresh.keys() == shipped_te.keys()
    assert not any(torch.equal(fresh[k], shipped_te[k].float()) for k in fresh if k.endswith("weight"))
    torch.manual_seed(0)
    again = build_text_encoder(run.tokenizer).state_dict()
    assert all(torch.equal(fresh[k], again[k]) for k in again)  # seeded: a restart builds the same one


def test_resuming_32px_weights_at_64px_folds_them_and_starts_the_schedule_over(tmp_path):
    import numpy as np

    from kernels.shapes.model import pixel_shuffle_of
    from kernels.shapes.train import Data, start_run

    run8 = Path(__file__).resolve().parents[1] / "resources" / "training" / "shapes-t2i-run8"
    args = parse_args(["--workdir", str(tmp_path), "--resume", str(run8), "--image-size", "64"])
    run = start_run(args, tmp_path, lambda event: None)
    assert resumed_step(run8) > 0 and run.step == 0  # a new model: warm-up and decay from the start
    assert pixel_shuffle_of(run.unet) == pixel_shuffle_of(run.ema_unet) == 2
    data = Data(tmp_path, run.tokenizer, 4, 4, set(), image_size=64)
    assert data.mixed.shape == (4, 64, 64, 3)
    images, ids = data.batch(np.random.default_rng(0), 3, 0.5, 0.0)
    assert images.shape == (3, 12, 32, 32) and ids.shape[0] == 3


def test_the_committed_64px_run_resumes_folded_at_its_step(tmp_path):
    from kernels.shapes.model import pixel_shuffle_of
    from kernels.shapes.train import start_run

    run9 = Path(__file__).resolve().parents[1] / "resources" / "training" / "shapes-t2i-64-run9"
    args = parse_args(["--workdir", str(tmp_path), "--resume", str(run9), "--image-size", "64"])
    run = start_run(args, tmp_path, lambda event: None)
    assert pixel_shuffle_of(run.unet) == 2 and run.unet.config.in_channels == 12  # not folded twice
    assert run.step == resumed_step(run9) == 2898
