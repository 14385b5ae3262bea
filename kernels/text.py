"""Text encoding with a word -> token-position map (what layout and attention tools key on).

Stable Diffusion 1.x/2.x: one CLIP, the last hidden state. Stable Diffusion 3: the joint text
sequence of StableDiffusion3Pipeline.encode_prompt (which is called, not re-implemented): CLIP-L
and CLIP-G penultimate hidden states concatenated along features, zero-padded to T5's width, then
T5's tokens after them along the sequence; the pooled projections are CLIP-L's ⊕ CLIP-G's. In
that sequence a word has positions in the CLIP part (0..76) and in the T5 part (77 + its T5
position); `Conditioning.words` maps each word to both, and `Conditioning.links` says which
positions are the same occurrence of a word, so a layout phrase found in one part also claims
its twin in the other (`Conditioning.linked`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

WORD_PATTERN = re.compile(r"\w+(?:['-]\w+)*")


def words_of(text: str) -> list[str]:
    """The words of a text, lower-cased, as prompts are split everywhere (apostrophes and
    hyphens stay inside a word)."""
    return [w.lower() for w in WORD_PATTERN.findall(text)]


@dataclass(frozen=True)
class Conditioning:
    """CONDITIONING: embeddings (B, L, D) of `prompt`, and which token positions each word took.

    `empty` is the same encoder's embedding of "" so a sampler can guide without a negative;
    `pooled`/`empty_pooled` are the pooled projections an MM-DiT (SD3) also takes. `links` holds,
    for each word occurrence, every position it took across the encoders of a joint sequence.

    Declared storable in kernels.storage, so the disk cache keeps it between runs: every field
    stays a tensor or plain data.
    """

    embeds: torch.Tensor
    prompt: str
    words: dict[str, tuple[int, ...]]
    empty: Optional[torch.Tensor] = None
    pooled: Optional[torch.Tensor] = None
    empty_pooled: Optional[torch.Tensor] = None
    links: tuple[tuple[int, ...], ...] = ()
    guidance: Optional[float] = None  # FLUX dev's distilled guidance, when set apart from cfg
    # a prompt schedule: (Conditioning, start, end, in_steps) read instead during its window
    # (kernels.prompt_schedule)
    stages: tuple = ()

    def positions(self, phrase: str) -> list[int]:
        """Token positions of every word of `phrase` that occurs in the prompt."""
        out: list[int] = []
        for w in words_of(phrase):
            out.extend(self.words.get(w, ()))
        return sorted(set(out))

    def linked(self, positions) -> list[int]:
        """`positions` and every position that is the same word occurrence in another encoder's
        part of the sequence (SD3: a CLIP position and its T5 twin)."""
        out = set(positions)
        for group in self.links:
            if out.intersection(group):
                out.update(group)
        return sorted(out)


def tokenize(tokenizer, prompts: list[str]):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt")


def _span_positions(tokenizer, prompt: str, max_length: Optional[int] = None) -> list[tuple[str, list[int]]]:
    """(word, token positions) of each word occurrence of `prompt`, in order."""
    spans = [(m.start(), m.end(), m.group(0).lower()) for m in WORD_PATTERN.finditer(prompt)]
    enc = tokenizer(prompt, truncation=True, max_length=max_length or tokenizer.model_max_length,
                    return_offsets_mapping=True)
    out: list[tuple[str, list[int]]] = [(w, []) for _, _, w in spans]
    for pos, (start, end) in enumerate(enc["offset_mapping"]):
        if end <= start:
            continue  # special tokens
        for k, (ws, we, _word) in enumerate(spans):
            if start < we and end > ws:
                out[k][1].append(pos)
                break
    return out


def word_positions(tokenizer, prompt: str, max_length: Optional[int] = None) -> dict[str, tuple[int, ...]]:
    """Map each word (lower-case) of `prompt` to the token positions it occupies."""
    out: dict[str, list[int]] = {}
    for word, positions in _span_positions(tokenizer, prompt, max_length):
        if positions:
            out.setdefault(word, []).extend(positions)
    return {w: tuple(p) for w, p in out.items()}


class TextEncoderSet(torch.nn.Module):
    """A family's text encoders held as one module (the CLIP bundle's encoder); its device and
    dtype are its first encoder's (the encoders sit together)."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class SD3TextEncoders(TextEncoderSet):
    """The text encoders of a Stable Diffusion 3 folder as one module (the CLIP bundle's encoder):
    CLIP-L, CLIP-G (CLIPTextModelWithProjection) and T5 (None when the folder ships without it;
    its part of the sequence is then zeros of the transformer's joint attention width, as in
    diffusers)."""

    def __init__(self, text_encoder, text_encoder_2, text_encoder_3, joint_attention_dim: int):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.text_encoder_3 = text_encoder_3
        self.joint_attention_dim = int(joint_attention_dim)


@dataclass(frozen=True)
class SD3Tokenizers:
    """The CLIP bundle's tokenizer for SD3: CLIP-L's, CLIP-G's and T5's (or None), and the T5
    length (diffusers' default 256, or less when the tokenizer is shorter)."""

    tokenizer: Any
    tokenizer_2: Any
    tokenizer_3: Any
    max_sequence_length: int = 256


def _sd3_pipeline(tok: SD3Tokenizers, enc: SD3TextEncoders):
    """A StableDiffusion3Pipeline holding only the text side, for its encode_prompt."""
    from types import SimpleNamespace

    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None, text_encoder=enc.text_encoder,
        tokenizer=tok.tokenizer, text_encoder_2=enc.text_encoder_2, tokenizer_2=tok.tokenizer_2,
        text_encoder_3=enc.text_encoder_3, tokenizer_3=tok.tokenizer_3)
    # Read only when there is no T5: the width of the zeros that stand in for its tokens.
    pipe.transformer = SimpleNamespace(config=SimpleNamespace(joint_attention_dim=enc.joint_attention_dim))
    return pipe


@torch.no_grad()
def encode_sd3(tok: SD3Tokenizers, enc: SD3TextEncoders, prompt: str) -> Conditioning:
    """SD3's joint text sequence and pooled projections (diffusers' encode_prompt), for the
    prompt and for "" (the default negative, as the pipeline's), with the word map over both
    the CLIP and the T5 parts."""
    pipe = _sd3_pipeline(tok, enc)
    embeds, empty, pooled, empty_pooled = pipe.encode_prompt(
        prompt, None, None, device=enc.device, do_classifier_free_guidance=True,
        negative_prompt="", max_sequence_length=tok.max_sequence_length)
    n_clip = pipe.tokenizer_max_length
    spans = _span_positions(tok.tokenizer, prompt, n_clip)
    if tok.tokenizer_3 is not None and enc.text_encoder_3 is not None:
        t5 = _span_positions(tok.tokenizer_3, prompt, tok.max_sequence_length)
        spans = [(w, p + [n_clip + q for q in p3]) for (w, p), (_, p3) in zip(spans, t5)]
    words: dict[str, list[int]] = {}
    for word, positions in spans:
        if positions:
            words.setdefault(word, []).extend(positions)
    return Conditioning(embeds=embeds.clone(), prompt=" ".join(prompt.split()),
                        words={w: tuple(sorted(p)) for w, p in words.items()},
                        empty=empty.clone(), pooled=pooled.clone(), empty_pooled=empty_pooled.clone(),
                        links=tuple(tuple(p) for _, p in spans if len(p) > 1))


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompt: str) -> Conditioning:
    """Encode like Stable Diffusion: padded to the model length, last hidden state, no mask.
    SD3's encoders (an SD3TextEncoders) give the joint sequence instead (encode_sd3), SDXL's
    (an SDXLTextEncoders) their side-by-side hidden states and pooled embedding (encode_sdxl),
    FLUX's (kernels.flux.FluxTextEncoders) T5's sequence and CLIP's pooled output (encode_flux)."""
    if isinstance(text_encoder, SD3TextEncoders):
        return encode_sd3(tokenizer, text_encoder, prompt)
    # lazily: kernels.sdxl and kernels.flux build on this module
    from kernels.flux import FluxTextEncoders, encode_flux
    from kernels.sdxl import SDXLTextEncoders, encode_sdxl

    if isinstance(text_encoder, SDXLTextEncoders):
        return encode_sdxl(tokenizer, text_encoder, prompt)
    if isinstance(text_encoder, FluxTextEncoders):
        return encode_flux(tokenizer, text_encoder, prompt)
    ids = tokenize(tokenizer, [prompt, ""]).input_ids.to(text_encoder.device)
    hidden = text_encoder(ids).last_hidden_state
    # The prompt is kept whitespace-normalised: an edit that changes only spacing gives the
    # same conditioning, so early cutoff spares everything downstream.
    return Conditioning(embeds=hidden[:1].clone(), prompt=" ".join(prompt.split()),
                        words=word_positions(tokenizer, prompt), empty=hidden[1:].clone())
