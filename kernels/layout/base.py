"""The shared base of the layout patches: a patch is a value, a run holds the state.

A patch (`LayoutPatch`) lives inside a MODEL that the engine caches and reuses, so it holds only
its settings. Everything one sampling run needs (the boxes resolved against the run's prompt,
their masks, the attention controller, a guidance technique's memory) lives in a `LayoutRun`
that `applied` makes for that run, registers with the run's attention controller (it is the
transform the processors call, see kernels.attention) and files in `run.state` under the patch,
where `before_step` finds it. The run's state goes when the run does.
"""

from __future__ import annotations

import contextlib
import json
from typing import Iterator, Optional

from kernels.attention import AttentionController, controller_for, registered, self_attention_recording
from kernels.patching import ModelPatch, SamplingRun

from .boxes import MaskCache, layout_key, resolve_layout


class LayoutRun:
    """One sampling run of a layout patch: its boxes (with their prompt tokens), their masks at
    each resolution and the run's attention controller. Subclasses add the technique's
    transform methods (kernels.attention's interface) and per-run memory."""

    def __init__(self, patch: "LayoutPatch", run: SamplingRun, boxes: list[dict]):
        self.patch = patch
        self.run = run
        self.boxes = boxes
        self.masks = MaskCache(boxes)
        self.ctl: Optional[AttentionController] = None

    def self_attention_layers(self, unet) -> list[str]:
        """attn1 processor names whose self-attention this run records (none by default)."""
        return []


class LayoutPatch(ModelPatch):
    """Shared plumbing: a layout and a step window; each run resolves the layout against the
    run's prompt and installs the controller."""

    kind = "layout"
    run_class: type = LayoutRun

    def __init__(self, layout: Optional[dict], start: float = 0.0, end: float = 1.0):
        self.layout = layout or {"boxes": []}
        self.start, self.end = float(start), float(end)

    def params_key(self) -> dict:
        return {}

    def cache_key(self) -> str:
        return f"{self.kind}:{layout_key(self.layout)}:{self.start}:{self.end}:" + \
            json.dumps(self.params_key(), sort_keys=True)

    def is_noop(self) -> bool:
        return not self.layout.get("boxes")

    def boxes_for(self, run: SamplingRun) -> list[dict]:
        """The boxes a run works with: those whose phrase is in the run's prompt, with tokens."""
        return resolve_layout(self.layout, run.positive)

    def new_run(self, run: SamplingRun) -> LayoutRun:
        """This patch's state for one run, of the technique's own `run_class`."""
        return self.run_class(self, run, self.boxes_for(run))

    def run_state(self, run: Optional[SamplingRun]) -> Optional[LayoutRun]:
        """The state of this patch in `run` (None outside `applied`, or when it is a no-op)."""
        state = getattr(run, "state", None)
        return state.get(self) if state is not None else None

    @contextlib.contextmanager
    def applied(self, unet, run) -> Iterator[Optional[LayoutRun]]:
        if run is None or self.is_noop():
            yield None
            return
        state = self.new_run(run)
        names = state.self_attention_layers(unet)
        with controller_for(unet, run) as ctl, self_attention_recording(unet, ctl, names), \
                registered(ctl, state):
            state.ctl = ctl
            run.state[self] = state
            try:
                yield state
            finally:
                run.state.pop(self, None)
