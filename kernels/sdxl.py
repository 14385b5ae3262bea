"""Stable Diffusion XL: the folder loader, text encoding and the UNet's extra conditioning.

An SDXL folder (`_class_name` StableDiffusionXLPipeline) loads into the usual three bundles:
MODEL is its UNet (an SDXLModelBundle, which also knows the VAE's scale factor, for the time
ids), CLIP carries CLIP-L and CLIP-G with their tokenizers (SDXLTokenizers / SDXLTextEncoders),
VAE its AutoencoderKL. The refiner (StableDiffusionXLImg2ImgPipeline) loads too: it has CLIP-G
only, and its time ids end in an aesthetic score instead of the target size.

Text is encoded by StableDiffusionXLPipeline.encode_prompt itself (called, not re-implemented):
the two encoders' penultimate hidden states side by side along features, CLIP-G's projection
as the pooled embedding, and for the negative zeros (the folder's `force_zeros_for_empty_prompt`,
true as SDXL ships) or the encoding of "". Both tokenizers split a prompt alike, so the word map
is CLIP-L's token positions.

The UNet also takes `added_cond_kwargs`: the pooled embedding and the time ids (original size,
crop corner (0, 0), target size; the refiner: original size, crop corner, aesthetic score 6, or
2.5 for the negative), which the pipelines compute from the image size by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional

import torch

from kernels.models import (
    ModelBundle,
    ModelLoadError,
    TextEncoderBundle,
    VaeBundle,
    build_vae_bundle,
    check_components,
    load_components,
    model_folder_key,
    read_scheduler_config,
)
from kernels.text import Conditioning, TextEncoderSet, word_positions

SDXL_COMPONENTS = {"unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler", "vae"}
# model_index.json keys of an SDXL folder that are pipeline settings, not components.
SDXL_SETTINGS = {"force_zeros_for_empty_prompt", "add_watermarker", "requires_aesthetics_score"}
CROP_TOP_LEFT = (0, 0)  # the pipeline's default crop corner
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # the refiner pipeline's defaults


class SDXLTextEncoders(TextEncoderSet):
    """The text encoders of an SDXL folder as one module (the CLIP bundle's encoder): CLIP-L
    (CLIPTextModel; None in a refiner) and CLIP-G (CLIPTextModelWithProjection), and whether the folder's negative
    for "no negative prompt" is zeros (`force_zeros_for_empty_prompt`)."""

    def __init__(self, text_encoder, text_encoder_2, force_zeros_for_empty_prompt: bool = True):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)


@dataclass(frozen=True)
class SDXLTokenizers:
    """The CLIP bundle's tokenizer for SDXL: CLIP-L's (None in a refiner) and CLIP-G's."""

    tokenizer: Any
    tokenizer_2: Any


@dataclass(frozen=True)
class SDXLModelBundle(ModelBundle):
    """MODEL for SDXL: the UNet, and the VAE's scale factor, since the time ids the UNet takes
    are in pixels while the sampler sees latents; a refiner's UNet `requires_aesthetics_score`."""

    vae_scale_factor: int = 8
    requires_aesthetics_score: bool = False

    def added_cond_kwargs(self, pooled: Optional[tuple], latent_shape: tuple, guided: bool) -> dict:
        """The UNet's `added_cond_kwargs` as StableDiffusionXLPipeline builds them for a latent of
        `latent_shape`: `pooled` is (positive, negative or None); [negative, positive] when guided."""
        if pooled is None or pooled[0] is None:
            raise ValueError("an SDXL UNet needs pooled text embeddings: encode the prompt with "
                             "this model's own text encoders")
        from kernels.sampling import per_image

        b = int(latent_shape[0])  # every image of the batch gets the pooled text and the ids
        positive, negative = pooled
        size = (int(latent_shape[-2]) * self.vae_scale_factor, int(latent_shape[-1]) * self.vae_scale_factor)
        time_ids, negative_time_ids = add_time_ids(self.unet, size, positive.dtype, positive.shape[-1],
                                                   self.requires_aesthetics_score)
        positive, time_ids = per_image(positive, b), time_ids.repeat(b, 1).to(positive.device)
        if not guided:
            return {"text_embeds": positive, "time_ids": time_ids}
        if negative is None:
            raise ValueError("guidance with an SDXL UNet needs the negative's pooled embeddings too")
        return {"text_embeds": torch.cat([negative.expand_as(positive), positive]),
                "time_ids": torch.cat([negative_time_ids.repeat(b, 1).to(time_ids.device), time_ids])}


def add_time_ids(unet, size: tuple[int, int], dtype: torch.dtype, projection_dim: int,
                 requires_aesthetics_score: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) time ids, each (1, n), for an image of `size` (height, width), by the
    pipelines' own `_get_add_time_ids` (which check them against the UNet): original size, crop
    (0, 0) and target size for both; a refiner's end in the aesthetic scores instead."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    size = tuple(size)
    if not requires_aesthetics_score:
        holder = SimpleNamespace(unet=unet)  # the method reads only the UNet
        ids = StableDiffusionXLPipeline._get_add_time_ids(
            holder, size, CROP_TOP_LEFT, size, dtype=dtype, text_encoder_projection_dim=int(projection_dim))
        return ids, ids
    holder = SimpleNamespace(unet=unet, config=SimpleNamespace(requires_aesthetics_score=True))
    return StableDiffusionXLImg2ImgPipeline._get_add_time_ids(
        holder, size, CROP_TOP_LEFT, size, AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE, size,
        CROP_TOP_LEFT, size, dtype=dtype, text_encoder_projection_dim=int(projection_dim))


def _sdxl_pipeline(tok: SDXLTokenizers, enc: SDXLTextEncoders):
    """A StableDiffusionXLPipeline holding only the text side, for its encode_prompt."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=None, unet=None, scheduler=None, text_encoder=enc.text_encoder,
        text_encoder_2=enc.text_encoder_2, tokenizer=tok.tokenizer, tokenizer_2=tok.tokenizer_2,
        force_zeros_for_empty_prompt=enc.force_zeros_for_empty_prompt, add_watermarker=False)


@torch.no_grad()
def encode_sdxl(tok: SDXLTokenizers, enc: SDXLTextEncoders, prompt: str) -> Conditioning:
    """SDXL's text embeddings and pooled embedding (diffusers' encode_prompt), with the
    pipeline's default negative (no negative prompt) as `empty`/`empty_pooled`."""
    pipe = _sdxl_pipeline(tok, enc)
    embeds, empty, pooled, empty_pooled = pipe.encode_prompt(
        prompt, device=enc.device, num_images_per_prompt=1, do_classifier_free_guidance=True)
    return Conditioning(embeds=embeds.clone(), prompt=" ".join(prompt.split()),
                        words=word_positions(tok.tokenizer or tok.tokenizer_2, prompt), empty=empty.clone(),
                        pooled=pooled.clone(), empty_pooled=empty_pooled.clone())


def load_sdxl_folder(path: str, index: dict, dtype: torch.dtype,
                     device: str) -> tuple[ModelBundle, TextEncoderBundle, VaeBundle]:
    """An SDXL folder: the UNet as MODEL, CLIP-L + CLIP-G (a refiner: CLIP-G) as CLIP."""
    check_components(path, index, SDXL_COMPONENTS | SDXL_SETTINGS, "an SDXL folder has unet, "
                      "vae, scheduler, text_encoder(_2) and tokenizer(_2)")
    load_key = model_folder_key(path, dtype, device)
    parts = load_components(path, index, sorted(SDXL_COMPONENTS - {"scheduler"}), dtype, device)
    refiner = index.get("_class_name") == "StableDiffusionXLImg2ImgPipeline"
    needed = ("unet", "text_encoder_2", "tokenizer_2", "vae") + (() if refiner else ("text_encoder", "tokenizer"))
    for required in needed:
        if required not in parts:
            raise ModelLoadError(f"{path}: model_index.json has no {required!r} component")
    unet = parts["unet"]
    if unet.config.addition_embed_type != "text_time":
        raise ModelLoadError(f"{path}: the UNet's addition_embed_type is "
                             f"{unet.config.addition_embed_type!r}; an SDXL UNet has 'text_time'")
    vae = build_vae_bundle(parts["vae"], path, load_key, unet.config.in_channels)
    if ("text_encoder" in parts) != ("tokenizer" in parts):
        raise ModelLoadError(f"{path}: text_encoder (CLIP-L) and tokenizer come together or not at all")
    encoders = SDXLTextEncoders(parts.get("text_encoder"), parts["text_encoder_2"],
                                bool(index.get("force_zeros_for_empty_prompt", True)))
    tokenizers = SDXLTokenizers(parts.get("tokenizer"), parts["tokenizer_2"])
    return (SDXLModelBundle(unet, read_scheduler_config(path), path, load_key,
                            vae_scale_factor=vae.scale_factor,
                            requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False))),
            TextEncoderBundle(tokenizers, encoders, path, load_key),
            vae)
