"""Magnitude pruning: zero the smallest-magnitude weights of the denoiser and the text encoder.

Post-training unstructured magnitude pruning as studied for Stable Diffusion 2 (no retraining):
among the weights of every Linear and Conv layer (biases, norms and embeddings are kept), the
fraction `sparsity` with the smallest |w| is set to zero, either ranked over all layers at once
("global") or within each layer ("layer"). The count is exact: k = round(sparsity * N) entries
are zeroed, ties at the threshold broken in parameter order, so the achieved sparsity is the
target up to one weight in N (plus weights that were zero already, when there are more of them).

The pruned weights are swapped in for one run (kernels.patching.swapped_weights) and the
originals put back, so the shared module is never changed; sparsity 0 swaps nothing.
Written here because torch.nn.utils.prune reparametrises modules in place (weight_orig + mask
buffers and forward pre-hooks), which a patch that must leave the shared model untouched cannot do.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch

from kernels.patching import ModelPatch, SamplingRun, swapped_weights

SCOPES = ("global", "layer")
PRUNABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)


class PruningError(ValueError):
    """A pruning setting that cannot be honoured."""


def prunable_weights(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """`name -> weight` of every Linear/Conv layer of `module`, in parameter order."""
    return {f"{name}.weight" if name else "weight": m.weight for name, m in module.named_modules()
            if isinstance(m, PRUNABLE) and isinstance(getattr(m, "weight", None), torch.nn.Parameter)}


def _check(sparsity: float, scope: str) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise PruningError(f"pruning sparsity must be in [0, 1), got {sparsity}")
    if scope not in SCOPES:
        raise PruningError(f"pruning scope must be one of {SCOPES}, got {scope!r}")


def _zero_smallest(weights: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Copies of `weights` with exactly the k smallest |w| (over all of them) set to zero."""
    if k <= 0:
        return {}
    magnitudes = {n: w.detach().abs().float().flatten() for n, w in weights.items()}
    threshold = torch.cat(list(magnitudes.values())).kthvalue(k).values
    below = {n: a < threshold for n, a in magnitudes.items()}
    ties_left = k - sum(int(m.sum()) for m in below.values())
    out = {}
    for name, weight in weights.items():
        mask = below[name]
        if ties_left > 0:  # entries equal to the threshold, first ones first, until k are zeroed
            ties = (magnitudes[name] == threshold).nonzero().flatten()[:ties_left]
            mask[ties] = True
            ties_left -= len(ties)
        if mask.any():
            out[name] = weight.detach().flatten().masked_fill(mask.to(weight.device), 0).view_as(weight)
    return out


@torch.no_grad()
def pruned_weights(module: torch.nn.Module, sparsity: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """`name -> pruned copy` of the Linear/Conv weights of `module` at `sparsity` (only the
    weights that change); empty at sparsity 0."""
    _check(sparsity, scope)
    weights = {n: p.data for n, p in prunable_weights(module).items()}
    if sparsity == 0.0 or not weights:
        return {}
    if scope == "global":
        total = sum(w.numel() for w in weights.values())
        return _zero_smallest(weights, round(sparsity * total))
    out = {}
    for name, weight in weights.items():
        out.update(_zero_smallest({name: weight}, round(sparsity * weight.numel())))
    return out


def achieved_sparsity(module: torch.nn.Module) -> float:
    """The share of zeros among the Linear/Conv weights of `module`."""
    weights = list(prunable_weights(module).values())
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(total, 1)


class MagnitudePrunePatch(ModelPatch):
    """The smallest-magnitude Linear/Conv weights of the module it is applied to (the UNet or the
    text encoder) zeroed for one run; computed from the module's weights as they are when the
    run starts (after any earlier patch), put back on exit."""

    kind = "magnitude-prune"

    def __init__(self, sparsity: float, scope: str = "global"):
        _check(float(sparsity), scope)
        self.sparsity = float(sparsity)
        self.scope = scope

    def cache_key(self) -> str:
        return f"magnitude-prune:{self.scope}:{self.sparsity!r}"

    def describe(self) -> str:
        return f"magnitude prune {self.sparsity:.1%} ({self.scope})"

    @contextlib.contextmanager
    def applied(self, module: Any, run: Optional[SamplingRun]) -> Iterator[None]:
        with swapped_weights(module, pruned_weights(module, self.sparsity, self.scope)):
            yield
