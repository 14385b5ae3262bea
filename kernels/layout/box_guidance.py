"""Box guidance (CSG / BoxDiff family): box constraints on the attention maps as a guidance
loss, and CSG's attention redistribution.

`BoxGuidancePatch`: inner-box, outer-box and corner constraints (BoxDiff-style, ours), a
within-token loss (1 - in/(in + out))^2 on each map's whole mass (CSG's form, theirs on sampled
pixels), CSG's inter-token loss 50 (min(mean_in - margin, max_other) - max_other)^2 and CSG's
self-attention loss (1 - in/(in + out))^2 on the self-attention mass sent into each box, as one
guidance loss; and optional CSG attention redistribution in the denoising forward (token i's
attention is moved inside box i and is exactly 0 outside). The two CSG losses follow the
authors' code: top k = 0.8 * box area in-box pixels, a random half of them, margin 0.1;
self-attention from the up-block attn1 layers at the resolution nearest 16x16, recorded in the
guidance forward only. Ours: the per-box map is the mean of the phrase's word tokens' maps
renormalised over the prompt's words (CSG: one token, raw probabilities); cross maps come from
every cross-attention layer; the sampling is seeded by the step index (CSG: global RNG); the
guidance step is ZestGuide's normalised one (CSG: plain gradient step, 5 refinements).

Source checked (the paper's own text was not reachable here, only its abstract): the authors'
Papple-F/csg (utils.py compute_cross_loss / compute_self_loss, config.py: topk_coef 0.8,
dropout 0.5, margin 0.1, target_res 16, loss 5 (within + 50 inter) + 5 self).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from kernels.attention import self_attention_names

from .defaults import (
    BOX_CORNER,
    BOX_INNER,
    BOX_INTER,
    BOX_OUTER,
    BOX_REDISTRIBUTE_END,
    BOX_SELF_ATTENTION,
    BOX_WITHIN,
    CSG_DROPOUT,
    CSG_MARGIN,
    CSG_TOPK,
    GUIDANCE_END,
    GUIDANCE_ETA,
    GUIDANCE_ITERATIONS,
    GUIDANCE_START,
)
from .guidance import GuidancePatch, GuidanceRun, token_maps


def box_losses(box_maps: torch.Tensor, masks: torch.Tensor, topk: float = CSG_TOPK) -> dict:
    """BoxDiff/CSG-style constraints on per-box maps (B, n, h, w) and masks (n, h, w).

    inner: 1 - the mean of the top-k (k = topk * box area) map values inside the box, over the
           map's max (the box should hold strong responses);
    outer: the mean of the top-k values outside the box, over the max (nothing strong outside);
    within: (1 - in/(in + out))^2 on the map's mass (CSG's within-token loss);
    corner: L1 between the max-projections of the map on x and y and the box's extent.
    """
    b, n, h, w = box_maps.shape
    peak = box_maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-8)
    s = box_maps / peak
    m = masks[None].expand_as(s)
    flat_s, flat_m = s.flatten(2), m.flatten(2)
    inner, outer = [], []
    for i in range(n):
        area = int(flat_m[0, i].sum())
        k_in = max(1, int(round(topk * area)))
        k_out = max(1, int(round(topk * (h * w - area))))
        inside = flat_s[:, i].masked_fill(flat_m[:, i] < 0.5, -1.0)
        outside = flat_s[:, i].masked_fill(flat_m[:, i] >= 0.5, -1.0)
        inner.append(1 - inside.topk(k_in, dim=-1).values.clamp_min(0).mean(-1))
        outer.append(outside.topk(k_out, dim=-1).values.clamp_min(0).mean(-1) if area < h * w
                     else torch.zeros(b, device=s.device))
    mass_in = (box_maps * m).sum(dim=(-2, -1))
    mass = box_maps.sum(dim=(-2, -1)).clamp_min(1e-8)
    within = ((1 - mass_in / mass) ** 2).sum(1).mean()
    proj_x, proj_y = s.amax(dim=-2), s.amax(dim=-1)
    corner = ((proj_x - m.amax(dim=-2)).abs().mean(-1) + (proj_y - m.amax(dim=-1)).abs().mean(-1))
    return {"inner": torch.stack(inner, 1).sum(1).mean(), "outer": torch.stack(outer, 1).sum(1).mean(),
            "within": within, "corner": corner.sum(1).mean()}


def csg_sample(values: torch.Tensor, inside: torch.Tensor, topk: float, dropout: float,
               generator: Optional[torch.Generator]) -> torch.Tensor:
    """CSG's selective sampling: the top k = max(1, floor(topk * area)) of `values` (N,) among the
    pixels `inside` (N,) bool, then a random r = max(1, round(k * dropout)) of those. Indices."""
    area = int(inside.sum())
    k = max(1, int(area * topk))
    r = max(1, int(round(k * dropout)))
    top = values.detach().masked_fill(~inside, float("-inf")).topk(min(k, area)).indices
    pick = torch.randperm(top.shape[0], generator=generator)[:r].to(top.device)
    return top[pick]


def inter_token_loss(box_maps: torch.Tensor, masks: torch.Tensor, topk: float = CSG_TOPK,
                     dropout: float = CSG_DROPOUT, margin: float = CSG_MARGIN,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """CSG's inter-token (their "across-token") loss on per-box maps (B, n, h, w), masks (n, h, w).

    For each box i: P = CSG's sampled in-box pixels of map i (`csg_sample`); mean_in = map i's
    mean over P; max_other = the largest mean over P of any other box's map; then
    50 * (min(mean_in - margin, max_other) - max_other)^2, i.e. zero once map i leads every
    other map on its own pixels by `margin`, else the squared shortfall. Summed over boxes,
    averaged over the batch; 0 with fewer than two boxes. (Papple-F/csg utils.py,
    compute_cross_loss.)
    """
    b, n = box_maps.shape[:2]
    if n < 2:
        return box_maps.new_zeros(())
    flat = box_maps.flatten(2)
    inside = masks.flatten(1) >= 0.5
    total = box_maps.new_zeros(())
    for bi in range(b):
        for i in range(n):
            if not inside[i].any():
                continue
            pix = csg_sample(flat[bi, i], inside[i], topk, dropout, generator)
            mean_in = flat[bi, i, pix].mean()
            others = [flat[bi, j, pix].mean() for j in range(n) if j != i]
            max_other = torch.stack(others).max()
            total = total + 50.0 * (torch.minimum(mean_in - margin, max_other) - max_other) ** 2
    return total / b


def self_attention_loss(self_maps: torch.Tensor, masks: torch.Tensor, topk: float = CSG_TOPK,
                        dropout: float = CSG_DROPOUT,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """CSG's self-attention loss on self-attention S (B, N, N) (rows: query pixels, columns: key
    pixels) and box masks (n, h, w), h * w = N.

    For box i, a[q] = sum over the box's pixels p of S[q, p], the mass query q sends into the
    box. in = the sum of a over CSG's sampled in-box queries (`csg_sample` on a), out = the sum
    of the r largest a over queries outside the box; loss_i = (1 - in / (in + out))^2: the box
    should be attended from inside, not from outside. 0 when no outside pixel looks into the box,
    1 when no inside pixel does. Summed over boxes, averaged over the batch. (Papple-F/csg
    utils.py, compute_self_loss: their within-token form on the self-attention mass.)
    """
    b = self_maps.shape[0]
    inside_all = masks.flatten(1) >= 0.5
    total = self_maps.new_zeros(())
    for bi in range(b):
        for m in inside_all:
            area = int(m.sum())
            if area == 0:
                continue
            a = self_maps[bi] @ m.to(self_maps.dtype)  # (N,): mass each query sends into the box
            pix = csg_sample(a, m, topk, dropout, generator)
            mass_in = a[pix].sum()
            n_out = int((~m).sum())
            if n_out:
                r = min(pix.shape[0], n_out)
                mass_out = a.masked_fill(m, float("-inf")).topk(r).values.sum()
            else:
                mass_out = a.new_zeros(())
            total = total + (1 - mass_in / (mass_in + mass_out).clamp_min(1e-12)) ** 2
    return total / b


def unet_attention_level(name: str, n_down: int, n_up: int) -> tuple[Optional[int], bool]:
    """(resolution level, is an up block) of a diffusers UNet attention processor name: level 0
    is the full latent resolution, each level halves it; (None, False) for other names."""
    parts = name.split(".")
    try:
        if parts[0] == "down_blocks":
            return int(parts[1]), False
        if parts[0] == "up_blocks":
            return n_up - 1 - int(parts[1]), True
        if parts[0] == "mid_block":
            return n_down - 1, False
    except (IndexError, ValueError):
        pass
    return None, False


def csg_self_attention_layers(unet, latent_hw, target_tokens: int = 16 * 16) -> list[str]:
    """The attn1 layers CSG's self-attention loss reads: the up-block layers (CSG reads "up")
    of the one resolution whose token count is nearest 16x16 (CSG's target_res at SD's 512 px)
    on a log scale, the smaller on a tie. Falls back to down/mid layers if no up block has
    attention; [] for models whose layer names are not diffusers UNet names."""
    n_down = len(getattr(unet, "down_blocks", ()))
    n_up = len(getattr(unet, "up_blocks", ()))
    h, w = (int(v) for v in latent_hw)
    found = [(name, *unet_attention_level(name, n_down, n_up)) for name in self_attention_names(unet)]
    found = [f for f in found if f[1] is not None]
    if any(up for _, _, up in found):
        found = [f for f in found if f[2]]
    if not found:
        return []

    def distance(lv):
        tokens = max(1.0, (h / 2 ** lv) * (w / 2 ** lv))
        return abs(math.log(tokens / target_tokens)), tokens

    best = min({lv for _, lv, _ in found}, key=distance)
    return [name for name, lv, _ in found if lv == best]


class BoxGuidanceRun(GuidanceRun):
    """One box-guidance run: CSG's sampling generator (seeded per step) and redistribution."""

    patch: "BoxGuidancePatch"

    def __init__(self, patch, run, boxes):
        super().__init__(patch, run, boxes)
        self.generator: Optional[torch.Generator] = None
        self.generator_step: Optional[int] = None

    def sampler(self, step: int) -> torch.Generator:
        """CSG's random sampling, seeded by the step index so a run is reproducible; the
        iterations of one step draw fresh samples from it, as CSG's do."""
        if self.generator_step != step:
            self.generator = torch.Generator().manual_seed(int(step))
            self.generator_step = step
        return self.generator

    def loss(self, maps, masks, step):
        p = self.patch
        box_maps = token_maps(maps, self.boxes, text_normalise=True, n_text=self.n_text)
        parts = box_losses(box_maps, masks)
        total = sum(p.weights[k] * v for k, v in parts.items())
        if p.inter:
            parts["inter"] = inter_token_loss(box_maps, masks, p.topk, p.dropout, p.margin,
                                              self.sampler(step))
            total = total + p.inter * parts["inter"]
        if p.self_attention and self.self_maps is not None:
            s, (h, w) = self.self_maps
            self_masks = self.masks.masks(h, w, s.device).view(-1, h, w).to(s.dtype)
            parts["self_attention"] = self_attention_loss(s, self_masks, p.topk, p.dropout,
                                                          self.sampler(step))
            total = total + p.self_attention * parts["self_attention"]
        return total, parts

    # CSG attention redistribution (denoising forwards only, no grad)
    def edit_active(self, ctl, layer):
        return self.patch.redistribute and bool(self.boxes) and not ctl.guiding and \
            ctl.in_range(self.patch.start, self.patch.redistribute_end)

    def edit_probs(self, ctl, layer, probs: torch.Tensor) -> torch.Tensor:
        """Each box's tokens share the attention of all box tokens inside the box, 0 outside;
        then every row is renormalised over the tokens."""
        masks = self.masks.masks(layer.height, layer.width, probs.device).to(probs.dtype)
        all_tokens = sorted({t for b in self.boxes for t in b["tokens"] if t < probs.shape[-1]})
        if not all_tokens:
            return probs
        pooled = probs[..., all_tokens].sum(-1)  # (B, heads, N)
        out = probs.clone()
        for b, m in zip(self.boxes, masks):
            toks = [t for t in b["tokens"] if t < probs.shape[-1]]
            for t in toks:
                out[..., t] = pooled * m / len(toks)
        return out / out.sum(-1, keepdim=True).clamp_min(1e-12)


class BoxGuidancePatch(GuidancePatch):
    """Box constraints (inner, outer, corner, within), CSG's inter-token and self-attention
    losses, and optional CSG attention redistribution.

    The defaults are the BoxGuidance node's (kernels.layout.defaults): CSG's balance,
    inter = self_attention = within = 1 (CSG weighs 5 * (within + 50 * inter) + 5 * self, the 50
    being inside `inter_token_loss`); inter = self_attention = 0 gives the box constraints alone.
    """

    kind = "box-guidance"
    run_class = BoxGuidanceRun

    def __init__(self, layout, eta: float = GUIDANCE_ETA, start: float = GUIDANCE_START,
                 end: float = GUIDANCE_END, iterations: int = GUIDANCE_ITERATIONS,
                 inner: float = BOX_INNER, outer: float = BOX_OUTER, corner: float = BOX_CORNER,
                 within: float = BOX_WITHIN, redistribute: bool = False,
                 redistribute_end: float = BOX_REDISTRIBUTE_END, inter: float = BOX_INTER,
                 self_attention: float = BOX_SELF_ATTENTION, topk: float = CSG_TOPK,
                 dropout: float = CSG_DROPOUT, margin: float = CSG_MARGIN):
        super().__init__(layout, eta, start, end, iterations)
        self.weights = {"inner": inner, "outer": outer, "corner": corner, "within": within}
        self.inter = float(inter)
        self.self_attention = float(self_attention)
        self.topk, self.dropout, self.margin = float(topk), float(dropout), float(margin)
        self.redistribute = bool(redistribute)
        self.redistribute_end = float(redistribute_end)

    def params_key(self):
        key = {**super().params_key(), **self.weights, "redistribute": self.redistribute,
               "rend": self.redistribute_end}
        if self.inter or self.self_attention:  # keys without the CSG losses stay as they were
            key.update(inter=self.inter, self_attention=self.self_attention, topk=self.topk,
                       dropout=self.dropout, margin=self.margin)
        return key

    def is_noop(self):
        return not self.layout.get("boxes") or (
            (self.eta == 0.0 or self.iterations <= 0) and not self.redistribute)

    def self_attention_wanted(self, unet, run):
        if not self.self_attention or self.eta == 0.0 or self.iterations <= 0:
            return []
        return csg_self_attention_layers(unet, run.latent_shape[2:])
