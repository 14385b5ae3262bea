"""The error of a file that cannot be read as a graph: raised by the file format and by the PNG
reader alike, so neither of them needs the other to report one."""

from __future__ import annotations

import os
from typing import Optional


class GraphFileError(ValueError):
    """A file that cannot be read as a graph. The message names the file and the problem."""

    def __init__(self, message: str, path: Optional[os.PathLike | str] = None):
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)
