"""What a running node may use (`NodeContext`): progress and cancel, device, models, the
paths it may write, and image and table output. The executor makes one per node run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

from app.graph.errors import MESSAGE_CHARS, brief
from app.graph.png import png_bytes
from kernels.files import atomic_write
from nodes.base import NodeError, file_name_problem


class Cancelled(Exception):
    """Raised inside a node when the user cancels; the engine stops cleanly."""


class NodeContext:
    """What a node may use: progress and cancel, device, models, paths, image output."""

    # executor: the Executor; run: its per-run state (typed loosely: the executor imports this module)
    def __init__(self, executor: Any, run: Any, node_id: str):
        self._executor, self._run, self.node_id = executor, run, node_id
        self.device = executor.device
        self.models = executor.models
        self.run_budget = executor.run_budget  # bytes a run may take (kernels.run_memory)
        self._last_preview = 0.0

    def resolve_path(self, path: str, kinds: Optional[tuple] = None) -> str:
        return self._executor.resolve_path(path, self._run.graph_dir, kinds)

    def output_path(self, path: Optional[str], default_dir: "str | Path | None" = None) -> Path:
        """Where this node may write `path` (a file or folder): relative to `default_dir` (the
        run's output folder unless given), `~` expanded, symlinks followed. A graph writes only
        inside the output folder, `default_dir` and the folders the user allowed (a graph in a
        shared PNG is not trusted to name any other place): else a NodeError naming the node
        and the path."""
        base = Path(default_dir).expanduser() if default_dir else self._run.output_dir
        label = self._run.graph.nodes[self.node_id].label
        try:
            target = base / Path(path).expanduser() if path else base
            resolved = target.resolve()
        except (ValueError, OSError, RuntimeError) as exc:  # a NUL byte, a symlink loop, ...
            raise NodeError(f"{label}: cannot write {brief(str(path), 200)!r}: {brief(str(exc), 200)}") from None
        roots = [self._run.output_dir, *self._run.write_dirs] + ([base] if default_dir else [])
        if any(resolved.is_relative_to(Path(r).expanduser().resolve()) for r in roots):
            return resolved
        allowed = ", ".join(brief(str(r), 200) for r in roots)
        raise NodeError(f"{label}: refused to write {brief(str(path or target), 200)!r} ({brief(str(resolved), 200)}): "
                        f"a graph writes only inside {allowed}; choose a folder there, or allow this one "
                        f"in the app")

    def output_file(self, path: str, default_dir: "str | Path | None" = None) -> Path:
        """Where this node writes the file `path` (as `output_path` allows it), its folder made
        and cleared of the temporary files killed writers left there (once per executor)."""
        target = self.output_path(path, default_dir)
        self.output_folder(target.parent)
        return target

    def output_folder(self, folder: Path) -> None:
        """Make `folder` (an allowed place, from `output_path`) and sweep its stale temporary files."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            label = self._run.graph.nodes[self.node_id].label
            raise NodeError(f"{label}: cannot make the folder {brief(str(folder), 200)!r}: "
                            f"{brief(str(exc), 200)}") from None
        self._executor.sweep_stale_temps_once(folder)

    def summary(self, text: str) -> None:
        """Say in a line what this run did (what an eraser preserved, ...): the report keeps it
        and the node's done event carries it, so the app can show it on the node."""
        self._run.report.nodes[self.node_id].summary = brief(str(text), MESSAGE_CHARS)

    def check_cancel(self) -> None:
        if self._run.cancel.is_set():
            raise Cancelled()

    def progress(self, step: int, total: int, preview: Optional[Callable[[], Any]] = None,
                 sampler_step: bool = True) -> None:
        """Report step `step` of `total`; `preview()` makes a preview latent (NCHW, -1..1).

        `sampler_step=False` for progress that is not a model denoising step (training, say),
        so the report's sampler-step count stays what benchmarks read it as.
        """
        if sampler_step:
            self._run.report.sampler_steps += 1
        self._run.events.progress(self.node_id, step, total)
        now = time.monotonic()
        if preview is not None and self._run.events.preview is not None and (
                step == total or now - self._last_preview > 0.1):
            from kernels.images import model_to_image

            self._last_preview = now
            self._run.events.preview(self.node_id, model_to_image(preview()))
        self.check_cancel()

    def show_images(self, images, paths: list[str]) -> None:
        self._run.report.nodes[self.node_id].outputs.extend(paths)
        self._run.events.images(self.node_id, images, paths)

    def show_table(self, table) -> None:
        """A result table for the app to show, as show_images does for images. Once per run: a
        node's TABLE outputs are shown when it finishes, so Save Table of a table that ran
        this run adds no second copy (of one from the cache, it is the one shown)."""
        if any(shown is table for shown in self._run.shown_tables):
            return
        self._run.shown_tables.append(table)
        self._run.events.tables(self.node_id, table)

    def save_images(self, images, folder: Optional[str], prefix: str, embed_graph: bool) -> list[str]:
        from kernels.images import to_pil

        target = self.output_path(folder)  # a relative folder is inside the output folder
        safe = "".join(c for c in prefix if c.isalnum() or c in "-_.").strip(".") or "loomwork"
        problem = file_name_problem(safe)
        if problem:
            raise NodeError(f"the prefix {problem}")
        self.output_folder(target)
        graph_text = self._run.graph_text if embed_graph else None
        paths = []
        counter = _next_counter(target, safe)
        for pil in to_pil(images):
            path = target / f"{safe}_{counter:05d}.png"
            counter += 1
            atomic_write(path, png_bytes(pil, graph_text), durable=False)
            paths.append(str(path))
        return paths


def _next_counter(folder: Path, prefix: str) -> int:
    best = 0
    for p in folder.glob(f"{prefix}_*.png"):
        tail = p.stem[len(prefix) + 1:]
        if tail.isdigit():
            best = max(best, int(tail))
    return best + 1

