"""Tiny random-weight models built from configs, in the diffusers folder layout.

Tests and benchmarks use them (nothing can be downloaded here), and they load through the same
loader as any user's model. `pixel` models have no VAE (as DeepFloyd IF); `latent` ones carry a
tiny AutoencoderKL; `flow` ones ship a flow-matching scheduler config.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import torch

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def build_word_tokenizer(words: Iterable[str], max_length: int):
    """A word-level tokenizer (lower-case, punctuation split) as a PreTrainedTokenizerFast.

    Built offline with `tokenizers`; it saves and reloads through `from_pretrained` like CLIP's.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=max_length)


TINY_WORDS = ("a an the and red green blue yellow purple orange circle square triangle star cat dog "
              "on at in left right top bottom center background black white gray , of with").split()


def build_tiny_model(path: str, *, kind: str = "pixel", flow: bool = False, seed: int = 0,
                     sample_size: int = 16, max_length: int = 16) -> str:
    """Write a tiny random model folder at `path` and return the path."""
    from diffusers import (AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    from kernels.models import quiet_hub_libraries

    quiet_hub_libraries()
    if kind not in ("pixel", "latent"):
        raise ValueError(f"kind must be 'pixel' or 'latent', got {kind!r}")
    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    tokenizer = build_word_tokenizer(TINY_WORDS, max_length)
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 max_position_embeddings=max_length,
                                 pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
    text_encoder = CLIPTextModel(text_config)
    channels = 4 if kind == "latent" else 3
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2)
    if flow:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    else:
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                  prediction_type="v_prediction", clip_sample=False)
    index = {"_class_name": "LoomworkTinyPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "scheduler": ["diffusers", type(scheduler).__name__],
             "vae": [None, None]}
    if kind == "latent":
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                            down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2)
        vae.save_pretrained(os.path.join(path, "vae"), safe_serialization=True)
        index["vae"] = ["diffusers", "AutoencoderKL"]
    unet.save_pretrained(os.path.join(path, "unet"), safe_serialization=True)
    text_encoder.save_pretrained(os.path.join(path, "text_encoder"), safe_serialization=True)
    tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    scheduler.save_pretrained(os.path.join(path, "scheduler"))
    with open(os.path.join(path, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return path
