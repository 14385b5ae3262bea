"""Prompt schedules: which conditioning the sampler reads at each step.

Two ways in. A1111's prompt editing in the text, `[from:to:when]` (`[to:when]` adds words,
`[from::when]` removes them): before `when` the sampler reads one text, from then on the other.
`when` below 1 is a fraction of the steps, a whole number from 1 up is a step count. And
stage-wise prompts (eDiff-I's expert windows, ProSpect's stages): a conditioning that replaces
the base one from `start` to `end` of the sampling, given as fractions.

A Conditioning carries its schedule in `stages`: (Conditioning, start, end, in_steps) entries; at
step i of n, the last stage whose window holds i is read, otherwise the base conditioning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Optional

_NUMBER = re.compile(r"^\s*(\d+\.?\d*|\.\d+)\s*$")


class PromptEditError(ValueError):
    """A malformed `[from:to:when]`; the message gives the position (1-based)."""


@dataclass(frozen=True)
class _Edit:
    start: int  # the `[` in the text
    end: int    # one past the `]`
    before: str
    after: str
    when: float


def _is_escaped(text: str, i: int) -> bool:
    n = 0
    while i - n - 1 >= 0 and text[i - n - 1] == "\\":
        n += 1
    return n % 2 == 1


def _matching_bracket(text: str, i: int) -> Optional[int]:
    depth = 0
    for j in range(i, len(text)):
        if text[j] in "[]" and _is_escaped(text, j):
            continue
        depth += {"[": 1, "]": -1}.get(text[j], 0)
        if depth == 0:
            return j
    return None


def _top_level_colons(inner: str) -> list[int]:
    out, depth = [], 0
    for k, c in enumerate(inner):
        if c in "([" and not _is_escaped(inner, k):
            depth += 1
        elif c in ")]" and not _is_escaped(inner, k):
            depth -= 1
        elif c == ":" and depth == 0:
            out.append(k)
    return out


def find_edits(text: str) -> list[_Edit]:
    """The `[from:to:when]` groups of `text` (a `[words]` without a trailing number is weighting)."""
    edits, i = [], 0
    while i < len(text):
        if text[i] != "[" or _is_escaped(text, i):
            i += 1
            continue
        j = _matching_bracket(text, i)
        if j is None:
            return edits  # prompt weighting reports the unclosed bracket
        inner = text[i + 1:j]
        colons = _top_level_colons(inner)
        if colons and len(colons) <= 2 and _NUMBER.match(inner[colons[-1] + 1:]):
            when = float(inner[colons[-1] + 1:])
            if len(colons) == 2:
                before, after = inner[:colons[0]], inner[colons[0] + 1:colons[1]]
            else:
                before, after = "", inner[:colons[0]]
            if "[" in before + after and find_edits(before + after):
                raise PromptEditError(f"the prompt edit at position {i + 1} holds another edit; "
                                      f"write them side by side")
            edits.append(_Edit(i, j + 1, before, after, when))
            i = j + 1
        elif len(colons) == 2:
            raise PromptEditError(f"the prompt edit at position {i + 1} ends in "
                                  f"{inner[colons[-1] + 1:].strip()!r}, not a number of steps or a fraction")
        else:
            i += 1
    return edits


def scheduled_texts(text: str) -> tuple[str, list[tuple[str, float, float, bool]]]:
    """(the text read first, [(text, start, end, in_steps)] for each later window)."""
    edits = find_edits(text)
    if not edits:
        return text, []
    in_steps = {e.when >= 1 for e in edits}
    if len(in_steps) > 1:
        raise PromptEditError("prompt edits mix fractions (below 1) and step numbers: use one or the other")
    steps = in_steps.pop()
    switches = sorted({e.when for e in edits})
    windows = [0.0, *switches, float("inf") if steps else 1.0]
    texts = [_text_at(text, edits, windows[k]) for k in range(len(windows) - 1)]
    later = [(texts[k], windows[k], windows[k + 1], steps) for k in range(1, len(texts))]
    return texts[0], later


def _text_at(text: str, edits: list[_Edit], when: float) -> str:
    out, pos = [], 0
    for e in edits:
        out.append(text[pos:e.start])
        out.append(e.after if when >= e.when else e.before)
        pos = e.end
    out.append(text[pos:])
    return "".join(out)


def with_stage(base, stage, start: float, end: float, in_steps: bool = False):
    """`base` with `stage` read from `start` to `end` (stages added later win where they overlap)."""
    return replace(base, stages=tuple(base.stages) + ((stage, float(start), float(end), bool(in_steps)),))


def step_range(start: float, end: float, in_steps: bool, n: int) -> range:
    """The steps (0..n-1) a window covers: fractions of n as A1111 counts them, or step numbers."""
    if in_steps:
        return range(max(0, int(start)), min(n, int(end)) if end != float("inf") else n)
    return range(int(start * n), n if end >= 1.0 else int(end * n))


def stage_at(stages, i: int, n: int) -> Optional[int]:
    """The index of the stage read at step i of n, or None for the base conditioning."""
    found = None
    for k, (_cond, start, end, in_steps) in enumerate(stages):
        if i in step_range(start, end, in_steps, n):
            found = k
    return found
