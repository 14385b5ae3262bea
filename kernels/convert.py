"""Diffusers state dicts -> the original single-file key layouts (LDM/SGM for SD 1.x/2.x/SDXL).

diffusers converts original checkpoints to its own layout when it loads them
(`from_single_file`), but has no writer for the other direction; this inverse mapping is ours.
Each function here is checked against diffusers' own reader: what we write, diffusers reads
back to the same tensors (tests/test_convert.py), which is the layout ComfyUI and A1111 read.

- UNet: `model.diffusion_model.` + input_blocks / middle_block / output_blocks (resnets as
  in_layers/emb_layers/out_layers, transformers under their own names).
- VAE: `first_stage_model.` + encoder.down.N.block.M / mid.block_1 / mid.attn_1 (1x1 convs),
  decoder.up counted from the bottom.
- CLIP-L: `cond_stage_model.transformer.` (SD 1) or `conditioner.embedders.0.transformer.`
  (SDXL) + transformers' own `text_model.*` names.
- OpenCLIP (SD 2's encoder, SDXL's CLIP-G): `cond_stage_model.model.` or
  `conditioner.embedders.1.model.` + token_embedding, positional_embedding,
  transformer.resblocks.N (q/k/v fused into in_proj), ln_final, text_projection (transposed).
"""

from __future__ import annotations

import re

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_TOP = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
               "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}


class ConvertError(ValueError):
    """A state dict the converter has no mapping for; the message names the keys."""


def _leftovers(what: str, keys) -> None:
    keys = sorted(keys)
    if keys:
        raise ConvertError(f"{what}: no original-layout name for {len(keys)} tensors, e.g. {keys[:3]}")


def _per_block(config: dict) -> int:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ConvertError(f"the original UNet layout has one layers_per_block for every block, got {layers}")
    return layers


def unet_to_ldm(state: dict, config: dict) -> dict:
    """A diffusers UNet2DConditionModel state dict as the LDM/SGM UNet's (without its prefix).

    The LDM UNet numbers its blocks flat: input_blocks.0 is conv_in, then per level
    `layers_per_block` blocks of (resnet, attention) and a downsampler; output_blocks have one
    block more per level, the upsampler after the attention in the last one.
    """
    per = _per_block(config) + 1
    up_attention = {int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    rules = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda b, j, n, p: f"input_blocks.{1 + int(b) * per + int(j)}.0.{_UNET_RESNET[n]}.{p}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda b, j, p: f"input_blocks.{1 + int(b) * per + int(j)}.1.{p}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
         lambda b, p: f"input_blocks.{(int(b) + 1) * per}.0.op.{p}"),
        (r"mid_block\.resnets\.(\d+)\.(\w+)\.(.+)", lambda i, n, p: f"middle_block.{2 * int(i)}.{_UNET_RESNET[n]}.{p}"),
        (r"mid_block\.attentions\.0\.(.+)", lambda p: f"middle_block.1.{p}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda b, j, n, p: f"output_blocks.{int(b) * per + int(j)}.0.{_UNET_RESNET[n]}.{p}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda b, j, p: f"output_blocks.{int(b) * per + int(j)}.1.{p}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda b, p: f"output_blocks.{int(b) * per + per - 1}.{2 if int(b) in up_attention else 1}.conv.{p}"),
        (r"(\w+\.\w+|\w+)\.(weight|bias)", lambda name, p: f"{_UNET_TOP[name]}.{p}" if name in _UNET_TOP else None),
    ]
    return _apply_rules("UNet", state, rules)


def _apply_rules(what: str, state: dict, rules) -> dict:
    out, unmatched = {}, []
    compiled = [(re.compile(pattern + "$"), make) for pattern, make in rules]
    for key, tensor in state.items():
        for pattern, make in compiled:
            m = pattern.match(key)
            if m:
                try:
                    new = make(*m.groups())
                except KeyError:
                    new = None
                if new is not None:
                    out[new] = tensor
                    break
        else:
            unmatched.append(key)
    _leftovers(what, unmatched)
    return out


def vae_to_ldm(state: dict, config: dict) -> dict:
    """A diffusers AutoencoderKL state dict as the LDM VAE's (without its prefix); the mid-block
    attention's linear layers become the 1x1 convolutions the original has."""
    levels = len(config["up_block_types"])
    resnet = {"conv_shortcut": "nin_shortcut"}
    rules = [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda i, j, n, p: f"encoder.down.{i}.block.{j}.{resnet.get(n, n)}.{p}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda i, p: f"encoder.down.{i}.downsample.conv.{p}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda i, j, n, p: f"decoder.up.{levels - 1 - int(i)}.block.{j}.{resnet.get(n, n)}.{p}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda i, p: f"decoder.up.{levels - 1 - int(i)}.upsample.conv.{p}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda side, i, n, p: f"{side}.mid.block_{int(i) + 1}.{resnet.get(n, n)}.{p}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)",
         lambda side, n, p: f"{side}.mid.attn_1.{_VAE_ATTENTION[n]}.{p}"),
        (r"((?:encoder|decoder)\.conv_norm_out)\.(.+)", lambda n, p: f"{_VAE_TOP[n]}.{p}"),
        (r"((?:encoder|decoder)\.conv_(?:in|out)|quant_conv|post_quant_conv)\.(.+)", lambda n, p: f"{n}.{p}"),
    ]
    out = _apply_rules("VAE", state, rules)
    for key, tensor in out.items():
        if ".mid.attn_1." in key and key.endswith("weight") and tensor.ndim == 2:
            out[key] = tensor[:, :, None, None]
    return out


def clip_state(state: dict) -> dict:
    """transformers' CLIP text model keys as they are saved: `text_model.*` (a flattened
    CLIPTextModel's are given the prefix back), `text_projection.weight` as is."""
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
            for k, v in state.items() if not k.endswith("position_ids")}


def clip_to_ldm(state: dict, prefix: str) -> dict:
    """CLIP-L as the original checkpoints hold it: transformers' own names under `prefix`."""
    return {prefix + k: v for k, v in clip_state(state).items() if not k.startswith("text_projection")}


def clip_to_open_clip(state: dict, prefix: str) -> dict:
    """A transformers CLIP text model in OpenCLIP's layout (SD 2's encoder, SDXL's CLIP-G)."""
    state = clip_state(state)
    out, layers = {}, {}
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    unmatched = []
    for key, tensor in state.items():
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if key in fixed:
            out[prefix + fixed[key]] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()  # OpenCLIP multiplies x @ P
        elif m and m.group(2) in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            layers.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)[-6]] = tensor
        elif m and m.group(2) in _CLIP_LAYER:
            out[f"{prefix}transformer.resblocks.{m.group(1)}.{_CLIP_LAYER[m.group(2)]}.{m.group(3)}"] = tensor
        else:
            unmatched.append(key)
    _leftovers("OpenCLIP text encoder", unmatched)
    for (i, kind), qkv in layers.items():
        out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


# -- SD3 -----------------------------------------------------------------------------------

SD3_CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
SD3_CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
SD3_T5_PREFIX = "text_encoders.t5xxl.transformer."
_SD3_TOP = {"pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj",
            "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
            "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
            "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
            "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
            "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
            "norm_out.linear": "final_layer.adaLN_modulation.1"}
_SD3_BLOCK = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
              "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
              "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
              "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
              "attn2.to_out.0": "x_block.attn2.proj", "norm1.linear": "x_block.adaLN_modulation.1",
              "norm1_context.linear": "context_block.adaLN_modulation.1",
              "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
              "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}
# q, k and v projections the original fuses into one `qkv` per attention
_SD3_QKV = {"attn.to_": "x_block.attn.qkv", "attn.add_": "context_block.attn.qkv", "attn2.to_": "x_block.attn2.qkv"}


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """The original's adaLN gives (shift, scale), diffusers' (scale, shift): the same swap both ways."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def sd3_to_original(state: dict, config: dict) -> dict:
    """A diffusers SD3Transformer2DModel state dict in the layout of Stability's SD3 files
    (joint_blocks.N.{x_block,context_block}, fused qkv), without the `model.diffusion_model.`
    prefix. The last block's context modulation and the final one are scale/shift swapped."""
    last = int(config["num_layers"]) - 1
    out, fused, unmatched = {}, {}, []
    for key, tensor in state.items():
        name, _, param = key.rpartition(".")
        if name in _SD3_TOP or key in _SD3_TOP:
            target = _SD3_TOP.get(key) or f"{_SD3_TOP[name]}.{param}"
            out[target] = _swap_halves(tensor) if name == "norm_out.linear" else tensor
            continue
        m = re.match(r"transformer_blocks\.(\d+)\.(.+)$", name)
        if not m:
            unmatched.append(key)
            continue
        i, inner = int(m.group(1)), m.group(2)
        qkv = re.match(r"(attn\.to_|attn\.add_|attn2\.to_)([qkv])(?:_proj)?$", inner)
        if qkv:
            fused.setdefault((f"joint_blocks.{i}.{_SD3_QKV[qkv.group(1)]}.{param}"), {})[qkv.group(2)] = tensor
        elif inner in _SD3_BLOCK:
            swap = i == last and inner == "norm1_context.linear"
            out[f"joint_blocks.{i}.{_SD3_BLOCK[inner]}.{param}"] = _swap_halves(tensor) if swap else tensor
        else:
            unmatched.append(key)
    _leftovers("SD3 transformer", unmatched)
    for target, parts in fused.items():
        out[target] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out
