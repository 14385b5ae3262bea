"""Closed-form edits: erase a concept in seconds by solving for new projection weights.

`closed_form_weight` is the least-squares edit
  W' = (lam W + sum_e v k^T + sum_p W k_p k_p^T) (lam I + sum_e k k^T + sum_p k_p k_p^T)^-1,
which maps each edited key k to its value v, keeps preserved keys k_p where W put them, and leaves
every direction orthogonal to all keys exactly as it was.

- `quickfix_edit`: Diff-QuickFix (Basu et al., "Localizing and Editing Knowledge in Text-to-Image
  Generative Models"). W is the text encoder's first self-attention `out_proj`; keys are its
  inputs at the last subject token and every later position (EOS and padding) of the source
  prompts, values are W times its inputs at the aligned positions of the anchor prompts;
  lam = 0.01; the prompts are the concept plus "A photo of / An image of / A picture of"
  templates. Checked against the reimplementation in fmp453/erase-eval
  train_methods/train_diffquickfix.py. That code used out_proj's outputs, bias included, as
  values; we use W k_anchor so the bias is not counted twice.
- `uce_edit`: UCE (Gandikota et al., "Unified Concept Editing in Diffusion Models"), after TIME
  (Orgad et al., "Editing Implicit Assumptions in Text-to-Image Diffusion Models"). W are the
  UNet's cross-attention `to_k`/`to_v`; keys are the final text embeddings at the concept's last
  token, values are W times the anchor's embedding at its last token, preserved concepts keep
  their own outputs. Checked against rohitgandikota/unified-concept-editing
  trainscripts/uce_sd_erase.py: same normal equations, lam 0.5 there, erase/preserve scales.
  `positions="to_end"` also edits every later position, as Diff-QuickFix does for EOS, which
  small encoders need because the causal encoder copies the concept into the tokens after it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from kernels.text import tokenize

from .model_io import encode_embeds
from .patches import cross_attention_kv, text_encoder_out_proj

# Diff-QuickFix's augmentation templates ("{}" is the concept).
QUICKFIX_TEMPLATES = ("{}", "A photo of {}", "An image of {}", "A picture of {}")


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


@torch.no_grad()
def _module_inputs(model, module_name: str, run: Callable[[], Any]) -> torch.Tensor:
    """What `module_name` receives while `run()` calls the model."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_m, inp, _out):
        seen["in"] = inp[0].detach()

    handle = model.get_submodule(module_name).register_forward_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return seen["in"]


def _aligned_positions(src_idx: int, anc_idx: int, length: int, to_end: bool) -> tuple[list[int], list[int]]:
    if not to_end:
        return [src_idx], [anc_idx]
    src = list(range(src_idx, length))
    anc = [min(anc_idx + i, length - 1) for i in range(len(src))]
    return src, anc


def _concept_and_anchor_rows(tokenizer, src: torch.Tensor, anc: torch.Tensor, pairs, to_end: bool):
    """Rows of `src` at each source prompt's concept positions, and of `anc` at the aligned
    positions of its anchor prompt (both (prompts, length, D))."""
    length = src.shape[1]
    keys, anchor_rows = [], []
    for i, ((sp, se), (ap, ae)) in enumerate(pairs):
        si = min(last_token_index(tokenizer, sp, se), length - 1)
        ai = min(last_token_index(tokenizer, ap, ae), length - 1)
        src_pos, anc_pos = _aligned_positions(si, ai, length, to_end)
        keys.append(src[i, src_pos])
        anchor_rows.append(anc[i, anc_pos])
    return torch.cat(keys), torch.cat(anchor_rows)


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
    ids = tokenize(tokenizer, [p for (p, _), _ in pairs] + [p for _, (p, _) in pairs]).input_ids.to(device)
    k_in = _module_inputs(text_encoder, name, lambda: text_encoder(ids))
    n = len(pairs)
    keys_t, anchor_keys = _concept_and_anchor_rows(tokenizer, k_in[:n], k_in[n:], pairs, to_end=True)
    w = text_encoder.get_submodule(name).weight
    values = anchor_keys.to(w.dtype) @ w.T
    pk = None
    if preserve:
        pids = tokenize(tokenizer, list(preserve)).input_ids.to(device)
        p_in = _module_inputs(text_encoder, name, lambda: text_encoder(pids))
        pk = p_in.reshape(-1, p_in.shape[-1])
    new_w = closed_form_weight(w, keys_t, values, lam, pk, preserve_scale=preserve_scale)
    return {f"{name}.weight": (new_w.float() - w.float()).cpu()}


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
    keys_t, anchor_t = _concept_and_anchor_rows(tokenizer, src, anc, pairs, positions == "to_end")
    keys_t, anchor_t = keys_t.float(), anchor_t.float()
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
