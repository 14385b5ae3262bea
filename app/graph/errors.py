"""The error of a file that cannot be read as a graph: raised by the file format and by the PNG
reader alike, so neither of them needs the other to report one."""

from __future__ import annotations

import os
from typing import Optional

# Messages are capped: a file can hold a 50 MB name, and its error must not be 50 MB long.
MESSAGE_CHARS = 2000


def brief(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"


def brief_repr(value: object, limit: int = 200, depth: int = 0) -> str:
    """repr(value) cut to `limit` characters; a huge integer by its digit count (its repr alone
    could take seconds, or be refused by Python's int-to-text limit)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 1000:
        return f"an integer of about {int(value.bit_length() * 0.30103):,} digits"
    if isinstance(value, (list, tuple, dict)) and len(value) > 100:
        return f"a {type(value).__name__} of {len(value):,} items"
    if isinstance(value, (list, tuple)) and len(value) <= 4 and depth < 3:
        return brief("[" + ", ".join(brief_repr(v, 60, depth + 1) for v in value) + "]", limit)
    try:
        return brief(repr(value), limit)
    except (ValueError, RecursionError):  # an integer past the int-to-text limit, or deep nesting
        return f"a {type(value).__name__} too large to show"


class GraphFileError(ValueError):
    """A file that cannot be read as a graph. The message names the file and the problem."""

    def __init__(self, message: str, path: Optional[os.PathLike | str] = None):
        self.path = str(path) if path is not None else None
        message = brief(message, MESSAGE_CHARS)
        super().__init__(f"{brief(self.path, 500)}: {message}" if self.path else message)
