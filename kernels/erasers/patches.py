"""Weight-change patches of the erasers, and the layers they change.

An eraser is a `ModelPatch` (kernels.patching): a value recorded on a MODEL or CLIP bundle and
applied to the shared model only while a sampler or text encoder runs, so the input model is never
changed in place. Weight changes are stored as deltas and added to whatever the parameter holds
when the patch is entered, so erasers chained in a graph compose (the second eraser is computed on,
and applied over, the first one's weights).

- `WeightDeltaPatch`: W + strength * delta (closed-form edits, neuron pruning);
- `LoraPatch`: W + strength * scale * B A, the (A, B) factors peft trained (ESD, All-but-One);
  the scale alpha / rank and the factor shapes are peft's `LoraLayer` convention.

Patches are values: nothing is stored on them while they are applied, and `with_strength` makes
a new one. Their cache key is a content hash of what they are (kernels.hashing).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Optional

import torch

from kernels.hashing import content_hash
from kernels.patching import ModelPatch, SamplingRun, swapped_weights


# ---------------------------------------------------------------------------------------------
# finding the layers
# ---------------------------------------------------------------------------------------------
def text_encoder_out_proj(text_encoder, layer: int = 0) -> str:
    """Parameter-owning module name of self-attention `out_proj` in encoder layer `layer`.

    transformers 5 names it `encoder.layers.N...`, 4.x `text_model.encoder.layers.N...`.
    """
    suffix = f"encoder.layers.{layer}.self_attn.out_proj"
    for name, _module in text_encoder.named_modules():
        if name == suffix or name.endswith("." + suffix):
            return name
    raise ValueError(f"the text encoder has no module ending in {suffix!r}")


def text_encoder_mlp_out(text_encoder, layer: int) -> tuple[str, str]:
    """(MLP output projection `fc2`, the `layer_norm2` whose input is the residual stream the MLP
    adds to) of encoder layer `layer`; a negative layer counts from the last."""
    n = int(text_encoder.config.num_hidden_layers)
    index = layer + n if layer < 0 else layer
    if not 0 <= index < n:
        raise ValueError(f"the text encoder has {n} layers, not a layer {layer}")
    fc2 = text_encoder_out_proj(text_encoder, index).replace("self_attn.out_proj", "mlp.fc2")
    return fc2, fc2.replace("mlp.fc2", "layer_norm2")


def _is_mmdit(denoiser) -> bool:
    """An SD3 or FLUX transformer: text and image meet in joint attention blocks."""
    return any(name in ("transformer_blocks", "single_transformer_blocks") for name, _ in denoiser.named_children()) \
        and hasattr(denoiser, "context_embedder")


def cross_attention_kv(unet) -> list[str]:
    """Names of the projections that make keys and values from text tokens: a UNet's
    cross-attention attn2.to_k / to_v; an MM-DiT's (SD3, FLUX) joint-attention text-stream
    attn.add_k_proj / add_v_proj (FLUX's single blocks have none: text and image share theirs)."""
    if _is_mmdit(unet):
        names = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)
                 and re.search(r"(^|\.)transformer_blocks\.\d+\.attn\.add_[kv]_proj$", n)]
    else:
        names = [n for n, m in unet.named_modules()
                 if ".attn2." in f".{n}." and (n.endswith("attn2.to_k") or n.endswith("attn2.to_v"))
                 and isinstance(m, torch.nn.Linear)]
    if not names:
        raise ValueError("the model has no cross-attention key/value projections (attn2.to_k/to_v)")
    return names


def text_input_layers(unet) -> list[str]:
    """The Linear layers the denoiser's text embeddings enter, which UCE edits: a UNet's
    cross-attention to_k / to_v (each takes the text embeddings as they are); an MM-DiT's
    `context_embedder`, where the text sequence enters its text stream (the only way it reaches
    the joint attention)."""
    if _is_mmdit(unet):
        return ["context_embedder"]
    return cross_attention_kv(unet)


LAYER_SCOPES = ("cross_attention", "attention", "transformer")

_ATTENTION_LINEAR = re.compile(r"attn[12]?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$")


def _in_transformer(name: str, mmdit: bool) -> bool:
    if mmdit:
        return name.startswith(("transformer_blocks.", "single_transformer_blocks."))
    return ".attentions." in f".{name}." or name.startswith("attentions.")


def lora_targets(unet, scope: str) -> list[str]:
    """Module names a LoRA eraser trains, by scope.

    cross_attention: the text key/value projections (`cross_attention_kv`; ESD-x);
    attention: every q/k/v/out of attn1 and attn2 (an MM-DiT's: every projection of its joint
    attention, image and text stream); transformer: every Linear and 1x1 Conv2d inside the
    transformer blocks (SPM; an MM-DiT's transformer blocks are its joint and single blocks).
    """
    if scope == "cross_attention":
        return cross_attention_kv(unet)
    if scope not in LAYER_SCOPES:
        raise ValueError(f"scope must be one of {LAYER_SCOPES}, got {scope!r}")
    mmdit = _is_mmdit(unet)
    out = []
    for name, module in unet.named_modules():
        if not _in_transformer(name, mmdit):
            continue
        if scope == "attention":
            if isinstance(module, torch.nn.Linear) and (
                    _ATTENTION_LINEAR.search(name) if mmdit else re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", name)):
                out.append(name)
        elif isinstance(module, torch.nn.Linear) or (
                isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1)):
            out.append(name)
    if not out:
        raise ValueError(f"the model has no layers in scope {scope!r}")
    return out


# ---------------------------------------------------------------------------------------------
# patches
# ---------------------------------------------------------------------------------------------
class EraserPatch(ModelPatch):
    """Base of the erasers' patches: a strength, a description and a file form."""

    kind = "eraser"
    target = "unet"  # or "text_encoder": which bundle (MODEL or CLIP) it belongs to

    def __init__(self, strength: float = 1.0, meta: Optional[dict] = None):
        self.strength = float(strength)
        self.meta = dict(meta or {})
        self._key: Optional[str] = None  # cache_key, computed once: the fields never change

    def content(self) -> tuple[Any, ...]:
        """What the patch's effect depends on besides kind, target, strength and meta."""
        raise NotImplementedError

    def cache_key(self) -> str:
        if self._key is None:
            digest = content_hash(self.kind, self.target, self.strength, self.meta, *self.content())
            self._key = f"{self.kind}:{digest}"
        return self._key

    def describe(self) -> str:
        concept = self.meta.get("concept")
        return f"{self.kind}({concept})" if concept else self.kind

    def with_strength(self, strength: float) -> "EraserPatch":
        """The same eraser at another strength (a new patch; this one is unchanged)."""
        tensors, info = self.to_state()
        return type(self).from_state(tensors, {**info, "strength": float(strength)})

    # file form: tensors under names "<i>.<field>..." and JSON-able fields
    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        raise NotImplementedError

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], info: dict) -> "EraserPatch":
        raise NotImplementedError


class WeightDeltaPatch(EraserPatch):
    """Adds `strength * delta` to named parameters while applied (closed-form edits)."""

    kind = "weight-delta"

    def __init__(self, target: str, deltas: dict[str, torch.Tensor], strength: float = 1.0,
                 meta: Optional[dict] = None):
        super().__init__(strength, meta)
        self.target = target
        self.deltas = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in deltas.items()}

    def content(self):
        return (self.deltas,)

    @contextlib.contextmanager
    def applied(self, module, run):
        if self.strength == 0.0 or not self.deltas:
            yield
            return
        new = {}
        for name, delta in self.deltas.items():
            p = module.get_parameter(name)
            new[name] = (p.data.float() + self.strength * delta.to(p.device)).to(p.dtype)
        with swapped_weights(module, new):
            yield

    def to_state(self):
        return ({f"delta.{k}": v for k, v in self.deltas.items()},
                {"target": self.target, "strength": self.strength, "meta": self.meta})

    @classmethod
    def from_state(cls, tensors, info):
        deltas = {k[len("delta."):]: v for k, v in tensors.items() if k.startswith("delta.")}
        return cls(info["target"], deltas, info.get("strength", 1.0), info.get("meta"))


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float, shape) -> torch.Tensor:
    """B A * scale in the parameter's shape (Linear, or a 1x1 convolution)."""
    d = (b.reshape(b.shape[0], -1).float() @ a.reshape(a.shape[0], -1).float()) * scale
    return d.reshape(shape)


def loras_from_state(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{parameter name: (A, B)} from a LoRA patch's file tensors ("lora_A.<name>", "lora_B.<name>")."""
    return {k[len("lora_A."):]: (v, tensors["lora_B." + k[len("lora_A."):]])
            for k, v in tensors.items() if k.startswith("lora_A.")}


class LoraPatch(EraserPatch):
    """A low-rank weight change W + strength * scale * B A on named parameters (ESD, All-but-One)."""

    kind = "lora"

    def __init__(self, loras: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float,
                 strength: float = 1.0, meta: Optional[dict] = None):
        super().__init__(strength, meta)
        self.target = "unet"
        self.loras = {k: (a.detach().to("cpu", torch.float32).contiguous(),
                          b.detach().to("cpu", torch.float32).contiguous()) for k, (a, b) in loras.items()}
        self.scale = float(scale)

    def content(self):
        return (self.scale, self.loras)

    def effective_strength(self, run: Optional[SamplingRun]) -> float:
        """The strength the LoRA is applied at in this run (a membrane's follows the prompt)."""
        return self.strength

    @contextlib.contextmanager
    def applied(self, module, run):
        s = self.effective_strength(run)
        if s == 0.0 or not self.loras:
            yield
            return
        new = {}
        for name, (a, b) in self.loras.items():
            p = module.get_parameter(name)
            d = lora_delta(a, b, self.scale, p.shape).to(p.device)
            new[name] = (p.data.float() + s * d).to(p.dtype)
        with swapped_weights(module, new):
            yield

    def to_state(self):
        tensors = {}
        for k, (a, b) in self.loras.items():
            tensors[f"lora_A.{k}"] = a
            tensors[f"lora_B.{k}"] = b
        return tensors, {"target": self.target, "strength": self.strength, "scale": self.scale,
                         "meta": self.meta}

    @classmethod
    def from_state(cls, tensors, info):
        return cls(loras_from_state(tensors), info["scale"], info.get("strength", 1.0), info.get("meta"))
