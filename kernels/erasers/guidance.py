"""Safe guidance: negative guidance away from a concept at inference, no weights changed.

After Schramowski et al., "Safe Latent Diffusion: Mitigating Inappropriate Degeneration in
Diffusion Models" (SLD), as diffusers' StableDiffusionPipelineSafe computes it:
eps = eps_u + cfg (eps_c - eps_u - gamma), the safety term (`safety_term`, mode "sld")

    gamma = mu * (eps_concept - eps_u),  mu = min(1, s |eps_c - eps_concept|) element-wise, and
    mu = 0 wherever eps_c - eps_concept >= threshold (the prompt's prediction is not near the concept's),

plus momentum (`SafetyMomentum`): gamma += s_m nu, nu = beta nu + (1 - beta) gamma, built up from
the first step; the noisiest part of the schedule is left unguided (warm-up) so composition
forms first. Mode "uniform" (this node's version 2) is one scale everywhere:
gamma = (s / cfg) (eps_concept - eps_u), i.e. eps_u + cfg (eps_c - eps_u) - s (eps_concept - eps_u).

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


GUIDANCE_MODES = ("sld", "uniform")


def safety_term(e_c: torch.Tensor, e_u: torch.Tensor, e_s: torch.Tensor, *, mode: str, scale: float,
                threshold: float = 0.0, cfg: float = 1.0) -> torch.Tensor:
    """gamma, what the guidance takes from the conditional prediction before the sampler's CFG
    (eps = eps_u + cfg (eps_c - eps_u - gamma)); e_c, e_u, e_s: the prompt's, the unconditional
    and the concept's predictions. "sld": SLD's element-wise scale (its equations 4-6 as
    diffusers computes them); "uniform": (scale / cfg) (e_s - e_u) everywhere."""
    if mode == "uniform":
        return (scale / cfg) * (e_s - e_u)
    if mode != "sld":
        raise ValueError(f"safe guidance mode must be one of {GUIDANCE_MODES}, got {mode!r}")
    diff = e_c - e_s
    mu = torch.clamp(diff.abs() * scale, max=1.0)
    mu = torch.where(diff >= threshold, torch.zeros_like(mu), mu)
    return mu * (e_s - e_u)


class SafetyMomentum:
    """SLD's momentum over one sampling run (equations 7-8): each step's term gains
    `scale` times the running average nu, and nu = beta nu + (1 - beta) term."""

    def __init__(self, scale: float, beta: float):
        self.scale, self.beta = float(scale), float(beta)
        self.nu: Optional[torch.Tensor] = None

    def __call__(self, gamma: torch.Tensor) -> torch.Tensor:
        if self.scale == 0.0:
            return gamma
        if self.nu is None or self.nu.shape != gamma.shape:  # a new batch of images starts afresh
            self.nu = torch.zeros_like(gamma)
        gamma = gamma + self.scale * self.nu
        self.nu = self.beta * self.nu + (1.0 - self.beta) * gamma
        return gamma


def _with_prediction(out, pred: torch.Tensor):
    """`out` with its prediction replaced, in the same output type."""
    if isinstance(out, tuple):
        return (pred,) + tuple(out[1:])
    return type(out)(sample=pred)


class SafeGuidancePatch(EraserPatch):
    """Negative guidance away from a concept at inference (no weights change).

    While applied, a forward hook on the UNet rewrites its output: the conditional half of the
    CFG batch becomes eps_c - gamma (`safety_term`, with momentum), so the sampler's CFG gives
    eps_u + cfg (eps_c - eps_u - gamma); unbatched (cfg 1, or no negative) the prediction eps
    becomes eps - gamma, computed with cfg 1 against the empty prompt's prediction. `warmup`
    skips the noisiest part of the schedule (that fraction of the timestep range), as SLD's
    warm-up steps do; momentum still builds up there, as in diffusers' pipeline. Strength
    multiplies the term before momentum (the "uniform" mode's scale, as version 2 did).
    """

    kind = "safe-guidance"

    def __init__(self, concept_embeds: torch.Tensor, scale: float = 1.0, warmup: float = 0.0,
                 strength: float = 1.0, meta: Optional[dict] = None, *,
                 concept_pooled: Optional[torch.Tensor] = None, uncond_embeds: Optional[torch.Tensor] = None,
                 uncond_pooled: Optional[torch.Tensor] = None, mode: str = "uniform", threshold: float = 0.0,
                 momentum: float = 0.0, beta: float = 0.0):
        super().__init__(strength, meta)
        if mode not in GUIDANCE_MODES:
            raise ValueError(f"safe guidance mode must be one of {GUIDANCE_MODES}, got {mode!r}")
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"safe guidance momentum beta must be in [0, 1), got {beta}")
        self.target = "unet"
        self.concept_embeds = _stored(concept_embeds)
        self.scale = float(scale)
        self.warmup = float(warmup)
        self.mode, self.threshold = mode, float(threshold)
        self.momentum, self.beta = float(momentum), float(beta)
        # the families that take pooled text (SDXL, SD3, FLUX): the concept's pooled embedding;
        # FLUX, whose conditioning has no negative: the empty prompt's text
        self.concept_pooled = _stored(concept_pooled)
        self.uncond_embeds = _stored(uncond_embeds)
        self.uncond_pooled = _stored(uncond_pooled)

    def _optional(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in (("concept_pooled", self.concept_pooled), ("uncond_embeds", self.uncond_embeds),
                                  ("uncond_pooled", self.uncond_pooled)) if v is not None}

    def _sld(self) -> dict:
        """The settings version 2 did not have, when any differs from its behaviour (so its
        patches keep their cache keys and files)."""
        if self.mode == "uniform" and self.momentum == 0.0:
            return {}
        return {"mode": self.mode, "threshold": self.threshold, "momentum": self.momentum, "beta": self.beta}

    def content(self):
        extra = self._optional()
        sld = self._sld()
        return (self.scale, self.warmup, self.concept_embeds) + ((extra,) if extra else ()) + ((sld,) if sld else ())

    @contextlib.contextmanager
    def applied(self, module, run):
        s = self.scale * self.strength
        if s == 0.0 or run is None:
            yield
            return
        # The hook calls module.forward itself for the extra predictions: forward skips the
        # module's hooks, so they cannot recurse, and the module is never reassigned.
        handle = module.register_forward_hook(self._guidance_hook(run), with_kwargs=True)
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

    def _guidance_hook(self, run):
        cfg = float(run.cfg)
        batched = cfg != 1.0 and (run.negative is not None or getattr(run.positive, "empty", None) is not None)
        n_train = int(getattr(run.scheduler.config, "num_train_timesteps", 1000) or 1000)
        concept = DenoiserText(self.concept_embeds, self.concept_pooled)
        empty = self._unconditional(run)
        momentum = SafetyMomentum(self.momentum, self.beta)  # one per sampling run

        def term(e_c, e_u, e_s, cfg_used):
            if self.mode == "uniform":  # strength scales the scale, exactly as version 2 did
                return momentum(safety_term(e_c, e_u, e_s, mode="uniform", scale=self.scale * self.strength,
                                            cfg=cfg_used))
            gamma = safety_term(e_c, e_u, e_s, mode="sld", scale=self.scale, threshold=self.threshold, cfg=cfg_used)
            return momentum(self.strength * gamma)  # x 1.0 is exact: strength 1 is the plain term

        def hook(module, args, kwargs, out):
            call = DenoiserCall(module, args, kwargs)
            warming = call.scheduler_timestep() > (1.0 - self.warmup) * n_train
            if warming and self.momentum == 0.0:  # nothing to build up: skip the extra predictions
                return out
            pred = _prediction(out)
            if batched and call.family != "flux":
                half = pred.shape[0] // 2
                uncond, cond = pred[:half], pred[half:]
                e_s = _prediction(call.again(concept, slice(half, None)))
                gamma = term(cond, uncond, e_s, cfg)
                return out if warming else _with_prediction(out, torch.cat([uncond, cond - gamma]))
            if empty is None:
                return out
            e_s = _prediction(call.again(concept))
            e_u = _prediction(call.again(empty))
            gamma = term(pred, e_u, e_s, 1.0)
            return out if warming else _with_prediction(out, pred - gamma)

        return hook

    def to_state(self):
        return ({"concept_embeds": self.concept_embeds, **self._optional()},
                {"target": self.target, "strength": self.strength, "scale": self.scale,
                 "warmup": self.warmup, "meta": self.meta, **self._sld()})

    @classmethod
    def from_state(cls, tensors, info):
        return cls(tensors["concept_embeds"], info["scale"], info.get("warmup", 0.0),
                   info.get("strength", 1.0), info.get("meta"), concept_pooled=tensors.get("concept_pooled"),
                   uncond_embeds=tensors.get("uncond_embeds"), uncond_pooled=tensors.get("uncond_pooled"),
                   mode=info.get("mode", "uniform"), threshold=info.get("threshold", 0.0),
                   momentum=info.get("momentum", 0.0), beta=info.get("beta", 0.0))


def _stored(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.detach().to("cpu", torch.float32).contiguous()
