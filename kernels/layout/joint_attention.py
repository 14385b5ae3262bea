"""3DIS-FLUX renderer masks for MM-DiT joint attention (SD3 and FLUX).

`joint_attention_mask` builds the boolean "may attend" mask over the joint [text, image]
(FLUX) or [image, text] (SD3) sequence: inside each box, image tokens attend only to that box's
phrase and, for the first steps, only to their own region. `JointAttentionMaskPatch` installs
`SD3LayoutAttnProcessor` (subclassing diffusers' `JointAttnProcessor2_0`) or
`FluxLayoutAttnProcessor` (subclassing `FluxAttnProcessor`) with a step-aware
`JointMaskController` made for each run. SD3 folders load and sample in graphs; FLUX folders do
not load yet, so the FLUX processors run from code and tests only.

Source checked (the paper's own text was not reachable here, only its abstract):
limuloo/3DIS detail_renderer_flux.py (mask rules and step windows).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from kernels.hashing import key_of
from kernels.patching import ModelPatch, attention_processors

from .boxes import box_mask, layout_key
from .defaults import JOINT_IMAGE_STEPS, JOINT_TEXT_STEPS


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


def masked_attention(query, key, value, mask: Optional[torch.Tensor], record: bool,
                     bias: Optional[torch.Tensor] = None):
    """Attention over (B, heads, S, d) with a boolean "may attend" mask, and the probabilities
    when `record` (then the softmax is explicit; otherwise SDPA). `bias`, an additive mask the
    caller was given, is added to the logits before the boolean mask (recording only)."""
    if not record:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=None if mask is None else mask.to(query.device),
            dropout_p=0.0, is_causal=False)
        return out, None
    logits = (query @ key.transpose(-1, -2)) * (query.shape[-1] ** -0.5)
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = logits.masked_fill(~mask.to(logits.device), float("-inf"))
    probs = logits.softmax(-1)
    return probs @ value, probs.detach()


class FluxLayoutAttnProcessor(FluxAttnProcessor):
    """diffusers' FLUX attention processor (double and single blocks) with a joint-attention
    mask: `ctl.mask_for(seq)` gives the boolean mask for the current step or None.

    With a mask it is handed to diffusers' processor as its attention mask. Set `record` to keep
    the last probabilities (tests, analysis): diffusers' processor never forms them, so that
    path is written out with the layer's own projections, norms and rotary embedding."""

    def __init__(self, ctl: "JointMaskController"):
        super().__init__()
        self.ctl = ctl
        self.record = False
        self.last_probs: Optional[torch.Tensor] = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        seq = hidden_states.shape[1] + (encoder_hidden_states.shape[1] if joint else 0)
        mask = self.ctl.mask_for(seq)
        if self.record:
            return self.recorded(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 image_rotary_emb, mask)
        if mask is not None:
            mask = mask.to(hidden_states.device)[None, None]
            if attention_mask is None:
                attention_mask = mask
            elif attention_mask.dtype == torch.bool:
                attention_mask = attention_mask & mask
            else:
                attention_mask = attention_mask.masked_fill(~mask, float("-inf"))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask,
                                image_rotary_emb)

    def recorded(self, attn, hidden_states, encoder_hidden_states, attention_mask,
                 image_rotary_emb, mask):
        def heads(x):
            return x.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(heads(attn.to_q(hidden_states)))
        key = attn.norm_k(heads(attn.to_k(hidden_states)))
        value = heads(attn.to_v(hidden_states))
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
        out, self.last_probs = masked_attention(query.transpose(1, 2), key.transpose(1, 2),
                                                value.transpose(1, 2), mask, True, bias=attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if n_ctx:
            ctx_out, img_out = out[:, :n_ctx], out[:, n_ctx:]
            img_out = attn.to_out[1](attn.to_out[0](img_out.contiguous()))
            return img_out, attn.to_add_out(ctx_out.contiguous())
        return out


class SD3LayoutAttnProcessor(JointAttnProcessor2_0):
    """diffusers' SD3 joint attention (sequence [image, text]) with the 3DIS mask of
    `ctl.mask_for(seq)` (built with text_first=False); SD3.5's image-only `attn2` gets the
    image->image part of the mask. With no mask this is diffusers' own processor.

    `JointAttnProcessor2_0` takes no attention mask, so the masked path (and the recording one:
    set `record` to keep the last probabilities) is written out with the layer's own
    projections and norms, in diffusers' order of operations."""

    def __init__(self, ctl: "JointMaskController"):
        super().__init__()
        self.ctl = ctl
        self.record = False
        self.last_probs: Optional[torch.Tensor] = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        n_img = hidden_states.shape[1]
        if encoder_hidden_states is not None:
            mask = self.ctl.mask_for(n_img + encoder_hidden_states.shape[1])
        else:
            mask = self.ctl.image_mask_for(n_img)
        if mask is None and not self.record:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask,
                                    *args, **kwargs)
        query, key, value = sd3_joint_qkv(attn, hidden_states, encoder_hidden_states)
        out, probs = masked_attention(query, key, value, mask, self.record)
        if probs is not None:
            self.last_probs = probs
        out = out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[-1]).to(query.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        out, ctx_out = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            ctx_out = attn.to_add_out(ctx_out)
        return attn.to_out[1](attn.to_out[0](out)), ctx_out


def sd3_joint_qkv(attn, hidden_states, encoder_hidden_states=None):
    """SD3's query, key and value (B, heads, S, d) over [image, text], norms applied."""

    def heads(x):
        return attn.head_to_batch_dim(x, out_dim=4)

    query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), \
        heads(attn.to_v(hidden_states))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if encoder_hidden_states is None:
        return query, key, value
    eq = heads(attn.add_q_proj(encoder_hidden_states))
    ek = heads(attn.add_k_proj(encoder_hidden_states))
    ev = heads(attn.add_v_proj(encoder_hidden_states))
    if attn.norm_added_q is not None:
        eq = attn.norm_added_q(eq)
    if attn.norm_added_k is not None:
        ek = attn.norm_added_k(ek)
    return torch.cat([query, eq], 2), torch.cat([key, ek], 2), torch.cat([value, ev], 2)


class JointMaskController:
    """Step-aware 3DIS mask source for the MM-DiT processors (FLUX: text first; SD3: image first)."""

    def __init__(self, n_text: int, image_hw, text_groups, layout_boxes, *,
                 i2i_steps: int = JOINT_IMAGE_STEPS, i2t_steps: int = JOINT_TEXT_STEPS,
                 t2i_steps: int = JOINT_TEXT_STEPS, t2t_steps: int = JOINT_TEXT_STEPS,
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

    def follow_timestep(self, timesteps, t, *, flux: bool) -> None:
        """Set `step` to t's index in the schedule (FLUX is called with t / 1000, SD3 with the
        scheduler's own timestep)."""
        if t is None or timesteps is None or not len(timesteps):
            return
        tt = torch.as_tensor(t).flatten()[0].float().cpu()
        scale = 1000.0 if flux and float(tt) <= 1.0 and float(timesteps.max()) > 1.0 else 1.0
        self.step = int(torch.argmin((timesteps.float().cpu() - tt * scale).abs()))


def flux_attention_names(transformer) -> list[str]:
    return list(transformer.attn_processors)


def is_sd3(module: Any) -> bool:
    return type(module).__name__ == "SD3Transformer2DModel"


def is_mmdit(module: Any) -> bool:
    name = type(module).__name__
    return name in ("FluxTransformer2DModel", "SD3Transformer2DModel")


def mmdit_tokens_hw(transformer, latent_shape) -> tuple[int, int]:
    """The image-token grid of an SD3 transformer for a latent of `latent_shape` (..., H, W):
    one token per patch_size x patch_size latent pixels, so it follows the image size."""
    p = int(getattr(transformer.config, "patch_size", 2) or 2)
    return int(latent_shape[-2]) // p, int(latent_shape[-1]) // p


def flux_tokens_hw(latent_shape) -> tuple[int, int]:
    """The image-token grid of FLUX for a latent of `latent_shape` (..., H, W): its sampler packs
    2x2 latent pixels into each token (the transformer's own patch_size is 1)."""
    return int(latent_shape[-2]) // 2, int(latent_shape[-1]) // 2


@dataclass
class JointMaskRun:
    """One run of a JointAttentionMaskPatch: its mask controller and installed processors."""

    controller: JointMaskController
    processors: dict


class JointAttentionMaskPatch(ModelPatch):
    """3DIS-FLUX masks on an MM-DiT transformer, SD3 or FLUX (the JointAttentionMask node).

    `image_hw` None takes the token grid from the sampled latent (FLUX: 2x2 latent pixels a
    token, as kernels.flux packs them). No boxes: nothing is installed, so the run is
    bit-identical to the unpatched model. `applied` yields the run's `JointMaskRun`."""

    kind = "joint-attention-mask"

    def __init__(self, layout, text_groups, n_text: int, image_hw=None,
                 i2i_steps: int = JOINT_IMAGE_STEPS, i2t_steps: int = JOINT_TEXT_STEPS,
                 t2i_steps: int = JOINT_TEXT_STEPS, t2t_steps: int = JOINT_TEXT_STEPS,
                 global_text=()):
        self.layout = layout or {"boxes": []}
        self.args = dict(n_text=n_text, image_hw=None if image_hw is None else tuple(image_hw),
                         text_groups=[list(g) for g in text_groups],
                         i2i_steps=i2i_steps, i2t_steps=i2t_steps, t2i_steps=t2i_steps,
                         t2t_steps=t2t_steps, global_text=list(global_text))

    def cache_key(self):
        return f"{self.kind}:{layout_key(self.layout)}:{key_of(self.args)}"

    def new_controller(self, transformer, run) -> JointMaskController:
        a = self.args
        sd3 = is_sd3(transformer)
        image_hw = a["image_hw"]
        if image_hw is None:
            if getattr(run, "latent_shape", None) is None:
                raise ValueError("JointAttentionMaskPatch needs image_hw unless it patches a "
                                 "transformer during a sampling run")
            image_hw = (mmdit_tokens_hw(transformer, run.latent_shape) if sd3
                        else flux_tokens_hw(run.latent_shape))
        return JointMaskController(a["n_text"], image_hw, a["text_groups"], self.layout["boxes"],
                                   i2i_steps=a["i2i_steps"], i2t_steps=a["i2t_steps"],
                                   t2i_steps=a["t2i_steps"], t2t_steps=a["t2t_steps"],
                                   global_text=a["global_text"], text_first=not sd3)

    @contextlib.contextmanager
    def applied(self, transformer, run) -> Iterator[Optional[JointMaskRun]]:
        if not self.layout.get("boxes"):
            yield None
            return
        sd3 = is_sd3(transformer)
        ctl = self.new_controller(transformer, run)
        ts = getattr(getattr(run, "scheduler", None), "timesteps", None)

        def pre_hook(module, args, kwargs):
            t = kwargs.get("timestep", args[3] if len(args) > 3 else None)
            ctl.follow_timestep(getattr(getattr(run, "scheduler", None), "timesteps", ts), t,
                                flux=not sd3)

        proc = SD3LayoutAttnProcessor if sd3 else FluxLayoutAttnProcessor
        joint = JointMaskRun(ctl, {n: proc(ctl) for n in flux_attention_names(transformer)})
        handle = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            with attention_processors(transformer, joint.processors):
                yield joint
        finally:
            handle.remove()
