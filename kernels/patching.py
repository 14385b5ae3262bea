"""Model patches: changes applied to a shared model only for the duration of one run.

A MODEL (or CLIP) is shared by every node downstream of its loader and by the engine's caches,
so a patch never mutates it for good. Instead a node returns `bundle.with_patch(p)`: a new bundle
over the same modules that records `p`. The sampler (or text encoder) enters every recorded
patch's `applied()` context around its work: weights are swapped for patched copies and
attention processors installed, and both are put back on exit. Runs are sequential (the engine
runs one graph at a time), so the temporary change is never seen by anyone else.

A patch may also
- steer the latent before each step (`before_step`: gradient guidance such as ZestGuide), and
- pass keyword arguments to the UNet call (`unet_kwargs`: e.g. cross_attention_kwargs).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch


@dataclass
class SamplingRun:
    """What a patch may look at during one sampling run."""

    unet: Any
    scheduler: Any
    positive: Any              # kernels.text.Conditioning
    negative: Any              # Conditioning or None
    cfg: float
    steps: int
    latent_shape: tuple
    timesteps: Optional[torch.Tensor] = None
    generator: Optional[torch.Generator] = None
    state: dict = field(default_factory=dict)  # scratch space shared by patches within a run
    # what the denoiser also takes in a call on the positive alone (SDXL: added_cond_kwargs)
    positive_kwargs: dict = field(default_factory=dict)


class ModelPatch:
    """Base class of patches. Subclasses override what they need."""

    kind: str = "patch"

    def cache_key(self) -> str:
        """Changes whenever the patch's effect changes; goes into the engine's cache keys."""
        raise NotImplementedError

    @contextlib.contextmanager
    def applied(self, module: Any, run: Optional[SamplingRun]) -> Iterator[None]:
        yield

    def before_step(self, run: SamplingRun, i: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x

    def unet_kwargs(self, run: SamplingRun) -> dict:
        return {}

    def describe(self) -> str:
        return self.kind


@contextlib.contextmanager
def applied_patches(patches: Sequence[ModelPatch], module: Any,
                    run: Optional[SamplingRun] = None) -> Iterator[None]:
    """Enter every patch's `applied` context in order; exit in reverse."""
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p.applied(module, run))
        yield


@contextlib.contextmanager
def swapped_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Point parameters `name -> tensor` at new tensors, and back to the originals on exit.

    Swapping (rather than adding a delta and subtracting it again) leaves the original weights
    bit-identical, which is what lets cached results of the unpatched model stay valid.
    """
    originals: dict[str, torch.Tensor] = {}
    try:
        for name, tensor in weights.items():
            param = module.get_parameter(name)
            originals[name] = param.data
            param.data = tensor.to(param.device, param.dtype)
        yield
    finally:
        for name, tensor in originals.items():
            module.get_parameter(name).data = tensor


@contextlib.contextmanager
def attention_processors(unet: Any, processors: dict[str, Any]) -> Iterator[None]:
    """Install attention processors for some layers (by `attn_processors` name), restore on exit."""
    before = dict(unet.attn_processors)
    unknown = set(processors) - set(before)
    if unknown:
        raise KeyError(f"no attention layers named {sorted(unknown)[:3]}")
    try:
        unet.set_attn_processor({**before, **processors})
        yield
    finally:
        unet.set_attn_processor(before)


def merged_unet_kwargs(patches: Sequence[ModelPatch], run: SamplingRun) -> dict:
    """Merge the patches' UNet kwargs; cross_attention_kwargs dicts are merged key by key."""
    out: dict = {}
    for p in patches:
        for k, v in p.unet_kwargs(run).items():
            if k == "cross_attention_kwargs":
                out.setdefault(k, {}).update(v)
            else:
                out[k] = v
    return out
