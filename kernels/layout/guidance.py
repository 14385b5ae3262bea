"""Gradient guidance on the latent from cross-attention maps: the base of ZestGuide, box
guidance (CSG) and A-STAR.

Before each step in [start, end), `iterations` normalised gradient steps on the latent. As in
ZestGuide's official code: the gradient is taken w.r.t. the model input, normalised by its
largest entry (L-inf), and the step size follows the noise, eta * sqrt(1 - abar_t). The step is
taken in the model-input scale (x_in = c x from `scale_model_input`), so `eta` means the same for
every scheduler: x <- x - eta * sqrt(1 - abar_t) * (g / max|g|) / c.

The maps come from one extra UNet forward with gradients per iteration, recorded by the run's
`AttentionStore` in "guide" mode. A caller that wants the losses (tests, the bench) hands a
list in through `GuidanceTrace`; the patches keep nothing from one run to the next.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import torch

from kernels.attention import AttentionStore, scheduler_sigma
from kernels.patching import ModelPatch, SamplingRun
from kernels.sampling import in_step_window

from .base import LayoutPatch, LayoutRun
from .boxes import prompt_tokens
from .defaults import GUIDANCE_END, GUIDANCE_ETA, GUIDANCE_ITERATIONS, GUIDANCE_START

GUIDANCE_TRACE = "loomwork.guidance-trace"  # run.state key of a GuidanceTrace's list


class GuidanceTrace(ModelPatch):
    """Hands the caller's `trace` list to the guidance patches of every run it is applied in:
    each guidance iteration appends {"step", "iteration", "loss"} (and box guidance's
    unweighted loss "parts"). Changes nothing else."""

    kind = "guidance-trace"

    def __init__(self, trace: list):
        self.trace = trace

    def cache_key(self) -> str:
        return f"{self.kind}:{id(self.trace)}"

    @contextlib.contextmanager
    def applied(self, module, run) -> Iterator[None]:
        if run is None:
            yield
            return
        run.state[GUIDANCE_TRACE] = self.trace
        try:
            yield
        finally:
            run.state.pop(GUIDANCE_TRACE, None)


def token_maps(maps: torch.Tensor, boxes: Sequence[dict], text_normalise: bool = False,
               n_text: Optional[int] = None) -> torch.Tensor:
    """Per-box maps (B, n_boxes, h, w): the mean over each box's tokens of `maps` (B, L, h, w).

    text_normalise: renormalise over the prompt's word tokens first (drop the start token and
    padding, as Attend-and-Excite-style losses do).
    """
    if text_normalise:
        last = n_text if n_text is not None else maps.shape[1]
        text = maps[:, 1:last]
        text = text / text.sum(dim=1, keepdim=True).clamp_min(1e-8)
        maps = torch.cat([maps[:, :1] * 0, text, maps[:, last:] * 0], dim=1)
    return torch.stack([maps[:, b["tokens"]].mean(dim=1) for b in boxes], dim=1)


def input_scale(scheduler, t) -> float:
    """c with scale_model_input(x, t) == c * x (1 for schedulers that do not scale)."""
    if not hasattr(scheduler, "scale_model_input"):
        return 1.0
    return float(scheduler.scale_model_input(torch.ones(()), t))


def noise_fraction(scheduler, t) -> float:
    """sqrt(1 - abar_t): the guidance step shrinks as the image forms (flow: the noise share)."""
    sigma = scheduler_sigma(scheduler, torch.as_tensor(t).flatten()[0].float().cpu())
    return sigma / math.sqrt(1.0 + sigma * sigma)


def schedule_index(scheduler, t) -> int:
    """The index of timestep t in the scheduler's full schedule (img2img keeps only its tail,
    so step windows are fractions of the full one)."""
    ts = scheduler.timesteps
    return int(torch.argmin((ts.float().cpu() - torch.as_tensor(t).float().cpu()).abs()))


class GuidanceRun(LayoutRun):
    """One run of a guidance patch: the attention store of its guidance forwards and what the
    technique remembers between steps. Subclasses give the loss."""

    patch: "GuidancePatch"

    def __init__(self, patch, run, boxes):
        super().__init__(patch, run, boxes)
        self.store = AttentionStore("guide")
        self.self_maps = None  # this iteration's self-attention, when recorded
        self.n_text = max((p for p, _ in prompt_tokens(run.positive)), default=0) + 1

    # the attention transform interface: the store records the guidance forwards
    def wants_probs(self, ctl, layer):
        return self.store.wants_probs(ctl, layer)

    def record(self, ctl, layer, probs):
        self.store.record(ctl, layer, probs)

    def wants_self_probs(self, ctl, layer):
        return self.store.wants_self_probs(ctl, layer)

    def record_self(self, ctl, layer, probs):
        self.store.record_self(ctl, layer, probs)

    def self_attention_layers(self, unet):
        names = self.patch.self_attention_wanted(unet, self.run)
        self.store.self_layers = set(names)
        return names

    def loss(self, maps: torch.Tensor, masks: torch.Tensor,
             step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The guidance loss on token maps (B, L, h, w) and box masks (n, h, w), and its named
        parts (for the trace)."""
        raise NotImplementedError

    def guide(self, t, x: torch.Tensor) -> torch.Tensor:
        """The latent after this step's guidance (x itself outside the step window)."""
        if self.ctl is None or len(self.boxes) < self.patch.needs_boxes():
            return x
        scheduler = self.run.scheduler
        step = schedule_index(scheduler, t)
        if not in_step_window(step / max(len(scheduler.timesteps), 1), self.patch.start, self.patch.end):
            return x
        for it in range(self.patch.iterations):
            x = x.detach().requires_grad_(True)
            maps = self.attention_maps(x, t)
            if maps is None:
                return x.detach()
            h, w = maps.shape[-2:]
            masks = self.masks.masks(h, w, x.device).view(-1, h, w).to(maps.dtype)
            loss, parts = self.loss(maps, masks, step)
            self.trace(step, it, loss, parts)
            if not loss.requires_grad:
                return x.detach()
            (grad,) = torch.autograd.grad(loss, x)
            x = self.descend(x, grad, t)
        return x.detach()

    def attention_maps(self, x: torch.Tensor, t) -> Optional[torch.Tensor]:
        """One UNet forward with gradients: the recorded token maps (B, L, h, w), or None."""
        run, ctl, store = self.run, self.ctl, self.store
        scheduler = run.scheduler
        cond = run.positive.embeds.to(x.device, x.dtype)
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        store.reset()
        ctl.guiding = True
        try:
            run.unet(x_in, t, encoder_hidden_states=cond.expand(x.shape[0], -1, -1), **run.positive_kwargs)
        finally:
            ctl.guiding = False
        maps = store.maps(min_size=self.patch.min_map_size)
        self.self_maps = store.self_maps()  # None unless self-attention was recorded
        store.reset()
        return maps

    def descend(self, x: torch.Tensor, grad: torch.Tensor, t) -> torch.Tensor:
        """ZestGuide's normalised step (see module doc)."""
        scheduler = self.run.scheduler
        with torch.no_grad():
            c = input_scale(scheduler, t)
            peak = grad.abs().amax().clamp_min(1e-12)
            return x - self.patch.eta * noise_fraction(scheduler, t) * grad / peak / c

    def trace(self, step: int, iteration: int, loss: torch.Tensor, parts: dict) -> None:
        trace = self.run.state.get(GUIDANCE_TRACE)
        if trace is None:
            return
        entry = {"step": step, "iteration": iteration, "loss": float(loss.detach())}
        if parts:
            entry["parts"] = {k: float(v.detach()) for k, v in parts.items()}
        trace.append(entry)


class GuidancePatch(LayoutPatch):
    """A gradient-guidance technique's settings (see module doc); its runs do the work."""

    min_map_size = 1
    run_class = GuidanceRun

    def __init__(self, layout, eta: float = GUIDANCE_ETA, start: float = GUIDANCE_START,
                 end: float = GUIDANCE_END, iterations: int = GUIDANCE_ITERATIONS):
        super().__init__(layout, start, end)
        self.eta = float(eta)
        self.iterations = int(iterations)

    def params_key(self):
        return {"eta": self.eta, "it": self.iterations}

    def is_noop(self):
        return super().is_noop() or self.eta == 0.0 or self.iterations <= 0

    def self_attention_wanted(self, unet, run) -> list[str]:
        """attn1 layers whose self-attention the loss reads (none by default)."""
        return []

    def needs_boxes(self) -> int:
        return 1

    def before_step(self, run: SamplingRun, i: int, t, x: torch.Tensor) -> torch.Tensor:
        state = self.run_state(run)
        return x if state is None else state.guide(t, x)
