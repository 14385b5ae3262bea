"""Feature inheritance: reuse the deep UNet features of the last fully computed step.

A-SDM's tuning-free feature inheritance, in the DeepCache form: a UNet's deep blocks change
little between adjacent steps, so on "inherit" steps only the shallow branch runs (conv_in, the
first `depth` down blocks, the last `depth` up blocks, conv_out) and the output of the up block
just below it is the one cached at the last refresh step. Refresh steps run the whole UNet.

How it is done: for one run, every skipped module (down_blocks[depth:], mid_block and
up_blocks[:n - depth]) has its `forward` wrapped. On a refresh step the wrapper calls the real
forward and records the output; on an inherit step it returns the recorded output without
computing anything. Because the UNet's own forward still runs, everything else composes:
attention processors (layout patches) act in the shallow blocks, pre-hooks see every step, and
ControlNet residuals find tensors of the right shapes. Recordings are kept per batch shape (the
CFG batch [uncond, cond] and a lone conditional call are cached apart) in the run's state and
dropped, with every wrapper, when the run ends.

Which steps refresh: "uniform" every `interval` steps from the first; "non-uniform" the same
number of refresh steps placed by cosine spacing, denser at the start and the end of sampling.
Interval 1 refreshes every step, so the run is bit-identical to no cache.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Optional

import torch

from kernels.patching import ModelPatch, SamplingRun

SCHEDULES = ("uniform", "non-uniform")


class FeatureCacheError(ValueError):
    """A feature-cache setting or model the cache cannot work with."""


def refresh_steps(n: int, interval: int, schedule: str = "uniform") -> frozenset[int]:
    """The step indices (of `n`) that run the whole UNet."""
    if interval < 1:
        raise FeatureCacheError(f"feature cache interval must be at least 1, got {interval}")
    if schedule not in SCHEDULES:
        raise FeatureCacheError(f"feature cache schedule must be one of {SCHEDULES}, got {schedule!r}")
    uniform = set(range(0, n, interval))
    if schedule == "uniform" or interval == 1 or n <= 2:
        return frozenset(uniform)
    k = len(uniform)
    # cosine spacing: u -> (1 - cos(pi u)) / 2 packs points near both ends
    chosen = {round((n - 1) * (1 - math.cos(math.pi * j / (k - 1))) / 2) for j in range(k)} if k > 1 else {0}
    chosen.add(0)
    while len(chosen) < k:  # rounding merged neighbours: fill the widest gap's middle
        s = sorted(chosen) + [n]
        gap, at = max((b - a, a) for a, b in zip(s, s[1:]))
        chosen.add(at + gap // 2)
    return frozenset(chosen)


def skipped_modules(unet: Any, depth: int) -> list[str]:
    """Names of the UNet modules an inherit step skips when `depth` shallow levels run."""
    if not (hasattr(unet, "down_blocks") and hasattr(unet, "up_blocks")):
        raise FeatureCacheError(f"feature cache needs a UNet with down and up blocks; "
                                f"{type(unet).__name__} has none")
    n = len(unet.down_blocks)
    if len(unet.up_blocks) != n:
        raise FeatureCacheError(f"feature cache needs as many up blocks as down blocks "
                                f"({len(unet.up_blocks)} vs {n})")
    if not 1 <= depth <= n - 1:
        raise FeatureCacheError(f"feature cache depth must be 1..{n - 1} for this {n}-level UNet, got {depth}")
    names = [f"down_blocks.{j}" for j in range(depth, n)]
    if getattr(unet, "mid_block", None) is not None:
        names.append("mid_block")
    return names + [f"up_blocks.{j}" for j in range(n - depth)]


def _timestep_of(args: tuple, kwargs: dict) -> Optional[float]:
    t = args[1] if len(args) > 1 else kwargs.get("timestep")
    if t is None:
        return None
    return float(torch.as_tensor(t).flatten()[0])


def _shape_key(args: tuple, kwargs: dict) -> tuple:
    sample = args[0] if args else kwargs["sample"]
    text = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
    return (tuple(sample.shape), sample.dtype, None if text is None else tuple(text.shape))


def _replayed(output: Any) -> Any:
    """A recorded output handed out again: the hidden state is copied, since a T2I-Adapter adds
    its residual to it in place; the skip tensors are only read."""
    if torch.is_tensor(output):
        return output.clone()
    if isinstance(output, tuple) and output and torch.is_tensor(output[0]):
        return (output[0].clone(), *output[1:])
    return output


class FeatureCacheRun:
    """One run's cache: the refresh steps, the current step's mode, and recordings per batch shape."""

    def __init__(self, run: SamplingRun, interval: int, schedule: str):
        self.run = run
        self.interval, self.schedule_kind = interval, schedule
        self.schedule: Optional[torch.Tensor] = None
        self.refresh: frozenset[int] = frozenset()
        self.recorded: dict[tuple, dict[str, Any]] = {}
        self.mode = "plain"  # "refresh": compute and record; "inherit": replay; "plain": compute
        self.key: Optional[tuple] = None
        self.inherited_steps = 0

    def _read_schedule(self) -> None:
        """The scheduler's timesteps (set by the sampling loop after the patch is entered)."""
        timesteps = getattr(self.run.scheduler, "timesteps", None)
        if timesteps is None:
            self.schedule, self.refresh = None, frozenset()
            return
        timesteps = torch.as_tensor(timesteps).flatten().float().cpu()
        if self.schedule is None or not torch.equal(timesteps, self.schedule):
            self.schedule = timesteps
            self.refresh = refresh_steps(len(timesteps), self.interval, self.schedule_kind)

    def before_forward(self, module, args, kwargs) -> None:
        self._read_schedule()
        t = _timestep_of(args, kwargs)
        if self.schedule is None:
            t = None
        hits = (self.schedule == t).nonzero() if t is not None else []
        self.key = _shape_key(args, kwargs)
        if len(hits) == 0 or torch.is_grad_enabled():
            self.mode = "plain"  # a call outside the schedule (or with gradients): no reuse
        elif int(hits[0]) in self.refresh or self.key not in self.recorded:
            self.mode = "refresh"
        else:
            self.mode = "inherit"
            self.inherited_steps += 1

    def wrap(self, name: str, forward):
        def cached_forward(*args, **kwargs):
            if self.mode == "inherit":
                return _replayed(self.recorded[self.key][name])
            out = forward(*args, **kwargs)
            if self.mode == "refresh":
                self.recorded.setdefault(self.key, {})[name] = out
            return out
        return cached_forward


@contextlib.contextmanager
def wrapped_forwards(unet: Any, names: list[str], cache: FeatureCacheRun) -> Iterator[None]:
    """Wrap the named modules' forwards with the cache for the block; restore them on exit."""
    saved = {}
    handle = unet.register_forward_pre_hook(cache.before_forward, with_kwargs=True)
    try:
        for name in names:
            module = unet.get_submodule(name)
            saved[name] = module.__dict__.get("forward")  # an instance override someone else set
            module.forward = cache.wrap(name, module.forward)
        yield
    finally:
        handle.remove()
        for name, previous in saved.items():
            module = unet.get_submodule(name)
            if previous is None:
                del module.forward
            else:
                module.forward = previous


class FeatureCachePatch(ModelPatch):
    """DeepCache-style feature inheritance for one sampling run (see the module doc)."""

    kind = "feature-cache"

    def __init__(self, interval: int = 3, depth: int = 1, schedule: str = "uniform"):
        refresh_steps(1, int(interval), schedule)  # validates
        if int(depth) < 1:
            raise FeatureCacheError(f"feature cache depth must be at least 1, got {depth}")
        self.interval = int(interval)
        self.depth = int(depth)
        self.schedule = schedule

    def cache_key(self) -> str:
        return f"feature-cache:{self.interval}:{self.depth}:{self.schedule}"

    def describe(self) -> str:
        return f"feature cache (every {self.interval}, depth {self.depth}, {self.schedule})"

    @contextlib.contextmanager
    def applied(self, unet: Any, run: Optional[SamplingRun]) -> Iterator[None]:
        if run is None:  # outside a sampling run there are no steps to inherit between
            yield
            return
        names = skipped_modules(unet, self.depth)
        cache = FeatureCacheRun(run, self.interval, self.schedule)
        run.state[self] = cache
        try:
            with wrapped_forwards(unet, names, cache):
                yield
        finally:
            run.state.pop(self, None)
