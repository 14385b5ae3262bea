"""Adapter nodes: files that change a MODEL and CLIP without being a model (LoRA).

The input MODEL and CLIP are never changed: each node returns bundles that record a patch,
applied only while a Sampler (MODEL) or TextEncode (CLIP) runs. The work is in kernels/adapters/.
"""

from __future__ import annotations

from kernels.files import path_fingerprint

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
    def _resolve(cls, path: str, ctx) -> str:
        try:
            return ctx.resolve_path(path, kinds=LORA_KINDS)
        except NodeError as exc:
            raise NodeError(f"LoadLoRA: {exc}") from None

    @classmethod
    def fingerprint(cls, params, ctx):
        try:
            return path_fingerprint(cls._resolve(params["path"], ctx))
        except NodeError:
            return ("missing", params["path"])

    def run(self, ctx, model, clip, path, strength_model, strength_clip):
        from kernels.adapters import LoraFileError, lora_patches

        if not path:
            raise NodeError("LoadLoRA: no LoRA file chosen")
        file = self._resolve(path, ctx)
        try:
            model_patch, clip_patch = lora_patches(file, model.unet, clip.text_encoder, strength_model,
                                                   strength_clip)
        except LoraFileError as exc:
            raise NodeError(f"LoadLoRA: {exc}") from None
        return {"model": model if model_patch is None else model.with_patch(model_patch),
                "clip": clip if clip_patch is None else clip.with_patch(clip_patch)}
