"""Cross-attention processors for layout and analysis: one processor stack, many techniques.

Every layout technique (Paint-with-Words biases, per-region prompts, CSG redistribution, the
attention stores behind ZestGuide / box guidance / A-STAR / the AttentionMaps node) is a small
"transform" object registered with one `AttentionController` per sampling run. The controller
installs a single `LayoutCrossAttnProcessor` on every cross-attention layer (`attn2`) of the
UNet, so the transforms compose instead of overwriting each other's processors.

The processor keeps diffusers' fast path: when no transform is active it runs exactly the op
sequence of `AttnProcessor2_0` (SDPA), so an inactive layout is bit-identical to none. An
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
    bias(ctl, layer, q, k) -> (B_cond, 1|heads, N, L) additive logits bias (pre-softmax, post-scale)
    edit_probs(ctl, layer, probs) -> probs      (probs of the cond rows, (B_cond, heads, N, L))
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
        return start <= self.fraction < end or (end >= 1.0 and self.fraction >= start)

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


class LayoutCrossAttnProcessor:
    """A cross-attention processor that applies the controller's transforms (see module doc)."""

    def __init__(self, name: str, ctl: AttentionController):
        self.name = name
        self.ctl = ctl

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        ctl = self.ctl
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.to_k(context)
        value = attn.to_v(context)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        layer = ctl.layer(self.name, query.shape[2])
        rows = ctl.cond_rows
        transforms = ctl.transforms
        scale = head_dim ** -0.5

        # 1. additive logit biases on the conditional rows
        bias = None
        for tr in transforms:
            fn = getattr(tr, "bias", None)
            b = fn(ctl, layer, query[rows], key[rows]) if fn is not None else None
            if b is not None:
                bias = b if bias is None else bias + b
        full_bias = None
        if bias is not None:
            full_bias = query.new_zeros((batch_size, bias.shape[1], query.shape[2], key.shape[2]))
            full_bias[rows] = bias.to(query.dtype)
            if attention_mask is not None:
                full_bias = full_bias + attention_mask
        elif attention_mask is not None:
            full_bias = attention_mask
        editors = [tr for tr in transforms if getattr(tr, "edit_probs", None) is not None
                   and tr.edit_active(ctl, layer)]
        recorders = [tr for tr in transforms if getattr(tr, "wants_probs", None) is not None
                     and tr.wants_probs(ctl, layer)]

        # 2. the output: SDPA (fast path, also with a bias) or explicit softmax when edited
        probs_cond = None
        if editors:
            logits = (query @ key.transpose(-1, -2)) * scale
            if full_bias is not None:
                logits = logits + full_bias
            probs = logits.softmax(dim=-1)
            edited = probs[rows]
            for tr in editors:
                edited = tr.edit_probs(ctl, layer, edited)
            probs = probs.clone()
            probs[rows] = edited
            probs_cond = edited
            hidden_states = probs @ value
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=full_bias, dropout_p=0.0, is_causal=False)

        # 3. per-region prompts: each region's own context inside its mask (cond rows only)
        regions = []
        for tr in transforms:
            fn = getattr(tr, "regions", None)
            if fn is not None:
                regions.extend(fn(ctl, layer))
        if regions:
            q_c = query[rows]
            n_rows = q_c.shape[0]
            weights, outs = [], []
            for mask, embeds, weight, *extra in regions:
                ctx_r = embeds.to(context.dtype).expand(n_rows, -1, -1)
                if attn.norm_cross:
                    ctx_r = attn.norm_encoder_hidden_states(ctx_r)
                k_r = attn.to_k(ctx_r).view(n_rows, -1, attn.heads, head_dim).transpose(1, 2)
                v_r = attn.to_v(ctx_r).view(n_rows, -1, attn.heads, head_dim).transpose(1, 2)
                region_bias = None
                if extra and extra[0]:
                    emphasis, tokens = extra[0], extra[1].to(q_c.dtype)
                    with torch.no_grad():
                        qk_max = (q_c @ k_r.transpose(-1, -2)).amax().clamp_min(0.0)
                    w = emphasis * math.log1p(ctl.sigma) * qk_max * scale
                    region_bias = (w * tokens).view(1, 1, 1, -1)
                outs.append(F.scaled_dot_product_attention(q_c, k_r, v_r, attn_mask=region_bias))
                weights.append(mask.to(q_c.dtype).view(1, 1, -1, 1) * float(weight))
            total = torch.stack(weights).sum(0)
            norm = torch.clamp(total, min=1.0)  # overlapping regions share, never exceed 1
            blended = hidden_states[rows] * (1.0 - total / norm)
            for w, o in zip(weights, outs):
                blended = blended + (w / norm) * o
            hidden_states = hidden_states.clone()
            hidden_states[rows] = blended

        # 4. stores: probabilities on the side (never feed the output)
        if recorders:
            if probs_cond is None:
                logits = (query[rows] @ key[rows].transpose(-1, -2)) * scale
                if full_bias is not None:
                    logits = logits + full_bias[rows]
                probs_cond = logits.softmax(dim=-1)
            for tr in recorders:
                tr.record(ctl, layer, probs_cond)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
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
        ctl = self.ctl
        if encoder_hidden_states is not None:  # not self-attention after all
            return out
        recorders = [tr for tr in ctl.transforms if getattr(tr, "wants_self_probs", None) is not None]
        if not recorders:
            return out
        hs = hidden_states
        if attn.spatial_norm is not None:
            hs = attn.spatial_norm(hs, temb)
        if hs.ndim == 4:
            b, c, h, w = hs.shape
            hs = hs.view(b, c, h * w).transpose(1, 2)
        layer = ctl.layer(self.name, hs.shape[1])
        recorders = [tr for tr in recorders if tr.wants_self_probs(ctl, layer)]
        if not recorders:
            return out
        batch_size, n, _ = hs.shape
        if attn.group_norm is not None:
            hs = attn.group_norm(hs.transpose(1, 2)).transpose(1, 2)
        rows = ctl.cond_rows
        hs = hs[rows]
        query, key = attn.to_q(hs), attn.to_k(hs)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(hs.shape[0], -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(hs.shape[0], -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        logits = (query @ key.transpose(-1, -2)) * head_dim ** -0.5
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, n, batch_size)
            logits = logits + mask.view(batch_size, attn.heads, -1, mask.shape[-1])[rows]
        probs = logits.softmax(dim=-1)
        for tr in recorders:
            tr.record_self(ctl, layer, probs)
        return out


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
