"""Train ShapesT2I on the synthetic world, on a CPU, resumably.

    python -m kernels.shapes.train --workdir DIR [--resume MODEL_DIR] [--minutes N]

Joint training of the text encoder and the pixel-space UNet: v-prediction on a cosine schedule,
min-SNR-5 loss weights (--snr-floor adds an x0-weight floor that keeps the high-noise steps,
where objects are placed, in the loss: bench/results/positions.md), EMA weights for sampling,
10% caption dropout (for classifier-free guidance), AdamW with warm-up, and a curriculum that
shows more one-object scenes early.
Every few minutes it writes DIR/state.pt (resume point) and DIR/latest/ (EMA weights in the
diffusers layout); every eval interval it samples held-out prompts, scores them with the oracle
and keeps DIR/best/ (by one- and multi-object colour+shape). Logs go to DIR/log.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from kernels.files import atomic_write
from kernels.shapes import model as shapes_model
from kernels.shapes.world import generate_batch

HELDOUT_PATH = Path(__file__).resolve().parents[2] / "resources" / "shapes" / "heldout_prompts.json"


def load_heldout() -> list[dict]:
    return json.loads(HELDOUT_PATH.read_text())["prompts"]


class Data:
    """Pre-generated samples (32 px, or 64 px folded 2x2 for the 64 px variant): a natural mix and
    a one-object pool for the curriculum."""

    def __init__(self, workdir: Path, tokenizer, n_mixed: int, n_single: int, exclude: set[str],
                 image_size: int = 32):
        self.fold = image_size // shapes_model.IMAGE_SIZE
        cache = workdir / (f"data_{n_mixed}_{n_single}.npz" if self.fold == 1
                           else f"data_{n_mixed}_{n_single}_{image_size}px.npz")
        if cache.exists():
            z = np.load(cache, allow_pickle=False)
            self.mixed, self.single = z["mixed"], z["single"]
            self.mixed_caps, self.single_caps = list(z["mixed_caps"]), list(z["single_caps"])
        else:
            self.mixed, self.mixed_caps, _ = generate_batch(1, n_mixed, image_size, exclude_captions=exclude)
            self.single, self.single_caps, _ = generate_batch(2, n_single, image_size, one_object_fraction=1.0,
                                                              exclude_captions=exclude)
            np.savez(cache, mixed=self.mixed, single=self.single, mixed_caps=np.array(self.mixed_caps),
                     single_caps=np.array(self.single_caps))
        self.mixed_ids = self._ids(tokenizer, self.mixed_caps)
        self.single_ids = self._ids(tokenizer, self.single_caps)
        self.empty_ids = self._ids(tokenizer, [""])[0]

    @staticmethod
    def _ids(tokenizer, captions):
        return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids

    def batch(self, rng: np.random.Generator, size: int, p_single: float, p_drop: float):
        from_single = rng.random(size) < p_single
        x = np.empty((size,) + self.mixed.shape[1:], np.uint8)
        ids = torch.empty((size, self.mixed_ids.shape[1]), dtype=torch.long)
        for k in range(size):
            pool, pool_ids = (self.single, self.single_ids) if from_single[k] else (self.mixed, self.mixed_ids)
            j = int(rng.integers(len(pool)))
            x[k], ids[k] = pool[j], pool_ids[j]
        drop = rng.random(size) < p_drop
        ids[torch.from_numpy(drop)] = self.empty_ids
        images = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return F.pixel_unshuffle(images, self.fold), ids  # factor 1: the images as they are


@torch.no_grad()
def generate_images(unet, text_encoder, tokenizer, scheduler_config: dict, prompts: list[dict],
                    steps: int = 20, cfg: float = 4.0, scheduler: str = "dpmpp_2m") -> np.ndarray:
    """One uint8 HxWx3 image per prompt, each from its own seed, text encoded as the app does
    (padded to max length, no mask, "" as the unconditional prompt)."""
    from kernels.images import model_to_image
    from kernels.sampling import make_scheduler, sample, seed_noise

    ids = tokenizer([p["caption"] for p in prompts] + [""], padding="max_length",
                    max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    hidden = text_encoder(ids).last_hidden_state
    cond, empty = hidden[:-1], hidden[-1:].expand(len(prompts), -1, -1)
    noise = seed_noise(unet, [p["seed"] for p in prompts])
    x = sample(unet, make_scheduler(scheduler, scheduler_config), cond, empty, noise, steps, cfg,
               torch.Generator().manual_seed(0))
    x = F.pixel_shuffle(x, shapes_model.pixel_shuffle_of(unet))  # factor 1: unchanged
    return (model_to_image(x).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def evaluate(unet, text_encoder, tokenizer, scheduler_config: dict, prompts: list[dict],
             steps: int = 20, cfg: float = 4.0) -> dict:
    """Sample each prompt once (its own seed) and score with the oracle."""
    from kernels.shapes.oracle import score_prompt

    unet.eval(), text_encoder.eval()
    images = generate_images(unet, text_encoder, tokenizer, scheduler_config, prompts, steps, cfg)
    scores = [score_prompt(p["objects"], img) for p, img in zip(prompts, images)]

    def rate(key, subset):
        vals = [s[key] for s, p in zip(scores, prompts) if subset(p)]
        return round(float(np.mean(vals)), 4) if vals else None

    single = lambda p: len(p["objects"]) == 1  # noqa: E731
    return {"single_colour": rate("colour", single), "single_colour_shape": rate("colour_shape", single),
            "single_cell": rate("cell", single),
            "all_colour": rate("colour", lambda p: True), "all_colour_shape": rate("colour_shape", lambda p: True),
            "all_cell": rate("cell", lambda p: True),
            "two_object_both_right": rate("all_right", lambda p: len(p["objects"]) == 2),
            "n": len(prompts)}, images


def training_curve(log_path) -> list[dict]:
    """The eval records of a training log (log.jsonl), without their event and time fields."""
    curve = []
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a killed run
            if record.get("event") == "eval":
                curve.append({k: v for k, v in record.items() if k not in ("event", "time")})
    return curve


def eval_subset(prompts: list[dict], n_single=24, n_two=16, n_three=8) -> list[dict]:
    by = {1: [], 2: [], 3: []}
    for p in prompts:
        by[len(p["objects"])].append(p)
    return by[1][:n_single] + by[2][:n_two] + by[3][:n_three]


def lr_at(step: int, base: float, warmup: int, decay_steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of `base` over `decay_steps`.

    A constant 1e-3 diverged at step ~3000 in the first run (loss 0.004 -> 0.22, samples
    collapsed to noise), which is why the rate now decays.
    """
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(decay_steps, 1))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--resume", help="start from a model folder (e.g. the shipped weights)")
    parser.add_argument("--minutes", type=float, default=1e9)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--decay-steps", type=int, default=20000)
    parser.add_argument("--spike", type=float, default=3.0,
                        help="skip an update whose loss exceeds this multiple of the running mean")
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--n-mixed", type=int, default=80000)
    parser.add_argument("--n-single", type=int, default=30000)
    parser.add_argument("--save-minutes", type=float, default=4.0)
    parser.add_argument("--eval-minutes", type=float, default=15.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--snr-floor", type=float, default=0.0,
                        help="lower clamp of the x0-space loss weight (min-SNR-5's is SNR itself, which "
                             "starves the high-noise steps that place objects); 0 keeps plain min-SNR-5")
    parser.add_argument("--t-min", type=int, default=0,
                        help="train only on timesteps >= this (a probe of the high-noise, layout-setting steps)")
    parser.add_argument("--p-single", type=float, default=None,
                        help="fixed share of one-object scenes per batch instead of the curriculum")
    parser.add_argument("--image-size", type=int, default=32, choices=(32, 64),
                        help="64: the 64 px variant (the UNet on 2x2-folded pixels); resuming 32 px "
                             "weights folds them (shapes_model.fold_pixels) and starts the schedule over")
    parser.add_argument("--text-lr-scale", type=float, default=1.0,
                        help="the text encoder's learning rate as a multiple of the UNet's; 0 freezes it "
                             "(a jointly trained encoder collapsed the position words: positions.md)")
    parser.add_argument("--fresh-text-encoder", action="store_true",
                        help="with --resume: keep the UNet but start the text encoder anew (seed 0), so a "
                             "trained denoiser learns to read an encoder whose position words never collapsed")
    parser.add_argument("--global-text", action="store_true",
                        help="a new UNet also gets the pooled caption through its time embedding")
    return parser.parse_args(argv)


@dataclass
class TrainingRun:
    """What a run trains and checkpoints: the live and EMA models, the optimiser, the counters."""

    workdir: Path
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    ema_unet: Any
    ema_te: Any
    params: list
    opt: torch.optim.Optimizer
    step: int = 0
    trained_seconds: float = 0.0
    best: float = -1.0


def start_run(args: argparse.Namespace, workdir: Path, emit: Callable[[dict], None]) -> TrainingRun:
    """New models (or `--resume`'s), then DIR/state.pt over them if an earlier run left one."""
    if args.resume:
        from kernels.models import load_model_folder
        mb, cb, _ = load_model_folder(args.resume)
        unet, text_encoder, tokenizer = mb.unet.float(), cb.text_encoder.float(), cb.tokenizer
        if args.fresh_text_encoder:
            torch.manual_seed(0)
            text_encoder = shapes_model.build_text_encoder(tokenizer)
    else:
        tokenizer = shapes_model.build_tokenizer()
        text_encoder = shapes_model.build_text_encoder(tokenizer)
        unet = shapes_model.build_unet(global_text=args.global_text)
    fold = args.image_size // shapes_model.IMAGE_SIZE
    folded_now = fold > 1 and shapes_model.pixel_shuffle_of(unet) == 1
    if folded_now:
        unet = shapes_model.fold_pixels(unet, fold)
    scheduler = shapes_model.build_scheduler()
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(args.text_lr_scale > 0)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    groups = [{"params": list(unet.parameters()), "lr_scale": 1.0}]
    if args.text_lr_scale > 0:
        groups.append({"params": list(text_encoder.parameters()), "lr_scale": args.text_lr_scale})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01)
    run = TrainingRun(workdir, unet, text_encoder, tokenizer, scheduler, ema_unet, ema_te, params, opt)
    if args.resume and not folded_now:
        # Committed unfinished runs record their step: continuing from it keeps the warm-up,
        # curriculum and decay where they were instead of starting them over.
        run.step = resumed_step(Path(args.resume))
    state_path = workdir / "state.pt"
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        unet.load_state_dict(state["unet"]), text_encoder.load_state_dict(state["text_encoder"])
        ema_unet.load_state_dict(state["ema_unet"]), ema_te.load_state_dict(state["ema_te"])
        opt.load_state_dict(state["opt"])
        run.step, run.trained_seconds, run.best = state["step"], state["trained_seconds"], state["best"]
        emit({"event": "resumed", "step": run.step})
    return run


def resumed_step(model_dir: Path) -> int:
    """The step a committed run's `training_state.json` records (0 for shipped weights)."""
    try:
        return int(json.loads((model_dir / "training_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


class SpikeGuard:
    """Guards against divergence: a batch whose loss jumps far above the running mean is not
    learned from (one bad update can wreck a small model and, through it, the EMA)."""

    def __init__(self, factor: float, after_step: int):
        self.factor, self.after_step = factor, after_step
        self.running: Optional[float] = None
        self.skipped = 0

    def allows(self, loss: float, step: int) -> bool:
        if self.running is not None and step > self.after_step and loss > self.factor * self.running:
            self.skipped += 1
            return False
        return True

    def learned(self, loss: float) -> None:
        self.running = loss if self.running is None else 0.98 * self.running + 0.02 * loss


def train_step(run: TrainingRun, data: Data, rng: np.random.Generator, args: argparse.Namespace,
               alphas: torch.Tensor, weights: torch.Tensor, guard: SpikeGuard) -> tuple[float, float]:
    """One v-prediction step on a curriculum batch, then the EMA update: (loss, one-object share)."""
    p_single = args.p_single
    if p_single is None:
        p_single = max(0.2, 0.7 - 0.5 * run.step / 6000)  # curriculum: one-object scenes first
    x0, ids = data.batch(rng, args.batch, p_single, p_drop=0.1)
    t = torch.from_numpy(rng.integers(args.t_min, 1000, args.batch))
    noise = torch.randn_like(x0)
    a = alphas[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * x0
    hidden = run.text_encoder(ids).last_hidden_state
    pred = run.unet(xt, t, encoder_hidden_states=hidden).sample
    loss = ((pred - target) ** 2).mean(dim=(1, 2, 3)).mul(weights[t]).mean()
    for g in run.opt.param_groups:
        g["lr"] = lr_at(run.step, args.lr, args.warmup, args.decay_steps) * g.get("lr_scale", 1.0)
    run.opt.zero_grad(set_to_none=True)
    value = float(loss.detach())
    if guard.allows(value, run.step):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.params, 1.0)
        run.opt.step()
        guard.learned(value)
    decay = min(args.ema, (1 + run.step) / (10 + run.step))
    with torch.no_grad():
        for ema, live in ((run.ema_unet, run.unet), (run.ema_te, run.text_encoder)):
            for pe, pl in zip(ema.parameters(), live.parameters()):
                pe.lerp_(pl, 1 - decay)
    run.step += 1
    return value, p_single


def loss_weights(snr: torch.Tensor, floor: float = 0.0, gamma: float = 5.0) -> torch.Tensor:
    """Per-timestep weights of the v-prediction loss: clamp(SNR, floor, gamma) / (SNR + 1).

    That is an x0-space weight of clamp(SNR, floor, gamma). With floor 0 it is min-SNR-gamma, whose
    weight vanishes with the SNR: at 32x32 in pixel space an object's place is settled at t > 850
    (SNR < 0.06), steps that then get under 3% of the loss, and the model never learned to put
    objects where the caption says (bench/results/positions.md). A floor of 1 weighs every
    high-noise step like x0 prediction.
    """
    return torch.clamp(snr, min=floor, max=gamma) / (snr + 1)


def train_for(run: TrainingRun, args: argparse.Namespace, data: Data, probe: list[dict],
              emit: Callable[[dict], None]) -> None:
    """Train for `--minutes`, logging every 50 steps, checkpointing and evaluating on the clock."""
    alphas = run.scheduler.alphas_cumprod.float()
    snr = alphas / (1 - alphas)
    weights = loss_weights(snr, args.snr_floor)
    rng = np.random.default_rng(run.step)  # resumed runs draw new batches
    guard = SpikeGuard(args.spike, args.warmup)
    started = time.monotonic()
    last_save = last_eval = started
    losses = []
    while time.monotonic() - started < args.minutes * 60:
        t0 = time.monotonic()
        value, p_single = train_step(run, data, rng, args, alphas, weights, guard)
        run.trained_seconds += time.monotonic() - t0
        losses.append(value)
        if run.step % 50 == 0:
            emit({"step": run.step, "loss": round(float(np.mean(losses)), 5), "lr": run.opt.param_groups[0]["lr"],
                  "p_single": round(p_single, 3), "skipped": guard.skipped,
                  "train_minutes": round(run.trained_seconds / 60, 2),
                  "sec_per_step": round(run.trained_seconds / max(run.step, 1), 3)})
            losses.clear()
        now = time.monotonic()
        if now - last_save > args.save_minutes * 60:
            last_save = now
            _checkpoint(run)
        if now - last_eval > args.eval_minutes * 60:
            last_eval = now
            run.best = _eval_and_keep(run, probe, emit)
            _checkpoint(run)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "log.jsonl", "a", buffering=1)

    def emit(record):
        record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        log.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    run = start_run(args, workdir, emit)
    heldout = load_heldout()
    data = Data(workdir, run.tokenizer, args.n_mixed, args.n_single, {p["caption"] for p in heldout},
                args.image_size)
    probe = eval_subset(heldout)
    emit({"event": "start", "params": shapes_model.parameter_counts(run.unet, run.text_encoder),
          "data": [len(data.mixed), len(data.single)], "args": vars(args)})
    train_for(run, args, data, probe, emit)
    run.best = _eval_and_keep(run, probe, emit)
    _checkpoint(run)


def _checkpoint(run: TrainingRun) -> None:
    state = {"unet": run.unet.state_dict(), "text_encoder": run.text_encoder.state_dict(),
             "ema_unet": run.ema_unet.state_dict(), "ema_te": run.ema_te.state_dict(),
             "opt": run.opt.state_dict(), "step": run.step, "trained_seconds": run.trained_seconds,
             "best": run.best}
    # The resume point: durable, and never half-written (a unique temporary file, then a rename).
    atomic_write(run.workdir / "state.pt", lambda tmp: torch.save(state, tmp))
    shapes_model.save_model(str(run.workdir / "latest"), run.ema_unet, run.ema_te, run.tokenizer, run.scheduler)


def _eval_and_keep(run: TrainingRun, probe: list[dict], emit: Callable[[dict], None]) -> float:
    """Evaluate the EMA weights; keep them in DIR/best if they beat the best so far. The new best."""
    try:
        metrics, images = evaluate(run.ema_unet, run.ema_te, run.tokenizer, dict(run.scheduler.config), probe)
    except ImportError as exc:  # the oracle may not exist yet in an early checkout
        emit({"event": "eval-skipped", "why": str(exc)})
        return run.best
    emit({"event": "eval", "step": run.step, "train_minutes": round(run.trained_seconds / 60, 2), **metrics})
    _save_grid(images, run.workdir / f"samples_{run.step:06d}.png")
    # Keep the checkpoint that is best over one-object and multi-object scenes: layout and erasure
    # both need several objects drawn right, not just one.
    score = float(np.mean([metrics[k] or 0.0 for k in ("single_colour_shape", "all_colour_shape",
                                                       "two_object_both_right")]))
    if score > run.best:
        shapes_model.save_model(str(run.workdir / "best"), run.ema_unet, run.ema_te, run.tokenizer, run.scheduler)
        (run.workdir / "best" / "metrics.json").write_text(json.dumps({"step": run.step, **metrics}, indent=2))
        return score
    return run.best


def _save_grid(images: np.ndarray, path: Path, cols: int = 8) -> None:
    from PIL import Image

    rows, size = math.ceil(len(images) / cols), images.shape[1]
    cell = size + 2
    grid = np.full((rows * cell, cols * cell, 3), 40, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * cell + 1:r * cell + 1 + size, c * cell + 1:c * cell + 1 + size] = img
    zoom = max(1, 96 // size)
    Image.fromarray(grid).resize((cols * cell * zoom, rows * cell * zoom), Image.Resampling.NEAREST).save(path)


if __name__ == "__main__":
    main()
