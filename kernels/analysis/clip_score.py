"""The "clip" seed-scan metric: the cosine similarity of an image's and its prompt's CLIP
embeddings, with a CLIP model from a local folder (transformers' CLIPModel layout).

Offline and safetensors only: the folder must hold config.json, a *.safetensors weights file
and a tokenizer; pickled weights (pytorch_model.bin) are refused rather than unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch


class ClipScoreError(ValueError):
    """A CLIP folder that cannot be used."""


def load_clip(folder: str):
    """(CLIPModel in eval mode, tokenizer, image processor) from `folder`, offline."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    root = Path(folder).expanduser()
    if not str(folder).strip() or not root.is_dir():
        raise ClipScoreError(f"CLIP model folder {str(folder)!r} does not exist")
    if not (root / "config.json").is_file():
        raise ClipScoreError(f"CLIP model folder {str(root)!r} has no config.json")
    if not any(root.glob("*.safetensors")):
        raise ClipScoreError(f"CLIP model folder {str(root)!r} has no .safetensors weights "
                             "(pickled weights are not loaded)")
    try:
        model = CLIPModel.from_pretrained(root, use_safetensors=True, local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ClipScoreError(f"CLIP model folder {str(root)!r} cannot be loaded: {exc}") from None
    if (root / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(root, local_files_only=True)
    else:  # CLIP's own resize, centre crop and normalisation at the model's input size
        side = model.config.vision_config.image_size
        processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return model, tokenizer, processor


def clip_similarity(model, tokenizer, processor, prompt: str, image: torch.Tensor) -> float:
    """Cosine similarity of one HWC 0..1 image's and `prompt`'s CLIP embeddings."""
    pixels = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype("uint8")
    max_length = model.config.text_config.max_position_embeddings
    text = tokenizer([prompt], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    vision = processor(images=[pixels], return_tensors="pt")
    with torch.no_grad():
        t = _features(model.get_text_features(input_ids=text["input_ids"], attention_mask=text.get("attention_mask")))
        v = _features(model.get_image_features(pixel_values=vision["pixel_values"].to(model.dtype)))
    return float(torch.nn.functional.cosine_similarity(t.float(), v.float()).item())


def _features(out) -> torch.Tensor:
    """The projected embedding: transformers 5 returns it as the output's pooler_output, 4 as is."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_scorer(folder: str, prompt: str) -> Callable[[torch.Tensor], float]:
    """image (HWC, 0..1) -> its CLIP similarity to `prompt`, the model loaded once."""
    model, tokenizer, processor = load_clip(folder)
    return lambda image: clip_similarity(model, tokenizer, processor, prompt, image)
