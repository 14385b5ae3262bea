"""Diffusion Classifier: zero-shot classification of an image by the denoiser's own error.

An image x0 (in the denoiser's latent space) and candidate prompts c_1..c_K: draw pairs
(t_j, eps_j) and score each candidate by its mean denoising error

    err_i = mean_j || target(x0, eps_j, t_j) - model(noised(x0, eps_j, t_j), t_j, c_i) ||^2

where `target` is what the model predicts (the noise, v, x0 or the flow velocity, by its
scheduler's prediction type). The lowest error names the best prompt. Every candidate sees the
same pairs: the error's variance across pairs is far larger than its difference across
candidates, so shared pairs are what make the comparison meaningful (and a seed gives the same
scores every time).

Adaptive pruning: the first `first` pairs score every candidate; only the `keep` best go on to
the remaining pairs (`samples` in all). A pruned candidate keeps the score of its first pairs
and ranks below every survivor.

Timesteps are spread evenly over the training range (a golden-ratio sequence from a seeded
offset, so any prefix of the pairs covers the range evenly and the adaptive stages stay
stratified); each noise is drawn from the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from kernels.denoiser import Denoiser, DenoiserText, as_text, cat_text
from kernels.sampling import noised_sample

GOLDEN = (math.sqrt(5) - 1) / 2
DEFAULT_SAMPLES = 32
DEFAULT_FIRST = 8
DEFAULT_KEEP = 3
DEFAULT_BATCH = 16  # candidate rows per denoiser call


class ClassifierError(ValueError):
    """A classifier setting or input it cannot work with."""


@dataclass(frozen=True)
class Classification:
    """Scores of the candidates (mean error, lower is better), the pairs each was scored on, and
    the ranking (best first: survivors by error, then the pruned by error)."""

    prompts: tuple[str, ...]
    errors: tuple[float, ...]
    samples: tuple[int, ...]
    ranking: tuple[int, ...]

    @property
    def best(self) -> int:
        return self.ranking[0]

    @property
    def best_prompt(self) -> str:
        return self.prompts[self.best]


def training_scheduler(config, model, flow_steps: int = 100):
    """The model's noise process as a scheduler to noise samples with: DDPM for the DDPM family
    (its betas and prediction type), flow matching (its schedule set for `flow_steps` steps, which
    is where samples can be placed) for flow models."""
    import diffusers

    from kernels.sampling import is_flow_config

    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    if is_flow_config(config):
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
        Denoiser.of(model).set_timesteps(scheduler, flow_steps)
        return scheduler
    return diffusers.DDPMScheduler.from_config(config)


def shared_pairs(scheduler, count: int, seed: int, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` (timestep, noise) pairs from `seed`: timesteps spread evenly over the training
    range (DDPM family: integers in [0, T); flow matching: entries of the scheduler's schedule),
    noises (count, *shape) of unit variance."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    offset = float(torch.rand((), generator=generator))
    fractions = torch.tensor([(offset + j * GOLDEN) % 1.0 for j in range(count)], dtype=torch.float64)
    if hasattr(scheduler, "scale_noise"):
        schedule = scheduler.timesteps
        timesteps = schedule[(fractions * len(schedule)).long().clamp(max=len(schedule) - 1)]
    else:
        n_train = int(getattr(scheduler.config, "num_train_timesteps", 1000))
        timesteps = (fractions * n_train).long().clamp(max=n_train - 1)
    noises = torch.randn((count, *shape), generator=generator, dtype=torch.float32)
    return timesteps, noises


def prediction_target(scheduler, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser is trained to predict for `clean` noised with `noise` at `t`."""
    if hasattr(scheduler, "scale_noise"):
        return noise - clean  # flow matching: the velocity
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, t)
    if kind == "sample":
        return clean
    raise ClassifierError(f"unknown prediction type {kind!r}")


@torch.no_grad()
def pair_errors(denoiser: Denoiser, scheduler, clean: torch.Tensor, texts: DenoiserText,
                t: torch.Tensor, noise: torch.Tensor, batch: int = DEFAULT_BATCH) -> torch.Tensor:
    """The error of each text row on one pair (t, noise): (K,) mean squared errors."""
    device, dtype = clean.device, clean.dtype
    noise = noise.to(device, dtype)[None]
    t1 = t.reshape(1).to(device)
    x_t = noised_sample(scheduler, clean, noise, t1)
    target = prediction_target(scheduler, clean, noise, t1)
    out = []
    k = texts.shape[0]
    for start in range(0, k, batch):
        rows = texts[start:start + batch]
        n = rows.shape[0]
        pred = denoiser.predict(x_t.expand(n, -1, -1, -1), t1.expand(n), rows)
        out.append(((pred.float() - target.float()) ** 2).flatten(1).mean(1))
    return torch.cat(out).cpu()


def classify(model, scheduler, clean: torch.Tensor, texts: Sequence, prompts: Sequence[str],
             samples: int = DEFAULT_SAMPLES, first: int = DEFAULT_FIRST, keep: int = DEFAULT_KEEP,
             seed: int = 0, batch: int = DEFAULT_BATCH,
             progress: Optional[Callable[[int, int], None]] = None) -> Classification:
    """Score `prompts` (their denoiser texts `texts`, one row each) on the image latent `clean`
    (1, C, H, W). `keep` >= the number of prompts, or `first` >= `samples`, turns pruning off.
    progress(done, total) after each pair."""
    k = len(prompts)
    if k == 0 or len(texts) != k:
        raise ClassifierError(f"the classifier needs one text per prompt ({len(texts)} for {k} prompts)")
    if clean.ndim != 4 or clean.shape[0] != 1:
        raise ClassifierError(f"the classifier scores one image at a time, got a batch of shape {tuple(clean.shape)}")
    if samples < 1 or not 1 <= first or keep < 1:
        raise ClassifierError(f"samples, first and keep must be at least 1 (got {samples}, {first}, {keep})")
    first = min(first, samples)
    denoiser = Denoiser.of(model)
    rows = cat_text([as_text(x) for x in texts])
    timesteps, noises = shared_pairs(scheduler, samples, seed, tuple(clean.shape[1:]))
    sums, counts = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.long)
    alive = list(range(k))
    for j in range(samples):
        if j == first and keep < len(alive):
            means = sums / counts.clamp(min=1)
            alive = sorted(alive, key=lambda i: (float(means[i]), i))[:keep]
        errs = pair_errors(denoiser, scheduler, clean, rows[alive], timesteps[j], noises[j], batch)
        sums[alive] += errs.double()
        counts[alive] += 1
        if progress is not None:
            progress(j + 1, samples)
    means = (sums / counts).tolist()
    survivors = set(alive)
    ranking = sorted(range(k), key=lambda i: (i not in survivors, means[i], i))
    return Classification(tuple(prompts), tuple(means), tuple(int(c) for c in counts), tuple(ranking))


def classification_table(result: Classification):
    """The result as a Table: rank, prompt, mean error, pairs scored."""
    from kernels.analysis.table import Table

    rows = [[r + 1, result.prompts[i], round(result.errors[i], 6), result.samples[i]]
            for r, i in enumerate(result.ranking)]
    return Table("Diffusion Classifier (lower error is better)", ["rank", "prompt", "error", "pairs"], rows)
