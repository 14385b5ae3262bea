"""Prompt weighting as A1111 and ComfyUI write it, for every family's text encoders.

Syntax: `(words)` weighs its words 1.1x, `[words]` 1/1.1x, `(words:1.3)` 1.3x; groups nest and
multiply; `\\(`, `\\)`, `\\[`, `\\]` are literal brackets; `BREAK` (in capitals) starts a new
77-token chunk. A CLIP prompt longer than its 75 content tokens is encoded in chunks, each with
its own start/end tokens, and the chunks' hidden states are joined along the sequence, as both
peers do; the pooled embedding is the first chunk's.

A weight w moves a token's hidden state away from the empty prompt's at the same position:
z_empty + w * (z - z_empty) (ComfyUI's default), so weight 1 changes nothing (bit-identical) and
weight 0 is "as if absent". SD3 and FLUX read long prompts through T5 (256/512 tokens) as their
pipelines do; CLIP's part stays one chunk there, so BREAK only separates words.

Hand-written because no library does this over our families: compel parses its own syntax
(`word++`, `(words)1.3`), not A1111's, and has no SD3 support; the weighting must also keep the
word -> token map the layout nodes read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Optional

import torch

from kernels.text import Conditioning, encode_text

WEIGHT_STEP = 1.1  # what one pair of round brackets multiplies by
MAX_CHUNKS = 8  # 600 CLIP tokens: more is refused (the cross-attention cost grows with it)
MAX_PROMPT_CHARS = 20_000  # refused before tokenizing: no prompt that long fits in MAX_CHUNKS
BREAK = "BREAK"
_NUMBER = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*$")


class PromptSyntaxError(ValueError):
    """A prompt whose weighting cannot be read; the message gives the position (1-based)."""


@dataclass(frozen=True)
class ParsedPrompt:
    plain: str                                  # what the encoders read: the syntax removed
    weights: tuple[tuple[int, int, float], ...]  # (start, end, weight) spans of `plain`, weight != 1
    breaks: tuple[int, ...]                      # offsets in `plain` where BREAK starts a chunk

    @property
    def is_plain(self) -> bool:
        return not self.weights and not self.breaks

    def weight_at(self, start: int, end: int) -> float:
        """The weight of the characters start..end (the first weighted span they touch)."""
        for s, e, w in self.weights:
            if start < e and end > s:
                return w
        return 1.0


def parse_prompt(text: str) -> ParsedPrompt:
    """Read the weighting syntax of `text`; PromptSyntaxError for unbalanced brackets or a
    weight that is not a number."""
    plain: list[str] = []
    char_weight: list[float] = []
    breaks: list[int] = []
    open_groups: list[tuple[str, int, int]] = []  # (bracket, start in plain, position in text)
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "()[]\\":
            _emit(plain, char_weight, text[i + 1])
            i += 2
            continue
        if c in "([":
            open_groups.append((c, len(plain), i))
        elif c in ")]":
            _close_group(text, i, c, open_groups, plain, char_weight)
        elif text.startswith(BREAK, i) and _is_word_at(text, i, len(BREAK)):
            breaks.append(len(plain))
            i += len(BREAK)
            continue
        else:
            _emit(plain, char_weight, c)
        i += 1
    if open_groups:
        bracket, _start, where = open_groups[-1]
        raise PromptSyntaxError(f"the {bracket!r} at position {where + 1} is never closed "
                                f"(write \\{bracket} for a literal bracket)")
    return ParsedPrompt("".join(plain), _spans(char_weight), tuple(sorted(set(breaks))))


def _emit(plain: list[str], char_weight: list[float], c: str) -> None:
    plain.append(c)
    char_weight.append(1.0)


def _is_word_at(text: str, i: int, n: int) -> bool:
    before = text[i - 1] if i > 0 else " "
    after = text[i + n] if i + n < len(text) else " "
    return not (before.isalnum() or before == "_") and not (after.isalnum() or after == "_")


def _close_group(text: str, i: int, c: str, open_groups: list, plain: list, char_weight: list) -> None:
    expected = "(" if c == ")" else "["
    if not open_groups or open_groups[-1][0] != expected:
        raise PromptSyntaxError(f"the {c!r} at position {i + 1} closes nothing "
                                f"(write \\{c} for a literal bracket)")
    _bracket, start, where = open_groups.pop()
    factor = WEIGHT_STEP if c == ")" else 1 / WEIGHT_STEP
    inner = "".join(plain[start:])
    colon = inner.rfind(":")
    if c == ")" and colon >= 0:
        number = inner[colon + 1:]
        if not _NUMBER.match(number):
            raise PromptSyntaxError(f"the weight {number.strip()!r} of the group at position {where + 1} "
                                    f"is not a number (write (words:1.2))")
        factor = float(number)
        del plain[start + colon:], char_weight[start + colon:]
    for k in range(start, len(char_weight)):
        char_weight[k] *= factor


def _spans(char_weight: list[float]) -> tuple[tuple[int, int, float], ...]:
    out: list[tuple[int, int, float]] = []
    for k, w in enumerate(char_weight):
        if w == 1.0:
            continue
        if out and out[-1][1] == k and out[-1][2] == w:
            out[-1] = (out[-1][0], k + 1, w)
        else:
            out.append((k, k + 1, w))
    return tuple(out)


# -- encoding -----------------------------------------------------------------------------------
@torch.no_grad()
def encode_weighted(tokenizer, text_encoder, prompt: str) -> Conditioning:
    """encode_text with the weighting syntax, BREAK and long prompts. A prompt with none of them
    gives exactly encode_text's Conditioning."""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PromptSyntaxError(f"the prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are read")
    parsed = parse_prompt(prompt)
    chunked = _chunks_tokenizer(tokenizer)
    pieces = [parsed]
    if chunked is not None:
        pieces = _chunk(parsed, chunked)
    elif parsed.breaks:  # T5 families: BREAK only separates words
        parsed = replace(parsed, breaks=())
        pieces = [parsed]
    if len(pieces) == 1 and pieces[0].is_plain:
        return encode_text(tokenizer, text_encoder, pieces[0].plain)
    if len(pieces) > MAX_CHUNKS:
        raise PromptSyntaxError(f"the prompt takes {len(pieces)} chunks of 75 tokens; at most "
                                f"{MAX_CHUNKS} are encoded ({MAX_CHUNKS * 75} tokens)")
    empty = encode_text(tokenizer, text_encoder, "").embeds
    conds = [_weighted(tokenizer, text_encoder, piece, empty) for piece in pieces]
    return _joined(conds, empty.shape[1], prompt_text=" ".join(parsed.plain.split()))


def _weighted(tokenizer, text_encoder, piece: ParsedPrompt, empty: torch.Tensor) -> Conditioning:
    cond = encode_text(tokenizer, text_encoder, piece.plain)
    if not piece.weights:
        return cond
    embeds = cond.embeds.clone()
    for position, start, end in token_char_spans(tokenizer, piece.plain):
        w = piece.weight_at(start, end)
        if w != 1.0 and position < embeds.shape[1]:  # unweighted tokens stay bit-identical
            z, z0 = cond.embeds[:, position], empty[:, position]
            embeds[:, position] = z0 + w * (z - z0)
    return replace(cond, embeds=embeds)


def _joined(conds: list[Conditioning], chunk_length: int, prompt_text: str) -> Conditioning:
    """Chunks side by side: positions of chunk k shift by k * chunk_length; `empty` is repeated
    to the same length so the default negative lines up with the prompt."""
    if len(conds) == 1:
        return replace(conds[0], prompt=prompt_text)
    words: dict[str, list[int]] = {}
    for k, cond in enumerate(conds):
        for word, positions in cond.words.items():
            words.setdefault(word, []).extend(p + k * chunk_length for p in positions)
    first = conds[0]
    empty = None if first.empty is None else first.empty.repeat(1, len(conds), 1)
    return replace(first, embeds=torch.cat([c.embeds for c in conds], dim=1), prompt=prompt_text,
                   words={w: tuple(p) for w, p in words.items()}, empty=empty)


def line_up(positive: torch.Tensor, negative: torch.Tensor, positive_empty: Optional[torch.Tensor],
            negative_empty: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different chunk counts, made the same length for one guided batch: the shorter
    gets chunks of its own empty prompt appended, as A1111 pads them."""
    import math

    n_pos, n_neg = positive.shape[1], negative.shape[1]
    if n_pos == n_neg:
        return positive, negative
    chunk = math.gcd(n_pos, n_neg)
    short, empty = (positive, positive_empty) if n_pos < n_neg else (negative, negative_empty)
    if empty is None or chunk < 8:
        raise ValueError(f"the prompt ({n_pos} tokens) and the negative ({n_neg}) differ in length and "
                         f"cannot be padded to each other: encode both with this model's text encoder")
    pad = empty[:1, :chunk].repeat(1, (max(n_pos, n_neg) - short.shape[1]) // chunk, 1).to(short)
    longer = torch.cat([short, pad.expand(short.shape[0], -1, -1)], 1)
    return (longer, negative) if n_pos < n_neg else (positive, longer)


def _chunks_tokenizer(tokenizer):
    """The CLIP tokenizer a UNet family's prompt is chunked by, or None for SD3/FLUX (T5 reads
    long prompts there)."""
    from kernels.flux import FluxTokenizers
    from kernels.sdxl import SDXLTokenizers
    from kernels.text import SD3Tokenizers

    if isinstance(tokenizer, (SD3Tokenizers, FluxTokenizers)):
        return None
    if isinstance(tokenizer, SDXLTokenizers):
        return tokenizer.tokenizer or tokenizer.tokenizer_2
    return tokenizer


def token_char_spans(tokenizer, plain: str) -> list[tuple[int, int, int]]:
    """(position in the encoder sequence, start, end in `plain`) of every content token, for
    each family's sequence layout (SD3: CLIP's positions, then T5's after CLIP's length)."""
    from kernels.flux import FluxTokenizers
    from kernels.sdxl import SDXLTokenizers
    from kernels.text import SD3Tokenizers

    if isinstance(tokenizer, SD3Tokenizers):
        n_clip = tokenizer.tokenizer.model_max_length
        out = _offsets(tokenizer.tokenizer, plain, n_clip)
        if tokenizer.tokenizer_3 is not None:
            out += [(n_clip + p, s, e) for p, s, e in _offsets(tokenizer.tokenizer_3, plain,
                                                               tokenizer.max_sequence_length)]
        return out
    if isinstance(tokenizer, FluxTokenizers):
        return _offsets(tokenizer.tokenizer_2, plain, tokenizer.max_sequence_length)
    if isinstance(tokenizer, SDXLTokenizers):
        return _offsets(tokenizer.tokenizer or tokenizer.tokenizer_2, plain, None)
    return _offsets(tokenizer, plain, None)


def _offsets(tokenizer, plain: str, max_length: Optional[int]) -> list[tuple[int, int, int]]:
    enc = tokenizer(plain, truncation=True, max_length=max_length or tokenizer.model_max_length,
                    return_offsets_mapping=True)
    return [(pos, s, e) for pos, (s, e) in enumerate(enc["offset_mapping"]) if e > s]


def _chunk(parsed: ParsedPrompt, tokenizer) -> list[ParsedPrompt]:
    """Split at BREAKs and before every 76th content token (backing off to the start of a word),
    each piece keeping its weights."""
    per_chunk = tokenizer.model_max_length - 2  # the start and end tokens
    # verbose=False: the "longer than the maximum" warning is what chunking is for
    enc = tokenizer(parsed.plain, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    spans = [(s, e) for s, e in enc["offset_mapping"] if e > s]
    cuts, count = [0], 0
    breaks = list(parsed.breaks)
    for k, (s, _e) in enumerate(spans):
        if breaks and s >= breaks[0]:
            cuts.append(breaks.pop(0))
            while breaks and s >= breaks[0]:
                breaks.pop(0)
            count = 0
        elif count == per_chunk:
            cuts.append(_word_start(spans, k, cuts[-1]))
            count = sum(1 for s2, _ in spans if cuts[-1] <= s2 < s)
        count += 1
    cuts = sorted(set(c for c in cuts if 0 <= c <= len(parsed.plain)))
    ends = cuts[1:] + [len(parsed.plain)]
    return [_piece(parsed, a, b) for a, b in zip(cuts, ends)]


def _word_start(spans: list[tuple[int, int]], k: int, floor: int) -> int:
    """The start of the word token k is in: BPE pieces of one word touch and are alphanumeric."""
    j = k
    while j > 0 and spans[j - 1][1] == spans[j][0] and spans[j - 1][0] > floor:
        j -= 1
    return spans[j][0] if j > 0 and spans[j][0] > floor else spans[k][0]


def _piece(parsed: ParsedPrompt, a: int, b: int) -> ParsedPrompt:
    weights = tuple((max(s, a) - a, min(e, b) - a, w) for s, e, w in parsed.weights if s < b and e > a)
    return ParsedPrompt(parsed.plain[a:b], weights, ())
