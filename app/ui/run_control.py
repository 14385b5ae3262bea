"""Run control for the main window: start and cancel runs, and show what they do: node badges
(run state, or why the graph as drawn cannot run a node), progress, previews, results, and the
run's summary in the status bar.

A mixin of MainWindow: it uses the window's doc, canvas, runner, inspector, images, tables, layout_panel,
progress, run_label, act_run / act_run_sel / act_cancel and show_message.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from PySide6 import QtCore, QtGui

from nodes import registry

from . import session
from .run_queue import CANCELLED, DONE, FAILED, RUNNING, QueuedRun, RunQueue, batch_snapshots

STATE_LABELS = {"cached-memory": "cached", "cached-disk": "cached (disk)"}


def time_left(elapsed: float, steps_done: int, steps_left: int) -> str:
    """"1m 20s" from the pace so far; "" until there is a pace worth extrapolating."""
    if steps_done < 2 or elapsed < 1.0 or steps_left <= 0:
        return ""
    seconds = round(elapsed / steps_done * steps_left)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def recipe_keys(graph, ids) -> dict[str, str]:
    """A key per node of what its result is made from, as drawn: its type, params and, through
    its wires, its inputs' keys. The engine's cache keys also cover files on disk; this one needs
    no run, which is what the badges want after an edit or an undo."""
    from kernels.hashing import content_hash

    wired = graph.inputs_by_node()  # once: inputs_of per node is quadratic in a big graph
    keys: dict[str, str] = {}
    on_path: set[str] = set()
    for root in ids:
        if root not in graph.nodes or root in keys:
            continue
        # An explicit stack, not recursion: a long chain of nodes must not hit Python's limit.
        stack = [(root, False)]
        while stack:
            nid, inputs_done = stack.pop()
            if nid in keys:
                continue
            sources = [e.src for e in wired.get(nid, {}).values() if e.src in graph.nodes]
            if not inputs_done:
                on_path.add(nid)
                stack.append((nid, True))
                for src in sources:
                    if src in on_path:  # a cycle cannot run; give it a key that matches nothing
                        keys.setdefault(src, f"cycle:{src}")
                    elif src not in keys:
                        stack.append((src, False))
                continue
            on_path.discard(nid)
            inputs = {port: (keys[e.src], e.src_port) for port, e in wired.get(nid, {}).items()
                      if e.src in graph.nodes}
            keys[nid] = content_hash(graph.nodes[nid].type, graph.nodes[nid].params, inputs)
    return {nid: keys[nid] for nid in ids if nid in keys}


class RunControl:
    def _init_run_state(self) -> None:
        # Run states stay after a node is deleted, so undo brings the node back as it was.
        self.states: dict[str, str] = {}       # node id -> last run state shown
        self.errors: dict[str, str] = {}
        self.summaries: dict[str, str] = {}  # node -> what its last run said it did
        self._badges: dict[str, tuple] = {}    # node id -> (state, text, tooltip) of the last run
        self.problems: dict[str, list[str]] = {}  # node id -> why it cannot run as drawn
        self.run_started = 0.0
        self.edited_during_run: set = set()    # nodes whose results the running snapshot predates
        # What each node's last finished run was made from (recipe_keys), and its badge then, so
        # an undo back to exactly that graph shows the result as current again, not stale.
        self._run_recipes: dict[str, str] = {}
        self._ran_recipe: dict[str, str] = {}
        self._ran_badge: dict[str, tuple] = {}
        self._progress_first: dict[str, tuple] = {}  # node id -> (time, step) of its first report
        self.run_queue = RunQueue(self)
        self._current_run: Optional[QueuedRun] = None

    # -- node states and badges -----------------------------------------------------------
    def _mark_stale(self, ids: list[str]) -> None:
        """A changed input (param or wire) makes the node and everything after it out of date."""
        cone = self.doc.graph.downstream(ids)
        if self.runner.busy:  # the running snapshot predates this edit: its results will be stale
            self.edited_during_run |= cone
        recipes = recipe_keys(self.doc.graph, cone)
        for nid in cone:
            if self.states.get(nid) in (None, "running", "queued"):
                continue
            if nid in self._ran_recipe and recipes.get(nid) == self._ran_recipe[nid]:
                state, text, tip = self._ran_badge[nid]  # back to exactly what last ran
                self.states[nid] = state
                self._set_badge(nid, state, text, tip)
            elif self.states.get(nid) != "stale":
                self.states[nid] = "stale"
                self.errors.pop(nid, None)
                self._set_badge(nid, "stale", "stale", "out of date: an input changed since the last run")

    def _clear_run_state(self) -> None:
        """A new graph in the document: nothing of the old one's runs applies to it."""
        self._ran_recipe.clear()
        self._ran_badge.clear()
        self.states.clear()
        self.errors.clear()
        self._badges.clear()
        self.problems = {}

    def _show_node_status(self, nid: Optional[str]) -> None:
        if nid is None:
            self.inspector.set_status("")
            return
        state = self.states.get(nid)
        lines = []
        if state:
            lines.append(f"Last run: {STATE_LABELS.get(state, state)}")
            if nid in self.errors:
                lines.append(self.errors[nid])
            if nid in self.summaries:
                lines.append(self.summaries[nid])
        for problem in self.problems.get(nid, []):
            lines.append(f"⚠ {problem}")
        self.inspector.set_status("\n".join(lines))

    # Badges: a node's run state, unless the graph as drawn cannot run it (then what to fix).
    def _set_badge(self, nid: str, state: str, text: str = "", tip: str = "") -> None:
        self._badges[nid] = (state, text, tip)
        self._apply_badge(nid)

    def _apply_badge(self, nid: str) -> None:
        state, text, tip = self._badges.get(nid, ("idle", "", ""))
        problems = self.problems.get(nid)
        if problems and state not in ("running", "queued", "failed"):
            short = "needs input" if all("is not connected" in m for m in problems) else "invalid"
            self.canvas.set_state(nid, "invalid", short, "\n".join(problems))
        else:
            self.canvas.set_state(nid, state, text, tip)

    def _check_problems(self) -> None:
        """Validate the document (cheap: no torch) and mark nodes that could not run as drawn:
        a required input not wired, a bad param, an unknown type. Coalesced to once per edit."""
        from app.graph import validate

        found: dict[str, list[str]] = {}
        for problem in validate(self.doc.graph, registry.get):
            if problem.node_id in self.doc.graph.nodes:
                node = self.doc.graph.nodes[problem.node_id]
                message = problem.message.removeprefix(f"{node.label}: ")
                found.setdefault(problem.node_id, []).append(message)
        changed = set(found) | set(self.problems)
        self.problems = found
        for nid in changed:
            if nid in self.doc.graph.nodes:
                self._apply_badge(nid)
        if self.inspector.node_id in changed:
            self._show_node_status(self.inspector.node_id)

    # -- starting and stopping ------------------------------------------------------------
    def run_all(self) -> None:
        self._start_run(None)

    def run_selected(self) -> None:
        ids = self.canvas.selected_ids()
        if not ids:
            self.show_message("Select a node to run to")
            return
        self._start_run(ids)

    def _start_run(self, targets: Optional[list[str]]) -> None:
        """Queue the graph as it is now (`batch_count` copies, seeds raised by one each) and
        start it at once unless a run is going on."""
        path = self.doc.path if self.doc.path and not self.doc.path.lower().endswith(".png") else None
        out_dir = str(Path(path).parent / "output") if path else str(session.default_output_dir())
        for graph, label in batch_snapshots(self.doc.graph, self.batch_count.value()):
            self.run_queue.add(QueuedRun(graph, targets, path, out_dir, label))
        if self.runner.busy:
            waiting = len(self.run_queue.pending())
            self.show_message(f"Queued: {waiting} run{'s' if waiting != 1 else ''} waiting")
        self._start_next()

    def _start_next(self) -> None:
        # a run whose thread has ended may still have its finish waiting in the event queue (an
        # all-cached run ends in milliseconds): starting the next one then would let that finish
        # be booked to the new run and leave the old one "running" for ever
        if self.runner.busy or self._current_run is not None:
            return
        run = self.run_queue.next_pending()
        if run is None:
            return
        self.run_started = time.monotonic()
        self.edited_during_run = set()
        self._run_recipes = recipe_keys(run.graph, run.graph.nodes)
        if not self.runner.start(run.graph, run.targets, graph_path=run.graph_path, output_dir=run.output_dir):
            return
        self._current_run = run
        self.run_queue.mark(run, RUNNING)
        self.act_cancel.setEnabled(True)
        waiting = len(self.run_queue.pending())
        self.run_label.setText("Running…" + (f" (+{waiting} queued)" if waiting else ""))

    def _advance_seeds(self) -> None:
        """Seeds set to "increment" or "random" change after a run (undoable, like any edit)."""
        from nodes.base import Seed

        from .inspector import SEED_CONTROLS, random_seed, seed_control_key

        for nid, node in list(self.doc.graph.nodes.items()):
            spec = registry.get(node.type)
            if spec is None:
                continue
            for name, param in spec.params.items():
                control = node.meta.get(seed_control_key(name), SEED_CONTROLS[0])
                if control == "fixed" or not isinstance(param, Seed):
                    continue
                seed = int(spec.resolved_params(node.params)[name])
                hi = param.max if param.max is not None else 2**32 - 1
                new = seed + 1 if control == "increment" else random_seed(param)
                self.doc.set_param(nid, name, min(new, hi))

    def cancel_run(self) -> None:
        if self.runner.busy:
            self.runner.cancel()
            self.run_label.setText("Cancelling…")

    # -- what the runner reports ----------------------------------------------------------
    def _run_started(self, cone: list[str]) -> None:
        self._progress_first.clear()
        for nid in cone:
            self.errors.pop(nid, None)

    def _on_node_state(self, nid: str, state: str, info: dict) -> None:
        if nid not in self.doc.graph.nodes:
            return
        self.states[nid] = state
        tip = ""
        text = STATE_LABELS.get(state, state)
        if state == "failed" or (state == "skipped" and info.get("error")):
            self.errors[nid] = info.get("error", "")
            tip = info.get("error", "")
        elif "seconds" in info:
            text = f"done {info['seconds']:.1f}s"
        if info.get("summary"):  # what the node says it did: on the badge's tooltip and in the inspector
            self.summaries[nid] = tip = info["summary"]
        elif state == "running":
            self.summaries.pop(nid, None)
        if state == "running":
            self.progress.setVisible(False)
        if state in ("done", "cached-memory", "cached-disk") and nid in self._run_recipes:
            self._ran_recipe[nid] = self._run_recipes[nid]
            self._ran_badge[nid] = (state, text, tip)
        if nid in self.edited_during_run and state in ("done", "cached-memory", "cached-disk"):
            state, text, tip = "stale", "stale", "edited during the run: this result is out of date"
            self.states[nid] = state
        self._set_badge(nid, state, text, tip)
        if self.inspector.node_id == nid:
            self._show_node_status(nid)

    def _on_progress(self, nid: str, step: int, total: int) -> None:
        self.progress.setVisible(True)
        self.progress.setRange(0, max(1, total))
        self.progress.setValue(step)
        now = time.monotonic()
        first = self._progress_first.get(nid)
        if first is None or step <= first[1]:  # the node's first report (or it started over)
            self._progress_first[nid] = first = (now, step)
        left = time_left(now - first[0], step - first[1], total - step)
        text = f"running {step}/{total}" + (f" · {left} left" if left else "")
        self._set_badge(nid, "running", text)
        self.progress.setFormat(f"%v/%m · {left} left" if left else "%v/%m")

    def _on_preview(self, nid: str, image: QtGui.QImage) -> None:
        node = self.doc.graph.nodes.get(nid)
        if node is None:  # a run of the graph that was open before this one
            return
        self.canvas.show_image(nid, image)
        self.images.show_preview(image, node.title or node.type)

    def _on_images(self, nid: str, images: list, paths: list) -> None:
        node = self.doc.graph.nodes.get(nid)
        if node is None:  # a run of the graph that was open before this one (the files are saved)
            return
        label = node.title or node.type
        if images and not self.is_layout_node(self.inspector.node_id):
            self.image_dock.raise_()  # a result is not left behind the Layout tab
        if images:
            self.canvas.show_image(nid, images[0])
            self.layout_panel.set_image(images[0])
        for k, image in enumerate(images):
            self.images.add_image(image, label, paths[k] if k < len(paths) else None)

    def _on_table(self, nid: str, title: str, columns: list, rows: list) -> None:
        node = self.doc.graph.nodes.get(nid)
        if node is None:  # a run of the graph that was open before this one (the CSV is saved)
            return
        self.tables.add_table(title, columns, rows, node.title or node.type)
        if not self.is_layout_node(self.inspector.node_id):
            self.table_dock.raise_()

    def _show_traceback(self, rep) -> None:
        """A node that raised (a bug, not a NodeError): its traceback goes with its error in the
        inspector's status (all of it, selectable) and the badge's tooltip (its last lines)."""
        if not rep.traceback or rep.node_id not in self.doc.graph.nodes:
            return
        tb = rep.traceback.rstrip()
        self.errors[rep.node_id] = f"{rep.error}\n\n{tb}"
        state, text, _tip = self._badges.get(rep.node_id, ("failed", "failed", ""))
        self._set_badge(rep.node_id, state, text, f"{rep.error}\n\n" + "\n".join(tb.splitlines()[-12:]))

    def _run_finished(self, report) -> None:
        self.act_cancel.setEnabled(False)
        self.progress.setVisible(False)
        QtCore.QTimer.singleShot(0, self._start_next)  # the queue goes on
        seconds = time.monotonic() - self.run_started
        run, self._current_run = self._current_run, None
        if isinstance(report, str):
            self.run_label.setText("Run failed")
            self.show_message(f"Run failed: {report}", 15000)
            if run is not None:
                self.run_queue.mark(run, FAILED, report[:200])
            return
        counts: dict[str, int] = {}
        for rep in report.nodes.values():
            counts[rep.status] = counts.get(rep.status, 0) + 1
        ran = counts.get("done", 0)
        cached = counts.get("cached-memory", 0) + counts.get("cached-disk", 0)
        failed = [r for r in report.nodes.values() if r.status == "failed"]
        for rep in failed:
            self._show_traceback(rep)
        if report.cancelled:
            summary = f"Cancelled after {seconds:.1f} s ({ran} node(s) finished and stay cached)"
            short = "Cancelled"
        elif failed:
            first = failed[0]
            summary = f"{len(failed)} node(s) failed: {first.title}: {first.error}"
            short = f"{len(failed)} failed"
        else:
            summary = f"Done in {seconds:.1f} s: {ran} ran, {cached} cached"
            short = f"Last run {seconds:.1f} s"
        self.run_label.setText(short)
        self.run_label.setToolTip(summary)
        self.show_message(summary, 15000)
        if run is not None:
            status = CANCELLED if report.cancelled else FAILED if failed else DONE
            self.run_queue.mark(run, status, summary[:200])
        if not report.cancelled and not self.run_queue.pending():
            self._advance_seeds()
        if self.inspector.node_id:
            self._show_node_status(self.inspector.node_id)
