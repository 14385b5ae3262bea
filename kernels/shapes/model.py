"""ShapesT2I: the built-in text-to-image model, built from configs, in the diffusers folder layout.

A pixel-space UNet2DConditionModel at 32x32 (4.2M parameters; cross-attention at 16x16 and 8x8
so position words can steer where things go; about one training step per second at batch 32 on
one core), a small CLIP text encoder trained jointly, and a word-level tokenizer over the
world's caption grammar. v-prediction on a cosine DDPM schedule. The 64 px variant is the same
UNet on images folded 2x2 space-to-depth (`fold_pixels`): 12 channels at 32x32.
"""

from __future__ import annotations

import json
import math
import os

import torch

from kernels.shapes.world import vocabulary
from kernels.tiny import build_word_tokenizer

MAX_TOKENS = 32  # the longest caption (3 objects, positions, background) is 29 tokens with bos/eos
IMAGE_SIZE = 32
TEXT_HIDDEN = 128


def build_tokenizer():
    return build_word_tokenizer(vocabulary(), MAX_TOKENS)


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
                            num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    return CLIPTextModel(config)


def build_unet(global_text: bool = False):
    from diffusers import UNet2DConditionModel

    # global_text adds diffusers' "text" addition embedding: an attention pooling of the whole
    # caption added to the time embedding, so every ResNet block is modulated by it. The CLIP
    # encoder is causal, so a colour word never sees the position word after it; the pooling
    # reads both (bench/results/positions.md).
    extra = {"addition_embed_type": "text", "addition_embed_type_num_heads": 4} if global_text else {}

    # attention_head_dim sets the NUMBER of heads in this class (a legacy name): 4 heads keep
    # attention cheap on a CPU; 64 made training 3x slower.
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE, in_channels=3, out_channels=3,
        block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4, **extra)


def pixel_shuffle_of(unet) -> int:
    """The space-to-depth factor a ShapesT2I UNet takes its images at (1: plain pixels)."""
    return math.isqrt(unet.config.in_channels // 3)


def fold_pixels(unet, factor: int):
    """A copy of `unet` that takes images folded space-to-depth by `factor` (kernels.models
    VaeBundle.pixel_shuffle): 3 * factor**2 channels at the same latent size, so a 64 px model
    costs what the 32 px one does. On an image whose blocks are flat it is the given model, its
    output repeated over each block, so a 64 px model trains on from the 32 px weights.

    The input layer also reads each block's deviation from its mean, through small seeded random
    weights: with every sub-pixel weighted alike, the gradient cannot tell sub-pixels apart and
    training never learns detail inside a block (measured: the within-block error did not move
    in 400 steps)."""
    from diffusers import UNet2DConditionModel

    blocks = factor * factor
    wide = UNet2DConditionModel.from_config({**unet.config, "in_channels": 3 * blocks, "out_channels": 3 * blocks})
    state = dict(unet.state_dict())
    # torch.nn.functional.pixel_unshuffle puts channel c's sub-pixels at channels c*r*r .. c*r*r + r*r - 1
    w_in = state["conv_in.weight"]
    deviation = torch.randn(w_in.shape[:2] + (blocks,) + w_in.shape[2:], generator=torch.Generator().manual_seed(0))
    deviation = (deviation - deviation.mean(dim=2, keepdim=True)) * (0.5 * float(w_in.std()))  # zero on flat blocks
    state["conv_in.weight"] = (w_in.unsqueeze(2) / blocks + deviation).flatten(1, 2)
    state["conv_out.weight"] = state["conv_out.weight"].repeat_interleave(blocks, dim=0)
    state["conv_out.bias"] = state["conv_out.bias"].repeat_interleave(blocks, dim=0)
    wide.load_state_dict(state)
    return wide


def build_scheduler():
    from diffusers import DDPMScheduler

    # "trailing" spacing makes sampling start at t=999, where the capped cosine schedule has
    # (almost) zero SNR, as in training. With diffusers' default "leading" spacing the first
    # step is t=950, where the model reads the image's mean from x_t: started from pure noise
    # it then drew every background mid-gray (measured: trailing turns white/black
    # backgrounds on and lifts single-object cell accuracy 0.13 -> 0.21 at the same weights).
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing")


def model_index(pixel_shuffle: int = 1) -> dict:
    import diffusers

    from kernels.models import PIXEL_SHUFFLE_KEY

    folded = {PIXEL_SHUFFLE_KEY: pixel_shuffle} if pixel_shuffle > 1 else {}
    return {"_class_name": "ShapesT2IPipeline", "_diffusers_version": diffusers.__version__, **folded,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "scheduler": ["diffusers", "DDPMScheduler"],
            "vae": [None, None]}


def save_model(folder: str, unet, text_encoder, tokenizer, scheduler, dtype=torch.float32) -> None:
    """Write the diffusers folder layout (weights in `dtype`, safetensors)."""
    from kernels.models import quiet_hub_libraries

    quiet_hub_libraries()
    os.makedirs(folder, exist_ok=True)
    unet_copy = type(unet).from_config(unet.config)
    unet_copy.load_state_dict(unet.state_dict())
    unet_copy.to(dtype).save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
    te_copy = type(text_encoder)(text_encoder.config)
    te_copy.load_state_dict(text_encoder.state_dict())
    te_copy.to(dtype).save_pretrained(os.path.join(folder, "text_encoder"), safe_serialization=True)
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(model_index(pixel_shuffle_of(unet)), f, indent=2)


def parameter_counts(unet, text_encoder) -> dict:
    return {"unet": sum(p.numel() for p in unet.parameters()),
            "text_encoder": sum(p.numel() for p in text_encoder.parameters())}
