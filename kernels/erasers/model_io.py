"""The two model calls every eraser makes: text embeddings of padded prompts, and the
denoiser's prediction (any family: kernels.denoiser)."""

from __future__ import annotations

from typing import Sequence

import torch

from kernels.denoiser import TextLike, predict
from kernels.text import tokenize


@torch.no_grad()
def encode_embeds(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """Final hidden states (B, L, D) of padded prompts through one CLIP, as the sampler sees
    them (the other families' text: kernels.denoiser.encode_prompts)."""
    ids = tokenize(tokenizer, list(prompts)).input_ids.to(text_encoder.device)
    return text_encoder(ids).last_hidden_state


def predict_noise(unet, x: torch.Tensor, t: torch.Tensor, embeds: TextLike) -> torch.Tensor:
    """The denoiser's prediction at (x, t) for text `embeds` (a tensor, or a DenoiserText with
    the pooled embedding), no guidance; `unet` a module, a MODEL bundle or a Denoiser."""
    return predict(unet, x, t, embeds)
