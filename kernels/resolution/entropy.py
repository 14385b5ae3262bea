"""Attention-entropy scaling (Jin et al., "Training-free Diffusion Model Adaptation for
Variable-Sized Text-to-Image Synthesis", NeurIPS 2023).

The entropy of a softmax over N keys grows like log N, so a UNet run at another size than it was
trained at attends flatter (more tokens) or sharper (fewer) than it learnt to: repeated objects
above the training size, cut-off ones below it. Scaling the self-attention logits by
`lambda = sqrt(log_T N / d)` instead of `1 / sqrt(d)`, with T the layer's token count at the
training size and N its count now, keeps the entropy where training left it. At the training size
lambda = 1/sqrt(d): the patch then runs diffusers' own processor, so it is bit-identical to no
patch. Cross-attention (a fixed number of text keys) is left alone.

`EntropyScalePatch` installs `EntropyScaledSelfAttn` on every self-attention (`attn1`) layer for
one run. Each UNet call's sample size is read by a forward pre-hook, so a layer's T follows the
call (a tiled run's tile, a hires pass's size). The processor wraps the one it replaces: where the
size is the training size it calls it unchanged; elsewhere it runs `AttnProcessor2_0`'s steps with
SDPA's `scale=lambda`. It composes with the layout processors (they sit on `attn2`) and with a
`SelfAttnRecorder` a layout guidance patch put on `attn1` (the recorder stays outermost and keeps
recording); any other self-attention processor is refused with its name.

Sources checked: the paper's abstract and formula (lambda = sqrt(log_T N) / sqrt(d)), and a
third-party reimplementation's `(log_base(N, base_len) / head_dim) ** 0.5`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from kernels.attention import (
    SelfAttnRecorder,
    attention_input,
    attention_output,
    heads_qkv,
    self_attention_names,
    spatial_tokens,
)
from kernels.patching import ModelPatch, attention_processors


class EntropyScaleError(ValueError):
    """A model or processor stack entropy scaling cannot work with; the message says which."""


def entropy_scale(tokens: float, training_tokens: float, head_dim: int) -> float:
    """lambda = sqrt(log_T N / d) for N `tokens` now and T at the training size."""
    return math.sqrt(math.log(tokens) / math.log(training_tokens) / head_dim)


class SampleSize:
    """The (h, w) of the UNet call running now, set by the patch's forward pre-hook."""

    def __init__(self):
        self.hw: Optional[tuple[int, int]] = None


class EntropyScaledSelfAttn:
    """A self-attention processor with the entropy-preserving logit scale (see module doc)."""

    def __init__(self, inner: Any, training_hw: tuple[int, int], size: SampleSize):
        self.inner = inner
        self.training_hw = tuple(training_hw)
        self.size = size

    def training_tokens(self, tokens: int) -> Optional[float]:
        """This layer's token count at the training size (None: the call is at the training size)."""
        hw = self.size.hw
        if hw is None or tuple(hw) == self.training_hw:
            return None
        return tokens * (self.training_hw[0] * self.training_hw[1]) / (hw[0] * hw[1])

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        n = spatial_tokens(hidden_states)
        t = self.training_tokens(n)
        if encoder_hidden_states is not None or t is None or t <= 1.0 or n <= 1:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                              *args, **kwargs)
        residual = hidden_states
        x, spatial = attention_input(attn, hidden_states, temb)
        batch_size = x.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, n, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        query, key, value = heads_qkv(attn, x, x)
        scale = entropy_scale(n, t, query.shape[-1])
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             dropout_p=0.0, is_causal=False, scale=scale)
        return attention_output(attn, out.to(query.dtype), residual, spatial)


PLAIN_PROCESSORS = (AttnProcessor2_0, AttnProcessor)


def scaled_processors(unet, training_hw: tuple[int, int], size: SampleSize) -> dict[str, Any]:
    """The attn1 processors of a run: each current one wrapped (inside a layout recorder)."""
    names = self_attention_names(unet)
    if not names:
        raise EntropyScaleError(f"{type(unet).__name__} has no UNet self-attention (attn1) layers: "
                                f"attention-entropy scaling works on UNet models (SD 1.x/2.x, SDXL, "
                                f"ShapesT2I)")
    current = unet.attn_processors
    out = {}
    for name in names:
        proc = current[name]
        if isinstance(proc, SelfAttnRecorder) and type(proc.inner) in PLAIN_PROCESSORS:
            out[name] = SelfAttnRecorder(proc.name, proc.ctl, EntropyScaledSelfAttn(proc.inner, training_hw, size))
        elif type(proc) in PLAIN_PROCESSORS:  # a subclass may compute something else
            out[name] = EntropyScaledSelfAttn(proc, training_hw, size)
        elif isinstance(proc, EntropyScaledSelfAttn):
            raise EntropyScaleError("attention-entropy scaling is applied twice to this model: keep one "
                                    "AttentionEntropyScale node")
        else:
            raise EntropyScaleError(f"self-attention layer {name} already has a "
                                    f"{type(proc).__name__} processor, which entropy scaling cannot "
                                    f"combine with")
    return out


class EntropyScalePatch(ModelPatch):
    """Attention-entropy scaling on self-attention, for a UNet trained at `training_hw` (latent)."""

    kind = "attention-entropy"

    def __init__(self, training_hw: tuple[int, int]):
        h, w = (int(v) for v in training_hw)
        if h < 1 or w < 1:
            raise EntropyScaleError(f"the training size must be positive, got {h}x{w}")
        self.training_hw = (h, w)

    def cache_key(self) -> str:
        return f"{self.kind}:{self.training_hw[0]}x{self.training_hw[1]}"

    def describe(self) -> str:
        return f"attention-entropy scaling (trained at {self.training_hw[1]}x{self.training_hw[0]} latent)"

    @contextlib.contextmanager
    def applied(self, unet, run) -> Iterator[None]:
        size = SampleSize()
        processors = scaled_processors(unet, self.training_hw, size)

        def pre_hook(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            size.hw = tuple(sample.shape[-2:])

        handle = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            with attention_processors(unet, processors):
                yield
        finally:
            handle.remove()


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over queries of H(p) / ln N for attention probabilities (..., N_query, N_keys)."""
    n = probs.shape[-1]
    h = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    return h.mean() / math.log(n)
