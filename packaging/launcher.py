"""Entry point of the frozen app (PyInstaller needs a script, not a console-script entry)."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from app.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
