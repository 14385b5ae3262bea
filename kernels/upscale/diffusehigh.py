"""DiffuseHigh: training-free progressive upscaling with structural guidance from the image itself.

For each stage of a progressive schedule (2x, 3x, ... up to the target scale, as the paper goes
1024 -> 2048 -> 3072 -> 4096):
1. upsample the current image (bicubic) and sharpen it with an unsharp mask,
   `x' = (1 + a) x - a blur(x)`;
2. take the low-frequency band LL of its level-1 discrete wavelet transform: the guidance;
3. encode x' and re-noise it to `denoise` of the schedule (the paper: the last 15 of 50 steps);
4. denoise it; for the first `guidance_end` of those steps, the predicted clean sample x0 is
   decoded, its LL band replaced by the guidance band (its high frequencies kept), and encoded
   again before the scheduler steps with it (the paper: 5 of the 15 steps).

The replacement is a change of the model output: the edited x0' is turned back into the
prediction type the scheduler reads (epsilon, v, sample; flow matching's velocity) at the same
x_t, so any scheduler of kernels.sampling takes the guided step (`edit_prediction` of
`kernels.sampling.sample`). The paper's own step is the Euler step it makes from x0'.

Differences from the paper, on purpose: the DWT is Haar, not db4, written out here in torch
(no wavelet library is a dependency; Haar is exact, orthonormal and a few lines, and on a
pixel-space model its LL band is exactly the 2x2 block means up to a factor 2); the unsharp mask's
blur sigma is a fixed parameter (the reference draws it at random each call), so a run is
deterministic.

Sources checked: the DiffuseHigh paper's abstract and the authors' SDXL pipeline
(github.com/yhyun225/DiffuseHigh, pipeline_diffusehigh_sdxl.py: sharpening, LL replacement on
the decoded x0 for the first dwt_steps, progressive targets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

# Defaults, shared with the node (nodes/resolution.py keeps the same constants).
DEFAULT_DENOISE = 0.3        # 15 of 50 steps
DEFAULT_GUIDANCE_END = 1 / 3  # 5 of those 15 steps
DEFAULT_SHARPNESS = 1.0      # the paper's alpha
DEFAULT_BLUR_SIGMA = 1.0     # within the paper's random range (0.1, 2.0)
BLUR_KERNEL = 3

EditFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (latent, edit_prediction or None) -> the denoised latent, at the latent's size
SampleFn = Callable[[torch.Tensor, Optional[EditFn]], torch.Tensor]


class DiffuseHighError(ValueError):
    """A size or setting DiffuseHigh cannot work with; the message says which."""


# -- the Haar wavelet ---------------------------------------------------------------------------
def haar_dwt(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Level-1 orthonormal Haar DWT of (..., H, W) with H, W even: (LL, LH, HL, HH), each half size."""
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        raise DiffuseHighError(f"the Haar DWT needs an even width and height, got {x.shape[-1]}x{x.shape[-2]}")
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return (a + b + c + d) / 2, (a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2


def haar_idwt(ll: torch.Tensor, lh: torch.Tensor, hl: torch.Tensor, hh: torch.Tensor) -> torch.Tensor:
    """The inverse of `haar_dwt`."""
    out = ll.new_empty((*ll.shape[:-2], ll.shape[-2] * 2, ll.shape[-1] * 2))
    out[..., 0::2, 0::2] = (ll + lh + hl + hh) / 2
    out[..., 0::2, 1::2] = (ll - lh + hl - hh) / 2
    out[..., 1::2, 0::2] = (ll + lh - hl - hh) / 2
    out[..., 1::2, 1::2] = (ll - lh - hl + hh) / 2
    return out


def with_low_band(x: torch.Tensor, ll: torch.Tensor) -> torch.Tensor:
    """`x` with its Haar LL band replaced by `ll` (its three detail bands kept)."""
    _, lh, hl, hh = haar_dwt(x)
    return haar_idwt(ll.to(x.device, x.dtype), lh, hl, hh)


def sharpen(x: torch.Tensor, amount: float = DEFAULT_SHARPNESS, sigma: float = DEFAULT_BLUR_SIGMA) -> torch.Tensor:
    """Unsharp mask `(1 + amount) x - amount * gaussian_blur(x)` of NCHW images; 0 is the identity."""
    if amount == 0:
        return x
    from torchvision.transforms.functional import gaussian_blur

    return (1 + amount) * x - amount * gaussian_blur(x, [BLUR_KERNEL, BLUR_KERNEL], [sigma, sigma])


# -- x0 <-> model output ------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictionSpace:
    """Converts a model output to the clean sample it implies at x_t and back, for a model's
    scheduler config: DDPM-family (epsilon, v_prediction, sample) or flow matching (velocity)."""

    prediction_type: str
    alphas_cumprod: Optional[torch.Tensor]  # DDPM family
    num_train_timesteps: int

    @classmethod
    def of(cls, scheduler_config: dict) -> "PredictionSpace":
        from kernels.sampling import is_flow_config

        config = dict(scheduler_config)
        n_train = int(config.get("num_train_timesteps", 1000))
        if is_flow_config(config):
            return cls("flow", None, n_train)
        from diffusers import DDPMScheduler

        kind = config.get("prediction_type", "epsilon")
        if kind not in ("epsilon", "v_prediction", "sample"):
            raise DiffuseHighError(f"prediction type {kind!r} is not one DiffuseHigh can guide")
        known = {k: v for k, v in config.items() if not k.startswith("_")}
        sched = DDPMScheduler.from_config(known)  # every DDPM-family scheduler has these alphas
        return cls(kind, sched.alphas_cumprod.double(), n_train)

    def _coefficients(self, t) -> tuple[float, float]:
        """(sqrt(abar), sqrt(1 - abar)) at a timestep, fractional timesteps by interpolating
        sigma as the Euler schedulers do; for flow matching (1 - s, s)."""
        t = float(torch.as_tensor(t).flatten()[0])
        if self.prediction_type == "flow":
            s = t / self.num_train_timesteps
            return 1.0 - s, s
        acp = self.alphas_cumprod
        sigmas = ((1 - acp) / acp).sqrt()
        lo = min(max(int(math.floor(t)), 0), len(acp) - 1)
        hi = min(lo + 1, len(acp) - 1)
        sigma = float(sigmas[lo] + (t - lo) * (sigmas[hi] - sigmas[lo]))
        abar = 1.0 / (1.0 + sigma * sigma)
        return math.sqrt(abar), math.sqrt(1.0 - abar)

    def x0(self, x_t: torch.Tensor, t, pred: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(t)
        if self.prediction_type == "flow":
            return x_t - s * pred
        if self.prediction_type == "epsilon":
            return (x_t - s * pred) / a
        if self.prediction_type == "v_prediction":
            return a * x_t - s * pred
        return pred

    def prediction(self, x_t: torch.Tensor, t, x0: torch.Tensor) -> torch.Tensor:
        """The model output that implies `x0` at x_t (its noise estimate re-derived from x0)."""
        a, s = self._coefficients(t)
        if self.prediction_type == "sample":
            return x0
        if s <= 0:
            raise DiffuseHighError("cannot guide a step at noise level 0")
        if self.prediction_type == "flow":
            return (x_t - x0) / s
        eps = (x_t - a * x0) / s
        if self.prediction_type == "epsilon":
            return eps
        return a * eps - s * x0


def low_band_guidance(space: PredictionSpace, guidance_ll: torch.Tensor, encode, decode,
                      steps_guided: Callable[[int], bool], record: Optional[list] = None) -> EditFn:
    """The `edit_prediction` of a guided stage: at the steps `steps_guided` accepts, x0 is decoded,
    given the guidance's LL band, encoded, and turned back into a model output."""

    def edit(i: int, t, x_in: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        if not steps_guided(i):
            return pred
        x0 = space.x0(x_in.float(), t, pred.float())
        image = with_low_band(decode(x0).float(), guidance_ll)
        x0_guided = encode(image).float()
        if record is not None:
            record.append(x0_guided)
        return space.prediction(x_in.float(), t, x0_guided).to(pred.dtype)

    return edit


# -- the progressive upscale --------------------------------------------------------------------
def stage_scales(scale: float) -> list[float]:
    """The paper's progression: every whole multiple from 2 up to `scale`, then `scale` itself."""
    if scale <= 1:
        raise DiffuseHighError(f"scale must be larger than 1, got {scale}")
    stages = [float(k) for k in range(2, int(math.floor(scale)) + 1)]
    if not stages or stages[-1] != scale:
        stages.append(float(scale))
    return stages


def stage_size(height: int, width: int, factor: float, multiple: int) -> tuple[int, int]:
    """(h, w) of a stage, rounded to `multiple` (the VAE's size multiple and the DWT's 2)."""
    return tuple(max(multiple, round(side * factor / multiple) * multiple) for side in (height, width))


def size_multiple(vae_multiple: int) -> int:
    return math.lcm(2, int(vae_multiple))


def diffusehigh(image: torch.Tensor, encode, decode, sample_fn: SampleFn, space: PredictionSpace, *,
                scale: float, run_steps: int, guidance_end: float = DEFAULT_GUIDANCE_END,
                sharpness: float = DEFAULT_SHARPNESS, blur_sigma: float = DEFAULT_BLUR_SIGMA,
                vae_multiple: int = 1, stages: Optional[Sequence[float]] = None,
                progress: Optional[Callable[[int, int], None]] = None,
                record: Optional[list] = None) -> torch.Tensor:
    """Upscale NCHW images in -1..1 by `scale` through DiffuseHigh's stages; returns the last
    stage's latent. `encode`/`decode` map images <-> latents; `sample_fn(latent, edit)` re-noises
    the latent and denoises it in `run_steps` steps (the last part of the caller's schedule),
    calling `edit` on each step's model output. `guidance_end` is the fraction of those steps that
    are guided (0: none, a plain progressive img2img). `record` collects each guided x0' (tests)."""
    height, width = image.shape[-2:]
    multiple = size_multiple(vae_multiple)
    factors = list(stages) if stages is not None else stage_scales(scale)
    latent = None
    for k, factor in enumerate(factors):
        h, w = stage_size(height, width, factor, multiple)
        up = F.interpolate(image.float(), size=(h, w), mode="bicubic", align_corners=False)
        up = sharpen(up, sharpness, blur_sigma)
        guidance_ll = haar_dwt(up)[0]
        latent = encode(up).float()

        def guided(i: int) -> bool:
            return i < guidance_end * run_steps

        edit = low_band_guidance(space, guidance_ll, encode, decode, guided, record) if guidance_end > 0 else None
        latent = sample_fn(latent, edit)
        if k + 1 < len(factors):
            image = decode(latent).float().clamp(-1, 1)
        if progress is not None:
            progress(k + 1, len(factors))
    return latent
