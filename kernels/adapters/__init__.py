"""Adapters: files that add to a model without being a model (LoRA; more to come).

Each adapter is a `ModelPatch` (kernels.patching) recorded on a MODEL or CLIP bundle and put on
the shared module only while a sampler or text encoder runs. One technique per module:

- lora: LoRA files (kohya/A1111, diffusers/PEFT, LyCORIS LoCon; SD 1.x/2.x, SDXL, SD3, FLUX),
  read, checked and applied through diffusers' own LoRA loaders and peft.
- ip_adapter: IP-Adapter image prompts (with masks, several at once) on diffusers' IP-Adapter processors.
- controlnet: ControlNets and T2I-Adapters on the UNet for a run (a forward pre-hook adding their
  residuals); preprocess: the control images that need no model (Canny, depth/normal, scribble).
"""

from .lora import (
    FAMILIES,
    LoraFamily,
    LoraFileError,
    LoraFilePatch,
    ParsedLora,
    attached_lora,
    denoiser_family,
    lora_patches,
    parse_lora,
    read_lora_file,
    text_encoder_family,
    text_encoder_parts,
)

__all__ = [
    "FAMILIES", "LoraFamily", "LoraFileError", "LoraFilePatch", "ParsedLora", "attached_lora",
    "denoiser_family", "lora_patches", "parse_lora", "read_lora_file", "text_encoder_family",
    "text_encoder_parts",
]
