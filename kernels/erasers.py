"""Concept erasers: remove a concept from a text-to-image model, keep the rest.

Every eraser here produces a `ModelPatch` (kernels.patching): a recorded change that is applied
to the shared model only while a sampler or text encoder runs, so the input model is never
changed in place. Weight changes are stored as deltas and added to whatever the parameter holds
when the patch is entered, so erasers chained in a graph compose (the second eraser is computed
on, and applied over, the first one's weights).

The techniques (see ../shared/TECHNIQUES.md, rows 18, 24, 41, 63, 70):

- Closed-form edits (`closed_form_weight`): the least-squares edit
  W' = (lam W + sum_e v k^T + sum_p W k_p k_p^T) (lam I + sum_e k k^T + sum_p k_p k_p^T)^-1
  maps each edited key k to its value v, keeps preserved keys k_p where W put them, and leaves
  every direction orthogonal to all keys exactly as it was.
  * `quickfix_edit` (Diff-QuickFix): W is the text encoder's first self-attention `out_proj`;
    keys are its inputs at the last subject token and every later position (EOS and padding) of
    the source prompts, values are W times its inputs at the aligned positions of the anchor
    prompts; lam = 0.01; the prompts are the concept plus "A photo of / An image of / A picture
    of" templates. (Checked against the reimplementation in fmp453/erase-eval
    train_methods/train_diffquickfix.py. That code used out_proj's outputs, bias included, as
    values; we use W k_anchor so the bias is not counted twice.)
  * `uce_edit` (UCE/TIME): W are the UNet's cross-attention `to_k`/`to_v`; keys are the final
    text embeddings at the concept's last token, values are W times the anchor's embedding at its
    last token, preserved concepts keep their own outputs. (Checked against
    rohitgandikota/unified-concept-editing trainscripts/uce_sd_erase.py: same normal equations,
    lam 0.5 there, erase/preserve scales.) `positions="to_end"` also edits every later position,
    as Diff-QuickFix does for EOS, which small encoders need because the causal encoder copies
    the concept into the tokens after it.
- Neuron pruning (`prune_concept_neurons`, row 70): zero the UNet feed-forward neurons the
  concept's prompts activate and general prompts do not, scored by an activation-weighted
  magnitude contrast; training-free, stored as a weight delta.
- Fine-tuned LoRA (`train_erasure_lora`), the negative-guidance family, trained on x_t drawn from
  the frozen model's own sampling trajectories for the concept (ESD is data-free):
  * ESD: eps(x_t, c) -> eps*(x_t) - eta (eps*(x_t, c) - eps*(x_t));
  * All-but-One: eps(x_t, c) -> eps*(x_t) + eta (eps*(x_t, c_alt) - eps*(x_t)), plus a loss
    that holds the unconditional prediction at the frozen model's (only the abstract was
    available to check: the alternative concept and model preservation);
  * SPM membrane: rank 1 on every Linear (and 1x1 Conv) inside the transformer blocks, the ESD
    loss with the empty prompt as neutral, plus latent anchoring (anchor prompts' predictions
    held at the frozen model's, on the concept's x_t as in SPM and also on the anchors' own). At inference each membrane's strength is the facilitated
    transport m = max(cos(flat E(prompt), flat E(concept)), |words(prompt) & words(concept)| /
    |words(concept)|) (checked against Con6924/SPM infer_spm.py `calculate_matching_score`;
    we compare words where SPM compares non-special token ids, the same thing for word-level
    tokenizers).
  The frozen model is the input model with its patches; the LoRA is trained with peft on a
  private copy of the UNet and kept as (A, B) factors; applying it swaps in W + s B A.
- Safe guidance (`SafeGuidancePatch`): negative guidance on the concept at inference,
  eps = eps_u + cfg (eps_c - eps_u) - s (eps_concept - eps_u), for comparison with the erasers.
- Red team (`red_team_prompt`, Prompting4Debugging): optimise free token embeddings so the
  erased model's prediction on them matches the original model's prediction on the concept
  prompt at noised images of the concept, projecting to the nearest vocabulary token every step
  (PEZ); the best hard prompt is judged by generating with the erased model. (Checked against
  joycenerd/P4D prompt_optimization/optimize_n.py.)
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from kernels.patching import ModelPatch, SamplingRun, applied_patches, swapped_weights

_WORD = re.compile(r"\w+(?:['-]\w+)*")

# Diff-QuickFix's augmentation templates ("{}" is the concept).
QUICKFIX_TEMPLATES = ("{}", "A photo of {}", "An image of {}", "A picture of {}")


def words_of(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _hash_tensors(h, tensors: dict) -> None:
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


# ---------------------------------------------------------------------------------------------
# finding the layers
# ---------------------------------------------------------------------------------------------
def text_encoder_out_proj(text_encoder, layer: int = 0) -> str:
    """Parameter-owning module name of self-attention `out_proj` in encoder layer `layer`.

    transformers 5 names it `encoder.layers.N...`, 4.x `text_model.encoder.layers.N...`.
    """
    suffix = f"encoder.layers.{layer}.self_attn.out_proj"
    for name, module in text_encoder.named_modules():
        if name == suffix or name.endswith("." + suffix):
            return name
    raise ValueError(f"the text encoder has no module ending in {suffix!r}")


def cross_attention_kv(unet) -> list[str]:
    """Names of the UNet's cross-attention key and value projections (attn2.to_k / to_v)."""
    names = [n for n, m in unet.named_modules()
             if ".attn2." in f".{n}." and (n.endswith("attn2.to_k") or n.endswith("attn2.to_v"))
             and isinstance(m, torch.nn.Linear)]
    if not names:
        raise ValueError("the model has no cross-attention key/value projections (attn2.to_k/to_v)")
    return names


LAYER_SCOPES = ("cross_attention", "attention", "transformer")


def lora_targets(unet, scope: str) -> list[str]:
    """Module names a LoRA eraser trains, by scope.

    cross_attention: attn2 to_k/to_v (ESD-x); attention: every q/k/v/out of attn1 and attn2;
    transformer: every Linear and 1x1 Conv2d inside the transformer blocks (SPM).
    """
    if scope == "cross_attention":
        return cross_attention_kv(unet)
    out = []
    for name, module in unet.named_modules():
        in_transformer = ".attentions." in f".{name}." or name.startswith("attentions.")
        if not in_transformer:
            continue
        if scope == "attention":
            if isinstance(module, torch.nn.Linear) and re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", name):
                out.append(name)
        elif scope == "transformer":
            if isinstance(module, torch.nn.Linear) or (
                    isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1)):
                out.append(name)
        else:
            raise ValueError(f"scope must be one of {LAYER_SCOPES}, got {scope!r}")
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
        self._key: Optional[str] = None

    def _hash_parts(self, h) -> None:
        raise NotImplementedError

    def cache_key(self) -> str:
        if self._key is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(f"{self.kind}|{self.target}|{self.strength!r}|".encode())
            h.update(json.dumps(self.meta, sort_keys=True, default=str).encode())
            self._hash_parts(h)
            self._key = f"{self.kind}:{h.hexdigest()}"
        return self._key

    def describe(self) -> str:
        concept = self.meta.get("concept")
        return f"{self.kind}({concept})" if concept else self.kind

    def with_strength(self, strength: float) -> "EraserPatch":
        other = copy.copy(self)
        other.strength = float(strength)
        other._key = None
        return other

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

    def _hash_parts(self, h) -> None:
        _hash_tensors(h, self.deltas)

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

    def _hash_parts(self, h) -> None:
        h.update(repr(self.scale).encode())
        _hash_tensors(h, {f"{k}.A": a for k, (a, _) in self.loras.items()})
        _hash_tensors(h, {f"{k}.B": b for k, (_, b) in self.loras.items()})

    def effective_strength(self, run: Optional[SamplingRun]) -> float:
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
    def _loras_from(cls, tensors):
        return {k[len("lora_A."):]: (v, tensors["lora_B." + k[len("lora_A."):]])
                for k, v in tensors.items() if k.startswith("lora_A.")}

    @classmethod
    def from_state(cls, tensors, info):
        return cls(cls._loras_from(tensors), info["scale"], info.get("strength", 1.0), info.get("meta"))


def transport_strength(prompt_embeds: torch.Tensor, prompt_words: Sequence[str],
                       concept_embeds: torch.Tensor, concept_words: Sequence[str]) -> float:
    """SPM's facilitated transport: max(cosine of the flattened embeddings, word overlap)."""
    a = prompt_embeds.detach().float().reshape(-1)
    b = concept_embeds.detach().float().reshape(-1)
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0)) if a.numel() == b.numel() else 0.0
    cw = set(concept_words)
    overlap = len(set(prompt_words) & cw) / len(cw) if cw else 0.0
    return max(0.0, min(1.0, max(cos, overlap)))


class MembranePatch(LoraPatch):
    """SPM: a rank-1 LoRA whose strength follows the prompt (facilitated transport).

    The prompt is the sampler's positive conditioning; with no sampling run (e.g. while another
    eraser is being trained on top) the membrane is closed (strength 0).
    """

    kind = "membrane"

    def __init__(self, loras, scale, concept_embeds: torch.Tensor, concept_words: Sequence[str],
                 strength: float = 1.0, meta: Optional[dict] = None):
        super().__init__(loras, scale, strength, meta)
        self.concept_embeds = concept_embeds.detach().to("cpu", torch.float32).contiguous()
        self.concept_words = [w.lower() for w in concept_words]

    def _hash_parts(self, h) -> None:
        super()._hash_parts(h)
        _hash_tensors(h, {"concept": self.concept_embeds})
        h.update(" ".join(self.concept_words).encode())

    def transport(self, cond) -> float:
        """m for a Conditioning (its embeddings and its words)."""
        return transport_strength(cond.embeds, list(cond.words), self.concept_embeds, self.concept_words)

    def effective_strength(self, run):
        if self.strength == 0.0 or run is None or run.positive is None:
            return 0.0
        return self.strength * self.transport(run.positive)

    def to_state(self):
        tensors, info = super().to_state()
        tensors["concept_embeds"] = self.concept_embeds
        info["concept_words"] = self.concept_words
        return tensors, info

    @classmethod
    def from_state(cls, tensors, info):
        return cls(cls._loras_from(tensors), info["scale"], tensors["concept_embeds"],
                   info["concept_words"], info.get("strength", 1.0), info.get("meta"))


class SafeGuidancePatch(EraserPatch):
    """Negative guidance away from a concept at inference (no weights change).

    While applied, the UNet's forward is wrapped: the conditional half of the CFG batch becomes
    eps_c - (s / cfg) (eps_concept - eps_u), so the sampler's CFG gives
    eps_u + cfg (eps_c - eps_u) - s (eps_concept - eps_u). `warmup` skips the noisiest part of the
    schedule (that fraction of the timestep range), as SLD does, so composition forms first.
    """

    kind = "safe-guidance"

    def __init__(self, concept_embeds: torch.Tensor, scale: float = 1.0, warmup: float = 0.0,
                 strength: float = 1.0, meta: Optional[dict] = None):
        super().__init__(strength, meta)
        self.target = "unet"
        self.concept_embeds = concept_embeds.detach().to("cpu", torch.float32).contiguous()
        self.scale = float(scale)
        self.warmup = float(warmup)

    def _hash_parts(self, h) -> None:
        h.update(f"{self.scale!r}|{self.warmup!r}".encode())
        _hash_tensors(h, {"concept": self.concept_embeds})

    @contextlib.contextmanager
    def applied(self, module, run):
        s = self.scale * self.strength
        if s == 0.0 or run is None:
            yield
            return
        had_override = "forward" in module.__dict__
        previous = module.__dict__.get("forward")
        inner = module.forward
        cfg = float(run.cfg)
        batched = cfg != 1.0 and (run.negative is not None or getattr(run.positive, "empty", None) is not None)
        n_train = int(getattr(run.scheduler.config, "num_train_timesteps", 1000) or 1000)
        concept = self.concept_embeds
        empty = getattr(run.positive, "empty", None)

        def guided(sample, timestep, encoder_hidden_states=None, *args, **kwargs):
            out = inner(sample, timestep, encoder_hidden_states, *args, **kwargs)
            as_tuple = isinstance(out, tuple)
            pred = out[0] if as_tuple else out.sample
            t = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
            if t > (1.0 - self.warmup) * n_train:
                return out
            c = concept.to(pred.device, encoder_hidden_states.dtype)
            if batched:
                half = pred.shape[0] // 2
                x = sample[half:]
                uncond, cond = pred[:half], pred[half:]
                ts = timestep[half:] if torch.is_tensor(timestep) and timestep.ndim and timestep.numel() > 1 else timestep
                e_s = inner(x, ts, c.expand(x.shape[0], -1, -1), *args, **kwargs)
                e_s = e_s[0] if isinstance(e_s, tuple) else e_s.sample
                new = torch.cat([uncond, cond - (s / cfg) * (e_s - uncond)])
            else:
                if empty is None:
                    return out
                e_s = inner(sample, timestep, c.expand(sample.shape[0], -1, -1), *args, **kwargs)
                e_u = inner(sample, timestep, empty.to(pred.device, encoder_hidden_states.dtype).expand(
                    sample.shape[0], -1, -1), *args, **kwargs)
                e_s = e_s[0] if isinstance(e_s, tuple) else e_s.sample
                e_u = e_u[0] if isinstance(e_u, tuple) else e_u.sample
                new = pred - s * (e_s - e_u)
            if as_tuple:
                return (new,) + tuple(out[1:])
            return type(out)(sample=new)

        module.forward = guided
        try:
            yield
        finally:
            if had_override:
                module.forward = previous
            else:
                del module.forward

    def to_state(self):
        return ({"concept_embeds": self.concept_embeds},
                {"target": self.target, "strength": self.strength, "scale": self.scale,
                 "warmup": self.warmup, "meta": self.meta})

    @classmethod
    def from_state(cls, tensors, info):
        return cls(tensors["concept_embeds"], info["scale"], info.get("warmup", 0.0),
                   info.get("strength", 1.0), info.get("meta"))


PATCH_KINDS: dict[str, type[EraserPatch]] = {
    c.kind: c for c in (WeightDeltaPatch, LoraPatch, MembranePatch, SafeGuidancePatch)}


# ---------------------------------------------------------------------------------------------
# closed-form edits
# ---------------------------------------------------------------------------------------------
def closed_form_weight(w: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lam: float = 0.01,
                       preserve_keys: Optional[torch.Tensor] = None, erase_scale: float = 1.0,
                       preserve_scale: float = 1.0) -> torch.Tensor:
    """The edited weight W' (out x in) for keys (n x in) -> values (n x out).

    W' = (lam W + e V^T K + p W K_p^T K_p) (lam I + e K^T K + p K_p^T K_p)^-1, solved in float64.
    For x orthogonal to every key, W' x = W x exactly; with few keys and small lam, W' k ~ v.
    """
    w64 = w.detach().double()
    k = keys.detach().double().reshape(-1, w.shape[1])
    v = values.detach().double().reshape(-1, w.shape[0])
    a = lam * torch.eye(w.shape[1], dtype=torch.float64) + erase_scale * (k.T @ k)
    b = lam * w64 + erase_scale * (v.T @ k)
    if preserve_keys is not None and preserve_keys.numel():
        kp = preserve_keys.detach().double().reshape(-1, w.shape[1])
        a = a + preserve_scale * (kp.T @ kp)
        b = b + preserve_scale * (w64 @ kp.T @ kp)
    # W' = B A^-1 with A symmetric: solve A X = B^T, W' = X^T.
    return torch.linalg.solve(a, b.T).T.to(w.dtype)


def last_token_index(tokenizer, prompt: str, end_char: int) -> int:
    """Token position (BOS = 0) of the last token covering text up to `end_char`."""
    ids = tokenizer(prompt[:end_char], truncation=True, max_length=tokenizer.model_max_length).input_ids
    eos = getattr(tokenizer, "eos_token_id", None)
    while ids and eos is not None and ids[-1] == eos:
        ids = ids[:-1]
    pad = getattr(tokenizer, "pad_token_id", None)
    while ids and pad is not None and ids[-1] == pad and pad != eos:
        ids = ids[:-1]
    return max(0, len(ids) - 1)


def fill_template(template: str, concept: str) -> tuple[str, int]:
    """The prompt and the character position where the concept ends in it."""
    if "{}" not in template:
        template = template + " {}" if template.strip() else "{}"
    start = template.index("{}")
    prompt = template[:start] + concept + template[start + 2:]
    return prompt, start + len(concept)


def _padded_ids(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def _capture_module_io(model, module_name: str, run: Callable[[], Any]) -> tuple[torch.Tensor, torch.Tensor]:
    module = model.get_submodule(module_name)
    seen: dict[str, torch.Tensor] = {}

    def hook(_m, inp, out):
        seen["in"] = inp[0].detach()
        seen["out"] = out.detach()

    handle = module.register_forward_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return seen["in"], seen["out"]


def _aligned_positions(src_idx: int, anc_idx: int, length: int, to_end: bool) -> tuple[list[int], list[int]]:
    if not to_end:
        return [src_idx], [anc_idx]
    src = list(range(src_idx, length))
    anc = [min(anc_idx + i, length - 1) for i in range(len(src))]
    return src, anc


@torch.no_grad()
def quickfix_edit(tokenizer, text_encoder, concept: str, anchor: str, *,
                  templates: Sequence[str] = QUICKFIX_TEMPLATES, preserve: Sequence[str] = (),
                  lam: float = 0.01, layer: int = 0, preserve_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Diff-QuickFix: edit the text encoder's layer-`layer` self-attention out_proj.

    Returns {parameter name: delta}. Run it with the CLIP's existing patches applied, so the
    delta is relative to the weights the chain has so far.
    """
    name = text_encoder_out_proj(text_encoder, layer)
    device = text_encoder.device
    pairs = [(fill_template(t, concept), fill_template(t, anchor)) for t in templates]
    src_prompts = [p for (p, _), _ in pairs]
    anc_prompts = [p for _, (p, _) in pairs]
    ids = _padded_ids(tokenizer, src_prompts + anc_prompts, device)
    k_in, _ = _capture_module_io(text_encoder, name, lambda: text_encoder(ids))
    n = len(pairs)
    length = ids.shape[1]
    keys, anchor_keys = [], []
    for i, ((sp, se), (ap, ae)) in enumerate(pairs):
        si = min(last_token_index(tokenizer, sp, se), length - 1)
        ai = min(last_token_index(tokenizer, ap, ae), length - 1)
        src_pos, anc_pos = _aligned_positions(si, ai, length, to_end=True)
        keys.append(k_in[i, src_pos])
        anchor_keys.append(k_in[n + i, anc_pos])
    keys_t = torch.cat(keys)
    module = text_encoder.get_submodule(name)
    w = module.weight
    values = torch.cat(anchor_keys).to(w.dtype) @ w.T
    pk = None
    if preserve:
        pids = _padded_ids(tokenizer, list(preserve), device)
        p_in, _ = _capture_module_io(text_encoder, name, lambda: text_encoder(pids))
        pk = p_in.reshape(-1, p_in.shape[-1])
    new_w = closed_form_weight(w, keys_t, values, lam, pk, preserve_scale=preserve_scale)
    return {f"{name}.weight": (new_w.float() - w.float()).cpu()}


@torch.no_grad()
def encode_embeds(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """Final hidden states (B, L, D) of padded prompts, as the sampler sees them."""
    ids = _padded_ids(tokenizer, list(prompts), text_encoder.device)
    return text_encoder(ids).last_hidden_state


@torch.no_grad()
def uce_edit(unet, tokenizer, text_encoder, concept: str, anchor: str, *,
             templates: Sequence[str] = ("{}",), preserve: Sequence[str] = (), lam: float = 0.5,
             positions: str = "last", erase_scale: float = 1.0, preserve_scale: float = 1.0,
             layers: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
    """UCE/TIME: edit every cross-attention to_k/to_v so the concept's keys give the anchor's outputs.

    positions="last": the concept's last token only (UCE); "to_end": that token and every later
    one (EOS, padding). Preserved prompts keep all their token positions' outputs.
    Returns {parameter name: delta}; run with the model's and CLIP's patches applied.
    """
    if positions not in ("last", "to_end"):
        raise ValueError("positions must be 'last' or 'to_end'")
    pairs = [(fill_template(t, concept), fill_template(t, anchor)) for t in templates]
    src = encode_embeds(tokenizer, text_encoder, [p for (p, _), _ in pairs])
    anc = encode_embeds(tokenizer, text_encoder, [p for _, (p, _) in pairs])
    length = src.shape[1]
    keys, anchor_embeds = [], []
    for i, ((sp, se), (ap, ae)) in enumerate(pairs):
        si = min(last_token_index(tokenizer, sp, se), length - 1)
        ai = min(last_token_index(tokenizer, ap, ae), length - 1)
        sp_, ap_ = _aligned_positions(si, ai, length, positions == "to_end")
        keys.append(src[i, sp_])
        anchor_embeds.append(anc[i, ap_])
    keys_t = torch.cat(keys).float()
    anchor_t = torch.cat(anchor_embeds).float()
    pk = None
    if preserve:
        pk = encode_embeds(tokenizer, text_encoder, list(preserve)).reshape(-1, keys_t.shape[-1]).float()
    out = {}
    for name in (layers or cross_attention_kv(unet)):
        module = unet.get_submodule(name)
        w = module.weight.float()
        values = anchor_t.to(w.device) @ w.T
        new_w = closed_form_weight(w.cpu(), keys_t.cpu(), values.cpu(), lam,
                                   None if pk is None else pk.cpu(), erase_scale, preserve_scale)
        out[f"{name}.weight"] = new_w - w.cpu()
    return out


# ---------------------------------------------------------------------------------------------
# neuron pruning (row 70: memorised images share a subspace that can be located and deleted)
# ---------------------------------------------------------------------------------------------
def _is_feed_forward(module) -> bool:
    net = getattr(module, "net", None)
    return (any(c.__name__ == "FeedForward" for c in type(module).__mro__)
            and isinstance(net, torch.nn.ModuleList) and len(net) >= 3 and isinstance(net[2], torch.nn.Linear))


def ffn_output_layers(unet) -> list[str]:
    """Names of the output Linear (`ff.net.2`) of every transformer feed-forward block.

    Its input is the FFN's hidden layer (GEGLU/GELU output): one column of its weight per neuron.
    """
    names = [f"{n}.net.2" for n, m in unet.named_modules() if _is_feed_forward(m)]
    if not names:
        raise ValueError("the model has no transformer feed-forward blocks (diffusers FeedForward, ff.net.2)")
    return names


def probe_timesteps(count: int, num_train_timesteps: int = 1000) -> list[int]:
    """`count` training timesteps spaced evenly from the noisiest down ("trailing" spacing):
    4 of 1000 -> [999, 749, 499, 249]."""
    if count < 1:
        raise ValueError(f"timesteps must be at least 1, got {count}")
    n = int(num_train_timesteps)
    return [max(0, int(round(n - 1 - i * n / count))) for i in range(count)]


def latent_sample_shape(unet) -> tuple:
    """(C, H, W) of one sample the denoiser takes at its native size."""
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (unet.config.in_channels, h, w)


def seed_noise(unet, seeds: Sequence[int]) -> torch.Tensor:
    """One unit-noise sample per seed (B, C, H, W): a seed draws the same noise alone or in a batch."""
    shape = latent_sample_shape(unet)
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def ffn_activations(unet, embeds: torch.Tensor, layers: Sequence[str], *, timesteps: Sequence[int],
                    seed: int = 0, samples: int = 2, batch: int = 16) -> dict[str, torch.Tensor]:
    """Mean |activation| (float64, one value per hidden neuron) of each layer's input, over every
    prompt in `embeds` (n, L, D), `samples` fixed-seed noise images, every timestep and every
    spatial position. The noise depends on `seed` only, so two prompt sets probed with the same
    seed see the same inputs and differ only in their text."""
    params = next(unet.parameters())
    dev, dt = params.device, params.dtype
    noise = torch.randn((samples,) + latent_sample_shape(unet), generator=torch.Generator("cpu").manual_seed(seed))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {name: 0 for name in layers}

    def make_hook(name):
        def hook(_m, inp):
            h = inp[0].detach()
            s = h.abs().double().reshape(-1, h.shape[-1]).sum(dim=0)
            sums[name] = s if name not in sums else sums[name] + s.to(sums[name].device)
            counts[name] += h.numel() // h.shape[-1]
        return hook

    handles = [unet.get_submodule(name).register_forward_pre_hook(make_hook(name)) for name in layers]
    jobs = [(t, p, s) for t in timesteps for p in range(embeds.shape[0]) for s in range(samples)]
    try:
        for i in range(0, len(jobs), batch):
            chunk = jobs[i:i + batch]
            x = torch.stack([noise[s] for _, _, s in chunk]).to(dev, dt)
            t = torch.tensor([float(t) for t, _, _ in chunk], device=dev)
            e = embeds[[p for _, p, _ in chunk]].to(dev, dt)
            unet(x, t, encoder_hidden_states=e)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if not counts[n]]
    if missing:
        raise ValueError(f"the feed-forward layer {missing[0]!r} did not run in the UNet's forward")
    return {name: (sums[name] / counts[name]).cpu() for name in layers}


def neuron_scores(weight: torch.Tensor, act_concept: torch.Tensor, act_general: torch.Tensor) -> torch.Tensor:
    """Per neuron j: (a_concept_j - a_general_j) * ||W[:, j]||_2, W the FFN output Linear's weight.

    a * ||W[:, j]|| is the size of neuron j's contribution to the block's output (a per-neuron
    Wanda score, |W_ij| ||X_j|| pooled over i); the score is the concept's minus the general
    prompts', so it is high for a neuron the concept uses and the general prompts do not."""
    col = weight.detach().double().norm(dim=0).cpu()
    return (act_concept.double().cpu() - act_general.double().cpu()) * col


def pruned_count(fraction: float, neurons: int) -> int:
    """How many of a layer's `neurons` a pruning `fraction` removes: round(fraction * n), at
    least 1 when fraction > 0."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    if fraction == 0.0:
        return 0
    return min(neurons, max(1, int(round(fraction * neurons))))


@torch.no_grad()
def concept_neuron_scores(unet, tokenizer, text_encoder, concept_prompts: Sequence[str],
                          general_prompts: Sequence[str], *, scheduler=None, timesteps: Any = 4, seed: int = 0,
                          samples: int = 2, layers: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
    """{`<ff>.net.2.weight`: contrast score per hidden neuron} (see `neuron_scores`), from the mean
    |activation| on the concept's prompts and on the general prompts (`ffn_activations`, same noise).
    `timesteps`: a count (spaced by `probe_timesteps` over the scheduler's training range) or
    the training timesteps themselves."""
    concept_prompts, general_prompts = list(concept_prompts), list(general_prompts)
    if not concept_prompts:
        raise ValueError("no concept prompts to find the concept's neurons with")
    if not general_prompts:
        raise ValueError("no general prompts to contrast the concept's prompts with")
    n_train = int(getattr(getattr(scheduler, "config", None), "num_train_timesteps", None) or 1000)
    ts = probe_timesteps(int(timesteps), n_train) if isinstance(timesteps, int) else [int(t) for t in timesteps]
    if not ts:
        raise ValueError("no timesteps to probe")
    layers = list(layers or ffn_output_layers(unet))
    acts = []
    for prompts in (concept_prompts, general_prompts):
        embeds = encode_embeds(tokenizer, text_encoder, prompts)
        acts.append(ffn_activations(unet, embeds, layers, timesteps=ts, seed=seed, samples=samples))
    return {f"{name}.weight": neuron_scores(unet.get_submodule(name).weight, acts[0][name], acts[1][name])
            for name in layers}


@torch.no_grad()
def prune_concept_neurons(unet, tokenizer, text_encoder, concept_prompts: Sequence[str],
                          general_prompts: Sequence[str], *, fraction: float = 0.02, scheduler=None,
                          timesteps: Any = 4, seed: int = 0, samples: int = 2) -> dict[str, torch.Tensor]:
    """Erase a concept by pruning the UNet feed-forward neurons its prompts use and general prompts do not.

    After Chavhan et al., "Memorized Images in Diffusion Models share a Subspace that can be
    Located and Deleted" (TECHNIQUES.md row 70; code github.com/ruchikachavhan/editing-memorization,
    not read here). What the paper is known to say (its abstract and row 70): contrast the
    activations of the UNet's feed-forward neurons between memorised and non-memorised prompts;
    many memorised prompts activate one common small subspace; prune the weights in it, chosen by
    an activation-weighted magnitude score that is high for the memorised prompts and low for
    general ones; no training, no change to inference. Row 70 marks its scoring details as approximate.

    Ours (a reading, not the paper's exact recipe):
    - "memorised prompts" are the concept's prompts; "non-memorised" are `general_prompts`;
    - neurons are the FFN hidden units (the input of `ff.net.2`, i.e. GEGLU's output), and
      activations are mean |h| over prompts, `samples` fixed-seed unit-noise inputs (shape from
      unet.config), the probed `timesteps` and all spatial positions, conditional branch only.
      Both prompt sets see the same noise, so the contrast comes from the text alone;
    - score_j = (a_concept_j - a_general_j) * ||W_out[:, j]||_2: the difference of two per-neuron
      Wanda scores (activation x weight magnitude);
    - per layer, the top round(fraction * n_neurons) neurons with a positive score are pruned
      (a neuron the general prompts use more is never the concept's). Per layer, not global:
      activation and weight scales differ between blocks, so a global ranking would spend the whole
      budget on a few layers and break them; per layer the damage is spread and predictable;
    - pruning a neuron zeroes its column of ff.net.2.weight (structured: the whole neuron, where
      the paper prunes individual weights); the bias is kept.
    Returns {parameter name: delta} (delta = -W on pruned columns, 0 elsewhere) for
    WeightDeltaPatch("unet", ...); at strength 1 the columns are exactly zero. Run it with the
    model's and CLIP's patches applied, so the delta is relative to the chain's weights. `unet`
    is not modified. UNets that need added conditioning (SDXL's) are not supported.
    """
    k_frac = float(fraction)
    pruned_count(k_frac, 1)  # validates the fraction
    scores = concept_neuron_scores(unet, tokenizer, text_encoder, concept_prompts, general_prompts,
                                   scheduler=scheduler, timesteps=timesteps, seed=seed, samples=samples)
    out = {}
    for name, score in scores.items():
        k = pruned_count(k_frac, score.numel())
        if k == 0:
            continue
        top = torch.topk(score, k).indices
        top = top[score[top] > 0]
        if not top.numel():
            continue
        w = unet.get_parameter(name).detach().float().cpu()
        delta = torch.zeros_like(w)
        delta[:, top] = -w[:, top]
        out[name] = delta
    return out


# ---------------------------------------------------------------------------------------------
# LoRA erasers (ESD, All-but-One, SPM)
# ---------------------------------------------------------------------------------------------
OBJECTIVES = ("esd", "all_but_one", "spm")


@dataclass
class TrainReport:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


def _pred(unet, x, t, embeds):
    return unet(x, t, encoder_hidden_states=embeds).sample


@torch.no_grad()
def concept_trajectories(unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor, *, count: int,
                         steps: int, cfg: float, generator: torch.Generator, sample_shape: tuple,
                         with_prompts: bool = False):
    """x_t and t at every step of `count` sampling runs of the model on `cond` (ESD's data);
    with_prompts: also which row of `cond` each x_t was sampled for."""
    scheduler.set_timesteps(steps)
    x = torch.randn((count,) + tuple(sample_shape), generator=generator) * getattr(scheduler, "init_noise_sigma", 1.0)
    x = x.to(cond.device, cond.dtype)
    which = torch.arange(count) % cond.shape[0]
    c = cond[which]
    u = uncond.expand(count, -1, -1)
    xs, ts = [], []
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        xs.append(x_in.clone())
        ts.append(torch.full((count,), float(t)))
        out = _pred(unet, torch.cat([x_in, x_in]), t, torch.cat([u, c]))
        e_u, e_c = out.chunk(2)
        x = scheduler.step(e_u + cfg * (e_c - e_u), t, x).prev_sample
    if with_prompts:
        return torch.cat(xs), torch.cat(ts), which.repeat(len(xs))
    return torch.cat(xs), torch.cat(ts)


def train_erasure_lora(unet, scheduler, target_embeds: torch.Tensor, empty_embeds: torch.Tensor, *,
                       objective: str = "esd", alt_embeds: Optional[torch.Tensor] = None,
                       anchor_embeds: Optional[torch.Tensor] = None, scope: str = "cross_attention",
                       rank: int = 4, alpha: Optional[float] = None, steps: int = 200, lr: float = 1e-3,
                       eta: float = 1.0, anchor_weight: float = 1.0, uncond_weight: float = 1.0,
                       batch: int = 4, pool_runs: int = 8, pool_steps: int = 10, pool_cfg: float = 3.0,
                       seed: int = 0, progress: Optional[Callable[[int, int], None]] = None
                       ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, TrainReport]:
    """Train an erasing LoRA on a private copy of `unet` (the frozen teacher is `unet` itself).

    target_embeds: (n, L, D) the concept's prompts; empty_embeds: (1, L, D) the empty prompt.
    objective "esd": target eps* (x_t) - eta (eps*(x_t, c) - eps*(x_t));
    "all_but_one": eps*(x_t) + eta (eps*(x_t, c_alt) - eps*(x_t)) with alt_embeds (n or 1, L, D),
    plus `uncond_weight` * |eps(x_t) - eps*(x_t)|^2;
    "spm": the ESD target plus `anchor_weight` * |eps(x_t, a) - eps*(x_t, a)|^2 over anchor_embeds.
    Given anchor_embeds, "esd" and "all_but_one" get the same anchoring term (our addition: without
    it they also unlearn the words the concept's prompts share, e.g. every colour for a shape).
    Returns ({param name: (A, B)}, scale, report); `unet` is not modified.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}")
    if objective == "all_but_one" and alt_embeds is None:
        raise ValueError("All-but-One needs an alternative concept")
    started = time.perf_counter()
    gen = torch.Generator("cpu").manual_seed(seed)
    torch.manual_seed(seed)
    teacher = unet
    student = copy.deepcopy(unet)
    student.__dict__.pop("forward", None)  # a guidance wrapper must not leak into the copy
    student.requires_grad_(False)
    targets = lora_targets(student, scope)
    alpha = float(alpha if alpha is not None else rank)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                        init_lora_weights=True, bias="none")
    student = inject_adapter_in_model(config, student)
    params = [p for n, p in student.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)

    sample_shape = latent_sample_shape(unet)
    dev, dt = next(unet.parameters()).device, next(unet.parameters()).dtype
    target_embeds = target_embeds.to(dev, dt)
    empty_embeds = empty_embeds.to(dev, dt)
    pool_x, pool_t = concept_trajectories(teacher, scheduler, target_embeds, empty_embeds, count=pool_runs,
                                          steps=pool_steps, cfg=pool_cfg, generator=gen,
                                          sample_shape=sample_shape)
    anchor_pool = None
    if anchor_embeds is not None and anchor_weight > 0:  # SPM's anchoring; optional for ESD/All-but-One
        # Anchors are held on their own trajectories as well as on the concept's (SPM holds them
        # on the concept's only): what a neighbour concept draws is what must not change.
        anchor_embeds = anchor_embeds.to(dev, dt)
        anchor_pool = concept_trajectories(teacher, scheduler, anchor_embeds, empty_embeds,
                                           count=max(pool_runs, min(anchor_embeds.shape[0], 4 * pool_runs)),
                                           steps=pool_steps, cfg=pool_cfg, generator=gen,
                                           sample_shape=sample_shape, with_prompts=True)
    report = TrainReport()
    student.train()
    for step in range(steps):
        idx = torch.randint(0, pool_x.shape[0], (batch,), generator=gen)
        x, t = pool_x[idx], pool_t[idx].to(dev)
        c = target_embeds[torch.randint(0, target_embeds.shape[0], (batch,), generator=gen)]
        u = empty_embeds.expand(batch, -1, -1)
        with torch.no_grad():
            if objective == "all_but_one":
                alt = alt_embeds.to(dev, dt)
                a = alt[torch.randint(0, alt.shape[0], (batch,), generator=gen)]
                e_u, e_a = _pred(teacher, torch.cat([x, x]), torch.cat([t, t]), torch.cat([u, a])).chunk(2)
                target = e_u + eta * (e_a - e_u)
            else:
                e_u, e_c = _pred(teacher, torch.cat([x, x]), torch.cat([t, t]), torch.cat([u, c])).chunk(2)
                target = e_u - eta * (e_c - e_u)
            anchors = None
            if anchor_pool is not None:
                half = batch // 2
                ax, at, ap = anchor_pool
                j = torch.randint(0, ax.shape[0], (batch - half,), generator=gen)
                anchors = torch.cat([anchor_embeds[torch.randint(0, anchor_embeds.shape[0], (half,), generator=gen)],
                                     anchor_embeds[ap[j]]])
                x_anchor = torch.cat([x[:half], ax[j]])
                t_anchor = torch.cat([t[:half], at[j].to(dev)])
                e_anchor = _pred(teacher, x_anchor, t_anchor, anchors)
        xs, ts, es = [x], [t], [c]
        if objective == "all_but_one" and uncond_weight > 0:
            xs.append(x), ts.append(t), es.append(u)
        if anchors is not None:
            xs.append(x_anchor), ts.append(t_anchor), es.append(anchors)
        out = _pred(student, torch.cat(xs), torch.cat(ts), torch.cat(es)).split(batch)
        loss = torch.nn.functional.mse_loss(out[0].float(), target.float())
        k = 1
        if objective == "all_but_one" and uncond_weight > 0:
            loss = loss + uncond_weight * torch.nn.functional.mse_loss(out[k].float(), e_u.float())
            k += 1
        if anchors is not None:
            loss = loss + anchor_weight * torch.nn.functional.mse_loss(out[k].float(), e_anchor.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        report.losses.append(loss.item())
        if progress is not None:
            progress(step + 1, steps)
    report.steps = steps
    report.seconds = time.perf_counter() - started
    loras = {}
    scale = alpha / rank
    for name in targets:
        module = student.get_submodule(name)
        a = module.lora_A["default"].weight.detach().clone()
        b = module.lora_B["default"].weight.detach().clone()
        loras[f"{name}.weight"] = (a, b)
    del student
    return loras, scale, report


# ---------------------------------------------------------------------------------------------
# running a bundle with its patches (for the red team and benchmarks)
# ---------------------------------------------------------------------------------------------
@dataclass
class Generator:
    """A MODEL + CLIP pair (kernels.models bundles) that can encode and sample with its patches."""

    model: Any
    clip: Any

    def encode(self, prompt: str):
        from kernels.text import encode_text

        with applied_patches(self.clip.patches, self.clip.text_encoder):
            return encode_text(self.clip.tokenizer, self.clip.text_encoder, prompt)

    @torch.no_grad()
    def sample(self, cond, *, seeds: Sequence[int], steps: int = 20, cfg: float = 4.0,
               scheduler: str = "ddim") -> torch.Tensor:
        """Images (B, C, H, W) in the model's own space (pixels in -1..1 for pixel models)."""
        from kernels.sampling import make_scheduler, sample

        unet = self.model.unet
        noise = seed_noise(unet, seeds)
        sched = make_scheduler("flow_match_euler" if self.model.is_flow else scheduler,
                               self.model.scheduler_config)
        run = SamplingRun(unet=unet, scheduler=sched, positive=cond, negative=None, cfg=cfg, steps=steps,
                          latent_shape=tuple(noise.shape))
        b = noise.shape[0]
        pos = cond.embeds.expand(b, -1, -1)
        neg = cond.empty.expand(b, -1, -1) if cond.empty is not None else None
        dev, dt = unet.device, unet.dtype
        with applied_patches(self.model.patches, unet, run):
            return sample(unet, sched, pos.to(dev, dt), None if neg is None else neg.to(dev, dt),
                          noise.to(dev, dt), steps, cfg).float().cpu()


# ---------------------------------------------------------------------------------------------
# red team (Prompting4Debugging)
# ---------------------------------------------------------------------------------------------
@dataclass
class RedTeamResult:
    prompt: str
    token_ids: list[int]
    loss: float
    losses: list[float]
    images: Optional[torch.Tensor] = None   # erased model's samples for the found prompt
    successes: Optional[list[bool]] = None  # judge per image
    seconds: float = 0.0

    @property
    def success_rate(self) -> Optional[float]:
        if self.successes is None:
            return None
        return sum(self.successes) / max(1, len(self.successes))


def _embedding_layer(text_encoder):
    return text_encoder.get_input_embeddings()


def red_team_prompt(erased: Generator, original: Generator, target_prompt: str, *,
                    n_tokens: int = 4, steps: int = 40, lr: float = 0.1, cfg: float = 4.0,
                    target_images: Optional[torch.Tensor] = None, n_targets: int = 2,
                    sample_steps: int = 12, eval_every: int = 10, eval_seeds: Sequence[int] = (0, 1, 2, 3),
                    judge: Optional[Callable[[torch.Tensor], list[bool]]] = None, seed: int = 0,
                    banned_words: Sequence[str] = (),
                    progress: Optional[Callable[[int, int], None]] = None) -> RedTeamResult:
    """P4D-N: find n_tokens hard tokens that make the erased model act like the original on the concept.

    Loss: E_t |eps_erased(z_t, P) - eps_orig(z_t, target_prompt)|^2 with both CFG-combined at
    `cfg`; z_t are noised target images (default: the original model's samples of the target
    prompt). Every step the soft embeddings are projected to their nearest vocabulary tokens by
    cosine and the gradient at the projection updates the soft ones (PEZ). Every `eval_every`
    steps the hard prompt is sampled on the erased model and judged (if `judge` is given:
    images -> [concept present]); the best-judged (else lowest-loss) prompt is returned.
    `banned_words` are never chosen (e.g. the concept's own words, to look for a bypass).
    """
    started = time.perf_counter()
    gen = torch.Generator("cpu").manual_seed(seed)
    tok = erased.clip.tokenizer
    te = erased.clip.text_encoder
    unet_e, unet_o = erased.model.unet, original.model.unet
    dev, dt = unet_e.device, unet_e.dtype
    target_cond = original.encode(target_prompt)
    if target_images is None:
        target_images = original.sample(target_cond, seeds=list(range(1000 + seed, 1000 + seed + n_targets)),
                                        steps=sample_steps, cfg=cfg)
    from kernels.sampling import make_scheduler

    sched = make_scheduler("flow_match_euler" if erased.model.is_flow else "ddim", erased.model.scheduler_config)
    emb_layer = _embedding_layer(te)
    vocab = emb_layer.weight.detach().float()
    banned = set()
    specials = {getattr(tok, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    banned.update(i for i in specials if i is not None)
    for w in banned_words:
        for i in tok(w, add_special_tokens=False).input_ids:
            banned.add(i)
    allowed = torch.ones(vocab.shape[0], dtype=torch.bool)
    for i in banned:
        if 0 <= i < vocab.shape[0]:
            allowed[i] = False
    vocab_n = torch.nn.functional.normalize(vocab, dim=-1)
    start_ids = torch.multinomial(allowed.float(), n_tokens, replacement=True, generator=gen)
    soft = vocab[start_ids].clone().requires_grad_(True)
    opt = torch.optim.AdamW([soft], lr=lr, weight_decay=0.1)
    # the dummy prompt: n_tokens placeholder words, then EOS and padding as usual
    placeholder = tok.convert_ids_to_tokens(int(start_ids[0])) if hasattr(tok, "convert_ids_to_tokens") else "a"
    dummy = _padded_ids(tok, [" ".join([placeholder] * n_tokens)], te.device)
    positions = list(range(1, 1 + n_tokens))

    def project(s):
        sims = torch.nn.functional.normalize(s.detach().float(), dim=-1) @ vocab_n.T
        sims[:, ~allowed] = -2.0
        return sims.argmax(dim=-1)

    def hard_text(ids):
        return tok.decode(ids.tolist(), skip_special_tokens=True).strip()

    def encode_with(embeds_at_positions):
        def hook(_m, _inp, out):
            out = out.clone()
            out[:, positions] = embeds_at_positions.to(out.dtype)
            return out
        h = emb_layer.register_forward_hook(hook)
        try:
            with applied_patches(erased.clip.patches, te):
                return te(dummy).last_hidden_state
        finally:
            h.remove()

    with torch.no_grad():
        empty_e = erased.encode("").embeds.to(dev, dt)
    clean = target_images.to(dev, dt)
    best = (-1.0, float("inf"), None)
    losses: list[float] = []
    n_train = int(getattr(sched.config, "num_train_timesteps", 1000))
    for step in range(steps):
        ids = project(soft)
        hard = vocab[ids].clone().requires_grad_(True)
        emb = encode_with(hard).to(dev, dt)
        b = clean.shape[0]
        noise = torch.randn(clean.shape, generator=gen).to(dev, dt)
        tt = torch.randint(0, n_train, (b,), generator=gen)
        if erased.model.is_flow:
            sigma = (tt.float() / n_train).view(-1, 1, 1, 1).to(dev, dt)
            z = (1 - sigma) * clean + sigma * noise
        else:
            z = sched.add_noise(clean, noise, tt)
        tdev = tt.to(dev)
        with torch.no_grad():
            oc = target_cond.embeds.to(dev, dt).expand(b, -1, -1)
            ou = target_cond.empty.to(dev, dt).expand(b, -1, -1)
            with applied_patches(original.model.patches, unet_o, SamplingRun(
                    unet=unet_o, scheduler=sched, positive=target_cond, negative=None, cfg=cfg, steps=1,
                    latent_shape=tuple(z.shape))):
                e_u, e_c = _pred(unet_o, torch.cat([z, z]), torch.cat([tdev, tdev]), torch.cat([ou, oc])).chunk(2)
            want = e_u + cfg * (e_c - e_u)
        from kernels.text import Conditioning

        cur = Conditioning(embeds=emb.detach(), prompt=hard_text(ids),
                           words={w: (i,) for i, w in enumerate(words_of(hard_text(ids)))}, empty=empty_e)
        run = SamplingRun(unet=unet_e, scheduler=sched, positive=cur, negative=None, cfg=cfg, steps=1,
                          latent_shape=tuple(z.shape))
        with applied_patches(erased.model.patches, unet_e, run):
            out = unet_e(torch.cat([z, z]), torch.cat([tdev, tdev]),
                         encoder_hidden_states=torch.cat([empty_e.expand(b, -1, -1), emb.expand(b, -1, -1)])).sample
        g_u, g_c = out.chunk(2)
        got = g_u + cfg * (g_c - g_u)
        loss = torch.nn.functional.mse_loss(got.float(), want.float())
        grad, = torch.autograd.grad(loss, [hard])
        soft.grad = grad.to(soft.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, steps)
        loss_v = losses[-1]
        last = step == steps - 1
        if judge is not None and (step % eval_every == eval_every - 1 or last):
            text = hard_text(ids)
            imgs = erased.sample(erased.encode(text), seeds=eval_seeds, steps=sample_steps, cfg=cfg)
            rate = sum(judge(imgs)) / len(eval_seeds)
            if rate > best[0] or (rate == best[0] and loss_v < best[1]):
                best = (rate, loss_v, ids.clone())
        elif judge is None and loss_v < best[1]:
            best = (-1.0, loss_v, ids.clone())
    ids = best[2] if best[2] is not None else project(soft)
    text = hard_text(ids)
    result = RedTeamResult(prompt=text, token_ids=[int(i) for i in ids], loss=best[1], losses=losses)
    result.images = erased.sample(erased.encode(text), seeds=eval_seeds, steps=sample_steps, cfg=cfg)
    if judge is not None:
        result.successes = list(judge(result.images))
    result.seconds = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
FORMAT = "loomwork.eraser"


def default_eraser_dir() -> str:
    """Where erasers are saved unless a folder is given: $LOOMWORK_ERASER_DIR or the user's data dir."""
    env = os.environ.get("LOOMWORK_ERASER_DIR")
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "loomwork", "erasers")


def save_erasers(path: str, patches: Sequence[EraserPatch], extra: Optional[dict] = None) -> str:
    """Write patches (in order) to one safetensors file, atomically. Returns the path."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for i, p in enumerate(patches):
        t, info = p.to_state()
        for k, v in t.items():
            tensors[f"{i}:{k}"] = v.detach().to("cpu").clone().contiguous()  # no shared storage
        entries.append({"kind": p.kind, **info})
    metadata = {"format": FORMAT, "version": "1", "patches": json.dumps(entries),
                "extra": json.dumps(extra or {})}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


class EraserFileError(ValueError):
    pass


def load_erasers(path: str) -> list[EraserPatch]:
    """Read the patches saved by `save_erasers` (safetensors only; nothing is unpickled)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise EraserFileError(f"eraser file {path!r} does not exist") from None
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise EraserFileError(f"{path!r} is not a readable safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise EraserFileError(f"{path!r} is not a Loomwork eraser file (no '{FORMAT}' metadata)")
    if meta.get("version") != "1":
        raise EraserFileError(f"{path!r} has eraser format version {meta.get('version')!r}; "
                              f"this Loomwork reads version 1")
    entries = json.loads(meta["patches"])
    out = []
    for i, info in enumerate(entries):
        cls = PATCH_KINDS.get(info.get("kind"))
        if cls is None:
            raise EraserFileError(f"{path!r}: unknown eraser kind {info.get('kind')!r}")
        prefix = f"{i}:"
        mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        out.append(cls.from_state(mine, info))
    return out
