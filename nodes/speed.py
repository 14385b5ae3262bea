"""Speed nodes: FeatureCache (reuse deep UNet features between steps) and MagnitudePrune (zero
the smallest weights). Both return patched bundles; the math is in kernels.speed."""

from __future__ import annotations

from .base import CLIP, MODEL, Choice, Float, Int, Node, NodeError
from .registry import register

SCHEDULES = ("uniform", "non-uniform")  # kernels.speed.feature_cache.SCHEDULES (no torch here)
SCOPES = ("global", "layer")            # kernels.speed.magnitude_pruning.SCOPES
TARGETS = ("both", "unet", "text encoder")


@register
class FeatureCache(Node):
    """Feature inheritance (DeepCache, A-SDM tuning-free): on steps between refreshes only the
    shallow UNet levels run and the deep blocks' outputs of the last refresh step are reused.
    Interval 1 refreshes every step (off)."""

    category = "sampling"
    inputs = {"model": MODEL}
    params = {
        "interval": Int(3, 1, 20, help="refresh the deep features every this many steps; 1 = off"),
        "depth": Int(1, 1, 8, help="shallow levels (down/up block pairs) that run on every step"),
        "schedule": Choice(SCHEDULES, "uniform",
                           help="refresh steps evenly spaced, or denser at the start and end"),
    }
    outputs = {"model": MODEL}

    def run(self, ctx, model, interval, depth, schedule):
        from kernels.speed.feature_cache import FeatureCacheError, FeatureCachePatch, skipped_modules

        try:
            skipped_modules(model.unet, depth)
            patch = FeatureCachePatch(interval, depth, schedule)
        except FeatureCacheError as exc:
            raise NodeError(f"FeatureCache: {exc}") from None
        return {"model": model.with_patch(patch)}


@register
class MagnitudePrune(Node):
    """Magnitude pruning (no retraining): zero the smallest |w| of the Linear/Conv weights of the
    UNet and/or the text encoder, ranked over all layers or within each. Sparsity 0 is off."""

    category = "sampling"
    inputs = {"model": MODEL, "clip": CLIP}
    params = {
        "sparsity": Float(0.3, 0.0, 0.95, step=0.05, help="share of the weights set to zero"),
        "scope": Choice(SCOPES, "global", help="rank weights over all layers, or within each layer"),
        "target": Choice(TARGETS, "both", help="which model to prune"),
    }
    outputs = {"model": MODEL, "clip": CLIP}

    def run(self, ctx, model, clip, sparsity, scope, target):
        from kernels.speed.magnitude_pruning import MagnitudePrunePatch, PruningError

        if target not in TARGETS:
            raise NodeError(f"MagnitudePrune: target must be one of {TARGETS}, got {target!r}")
        try:
            patch = MagnitudePrunePatch(sparsity, scope)
        except PruningError as exc:
            raise NodeError(f"MagnitudePrune: {exc}") from None
        if sparsity == 0.0:
            return {"model": model, "clip": clip}
        return {"model": model.with_patch(patch) if target in ("both", "unet") else model,
                "clip": clip.with_patch(patch) if target in ("both", "text encoder") else clip}
