"""File helpers every layer shares: one atomic write, one fingerprint of a file or folder.

Standard library only (no torch), so the document layer (`app/graph`) can use it too.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import (umask is process-wide; setting it later, while a worker thread may be
# creating files, would be a race).
_NEW_FILE_MODE = 0o666 & ~_umask()

Writer = Callable[[str], None]

TEMP_SUFFIX = ".tmp"
# atomic_write's temporary names: "." + the file's name + "." + mkstemp's 8 random characters + ".tmp".
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
# A temporary file untouched this long has no writer any more: a process killed mid-write
# (kill -9, a power cut) left it. An hour is far beyond any write, even to a slow network drive.
STALE_TEMP_SECONDS = 3600.0


def atomic_write(path: Union[os.PathLike, str], data: Union[bytes, Writer], durable: bool = True) -> None:
    """Write via a uniquely named temporary file in the same folder and rename it over `path`: a
    failed or interrupted write keeps the old file, and two writers never share a temp name.

    `data` is the bytes, or a function that writes the file at the temporary path it is given
    (for libraries that write by name, as safetensors' `save_file`). `durable` fsyncs before the
    rename so the file survives a power cut; results a re-run can make again may skip it (tens of
    milliseconds per file). The file gets the permissions a plain write would give it (the old
    file's, or the umask's for a new one), not mkstemp's private 0600.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = _NEW_FILE_MODE
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
            if durable:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def sweep_stale_temps(folders: Iterable[Union[os.PathLike, str]], max_age: float = STALE_TEMP_SECONDS) -> int:
    """Delete the temporary files atomic_write left in `folders` (not their subfolders) that are
    older than `max_age` seconds; only names of atomic_write's pattern are touched. Returns how
    many were deleted; files that vanish or cannot be deleted are skipped."""
    cutoff = time.time() - max_age
    removed = 0
    for folder in folders:
        try:
            candidates = list(Path(folder).glob(".*" + TEMP_SUFFIX))
        except OSError:
            continue
        for path in candidates:
            if not _TEMP_NAME.match(path.name):
                continue
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except OSError:
                pass
    return removed


def path_fingerprint(path: str) -> Any:
    """Size and mtime of a file, or of every file under a folder: enough to notice a change
    (the value goes into cache keys; it is never read back)."""
    if not path or not os.path.exists(path):
        return ("missing", path)
    if os.path.isfile(path):
        st = os.stat(path)
        return (path, st.st_size, st.st_mtime_ns)
    entries = []
    for root, _dirs, files in os.walk(path):
        for f in sorted(files):
            p = os.path.join(root, f)
            st = os.stat(p)
            entries.append((os.path.relpath(p, path), st.st_size, st.st_mtime_ns))
    return (path, sorted(entries))


def special_file_reason(path: Union[os.PathLike, str]) -> Optional[str]:
    """Why `path` must not be opened, or None: a pipe, socket or device (opening a FIFO waits
    forever for a writer). Missing paths, files and folders are the readers' business."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "is not a regular file (a pipe, socket or device): it is never opened"
