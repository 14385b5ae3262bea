"""The `loomwork` command: a CLI verb runs headless; no verb (or a graph/PNG path) opens the app."""

from __future__ import annotations

import sys
from typing import Optional

from app.cli import COMMANDS  # torch- and Qt-free

CLI_COMMANDS = {*COMMANDS, "-h", "--help"}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--smoke" in argv:
        from app.smoke import run_smoke

        return run_smoke()
    verbs = [a for a in argv if not a.startswith("--debug")]
    if verbs and verbs[0] in CLI_COMMANDS:
        from app.cli import main as cli_main

        return cli_main(argv)
    problem = not_a_file_to_open(verbs)
    if problem:  # said before Qt starts: a typo must not open (or hang) a window
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        from app.ui import main as ui_main
    except ImportError as exc:
        print(f"error: the desktop app is not available ({exc}); use `loomwork run GRAPH.loom`",
              file=sys.stderr)
        return 2
    return ui_main(argv)


def not_a_file_to_open(words: list[str]) -> Optional[str]:
    """Why the first word that is not an option cannot be opened in the app (an unknown command,
    a missing file), or None."""
    import os

    path = next((w for w in words if not w.startswith("-")), None)
    if path is None or os.path.isfile(path):
        return None
    if os.path.exists(path):
        return f"{path}: not a graph file (a .loom file or a PNG Loomwork saved)"
    if os.path.splitext(path)[1] or os.sep in path or (os.altsep and os.altsep in path):
        return f"{path}: no such file"
    return (f"{path!r} is not a command (commands: {', '.join(COMMANDS)}) nor a file; "
            f"run `loomwork --help`")


if __name__ == "__main__":
    sys.exit(main())
