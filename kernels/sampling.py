"""Sampling: the denoising loop over a diffusers scheduler, with classifier-free guidance.

Plain functions in the k-diffusion spirit: no graph, no Qt. The loop is the one every
Stable Diffusion pipeline in diffusers runs; it is written out here (rather than calling a
pipeline) because the engine needs a cancel/progress hook at every step, img2img by `denoise`,
and pixel-space models without a VAE, which no single diffusers pipeline offers together.

An MM-DiT (SD3Transformer2DModel) is called as StableDiffusion3Pipeline calls it:
`transformer(hidden_states=x, timestep=t.expand(B), encoder_hidden_states=text,
pooled_projections=pooled)`, with the same cond/uncond batching for guidance; `sample` tells the
two kinds apart by the denoiser's signature. A FLUX transformer (packed latents, position ids,
the guidance embedding) is sampled by kernels.flux.sample_flux, as FluxPipeline samples it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import diffusers
import torch

# The one table of scheduler names lives without torch, for node declarations; re-exported here.
from kernels.scheduler_names import FLOW_SCHEDULERS, SCHEDULER_CLASSES, SCHEDULER_NAMES  # noqa: F401

# name -> (scheduler class, config overrides)
SCHEDULERS: dict[str, tuple[type, dict]] = {
    name: (getattr(diffusers, class_name), overrides) for name, (class_name, overrides) in SCHEDULER_CLASSES.items()}

ProgressFn = Callable[[int, int, torch.Tensor], None]


class SchedulerMismatch(ValueError):
    """A scheduler that cannot drive this model's noise process (flow vs. DDPM family)."""


def is_flow_config(config) -> bool:
    """A model trained with flow matching ships a FlowMatch* scheduler config (a dict, or a
    scheduler's FrozenDict config)."""
    return str(dict(config).get("_class_name", "")).startswith("FlowMatch")


def cfg_mix(uncond: torch.Tensor, cond: torch.Tensor, cfg: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + cfg (cond - uncond)."""
    return uncond + cfg * (cond - uncond)


def in_step_window(fraction: float, start: float, end: float) -> bool:
    """Whether a run that is `fraction` (0 at the first step) through its steps is inside the
    window [start, end); a window that ends at 1 includes the last step."""
    return start <= fraction < end or (end >= 1.0 and fraction >= start)


def latent_sample_shape(denoiser) -> tuple:
    """(C, H, W) of one sample a UNet-style denoiser takes at its native size."""
    size = denoiser.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (denoiser.config.in_channels, h, w)


def seed_noise(denoiser, seeds) -> torch.Tensor:
    """One unit-noise sample per seed (B, C, H, W) at the denoiser's native size: a seed draws
    the same noise alone or in a batch."""
    shape = latent_sample_shape(denoiser)
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)))
                        for s in seeds])


def batch_noise(seed: int, shape: tuple):
    """The generator(s) and starting noise of a batch: image k draws from its own generator
    seeded `seed + k`, so it is the image a batch of one gives with that seed (A1111's rule;
    diffusers' pipelines take the same list of generators). A batch of one keeps one generator."""
    if shape[0] == 1:
        generator = torch.Generator("cpu").manual_seed(int(seed))
        return generator, torch.randn(shape, generator=generator, dtype=torch.float32)
    generators = [torch.Generator("cpu").manual_seed(int(seed) + k) for k in range(shape[0])]
    noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generators])
    return generators, noise


def training_timesteps(scheduler, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` training timesteps drawn uniformly, for losses on noised samples: integers in
    [0, T) for DDPM-family schedulers; for flow matching, entries of the scheduler's own
    (shifted) schedule, which is where `scale_noise` can place a sample."""
    if hasattr(scheduler, "scale_noise"):
        schedule = scheduler.timesteps
        return schedule[torch.randint(0, len(schedule), (count,), generator=generator)]
    n_train = int(getattr(scheduler.config, "num_train_timesteps", 1000))
    return torch.randint(0, n_train, (count,), generator=generator)


def noised_sample(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """`clean` noised to `timesteps` (one per sample) by the scheduler itself: DDPM schedulers
    add noise, flow-matching ones interpolate (`scale_noise`)."""
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(clean, timesteps, noise)
    return scheduler.add_noise(clean, noise, timesteps)


def make_scheduler(name: str, base_config: dict):
    """Build scheduler `name` from a model's own scheduler config (its betas, prediction type)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    flow_model = is_flow_config(base_config)
    if flow_model != (name in FLOW_SCHEDULERS):
        family = "a flow-matching" if flow_model else "a DDPM-family"
        choices = sorted(FLOW_SCHEDULERS) if flow_model else sorted(set(SCHEDULERS) - FLOW_SCHEDULERS)
        raise SchedulerMismatch(
            f"scheduler {name!r} cannot sample {family} model; use one of {', '.join(choices)}")
    cls, overrides = SCHEDULERS[name]
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    config.update(overrides)
    return cls.from_config(config)


def _step_accepts_generator(scheduler) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters


def denoise_timesteps(scheduler, steps: int, denoise: float, device=None) -> torch.Tensor:
    """Set the schedule and keep the last `denoise` fraction of it (img2img), as diffusers does."""
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    if denoise >= 1.0:
        return timesteps
    kept = min(int(steps * denoise), steps)
    start = max(steps - kept, 0) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return timesteps[start:]


def noised_start(scheduler, noise: torch.Tensor, timesteps: torch.Tensor,
                 init: Optional[torch.Tensor]) -> torch.Tensor:
    """The first sample of the loop: pure noise (txt2img) or the init noised to the first step."""
    if init is None:
        # Flow-matching schedulers start from unit noise and have no init_noise_sigma.
        return noise * getattr(scheduler, "init_noise_sigma", 1.0)
    if len(timesteps) == 0:
        return init.clone()
    first = timesteps[:1]
    if hasattr(scheduler, "scale_noise"):  # flow matching interpolates instead of adding noise
        return scheduler.scale_noise(init, first, noise)
    return scheduler.add_noise(init, noise, first)


def takes_pooled_projections(denoiser) -> bool:
    """An MM-DiT (SD3) denoiser: it takes pooled text projections next to the text sequence."""
    try:
        return "pooled_projections" in inspect.signature(denoiser.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return False


def predict_mmdit_cfg(transformer, x: torch.Tensor, t, positive: torch.Tensor,
                      negative: Optional[torch.Tensor], pooled: torch.Tensor,
                      negative_pooled: Optional[torch.Tensor], cfg: float,
                      unet_kwargs: Optional[dict] = None) -> torch.Tensor:
    """One MM-DiT call with classifier-free guidance, as StableDiffusion3Pipeline makes it."""
    unet_kwargs = unet_kwargs or {}
    t = torch.as_tensor(t, device=x.device)
    if negative is None or cfg == 1.0:
        return transformer(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=positive,
                           pooled_projections=pooled, return_dict=False, **unet_kwargs)[0]
    if negative_pooled is None:
        raise ValueError("guidance with an MM-DiT needs the negative's pooled projections too")
    xx = torch.cat([x, x])
    out = transformer(hidden_states=xx, timestep=t.expand(xx.shape[0]),
                      encoder_hidden_states=torch.cat([negative.expand_as(positive), positive]),
                      pooled_projections=torch.cat([negative_pooled.expand_as(pooled), pooled]),
                      return_dict=False, **unet_kwargs)[0]
    uncond, cond = out.chunk(2)
    return cfg_mix(uncond, cond, cfg)


def predict_noise_cfg(unet, x: torch.Tensor, t, positive: torch.Tensor,
                      negative: Optional[torch.Tensor], cfg: float,
                      unet_kwargs: Optional[dict] = None) -> torch.Tensor:
    """One model call with classifier-free guidance; cond and uncond batched in one forward."""
    unet_kwargs = unet_kwargs or {}
    if negative is None or cfg == 1.0:
        return unet(x, t, encoder_hidden_states=positive, **unet_kwargs).sample
    both = torch.cat([negative.expand_as(positive), positive])
    out = unet(torch.cat([x, x]), t, encoder_hidden_states=both, **unet_kwargs).sample
    uncond, cond = out.chunk(2)
    return cfg_mix(uncond, cond, cfg)


@dataclass(frozen=True)
class StepText:
    """What the denoiser reads at a step of a prompt schedule instead of the base prompt."""

    positive: torch.Tensor
    negative: Optional[torch.Tensor] = None
    pooled: Optional[tuple] = None
    unet_kwargs: Optional[dict] = None

    def per_image(self, batch: int) -> "StepText":
        pooled = None if self.pooled is None else tuple(per_image(p, batch) for p in self.pooled)
        return StepText(per_image(self.positive, batch), per_image(self.negative, batch), pooled,
                        self.unet_kwargs)


TextAt = Callable[[int, int], Optional[StepText]]  # (step, steps) -> the schedule's text, or None


def per_image(text: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
    """A text embedding of batch 1 repeated for `batch` images (other batches are left as they are)."""
    if text is None or text.shape[0] != 1 or batch == 1:
        return text
    return text.expand(batch, *text.shape[1:])


@torch.no_grad()
def sample(unet, scheduler, positive: torch.Tensor, negative: Optional[torch.Tensor],
           noise: torch.Tensor, steps: int, cfg: float, generator: Optional[torch.Generator] = None,
           denoise: float = 1.0, init: Optional[torch.Tensor] = None,
           progress: Optional[ProgressFn] = None, unet_kwargs: Optional[dict] = None,
           before_step: Optional[Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]] = None,
           pooled: Optional[tuple] = None, guidance: Optional[float] = None,
           text_at: Optional[TextAt] = None,
           edit_prediction: Optional[Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = None,
           ) -> torch.Tensor:
    """Denoise `noise` (or `init` noised by `denoise`) into a clean latent.

    unet: a UNet2DConditionModel-like callable `unet(x, t, encoder_hidden_states=...).sample`,
    or an MM-DiT (SD3Transformer2DModel), which also needs `pooled`.
    positive/negative: text embeddings (B, L, D); negative None means no guidance.
    pooled: (positive pooled, negative pooled or None) projections, for an MM-DiT only.
    progress(i, n, x): called after every step; it may raise to cancel.
    before_step(i, t, x) -> x: steers the sample before step i (gradient guidance); it runs
    with gradients enabled.
    guidance: FLUX dev's distilled guidance when it is set apart from cfg (kernels.flux.sample_flux).
    text_at(i, n): a prompt schedule's text for step i of n, or None for the base prompt.
    edit_prediction(i, t, x_in, pred) -> pred: replaces the guided model output of step i (x_in:
    the model's input, after `scale_model_input`) before the scheduler steps with it (DiffuseHigh).
    """
    from kernels.flux import is_flux_transformer, sample_flux  # here: kernels.flux builds on kernels.text

    b = noise.shape[0]  # one prompt for a batch of images, as the pipelines' num_images_per_prompt
    positive, negative = per_image(positive, b), per_image(negative, b)
    if pooled is not None:
        pooled = tuple(per_image(p, b) for p in pooled)
    if is_flux_transformer(unet):  # packed latents, position ids: its own loop
        if edit_prediction is not None:
            raise ValueError("editing the prediction is not supported for FLUX transformers")
        return sample_flux(unet, scheduler, positive, negative, noise, steps, cfg, generator, denoise,
                           init, progress, unet_kwargs, before_step, pooled, guidance, text_at)
    mmdit = takes_pooled_projections(unet)
    if mmdit and (pooled is None or pooled[0] is None):
        raise ValueError(f"{type(unet).__name__} needs pooled text projections: encode the prompt "
                         f"with this model's own text encoders")
    timesteps = denoise_timesteps(scheduler, steps, denoise, device=noise.device)
    x = noised_start(scheduler, noise, timesteps, init)
    with_generator = _step_accepts_generator(scheduler)
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        if before_step is not None:
            with torch.enable_grad():
                x = before_step(i, t, x).detach()
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        text = StepText(positive, negative, pooled, unet_kwargs)
        scheduled = text_at(i, n) if text_at is not None else None
        if scheduled is not None:
            text = scheduled.per_image(b)
        if mmdit:
            pred = predict_mmdit_cfg(unet, x_in, t, text.positive, text.negative, text.pooled[0],
                                     text.pooled[1], cfg, text.unet_kwargs)
        else:
            pred = predict_noise_cfg(unet, x_in, t, text.positive, text.negative, cfg, text.unet_kwargs)
        if edit_prediction is not None:
            pred = edit_prediction(i, t, x_in, pred)
        kwargs = {"generator": generator} if with_generator else {}
        x = scheduler.step(pred, t, x, **kwargs).prev_sample
        if progress is not None:
            progress(i + 1, n, x)
    return x
