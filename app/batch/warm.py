"""Imported once by the local backend's forkserver, so every worker it forks starts with torch,
diffusers and the node catalogue already imported."""

from app.batch.job import warm_imports

warm_imports()

import app.cli.headless  # noqa: E402,F401
import nodes  # noqa: E402,F401
