"""IP-Adapter nodes: an image as a prompt, with a scale and an optional mask (kernels/adapters/ip_adapter.py).

LoadIPAdapter reads an adapter file and its image encoder; IPAdapterApply encodes an image and
returns the MODEL with a patch that adds the image prompt while a Sampler runs. Chain several
IPAdapterApply nodes for several image prompts at once.
"""

from __future__ import annotations

from .base import IMAGE, IP_ADAPTER, MASK, MODEL, Choice, Float, Node, NodeError, Path
from .core import DTYPES
from .registry import register

IP_ADAPTER_KINDS = ("ipadapter",)     # what `ckpt:NAME` is looked up among in the models folders
IMAGE_ENCODER_KINDS = ("clip_vision",)


@register
class LoadIPAdapter(Node):
    """Load an IP-Adapter file (.safetensors with image_proj.* and ip_adapter.* tensors: the
    plain, Plus and Full adapters for SD 1.x/2.x and SDXL) with the CLIP image encoder it was
    trained with (a folder with config.json and model.safetensors)."""

    category = "loaders"
    params = {
        "path": Path("", mode="file", filters="IP-Adapter (*.safetensors)", models=IP_ADAPTER_KINDS,
                     help="the IP-Adapter file, or ckpt:NAME from the models folders"),
        "image_encoder": Path("", mode="folder", models=IMAGE_ENCODER_KINDS,
                              help="the CLIP vision model folder the adapter was trained with"),
        "dtype": Choice(DTYPES, "float32", help="the image encoder's precision"),
    }
    outputs = {"ip_adapter": IP_ADAPTER}

    @classmethod
    def fingerprint(cls, params, ctx):
        return (cls.model_path_fingerprint(ctx, params["path"], IP_ADAPTER_KINDS),
                cls.model_path_fingerprint(ctx, params["image_encoder"], IMAGE_ENCODER_KINDS))

    def run(self, ctx, path, image_encoder, dtype):
        from kernels.adapters.ip_adapter import IPAdapterError, ip_adapter, load_image_encoder, load_ip_adapter_file
        from kernels.models import ModelLoadError

        if not path:
            raise NodeError("LoadIPAdapter: no IP-Adapter file chosen")
        file = self.resolve_model_path(ctx, path, IP_ADAPTER_KINDS)
        if not image_encoder:
            raise NodeError(f"LoadIPAdapter: the IP-Adapter file {file!r} needs its image encoder: set "
                            f"image_encoder to the CLIP vision model folder it was trained with")
        encoder_path = self.resolve_model_path(ctx, image_encoder, IMAGE_ENCODER_KINDS)
        try:
            weights = ctx.models.load(file, dtype, load_ip_adapter_file)
            encoder = ctx.models.load(encoder_path, dtype, load_image_encoder)
            return {"ip_adapter": ip_adapter(weights, encoder)}
        except (IPAdapterError, ModelLoadError) as exc:
            raise NodeError(f"LoadIPAdapter: {exc}") from None


@register
class IPAdapterApply(Node):
    """Prompt the MODEL with an image through an IP-Adapter: `scale` is how strongly (0 leaves
    the model as it was), an optional `mask` keeps the image prompt to a region (white), and
    start/end limit it to part of the steps. Chain several for several image prompts."""

    category = "conditioning"
    inputs = {"model": MODEL, "ip_adapter": IP_ADAPTER, "image": IMAGE,
              "mask": MASK.optional("where the image prompt acts (white); everywhere without one")}
    params = {
        "scale": Float(1.0, -2.0, 5.0, step=0.05, help="how strongly the image prompts; 0 leaves the model as it was"),
        "start": Float(0.0, 0.0, 1.0, step=0.05, help="where in the steps the image prompt begins"),
        "end": Float(1.0, 0.0, 1.0, step=0.05, help="where it ends (exclusive)"),
    }
    outputs = {"model": MODEL}

    def run(self, ctx, model, ip_adapter, image, mask, scale, start, end):
        from kernels.adapters.ip_adapter import IPAdapterError, ip_adapter_patch

        if end <= start:
            raise NodeError(f"IPAdapterApply: end ({end}) must come after start ({start})")
        if scale == 0.0:  # not even encoded: the bundle and every key downstream are the input's
            return {"model": model}
        try:
            patch = ip_adapter_patch(ip_adapter, model.unet, image, scale, mask, start, end)
        except IPAdapterError as exc:
            raise NodeError(f"IPAdapterApply: {exc}") from None
        return {"model": model.with_patch(patch)}
