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
    try:
        from app.ui import main as ui_main
    except ImportError as exc:
        print(f"error: the desktop app is not available ({exc}); use `loomwork run GRAPH.loom`",
              file=sys.stderr)
        return 2
    return ui_main(argv)


if __name__ == "__main__":
    sys.exit(main())
