"""Which prompt tokens are the concepts of Multi-Concept T2I-Zero.

The paper has the user name the concept tokens. Here a concept is a phrase: given explicitly
(comma-separated), or by default the noun of each indefinite noun phrase of the prompt — the
last word of the words after "a"/"an", up to a function word or punctuation ("a red circle at
the bottom, white background" -> "circle"). No part-of-speech tagger is available here, so this
is a rule, and it misses nouns without an article ("two cats"): name those explicitly.

A phrase's tokens are found as the layout nodes find a box's (kernels.layout.boxes): the first
run of its words not taken by an earlier concept, so "a red star and a blue star" gives each
"star" its own position.
"""

from __future__ import annotations

import re

from kernels.layout.boxes import phrase_positions
from kernels.text import WORD_PATTERN

ARTICLES = frozenset({"a", "an"})
# words that end a noun phrase: articles, prepositions, conjunctions, common verbs
PHRASE_ENDS = frozenset("""
a an the and or but nor with without of at on in into onto to by near under over above below
behind beside besides between among next from for inside outside beneath against along around
through across toward towards is are was were be being that which who while as than then
""".split())
_TOKEN = re.compile(WORD_PATTERN.pattern + r"|[^\w\s]")


def article_nouns(prompt: str) -> list[str]:
    """The noun of each indefinite noun phrase of `prompt`, in order (repeats kept)."""
    tokens = [t.lower() for t in _TOKEN.findall(prompt)]
    nouns: list[str] = []
    i = 0
    while i < len(tokens):
        if tokens[i] not in ARTICLES:
            i += 1
            continue
        j = i + 1
        while j < len(tokens) and WORD_PATTERN.fullmatch(tokens[j]) and tokens[j] not in PHRASE_ENDS:
            j += 1
        if j > i + 1:
            nouns.append(tokens[j - 1])
        i = j
    return nouns


def split_concepts(text: str) -> list[str]:
    """Comma-separated concept phrases, stripped, empty ones dropped."""
    return [c.strip() for c in text.split(",") if c.strip()]


def concept_phrases(cond, concepts: str = "") -> list[str]:
    """The concept phrases for a conditioning: `concepts` if given, else its prompt's nouns."""
    return split_concepts(concepts) if concepts.strip() else article_nouns(cond.prompt)


def concept_groups(cond, phrases: list[str]) -> list[list[int]]:
    """Each phrase's token positions in `cond` (phrases not in the prompt are left out)."""
    taken: set = set()
    groups = []
    for phrase in phrases:
        positions = phrase_positions(cond, phrase, taken)
        if positions:
            groups.append(positions)
    return groups


def missing_concepts(cond, phrases: list[str]) -> list[str]:
    """The phrases none of whose words is in `cond`'s prompt."""
    return [p for p in phrases if not cond.positions(p)]
