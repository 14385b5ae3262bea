"""Tiny random-weight models built from configs, in the diffusers folder layout.

Tests and benchmarks use them (nothing can be downloaded here), and they load through the same
loader as any user's model. `pixel` models have no VAE (as DeepFloyd IF); `latent` ones carry a
tiny AutoencoderKL; `flow` ones ship a flow-matching scheduler config. `build_tiny_sd3_model`
writes a Stable Diffusion 3 (MM-DiT) folder in StableDiffusion3Pipeline's own layout.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import torch

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def build_word_tokenizer(words: Iterable[str], max_length: int, *,
                         specials: Sequence[str] = SPECIALS, bos: bool = True):
    """A word-level tokenizer (lower-case, punctuation split) as a PreTrainedTokenizerFast.

    Built offline with `tokenizers`; it saves and reloads through `from_pretrained` like CLIP's.
    `specials` orders the special tokens (their ids); `bos=False` frames a text as T5 does,
    "$A <eos>", instead of CLIP's "<bos> $A <eos>".
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="$A <eos>", special_tokens=[("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>" if bos else None,
                                   eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=max_length)


TINY_WORDS = ("a an the and red green blue yellow purple orange circle square triangle star cat dog "
              "on at in left right top bottom center background black white gray , of with").split()


def build_tiny_model(path: str, *, kind: str = "pixel", flow: bool = False, seed: int = 0,
                     sample_size: int = 16, max_length: int = 16) -> str:
    """Write a tiny random model folder at `path` and return the path."""
    from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
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


# Token ids chosen so CLIP's pooling finds the end token by its id (CLIPTextConfig.eos_token_id
# of 2 selects the legacy argmax-of-ids pooling, which only works for CLIP's real vocabulary).
CLIP_SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
T5_SPECIALS = ["<pad>", "<eos>", "<unk>"]


def build_tiny_sd3_model(path: str, *, seed: int = 0, max_length: int = 16,
                         t5_max_length: int = 16, num_layers: int = 2) -> str:
    """Write a tiny random Stable Diffusion 3 folder at `path` and return the path.

    The layout is StableDiffusion3Pipeline's: `transformer` (SD3Transformer2DModel, patch 2),
    CLIP-L and CLIP-G as `text_encoder`/`text_encoder_2` (CLIPTextModelWithProjection), T5 as
    `text_encoder_3`, a tokenizer for each, a tiny AutoencoderKL with SD3's shift/scale and a
    FlowMatchEulerDiscreteScheduler (shift 3, as SD3). The widths keep SD3's arithmetic: the two
    CLIP hidden states (16 + 32) are padded to T5's width (64, the joint attention dim) and the
    two CLIP projections (16 + 32) make the pooled projection. As in SD3 the last block is
    context-pre-only. Weights are safetensors; tokenizers are word-level, built offline.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from kernels.models import quiet_hub_libraries

    quiet_hub_libraries()
    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    clip_tok = build_word_tokenizer(TINY_WORDS, max_length, specials=CLIP_SPECIALS)
    t5_tok = build_word_tokenizer(TINY_WORDS, t5_max_length, specials=T5_SPECIALS, bos=False)
    t5_width = 64

    def clip(hidden: int):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=hidden, intermediate_size=2 * hidden,
            projection_dim=hidden, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=max_length, pad_token_id=clip_tok.pad_token_id,
            bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id))

    clip_l, clip_g = clip(16), clip(32)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=t5_width, d_kv=16, d_ff=64,
                                 num_layers=1, num_heads=2, pad_token_id=t5_tok.pad_token_id,
                                 eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=0))
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=t5_width,
        caption_projection_dim=16, pooled_projection_dim=16 + 32, pos_embed_max_size=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2,
                        shift_factor=0.0609, scaling_factor=1.5035)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
             "transformer": ["diffusers", "SD3Transformer2DModel"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"],
             "text_encoder_3": ["transformers", "T5EncoderModel"],
             "tokenizer_3": ["transformers", "PreTrainedTokenizerFast"],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    for name, module in (("transformer", transformer), ("vae", vae), ("text_encoder", clip_l),
                         ("text_encoder_2", clip_g), ("text_encoder_3", t5)):
        module.save_pretrained(os.path.join(path, name), safe_serialization=True)
    for name, tok in (("tokenizer", clip_tok), ("tokenizer_2", clip_tok), ("tokenizer_3", t5_tok)):
        tok.save_pretrained(os.path.join(path, name))
    scheduler.save_pretrained(os.path.join(path, "scheduler"))
    with open(os.path.join(path, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return path


# The scheduler config SDXL base ships (EulerDiscreteScheduler); its DDIM/PNDM-era keys are kept
# too, so a scheduler built from it (make_scheduler) sees what a real SDXL folder gives it.
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "interpolation_type": "linear", "use_karras_sigmas": False, "timestep_spacing": "leading",
    "steps_offset": 1, "clip_sample": False, "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "trained_betas": None}


def build_tiny_sdxl_model(path: str, *, seed: int = 0, max_length: int = 16, refiner: bool = False) -> str:
    """Write a tiny random Stable Diffusion XL folder at `path` and return the path.

    The layout is StableDiffusionXLPipeline's: `unet` (UNet2DConditionModel with SDXL's
    "text_time" added conditioning), CLIP-L as `text_encoder` (CLIPTextModel) and CLIP-G as
    `text_encoder_2` (CLIPTextModelWithProjection), a word tokenizer for each, a tiny AutoencoderKL
    with SDXL's scaling factor and SDXL's EulerDiscreteScheduler config (steps_offset 1, leading
    spacing). The widths keep SDXL's arithmetic: the two hidden states (16 + 32) make the cross
    attention width, and the added embedding takes 6 time ids x 8 + CLIP-G's projection (32).
    `refiner` writes the refiner's layout instead (StableDiffusionXLImg2ImgPipeline): CLIP-G
    only, 5 time ids (an aesthetic score in place of the target size), no zeroed negative.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from kernels.models import quiet_hub_libraries

    quiet_hub_libraries()
    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    clip_tok = build_word_tokenizer(TINY_WORDS, max_length, specials=CLIP_SPECIALS)

    def clip_config(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=hidden, intermediate_size=2 * hidden,
            projection_dim=hidden, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=max_length, pad_token_id=clip_tok.pad_token_id,
            bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id)

    clip_l, clip_g = CLIPTextModel(clip_config(16)), CLIPTextModelWithProjection(clip_config(32))
    time_embed_dim = 8
    n_time_ids, text_width = (5, 32) if refiner else (6, 16 + 32)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=8, attention_head_dim=(2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
        cross_attention_dim=text_width, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=n_time_ids * time_embed_dim + 32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.13025)
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
             "force_zeros_for_empty_prompt": True,
             "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    modules = [("unet", unet), ("vae", vae), ("text_encoder", clip_l), ("text_encoder_2", clip_g)]
    tokenizers = ["tokenizer", "tokenizer_2"]
    if refiner:
        index.update({"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None],
                      "tokenizer": [None, None], "force_zeros_for_empty_prompt": False,
                      "requires_aesthetics_score": True})
        modules, tokenizers = [m for m in modules if m[0] != "text_encoder"], ["tokenizer_2"]
    for name, module in modules:
        module.save_pretrained(os.path.join(path, name), safe_serialization=True)
    for name in tokenizers:
        clip_tok.save_pretrained(os.path.join(path, name))
    os.makedirs(os.path.join(path, "scheduler"), exist_ok=True)
    for file_name, data in (("scheduler/scheduler_config.json", SDXL_SCHEDULER_CONFIG),
                            ("model_index.json", index)):
        with open(os.path.join(path, file_name), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
    return path
