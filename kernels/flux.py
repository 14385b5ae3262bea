"""FLUX.1 (FluxPipeline folders): loading, text encoding and the sampling loop.

MODEL's `unet` is the FluxTransformer2DModel. CLIP holds CLIP-L (only its pooled output is used)
and T5 (whose sequence is the text the transformer attends to): FluxTextEncoders and
FluxTokenizers. The VAE is an ordinary VaeBundle: its encode/decode already apply the
`shift_factor` FLUX's VAE config carries.

Graph latents stay (B, 16, H/8, W/8) like every other model's; only `flux_forward`, the one
transformer call, packs them into 2x2 patches (FLUX's image tokens) and unpacks its prediction,
with diffusers' own helpers.
FLUX dev/schnell have no negative prompt: "dev" takes the guidance scale as an input of the
transformer (the Sampler's cfg), "schnell" takes none; neither runs a second, unconditional
batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from kernels.text import Conditioning, TextEncoderSet, word_positions

FLUX_PIPELINES = {"FluxPipeline"}
DEFAULT_DEV_GUIDANCE = 3.5  # FluxPipeline's guidance_scale default
FLUX_COMPONENTS = {"transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                   "scheduler", "vae"}
MAX_T5_LENGTH = 512  # FluxPipeline's default and its upper bound


def is_flux_transformer(denoiser) -> bool:
    from diffusers import FluxTransformer2DModel

    return isinstance(denoiser, FluxTransformer2DModel)


def latent_channels_of(denoiser) -> int:
    """The latent channels a denoiser takes: its `in_channels`, but a FLUX transformer's count
    the four pixels of each 2x2 patch."""
    channels = int(denoiser.config.in_channels)
    return channels // 4 if is_flux_transformer(denoiser) else channels


class FluxTextEncoders(TextEncoderSet):
    """The text encoders of a FLUX folder as one module (the CLIP bundle's encoder): CLIP-L
    (CLIPTextModel) and T5 (T5EncoderModel)."""

    def __init__(self, text_encoder, text_encoder_2):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2


@dataclass(frozen=True)
class FluxTokenizers:
    """The CLIP bundle's tokenizer for FLUX: CLIP-L's, T5's, and the T5 length (the pipeline's
    512, or less when the tokenizer is shorter)."""

    tokenizer: Any
    tokenizer_2: Any
    max_sequence_length: int = MAX_T5_LENGTH


def load_flux_folder(path: str, index: dict, dtype: torch.dtype, device: str):
    """A FLUX folder: the transformer as MODEL, CLIP-L + T5 as CLIP, the 16-channel VAE."""
    from kernels.models import (
        ModelBundle,
        ModelLoadError,
        TextEncoderBundle,
        build_vae_bundle,
        check_components,
        load_components,
        model_folder_key,
        read_scheduler_config,
    )

    check_components(path, index, FLUX_COMPONENTS, "a FLUX folder has transformer, vae, "
                      "scheduler, text_encoder(_2) and tokenizer(_2)")
    load_key = model_folder_key(path, dtype, device)
    parts = load_components(path, index, sorted(FLUX_COMPONENTS - {"scheduler"}), dtype, device)
    for required in sorted(FLUX_COMPONENTS - {"scheduler"}):
        if required not in parts:
            raise ModelLoadError(f"{path}: model_index.json has no {required!r} component")
    transformer = parts["transformer"]
    t5_tok = parts["tokenizer_2"]
    tokenizers = FluxTokenizers(parts["tokenizer"], t5_tok, min(MAX_T5_LENGTH, int(t5_tok.model_max_length)))
    encoders = FluxTextEncoders(parts["text_encoder"], parts["text_encoder_2"])
    return (ModelBundle(transformer, read_scheduler_config(path), path, load_key),
            TextEncoderBundle(tokenizers, encoders, path, load_key),
            build_vae_bundle(parts["vae"], path, load_key, 3, patch_size=2))  # 2x2 packed latents


def _flux_text_pipeline(tok: FluxTokenizers, enc: FluxTextEncoders):
    """A FluxPipeline holding only the text side, for its encode_prompt."""
    from diffusers import FluxPipeline

    return FluxPipeline(scheduler=None, vae=None, transformer=None, text_encoder=enc.text_encoder,
                        tokenizer=tok.tokenizer, text_encoder_2=enc.text_encoder_2,
                        tokenizer_2=tok.tokenizer_2)


@torch.no_grad()
def encode_flux(tok: FluxTokenizers, enc: FluxTextEncoders, prompt: str) -> Conditioning:
    """FLUX's text: T5's sequence and CLIP-L's pooled output (diffusers' encode_prompt), with the
    word map over the T5 tokens. `empty` stays None: FLUX samples without a negative prompt."""
    pipe = _flux_text_pipeline(tok, enc)
    embeds, pooled, _text_ids = pipe.encode_prompt(prompt, None, device=enc.device,
                                                   max_sequence_length=tok.max_sequence_length)
    return Conditioning(embeds=embeds.clone(), prompt=" ".join(prompt.split()),
                        words=word_positions(tok.tokenizer_2, prompt, tok.max_sequence_length),
                        pooled=pooled.clone())


def flux_timesteps(scheduler, steps: int, image_seq_len: int, denoise: float, device=None) -> torch.Tensor:
    """FluxPipeline's schedule: sigmas 1 .. 1/steps, shifted by `mu` from the image token count
    (when the scheduler shifts dynamically); the last `denoise` fraction of it, as
    FluxImg2ImgPipeline keeps."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    config = scheduler.config
    sigmas = np.linspace(1.0, 1 / steps, steps)
    if getattr(config, "use_flow_sigmas", False):
        sigmas = None
    mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                         config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                         config.get("max_shift", 1.15))
    timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
    start = 0
    if denoise < 1.0:
        start = int(max(steps - min(steps * denoise, steps), 0)) * scheduler.order
        timesteps = timesteps[start:]
    scheduler.set_begin_index(start)
    return timesteps


@torch.no_grad()
def sample_flux(transformer, scheduler, positive: torch.Tensor, negative: Optional[torch.Tensor],
                noise: torch.Tensor, steps: int, cfg: float, generator: Optional[torch.Generator] = None,
                denoise: float = 1.0, init: Optional[torch.Tensor] = None,
                progress: Optional[Callable] = None, unet_kwargs: Optional[dict] = None,
                before_step: Optional[Callable] = None, pooled: Optional[tuple] = None,
                guidance: Optional[float] = None, text_at: Optional[Callable] = None) -> torch.Tensor:
    """Denoise `noise` (B, C, H, W) as FluxPipeline.__call__ does; kernels.sampling.sample's
    arguments. Without a `negative`, `cfg` is the guidance a guidance-distilled ("dev")
    transformer takes. With one (and its pooled embedding in `pooled[1]`), `cfg` is the pipeline's
    `true_cfg_scale`: a second call per step on the negative, mixed as classifier-free guidance,
    while the distilled guidance is `guidance` (FluxPipeline's default 3.5 when None).
    `text_at(i, n)`: a prompt schedule's kernels.sampling.StepText for step i, or None.
    Returns the (B, C, H, W) latent."""
    from kernels.sampling import noised_start

    if pooled is None or pooled[0] is None:
        raise ValueError("FLUX needs CLIP's pooled text embedding: encode the prompt with this "
                         "model's own text encoders")
    true_cfg = negative is not None and cfg > 1.0
    if true_cfg and pooled[1] is None:
        raise ValueError("true guidance on FLUX needs the negative's pooled embedding: encode the "
                         "negative prompt with this model's own text encoders")
    if guidance is None:
        guidance = DEFAULT_DEV_GUIDANCE if negative is not None else cfg
    b = noise.shape[0]
    timesteps = flux_timesteps(scheduler, steps, image_tokens(noise), denoise, device=noise.device)
    # The loop runs on unpacked latents: the flow-match step is elementwise, so stepping them is
    # bit-identical to the pipeline's stepping of the packed tokens.
    x = noised_start(scheduler, noise, timesteps, init)
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        if before_step is not None:
            with torch.enable_grad():
                x = before_step(i, t, x).detach()
        pos, neg, pooled_i, kwargs = positive, negative, pooled, unet_kwargs
        scheduled = text_at(i, n) if text_at is not None else None
        if scheduled is not None:
            text = scheduled.per_image(b)
            pos, neg, pooled_i, kwargs = text.positive, text.negative, text.pooled, text.unet_kwargs
        pred = flux_forward(transformer, x, t, pos, pooled_i[0], guidance, kwargs)
        if true_cfg:  # two calls, not one batch of two, as the pipeline makes them
            uncond = flux_forward(transformer, x, t, neg.expand(b, -1, -1), pooled_i[1].expand(b, -1),
                                  guidance, kwargs)
            pred = uncond + cfg * (pred - uncond)
        x = scheduler.step(pred, t, x, return_dict=False)[0]
        if progress is not None:
            progress(i + 1, n, x)
    return x


def image_tokens(latent: torch.Tensor) -> int:
    """How many 2x2-patch image tokens a (B, C, H, W) latent packs into."""
    h, w = latent.shape[-2:]
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs the latent in 2x2 patches: its size ({h}x{w}) must be even; "
                         f"make the image size a multiple of 2x the VAE's factor")
    return (h // 2) * (w // 2)


def flux_forward(transformer, x: torch.Tensor, t, embeds: torch.Tensor, pooled: torch.Tensor,
                 guidance: Optional[float], kwargs: Optional[dict] = None) -> torch.Tensor:
    """One transformer call on an unpacked (B, C, H, W) latent, as FluxPipeline makes it: the
    latent packed into 2x2 patches with diffusers' helpers, its position ids, the timestep over
    1000, the distilled `guidance` (ignored by transformers without a guidance embedding);
    returns the unpacked prediction."""
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    image_tokens(x)
    dtype, device = embeds.dtype, x.device
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
    txt_ids = torch.zeros(embeds.shape[1], 3).to(device=device, dtype=dtype)
    guidance_embed = None
    if transformer.config.guidance_embeds:
        guidance_embed = torch.full([1], guidance, device=device, dtype=torch.float32).expand(b)
    t = torch.as_tensor(t, device=device).expand(b).to(x.dtype) / 1000
    pred = transformer(hidden_states=FluxPipeline._pack_latents(x, b, c, h, w), timestep=t,
                       guidance=guidance_embed, pooled_projections=pooled, encoder_hidden_states=embeds,
                       txt_ids=txt_ids, img_ids=img_ids, return_dict=False, **(kwargs or {}))[0]
    return FluxPipeline._unpack_latents(pred, h, w, 1)
