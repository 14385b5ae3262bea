"""A MODEL + CLIP pair that encodes and samples with its patches (for the red team and benches)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from kernels.denoiser import Denoiser
from kernels.patching import SamplingRun, applied_patches
from kernels.sampling import is_flow_config, make_scheduler, sample
from kernels.text import encode_text


def model_scheduler(model, name: str = "ddim"):
    """Scheduler `name` for a MODEL bundle, or flow-matching Euler when the model is a flow model
    (what the erasers train, probe, attack and sample with)."""
    flow = is_flow_config(model.scheduler_config)
    return make_scheduler("flow_match_euler" if flow else name, model.scheduler_config)


@dataclass
class Generator:
    """A MODEL + CLIP pair (kernels.models bundles) that can encode and sample with its patches."""

    model: Any
    clip: Any

    def encode(self, prompt: str):
        with applied_patches(self.clip.patches, self.clip.text_encoder):
            return encode_text(self.clip.tokenizer, self.clip.text_encoder, prompt)

    @torch.no_grad()
    def sample(self, cond, *, seeds: Sequence[int], steps: int = 20, cfg: float = 4.0,
               scheduler: str = "ddim") -> torch.Tensor:
        """Images (B, C, H, W) in the model's own space (pixels in -1..1 for pixel models), at the
        denoiser's native size, guided as the Sampler guides with no negative prompt."""
        unet = self.model.unet
        noise = Denoiser.of(self.model).noise(seeds)
        sched = model_scheduler(self.model, scheduler)
        run = SamplingRun(unet=unet, scheduler=sched, positive=cond, negative=None, cfg=cfg, steps=steps,
                          latent_shape=tuple(noise.shape))
        b = noise.shape[0]
        dev, dt = unet.device, unet.dtype
        pos = cond.embeds.expand(b, -1, -1)
        neg = cond.empty.expand(b, -1, -1) if cond.empty is not None else None
        pooled, kwargs = None, None
        if cond.pooled is not None:  # SDXL, SD3, FLUX
            pooled = (cond.pooled.expand(b, -1).to(dev, dt),
                      None if cond.empty_pooled is None else cond.empty_pooled.expand(b, -1).to(dev, dt))
            if hasattr(self.model, "added_cond_kwargs"):  # SDXL's pooled text and time ids, per image
                one = (cond.pooled.to(dev, dt), None if cond.empty_pooled is None else cond.empty_pooled.to(dev, dt))
                run.positive_kwargs = {"added_cond_kwargs": self.model.added_cond_kwargs(
                    one, run.latent_shape, guided=False)}
                guided = neg is not None and cfg != 1.0
                kwargs = {"added_cond_kwargs": self.model.added_cond_kwargs(one, run.latent_shape, guided)}
        with applied_patches(self.model.patches, unet, run):
            return sample(unet, sched, pos.to(dev, dt), None if neg is None else neg.to(dev, dt),
                          noise.to(dev, dt), steps, cfg, unet_kwargs=kwargs, pooled=pooled).float().cpu()
