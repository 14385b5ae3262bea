"""CycleDiffusion editing: the DPM-Encoder latent code of an image, regenerated with another prompt.

DDIM with eta > 0 is a stochastic sampler: x_prev = mu(x_t, t, c) + sigma_t z_t. The DPM-Encoder
inverts it: draw x_T from q(x_T | x0) and each x_prev from the forward posterior q(x_prev | x_t, x0)
(the DDIM step at the true x0's prediction, with fresh noise), and keep what the sampler's noise
would have had to be, z_t = (x_prev - mu(x_t, t, c_src)) / sigma_t. The latent code is
(x_T, z_T..z_1). Sampling from x_T with those z and c_src gives x0 back exactly; with c_tgt, an
edit that keeps what the prompts share (the code fixes the layout, c_tgt changes the rest).

Stored here as residuals r_t = sigma_t z_t = x_prev - mu (the same numbers times sigma), which
also covers the last DDIM step, where sigma is 0 and x_prev is x0 itself: its residual is the
sampler's remaining error, x0 - mu. They are kept in float64 on the CPU: the difference of two
float32 (or float16) tensors is exact there, so mu + r gives x_prev back to the bit and the
source prompt's round trip has no rounding to amplify (at cfg 20 a float32 residual left 1e-4).

How it is done: the sampling loop is kernels.sampling.sample, unchanged, driven by a
`CycleScheduler` that wraps the DDIM scheduler. Encoding and decoding are both whole sampling
runs (same start x_T = the scheduler's add_noise(x0, noise, t_first), same text batching, same
CFG), so regenerating with the source prompt repeats the encoding's model calls exactly.
With `strength` < 1 only the last part of the schedule is encoded (img2img's `denoise`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional

import torch

# Measured on ShapesT2I (bench/speed.py cycle_edit_sweep): at eta 1 the recorded residuals carry
# more of the source's path, which keeps the object in place while the prompt changes its colour
DEFAULT_ETA = 1.0
DEFAULT_STRENGTH = 0.4

# run_sample(scheduler, noise, init) -> the loop's final latent, for one prompt (source or target)
RunSample = Callable[[object, torch.Tensor, torch.Tensor], torch.Tensor]


class CycleEditError(ValueError):
    """A setting or model CycleDiffusion cannot work with."""


@dataclass(frozen=True)
class CycleCode:
    """The DPM-Encoder latent code: the start noise (x_T = add_noise(x0, noise, t_first)) and
    each step's residual x_prev - mu(x_t)."""

    noise: torch.Tensor
    residuals: tuple[torch.Tensor, ...]


def true_prediction(scheduler, clean: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
    """The model output (epsilon, v or x0, by the scheduler's prediction type) whose x0 is `clean`
    at (x_t, t): a DDIM step with it samples the forward posterior q(x_prev | x_t, x0)."""
    a = scheduler.alphas_cumprod[int(t)].to(x_t.device, x_t.dtype)
    eps = (x_t - a.sqrt() * clean) / (1 - a).sqrt()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return eps
    if kind == "v_prediction":
        return a.sqrt() * eps - (1 - a).sqrt() * clean
    if kind == "sample":
        return clean
    raise CycleEditError(f"unknown prediction type {kind!r}")


class CycleScheduler:
    """A DDIM scheduler at `eta` that draws no noise of its own. Encoding (`clean` given): each
    step goes to a posterior sample and records its residual to the model's mean. Decoding
    (`residuals` given): each step is the model's mean plus the recorded residual. Everything
    but `step` is the wrapped scheduler's."""

    def __init__(self, ddim, eta: float, clean: Optional[torch.Tensor] = None,
                 residuals: Optional[tuple] = None, generator: Optional[torch.Generator] = None):
        if (clean is None) == (residuals is None):
            raise CycleEditError("a cycle scheduler either encodes (clean) or decodes (residuals)")
        self.inner, self.eta = ddim, float(eta)
        self.clean, self.generator = clean, generator
        self.residuals = list(residuals) if residuals is not None else []
        self.decoding = residuals is not None
        self.index = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _ddim(self, pred, t, x, noise):
        return self.inner.step(pred, t, x, eta=self.eta, variance_noise=noise).prev_sample

    def step(self, model_output, timestep, sample, generator=None, **_ignored):
        zeros = torch.zeros_like(sample)
        mean = self._ddim(model_output, timestep, sample, zeros)
        if self.decoding:
            if self.index >= len(self.residuals):
                raise CycleEditError(f"the latent code has {len(self.residuals)} steps; decoding asked for more")
            prev = (_exact(mean) + _exact(self.residuals[self.index])).to(mean.device, mean.dtype)
        else:
            fresh = torch.randn(sample.shape, generator=self.generator, dtype=torch.float32).to(sample.device, sample.dtype)
            truth = true_prediction(self.inner, self.clean, sample, timestep)
            prev = self._ddim(truth, timestep, sample, fresh)
            self.residuals.append(_exact(prev) - _exact(mean))
        self.index += 1
        return SimpleNamespace(prev_sample=prev)


def _exact(x: torch.Tensor) -> torch.Tensor:
    """x in float64 on the CPU (where every device's float dtype fits and float64 exists)."""
    return x.detach().to("cpu", torch.float64)


def start_noise(shape: tuple, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)


def encode(run_source: RunSample, ddim, clean: torch.Tensor, eta: float = DEFAULT_ETA, seed: int = 0) -> CycleCode:
    """The latent code of `clean` under the source prompt (`run_source` samples with it)."""
    if not 0.0 <= eta <= 1.0:
        raise CycleEditError(f"eta must be in [0, 1], got {eta}")
    generator = torch.Generator("cpu").manual_seed(int(seed) + 1)
    noise = start_noise(tuple(clean.shape), seed).to(clean.device, clean.dtype)
    scheduler = CycleScheduler(ddim, eta, clean=clean, generator=generator)
    run_source(scheduler, noise, clean)
    return CycleCode(noise, tuple(scheduler.residuals))


def decode(run_prompt: RunSample, ddim, clean: torch.Tensor, code: CycleCode, eta: float = DEFAULT_ETA) -> torch.Tensor:
    """The latent `run_prompt`'s prompt gives from the code (the source prompt: `clean` again)."""
    scheduler = CycleScheduler(ddim, eta, residuals=code.residuals)
    out = run_prompt(scheduler, code.noise, clean)
    if scheduler.index != len(code.residuals):
        raise CycleEditError(f"decoding ran {scheduler.index} steps of a {len(code.residuals)}-step code: "
                             f"use the steps and strength it was encoded with")
    return out


def cycle_edit(run_source: RunSample, run_target: RunSample, ddim, clean: torch.Tensor,
               eta: float = DEFAULT_ETA, seed: int = 0) -> torch.Tensor:
    """`clean` edited from the source prompt to the target prompt."""
    return decode(run_target, ddim, clean, encode(run_source, ddim, clean, eta, seed), eta)
