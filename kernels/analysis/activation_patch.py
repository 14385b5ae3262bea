"""Activation patching of cross-attention (Precise Parameter Localization): which layers carry
what a prompt says.

A run with prompt A where chosen cross-attention layers read prompt B's text instead: each chosen
layer's `encoder_hidden_states` (what its keys and values are computed from) is replaced by what
that layer receives in a run with B. Patching every cross-attention layer of a UNet whose text
enters only through cross-attention (SD 1.x/2.x, the built-in model) is therefore exactly a run
with B; patching none is a run with A. Patching one layer at a time and measuring how far the
image moves from A towards B localises the layers that carry the difference.

In a guided call the batch is [unconditional, conditional]: the unconditional rows are the same in
both runs and kept; the conditional rows get B. A call on the conditional rows alone gets B on
every row. SDXL's pooled text (the time embedding) is not a cross-attention input and stays A's.

How it is done: a forward pre-hook on each chosen `attn2` module swaps the keyword argument for
the run, removed on exit, so attention processors (layout patches) see B's text as they would in
B's own run.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch

from kernels.hashing import content_hash
from kernels.patching import ModelPatch, SamplingRun


class ActivationPatchError(ValueError):
    """A layer set or text the patch cannot use."""


def cross_attention_layers(unet: Any) -> list[str]:
    """Module names of the UNet's cross-attention layers (diffusers' `...attn2`), in order."""
    from kernels.sampling import takes_pooled_projections

    if takes_pooled_projections(unet) or not hasattr(unet, "down_blocks"):
        raise ActivationPatchError(f"activation patching reads a UNet's cross-attention layers; "
                                   f"{type(unet).__name__} has none (a joint-attention transformer)")
    return [name for name, m in unet.named_modules()
            if name.split(".")[-1] == "attn2" and getattr(m, "is_cross_attention", True)]


def select_layers(unet: Any, spec: str) -> tuple[str, ...]:
    """The layers a spec names: "all", "none", or comma-separated names or prefixes
    ("up_blocks.0", "mid_block", a full `...attn2` name)."""
    layers = cross_attention_layers(unet)
    words = [w.strip() for w in spec.split(",") if w.strip()]
    if words == ["all"]:
        return tuple(layers)
    if words in ([], ["none"]):
        return ()
    chosen = []
    for word in words:
        hits = [n for n in layers if n == word or n.startswith(word + ".")]
        if not hits:
            raise ActivationPatchError(f"no cross-attention layer matches {word!r}; the layers are "
                                       f"{', '.join(layers)}")
        chosen += [n for n in hits if n not in chosen]
    return tuple(n for n in layers if n in chosen)


class CrossAttentionPatch(ModelPatch):
    """Prompt B's text (B, L, D embeddings) fed to the cross-attention layers `layers` of a run."""

    kind = "activation-patch"

    def __init__(self, text: torch.Tensor, layers: Sequence[str]):
        if text.ndim != 3:
            raise ActivationPatchError(f"the patched text must be (batch, tokens, width), got {tuple(text.shape)}")
        self.text = text.detach()
        self.layers = tuple(layers)
        self._key = f"activation-patch:{content_hash(self.text)}:{','.join(self.layers)}"

    def cache_key(self) -> str:
        return self._key

    def describe(self) -> str:
        return f"cross-attention patch ({len(self.layers)} layers)"

    def replaced(self, states: torch.Tensor, run: Optional[SamplingRun]) -> torch.Tensor:
        """The cross-attention input of a call with B in place of A on the conditional rows."""
        if states.shape[1:] != self.text.shape[1:]:
            raise ActivationPatchError(f"prompt B's text is {tuple(self.text.shape[1:])} but the run's is "
                                       f"{tuple(states.shape[1:])}: encode both prompts with one text encoder "
                                       f"and the same chunk count")
        rows = states.shape[0]
        batch = run.latent_shape[0] if run is not None else rows
        b = self.text.to(states.device, states.dtype)
        if rows == 2 * batch:  # [unconditional, conditional]
            return torch.cat([states[:batch], b.expand(batch, -1, -1)])
        return b.expand(rows, -1, -1)

    @contextlib.contextmanager
    def applied(self, unet: Any, run: Optional[SamplingRun]) -> Iterator[None]:
        def swap(_module, args, kwargs):
            states = kwargs.get("encoder_hidden_states")
            if states is None:
                return None
            return args, {**kwargs, "encoder_hidden_states": self.replaced(states, run)}

        handles = [unet.get_submodule(name).register_forward_pre_hook(swap, with_kwargs=True)
                   for name in self.layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def image_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean absolute difference of two images (or latents)."""
    return float((x.float() - y.float()).abs().mean())


def effect_rows(layers: Sequence[str], render, image_a: torch.Tensor, image_b: torch.Tensor) -> list[list]:
    """One row per layer, patched alone: [layer, distance from A, share of the way to B]
    (1 - d(patched, B) / d(A, B); 0 when A and B give one image). render(layers) -> image."""
    d_ab = image_distance(image_a, image_b)
    rows = []
    for name in layers:
        img = render((name,))
        toward = 1.0 - image_distance(img, image_b) / d_ab if d_ab > 0 else 0.0
        rows.append([name, round(image_distance(img, image_a), 6), round(toward, 6)])
    return rows


def effect_table(rows: list[list]):
    from kernels.analysis.table import Table

    return Table("Activation patching, one layer at a time (prompt B into A's run)",
                 ["layer", "change from A", "toward B"], sorted(rows, key=lambda r: (-r[2], r[0])))
