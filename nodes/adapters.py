"""Adapter nodes: files that change a MODEL and CLIP without being a model (LoRA).

The input MODEL and CLIP are never changed: each node returns bundles that record a patch,
applied only while a Sampler (MODEL) or TextEncode (CLIP) runs. The work is in kernels/adapters/.
"""

from __future__ import annotations

from .base import CLIP, MODEL, Float, Node, NodeError, Path
from .registry import register

LORA_KINDS = ("lora",)  # what `ckpt:NAME` is looked up among in the models folders


def _strength(what: str) -> Float:
    return Float(1.0, -10.0, 10.0, step=0.05, help=f"how much of the LoRA the {what} gets; 0 leaves it as it was")


@register
class LoadLoRA(Node):
    """Apply a LoRA file to a MODEL and its CLIP, each at its own strength; chain several to
    stack them. Reads kohya/A1111, diffusers/PEFT and LyCORIS LoCon files for SD 1.x/2.x, SDXL,
    SD3 and FLUX (.safetensors only). `ckpt:NAME` names one in the models folders' loras."""

    category = "loaders"
    inputs = {"model": MODEL, "clip": CLIP}
    params = {
        "path": Path("", mode="file", filters="LoRA (*.safetensors)", models=LORA_KINDS,
                     help="the LoRA file, or ckpt:NAME from the models folders"),
        "strength_model": _strength("denoiser"),
        "strength_clip": _strength("text encoder"),
    }
    outputs = {"model": MODEL, "clip": CLIP}

    @classmethod
    def fingerprint(cls, params, ctx):
        return cls.model_path_fingerprint(ctx, params["path"], LORA_KINDS)

    def run(self, ctx, model, clip, path, strength_model, strength_clip):
        from kernels.adapters import LoraFileError, lora_patches

        if not path:
            raise NodeError("LoadLoRA: no LoRA file chosen")
        file = self.resolve_model_path(ctx, path, LORA_KINDS)
        try:
            model_patch, clip_patch = lora_patches(file, model.unet, clip.text_encoder, strength_model,
                                                   strength_clip)
        except LoraFileError as exc:
            raise NodeError(f"LoadLoRA: {exc}") from None
        return {"model": model if model_patch is None else model.with_patch(model_patch),
                "clip": clip if clip_patch is None else clip.with_patch(clip_patch)}
