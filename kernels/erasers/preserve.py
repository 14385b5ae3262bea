"""The prompts a closed-form eraser keeps, and edits, by default: drawn from what the model knows.

Without preserved prompts a closed-form edit with a small `lam` moves every key that shares a
direction with the concept's (on the built-in ShapesT2I model, erasing "red" with lam 0.01 and no
preserve set takes every other colour down with it). So the default set is:
- the built-in ShapesT2I world (a tokenizer whose vocabulary holds the world's colours and
  shapes and little else): every "a <colour> <shape>" of the world that names no word of the
  concept, with a few of the world's position and background phrases, each colour and shape
  alone, and the plain prompts naming part of it (for "red circle": "a red square" stays);
- any other model: resources/erasers/common_concepts.txt, minus lines naming the concept.
The default edit templates are the world's caption grammar on ShapesT2I (the words after the
concept carry it into the text embeddings, so a cross-attention edit must see them) and
Diff-QuickFix's photo templates elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from kernels.text import words_of

COMMON_CONCEPTS = Path(__file__).resolve().parents[2] / "resources" / "erasers" / "common_concepts.txt"
# a word-level world tokenizer has a few dozen tokens; a real model's has tens of thousands
_WORLD_VOCAB_MAX = 1000


# Phrase tails of the world's captions the default templates and preserve prompts use: no tail,
# and one of each of a few cell phrases, some with a background (the held-out captions the bench
# scores on are other combinations).
WORLD_TAILS = ("", " on the left", " at the top right", " in the center, white background",
               " at the bottom, black background", " at the top left, gray background")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


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


def world_prompts(tails: bool = False) -> list[str]:
    """Every single-object prompt of the world ("a red circle"; with `tails` also with each of
    WORLD_TAILS), and each colour and shape alone."""
    from kernels.shapes import world

    ends = WORLD_TAILS if tails else ("",)
    pairs = [f"{_article(c)} {c} {s}{t}" for c in world.COLOURS for s in world.SHAPES for t in ends]
    return pairs + list(world.COLOURS) + list(world.SHAPES)


def default_preserve(tokenizer, concept: str, anchor: str = "", extra: Sequence[str] = (),
                     phrased: bool = True, phrased_halves: bool = False) -> list[str]:
    """The default preserve prompts for erasing `concept`, from the model's vocabulary (see the
    module doc), then `extra`. Prompts naming the anchor stay: the anchor's own outputs are what
    the concept is mapped to.

    On the ShapesT2I world with `phrased` (the default): every world prompt that names no word
    of the concept, in the world's phrasing (WORLD_TAILS: the tokens after an object carry it
    too, so they are held as well), and the plain prompts that name part of it ("a red square"
    for "red circle"). The halves are not held with tails: there the erased pair's own tail
    keys are nearly theirs, and holding both would keep the pair; with `phrased_halves` they are
    (for an edit whose keys tell a pair from its halves: Diff-QuickFix's "output_mlp" site,
    where leaving them out let the pair's edit take other circles). Without `phrased` (version 2
    of ClosedFormErase): the plain world prompts without those naming every word of the concept.
    Any other model: the common-concepts list without lines naming every word of the concept."""
    need = set(words_of(concept))

    def names_all(p):
        return bool(need) and need <= set(words_of(p))

    if not is_shapes_world(tokenizer):
        keep = [p for p in common_concepts() if not names_all(p)]
    elif not phrased:
        keep = [p for p in world_prompts() if not names_all(p)]
    elif phrased_halves:
        keep = [p for p in world_prompts(tails=True) if not names_all(p)]
    else:
        keep = [p for p in world_prompts(tails=True) if not need & set(words_of(p))]
        keep += [p for p in world_prompts() if need & set(words_of(p)) and not names_all(p)]
    return keep + [p for p in extra if p not in keep]


def default_templates(tokenizer, concept: str, anchor: str = "") -> list[str]:
    """The default edit templates: on the ShapesT2I world its caption grammar (world_templates),
    elsewhere (or for a concept the world cannot say) Diff-QuickFix's photo templates."""
    from .closed_form import QUICKFIX_TEMPLATES

    world = world_templates(concept, anchor) if is_shapes_world(tokenizer) else None
    return list(world or QUICKFIX_TEMPLATES)


def world_concept(concept: str) -> "tuple[list[str], list[str]] | None":
    """(colours, shapes) the concept names if every word of it is a world colour or shape."""
    from kernels.shapes import world

    words = words_of(concept)
    colours = [w for w in words if w in world.COLOURS]
    shapes = [w for w in words if w in world.SHAPES]
    if not words or len(colours) + len(shapes) != len(words) or len(colours) > 1 or len(shapes) > 1:
        return None
    if colours and shapes and words != [colours[0], shapes[0]]:
        return None
    return colours, shapes


def world_templates(concept: str, anchor: str = "", tails: Sequence[str] = WORLD_TAILS) -> "list[str] | None":
    """Edit templates in the world's caption grammar ("{}" is the concept), or None when the
    concept (or the anchor) is not a world colour, shape or "colour shape" pair. A colour is
    phrased on every shape, a shape in every colour, a pair alone; each with every tail. The
    article is the one the concept (and the anchor) takes, so both fill in as the world writes
    them."""
    from kernels.shapes import world

    named = world_concept(concept)
    if named is None or (anchor and world_concept(anchor) is None):
        return None
    colours, shapes = named
    if colours and shapes:
        heads = ["{}"]
    elif shapes:
        heads = [f"{_article(c)} {c} {{}}" for c in world.COLOURS]
    else:
        heads = [f"{{}} {s}" for s in world.SHAPES]
    out = []
    for head in heads:
        lead = "" if head.startswith(("a ", "an ")) else _article(concept) + " "
        for tail in tails:
            out.append(lead + head + tail)
    return out
