"""Closed-form edits: erase a concept in seconds by solving for new projection weights.

`closed_form_weight` is the least-squares edit
  W' = (lam W + sum_e v k^T + sum_p W k_p k_p^T) (lam I + sum_e k k^T + sum_p k_p k_p^T)^-1,
which maps each edited key k to its value v, keeps preserved keys k_p where W put them, and leaves
every direction orthogonal to all keys exactly as it was.

- `quickfix_edit`: Diff-QuickFix (Basu et al., "Localizing and Editing Knowledge in Text-to-Image
  Generative Models"). W is the text encoder's first self-attention `out_proj` (site
  "attention"; site "output_mlp" edits the last read layer's MLP instead, see quickfix_edit); keys are its
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

Other families (kernels.denoiser's text):
- UCE edits the layers the denoiser's text embeddings enter (`text_input_layers`): on a UNet
  the cross-attention to_k/to_v (SDXL's take both encoders' hidden states side by side); on an
  MM-DiT (SD3, FLUX) text reaches the joint attention only through its text stream, so the edit
  is the `context_embedder` Linear the raw text sequence enters: the concept's rows are mapped
  to what it makes of the anchor's, the same least squares. Keys are the concept's positions
  in each encoder's part of the sequence (SD3: its CLIP part and its T5 part; FLUX: T5's). The
  pooled text (SDXL's added embedding, the MM-DiTs' pooled projections) is left as it is, as
  UCE leaves SDXL's.
- Diff-QuickFix edits every CLIP encoder of the set (SDXL: CLIP-L and CLIP-G; SD3: both CLIPs;
  FLUX: CLIP-L, whose pooled output is all FLUX takes from it). T5 is left out: the edit's
  keys (the last subject token and the positions after it) localise the concept only in a
  causal encoder, and T5's encoder attends both ways, so layer 0 spreads the concept into
  every position, earlier ones included. On FLUX erase with cross_attention to reach its T5.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from kernels.denoiser import encode_prompts
from kernels.text import TextEncoderSet, tokenize

from .patches import text_encoder_mlp_out, text_encoder_out_proj, text_input_layers

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


def _aligned_positions(src_idx: int, anc_idx: int, length: int, to_end: bool) -> tuple[list[int], list[int]]:
    if not to_end:
        return [src_idx], [anc_idx]
    src = list(range(src_idx, length))
    anc = [min(anc_idx + i, length - 1) for i in range(len(src))]
    return src, anc


def _concept_and_anchor_rows(parts, src: torch.Tensor, anc: torch.Tensor, pairs, to_end: bool):
    """Rows of `src` at each source prompt's concept positions, and of `anc` at the aligned
    positions of its anchor prompt (both (prompts, length, D)). `parts`: a tokenizer (one
    encoder's sequence) or (tokenizer, start, length) per encoder's part of a joint sequence."""
    if not isinstance(parts, (list, tuple)):
        parts = [(parts, 0, src.shape[1])]
    keys, anchor_rows = [], []
    for i, ((sp, se), (ap, ae)) in enumerate(pairs):
        for tokenizer, start, length in parts:
            si = min(last_token_index(tokenizer, sp, se), length - 1)
            ai = min(last_token_index(tokenizer, ap, ae), length - 1)
            src_pos, anc_pos = _aligned_positions(si, ai, length, to_end)
            keys.append(src[i, [start + p for p in src_pos]])
            anchor_rows.append(anc[i, [start + p for p in anc_pos]])
    return torch.cat(keys), torch.cat(anchor_rows)


def clip_encoders(tokenizer, text_encoder) -> list[tuple[str, Any, Any]]:
    """(parameter-name prefix, tokenizer, CLIP text model) of each CLIP encoder of a CLIP bundle:
    the encoder itself (prefix "") or the CLIPs of a family's set (prefix "text_encoder_2." ...;
    T5 is not a CLIP)."""
    if not isinstance(text_encoder, TextEncoderSet):
        return [("", tokenizer, text_encoder)]
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out = []
    for suffix in ("", "_2", "_3"):
        encoder = getattr(text_encoder, "text_encoder" + suffix, None)
        if isinstance(encoder, (CLIPTextModel, CLIPTextModelWithProjection)):
            out.append((f"text_encoder{suffix}.", getattr(tokenizer, "tokenizer" + suffix), encoder))
    if not out:
        raise ValueError("the text encoders have no CLIP encoder to edit")
    return out


def sequence_parts(tokenizer, text_encoder, length: int) -> list[tuple[Any, int, int]]:
    """(tokenizer, start, length) of each encoder's part of the text sequence the denoiser takes
    (`length` long): SD 1.x and SDXL one CLIP part (SDXL's encoders split a prompt alike), SD3
    its CLIP part then its T5 part, FLUX its T5 sequence."""
    from kernels.flux import FluxTextEncoders
    from kernels.sdxl import SDXLTextEncoders
    from kernels.text import SD3TextEncoders

    if isinstance(text_encoder, SDXLTextEncoders):
        return [(tokenizer.tokenizer or tokenizer.tokenizer_2, 0, length)]
    if isinstance(text_encoder, FluxTextEncoders):
        return [(tokenizer.tokenizer_2, 0, length)]
    if isinstance(text_encoder, SD3TextEncoders):
        n_clip = int(tokenizer.tokenizer.model_max_length)
        parts = [(tokenizer.tokenizer, 0, n_clip)]
        if text_encoder.text_encoder_3 is not None and tokenizer.tokenizer_3 is not None:
            parts.append((tokenizer.tokenizer_3, n_clip, length - n_clip))
        return parts
    return [(tokenizer, 0, length)]


# Where Diff-QuickFix edits each CLIP encoder: "attention" is the paper's site (layer `layer`'s
# self-attention out_proj); "output_mlp" the MLP output projection of the last layer whose hidden
# states the denoiser reads, with values that make the residual stream there the anchor's.
QUICKFIX_SITES = ("attention", "output_mlp")


@torch.no_grad()
def quickfix_edit(tokenizer, text_encoder, concept: str, anchor: str, *,
                  templates: Sequence[str] = QUICKFIX_TEMPLATES, preserve: Sequence[str] = (),
                  lam: float = 0.01, layer: int = 0, preserve_scale: float = 1.0,
                  site: str = "attention") -> dict[str, torch.Tensor]:
    """Diff-QuickFix: edit each CLIP encoder of the text encoder (`clip_encoders`) at `site`
    (QUICKFIX_SITES).

    "attention" (the paper): the layer-`layer` self-attention out_proj; keys are its inputs,
    values W k_anchor. At the first layer a causal encoder's keys are nearly additive in the
    words ("red circle" ~ "red square" + "blue circle" - "blue square"), so a pair cannot be
    moved without its halves. "output_mlp": the MLP output projection (fc2) of the last layer
    the denoiser reads (the penultimate for SDXL's and SD3's CLIPs); its keys come after every
    layer's nonlinearity, so a pair is separable from its halves, and the values are what make
    the residual stream at the edited positions the anchor's (W k_anchor + r_anchor - r_source,
    r the stream the MLP adds to): after the edit only the final layer norm lies between them
    and the output. Returns {parameter name: delta}, names relative to `text_encoder`. Run it
    with the CLIP's existing patches applied, so the delta is relative to the weights so far.
    """
    if site not in QUICKFIX_SITES:
        raise ValueError(f"Diff-QuickFix site must be one of {QUICKFIX_SITES}, not {site!r}")
    out = {}
    for prefix, tok, encoder in clip_encoders(tokenizer, text_encoder):
        if site == "attention":
            name, stream = text_encoder_out_proj(encoder, layer), None
        else:
            name, stream = text_encoder_mlp_out(encoder, _read_layer(text_encoder))
        deltas = _quickfix_one(tok, encoder, name, stream, concept, anchor, templates=templates,
                               preserve=preserve, lam=lam, preserve_scale=preserve_scale)
        out.update({prefix + k: v for k, v in deltas.items()})
    return out


def _read_layer(text_encoder) -> int:
    """The encoder layer (negative: from the last) whose hidden states the denoiser takes from a
    CLIP: the penultimate for SDXL and SD3 (kernels.sdxl, kernels.text), else the last."""
    from kernels.sdxl import SDXLTextEncoders
    from kernels.text import SD3TextEncoders

    return -2 if isinstance(text_encoder, (SDXLTextEncoders, SD3TextEncoders)) else -1


@torch.no_grad()
def _inputs_of(model, names: Sequence[str], run: Callable[[], Any]) -> list[torch.Tensor]:
    """What each module in `names` receives while `run()` calls the model."""
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda _m, inp, _out, n=n: seen.__setitem__(n, inp[0].detach())) for n in names]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return [seen[n] for n in names]


def _quickfix_one(tokenizer, text_encoder, name: str, stream: Optional[str], concept: str, anchor: str, *,
                  templates: Sequence[str], preserve: Sequence[str], lam: float,
                  preserve_scale: float) -> dict[str, torch.Tensor]:
    """Diff-QuickFix on one CLIP text model's Linear `name`; with `stream` (the module whose input
    is the residual stream `name`'s output is added to) the values also carry the difference of
    the anchor's stream from the source's there."""
    device = text_encoder.device
    pairs = [(fill_template(t, concept), fill_template(t, anchor)) for t in templates]
    ids = tokenize(tokenizer, [p for (p, _), _ in pairs] + [p for _, (p, _) in pairs]).input_ids.to(device)
    seen = _inputs_of(text_encoder, [name] + ([stream] if stream else []), lambda: text_encoder(ids))
    n = len(pairs)
    keys_t, anchor_keys = _concept_and_anchor_rows(tokenizer, seen[0][:n], seen[0][n:], pairs, to_end=True)
    w = text_encoder.get_submodule(name).weight
    values = anchor_keys.to(w.dtype) @ w.T
    if stream:
        r_src, r_anc = _concept_and_anchor_rows(tokenizer, seen[1][:n], seen[1][n:], pairs, to_end=True)
        values = values + (r_anc - r_src).to(w.dtype)
    pk = None
    if preserve:
        pids = tokenize(tokenizer, list(preserve)).input_ids.to(device)
        p_in = _inputs_of(text_encoder, [name], lambda: text_encoder(pids))[0]
        pk = p_in.reshape(-1, p_in.shape[-1])
    new_w = closed_form_weight(w, keys_t, values, lam, pk, preserve_scale=preserve_scale)
    return {f"{name}.weight": (new_w.float() - w.float()).cpu()}


@torch.no_grad()
def uce_edit(unet, tokenizer, text_encoder, concept: str, anchor: str, *,
             templates: Sequence[str] = ("{}",), preserve: Sequence[str] = (), lam: float = 0.5,
             positions: str = "last", erase_scale: float = 1.0, preserve_scale: float = 1.0,
             layers: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
    """UCE/TIME: edit the layers the text embeddings enter (`text_input_layers`: a UNet's
    cross-attention to_k/to_v, an MM-DiT's context_embedder) so the concept's keys give the
    anchor's outputs.

    positions="last": the concept's last token only (UCE); "to_end": that token and every later
    one (EOS, padding), in each encoder's part of the sequence. Preserved prompts keep all their
    token positions' outputs. Returns {parameter name: delta}; run with the model's and CLIP's
    patches applied.
    """
    if positions not in ("last", "to_end"):
        raise ValueError("positions must be 'last' or 'to_end'")
    pairs = [(fill_template(t, concept), fill_template(t, anchor)) for t in templates]
    src = encode_prompts(tokenizer, text_encoder, [p for (p, _), _ in pairs]).embeds
    anc = encode_prompts(tokenizer, text_encoder, [p for _, (p, _) in pairs]).embeds
    parts = sequence_parts(tokenizer, text_encoder, src.shape[1])
    keys_t, anchor_t = _concept_and_anchor_rows(parts, src, anc, pairs, positions == "to_end")
    keys_t, anchor_t = keys_t.float(), anchor_t.float()
    pk = None
    if preserve:
        pk = encode_prompts(tokenizer, text_encoder, list(preserve)).embeds.reshape(-1, keys_t.shape[-1]).float()
    out = {}
    for name in (layers or text_input_layers(unet)):
        module = unet.get_submodule(name)
        w = module.weight.float()
        values = anchor_t.to(w.device) @ w.T
        new_w = closed_form_weight(w.cpu(), keys_t.cpu(), values.cpu(), lam,
                                   None if pk is None else pk.cpu(), erase_scale, preserve_scale)
        out[f"{name}.weight"] = new_w - w.cpu()
    return out
