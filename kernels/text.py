"""Text encoding with a word -> token-position map (what layout and attention tools key on)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

_WORD = re.compile(r"\w+(?:['-]\w+)*")


@dataclass(frozen=True)
class Conditioning:
    """CONDITIONING: embeddings (B, L, D) of `prompt`, and which token positions each word took.

    `empty` is the same encoder's embedding of "" so a sampler can guide without a negative.
    """

    embeds: torch.Tensor
    prompt: str
    words: dict[str, tuple[int, ...]]
    empty: Optional[torch.Tensor] = None
    pooled: Optional[torch.Tensor] = None

    def positions(self, phrase: str) -> list[int]:
        """Token positions of every word of `phrase` that occurs in the prompt."""
        out: list[int] = []
        for w in _WORD.findall(phrase.lower()):
            out.extend(self.words.get(w, ()))
        return sorted(set(out))


def tokenize(tokenizer, prompts: list[str]):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt")


def word_positions(tokenizer, prompt: str) -> dict[str, tuple[int, ...]]:
    """Map each word (lower-case) of `prompt` to the token positions it occupies."""
    spans = [(m.start(), m.end(), m.group(0).lower()) for m in _WORD.finditer(prompt)]
    enc = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length,
                    return_offsets_mapping=True)
    out: dict[str, list[int]] = {}
    for pos, (start, end) in enumerate(enc["offset_mapping"]):
        if end <= start:
            continue  # special tokens
        for ws, we, word in spans:
            if start < we and end > ws:
                out.setdefault(word, []).append(pos)
                break
    return {w: tuple(p) for w, p in out.items()}


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompt: str) -> Conditioning:
    """Encode like Stable Diffusion: padded to the model length, last hidden state, no mask."""
    ids = tokenize(tokenizer, [prompt, ""]).input_ids.to(text_encoder.device)
    hidden = text_encoder(ids).last_hidden_state
    # The prompt is kept whitespace-normalised: an edit that changes only spacing gives the
    # same conditioning, so early cutoff spares everything downstream.
    return Conditioning(embeds=hidden[:1].clone(), prompt=" ".join(prompt.split()),
                        words=word_positions(tokenizer, prompt), empty=hidden[1:].clone())
