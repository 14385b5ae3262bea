"""Safe guidance: negative guidance away from a concept at inference, no weights changed.

After Schramowski et al., "Safe Latent Diffusion: Mitigating Inappropriate Degeneration in
Diffusion Models" (SLD): eps = eps_u + cfg (eps_c - eps_u) - s (eps_concept - eps_u), with the
noisiest part of the schedule left unguided (warm-up) so composition forms first. A baseline to
compare the erasers with; SLD's momentum and element-wise threshold are not used.

Every family is steered the same way: the hook reads the denoiser's call by argument name
(kernels.denoiser.DenoiserCall: UNet, SDXL's added_cond_kwargs, SD3's and FLUX's pooled
projections) and makes it again with the concept's text. FLUX samples without a negative batch,
so it is always steered unbatched, against the empty prompt's prediction the patch carries.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from kernels.denoiser import DenoiserCall, DenoiserText

from .patches import EraserPatch


def _prediction(out) -> torch.Tensor:
    """The prediction of a denoiser output (a tuple when called with return_dict=False)."""
    return out[0] if isinstance(out, tuple) else out.sample


def _with_prediction(out, pred: torch.Tensor):
    """`out` with its prediction replaced, in the same output type."""
    if isinstance(out, tuple):
        return (pred,) + tuple(out[1:])
    return type(out)(sample=pred)


class SafeGuidancePatch(EraserPatch):
    """Negative guidance away from a concept at inference (no weights change).

    While applied, a forward hook on the UNet rewrites its output: the conditional half of the
    CFG batch becomes eps_c - (s / cfg) (eps_concept - eps_u), so the sampler's CFG gives
    eps_u + cfg (eps_c - eps_u) - s (eps_concept - eps_u); unbatched (cfg 1, or no negative) the
    prediction becomes eps - s (eps_concept - eps_empty). `warmup` skips the noisiest part of the
    schedule (that fraction of the timestep range), as SLD does, so composition forms first.
    """

    kind = "safe-guidance"

    def __init__(self, concept_embeds: torch.Tensor, scale: float = 1.0, warmup: float = 0.0,
                 strength: float = 1.0, meta: Optional[dict] = None, *,
                 concept_pooled: Optional[torch.Tensor] = None, uncond_embeds: Optional[torch.Tensor] = None,
                 uncond_pooled: Optional[torch.Tensor] = None):
        super().__init__(strength, meta)
        self.target = "unet"
        self.concept_embeds = _stored(concept_embeds)
        self.scale = float(scale)
        self.warmup = float(warmup)
        # the families that take pooled text (SDXL, SD3, FLUX): the concept's pooled embedding;
        # FLUX, whose conditioning has no negative: the empty prompt's text
        self.concept_pooled = _stored(concept_pooled)
        self.uncond_embeds = _stored(uncond_embeds)
        self.uncond_pooled = _stored(uncond_pooled)

    def _optional(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in (("concept_pooled", self.concept_pooled), ("uncond_embeds", self.uncond_embeds),
                                  ("uncond_pooled", self.uncond_pooled)) if v is not None}

    def content(self):
        extra = self._optional()
        return (self.scale, self.warmup, self.concept_embeds) + ((extra,) if extra else ())

    @contextlib.contextmanager
    def applied(self, module, run):
        s = self.scale * self.strength
        if s == 0.0 or run is None:
            yield
            return
        # The hook calls module.forward itself for the extra predictions: forward skips the
        # module's hooks, so they cannot recurse, and the module is never reassigned.
        handle = module.register_forward_hook(self._guidance_hook(run, s), with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _unconditional(self, run) -> Optional[DenoiserText]:
        """The text of the unconditional prediction: the conditioning's own empty prompt, or the
        patch's (FLUX conditionings carry none)."""
        empty = getattr(run.positive, "empty", None)
        if empty is not None:
            return DenoiserText(empty, getattr(run.positive, "empty_pooled", None))
        if self.uncond_embeds is not None:
            return DenoiserText(self.uncond_embeds, self.uncond_pooled)
        return None

    def _guidance_hook(self, run, s: float):
        cfg = float(run.cfg)
        batched = cfg != 1.0 and (run.negative is not None or getattr(run.positive, "empty", None) is not None)
        n_train = int(getattr(run.scheduler.config, "num_train_timesteps", 1000) or 1000)
        concept = DenoiserText(self.concept_embeds, self.concept_pooled)
        empty = self._unconditional(run)

        def hook(module, args, kwargs, out):
            call = DenoiserCall(module, args, kwargs)
            if call.scheduler_timestep() > (1.0 - self.warmup) * n_train:
                return out
            pred = _prediction(out)
            if batched and call.family != "flux":
                half = pred.shape[0] // 2
                uncond, cond = pred[:half], pred[half:]
                e_s = _prediction(call.again(concept, slice(half, None)))
                return _with_prediction(out, torch.cat([uncond, cond - (s / cfg) * (e_s - uncond)]))
            if empty is None:
                return out
            e_s = _prediction(call.again(concept))
            e_u = _prediction(call.again(empty))
            return _with_prediction(out, pred - s * (e_s - e_u))

        return hook

    def to_state(self):
        return ({"concept_embeds": self.concept_embeds, **self._optional()},
                {"target": self.target, "strength": self.strength, "scale": self.scale,
                 "warmup": self.warmup, "meta": self.meta})

    @classmethod
    def from_state(cls, tensors, info):
        return cls(tensors["concept_embeds"], info["scale"], info.get("warmup", 0.0),
                   info.get("strength", 1.0), info.get("meta"), concept_pooled=tensors.get("concept_pooled"),
                   uncond_embeds=tensors.get("uncond_embeds"), uncond_pooled=tensors.get("uncond_pooled"))


def _stored(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.detach().to("cpu", torch.float32).contiguous()
