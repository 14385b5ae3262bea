"""ControlNet nodes: load a ControlNet, apply it to a MODEL with a control image, and the control
images that need no model of their own (Canny edges, a depth map and its normals, a scribble of
the layout's boxes).

The input MODEL is never changed: ControlNetApply returns a bundle that records a patch, applied
only while a Sampler runs. The work is in kernels/adapters/controlnet.py and preprocess.py.
"""

from __future__ import annotations

from .base import CONTROL_NET, IMAGE, LAYOUT, MODEL, Bool, Choice, Float, Int, Node, NodeError, Path
from .registry import register

CONTROLNET_KINDS = ("controlnet",)  # what `ckpt:NAME` is looked up among in the models folders


@register
class LoadControlNet(Node):
    """Load a ControlNet or a T2I-Adapter: a diffusers folder, or a .safetensors file (diffusers
    or original layout) with its config beside it (`NAME.yaml`, or a diffusers config.json in its
    folder) or alone (its architecture is read off its tensors). `ckpt:NAME` names one in the
    models folders' controlnet folder. Nothing is downloaded."""

    category = "loaders"
    params = {
        "path": Path("", mode="file", filters="ControlNet (*.safetensors);;diffusers folder (config.json)",
                     models=CONTROLNET_KINDS, help="the ControlNet file or folder, or ckpt:NAME"),
        "dtype": Choice(("float32", "float16", "bfloat16"), "float32",
                        help="weights precision; use the MODEL's"),
    }
    outputs = {"control_net": CONTROL_NET}

    @classmethod
    def fingerprint(cls, params, ctx):
        return cls.model_path_fingerprint(ctx, params["path"], CONTROLNET_KINDS)

    def run(self, ctx, path, dtype):
        from kernels.adapters.controlnet import ControlNetError, load_control_net
        from kernels.models import ModelLoadError

        if not path:
            raise NodeError("LoadControlNet: no ControlNet file chosen")
        file = self.resolve_model_path(ctx, path, CONTROLNET_KINDS)
        try:
            return {"control_net": ctx.models.load(file, dtype, load_control_net)}
        except (ControlNetError, ModelLoadError) as exc:
            raise NodeError(f"LoadControlNet: {exc}") from None


@register
class ControlNetApply(Node):
    """Steer a MODEL with a ControlNet (or T2I-Adapter) and its control image (edges, depth, a
    scribble): its residuals, times `strength`, join the UNet's from `start` to `end` of the steps.
    Chain several to combine them (their residuals add up). The image is resized to the latent's
    size; strength 0 leaves the MODEL as it was."""

    category = "conditioning"
    inputs = {"model": MODEL, "control_net": CONTROL_NET, "image": IMAGE}
    params = {
        "strength": Float(1.0, 0.0, 10.0, step=0.05, help="how strongly the control image steers; 0 = off"),
        "start": Float(0.0, 0.0, 1.0, step=0.05, help="the fraction of the steps at which it begins"),
        "end": Float(1.0, 0.0, 1.0, step=0.05, help="the fraction of the steps at which it ends"),
        "guess_mode": Bool(False, help="the ControlNet sees the positive prompt only (works with no prompt); adapters ignore it"),
    }
    outputs = {"model": MODEL}

    def run(self, ctx, model, control_net, image, strength, start, end, guess_mode):
        from kernels.adapters.controlnet import ControlNetError, controlnet_patch

        if end <= start:
            raise NodeError(f"ControlNetApply: end ({end}) must come after start ({start})")
        if strength == 0.0:
            return {"model": model}
        try:
            patch = controlnet_patch(control_net, model.unet, image, strength, start, end, guess_mode)
        except ControlNetError as exc:
            raise NodeError(f"ControlNetApply: {exc}") from None
        return {"model": model.with_patch(patch)}


@register
class CannyEdges(Node):
    """Canny edges of an image (white on black), as ControlNet's canny models were trained on:
    gradients stronger than `high` are edges, and weaker ones down to `low` where they continue one."""

    category = "image"
    inputs = {"image": IMAGE}
    params = {
        "low": Int(100, 0, 2000, help="weakest gradient that continues an edge (0..255 image scale)"),
        "high": Int(200, 0, 2000, help="weakest gradient that starts an edge"),
    }
    outputs = {"image": IMAGE}

    def run(self, ctx, image, low, high):
        from kernels.adapters.preprocess import canny

        if low > high:
            raise NodeError(f"CannyEdges: low ({low}) must not exceed high ({high})")
        return {"image": canny(image, float(low), float(high))}


@register
class DepthFromImage(Node):
    """A depth map you supply (any image; brighter is nearer, as ControlNet's depth models read it)
    normalised to the full 0..1 range, and the normal map it implies, for depth and normal
    ControlNets."""

    category = "image"
    inputs = {"image": IMAGE}
    params = {
        "invert": Bool(False, help="the image has far bright and near dark: flip it"),
        "normal_strength": Float(4.0, 0.01, 100.0, step=0.5, help="how steep the depth's slopes are for the normals"),
    }
    outputs = {"depth": IMAGE, "normal": IMAGE}

    def run(self, ctx, image, invert, normal_strength):
        from kernels.adapters.preprocess import normalised_depth, normals_from_depth

        depth = normalised_depth(image, invert=invert)
        return {"depth": depth.unsqueeze(-1).expand(*depth.shape, 3).contiguous(),
                "normal": normals_from_depth(depth, normal_strength)}


@register
class LayoutScribble(Node):
    """The layout's boxes drawn as a control image (white on black) for scribble and lineart
    ControlNets: their outlines, or filled."""

    category = "image"
    inputs = {"layout": LAYOUT}
    params = {
        "width": Int(512, 8, 8192, step=8, help="image width in pixels"),
        "height": Int(512, 8, 8192, step=8, help="image height in pixels"),
        "filled": Bool(False, help="fill the boxes instead of drawing their outlines"),
        "line_width": Int(4, 1, 256, help="outline width in pixels"),
    }
    outputs = {"image": IMAGE}

    def run(self, ctx, layout, width, height, filled, line_width):
        from kernels.adapters.preprocess import layout_scribble

        return {"image": layout_scribble(layout, width, height, filled=filled, line_width=line_width)}
