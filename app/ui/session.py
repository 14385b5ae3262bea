"""What the app keeps between sessions: recent files, autosave and crash recovery.

Everything lives in the user data folder (platformdirs), or in LOOMWORK_DATA_DIR when set (tests,
portable installs). Autosave writes the open graph to a file named for this process once edits
pause for AUTOSAVE_IDLE_MS, and at the latest AUTOSAVE_MAX_WAIT_MS after the first edit it does
not hold yet (so steady typing is saved too); a clean exit deletes it. At start, an autosave left by a process that is
no longer running is a crash's leftover: the app offers to recover it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from PySide6 import QtCore

from app.graph import dumps
from app.graph.fileformat import atomic_write

from .document import Document

MAX_RECENT = 10
AUTOSAVE_IDLE_MS = 2000
# A kill -9 loses at most this (plus the write): bench/reliability.py measures the loss.
AUTOSAVE_MAX_WAIT_MS = 3000


def data_dir() -> Path:
    env = os.environ.get("LOOMWORK_DATA_DIR")
    if env:
        path = Path(env)
    else:
        import platformdirs

        path = Path(platformdirs.user_data_dir("loomwork", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_output_dir() -> Path:
    """Where Save Image writes when its folder is empty and the graph is unsaved: LOOMWORK_OUTPUT_DIR,
    else the folder set in Preferences, else the user's pictures folder."""
    env = os.environ.get("LOOMWORK_OUTPUT_DIR")
    if env:
        return Path(env)
    chosen = str(settings().value(OUTPUT_FOLDER_KEY, "") or "").strip()
    if chosen:
        return Path(os.path.expanduser(chosen))
    import platformdirs

    return Path(platformdirs.user_pictures_dir()) / "Loomwork"


def settings() -> QtCore.QSettings:
    """Window layout and other preferences, as an ini file next to the recent-files list."""
    return QtCore.QSettings(str(data_dir() / "settings.ini"), QtCore.QSettings.IniFormat)


# -- preferences ---------------------------------------------------------------------------
OUTPUT_FOLDER_KEY = "output/folder"
ENGINE_KEYS = {  # Preferences -> the runner's Executor arguments ("" = the default)
    "device": "engine/device", "ram_budget": "engine/ram_budget", "disk_cache": "engine/cache_folder",
    "disk_budget_gb": "engine/cache_budget_gb",
}
UI_SCALE_KEY = "ui/scale"


def engine_settings() -> dict:
    """The engine settings from Preferences, as plain strings ("" where the default applies)."""
    s = settings()
    return {name: str(s.value(key, "") or "").strip() for name, key in ENGINE_KEYS.items()}


def set_preferences(values: dict) -> None:
    s = settings()
    for name, key in {**ENGINE_KEYS, "output_folder": OUTPUT_FOLDER_KEY, "ui_scale": UI_SCALE_KEY}.items():
        if name in values:
            s.setValue(key, str(values[name]).strip())
    s.sync()


def ui_scale() -> str:
    return str(settings().value(UI_SCALE_KEY, "") or "").strip()


# -- folders a graph may write in ----------------------------------------------------------------
WRITE_FOLDERS_KEY = "output/allowed_folders"


def allowed_write_folders() -> list[str]:
    """Folders the user picked with a folder picker (a Save Image folder, say): graphs run in the
    app may write there as well as in the output folder. Kept in the app's settings, never in a
    graph file, so a shared graph cannot grant itself a folder."""
    value = settings().value(WRITE_FOLDERS_KEY, [])
    if isinstance(value, str):
        value = [value]
    return [str(v) for v in (value or []) if str(v).strip()]


def allow_write_folder(folder: str) -> None:
    folders = allowed_write_folders()
    if folder and folder not in folders:
        s = settings()
        s.setValue(WRITE_FOLDERS_KEY, folders + [folder])
        s.sync()


# -- models folders ---------------------------------------------------------------------------
MODEL_FOLDERS_KEY = "models/folders"


def model_folders() -> list[str]:
    """The models folders set in the app (File > Models Folders), in order."""
    value = settings().value(MODEL_FOLDERS_KEY, [])
    if isinstance(value, str):  # QSettings gives a one-item list back as a plain string
        value = [value]
    return [str(v) for v in (value or []) if str(v).strip()]


def set_model_folders(folders: list[str]) -> None:
    s = settings()
    s.setValue(MODEL_FOLDERS_KEY, [f for f in folders if f.strip()])
    s.sync()


def all_model_roots() -> list[str]:
    """Where `ckpt:` names are looked up: the app's folders, then those in LOOMWORK_MODELS."""
    from kernels.model_folders import roots_from_env

    roots = [os.path.expanduser(f) for f in model_folders()]
    return roots + [r for r in roots_from_env() if r not in roots]


# -- recent files ---------------------------------------------------------------------------
def _recent_file() -> Path:
    return data_dir() / "recent.json"


def recent_files() -> list[str]:
    try:
        items = json.loads(_recent_file().read_text("utf-8"))
        return [p for p in items if isinstance(p, str)][:MAX_RECENT]
    except (OSError, ValueError):
        return []


def add_recent(path: str) -> list[str]:
    path = str(Path(path).resolve())
    items = [path] + [p for p in recent_files() if p != path]
    items = items[:MAX_RECENT]
    try:
        atomic_write(_recent_file(), json.dumps(items, indent=1).encode("utf-8"))
    except OSError:
        pass
    return items


# -- autosave -------------------------------------------------------------------------------
def autosave_dir() -> Path:
    d = data_dir() / "autosave"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class Recovery:
    """An autosave left by a session that did not exit cleanly."""

    def __init__(self, graph_file: Path, info: dict):
        self.graph_file, self.info = graph_file, info

    @property
    def original_path(self) -> Optional[str]:
        return self.info.get("path")

    @property
    def when(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.info.get("time", 0)))

    def discard(self) -> None:
        for f in (self.graph_file, self.graph_file.with_suffix(".json")):
            try:
                f.unlink()
            except OSError:
                pass


def find_recoveries() -> list[Recovery]:
    out = []
    for info_file in sorted(autosave_dir().glob("session-*.json")):
        try:
            info = json.loads(info_file.read_text("utf-8"))
            pid = int(info.get("pid", -1))
        except (OSError, ValueError):
            continue
        graph_file = info_file.with_suffix(".loom")
        if not _pid_alive(pid) and graph_file.exists():
            out.append(Recovery(graph_file, info))
    out.sort(key=lambda r: r.info.get("time", 0), reverse=True)
    return out


class Autosave(QtCore.QObject):
    """Writes the document to the autosave folder after `idle_ms` without edits, and at the
    latest `max_wait_ms` after the first edit it does not hold yet.

    Edits are seen as the document announces them, not as undo steps: typing in a field merges
    into one undo step (the stack's index does not move), and it must be saved too.
    """

    saved = QtCore.Signal(str)

    def __init__(self, doc: Document, parent=None, idle_ms: int = AUTOSAVE_IDLE_MS,
                 max_wait_ms: int = AUTOSAVE_MAX_WAIT_MS):
        super().__init__(parent)
        self.doc = doc
        stem = f"session-{os.getpid()}-{id(self) & 0xffff:04x}"
        self.graph_file = autosave_dir() / f"{stem}.loom"
        self.info_file = autosave_dir() / f"{stem}.json"
        self.timer = QtCore.QTimer(self, singleShot=True, interval=idle_ms)  # restarted by each edit
        self.deadline = QtCore.QTimer(self, singleShot=True, interval=max_wait_ms)  # not restarted
        for t in (self.timer, self.deadline):
            t.timeout.connect(self.save_now)
        doc.undo.indexChanged.connect(self._edited)  # undo and redo
        doc.structure_changed.connect(self._edited)
        doc.node_changed.connect(self._edited)
        doc.replaced.connect(self._on_replaced)

    def _edited(self, *_args) -> None:
        self.timer.start()
        if not self.deadline.isActive():
            self.deadline.start()

    def _on_replaced(self) -> None:
        self.timer.stop()
        self.deadline.stop()
        self.discard()

    def save_now(self) -> None:
        self.timer.stop()
        self.deadline.stop()
        if not self.doc.dirty:
            self.discard()  # nothing unsaved: nothing to recover
            return
        try:
            atomic_write(self.graph_file, dumps(self.doc.graph).encode("utf-8"))
            info = {"pid": os.getpid(), "path": self.doc.path, "time": time.time()}
            atomic_write(self.info_file, json.dumps(info).encode("utf-8"))
            self.saved.emit(str(self.graph_file))
        except (OSError, ValueError):
            pass  # autosave must never get in the way

    def discard(self) -> None:
        for f in (self.graph_file, self.info_file):
            try:
                f.unlink()
            except OSError:
                pass
