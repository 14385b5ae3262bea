"""The "clip" seed-scan metric: the cosine similarity of an image's and its prompt's CLIP
embeddings, with a CLIP model from a local folder (transformers' CLIPModel layout).

Offline and safetensors only: the folder must hold config.json, a *.safetensors weights file
and a tokenizer; pickled weights (pytorch_model.bin) are refused rather than unpickled.
`load_clip` has the model manager's loader signature, so the app loads the model once and
keeps it under the memory budget with the other models (nodes pass `ctx.models.load`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch


class ClipScoreError(ValueError):
    """A CLIP folder that cannot be used."""


@dataclass(frozen=True)
class ClipModel:
    """A loaded CLIP model folder: the model (eval mode), its tokenizer and image processor."""

    model: Any
    tokenizer: Any
    processor: Any


def check_clip_folder(folder: str) -> Path:
    """The folder, if it holds what `load_clip` reads; else ClipScoreError saying what is missing."""
    root = Path(folder).expanduser()
    if not str(folder).strip() or not root.is_dir():
        raise ClipScoreError(f"CLIP model folder {str(folder)!r} does not exist")
    if not (root / "config.json").is_file():
        raise ClipScoreError(f"CLIP model folder {str(root)!r} has no config.json")
    if not any(root.glob("*.safetensors")):
        raise ClipScoreError(f"CLIP model folder {str(root)!r} has no .safetensors weights "
                             "(pickled weights are not loaded)")
    return root


def load_clip(folder: str, dtype=torch.float32, device: str = "cpu") -> ClipModel:
    """The CLIP model of `folder`, offline, in `dtype` on `device` (the model manager's loader
    signature)."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    root = check_clip_folder(folder)
    try:
        model = CLIPModel.from_pretrained(root, use_safetensors=True, local_files_only=True,
                                          dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ClipScoreError(f"CLIP model folder {str(root)!r} cannot be loaded: {exc}") from None
    if (root / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(root, local_files_only=True)
    else:  # CLIP's own resize, centre crop and normalisation at the model's input size
        side = model.config.vision_config.image_size
        processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return ClipModel(model, tokenizer, processor)


def clip_similarity(clip: ClipModel, prompt: str, image: torch.Tensor) -> float:
    """Cosine similarity of one HWC 0..1 image's and `prompt`'s CLIP embeddings."""
    model, tokenizer, processor = clip.model, clip.tokenizer, clip.processor
    pixels = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype("uint8")
    max_length = model.config.text_config.max_position_embeddings
    text = tokenizer([prompt], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    vision = processor(images=[pixels], return_tensors="pt")
    with torch.no_grad():
        mask = text.get("attention_mask")
        t = _features(model.get_text_features(input_ids=text["input_ids"].to(model.device),
                                              attention_mask=None if mask is None else mask.to(model.device)))
        v = _features(model.get_image_features(pixel_values=vision["pixel_values"].to(model.device, model.dtype)))
    return float(torch.nn.functional.cosine_similarity(t.float(), v.float()).item())


def _features(out) -> torch.Tensor:
    """The projected embedding: transformers 5 returns it as the output's pooler_output, 4 as is."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_scorer(folder: str, prompt: str,
                load: Optional[Callable[[str], ClipModel]] = None) -> Callable[[torch.Tensor], float]:
    """image (HWC, 0..1) -> its CLIP similarity to `prompt`. `load(folder)` gives the ClipModel
    (the app's model manager, which keeps it between runs); by default it is loaded here, once
    for this scorer."""
    check_clip_folder(folder)  # a clear error before the manager reads the folder's headers
    clip = (load or load_clip)(folder)
    return lambda image: clip_similarity(clip, prompt, image)
