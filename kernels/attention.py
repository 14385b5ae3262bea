"""Cross-attention processors for layout and analysis: one processor stack, many techniques.

Every layout technique (Paint-with-Words biases, per-region prompts, CSG redistribution, the
attention stores behind ZestGuide / box guidance / A-STAR / the AttentionMaps node) is a small
"transform" object, made for one sampling run and registered with that run's one
`AttentionController`. The controller
installs a single `LayoutCrossAttnProcessor` on every cross-attention layer (`attn2`) of the
UNet, so the transforms compose instead of overwriting each other's processors.

The processor keeps diffusers' fast path: at a layer and step where no transform acts it
calls diffusers' own `AttnProcessor2_0`, so an inactive layout is bit-identical to none. An
additive logit bias also goes through SDPA (`attn_mask`). Only a probability edit (CSG
redistribution) switches the output to the explicit softmax path. Probabilities that a store
records are computed on the side (with autograd when guidance needs it) and never feed the
output, so recording changes nothing.

Self-attention (`attn1`) is left alone unless a transform asks for its probabilities (CSG's
self-attention loss): `self_attention_recording` then wraps the chosen `attn1` processors in a
`SelfAttnRecorder`, which always runs the wrapped processor for the output (SDPA, bit-identical)
and only when a transform `wants_self_probs` computes the softmax on the side for the
conditional rows. Denoising forwards that nobody records take the plain path.

Classifier-free guidance batches [uncond, cond] in one forward; transforms act on the
conditional rows only (`ctl.cond_rows`), as Paint-with-Words does (its unconditional pass has
weight 0).

The transform interface (all optional, duck-typed):
    wants_bias(ctl, layer) -> bool;  bias(ctl, layer, q, k) -> (B_cond, 1|heads, N, L) additive
        logits bias (pre-softmax, post-scale), asked for only where `wants_bias`
    edit_active(ctl, layer) -> bool;  edit_probs(ctl, layer, probs) -> probs  (probs of the cond
        rows, (B_cond, heads, N, L))
    regions(ctl, layer) -> list of (mask (N,), embeds (1, L', D), weight[, emphasis, tokens (L',)])
        per-region prompts; `emphasis` > 0 raises the region's `tokens` Paint-with-Words style
    wants_probs(ctl, layer) -> bool;  record(ctl, layer, probs)           (attention stores)
    wants_self_probs(ctl, layer) -> bool;  record_self(ctl, layer, probs)  (attn1 layers that
        `self_attention_recording` wrapped; probs (B_cond, heads, N, N), query rows, key columns)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from kernels.sampling import in_step_window


@dataclass
class LayerInfo:
    """What a transform knows about the layer being run."""

    name: str
    height: int  # attention map size (tokens = height * width)
    width: int


class AttentionController:
    """Per-run state shared by the processors: current step, sigma, which rows are conditional."""

    def __init__(self, run: Any):
        self.run = run
        self.transforms: list = []
        self.step = 0
        self.n_steps = max(1, int(getattr(run, "steps", 1) or 1))
        self.timestep: Optional[torch.Tensor] = None
        self.sigma = 0.0
        self.cond_rows = slice(None)
        self.guiding = False  # True during a guidance forward (stores keep the autograd graph)
        self.latent_hw = tuple(run.latent_shape[2:]) if run is not None else (0, 0)

    # -- run bookkeeping -------------------------------------------------------------------
    @property
    def fraction(self) -> float:
        """Position in the schedule, 0 at the first step (noisiest) and < 1 at the last."""
        return self.step / self.n_steps

    def in_range(self, start: float, end: float) -> bool:
        return in_step_window(self.fraction, start, end)

    def before_forward(self, sample: torch.Tensor, timestep) -> None:
        """Called by the UNet pre-hook: which step, which sigma, which rows are conditional."""
        t = torch.as_tensor(timestep).flatten()[0].float().cpu()
        self.timestep = t
        sched = self.run.scheduler if self.run is not None else None
        ts = getattr(sched, "timesteps", None)
        if ts is not None and len(ts):
            self.step = int(torch.argmin((ts.float().cpu() - t).abs()))
            self.n_steps = len(ts)
        self.sigma = scheduler_sigma(sched, t)
        b = int(self.run.latent_shape[0]) if self.run is not None else sample.shape[0]
        self.cond_rows = slice(b, 2 * b) if sample.shape[0] == 2 * b else slice(None)

    def layer(self, name: str, n_tokens: int) -> LayerInfo:
        h_lat, w_lat = self.latent_hw or (int(math.isqrt(n_tokens)),) * 2
        factor = math.sqrt(h_lat * w_lat / n_tokens)
        return LayerInfo(name, max(1, round(h_lat / factor)), max(1, round(w_lat / factor)))


def scheduler_sigma(scheduler, t: torch.Tensor) -> float:
    """The noise level sigma_t = sqrt((1 - abar) / abar) at timestep t (flow: s / (1 - s))."""
    if scheduler is None:
        return 0.0
    acp = getattr(scheduler, "alphas_cumprod", None)
    if acp is not None:
        i = int(torch.clamp(t.round().long(), 0, len(acp) - 1))
        abar = float(acp[i])
        return math.sqrt(max(1.0 - abar, 0.0) / max(abar, 1e-12))
    n = float(getattr(scheduler.config, "num_train_timesteps", 1000))
    s = min(max(float(t) / n, 0.0), 0.999)
    return s / (1.0 - s)


def spatial_tokens(hidden_states: torch.Tensor) -> int:
    """How many query tokens an attention layer sees: h * w for a (B, C, h, w) input."""
    if hidden_states.ndim == 4:
        return hidden_states.shape[2] * hidden_states.shape[3]
    return hidden_states.shape[1]


def attention_probs(query: torch.Tensor, key: torch.Tensor, scale: float,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(QK^T * scale + bias) over (B, heads, N, L) tensors, with autograd.

    Written out rather than `attn.get_attention_scores`: that one works on (B * heads) batches
    and runs baddbmm, whose rounding need not match; the guidance losses and bench figures were
    made on these values."""
    logits = (query @ key.transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1)


def paint_with_words_weight(strength: float, sigma: float, query: torch.Tensor,
                            key: torch.Tensor) -> torch.Tensor:
    """Paint-with-Words' w = w' * log(1 + sigma_t) * max(QK^T) (the max taken without grad)."""
    with torch.no_grad():
        qk_max = (query @ key.transpose(-1, -2)).amax().clamp_min(0.0)
    return strength * math.log1p(sigma) * qk_max


@dataclass
class LayerPlan:
    """What the registered transforms do at one layer in one forward."""

    biasers: list
    editors: list
    regions: list
    recorders: list

    @classmethod
    def of(cls, ctl: AttentionController, layer: LayerInfo) -> "LayerPlan":
        transforms = ctl.transforms
        regions = []
        for tr in transforms:
            if getattr(tr, "regions", None) is not None:
                regions.extend(tr.regions(ctl, layer))
        return cls(
            biasers=[tr for tr in transforms if getattr(tr, "bias", None) is not None
                     and tr.wants_bias(ctl, layer)],
            editors=[tr for tr in transforms if getattr(tr, "edit_probs", None) is not None
                     and tr.edit_active(ctl, layer)],
            regions=regions,
            recorders=[tr for tr in transforms if getattr(tr, "wants_probs", None) is not None
                       and tr.wants_probs(ctl, layer)])

    @property
    def idle(self) -> bool:
        return not (self.biasers or self.editors or self.regions or self.recorders)


class LayoutCrossAttnProcessor:
    """A cross-attention processor that applies the controller's transforms (see module doc).

    A layer and step where no transform acts runs diffusers' own `AttnProcessor2_0`. Otherwise
    the steps are written out here, with diffusers' pieces (`prepare_attention_mask`,
    `head_to_batch_dim`, the layer's projections and norms): `AttnProcessor2_0` gives no hook
    for a logit bias on some rows, edited probabilities, extra contexts or recorded
    probabilities. The op sequence follows `AttnProcessor2_0`'s.
    """

    def __init__(self, name: str, ctl: AttentionController):
        self.name = name
        self.ctl = ctl
        self.plain = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        layer = self.ctl.layer(self.name, spatial_tokens(hidden_states))
        plan = LayerPlan.of(self.ctl, layer)
        if plan.idle:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                              *args, **kwargs)
        return self.steered(attn, layer, plan, hidden_states, encoder_hidden_states,
                            attention_mask, temb)

    def steered(self, attn, layer: LayerInfo, plan: LayerPlan, hidden_states,
                encoder_hidden_states, attention_mask, temb):
        ctl, rows = self.ctl, self.ctl.cond_rows
        residual = hidden_states
        x, spatial = attention_input(attn, hidden_states, temb)
        batch_size = x.shape[0]
        if attention_mask is not None:
            context_length = (x if encoder_hidden_states is None else encoder_hidden_states).shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, context_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        context = x if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = heads_qkv(attn, x, context)
        scale = query.shape[-1] ** -0.5

        bias = self.logit_bias(plan, layer, query, key, attention_mask)
        out, probs_cond = self.attend(plan, layer, query, key, value, bias, scale)
        if plan.regions:
            out = self.blend_regions(attn, plan.regions, query[rows], out, context.dtype, scale)
        if plan.recorders:
            if probs_cond is None:
                probs_cond = attention_probs(query[rows], key[rows], scale,
                                             None if bias is None else bias[rows])
            for tr in plan.recorders:  # on the side: recorded probabilities never feed the output
                tr.record(ctl, layer, probs_cond)
        return attention_output(attn, out, residual, spatial)

    def logit_bias(self, plan: LayerPlan, layer: LayerInfo, query, key, attention_mask):
        """The biasers' logits on the conditional rows (zeros elsewhere), plus the layer's mask."""
        ctl, rows = self.ctl, self.ctl.cond_rows
        bias = None
        for tr in plan.biasers:
            b = tr.bias(ctl, layer, query[rows], key[rows])
            if b is not None:
                bias = b if bias is None else bias + b
        if bias is None:
            return attention_mask
        full = query.new_zeros((query.shape[0], bias.shape[1], query.shape[2], key.shape[2]))
        full[rows] = bias.to(query.dtype)
        return full if attention_mask is None else full + attention_mask

    def attend(self, plan: LayerPlan, layer: LayerInfo, query, key, value, bias, scale):
        """(B, heads, N, d) attention output, and the conditional rows' probabilities when they
        were computed for it: SDPA (also with a bias), an explicit softmax when edited."""
        if not plan.editors:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0,
                                                 is_causal=False)
            return out, None
        ctl, rows = self.ctl, self.ctl.cond_rows
        probs = attention_probs(query, key, scale, bias)
        edited = probs[rows]
        for tr in plan.editors:
            edited = tr.edit_probs(ctl, layer, edited)
        probs = probs.clone()
        probs[rows] = edited
        return probs @ value, edited

    def blend_regions(self, attn, regions, query_cond, out, context_dtype, scale):
        """Per-region prompts: inside each region's mask the conditional rows attend to that
        region's own context (plus its Paint-with-Words emphasis); overlaps share."""
        rows, sigma = self.ctl.cond_rows, self.ctl.sigma
        n_rows = query_cond.shape[0]
        weights, outs = [], []
        for mask, embeds, weight, *extra in regions:
            context = embeds.to(context_dtype).expand(n_rows, -1, -1)
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            key = attn.head_to_batch_dim(attn.to_k(context), out_dim=4)
            value = attn.head_to_batch_dim(attn.to_v(context), out_dim=4)
            region_bias = None
            if extra and extra[0]:
                emphasis, tokens = extra[0], extra[1].to(query_cond.dtype)
                w = paint_with_words_weight(emphasis, sigma, query_cond, key) * scale
                region_bias = (w * tokens).view(1, 1, 1, -1)
            outs.append(F.scaled_dot_product_attention(query_cond, key, value, attn_mask=region_bias))
            weights.append(mask.to(query_cond.dtype).view(1, 1, -1, 1) * float(weight))
        total = torch.stack(weights).sum(0)
        norm = torch.clamp(total, min=1.0)  # overlapping regions share, never exceed 1
        blended = out[rows] * (1.0 - total / norm)
        for w, o in zip(weights, outs):
            blended = blended + (w / norm) * o
        out = out.clone()
        out[rows] = blended
        return out


def attention_input(attn, hidden_states: torch.Tensor, temb=None):
    """The layer's input as (B, N, C) after its spatial norm, and the (B, C, h, w) shape of a
    spatial input (None otherwise), as `AttnProcessor2_0` prepares it."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim != 4:
        return hidden_states, None
    b, c, h, w = hidden_states.shape
    return hidden_states.view(b, c, h * w).transpose(1, 2), (b, c, h, w)


def heads_qkv(attn, x: torch.Tensor, context: torch.Tensor, with_value: bool = True):
    """Query, key (and value) as (B, heads, N, d), the layer's q/k norms applied."""
    query = attn.head_to_batch_dim(attn.to_q(x), out_dim=4)
    key = attn.head_to_batch_dim(attn.to_k(context), out_dim=4)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if not with_value:
        return query, key
    return query, key, attn.head_to_batch_dim(attn.to_v(context), out_dim=4)


def attention_output(attn, out: torch.Tensor, residual: torch.Tensor, spatial) -> torch.Tensor:
    """(B, heads, N, d) attention back to the layer's output, as `AttnProcessor2_0` finishes."""
    b = out.shape[0]
    hidden_states = out.transpose(1, 2).reshape(b, -1, attn.heads * out.shape[-1])
    hidden_states = hidden_states.to(out.dtype)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if spatial is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(*spatial)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def cross_attention_names(unet) -> list[str]:
    """Processor names of the UNet's cross-attention layers (`...attn2.processor`)."""
    return [n for n in unet.attn_processors if n.endswith("attn2.processor")]


@contextlib.contextmanager
def controller_for(unet, run, key: str = "loomwork.attention") -> Iterator[AttentionController]:
    """The run's attention controller, installed on first use and removed when its user exits.

    Several patches may ask within one run; the first one installs the processors and a UNet
    pre-hook (step and sigma tracking), the others reuse them. Everything is restored on exit.
    """
    from kernels.patching import attention_processors

    state = run.state
    if key in state:
        yield state[key]
        return
    ctl = AttentionController(run)
    state[key] = ctl
    procs = {n: LayoutCrossAttnProcessor(n, ctl) for n in cross_attention_names(unet)}

    def pre_hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        ctl.before_forward(sample, timestep)

    handle = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with attention_processors(unet, procs):
            yield ctl
    finally:
        handle.remove()
        state.pop(key, None)


class SelfAttnRecorder:
    """Wraps a self-attention (`attn1`) processor: the output is always the wrapped processor's;
    when a transform `wants_self_probs` for this layer, the conditional rows' softmax(QK^T/sqrt(d))
    is computed on the side (with autograd during guidance) and handed to `record_self`."""

    def __init__(self, name: str, ctl: AttentionController, inner: Any):
        self.name = name
        self.ctl = ctl
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                         *args, **kwargs)
        if encoder_hidden_states is None:  # self-attention indeed
            self.record(attn, hidden_states, attention_mask, temb)
        return out

    def record(self, attn, hidden_states, attention_mask, temb) -> None:
        """The conditional rows' self-attention probabilities to the transforms that want them.
        Written out: the wrapped processor runs SDPA and never forms the probabilities."""
        ctl = self.ctl
        layer = ctl.layer(self.name, spatial_tokens(hidden_states))
        recorders = [tr for tr in ctl.transforms if getattr(tr, "wants_self_probs", None) is not None
                     and tr.wants_self_probs(ctl, layer)]
        if not recorders:
            return
        x, _ = attention_input(attn, hidden_states, temb)
        batch_size, n, _ = x.shape
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        rows = ctl.cond_rows
        query, key = heads_qkv(attn, x[rows], x[rows], with_value=False)
        bias = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, n, batch_size)
            bias = mask.view(batch_size, attn.heads, -1, mask.shape[-1])[rows]
        probs = attention_probs(query, key, query.shape[-1] ** -0.5, bias)
        for tr in recorders:
            tr.record_self(ctl, layer, probs)


def self_attention_names(unet) -> list[str]:
    """Processor names of the UNet's self-attention layers (`...attn1.processor`)."""
    return [n for n in unet.attn_processors if n.endswith("attn1.processor")]


@contextlib.contextmanager
def self_attention_recording(unet, ctl: AttentionController, names) -> Iterator[None]:
    """Wrap the named `attn1` processors in `SelfAttnRecorder`s for as long as the caller needs
    them (restored on exit); nothing is installed for an empty `names`."""
    from kernels.patching import attention_processors

    current = unet.attn_processors
    procs = {n: SelfAttnRecorder(n, ctl, current[n]) for n in names
             if not (isinstance(current.get(n), SelfAttnRecorder) and current[n].ctl is ctl)}
    if not procs:
        yield
        return
    with attention_processors(unet, procs):
        yield


@contextlib.contextmanager
def registered(ctl: AttentionController, transform) -> Iterator[None]:
    ctl.transforms.append(transform)
    try:
        yield
    finally:
        ctl.transforms.remove(transform)


# -- attention stores ----------------------------------------------------------------------
class AttentionStore:
    """Records per-token cross-attention probabilities of the conditional rows.

    mode "guide": only during guidance forwards (`ctl.guiding`), keeping the autograd graph.
    mode "observe": during the denoising forwards of steps in [start, end), detached, summed
    per resolution so memory stays bounded.
    """

    def __init__(self, mode: str = "guide", start: float = 0.0, end: float = 1.0,
                 self_layers=()):
        self.mode = mode
        self.start, self.end = start, end
        self.layers: list[tuple[LayerInfo, torch.Tensor]] = []  # guide: this forward's maps
        # guide mode: attn1 layers (processor names) whose self-attention is also kept
        self.self_layers = set(self_layers)
        self.self_maps_: list[tuple[LayerInfo, torch.Tensor]] = []
        self.sums: dict[tuple[int, int], torch.Tensor] = {}     # observe: accumulated
        self.counts: dict[tuple[int, int], int] = {}

    def reset(self) -> None:
        self.layers = []
        self.self_maps_ = []

    def wants_probs(self, ctl: AttentionController, layer: LayerInfo) -> bool:
        if self.mode == "guide":
            return ctl.guiding
        return not ctl.guiding and ctl.in_range(self.start, self.end)

    def wants_self_probs(self, ctl: AttentionController, layer: LayerInfo) -> bool:
        return self.mode == "guide" and ctl.guiding and layer.name in self.self_layers

    def record_self(self, ctl, layer: LayerInfo, probs: torch.Tensor) -> None:
        self.self_maps_.append((layer, probs.mean(dim=1)))  # over heads: (B, N, N)

    def self_maps(self) -> Optional[tuple[torch.Tensor, tuple[int, int]]]:
        """This guidance forward's self-attention (B, N, N) averaged over heads and layers, and
        its (h, w) with h * w = N (the largest recorded resolution if several were recorded)."""
        if not self.self_maps_:
            return None
        layer = max((lay for lay, _ in self.self_maps_), key=lambda lay: lay.height * lay.width)
        hw = (layer.height, layer.width)
        kept = [m for lay, m in self.self_maps_ if (lay.height, lay.width) == hw]
        return torch.stack(kept).mean(0), hw

    def record(self, ctl, layer: LayerInfo, probs: torch.Tensor) -> None:
        maps = probs.mean(dim=1)  # over heads: (B, N, L)
        if self.mode == "guide":
            self.layers.append((layer, maps))
            return
        key = (layer.height, layer.width)
        m = maps.detach().float()[:1]
        self.sums[key] = self.sums[key] + m if key in self.sums else m.clone()
        self.counts[key] = self.counts.get(key, 0) + 1

    def maps(self, size: Optional[tuple[int, int]] = None, min_size: int = 1) -> Optional[torch.Tensor]:
        """Token maps (B, L, h, w) averaged over layers (and steps), resized to `size`.

        `size` defaults to the largest recorded resolution; layers smaller than `min_size` on a
        side are left out (too coarse to localise anything) unless nothing else was recorded.
        """
        if self.mode == "guide":
            items = [(layer.height, layer.width, m) for layer, m in self.layers]
        else:
            items = [(h, w, s / self.counts[(h, w)]) for (h, w), s in self.sums.items()]
        if not items:
            return None
        kept = [it for it in items if min(it[0], it[1]) >= min_size] or items
        if size is None:
            size = max(((h, w) for h, w, _ in kept), key=lambda hw: hw[0] * hw[1])
        out = None
        for h, w, m in kept:
            grid = m.transpose(1, 2).reshape(m.shape[0], m.shape[2], h, w)
            if (h, w) != tuple(size):
                grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
            out = grid if out is None else out + grid
        return out / len(kept)
