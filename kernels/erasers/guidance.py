"""Safe guidance: negative guidance away from a concept at inference, no weights changed.

After Schramowski et al., "Safe Latent Diffusion: Mitigating Inappropriate Degeneration in
Diffusion Models" (SLD): eps = eps_u + cfg (eps_c - eps_u) - s (eps_concept - eps_u), with the
noisiest part of the schedule left unguided (warm-up) so composition forms first. A baseline to
compare the erasers with; SLD's momentum and element-wise threshold are not used.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .patches import EraserPatch


def _prediction(out) -> torch.Tensor:
    """The noise prediction of a UNet output (a tuple when called with return_dict=False)."""
    return out[0] if isinstance(out, tuple) else out.sample


_UNET_ARGS = ("sample", "timestep", "encoder_hidden_states")


def _unet_call(args: tuple, kwargs: dict):
    """(sample, timestep, encoder_hidden_states, the other positional args, the other keyword
    args) of a call `unet(sample, timestep, encoder_hidden_states, ...)`, however it was spelled."""
    rest = list(args)
    named = [rest.pop(0) if rest else kwargs.get(name) for name in _UNET_ARGS]
    extra = {k: v for k, v in kwargs.items() if k not in _UNET_ARGS}
    return (*named, rest, extra)


def _with_prediction(out, pred: torch.Tensor):
    """`out` with its noise prediction replaced, in the same output type."""
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
                 strength: float = 1.0, meta: Optional[dict] = None):
        super().__init__(strength, meta)
        self.target = "unet"
        self.concept_embeds = concept_embeds.detach().to("cpu", torch.float32).contiguous()
        self.scale = float(scale)
        self.warmup = float(warmup)

    def content(self):
        return (self.scale, self.warmup, self.concept_embeds)

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

    def _guidance_hook(self, run, s: float):
        cfg = float(run.cfg)
        batched = cfg != 1.0 and (run.negative is not None or getattr(run.positive, "empty", None) is not None)
        n_train = int(getattr(run.scheduler.config, "num_train_timesteps", 1000) or 1000)
        concept = self.concept_embeds
        empty = getattr(run.positive, "empty", None)

        def hook(module, args, kwargs, out):
            sample, timestep, context, rest, extra = _unet_call(args, kwargs)

            def predict(x, t, text):
                return _prediction(module.forward(x, t, text.expand(x.shape[0], -1, -1), *rest, **extra))

            pred = _prediction(out)
            t = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
            if t > (1.0 - self.warmup) * n_train:
                return out
            c = concept.to(pred.device, context.dtype)
            if batched:
                half = pred.shape[0] // 2
                uncond, cond = pred[:half], pred[half:]
                per_sample = torch.is_tensor(timestep) and timestep.ndim and timestep.numel() > 1
                ts = timestep[half:] if per_sample else timestep
                e_s = predict(sample[half:], ts, c)
                return _with_prediction(out, torch.cat([uncond, cond - (s / cfg) * (e_s - uncond)]))
            if empty is None:
                return out
            e_s = predict(sample, timestep, c)
            e_u = predict(sample, timestep, empty.to(pred.device, context.dtype))
            return _with_prediction(out, pred - s * (e_s - e_u))

        return hook

    def to_state(self):
        return ({"concept_embeds": self.concept_embeds},
                {"target": self.target, "strength": self.strength, "scale": self.scale,
                 "warmup": self.warmup, "meta": self.meta})

    @classmethod
    def from_state(cls, tensors, info):
        return cls(tensors["concept_embeds"], info["scale"], info.get("warmup", 0.0),
                   info.get("strength", 1.0), info.get("meta"))
