"""IP-Adapter: an image prompt through decoupled cross-attention, on diffusers' IP-Adapter support.

Ye et al., "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion Models"
(2023): a CLIP image encoder's embedding is projected to a few extra context tokens, and every
cross-attention layer attends to them with its own key/value projections (`to_k_ip`, `to_v_ip`);
the result is added to the text attention times a scale. Checked against diffusers 0.42
(`IPAdapterMixin.load_ip_adapter`, `UNet2DConditionLoadersMixin._load_ip_adapter_weights`,
`IPAdapterAttnProcessor2_0`, `StableDiffusionPipeline.prepare_ip_adapter_image_embeds`,
`IPAdapterMaskProcessor`), which does the work here:

- the file is the standard layout (`image_proj.*`, `ip_adapter.N.to_k_ip.weight`, as the
  reference weights ship); diffusers' converter builds the projection (`ImageProjection`,
  `IPAdapterPlusImageProjection`, `IPAdapterFullImageProjection`);
- the image is preprocessed by transformers' `CLIPImageProcessor` at the encoder's image size (as
  `load_ip_adapter` builds it when a pipeline has none) and encoded as the pipeline does: image
  embeds for the plain adapter, the penultimate hidden states for Plus/Full; the unconditional
  embeds are zeros (plain) or the encoding of a black image (Plus/Full);
- during a run the UNet gets diffusers' `MultiIPAdapterImageProjection` as `encoder_hid_proj`
  with `encoder_hid_dim_type="ip_image_proj"`, the image embeds in `added_cond_kwargs`, and
  `IPAdapterAttnProcessor2_0` on each cross-attention layer with every adapter's weights, its
  scale and its mask (`ip_adapter_masks`, binarised by `IPAdapterMaskProcessor`).

What is ours: checking the file, the encoder and the UNet fit before a run; one patch per
adapter, several composing in one run (`IPAdapterRun` in `run.state`); the image embeds batched
per UNet call ([uncond, cond] under guidance, cond alone for a call on the positive, as a
guidance step makes); a step window; composing with another patch's cross-attention processors
(a layout's) by adding the image term to that processor's output (`ImageTermProcessor`); and
putting the UNet back exactly (processors, `encoder_hid_proj`, the config's
`encoder_hid_dim_type`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from kernels.files import path_fingerprint
from kernels.hashing import content_hash, key_of
from kernels.model_folders import PICKLE_NOTE, PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, read_safetensors_header
from kernels.patching import ModelPatch, SamplingRun
from kernels.sampling import in_step_window

STATE_KEY = "loomwork.ip_adapter"  # the run's IPAdapterRun in SamplingRun.state
KINDS = ("plain", "plus", "full")
MASK_MULTIPLE = 8  # IPAdapterMaskProcessor's default resizes masks to multiples of 8 pixels


class IPAdapterError(ValueError):
    """An IP-Adapter, image encoder, image or mask that cannot be used; the message names the file."""


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class IPAdapterWeights:
    """An IP-Adapter file: its projection's tensors (`image_proj`, keys without the prefix), its
    per-layer key/value tensors (`layers`: "1.to_k_ip.weight", ...) and its projection's kind."""

    path: str
    fingerprint: Any
    image_proj: dict
    layers: dict
    kind: str

    def content_key(self) -> str:
        return key_of("ip-adapter-file", self.fingerprint)

    @property
    def layer_count(self) -> int:
        return len({k.partition(".")[0] for k in self.layers})

    def projection_width(self) -> int:
        """The width of the context tokens the projection makes (the UNet's cross-attention)."""
        p = self.image_proj
        if self.kind == "plain":
            return p["proj.weight"].shape[0] // 4
        if self.kind == "full":
            return p["proj.3.weight"].shape[0]
        return p["proj_out.weight"].shape[0]

    def encoder_width(self) -> tuple[int, str]:
        """(width, what of the image encoder it is) the projection reads."""
        p = self.image_proj
        if self.kind == "plain":
            return p["proj.weight"].shape[1], "projection_dim"
        if self.kind == "full":
            return p["proj.0.weight"].shape[1], "hidden_size"
        return p["proj_in.weight"].shape[1], "hidden_size"


def _projection_kind(path: str, image_proj: dict) -> str:
    """diffusers' own order of tests (`_convert_ip_adapter_image_proj_to_diffusers`)."""
    if "proj.weight" in image_proj:
        return "plain"
    if "proj.3.weight" in image_proj:
        return "full"
    if "perceiver_resampler.proj_in.weight" in image_proj or "norm.weight" in image_proj:
        raise IPAdapterError(f"IP-Adapter file {path!r} is a FaceID adapter: it reads face embeddings from "
                             f"insightface, which Loomwork does not compute")
    if "latents" in image_proj and "proj_in.weight" in image_proj and "proj_out.weight" in image_proj:
        return "plus"
    raise IPAdapterError(f"IP-Adapter file {path!r}: its image_proj tensors are no projection diffusers knows "
                         f"(plain, Plus or Full)")


def read_ip_adapter_file(path: str, dtype: Optional[torch.dtype] = None) -> IPAdapterWeights:
    """An IP-Adapter .safetensors file in the standard layout, checked. A pickle (.bin) is refused
    by its suffix before a byte is read: it could run code when opened."""
    from safetensors.torch import load_file

    low = path.lower()
    if low.endswith(PICKLE_SUFFIXES):
        raise IPAdapterError(f"IP-Adapter file {path!r} is {PICKLE_NOTE}")
    if not low.endswith(SAFETENSORS_SUFFIXES):
        raise IPAdapterError(f"IP-Adapter file {path!r} is not a .safetensors file; IP-Adapters are read "
                             f"from safetensors only")
    if not os.path.isfile(path):
        raise IPAdapterError(f"IP-Adapter file {path!r} does not exist")
    try:
        read_safetensors_header(path)
        tensors = load_file(path, device="cpu")
    except Exception as exc:  # a bad header (ValueError) or safetensors' own errors (truncated data)
        raise IPAdapterError(f"IP-Adapter file {path!r} cannot be read: {exc}") from None
    image_proj = {k[len("image_proj."):]: v for k, v in tensors.items() if k.startswith("image_proj.")}
    layers = {k[len("ip_adapter."):]: v for k, v in tensors.items() if k.startswith("ip_adapter.")}
    if not image_proj or not layers:
        raise IPAdapterError(f"IP-Adapter file {path!r} is not in the standard layout (image_proj.* and "
                             f"ip_adapter.* tensors): is it an IP-Adapter?")
    kind = _projection_kind(path, image_proj)
    if dtype is not None:
        image_proj = {k: v.to(dtype) for k, v in image_proj.items()}
        layers = {k: v.to(dtype) for k, v in layers.items()}
    return IPAdapterWeights(os.path.abspath(path), path_fingerprint(os.path.abspath(path)), image_proj, layers, kind)


def load_ip_adapter_file(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> IPAdapterWeights:
    """The model manager's loader (`loader(path, dtype=, device=)`): tensors stay on the CPU,
    each run moves its copies to the UNet's device."""
    return read_ip_adapter_file(path, dtype)


@dataclass(frozen=True, eq=False)
class ImageEncoder:
    """A CLIPVisionModelWithProjection with the CLIPImageProcessor that prepares its input."""

    path: str
    fingerprint: Any
    model: Any
    processor: Any

    def content_key(self) -> str:
        return key_of("image-encoder", self.fingerprint, str(self.model.dtype))


def _encoder_folder(path: str) -> str:
    """The folder a CLIP vision model loads from: the folder itself, or a weights file's folder
    (its config.json beside it, as the reference image encoders ship)."""
    if os.path.isdir(path):
        folder = path
    elif os.path.isfile(path):
        if path.lower().endswith(PICKLE_SUFFIXES):
            raise IPAdapterError(f"image encoder {path!r} is {PICKLE_NOTE}")
        if not path.lower().endswith(SAFETENSORS_SUFFIXES):
            raise IPAdapterError(f"image encoder {path!r} is not a .safetensors file or a model folder")
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.basename(path) != "model.safetensors":
            raise IPAdapterError(f"image encoder {path!r}: choose its folder (config.json and "
                                 f"model.safetensors), or name the file model.safetensors beside its config.json")
    else:
        raise IPAdapterError(f"image encoder {path!r} does not exist")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise IPAdapterError(f"image encoder {path!r} has no config.json beside its weights: a CLIP vision "
                             f"model is a folder with config.json and model.safetensors")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        raise IPAdapterError(f"image encoder {path!r} has no model.safetensors (pickled weights are never "
                             f"opened: convert them to .safetensors)")
    return folder


def load_image_encoder(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> ImageEncoder:
    """A CLIP vision model folder (or its model.safetensors), offline, with the image processor
    diffusers' `load_ip_adapter` makes for it (at the encoder's image size)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from kernels.models import quiet_hub_libraries

    quiet_hub_libraries()
    folder = _encoder_folder(path)
    try:
        config = json.loads(open(os.path.join(folder, "config.json"), encoding="utf-8").read())
    except (OSError, json.JSONDecodeError) as exc:
        raise IPAdapterError(f"image encoder {path!r}: its config.json cannot be read ({exc})") from None
    if config.get("model_type") not in ("clip_vision_model", "clip"):
        raise IPAdapterError(f"image encoder {path!r} is a {config.get('model_type')!r} model, not a CLIP vision "
                             f"model (CLIPVisionModelWithProjection)")
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True, dtype=dtype,
                                                              use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IPAdapterError(f"image encoder {path!r} cannot be loaded as a CLIP vision model: {first[:200]}") from None
    model.to(device).eval()
    size = model.config.image_size
    return ImageEncoder(os.path.abspath(path), path_fingerprint(folder), model,
                        CLIPImageProcessor(size=size, crop_size=size))


@dataclass(frozen=True, eq=False)
class IPAdapter:
    """IP_ADAPTER: an adapter file with the image encoder it was trained with."""

    weights: IPAdapterWeights
    encoder: ImageEncoder

    def content_key(self) -> str:
        return key_of("IP_ADAPTER", self.weights.content_key(), self.encoder.content_key())


def ip_adapter(weights: IPAdapterWeights, encoder: ImageEncoder) -> IPAdapter:
    """The pair, once the projection is known to read what the encoder gives."""
    width, what = weights.encoder_width()
    has = getattr(encoder.model.config, what)
    if width != has:
        raise IPAdapterError(f"IP-Adapter file {weights.path!r} reads image features of width {width} but the "
                             f"image encoder {encoder.path!r} gives {has} ({what}): use the encoder the "
                             f"adapter was trained with")
    return IPAdapter(weights, encoder)


# ---------------------------------------------------------------------------------------------
# checking the fit, encoding the image and the mask
# ---------------------------------------------------------------------------------------------
def cross_attention_layers(unet) -> list[tuple[str, Any]]:
    """(processor name, Attention module) of each cross-attention layer, in `attn_processors`
    order: the order the file's layer numbers (1, 3, 5, ...) follow, as diffusers reads them."""
    return [(name, unet.get_submodule(name[: -len(".processor")])) for name in unet.attn_processors
            if name.endswith("attn2.processor") and "motion_modules" not in name]


def layer_key(index: int) -> str:
    return str(2 * index + 1)  # the reference numbering counts self- and cross-attention layers


def check_unet_fits(weights: IPAdapterWeights, unet) -> None:
    """Raise IPAdapterError unless the file's projection width is the UNet's cross-attention
    width and it has key/value weights of the right shapes for every cross-attention layer."""
    if type(unet).__name__ != "UNet2DConditionModel":
        raise IPAdapterError(f"IP-Adapter file {weights.path!r}: IP-Adapters apply to SD 1.x/2.x and SDXL UNets; "
                             f"this model's denoiser is a {type(unet).__name__}")
    cross = unet.config.cross_attention_dim
    width = weights.projection_width()
    if width != cross:
        raise IPAdapterError(f"IP-Adapter file {weights.path!r} projects images to width {width} but this UNet's "
                             f"cross-attention takes {cross}: it is an IP-Adapter for another model family")
    layers = cross_attention_layers(unet)
    if weights.layer_count != len(layers):
        raise IPAdapterError(f"IP-Adapter file {weights.path!r} has weights for {weights.layer_count} "
                             f"cross-attention layers but this UNet has {len(layers)}: it is an IP-Adapter for "
                             f"another model")
    for index, (name, attn) in enumerate(layers):
        want = tuple(attn.to_k.weight.shape)
        for part in ("to_k_ip", "to_v_ip"):
            tensor = weights.layers.get(f"{layer_key(index)}.{part}.weight")
            if tensor is None or tuple(tensor.shape) != want:
                got = "nothing" if tensor is None else tuple(tensor.shape)
                raise IPAdapterError(f"IP-Adapter file {weights.path!r}: layer {layer_key(index)}.{part} is {got} "
                                     f"but the UNet's {name[: -len('.processor')]} needs {want}")


def build_projection(weights: IPAdapterWeights, unet) -> torch.nn.Module:
    """The file's projection as diffusers builds it (on the CPU, in the file's dtype)."""
    try:
        return unet._convert_ip_adapter_image_proj_to_diffusers(weights.image_proj, low_cpu_mem_usage=False)
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IPAdapterError(f"IP-Adapter file {weights.path!r}: diffusers cannot build its image projection "
                             f"({first[:200]})") from None


@torch.no_grad()
def encode_images(adapter: IPAdapter, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) image embeds of one adapter, (1, n_images, D) or (1, n_images, tokens, D),
    as StableDiffusionPipeline.encode_image and prepare_ip_adapter_image_embeds make them."""
    from kernels.images import to_pil

    model = adapter.encoder.model
    pixels = adapter.encoder.processor(to_pil(images), return_tensors="pt").pixel_values
    pixels = pixels.to(model.device, model.dtype)
    if adapter.weights.kind == "plain":
        cond = model(pixels).image_embeds
        uncond = torch.zeros_like(cond)
    else:
        cond = model(pixels, output_hidden_states=True).hidden_states[-2]
        uncond = model(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
    return cond[None].cpu(), uncond[None].cpu()


def prepare_mask(mask: Optional[torch.Tensor], n_images: int, what: str = "mask") -> Optional[torch.Tensor]:
    """A MASK (N, H, W) as IPAdapterMaskProcessor makes it for one adapter: binarised at 0.5,
    (1, n_images, H', W') with H', W' multiples of 8. One mask serves every image."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise IPAdapterError(f"the {what} must be (N, H, W), got shape {tuple(mask.shape)}")
    if mask.shape[0] not in (1, n_images):
        raise IPAdapterError(f"the {what} has {mask.shape[0]} masks for {n_images} images: give one, or one "
                             f"per image")
    h, w = mask.shape[1:]
    if h < MASK_MULTIPLE or w < MASK_MULTIPLE:
        raise IPAdapterError(f"the {what} is {w}x{h} pixels; it needs at least {MASK_MULTIPLE} on a side")
    masks = IPAdapterMaskProcessor().preprocess(mask.float().cpu()[:, None], height=h, width=w)
    masks = masks.reshape(1, masks.shape[0], masks.shape[2], masks.shape[3])
    return masks.expand(1, n_images, *masks.shape[2:]).contiguous() if masks.shape[1] != n_images else masks


# ---------------------------------------------------------------------------------------------
# the patch
# ---------------------------------------------------------------------------------------------
class IPAdapterPatch(ModelPatch):
    """One IP-Adapter with its image (already encoded), scale, mask and step window. A value:
    its tensors and modules are made when the node runs and never change; every run works on
    copies moved to the UNet's device."""

    kind = "ip-adapter"

    def __init__(self, adapter: IPAdapter, projection: torch.nn.Module, embeds: torch.Tensor,
                 negative_embeds: torch.Tensor, scale: float, mask: Optional[torch.Tensor] = None,
                 start: float = 0.0, end: float = 1.0, image_key: str = ""):
        self.adapter = adapter
        self.projection = projection
        self.embeds, self.negative_embeds = embeds, negative_embeds
        self.scale = float(scale)
        self.mask = mask
        self.start, self.end = float(start), float(end)
        self._key = f"{self.kind}:{content_hash(adapter.content_key(), image_key or embeds, mask, self.scale, self.start, self.end)}"

    def cache_key(self) -> str:
        return self._key

    def describe(self) -> str:
        return f"IP-Adapter {os.path.basename(self.adapter.weights.path)} ({self.scale:g})"

    @property
    def num_tokens(self) -> int:
        proj = self.projection
        if hasattr(proj, "num_image_text_embeds"):  # ImageProjection
            return proj.num_image_text_embeds
        if hasattr(proj, "latents"):  # IPAdapterPlusImageProjection
            return proj.latents.shape[1]
        return self.embeds.shape[-2]  # Full: one token per encoder token

    @contextlib.contextmanager
    def applied(self, unet, run: Optional[SamplingRun]):
        if run is None:  # outside a sampling run (an eraser's training) no image is prompted, as layouts do
            yield
            return
        state = run.state.get(STATE_KEY)
        owner = state is None
        if owner:
            state = IPAdapterRun(unet, run)
            run.state[STATE_KEY] = state
        active = ActiveAdapter.of(self, unet)
        state.add(active)
        try:
            yield
        finally:
            state.remove(active)
            if owner:
                state.restore()
                run.state.pop(STATE_KEY, None)


@dataclass
class ActiveAdapter:
    """One patch's copies for one run, on the UNet's device and dtype."""

    patch: IPAdapterPatch
    projection: torch.nn.Module
    embeds: torch.Tensor
    negative_embeds: torch.Tensor
    mask: Optional[torch.Tensor]
    layers: dict  # "1.to_k_ip.weight" -> tensor

    @classmethod
    def of(cls, patch: IPAdapterPatch, unet) -> "ActiveAdapter":
        device, dtype = unet.device, unet.dtype
        projection = copy.deepcopy(patch.projection).to(device=device, dtype=dtype)
        layers = {k: v.to(device, dtype) for k, v in patch.adapter.weights.layers.items()}
        mask = None if patch.mask is None else patch.mask.to(device)
        return cls(patch, projection, patch.embeds.to(device, dtype), patch.negative_embeds.to(device, dtype), mask,
                   layers)

    def scale_at(self, fraction: Optional[float]) -> float:
        p = self.patch
        if fraction is None or in_step_window(fraction, p.start, p.end):
            return p.scale
        return 0.0

    def batch(self, rows: int, images: int) -> torch.Tensor:
        """The embeds for a UNet call of `rows` samples of `images` images: [uncond, cond] under
        guidance (rows = 2 x images), the cond alone otherwise."""
        cond = self.embeds.expand(images if rows == 2 * images else rows, *self.embeds.shape[1:])
        if rows != 2 * images:
            return cond
        return torch.cat([self.negative_embeds.expand_as(cond), cond])


class IPAdapterRun:
    """Every IP-Adapter of one run on the shared UNet, and what it changed, to put back.

    The first patch to enter makes it and restores the UNet on exit; each patch adds its
    adapter. The processors are installed at the UNet's first forward (a pre-hook), after
    every patch has entered, so they wrap whatever cross-attention processors other patches
    installed (a layout's) in any order; the pre-hook also puts the image embeds (batched to the
    call) into `added_cond_kwargs` and the masks into `cross_attention_kwargs`."""

    def __init__(self, unet, run: SamplingRun):
        self.unet, self.run = unet, run
        self.adapters: list[ActiveAdapter] = []
        self.layers = cross_attention_layers(unet)
        self.saved_processors = dict(unet.attn_processors)
        self.saved_projection = unet.encoder_hid_proj
        self.saved_type = unet.config.encoder_hid_dim_type
        self.ip_processors: dict[str, Any] = {}
        self.installed: dict[str, tuple[Any, Any]] = {}  # name -> (installed processor, the one it wraps)
        self.stale = True  # the adapters changed since the processors were installed
        self.handle = unet.register_forward_pre_hook(self.before_forward, with_kwargs=True)

    def add(self, active: ActiveAdapter) -> None:
        self.adapters.append(active)
        self.rebuild()

    def remove(self, active: ActiveAdapter) -> None:
        self.adapters.remove(active)
        if self.adapters:
            self.rebuild()

    def rebuild(self) -> None:
        """diffusers' projection list and one IPAdapterAttnProcessor2_0 per layer for the adapters."""
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        unet = self.unet
        self.ip_processors = {}
        for index, (name, attn) in enumerate(self.layers):
            proc = IPAdapterAttnProcessor2_0(hidden_size=attn.to_k.out_features,
                                             cross_attention_dim=attn.to_k.in_features,
                                             num_tokens=[a.patch.num_tokens for a in self.adapters],
                                             scale=[a.patch.scale for a in self.adapters])
            state = {}
            for i, a in enumerate(self.adapters):
                for part in ("to_k_ip", "to_v_ip"):
                    state[f"{part}.{i}.weight"] = a.layers[f"{layer_key(index)}.{part}.weight"]
            proc.load_state_dict(state)
            self.ip_processors[name] = proc.to(unet.device, unet.dtype)
        unet.encoder_hid_proj = MultiIPAdapterImageProjection([a.projection for a in self.adapters])
        unet.config.encoder_hid_dim_type = "ip_image_proj"
        self.stale = True

    def install(self) -> None:
        """The IP processors on every cross-attention layer: diffusers' own where the layer had
        diffusers' plain processor, else an ImageTermProcessor around the one it had."""
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        current = self.unet.attn_processors
        chosen = {}
        for name, _attn in self.layers:
            mine = self.installed.get(name)
            inner = mine[1] if mine is not None and current[name] is mine[0] else current[name]
            ip = self.ip_processors[name]
            chosen[name] = ip if type(inner) in (AttnProcessor, AttnProcessor2_0) else ImageTermProcessor(inner, ip)
            self.installed[name] = (chosen[name], inner)
        self.unet.set_attn_processor({**current, **chosen})
        self.stale = False

    def needs_install(self) -> bool:
        name, attn = self.layers[0]
        mine = self.installed.get(name)
        return self.stale or mine is None or attn.processor is not mine[0]

    def fraction(self, timestep) -> Optional[float]:
        """Where a call's timestep is in the run's schedule (None when it is not in it)."""
        timesteps = getattr(self.run.scheduler, "timesteps", None)
        if timesteps is None or not len(timesteps):
            return None
        t = torch.as_tensor(timestep).flatten()[0].float().cpu()
        return int(torch.argmin((timesteps.float().cpu() - t).abs())) / len(timesteps)

    def before_forward(self, module, args, kwargs):
        if self.needs_install():
            self.install()
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        windowed = any((a.patch.start, a.patch.end) != (0.0, 1.0) for a in self.adapters)
        fraction = self.fraction(timestep) if windowed else None
        scales = [a.scale_at(fraction) for a in self.adapters]
        for proc in self.ip_processors.values():
            proc.scale = list(scales)
        rows, images = sample.shape[0], int(self.run.latent_shape[0])
        kwargs = dict(kwargs)
        added = dict(kwargs.get("added_cond_kwargs") or {})
        added["image_embeds"] = [a.batch(rows, images) for a in self.adapters]
        kwargs["added_cond_kwargs"] = added
        if any(a.mask is not None for a in self.adapters):
            cross = dict(kwargs.get("cross_attention_kwargs") or {})
            cross["ip_adapter_masks"] = [a.mask for a in self.adapters]
            kwargs["cross_attention_kwargs"] = cross
        return args, kwargs

    def restore(self) -> None:
        self.handle.remove()
        # the projection first: a Plus resampler's own attention layers count among attn_processors
        self.unet.encoder_hid_proj = self.saved_projection
        self.unet.config.encoder_hid_dim_type = self.saved_type
        self.unet.set_attn_processor(self.saved_processors)


class ImageTermProcessor:
    """Another cross-attention processor (a layout patch's) plus the IP-Adapter's image term.

    Written out because IPAdapterAttnProcessor2_0 computes the text attention itself and has no
    hook for another processor's: the image term is the processor's sum of scale x (masked)
    attention to each adapter's tokens, taken through the layer's output projection without its
    bias (the text output already has it), so the output is the inner processor's plus that."""

    def __init__(self, inner, ip):
        self.inner = inner
        self.ip = ip

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ip_adapter_masks=None):
        images = None
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states, images = encoder_hidden_states
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if images is None:
            return out
        term = image_term(attn, self.ip, hidden_states, images, temb, ip_adapter_masks)
        return out if term is None else out + term


def image_term(attn, ip, hidden_states, images: list, temb=None, masks=None) -> Optional[torch.Tensor]:
    """What IPAdapterAttnProcessor2_0 adds for the image tokens, as the layer's output (None
    when every scale is 0), with the same steps and mask downsampling."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    from kernels.attention import attention_input

    x, spatial = attention_input(attn, hidden_states, temb)
    if attn.group_norm is not None:
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
    b = x.shape[0]
    query = attn.head_to_batch_dim(attn.to_q(x), out_dim=4)
    heads, head_dim = query.shape[1], query.shape[-1]
    masks = masks if masks is not None else [None] * len(images)
    total = None
    for states, scale, to_k, to_v, mask in zip(images, ip.scale, ip.to_k_ip, ip.to_v_ip, masks):
        if scale == 0:
            continue
        groups = [states] if mask is None else [states[:, i] for i in range(mask.shape[1])]
        for i, group in enumerate(groups):
            key = to_k(group).view(b, -1, heads, head_dim).transpose(1, 2)
            value = to_v(group).view(b, -1, heads, head_dim).transpose(1, 2)
            part = F.scaled_dot_product_attention(query, key, value).transpose(1, 2).reshape(b, -1, heads * head_dim)
            if mask is not None:
                down = IPAdapterMaskProcessor.downsample(mask[:, i], b, part.shape[1], part.shape[2])
                part = part * down.to(part.device, part.dtype)
            total = scale * part if total is None else total + scale * part
    if total is None:
        return None
    term = F.linear(total.to(query.dtype), attn.to_out[0].weight)
    if spatial is not None:
        term = term.transpose(-1, -2).reshape(*spatial)
    return term / attn.rescale_output_factor


def ip_adapter_patch(adapter: IPAdapter, unet, images: torch.Tensor, scale: float,
                     mask: Optional[torch.Tensor] = None, start: float = 0.0, end: float = 1.0) -> IPAdapterPatch:
    """An IP-Adapter patch of `images` (NHWC in 0..1, one adapter: several images are several
    image prompts of it) for `unet`, everything checked and the image encoded now."""
    check_unet_fits(adapter.weights, unet)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise IPAdapterError(f"the image must be (N, H, W, 3), got shape {tuple(images.shape)}")
    masks = prepare_mask(mask, images.shape[0])
    projection = build_projection(adapter.weights, unet)
    embeds, negative = encode_images(adapter, images)
    return IPAdapterPatch(adapter, projection, embeds, negative, scale, masks, start, end,
                          image_key=content_hash(images))
