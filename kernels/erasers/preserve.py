"""The prompts a closed-form eraser keeps by default: drawn from what the model knows.

Without preserved prompts a closed-form edit with a small `lam` moves every key that shares a
direction with the concept's (on the built-in ShapesT2I model, erasing "red" with lam 0.01 and no
preserve set takes every other colour down with it). So the default set is:
- the built-in ShapesT2I world (a tokenizer whose vocabulary holds the world's colours and
  shapes and little else): every "a <colour> <shape>" of the world and each colour and shape
  alone, except those that name the concept (for "red circle": "a red square" stays);
- any other model: resources/erasers/common_concepts.txt, minus lines naming the concept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from kernels.text import words_of

COMMON_CONCEPTS = Path(__file__).resolve().parents[2] / "resources" / "erasers" / "common_concepts.txt"
# a word-level world tokenizer has a few dozen tokens; a real model's has tens of thousands
_WORLD_VOCAB_MAX = 1000


def is_shapes_world(tokenizer) -> bool:
    """Whether `tokenizer` is a ShapesT2I world tokenizer (the world's words, little else)."""
    from kernels.shapes import world

    tok = getattr(tokenizer, "tokenizer", None) or tokenizer  # a family set's first tokenizer
    try:
        vocab = tok.get_vocab()
    except (AttributeError, TypeError):
        return False
    return len(vocab) < _WORLD_VOCAB_MAX and all(w in vocab for w in (*world.COLOURS, *world.SHAPES))


def common_concepts(path: "str | Path" = COMMON_CONCEPTS) -> list[str]:
    """The shipped list of common concepts (one prompt a line, '#' comments)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read the common-concepts list {path}: {exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def world_prompts() -> list[str]:
    """Every single-object prompt of the world without position ("a red circle"), and each word."""
    from kernels.shapes import world

    def article(word):
        return "an" if word[0] in "aeiou" else "a"

    pairs = [f"{article(c)} {c} {s}" for c in world.COLOURS for s in world.SHAPES]
    return pairs + list(world.COLOURS) + list(world.SHAPES)


def default_preserve(tokenizer, concept: str, anchor: str = "", extra: Sequence[str] = ()) -> list[str]:
    """The default preserve prompts for erasing `concept`: the model's vocabulary (see the module
    doc) without any prompt that names every word of the concept, then `extra`. Prompts naming
    the anchor stay: the anchor's own outputs are what the concept is mapped to."""
    base = world_prompts() if is_shapes_world(tokenizer) else common_concepts()
    need = set(words_of(concept))
    keep = [p for p in base if not (need and need <= set(words_of(p)))]
    return keep + [p for p in extra if p not in keep]
