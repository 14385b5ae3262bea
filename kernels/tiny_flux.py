"""A tiny random FLUX.1 folder in FluxPipeline's own layout, for tests and benches.

Kept apart from kernels.tiny (whose word tokenizers it uses) so each model family's builder
lives in its own file.
"""

from __future__ import annotations

import json
import os

import torch

from kernels.tiny import CLIP_SPECIALS, T5_SPECIALS, TINY_WORDS, build_word_tokenizer

# FLUX.1's own scheduler configs: dev shifts the schedule by the image sequence length (mu),
# schnell ships a fixed shift of 1 instead.
FLUX_DEV_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                      "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                      "max_image_seq_len": 4096}
FLUX_SCHNELL_SCHEDULER = {**FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}
# FLUX.1's VAE latent statistics (16 channels).
FLUX_VAE_SHIFT, FLUX_VAE_SCALE = 0.1159, 0.3611


def build_tiny_flux_model(path: str, *, guidance_embeds: bool = True, seed: int = 0,
                          max_length: int = 16, t5_max_length: int = 16) -> str:
    """Write a tiny random FLUX folder at `path` and return the path.

    `guidance_embeds=True` is "dev"-style (a guidance-distilled transformer that takes the
    guidance scale as an input, dynamic shifting); False is "schnell"-style (no guidance input,
    schnell's fixed-shift scheduler). Layout as FluxPipeline's: `transformer`
    (FluxTransformer2DModel, 16 latent channels packed 2x2 into 64), CLIP as `text_encoder`
    (CLIPTextModel: only its pooled output is used), T5 as `text_encoder_2` (its sequence is the
    text the transformer attends to), a word tokenizer for each, a tiny 16-channel AutoencoderKL
    with FLUX's shift and scale, and a FlowMatchEulerDiscreteScheduler.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from kernels.models import quiet_hub_libraries

    quiet_hub_libraries()
    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    clip_tok = build_word_tokenizer(TINY_WORDS, max_length, specials=CLIP_SPECIALS)
    t5_tok = build_word_tokenizer(TINY_WORDS, t5_max_length, specials=T5_SPECIALS, bos=False)
    clip_width, t5_width = 32, 32
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=clip_width, intermediate_size=2 * clip_width,
        projection_dim=clip_width, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=max_length, pad_token_id=clip_tok.pad_token_id,
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=t5_width, d_kv=16, d_ff=64,
                                 num_layers=1, num_heads=2, pad_token_id=t5_tok.pad_token_id,
                                 eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=0))
    # The rope axes (4 + 6 + 6) must add up to the head width, as FLUX's (16, 56, 56) make 128.
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=t5_width, pooled_projection_dim=clip_width,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2,
                        shift_factor=FLUX_VAE_SHIFT, scaling_factor=FLUX_VAE_SCALE,
                        use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        **(FLUX_DEV_SCHEDULER if guidance_embeds else FLUX_SCHNELL_SCHEDULER))
    index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
             "transformer": ["diffusers", "FluxTransformer2DModel"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    for name, module in (("transformer", transformer), ("vae", vae), ("text_encoder", clip),
                         ("text_encoder_2", t5)):
        module.save_pretrained(os.path.join(path, name), safe_serialization=True)
    for name, tok in (("tokenizer", clip_tok), ("tokenizer_2", t5_tok)):
        tok.save_pretrained(os.path.join(path, name))
    scheduler.save_pretrained(os.path.join(path, "scheduler"))
    with open(os.path.join(path, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return path
