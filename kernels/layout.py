"""Layout to image: boxes with phrases steer where things appear. Training-free, any SD-family UNet.

Techniques (each a `ModelPatch`; they compose through one processor stack, kernels.attention):

- `RegionAttentionPatch` -- Paint-with-Words (eDiff-I): add `w * A` to the cross-attention logits
  before the softmax, `softmax((QK^T + w A) / sqrt(d))`, where A[p, token] = 1 for the phrase's
  tokens at pixels inside its box and `w = w' * log(1 + sigma_t) * max(QK^T)`, so the push is
  strongest at high noise. Conditional pass only (the reference implementation gives the
  unconditional pass weight 0). Option: also suppress the tokens outside their box (-A there).
- `RegionalPromptPatch` -- per-region prompts: inside box i the cross-attention output is that
  of box i's own encoded phrase (mixed with the global prompt by `mix`), elsewhere the global
  prompt's (the multi-context attention of Spatial-Temporal attention control, #19, with
  user-given weights instead of its CLIP-optimised ones). `emphasis` adds a Paint-with-Words
  push on the region's own phrase tokens: without it the phrase alone barely moved objects on
  the proxy model (a phrase says what, not where).
- `ZestGuidePatch` -- ZestGuide: in the first half of the steps, one extra forward with
  gradients; the loss is sum_i BCE(S_i / max S_i, M_i) between the max-normalised
  cross-attention map of segment i's tokens (softmax over tokens, averaged over heads and
  layers, upsampled) and its mask; the latent moves by a gradient step normalised by its
  largest entry, scaled by sqrt(1 - abar_t) (as in the official code).
- `BoxGuidancePatch` -- CSG / BoxDiff family: inner-box, outer-box and corner constraints
  (BoxDiff-style, ours), a within-token loss (1 - in/(in + out))^2 on each map's whole mass
  (CSG's form, theirs on sampled pixels), CSG's inter-token loss
  50 (min(mean_in - margin, max_other) - max_other)^2 and CSG's self-attention loss
  (1 - in/(in + out))^2 on the self-attention mass sent into each box, as one guidance loss;
  and optional CSG attention redistribution in the denoising forward (token i's attention is
  moved inside box i and is exactly 0 outside). The two CSG losses follow the authors' code:
  top k = 0.8 * box area in-box pixels, a random half of them, margin 0.1; self-attention from
  the up-block attn1 layers at the resolution nearest 16x16, recorded in the guidance forward
  only. Ours: the per-box map is the mean of the phrase's word tokens' maps renormalised over
  the prompt's words (CSG: one token, raw probabilities); cross maps come from every
  cross-attention layer; the sampling is seeded by the step index (CSG: global RNG); the
  guidance step is ZestGuide's normalised one (CSG: plain gradient step, 5 refinements).
- `AStarPatch` -- A-STAR: attention segregation (overlap of concept maps) and retention (keep
  each concept's previous-step binarised map) as a guidance loss. It ignores box positions.
- `AttentionRecordPatch` -- records per-token maps of a run (the AttentionMaps node).
- `joint_attention_mask` / `JointAttentionMaskPatch` -- 3DIS-FLUX renderer masks for MM-DiT
  joint attention: SD3 (its joint attention orders [image, text]: the mask kernel's
  `text_first=False`, `SD3LayoutAttnProcessor`) and FLUX ([text, image],
  `FluxLayoutAttnProcessor`). SD3 folders load and sample in graphs; FLUX folders do not load
  yet, so the FLUX processors run from code and tests only.

Sources checked (the papers' own text was not reachable here, only abstracts):
- Paint-with-Words: cloneofsimo/paint-with-words-sd (bias added to QK^T before the 1/sqrt(d)
  scale, w = w' log(1 + sigma) max(QK^T), 0 in the unconditional pass).
- ZestGuide: the authors' gcouairon/zestguide (first tau = 0.5 of the steps, maps from the
  16x16/8x8(/32x32) layers softmaxed over tokens and averaged, L-inf-normalised gradient,
  lr * sqrt(1 - abar_t), used together with the eDiff-I bias). Their released configs add a
  BCE term on scaled, unnormalised maps and skip gradients of near-correct pixels; we keep the
  paper's max-normalised BCE only.
- 3DIS-FLUX: limuloo/3DIS detail_renderer_flux.py (mask rules and step windows).
- CSG: the authors' Papple-F/csg (utils.py compute_cross_loss / compute_self_loss, config.py:
  topk_coef 0.8, dropout 0.5, margin 0.1, target_res 16, loss 5 (within + 50 inter) + 5 self).
- A-STAR: the ICCV 2023 paper's text (openaccess.thecvf.com, Agarwal et al.; no code found).
  Eq. 2 (segregation) and Eq. 3 (retention: 1 - sum min(A_t-1, B_t) / sum (A_t-1 + B_t), B_t
  the previous step's binarised map, refreshed every step, both losses weighted equally and
  applied at every step) are as written there. Not given in the main text, so our choices: the
  binarisation threshold (half the map's max), the 3x3 Gaussian (sigma 0.5, as Attend-and-
  Excite), and the step rule, which is ZestGuide's normalised step rather than a plain
  gradient step. Our default window is the first half of the steps: with this step rule,
  guiding to the last step wrecked ShapesT2I's images (bench/layout.py).

Boxes are {"x0","y0","x1","y1" in 0..1, "phrase"}; a box may carry "mask": a 2-D list of 0/1
rows (any size) used instead of the rectangle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from kernels.attention import (AttentionController, AttentionStore, LayerInfo, controller_for,
                               registered, self_attention_names, self_attention_recording)
from kernels.patching import ModelPatch, SamplingRun

STOPWORDS = frozenset("a an the and of with at on in to".split())


# -- geometry ------------------------------------------------------------------------------
def box_mask(box: dict, height: int, width: int) -> torch.Tensor:
    """A (height, width) 0/1 mask: pixels whose centre lies in the box (or the box's own mask).

    A box smaller than one pixel still gets the pixel under its centre, so no phrase is lost at
    coarse attention resolutions.
    """
    if box.get("mask") is not None:
        m = torch.as_tensor(box["mask"], dtype=torch.float32)[None, None]
        return (F.interpolate(m, size=(height, width), mode="area")[0, 0] >= 0.5).float()
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    inside_y = (ys >= box["y0"]) & (ys < box["y1"])
    inside_x = (xs >= box["x0"]) & (xs < box["x1"])
    mask = (inside_y[:, None] & inside_x[None, :]).float()
    if mask.sum() == 0:
        cy = min(height - 1, int((box["y0"] + box["y1"]) / 2 * height))
        cx = min(width - 1, int((box["x0"] + box["x1"]) / 2 * width))
        mask[cy, cx] = 1.0
    return mask


def layout_key(layout: Optional[dict]) -> str:
    return hashlib.blake2b(json.dumps(layout, sort_keys=True, default=str).encode(),
                           digest_size=12).hexdigest()


def prompt_tokens(cond) -> list[tuple[int, str]]:
    """(position, word) of every word token of the prompt, in order."""
    return sorted((p, w) for w, ps in cond.words.items() for p in ps)


def phrase_positions(cond, phrase: str, taken: Optional[set] = None) -> list[int]:
    """Token positions of `phrase` in the prompt, content words only ("a", "the"... dropped).

    The phrase is looked for as a run of consecutive prompt words (the first run not already
    `taken` by an earlier box), so "a red circle and a red square" gives each box its own "red".
    If it is not there verbatim, every occurrence of each content word is used.
    """
    from kernels.text import words_of

    words = words_of(phrase)
    if not words:
        return []
    content = [w for w in words if w not in STOPWORDS] or words
    seq = prompt_tokens(cond)
    toks = [w for _, w in seq]
    taken = taken if taken is not None else set()
    for start in range(len(toks) - len(words) + 1):
        if toks[start:start + len(words)] == words:
            pos = [seq[start + j][0] for j, w in enumerate(words) if w in content]
            if not set(pos) & taken:
                taken.update(pos)
                return pos
    out = sorted({p for w in content for p in cond.words.get(w, ())})
    taken.update(out)
    return out


def resolve_layout(layout: Optional[dict], cond) -> list[dict]:
    """Boxes with their token positions in `cond`; boxes whose phrase is not in the prompt
    (or empty) are dropped for token-based techniques."""
    if not layout:
        return []
    taken: set = set()
    out = []
    for box in layout.get("boxes", []):
        pos = phrase_positions(cond, box.get("phrase", ""), taken)
        if pos:
            out.append({**box, "tokens": pos})
    return out


class _MaskCache:
    def __init__(self, boxes: Sequence[dict]):
        self.boxes = list(boxes)
        self._cache: dict = {}

    def masks(self, h: int, w: int, device=None) -> torch.Tensor:
        """(n_boxes, h*w) masks."""
        key = (h, w)
        if key not in self._cache:
            self._cache[key] = torch.stack([box_mask(b, h, w).flatten() for b in self.boxes]) \
                if self.boxes else torch.zeros(0, h * w)
        m = self._cache[key]
        return m.to(device) if device is not None else m

    def token_matrix(self, h: int, w: int, n_tokens: int, device=None) -> torch.Tensor:
        """A (h*w, n_tokens) matrix: 1 where a box's token meets a pixel inside that box."""
        key = ("A", h, w, n_tokens)
        if key not in self._cache:
            a = torch.zeros(h * w, n_tokens)
            masks = self.masks(h, w)
            for b, m in zip(self.boxes, masks):
                for t in b["tokens"]:
                    if t < n_tokens:
                        a[:, t] = torch.maximum(a[:, t], m)
            self._cache[key] = a
        a = self._cache[key]
        return a.to(device) if device is not None else a


class _LayoutPatch(ModelPatch):
    """Shared plumbing: resolve the layout against the run's prompt, install the controller."""

    kind = "layout"

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

    def prepare(self, run: SamplingRun) -> None:
        self.boxes = resolve_layout(self.layout, run.positive)
        self.cache = _MaskCache(self.boxes)

    def self_attention_layers(self, unet, run) -> list[str]:
        """attn1 processor names whose self-attention this patch records (none by default)."""
        return []

    @contextlib.contextmanager
    def applied(self, unet, run) -> Iterator[None]:
        if run is None or self.is_noop():
            yield
            return
        self.prepare(run)
        names = self.self_attention_layers(unet, run)
        with controller_for(unet, run) as ctl, self_attention_recording(unet, ctl, names), \
                registered(ctl, self):
            self.ctl = ctl
            yield
        self.ctl = None


# -- Paint-with-Words -----------------------------------------------------------------------
class RegionAttentionPatch(_LayoutPatch):
    """eDiff-I Paint-with-Words logit bias (see module doc)."""

    kind = "region-attention"

    def __init__(self, layout, strength: float = 0.5, start: float = 0.0, end: float = 1.0,
                 suppress_outside: bool = False):
        super().__init__(layout, start, end)
        self.strength = float(strength)
        self.suppress_outside = bool(suppress_outside)

    def params_key(self):
        return {"w": self.strength, "suppress": self.suppress_outside}

    def is_noop(self):
        return super().is_noop() or self.strength == 0.0

    def wants_bias(self, ctl: AttentionController, layer: LayerInfo) -> bool:
        return bool(self.boxes) and ctl.in_range(self.start, self.end)

    def bias(self, ctl: AttentionController, layer: LayerInfo, q: torch.Tensor, k: torch.Tensor):
        a = self.cache.token_matrix(layer.height, layer.width, k.shape[2], q.device).to(q.dtype)
        if self.suppress_outside:
            # tokens that belong to some box, at pixels outside that box, are pushed down
            owned = (a.amax(dim=0, keepdim=True) > 0).to(q.dtype)
            a = a - owned * (1 - a)
        with torch.no_grad():
            qk_max = (q @ k.transpose(-1, -2)).amax().clamp_min(0.0)
        w = self.strength * math.log1p(ctl.sigma) * qk_max
        scale = q.shape[-1] ** -0.5
        # softmax((QK^T + w A) * scale) == SDPA(q, k, v, attn_mask = w * A * scale)
        return (w * scale * a)[None, None]


# -- per-region prompts ----------------------------------------------------------------------
class RegionalPromptPatch(_LayoutPatch):
    """Each box's own phrase conditioning attended inside the box; the global prompt elsewhere."""

    kind = "regional-prompts"

    def __init__(self, layout, region_embeds: Sequence[torch.Tensor], mix: float = 1.0,
                 start: float = 0.0, end: float = 1.0, emphasis: float = 0.0,
                 region_tokens: Optional[Sequence[Sequence[int]]] = None):
        super().__init__(layout, start, end)
        self.region_embeds = list(region_embeds)
        self.mix = float(mix)
        # emphasis: a Paint-with-Words push (w') on each region's own phrase tokens inside it
        self.emphasis = float(emphasis)
        self.region_tokens = [list(t) for t in (region_tokens or [[] for _ in self.region_embeds])]

    def params_key(self):
        digest = hashlib.blake2b(digest_size=8)
        for e in self.region_embeds:
            digest.update(e.detach().float().cpu().numpy().tobytes())
        return {"mix": self.mix, "embeds": digest.hexdigest(), "emphasis": self.emphasis,
                "tokens": self.region_tokens}

    def is_noop(self):
        return super().is_noop() or self.mix == 0.0 or not self.region_embeds

    def prepare(self, run):
        # regions do not need the phrase in the global prompt: keep every box
        self.boxes = [dict(b) for b in self.layout.get("boxes", [])]
        self.cache = _MaskCache(self.boxes)

    def regions(self, ctl: AttentionController, layer: LayerInfo):
        if not ctl.in_range(self.start, self.end):
            return []
        masks = self.cache.masks(layer.height, layer.width)
        out = []
        for i, e in enumerate(self.region_embeds[:len(self.boxes)]):
            tokens = torch.zeros(e.shape[1])
            toks = [t for t in self.region_tokens[i] if t < e.shape[1]] if i < len(self.region_tokens) else []
            tokens[toks] = 1.0
            out.append((masks[i], e, self.mix, self.emphasis if toks else 0.0, tokens))
        return out


# -- attention maps for losses ---------------------------------------------------------------
def token_maps(maps: torch.Tensor, boxes: Sequence[dict], text_normalise: bool = False,
               n_text: Optional[int] = None) -> torch.Tensor:
    """Per-box maps (B, n_boxes, h, w): the mean over each box's tokens of `maps` (B, L, h, w).

    text_normalise: renormalise over the prompt's word tokens first (drop the start token and
    padding, as Attend-and-Excite-style losses do).
    """
    if text_normalise:
        last = n_text if n_text is not None else maps.shape[1]
        text = maps[:, 1:last]
        text = text / text.sum(dim=1, keepdim=True).clamp_min(1e-8)
        maps = torch.cat([maps[:, :1] * 0, text, maps[:, last:] * 0], dim=1)
    return torch.stack([maps[:, b["tokens"]].mean(dim=1) for b in boxes], dim=1)


def zest_loss(box_maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """sum_i BCE(S_i / max S_i, M_i), mean over pixels; box_maps (B, n, h, w), masks (n, h, w)."""
    s = box_maps / box_maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-8)
    s = s.clamp(1e-6, 1 - 1e-6)
    target = masks[None].expand_as(s)
    return F.binary_cross_entropy(s, target, reduction="none").mean(dim=(-2, -1)).sum(dim=1).mean()


def box_losses(box_maps: torch.Tensor, masks: torch.Tensor, topk: float = 0.8) -> dict:
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


def _csg_sample(values: torch.Tensor, inside: torch.Tensor, topk: float, dropout: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """CSG's selective sampling: the top k = max(1, floor(topk * area)) of `values` (N,) among the
    pixels `inside` (N,) bool, then a random r = max(1, round(k * dropout)) of those. Indices."""
    area = int(inside.sum())
    k = max(1, int(area * topk))
    r = max(1, int(round(k * dropout)))
    top = values.detach().masked_fill(~inside, float("-inf")).topk(min(k, area)).indices
    pick = torch.randperm(top.shape[0], generator=generator)[:r].to(top.device)
    return top[pick]


def inter_token_loss(box_maps: torch.Tensor, masks: torch.Tensor, topk: float = 0.8,
                     dropout: float = 0.5, margin: float = 0.1,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """CSG's inter-token (their "across-token") loss on per-box maps (B, n, h, w), masks (n, h, w).

    For each box i: P = CSG's sampled in-box pixels of map i (`_csg_sample`); mean_in = map i's
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
            pix = _csg_sample(flat[bi, i], inside[i], topk, dropout, generator)
            mean_in = flat[bi, i, pix].mean()
            others = [flat[bi, j, pix].mean() for j in range(n) if j != i]
            max_other = torch.stack(others).max()
            total = total + 50.0 * (torch.minimum(mean_in - margin, max_other) - max_other) ** 2
    return total / b


def self_attention_loss(self_maps: torch.Tensor, masks: torch.Tensor, topk: float = 0.8,
                        dropout: float = 0.5,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """CSG's self-attention loss on self-attention S (B, N, N) (rows: query pixels, columns: key
    pixels) and box masks (n, h, w), h * w = N.

    For box i, a[q] = sum over the box's pixels p of S[q, p], the mass query q sends into the
    box. in = the sum of a over CSG's sampled in-box queries (`_csg_sample` on a), out = the sum
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
            pix = _csg_sample(a, m, topk, dropout, generator)
            mass_in = a[pix].sum()
            n_out = int((~m).sum())
            if n_out:
                r = min(pix.shape[0], n_out)
                mass_out = a.masked_fill(m, float("-inf")).topk(r).values.sum()
            else:
                mass_out = a.new_zeros(())
            total = total + (1 - mass_in / (mass_in + mass_out).clamp_min(1e-12)) ** 2
    return total / b


def csg_self_attention_layers(unet, latent_hw, target_tokens: int = 16 * 16) -> list[str]:
    """The attn1 layers CSG's self-attention loss reads: the up-block layers (CSG reads "up")
    of the one resolution whose token count is nearest 16x16 (CSG's target_res at SD's 512 px)
    on a log scale, the smaller on a tie. Falls back to down/mid layers if no up block has
    attention; [] for models whose layer names are not diffusers UNet names."""
    n_down = len(getattr(unet, "down_blocks", ()))
    n_up = len(getattr(unet, "up_blocks", ()))
    h, w = (int(v) for v in latent_hw)

    def level(name):
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

    found = [(name, *level(name)) for name in self_attention_names(unet)]
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


def gaussian_smooth(maps: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """3x3 Gaussian smoothing of (B, n, h, w) maps (Attend-and-Excite's; A-STAR does not say)."""
    if sigma <= 0:
        return maps
    x = torch.tensor([-1.0, 0.0, 1.0])
    k1 = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k1 = k1 / k1.sum()
    k = (k1[:, None] * k1[None, :]).to(maps)
    n = maps.shape[1]
    return F.conv2d(F.pad(maps, (1, 1, 1, 1), mode="reflect"), k.expand(n, 1, 3, 3), groups=n)


def segregation_loss(maps: torch.Tensor) -> torch.Tensor:
    """A-STAR: sum over concept pairs of sum_p min(A_m, A_n) / sum_p (A_m + A_n)."""
    n = maps.shape[1]
    total = maps.new_zeros(())
    for i in range(n):
        for j in range(i + 1, n):
            a, b = maps[:, i], maps[:, j]
            total = total + (torch.minimum(a, b).sum((-2, -1)) /
                             (a + b).sum((-2, -1)).clamp_min(1e-8)).mean()
    return total


def retention_loss(maps: torch.Tensor, previous: Optional[torch.Tensor]) -> torch.Tensor:
    """A-STAR retention (the paper's Eq. 3): each concept's map A should keep covering its
    previous step's binarised map B: sum_m (1 - sum_p min(A, B) / sum_p (A + B))."""
    if previous is None:
        return maps.new_zeros(())
    inter = torch.minimum(maps, previous).sum((-2, -1))
    total = (maps + previous).sum((-2, -1)).clamp_min(1e-8)
    return (1 - inter / total).sum(1).mean()


def binarise(maps: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """A-STAR's B_t: the paper does not give its threshold; half of each map's max is ours."""
    m = maps.detach()
    return (m >= threshold * m.amax(dim=(-2, -1), keepdim=True)).to(m.dtype)


# -- gradient guidance (ZestGuide, box constraints, A-STAR) -----------------------------------
class _GuidancePatch(_LayoutPatch):
    """Before each step in [start, end): `iterations` normalised gradient steps on the latent.

    As in ZestGuide's official code: the gradient is taken w.r.t. the model input, normalised
    by its largest entry (L-inf), and the step size follows the noise, eta * sqrt(1 - abar_t).
    The step is taken in the model-input scale (x_in = c x from `scale_model_input`), so `eta`
    means the same for every scheduler: x <- x - eta * sqrt(1 - abar_t) * (g / max|g|) / c.
    """

    min_map_size = 1

    def __init__(self, layout, eta: float = 0.5, start: float = 0.0, end: float = 0.5,
                 iterations: int = 1):
        super().__init__(layout, start, end)
        self.eta = float(eta)
        self.iterations = int(iterations)
        self.trace: list[dict] = []  # (step, iteration, loss) of the last run, for tests/bench

    def params_key(self):
        return {"eta": self.eta, "it": self.iterations}

    def is_noop(self):
        return super().is_noop() or self.eta == 0.0 or self.iterations <= 0

    def prepare(self, run):
        super().prepare(run)
        self.store = AttentionStore("guide")
        self.self_maps = None
        self.trace = []
        self.n_text = max((p for p, _ in prompt_tokens(run.positive)), default=0) + 1

    def wants_probs(self, ctl, layer):
        return self.store.wants_probs(ctl, layer)

    def record(self, ctl, layer, probs):
        self.store.record(ctl, layer, probs)

    def wants_self_probs(self, ctl, layer):
        return self.store.wants_self_probs(ctl, layer)

    def record_self(self, ctl, layer, probs):
        self.store.record_self(ctl, layer, probs)

    def self_attention_layers(self, unet, run):
        names = self.self_attention_wanted(unet, run)
        self.store.self_layers = set(names)
        return names

    def self_attention_wanted(self, unet, run) -> list[str]:
        return []

    def loss(self, maps: torch.Tensor, masks: torch.Tensor, step: int) -> torch.Tensor:
        raise NotImplementedError

    def needs_boxes(self) -> int:
        return 1

    def before_step(self, run: SamplingRun, i: int, t, x: torch.Tensor) -> torch.Tensor:
        ctl = getattr(self, "ctl", None)
        if ctl is None or len(self.boxes) < self.needs_boxes():
            return x
        ts = run.scheduler.timesteps  # the full schedule: img2img keeps only its tail
        step = int(torch.argmin((ts.float().cpu() - torch.as_tensor(t).float().cpu()).abs()))
        frac = step / max(len(ts), 1)
        if not (self.start <= frac < self.end):
            return x
        unet = run.unet
        cond = run.positive.embeds.to(x.device, x.dtype)
        scheduler = run.scheduler
        for it in range(self.iterations):
            x = x.detach().requires_grad_(True)
            x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            self.store.reset()
            ctl.guiding = True
            try:
                unet(x_in, t, encoder_hidden_states=cond.expand(x.shape[0], -1, -1))
            finally:
                ctl.guiding = False
            maps = self.store.maps(min_size=self.min_map_size)
            self.self_maps = self.store.self_maps()  # None unless self-attention was recorded
            self.store.reset()
            if maps is None:
                return x.detach()
            h, w = maps.shape[-2:]
            masks = self.cache.masks(h, w, x.device).view(-1, h, w).to(maps.dtype)
            loss = self.loss(maps, masks, step)
            self.trace.append({"step": step, "iteration": it, "loss": float(loss.detach())})
            if not loss.requires_grad:
                return x.detach()
            (grad,) = torch.autograd.grad(loss, x)
            with torch.no_grad():
                c = _input_scale(scheduler, t)
                peak = grad.abs().amax().clamp_min(1e-12)
                x = x - self.eta * _noise_fraction(scheduler, t) * grad / peak / c
        return x.detach()


def _input_scale(scheduler, t) -> float:
    """c with scale_model_input(x, t) == c * x (1 for schedulers that do not scale)."""
    if not hasattr(scheduler, "scale_model_input"):
        return 1.0
    return float(scheduler.scale_model_input(torch.ones(()), t))


def _noise_fraction(scheduler, t) -> float:
    """sqrt(1 - abar_t): the guidance step shrinks as the image forms (flow: the noise share)."""
    from kernels.attention import scheduler_sigma

    sigma = scheduler_sigma(scheduler, torch.as_tensor(t).flatten()[0].float().cpu())
    return sigma / math.sqrt(1.0 + sigma * sigma)


class ZestGuidePatch(_GuidancePatch):
    """ZestGuide: BCE between max-normalised token maps and the masks."""

    kind = "zestguide"

    def loss(self, maps, masks, step):
        return zest_loss(token_maps(maps, self.boxes), masks)


class BoxGuidancePatch(_GuidancePatch):
    """Box constraints (inner, outer, corner, within), CSG's inter-token and self-attention
    losses, and optional CSG attention redistribution.

    The new weights default to 0 here (code and bench keep their old behaviour); the BoxGuidance
    node gives new nodes CSG's balance, inter = self_attention = within = 1 (CSG weighs
    5 * (within + 50 * inter) + 5 * self, the 50 being inside `inter_token_loss`).
    CSG's random 50% sampling uses a generator seeded with the step index, so a run is
    reproducible; the iterations of one step draw fresh samples from it, as CSG's do.
    """

    kind = "box-guidance"

    def __init__(self, layout, eta: float = 0.5, start: float = 0.0, end: float = 0.5,
                 iterations: int = 1, inner: float = 1.0, outer: float = 1.0, corner: float = 0.5,
                 within: float = 1.0, redistribute: bool = False, redistribute_end: float = 0.5,
                 inter: float = 0.0, self_attention: float = 0.0, topk: float = 0.8,
                 dropout: float = 0.5, margin: float = 0.1):
        super().__init__(layout, eta, start, end, iterations)
        self.weights = {"inner": inner, "outer": outer, "corner": corner, "within": within}
        self.inter = float(inter)
        self.self_attention = float(self_attention)
        self.topk, self.dropout, self.margin = float(topk), float(dropout), float(margin)
        self.redistribute = bool(redistribute)
        self.redistribute_end = float(redistribute_end)
        self.last_parts: dict = {}  # the last guidance loss's parts (unweighted), for tests/bench

    def params_key(self):
        key = {**super().params_key(), **self.weights, "redistribute": self.redistribute,
               "rend": self.redistribute_end}
        if self.inter or self.self_attention:  # old keys stay as they were
            key.update(inter=self.inter, self_attention=self.self_attention, topk=self.topk,
                       dropout=self.dropout, margin=self.margin)
        return key

    def is_noop(self):
        return not self.layout.get("boxes") or (
            (self.eta == 0.0 or self.iterations <= 0) and not self.redistribute)

    def prepare(self, run):
        super().prepare(run)
        self._generator, self._generator_step = None, None

    def self_attention_wanted(self, unet, run):
        if not self.self_attention or self.eta == 0.0 or self.iterations <= 0:
            return []
        return csg_self_attention_layers(unet, run.latent_shape[2:])

    def _sampler(self, step: int) -> torch.Generator:
        if self._generator_step != step:
            self._generator = torch.Generator().manual_seed(int(step))
            self._generator_step = step
        return self._generator

    def loss(self, maps, masks, step):
        box_maps = token_maps(maps, self.boxes, text_normalise=True, n_text=self.n_text)
        parts = box_losses(box_maps, masks)
        total = sum(self.weights[k] * v for k, v in parts.items())
        if self.inter:
            parts["inter"] = inter_token_loss(box_maps, masks, self.topk, self.dropout, self.margin,
                                              self._sampler(step))
            total = total + self.inter * parts["inter"]
        if self.self_attention and self.self_maps is not None:
            s, (h, w) = self.self_maps
            self_masks = self.cache.masks(h, w, s.device).view(-1, h, w).to(s.dtype)
            parts["self_attention"] = self_attention_loss(s, self_masks, self.topk, self.dropout,
                                                          self._sampler(step))
            total = total + self.self_attention * parts["self_attention"]
        self.last_parts = {k: float(v.detach()) for k, v in parts.items()}
        return total

    # CSG attention redistribution (denoising forwards only, no grad)
    def edit_active(self, ctl, layer):
        return self.redistribute and bool(self.boxes) and not ctl.guiding and \
            ctl.in_range(self.start, self.redistribute_end)

    def edit_probs(self, ctl, layer, probs: torch.Tensor) -> torch.Tensor:
        """Each box's tokens share the attention of all box tokens inside the box, 0 outside;
        then every row is renormalised over the tokens."""
        masks = self.cache.masks(layer.height, layer.width, probs.device).to(probs.dtype)
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


class AStarPatch(_GuidancePatch):
    """A-STAR segregation + retention over the layout's phrases (box positions are not used)."""

    kind = "a-star"

    def __init__(self, layout, eta: float = 0.5, start: float = 0.0, end: float = 0.5,
                 iterations: int = 1, retention: float = 1.0, smoothing: float = 0.5):
        super().__init__(layout, eta, start, end, iterations)
        self.retention = float(retention)
        self.smoothing = float(smoothing)

    def params_key(self):
        return {**super().params_key(), "ret": self.retention, "smooth": self.smoothing}

    def needs_boxes(self):
        return 1 if self.retention else 2

    def prepare(self, run):
        super().prepare(run)
        self.previous = None
        self.previous_step = None

    def loss(self, maps, masks, step):
        a = gaussian_smooth(token_maps(maps, self.boxes, text_normalise=True, n_text=self.n_text),
                            self.smoothing)
        loss = segregation_loss(a)
        if self.retention:
            loss = loss + self.retention * retention_loss(a, self.previous)
        if self.previous_step != step:  # the first iteration of a step sets the next target
            self.previous_step = step
            self.pending = binarise(a)
        return loss

    def before_step(self, run, i, t, x):
        out = super().before_step(run, i, t, x)
        if getattr(self, "pending", None) is not None:
            self.previous, self.pending = self.pending, None
        return out


# -- analysis --------------------------------------------------------------------------------
class AttentionRecordPatch(ModelPatch):
    """Records the conditional rows' per-token cross-attention maps over [start, end) of a run."""

    kind = "attention-record"

    def __init__(self, start: float = 0.0, end: float = 1.0):
        self.start, self.end = float(start), float(end)
        self.store = AttentionStore("observe", self.start, self.end)

    def cache_key(self):
        return f"{self.kind}:{self.start}:{self.end}"

    @contextlib.contextmanager
    def applied(self, unet, run):
        if run is None:
            yield
            return
        with controller_for(unet, run) as ctl, registered(ctl, self.store):
            yield


# -- MM-DiT joint attention (3DIS-FLUX renderer) ----------------------------------------------
def joint_attention_mask(n_text: int, image_hw: tuple[int, int], text_groups: Sequence[Sequence[int]],
                         image_masks: Sequence[torch.Tensor], *, image_to_image: bool = True,
                         image_to_text: bool = True, text_to_image: bool = True,
                         text_to_text: bool = True, global_text: Sequence[int] = (),
                         text_first: bool = True) -> torch.Tensor:
    """Boolean (S, S) "may attend" mask over the joint sequence, after 3DIS's detail renderer.

    text_groups[i]: positions (in the text sequence) of instance i's text; image_masks[i]: an
    (h, w) 0/1 mask of its region. While a control is on:
    - image->text: image tokens in region i see only instance i's text (plus `global_text`, the
      state 3DIS switches to after its image->image window);
    - image->image: image tokens in region i see only region i's image tokens;
    - text->image: instance i's text sees only region i's image tokens;
    - text->text: instance i's text sees only its own text.
    Image tokens outside every region and the other text tokens are unrestricted. A token in
    several regions gets the union of what each allows. FLUX orders [text, image] (text_first);
    SD3's joint processor orders [image, text].
    """
    h, w = image_hw
    n_img = h * w
    s = n_text + n_img
    blocked = torch.zeros(s, s, dtype=torch.bool)
    t0, i0 = (0, n_text) if text_first else (n_img, 0)
    text = torch.arange(n_text) + t0
    img = torch.arange(n_img) + i0
    regions = [torch.as_tensor(m).flatten().bool() for m in image_masks]
    groups = [torch.as_tensor(list(g), dtype=torch.long) for g in text_groups]
    glob = torch.as_tensor(list(global_text), dtype=torch.long)
    for g, r in zip(groups, regions):
        rows_img = img[r]
        if image_to_text:
            blocked[rows_img[:, None], text[None, :]] = True
        if image_to_image:
            blocked[rows_img[:, None], img[None, :]] = True
        if text_to_image:
            blocked[(g + t0)[:, None], img[None, :]] = True
        if text_to_text:
            blocked[(g + t0)[:, None], text[None, :]] = True
    for g, r in zip(groups, regions):
        rows_img = img[r]
        gt = g + t0
        if image_to_text:
            blocked[rows_img[:, None], gt[None, :]] = False
            if len(glob):
                blocked[rows_img[:, None], (glob + t0)[None, :]] = False
        if image_to_image:
            blocked[rows_img[:, None], rows_img[None, :]] = False
        if text_to_image:
            blocked[gt[:, None], rows_img[None, :]] = False
        if text_to_text:
            blocked[gt[:, None], gt[None, :]] = False
    return ~blocked


class FluxLayoutAttnProcessor:
    """A FLUX attention processor (double and single blocks) that applies a joint-attention mask.

    `ctl.mask_for(n_text, n_img)` gives the boolean mask for the current step or None (then the
    plain SDPA path runs). Set `record` to keep the last probabilities (tests, analysis).
    """

    def __init__(self, ctl: "JointMaskController"):
        self.ctl = ctl
        self.record = False
        self.last_probs: Optional[torch.Tensor] = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x):
            return x.unflatten(-1, (-1, attn.head_dim))

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), \
            heads(attn.to_v(hidden_states))
        query, key = attn.norm_q(query), attn.norm_k(key)
        n_ctx = 0
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            eq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
            ek = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
            ev = heads(attn.add_v_proj(encoder_hidden_states))
            n_ctx = encoder_hidden_states.shape[1]
            query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        seq = query.shape[1]
        mask = self.ctl.mask_for(seq)
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if self.record or mask is not None and attention_mask is not None:
            logits = (q @ k.transpose(-1, -2)) * (attn.head_dim ** -0.5)
            if attention_mask is not None:
                logits = logits + attention_mask
            if mask is not None:
                logits = logits.masked_fill(~mask.to(logits.device), float("-inf"))
            probs = logits.softmax(-1)
            if self.record:
                self.last_probs = probs.detach()
            out = probs @ v
        else:
            attn_mask = mask.to(q.device) if mask is not None else attention_mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None and n_ctx:
            ctx_out, img_out = out[:, :n_ctx], out[:, n_ctx:]
            img_out = attn.to_out[1](attn.to_out[0](img_out.contiguous()))
            ctx_out = attn.to_add_out(ctx_out.contiguous())
            return img_out, ctx_out
        return out


class SD3LayoutAttnProcessor:
    """SD3's joint attention (diffusers' JointAttnProcessor2_0, sequence [image, text]) with the
    3DIS mask of `ctl.mask_for(seq)` (built with text_first=False). With no mask it runs the very
    SDPA call of JointAttnProcessor2_0. SD3.5's image-only `attn2` gets the image->image part of
    the mask. Set `record` to keep the last probabilities (tests, analysis)."""

    def __init__(self, ctl: "JointMaskController"):
        self.ctl = ctl
        self.record = False
        self.last_probs: Optional[torch.Tensor] = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        batch, n_img = hidden_states.shape[0], hidden_states.shape[1]

        def heads(x):
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), \
            heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            eq = heads(attn.add_q_proj(encoder_hidden_states))
            ek = heads(attn.add_k_proj(encoder_hidden_states))
            ev = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = torch.cat([query, eq], 2), torch.cat([key, ek], 2), torch.cat([value, ev], 2)
            mask = self.ctl.mask_for(query.shape[2])
        else:
            mask = self.ctl.image_mask_for(query.shape[2])
        if self.record:
            logits = (query @ key.transpose(-1, -2)) * (query.shape[-1] ** -0.5)
            if mask is not None:
                logits = logits.masked_fill(~mask.to(logits.device), float("-inf"))
            probs = logits.softmax(-1)
            self.last_probs = probs.detach()
            out = probs @ value
        elif mask is not None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.to(query.device),
                                                 dropout_p=0.0, is_causal=False)
        else:
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1]).to(query.dtype)
        if encoder_hidden_states is not None:
            out, ctx_out = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                ctx_out = attn.to_add_out(ctx_out)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, ctx_out) if encoder_hidden_states is not None else out


class JointMaskController:
    """Step-aware 3DIS mask source for the MM-DiT processors (FLUX: text first; SD3: image first)."""

    def __init__(self, n_text: int, image_hw, text_groups, layout_boxes, *, i2i_steps: int = 4,
                 i2t_steps: int = 20, t2i_steps: int = 20, t2t_steps: int = 20,
                 global_text: Sequence[int] = (), text_first: bool = True):
        self.text_first = bool(text_first)
        self.n_text, self.image_hw = n_text, tuple(image_hw)
        self.text_groups, self.global_text = [list(g) for g in text_groups], list(global_text)
        self.masks = [box_mask(b, *self.image_hw) for b in layout_boxes]
        self.windows = {"i2i": i2i_steps, "i2t": i2t_steps, "t2i": t2i_steps, "t2t": t2t_steps}
        self.step = 0
        self._cache: dict = {}

    def mask_for(self, seq: int) -> Optional[torch.Tensor]:
        on = {k: self.step < v for k, v in self.windows.items()}
        if not any(on.values()) or not self.masks or seq != self.n_text + self.image_hw[0] * self.image_hw[1]:
            return None
        key = tuple(sorted(on.items()))
        if key not in self._cache:
            # after the image->image window, image->text also opens to the global text (3DIS)
            self._cache[key] = joint_attention_mask(
                self.n_text, self.image_hw, self.text_groups, self.masks,
                image_to_image=on["i2i"], image_to_text=on["i2t"], text_to_image=on["t2i"],
                text_to_text=on["t2t"], global_text=() if on["i2i"] else self.global_text,
                text_first=self.text_first)
        return self._cache[key]

    def image_mask_for(self, seq: int) -> Optional[torch.Tensor]:
        """The image->image part of the mask, for image-only attention (SD3.5's attn2)."""
        n_img = self.image_hw[0] * self.image_hw[1]
        if seq != n_img:
            return None
        full = self.mask_for(self.n_text + n_img)
        if full is None:
            return None
        i0 = self.n_text if self.text_first else 0
        return full[i0:i0 + n_img, i0:i0 + n_img]


def flux_attention_names(transformer) -> list[str]:
    return list(transformer.attn_processors)


def is_sd3(module: Any) -> bool:
    return type(module).__name__ == "SD3Transformer2DModel"


def mmdit_tokens_hw(transformer, latent_shape) -> tuple[int, int]:
    """The image-token grid of an SD3 transformer for a latent of `latent_shape` (..., H, W):
    one token per patch_size x patch_size latent pixels, so it follows the image size."""
    p = int(getattr(transformer.config, "patch_size", 2) or 2)
    return int(latent_shape[-2]) // p, int(latent_shape[-1]) // p


class JointAttentionMaskPatch(ModelPatch):
    """3DIS-FLUX masks on an MM-DiT transformer: SD3 (loaded from folders, used by the
    JointAttentionMask node) or FLUX (from code and tests: FLUX folders do not load yet).

    `image_hw` None takes the token grid from the sampled latent (SD3 only: FLUX packs its
    latents, so a FLUX caller gives the grid). No boxes: nothing is installed, so the run is
    bit-identical to the unpatched model."""

    kind = "joint-attention-mask"

    def __init__(self, layout, text_groups, n_text: int, image_hw=None, i2i_steps: int = 4,
                 i2t_steps: int = 20, t2i_steps: int = 20, t2t_steps: int = 20, global_text=()):
        self.layout = layout or {"boxes": []}
        self.args = dict(n_text=n_text, image_hw=None if image_hw is None else tuple(image_hw),
                         text_groups=[list(g) for g in text_groups],
                         i2i_steps=i2i_steps, i2t_steps=i2t_steps, t2i_steps=t2i_steps,
                         t2t_steps=t2t_steps, global_text=list(global_text))

    def cache_key(self):
        return f"{self.kind}:{layout_key(self.layout)}:{json.dumps(self.args, sort_keys=True)}"

    @contextlib.contextmanager
    def applied(self, transformer, run):
        from kernels.patching import attention_processors

        if not self.layout.get("boxes"):
            yield
            return
        a = self.args
        sd3 = is_sd3(transformer)
        image_hw = a["image_hw"]
        if image_hw is None:
            if not sd3 or getattr(run, "latent_shape", None) is None:
                raise ValueError("JointAttentionMaskPatch needs image_hw unless it patches an SD3 "
                                 "transformer during a sampling run")
            image_hw = mmdit_tokens_hw(transformer, run.latent_shape)
        ctl = JointMaskController(a["n_text"], image_hw, a["text_groups"], self.layout["boxes"],
                                  i2i_steps=a["i2i_steps"], i2t_steps=a["i2t_steps"],
                                  t2i_steps=a["t2i_steps"], t2t_steps=a["t2t_steps"],
                                  global_text=a["global_text"], text_first=not sd3)
        self.controller = ctl
        ts = getattr(getattr(run, "scheduler", None), "timesteps", None)

        def pre_hook(module, args, kwargs):
            t = kwargs.get("timestep", args[3] if len(args) > 3 else None)
            sched_ts = getattr(getattr(run, "scheduler", None), "timesteps", ts)
            if t is not None and sched_ts is not None and len(sched_ts):
                tt = torch.as_tensor(t).flatten()[0].float().cpu()
                # FLUX is called with t / 1000, SD3 with the scheduler's own timestep
                scale = 1000.0 if not sd3 and float(tt) <= 1.0 and float(sched_ts.max()) > 1.0 else 1.0
                ctl.step = int(torch.argmin((sched_ts.float().cpu() - tt * scale).abs()))

        proc = SD3LayoutAttnProcessor if sd3 else FluxLayoutAttnProcessor
        procs = {n: proc(ctl) for n in flux_attention_names(transformer)}
        self.processors = procs
        handle = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            with attention_processors(transformer, procs):
                yield
        finally:
            handle.remove()


def is_mmdit(module: Any) -> bool:
    name = type(module).__name__
    return name in ("FluxTransformer2DModel", "SD3Transformer2DModel")


# -- heat maps (AttentionMaps node) ----------------------------------------------------------
def select_word_tokens(cond, words: str = "") -> tuple[list[str], list[int]]:
    """Labels and token positions to show: the comma-separated `words` (or every prompt word)."""
    wanted = [w.strip().lower() for w in words.split(",") if w.strip()]
    labels, tokens = [], []
    for pos, word in prompt_tokens(cond):
        if wanted and word not in wanted:
            continue
        labels.append(word)
        tokens.append(pos)
    return labels, tokens


def heat_colours(values: torch.Tensor) -> torch.Tensor:
    """0..1 values (..., h, w) -> RGB (..., h, w, 3): black, red, yellow, white."""
    v = values.clamp(0, 1)[..., None]
    r = (v * 3).clamp(0, 1)
    g = (v * 3 - 1).clamp(0, 1)
    b = (v * 3 - 2).clamp(0, 1)
    return torch.cat([r, g, b], dim=-1)


def heatmap_grid(maps: torch.Tensor, tile: int = 64, gap: int = 2) -> torch.Tensor:
    """(T, h, w) maps -> one IMAGE (1, tile, T*(tile+gap)-gap, 3), each map stretched over its
    own range (min black, max white), tiles in a row separated by gray gaps."""
    t, h, w = maps.shape
    m = maps.detach().float()
    lo = m.flatten(1).amin(dim=1)[:, None, None]
    hi = m.flatten(1).amax(dim=1)[:, None, None]
    m = (m - lo) / (hi - lo).clamp_min(1e-12)
    th = max(1, round(tile * h / max(h, w)))
    tw = max(1, round(tile * w / max(h, w)))
    big = F.interpolate(m[:, None], size=(th, tw), mode="nearest")[:, 0]
    tiles = heat_colours(big)  # (T, th, tw, 3)
    width = t * tw + (t - 1) * gap
    out = torch.full((1, th, width, 3), 0.5)
    for i in range(t):
        x = i * (tw + gap)
        out[0, :, x:x + tw] = tiles[i]
    return out
