"""The two model calls every eraser makes: text embeddings of padded prompts, and the
denoiser's noise prediction."""

from __future__ import annotations

from typing import Sequence

import torch

from kernels.text import tokenize


@torch.no_grad()
def encode_embeds(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """Final hidden states (B, L, D) of padded prompts, as the sampler sees them."""
    ids = tokenize(tokenizer, list(prompts)).input_ids.to(text_encoder.device)
    return text_encoder(ids).last_hidden_state


def predict_noise(unet, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """The UNet's noise prediction at (x, t) for text embeddings `embeds`, no guidance."""
    return unet(x, t, encoder_hidden_states=embeds).sample
