"""A small result table (columns and rows of plain values) that analysis nodes return.

Declared storable in kernels.storage, so the disk cache keeps it between runs: every field is
plain data (strings, numbers).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Table:
    """A titled table: `columns` names, `rows` of plain values (one entry per column)."""

    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)

    def __post_init__(self):
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(f"table {self.title!r}: a row has {len(row)} values for "
                                 f"{len(self.columns)} columns")

    def column(self, name: str) -> list:
        """The values of column `name`, top to bottom."""
        k = self.columns.index(name)
        return [row[k] for row in self.rows]

    def as_text(self) -> str:
        """The table as aligned plain text (for logs and the CLI)."""
        cells = [[str(c) for c in self.columns]] + [[_fmt(v) for v in row] for row in self.rows]
        widths = [max(len(r[k]) for r in cells) for k in range(len(self.columns))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
        return "\n".join([self.title, *lines])


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
