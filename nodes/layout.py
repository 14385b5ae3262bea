"""Layout: boxes with phrases that say where things go, and the nodes that make the model obey.

The app's layout canvas edits the Layout node's `boxes` param; the technique nodes take a MODEL
and the LAYOUT and return a patched MODEL (never changed in place), so they chain:
Layout -> RegionAttention -> ZestGuide -> Sampler. The math is in the kernels.layout package;
the parameter defaults are its (kernels.layout.defaults, which loads no torch).
"""

from __future__ import annotations

from kernels.layout import defaults
from kernels.scheduler_names import SCHEDULER_NAMES  # torch-free

from .base import (
    ATTENTION_MAPS,
    CLIP,
    CONDITIONING,
    IMAGE,
    LATENT,
    LAYOUT,
    MODEL,
    Bool,
    Choice,
    Float,
    Int,
    Json,
    Node,
    NodeError,
    Seed,
    String,
)
from .registry import register

BOX_KEYS = ("x0", "y0", "x1", "y1")
MAX_MASK_SIDE = 256


def _check_mask(mask) -> "str | None":
    if not isinstance(mask, list) or not mask:
        return "mask should be a non-empty list of rows of 0/1 values"
    if all(isinstance(r, str) for r in mask):  # the compact form: one string of "0"/"1" a row
        rows = mask
    elif all(isinstance(r, list) and r for r in mask):
        rows = None
    else:
        return "mask should be a non-empty list of rows of 0/1 values (or of \"0\"/\"1\" strings)"
    width = len(mask[0])
    if len(mask) > MAX_MASK_SIDE or width > MAX_MASK_SIDE:
        return f"mask is larger than {MAX_MASK_SIDE}x{MAX_MASK_SIDE}"
    for row in mask:
        if len(row) != width or not row:
            return "mask rows should all have the same, non-zero length"
        if rows is not None:
            if row.strip("01"):
                return "mask rows written as text should hold only 0 and 1"
        elif any(not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1 for v in row):
            return "mask values should be numbers in 0..1"
    return None


def mask_rows(mask) -> list:
    """A valid mask as rows of numbers (text rows such as "0110" become [0, 1, 1, 0])."""
    return [[int(c) for c in r] if isinstance(r, str) else list(r) for r in mask]


def check_boxes(value) -> "str | None":
    """A list of {"x0","y0","x1","y1" in 0..1 with x0 < x1 and y0 < y1, "phrase": text,
    optionally "mask": rows of 0/1 (any size) that replaces the rectangle inside the image}.

    A mask's rows are lists of numbers in 0..1, or (the compact form the layout canvas writes,
    one line a row in the file) strings of "0" and "1"."""
    if not isinstance(value, list):
        return f"boxes should be a list, got {type(value).__name__}"
    for i, box in enumerate(value):
        if not isinstance(box, dict):
            return f"box #{i} should be an object with x0, y0, x1, y1 and phrase"
        for key in BOX_KEYS:
            v = box.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                return f"box #{i}: {key} should be a number in 0..1, got {v!r}"
            if not 0.0 <= v <= 1.0:
                return f"box #{i}: {key} = {v} is outside 0..1"
        if not box["x0"] < box["x1"] or not box["y0"] < box["y1"]:
            return f"box #{i} is empty: it needs x0 < x1 and y0 < y1"
        if not isinstance(box.get("phrase", ""), str):
            return f"box #{i}: phrase should be text"
        if "mask" in box and box["mask"] is not None:
            problem = _check_mask(box["mask"])
            if problem:
                return f"box #{i}: {problem}"
        unknown = set(box) - set(BOX_KEYS) - {"phrase", "mask"}
        if unknown:
            return f"box #{i}: unknown keys {sorted(unknown)}"
    return None


@register
class Layout(Node):
    """Boxes with phrases, in 0..1 image coordinates, drawn on the layout canvas. A box may also
    carry a mask (rows of 0/1 over the whole image) that is used instead of its rectangle."""

    category = "layout"
    params = {
        "width": Int(512, 8, 8192, step=8, help="width of the image the boxes are drawn for"),
        "height": Int(512, 8, 8192, step=8, help="height of the image the boxes are drawn for"),
        "boxes": Json([], help="boxes: x0, y0, x1, y1 in 0..1 and a phrase each (optional mask)",
                      validator=check_boxes),
    }
    outputs = {"layout": LAYOUT}

    def run(self, ctx, width, height, boxes):
        return {"layout": {"width": width, "height": height,
                           "boxes": [_expanded(b) for b in boxes]}}


def _expanded(box: dict) -> dict:
    """The box as the layout kernels read it: a mask always as rows of numbers."""
    out = dict(box)
    if out.get("mask") is not None:
        out["mask"] = mask_rows(out["mask"])
    return out


def _range_params(start=0.0, end=1.0, what="acts"):
    return {
        "start": Float(start, 0.0, 1.0, step=0.05, help=f"fraction of the steps where it starts ({what})"),
        "end": Float(end, 0.0, 1.0, step=0.05, help=f"fraction of the steps where it stops ({what})"),
    }


def _check_range(start, end):
    if start > end:
        raise NodeError(f"start ({start}) is after end ({end})")


@register
class RegionAttention(Node):
    """Paint-with-Words (eDiff-I): raise each box phrase's cross-attention inside its box by
    w = strength * log(1 + sigma) * max(QK^T), strongest while the image is noisy."""

    category = "layout"
    inputs = {"model": MODEL, "layout": LAYOUT}
    params = {"strength": Float(defaults.REGION_STRENGTH, 0.0, 10.0, step=0.05,
                                help="w' of the paper; 0 = off"),
              **_range_params(),
              "suppress_outside": Bool(False, help="also push each phrase down outside its box")}
    outputs = {"model": MODEL}

    def run(self, ctx, model, layout, strength, start, end, suppress_outside):
        from kernels.layout import RegionAttentionPatch

        _check_range(start, end)
        return {"model": model.with_patch(RegionAttentionPatch(layout, strength, start, end,
                                                               suppress_outside))}


@register
class RegionalPrompts(Node):
    """Per-region prompts: inside each box the model attends to that box's own phrase (encoded
    on its own), elsewhere to the global prompt."""

    category = "layout"
    inputs = {"model": MODEL, "clip": CLIP, "layout": LAYOUT}
    params = {"mix": Float(defaults.REGIONAL_MIX, 0.0, 1.0, step=0.05,
                           help="weight of the box's phrase inside the box (1 = only the phrase)"),
              "emphasis": Float(defaults.REGIONAL_EMPHASIS, 0.0, 10.0, step=0.1,
                                help="Paint-with-Words push (w') on the phrase inside its box; 0 = off"),
              **_range_params()}
    outputs = {"model": MODEL}

    def run(self, ctx, model, clip, layout, mix, emphasis, start, end):
        from kernels.layout import RegionalPromptPatch, phrase_positions
        from kernels.patching import applied_patches
        from kernels.text import encode_text

        _check_range(start, end)
        with applied_patches(clip.patches, clip.text_encoder):
            conds = [encode_text(clip.tokenizer, clip.text_encoder, b.get("phrase", ""))
                     for b in layout["boxes"]]
        tokens = [phrase_positions(c, b.get("phrase", "")) for c, b in zip(conds, layout["boxes"])]
        return {"model": model.with_patch(RegionalPromptPatch(
            layout, [c.embeds for c in conds], mix, start, end, emphasis=emphasis, region_tokens=tokens))}


_GUIDE_PARAMS = {
    "eta": Float(defaults.GUIDANCE_ETA, 0.0, 10.0, step=0.05,
                 help="step size of the latent update; 0 = off"),
    "iterations": Int(defaults.GUIDANCE_ITERATIONS, 0, 20, help="gradient steps per guided step"),
    **_range_params(defaults.GUIDANCE_START, defaults.GUIDANCE_END, "guidance"),
}


@register
class ZestGuide(Node):
    """ZestGuide: steer the latent in the early steps so each phrase's cross-attention map
    matches its box (BCE between max-normalised maps and masks, normalised gradient step).
    Works best after RegionAttention, as in its paper."""

    display_name = "ZestGuide"

    category = "layout"
    inputs = {"model": MODEL, "layout": LAYOUT}
    params = dict(_GUIDE_PARAMS)
    outputs = {"model": MODEL}

    def run(self, ctx, model, layout, eta, iterations, start, end):
        from kernels.layout import ZestGuidePatch

        _check_range(start, end)
        return {"model": model.with_patch(ZestGuidePatch(layout, eta, start, end, iterations))}


def _box_guidance_v1_to_v2(params: dict) -> dict:
    """v2 added CSG's inter-token and self-attention losses; a v1 graph keeps its old loss."""
    return {**params, "inter": 0.0, "self_attention": 0.0}


@register
class BoxGuidance(Node):
    """Box constraints (CSG / BoxDiff family): guidance from inner-box, outer-box, corner,
    within-token, inter-token and self-attention losses on the attention maps; optionally CSG's
    attention redistribution, which moves each phrase's attention into its box (exactly 0
    outside) while it acts. The inter-token and self-attention defaults are CSG's balance
    against `within`; graphs saved before they existed load with both at 0."""

    category = "layout"
    version = 2
    migrations = {1: _box_guidance_v1_to_v2}
    inputs = {"model": MODEL, "layout": LAYOUT}
    params = {**_GUIDE_PARAMS,
              "inner": Float(defaults.BOX_INNER, 0.0, 10.0,
                             help="weight: strong responses inside the box"),
              "outer": Float(defaults.BOX_OUTER, 0.0, 10.0,
                             help="weight: no strong responses outside the box"),
              "corner": Float(defaults.BOX_CORNER, 0.0, 10.0,
                              help="weight: the map spans the box's extent"),
              "within": Float(defaults.BOX_WITHIN, 0.0, 10.0,
                              help="weight: the map's mass lies in the box"),
              "inter": Float(defaults.BOX_INTER, 0.0, 10.0,
                             help="weight: inside its box each phrase's map leads every other "
                             "phrase's by a margin (CSG inter-token loss)"),
              "self_attention": Float(defaults.BOX_SELF_ATTENTION, 0.0, 10.0,
                                      help="weight: the box's pixels attend to each other more "
                                      "than outside pixels attend to them (CSG self-attention "
                                      "loss)"),
              "redistribute": Bool(False, help="CSG attention redistribution in the denoising pass"),
              "redistribute_end": Float(defaults.BOX_REDISTRIBUTE_END, 0.0, 1.0, step=0.05,
                                        help="fraction of the steps where redistribution stops")}
    outputs = {"model": MODEL}

    def run(self, ctx, model, layout, eta, iterations, start, end, inner, outer, corner, within,
            inter, self_attention, redistribute, redistribute_end):
        from kernels.layout import BoxGuidancePatch

        _check_range(start, end)
        return {"model": model.with_patch(BoxGuidancePatch(
            layout, eta, start, end, iterations, inner=inner, outer=outer, corner=corner,
            within=within, redistribute=redistribute, redistribute_end=redistribute_end,
            inter=inter, self_attention=self_attention))}


@register
class AStar(Node):
    """A-STAR: keep the concepts of a multi-object prompt apart (attention segregation) and keep
    each one alive across steps (attention retention). Concepts are the layout's phrases, or the
    comma-separated `concepts` when no layout is wired; box positions are not used."""

    display_name = "A-STAR"

    category = "layout"
    inputs = {"model": MODEL, "layout": LAYOUT.optional("phrases to keep apart (boxes unused)")}
    # The paper guides every step; on ShapesT2I, guidance into the last steps wrecks the image at
    # any step size that does something (bench/layout.py), so the default stops at half way.
    params = {**_GUIDE_PARAMS,
              "retention": Float(defaults.A_STAR_RETENTION, 0.0, 10.0,
                                 help="weight of the retention loss"),
              "concepts": String("", help="comma-separated phrases, used when no layout is wired")}
    outputs = {"model": MODEL}

    def run(self, ctx, model, layout, eta, iterations, start, end, retention, concepts):
        from kernels.layout import AStarPatch

        _check_range(start, end)
        if layout is None:
            phrases = [c.strip() for c in concepts.split(",") if c.strip()]
            layout = {"boxes": [{"x0": 0.0, "y0": 0.0, "x1": 1.0, "y1": 1.0, "phrase": p}
                                for p in phrases]}
        return {"model": model.with_patch(AStarPatch(layout, eta, start, end, iterations,
                                                     retention=retention))}


@register
class JointAttentionMask(Node):
    """3DIS-FLUX renderer for MM-DiT models (SD3, FLUX): inside each box, image tokens attend
    only to that box's phrase (its tokens: CLIP and T5 for SD3, T5 for FLUX) and to their own
    region for the first steps."""

    category = "layout"
    inputs = {"model": MODEL, "layout": LAYOUT, "positive": CONDITIONING}
    params = {"image_steps": Int(defaults.JOINT_IMAGE_STEPS, 0, 500,
                                 help="steps with image->image region masks (I2I)"),
              "text_steps": Int(defaults.JOINT_TEXT_STEPS, 0, 500,
                                help="steps with the text masks (I2T, T2I, T2T)")}
    outputs = {"model": MODEL}

    def run(self, ctx, model, layout, positive, image_steps, text_steps):
        from kernels.layout import JointAttentionMaskPatch, is_mmdit, resolve_layout

        if not is_mmdit(model.unet):
            raise NodeError("JointAttentionMask needs an SD3 or FLUX (MM-DiT) model; this model "
                            "has a UNet. Use RegionAttention or RegionalPrompts instead.")
        if positive.pooled is None:
            raise NodeError("the positive conditioning is not from this model's text encoders "
                            "(an MM-DiT prompt has pooled projections)")
        boxes = resolve_layout(layout, positive)
        # A phrase found in the CLIP part of SD3's sequence also claims its T5 twin tokens.
        groups = [positive.linked(b["tokens"]) for b in boxes]
        # image_hw None: the token grid comes from the sampled latent's size at run time.
        patch = JointAttentionMaskPatch(
            {"boxes": boxes}, groups, positive.embeds.shape[1], image_hw=None,
            i2i_steps=image_steps, i2t_steps=text_steps, t2i_steps=text_steps, t2t_steps=text_steps)
        return {"model": model.with_patch(patch)}


@register
class AttentionMaps(Node):
    """Sample like the Sampler and show where each word of the prompt looked: per-token
    cross-attention heat maps (averaged over layers, heads and the chosen steps) as an image
    grid, in the order of `words` (default: every word of the prompt)."""

    category = "analysis"
    inputs = {"model": MODEL, "positive": CONDITIONING,
              "negative": CONDITIONING.optional("what to steer away from (default: the empty prompt)"),
              "latent": LATENT}
    params = {
        "scheduler": Choice(SCHEDULER_NAMES, "euler", help="the sampling algorithm"),
        "steps": Int(20, 1, 500, help="denoising steps"),
        "cfg": Float(7.0, 0.0, 30.0, step=0.5, help="classifier-free guidance scale"),
        "seed": Seed(),
        "words": String("", help="comma-separated words to show (empty: every word)"),
        **_range_params(0.0, 1.0, "averaged steps"),
        "tile": Int(64, 8, 1024, step=8, help="size of each heat-map tile in pixels"),
    }
    outputs = {"image": IMAGE, "maps": ATTENTION_MAPS, "latent": LATENT}

    def run(self, ctx, model, positive, negative, latent, scheduler, steps, cfg, seed, words,
            start, end, tile):
        from kernels.layout import AttentionRecordPatch, heatmap_grid, select_word_tokens
        from nodes.core import Sampler

        _check_range(start, end)
        recorded: list = []  # the run's maps
        out = Sampler().run(ctx, model.with_patch(AttentionRecordPatch(start, end, sink=recorded)),
                            positive, negative, latent, scheduler, steps, cfg, seed, 1.0)
        maps = recorded[-1] if recorded else None
        if maps is None:
            raise NodeError("the model has no cross-attention layers to read")
        labels, tokens = select_word_tokens(positive, words)
        if not tokens:
            raise NodeError(f"none of the words {words!r} is in the prompt")
        per_word = maps[0, tokens]  # (T, h, w)
        return {"image": heatmap_grid(per_word, tile), "latent": out["latent"],
                "maps": {"words": labels, "maps": per_word, "tokens": tokens}}
