"""One denoiser call for every model family, and the text it takes.

Tools that call the denoiser themselves (the erasers' training, probing and guidance) see every
family through one function, `Denoiser.predict(x, t, text)`: x is a (B, C, H, W) sample in the
graph's own latent space, t a timestep in the scheduler's units (scalar or one per sample), and
`text` a `DenoiserText` (the sequence (B, L, D) and, for the families that take one, the pooled
embedding (B, P)). The prediction comes back in x's space. How each family is called:

- UNet (SD 1.x/2.x): `unet(x, t, encoder_hidden_states=embeds)`;
- SDXL UNet: also `added_cond_kwargs`, the pooled text and the time ids for x's size
  (`kernels.sdxl.add_time_ids`, as StableDiffusionXLPipeline builds them; a refiner's rows all
  take the positive aesthetic score);
- MM-DiT (SD3): `kernels.sampling.predict_mmdit_cfg` unguided (hidden_states, timestep per
  sample, the joint text sequence and the pooled projections);
- FLUX: as FluxPipeline calls it: the latent packed into 2x2 patches, image and text position
  ids, timestep / 1000, the guidance embedding (a "dev" model; `Denoiser.guidance`), unpacked.

`DenoiserCall` reads a call that someone else made (a forward hook's args and kwargs) by
argument name, however the family spells it, and makes it again with other rows or text.

`encode_prompts` / `encode_unconditional` give the text of a CLIP bundle as its family feeds
the denoiser, built on `kernels.text.encode_text` (SD 1.x keeps its one-batch encoding).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence, Union

import torch

FAMILIES = ("unet", "sdxl", "mmdit", "flux")
# FLUX transformers name no sample size in their config: the erasers train and probe them at
# 64 latent pixels (512 px at FLUX's VAE factor 8).
FLUX_SAMPLE_SIZE = 64
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance scale, for a "dev" model's guidance input
SDXL_VAE_SCALE_FACTOR = 8  # when a bare SDXL UNet is given without its MODEL bundle


@dataclass(frozen=True)
class DenoiserText:
    """The text a denoiser takes for a batch: the sequence (B, L, D) and the pooled embedding
    (B, P) of the families that take one (SDXL, SD3, FLUX), else None. Rows index, expand and
    move like a tensor's, so batches of text are drawn the way the embeddings alone were."""

    embeds: torch.Tensor
    pooled: Optional[torch.Tensor] = None

    @property
    def shape(self) -> torch.Size:
        return self.embeds.shape

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeds.dtype

    def __getitem__(self, rows) -> "DenoiserText":
        return DenoiserText(self.embeds[rows], None if self.pooled is None else self.pooled[rows])

    def expand(self, n: int, *_rest) -> "DenoiserText":
        """n rows (the text has one): `embeds.expand(n, -1, -1)`; extra arguments, as a tensor's
        `expand(n, -1, -1)` takes them, are ignored."""
        return DenoiserText(self.embeds.expand(n, -1, -1),
                            None if self.pooled is None else self.pooled.expand(n, -1))

    def to(self, *args, **kwargs) -> "DenoiserText":
        return DenoiserText(self.embeds.to(*args, **kwargs),
                            None if self.pooled is None else self.pooled.to(*args, **kwargs))

    def detach(self) -> "DenoiserText":
        return DenoiserText(self.embeds.detach(), None if self.pooled is None else self.pooled.detach())


TextLike = Union[torch.Tensor, DenoiserText]


def as_text(text: TextLike) -> DenoiserText:
    return text if isinstance(text, DenoiserText) else DenoiserText(text)


def cat_text(texts: Sequence[TextLike]) -> TextLike:
    """Rows of several texts in one batch (tensors stay a tensor)."""
    if all(torch.is_tensor(t) for t in texts):
        return torch.cat(list(texts))
    texts = [as_text(t) for t in texts]
    pooled = [t.pooled for t in texts]
    if any(p is None for p in pooled) and not all(p is None for p in pooled):
        raise ValueError("cannot batch text with and without pooled embeddings")
    return DenoiserText(torch.cat([t.embeds for t in texts]),
                        None if pooled[0] is None else torch.cat(pooled))


def family_of(module) -> str:
    """Which of FAMILIES a denoiser module is."""
    from kernels.flux import is_flux_transformer
    from kernels.sampling import takes_pooled_projections

    if is_flux_transformer(module):
        return "flux"
    if takes_pooled_projections(module):
        return "mmdit"
    if getattr(getattr(module, "config", None), "addition_embed_type", None) == "text_time":
        return "sdxl"
    return "unet"


@dataclass(frozen=True)
class Denoiser:
    """A denoiser module and what its family's call needs besides x, t and the text: SDXL's VAE
    factor (time ids are in pixels) and aesthetic-score flag; a FLUX "dev" model's guidance."""

    module: Any
    family: str
    vae_scale_factor: int = SDXL_VAE_SCALE_FACTOR
    requires_aesthetics_score: bool = False
    guidance: float = FLUX_GUIDANCE

    @classmethod
    def of(cls, model) -> "Denoiser":
        """The denoiser of a MODEL bundle (kernels.models), or of a bare denoiser module."""
        if isinstance(model, Denoiser):
            return model
        module = getattr(model, "unet", model) if not isinstance(model, torch.nn.Module) else model
        return cls(module, family_of(module),
                   int(getattr(model, "vae_scale_factor", SDXL_VAE_SCALE_FACTOR)),
                   bool(getattr(model, "requires_aesthetics_score", False)))

    def on(self, module) -> "Denoiser":
        """The same family's call on another module (a trained copy)."""
        return replace(self, module=module)

    def with_guidance(self, guidance: float) -> "Denoiser":
        return replace(self, guidance=float(guidance))

    @property
    def takes_negative(self) -> bool:
        """Whether the family guides with a negative batch (FLUX takes its guidance as an input)."""
        return self.family != "flux"

    def sample_shape(self) -> tuple:
        """(C, H, W) of one sample at the denoiser's native size, in the graph's latent space."""
        from kernels.flux import latent_channels_of
        from kernels.sampling import latent_sample_shape

        if self.family != "flux":
            return latent_sample_shape(self.module)
        return (latent_channels_of(self.module), FLUX_SAMPLE_SIZE, FLUX_SAMPLE_SIZE)

    def noise(self, seeds) -> torch.Tensor:
        """One unit-noise sample per seed at the native size (kernels.sampling.seed_noise)."""
        from kernels.sampling import seed_noise

        if self.family != "flux":
            return seed_noise(self.module, seeds)
        shape = self.sample_shape()
        return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)))
                            for s in seeds])

    def set_timesteps(self, scheduler, steps: int) -> torch.Tensor:
        """The schedule of a `steps`-step run at the native size, set on `scheduler` as the
        family's pipeline sets it (FLUX shifts it by the image token count)."""
        if self.family == "flux":
            from kernels.flux import flux_timesteps

            _c, h, w = self.sample_shape()
            return flux_timesteps(scheduler, steps, (h // 2) * (w // 2), 1.0)
        scheduler.set_timesteps(steps)
        return scheduler.timesteps

    def predict(self, x: torch.Tensor, t, text: TextLike) -> torch.Tensor:
        """The denoiser's prediction at (x, t) for `text`, no guidance, in x's (B, C, H, W) space."""
        if self.family == "unet":
            embeds = text.embeds if isinstance(text, DenoiserText) else text
            out = self.module(x, t, encoder_hidden_states=embeds)
            return getattr(out, "sample", out)  # (a UNet-like callable may return the tensor)
        text = as_text(text)
        if text.pooled is None:
            raise ValueError(f"a {self.family.upper()} denoiser needs pooled text embeddings: encode "
                             f"the prompts with this model's own text encoders")
        if self.family == "sdxl":
            return self.module(x, t, encoder_hidden_states=text.embeds,
                               added_cond_kwargs=self.added_cond_kwargs(x, text.pooled)).sample
        if self.family == "mmdit":
            from kernels.sampling import predict_mmdit_cfg

            return predict_mmdit_cfg(self.module, x, t, text.embeds, None, text.pooled, None, 1.0)
        return self._predict_flux(x, t, text)

    def added_cond_kwargs(self, x: torch.Tensor, pooled: torch.Tensor) -> dict:
        """SDXL's pooled text and time ids (one row per text row) for samples of x's size."""
        from kernels.sdxl import add_time_ids

        size = (int(x.shape[-2]) * self.vae_scale_factor, int(x.shape[-1]) * self.vae_scale_factor)
        time_ids, _negative = add_time_ids(self.module, size, pooled.dtype, pooled.shape[-1],
                                           self.requires_aesthetics_score)
        return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device).expand(pooled.shape[0], -1)}

    def _predict_flux(self, x: torch.Tensor, t, text: DenoiserText) -> torch.Tensor:
        from kernels.flux import flux_forward

        return flux_forward(self.module, x, t, text.embeds, text.pooled, self.guidance)

    def guided(self, x: torch.Tensor, t, cond: TextLike, uncond: TextLike, cfg: float) -> torch.Tensor:
        """What a sampler at guidance `cfg` predicts: CFG over one [uncond, cond] batch, as the
        Sampler batches it; FLUX has no negative batch and takes `cfg` as its guidance input."""
        from kernels.sampling import cfg_mix

        if not self.takes_negative:
            return self.with_guidance(cfg).predict(x, t, cond)
        e_u, e_c = self.predict(torch.cat([x, x]), t, cat_text([uncond, cond])).chunk(2)
        return cfg_mix(e_u, e_c, cfg)


def as_denoiser(unet) -> Denoiser:
    return Denoiser.of(unet)


def predict(unet, x: torch.Tensor, t, text: TextLike) -> torch.Tensor:
    """`Denoiser.of(unet).predict(x, t, text)`: one call of any family's denoiser (a MODEL
    bundle, a Denoiser or a bare module)."""
    return as_denoiser(unet).predict(x, t, text)


# -- a call someone else made ------------------------------------------------------------------
# (sample, text sequence, pooled text) argument names of each family's forward; SDXL's pooled
# text is added_cond_kwargs["text_embeds"].
_SPELLING = {"unet": ("sample", "encoder_hidden_states", None),
             "sdxl": ("sample", "encoder_hidden_states", "added_cond_kwargs"),
             "mmdit": ("hidden_states", "encoder_hidden_states", "pooled_projections"),
             "flux": ("hidden_states", "encoder_hidden_states", "pooled_projections")}


class DenoiserCall:
    """One forward call of a denoiser, by argument name (from a forward hook's args and kwargs),
    that can be made again on some of its rows with other text."""

    def __init__(self, module, args: tuple, kwargs: dict):
        self.module = module
        self.family = family_of(module)
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        self.arguments = dict(bound.arguments)
        self._sample, self._text, self._pooled = _SPELLING[self.family]

    @property
    def sample(self) -> torch.Tensor:
        """The sample as the denoiser takes it (FLUX: packed)."""
        return self.arguments[self._sample]

    @property
    def text_dtype(self) -> torch.dtype:
        return self.arguments[self._text].dtype

    @property
    def rows(self) -> int:
        return int(self.sample.shape[0])

    def scheduler_timestep(self) -> float:
        """The call's (first) timestep in the scheduler's units (FLUX is called with t / 1000)."""
        t = self.arguments.get("timestep")
        t = float(t.reshape(-1)[0]) if torch.is_tensor(t) else float(t)
        return t * 1000 if self.family == "flux" else t

    def again(self, text: DenoiserText, rows: Optional[slice] = None):
        """The forward's output for the rows `rows` (all: None) with `text` (one row, or one per
        row) in place of the call's text; every other argument as it was, on those rows."""
        args = dict(self.arguments)
        n = self.rows
        if rows is not None:
            for name, value in self.arguments.items():
                if name in ("timestep", "guidance", self._sample, self._pooled) and torch.is_tensor(value) \
                        and value.ndim and value.shape[0] == n:
                    args[name] = value[rows]
            if self.family == "sdxl" and args.get("added_cond_kwargs"):
                args["added_cond_kwargs"] = {k: v[rows] for k, v in args["added_cond_kwargs"].items()}
        m = int(args[self._sample].shape[0])
        dtype = self.text_dtype
        device = args[self._sample].device
        args[self._text] = text.embeds.to(device, dtype).expand(m, -1, -1)
        if self._pooled is not None:
            if text.pooled is None:
                raise ValueError(f"a {self.family.upper()} denoiser needs pooled text embeddings")
            pooled = text.pooled.to(device, dtype).expand(m, -1)
            if self.family == "sdxl":
                args["added_cond_kwargs"] = {**(args.get("added_cond_kwargs") or {}), "text_embeds": pooled}
            else:
                args[self._pooled] = pooled
        return self.module.forward(**args)


# -- the text of a CLIP bundle, as its family feeds the denoiser -------------------------------
def _is_single_clip(text_encoder) -> bool:
    from kernels.text import TextEncoderSet

    return not isinstance(text_encoder, TextEncoderSet)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]) -> DenoiserText:
    """The denoiser's text (B, L, D) (+ pooled (B, P)) for each prompt, as the sampler sees a
    TextEncode of it. SD 1.x/2.x: one padded batch through the CLIP; the other families one
    `kernels.text.encode_text` per prompt, rows stacked."""
    prompts = list(prompts)
    if _is_single_clip(text_encoder):
        from kernels.text import tokenize

        ids = tokenize(tokenizer, prompts).input_ids.to(text_encoder.device)
        return DenoiserText(text_encoder(ids).last_hidden_state)
    from kernels.text import encode_text

    conds = [encode_text(tokenizer, text_encoder, p) for p in prompts]
    return DenoiserText(torch.cat([c.embeds for c in conds]),
                        None if conds[0].pooled is None else torch.cat([c.pooled for c in conds]))


@torch.no_grad()
def encode_unconditional(tokenizer, text_encoder) -> DenoiserText:
    """The text of the unconditional prediction, one row: what the Sampler guides with when no
    negative is given (SDXL: its zeros, SD3: the encoding of ""), and for SD 1.x and FLUX (which
    has no negative) the empty prompt."""
    if _is_single_clip(text_encoder):
        return encode_prompts(tokenizer, text_encoder, [""])
    from kernels.text import encode_text

    cond = encode_text(tokenizer, text_encoder, "")
    if cond.empty is None:
        return DenoiserText(cond.embeds, cond.pooled)
    return DenoiserText(cond.empty, cond.empty_pooled)
