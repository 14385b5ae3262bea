"""Layout to image: boxes with phrases steer where things appear. Training-free, any SD-family
UNet; MM-DiT joint-attention masks for SD3 (and FLUX from code).

One technique, one module; each module's docstring names its paper and the sources it was
checked against. The techniques are `ModelPatch`es that compose through one attention processor
stack (kernels.attention):

- boxes: box masks, layout keys, a phrase's prompt tokens (`resolve_layout`), the mask cache.
- base: `LayoutPatch` (a value: its settings only) and `LayoutRun` (one sampling run's state).
- region_attention: Paint-with-Words (eDiff-I) logit bias, `RegionAttentionPatch`.
- regional_prompts: per-region prompts, `RegionalPromptPatch`.
- guidance: gradient guidance from attention maps (`GuidancePatch`), the loss trace.
- zestguide: ZestGuide, `ZestGuidePatch`.
- box_guidance: CSG / BoxDiff box constraints and CSG redistribution, `BoxGuidancePatch`.
- a_star: A-STAR segregation and retention, `AStarPatch`.
- joint_attention: 3DIS-FLUX masks for MM-DiT joint attention (SD3, FLUX),
  `JointAttentionMaskPatch`.
- heatmaps: attention heat maps (`AttentionRecordPatch`, the AttentionMaps node).
- defaults: the techniques' default settings, shared with the nodes (no torch).

The names below are importable from `kernels.layout` itself. They load on first use, so that
`kernels.layout.defaults` can be read before torch is (the node catalogue does).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "boxes": ("STOPWORDS", "MaskCache", "box_mask", "layout_key", "phrase_positions",
              "prompt_tokens", "resolve_layout"),
    "base": ("LayoutPatch", "LayoutRun"),
    "region_attention": ("RegionAttentionPatch", "RegionAttentionRun"),
    "regional_prompts": ("RegionalPromptPatch", "RegionalPromptRun"),
    "guidance": ("GUIDANCE_TRACE", "GuidancePatch", "GuidanceRun", "GuidanceTrace", "input_scale",
                 "noise_fraction", "schedule_index", "token_maps"),
    "zestguide": ("ZestGuidePatch", "ZestGuideRun", "zest_loss"),
    "box_guidance": ("BoxGuidancePatch", "BoxGuidanceRun", "box_losses", "csg_sample",
                     "csg_self_attention_layers", "inter_token_loss", "self_attention_loss",
                     "unet_attention_level"),
    "a_star": ("AStarPatch", "AStarRun", "binarise", "gaussian_smooth", "retention_loss",
               "segregation_loss"),
    "joint_attention": ("FluxLayoutAttnProcessor", "JointAttentionMaskPatch", "JointMaskController",
                        "JointMaskRun", "SD3LayoutAttnProcessor", "flux_attention_names", "is_mmdit",
                        "is_sd3", "joint_attention_mask", "masked_attention", "mmdit_tokens_hw",
                        "sd3_joint_qkv"),
    "heatmaps": ("AttentionRecordPatch", "heat_colours", "heatmap_grid", "select_word_tokens"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
