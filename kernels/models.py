"""Model bundles and the loader for diffusers-layout folders (offline, safetensors only).

A folder is read through its `model_index.json`; each component is loaded by its declared
diffusers/transformers class with `from_pretrained(subfolder=...)`. A folder with no `vae`
(or `"vae": [null, null]`) is a pixel-space model, as DeepFloyd IF is in diffusers: its VAE is
the identity, so graphs treat every model alike.

Stable Diffusion 3 folders (`_class_name` StableDiffusion3Pipeline) load into the same three
bundles: MODEL's `unet` is the SD3Transformer2DModel (the attribute keeps its name: it is "the
denoiser" everywhere), and CLIP carries the three text encoders and tokenizers
(kernels.text.SD3TextEncoders / SD3Tokenizers). T5 may be absent (`[null, null]`), as diffusers
allows. Stable Diffusion XL folders load the same way (kernels.sdxl); FLUX text-to-image
folders (FluxPipeline) load through kernels.flux; other FLUX pipelines (Fill, Kontext, ...) are
refused with a clear message.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F

from kernels.files import path_fingerprint
from kernels.hashing import key_of
from kernels.model_folders import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES

# A pixel-space folder's model_index.json key: the space-to-depth factor of its latents.
PIXEL_SHUFFLE_KEY = "_pixel_shuffle"
# Components a text-to-image folder may name that sampling never uses.
IGNORED_COMPONENTS = {"safety_checker", "feature_extractor", "image_encoder", "requires_safety_checker"}
SUPPORTED_COMPONENTS = {"unet", "text_encoder", "tokenizer", "scheduler", "vae"}
SD3_COMPONENTS = {"transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                  "tokenizer_2", "tokenizer_3", "scheduler", "vae"}
SD3_PIPELINES = {"StableDiffusion3Pipeline"}
SDXL_PIPELINES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"}  # base, refiner


class ModelLoadError(RuntimeError):
    """A model folder that cannot be loaded; the message names the folder and what is wrong."""


@dataclass(frozen=True)
class ModelBundle:
    """MODEL: the denoiser and its scheduler config. Patches are recorded, never done in place."""

    unet: Any
    scheduler_config: dict
    source: str
    load_key: str
    patches: tuple = ()  # kernels.patching.ModelPatch, applied in order
    pixel_shuffle: int = 1  # a pixel-space model's space-to-depth factor (VaeBundle.pixel_shuffle)

    @property
    def is_flow(self) -> bool:
        from kernels.sampling import is_flow_config  # diffusers' schedulers load only when asked

        return is_flow_config(self.scheduler_config)

    @property
    def in_channels(self) -> int:
        """The latent channels the denoiser takes (FLUX's transformer sees 2x2 patches of them)."""
        from kernels.flux import latent_channels_of  # FLUX's loads only when asked

        return latent_channels_of(self.unet)

    def with_patch(self, patch) -> "ModelBundle":
        return replace(self, patches=self.patches + (patch,))

    def content_key(self) -> str:
        return key_of("MODEL", self.load_key, tuple(p.cache_key() for p in self.patches))


@dataclass(frozen=True)
class TextEncoderBundle:
    """CLIP: a tokenizer and its text encoder."""

    tokenizer: Any
    text_encoder: Any
    source: str
    load_key: str
    patches: tuple = ()  # kernels.patching.ModelPatch, applied in order

    def with_patch(self, patch) -> "TextEncoderBundle":
        return replace(self, patches=self.patches + (patch,))

    def content_key(self) -> str:
        return key_of("CLIP", self.load_key, tuple(p.cache_key() for p in self.patches))


@dataclass(frozen=True)
class VaeBundle:
    """VAE: latents <-> images in -1..1 (NCHW). `vae=None` is the identity of pixel-space models."""

    vae: Any
    source: str
    load_key: str
    latent_channels: int = 3
    scale_factor: int = 1
    # latent pixels the denoiser takes as one token (SD3 and FLUX transformers: 2), so image sizes
    # must be multiples of scale_factor * patch_size
    patch_size: int = 1
    # pixel-space models only: the denoiser works on the image folded space-to-depth by this
    # factor (each r x r block of pixels is one latent pixel of 3*r*r channels), so a 64 px
    # model costs what a 32 px one does; encode and decode are exact inverses
    pixel_shuffle: int = 1

    @property
    def size_multiple(self) -> int:
        return self.scale_factor * self.patch_size

    def content_key(self) -> str:
        return key_of("VAE", self.load_key)

    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None,
               tile_size: Optional[int] = None) -> torch.Tensor:
        """`tile_size` (pixels): encode an image larger than that tile by tile (diffusers' tiling)."""
        if self.vae is None:
            return images if self.pixel_shuffle == 1 else F.pixel_unshuffle(images, self.pixel_shuffle)
        from kernels.upscale.vae_tiling import vae_tiling

        cfg = self.vae.config
        with vae_tiling(self.vae, tile_size, self.scale_factor):
            dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        latents = dist.mode()
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return (latents - shift) * cfg.scaling_factor

    def decode(self, latents: torch.Tensor, tile_size: Optional[int] = None) -> torch.Tensor:
        """`tile_size` (pixels): decode a latent whose image is larger than that tile by tile."""
        if self.vae is None:
            return latents if self.pixel_shuffle == 1 else F.pixel_shuffle(latents, self.pixel_shuffle)
        from kernels.upscale.vae_tiling import vae_tiling

        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        with vae_tiling(self.vae, tile_size, self.scale_factor):
            return self.vae.decode(latents.to(self.vae.dtype) / cfg.scaling_factor + shift).sample


def latent_preview(latents: torch.Tensor, pixel_shuffle: int = 1) -> torch.Tensor:
    """A cheap RGB preview (NCHW in -1..1) of a latent, without running any decoder.

    Three channels are taken as pixels (pixel-space models, unfolded first when they fold their
    pixels); otherwise the first three channels are stretched to the full range, which shows
    composition well enough while sampling.
    """
    x = latents.detach().float()
    if pixel_shuffle > 1:
        x = F.pixel_shuffle(x, pixel_shuffle)
    if x.shape[1] == 3:
        return x.clamp(-1, 1)
    x = x[:, :3]
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1


def model_folder_key(path: str, dtype, device: str) -> str:
    """What a loaded model is, for the keys of its bundles: the folder's files (any change on
    disk gives a new key), the dtype and the device."""
    return key_of(path_fingerprint(os.path.abspath(path)), str(dtype), device)


def _component_class(library: str, class_name: str, folder: str, name: str):
    # Only classes of the two libraries, looked up by name: a model folder is data, never code.
    import diffusers
    import transformers

    if library == "diffusers":
        import diffusers as lib
    elif library == "transformers":
        import transformers as lib
    else:
        raise ModelLoadError(f"{folder}: component {name!r} comes from {library!r}; only diffusers "
                             f"and transformers components can be loaded")
    cls = getattr(lib, class_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ModelLoadError(f"{folder}: component {name!r} names class {class_name!r}, which "
                             f"{library} does not have")
    # A model or a tokenizer only: a pipeline class could run a .py file from the folder.
    if not (isinstance(cls, type) and issubclass(cls, (diffusers.ModelMixin, transformers.PreTrainedModel,
                                                         transformers.PreTrainedTokenizerBase))):
        raise ModelLoadError(f"{folder}: component {name!r} names {class_name!r}, which is not a "
                             f"model or tokenizer class")
    return cls


def refuse_pickled_weights(sub: str) -> None:
    """A component folder whose weights are only pickles is refused before a library sees it."""
    files = os.listdir(sub)
    pickles = sorted(f for f in files if f.lower().endswith(PICKLE_SUFFIXES))
    if pickles and not any(f.lower().endswith(SAFETENSORS_SUFFIXES) for f in files):
        raise ModelLoadError(f"{sub}: its weights are pickles ({', '.join(pickles[:3])}), which Loomwork "
                             f"never opens (unpickling can run code): convert them to .safetensors")


def _not_a_folder(path: str) -> str:
    """Why `path` cannot be loaded as a model folder, in words that say what to do."""
    if not os.path.exists(path):
        return "does not exist"
    if path.lower().endswith(PICKLE_SUFFIXES):
        return ("is a pickled checkpoint, which Loomwork never opens (unpickling can run code): "
                "convert it to a diffusers folder or .safetensors with a tool you trust")
    return "is a file; LoadModel takes a diffusers model folder or a .safetensors checkpoint"


def read_model_index(path: str) -> dict:
    if not os.path.isdir(path):
        raise ModelLoadError(f"model folder {path!r} {_not_a_folder(path)}")
    index_path = os.path.join(path, "model_index.json")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no model_index.json; is this a diffusers model folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{index_path}: not valid JSON ({exc})") from None
    if not isinstance(index, dict):
        raise ModelLoadError(f"{index_path}: should be a JSON object")
    return index


def quiet_hub_libraries() -> None:
    # Their per-shard progress bars would interleave with ours on the terminal.
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def load_components(path: str, index: dict, names, dtype: torch.dtype, device: str) -> dict[str, Any]:
    """Load the listed components that the index names (a `[null, null]` entry is skipped)."""
    parts: dict[str, Any] = {}
    for name in names:
        spec = index.get(name)
        if not spec or spec == [None, None]:
            continue
        if not (isinstance(spec, list) and len(spec) == 2 and all(isinstance(s, str) for s in spec)):
            raise ModelLoadError(f"{path}: model_index.json entry {name!r} should be [library, class]")
        cls = _component_class(spec[0], spec[1], path, name)
        sub = os.path.join(path, name)
        if not os.path.isdir(sub):
            raise ModelLoadError(f"{path}: model_index.json lists {name!r} but the folder {sub!r} is missing")
        # By its class, not its slot's name: a model class in the tokenizer slot loads weights too.
        import transformers

        is_tokenizer = issubclass(cls, transformers.PreTrainedTokenizerBase)
        kwargs: dict[str, Any] = {"subfolder": name, "local_files_only": True}
        if not is_tokenizer:
            # safetensors only: pickled weights are never unpickled freely.
            refuse_pickled_weights(sub)
            kwargs.update(use_safetensors=True, torch_dtype=dtype)
        try:
            module = cls.from_pretrained(path, **kwargs)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise ModelLoadError(f"{sub}: cannot load {spec[1]}: {exc}") from None
        if not is_tokenizer:
            module = module.to(device).eval().requires_grad_(False)
        parts[name] = module
    return parts


def read_scheduler_config(path: str) -> dict:
    sched_path = os.path.join(path, "scheduler", "scheduler_config.json")
    try:
        with open(sched_path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{sched_path}: cannot read the scheduler config ({exc})") from None


def build_vae_bundle(vae, path: str, load_key: str, pixel_channels: int, patch_size: int = 1,
                     pixel_shuffle: int = 1) -> VaeBundle:
    if vae is None:
        return VaeBundle(None, path, load_key, latent_channels=pixel_channels, scale_factor=pixel_shuffle,
                         patch_size=patch_size, pixel_shuffle=pixel_shuffle)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return VaeBundle(vae, path, load_key, latent_channels=vae.config.latent_channels, scale_factor=factor,
                     patch_size=patch_size)


def declared_pixel_shuffle(index: dict, path: str, in_channels: int, has_vae: bool) -> int:
    """The `_pixel_shuffle` factor a pixel-space folder declares (1 when it declares none)."""
    factor = index.get(PIXEL_SHUFFLE_KEY, 1)
    if factor == 1:
        return 1
    if not isinstance(factor, int) or isinstance(factor, bool) or not 1 < factor <= 8:
        raise ModelLoadError(f"{path}: model_index.json {PIXEL_SHUFFLE_KEY} should be a whole number "
                             f"from 1 to 8, not {factor!r}")
    if has_vae:
        raise ModelLoadError(f"{path}: model_index.json declares {PIXEL_SHUFFLE_KEY} and a VAE; "
                             f"only a pixel-space model (no VAE) folds its pixels")
    if in_channels != 3 * factor * factor:
        raise ModelLoadError(f"{path}: {PIXEL_SHUFFLE_KEY} {factor} needs a UNet of {3 * factor * factor} "
                             f"input channels, but its UNet takes {in_channels}")
    return factor


def check_components(path: str, index: dict, supported: set, what: str) -> None:
    unknown = {k for k in index if not k.startswith("_")} - supported - IGNORED_COMPONENTS
    if unknown:
        raise ModelLoadError(f"{path}: components {sorted(unknown)} are not supported yet ({what})")


def load_model_folder(path: str, dtype: torch.dtype = torch.float32,
                      device: str = "cpu") -> tuple[ModelBundle, TextEncoderBundle, VaeBundle]:
    """Load MODEL, CLIP and VAE from a diffusers folder, or from a `.safetensors` single-file
    checkpoint (kernels.single_file). Nothing is fetched from a hub."""
    if os.path.isfile(path) and path.lower().endswith(SAFETENSORS_SUFFIXES):
        from kernels.single_file import load_checkpoint_file  # lazily: it builds on this module

        return load_checkpoint_file(path, dtype, device)
    index = read_model_index(path)
    quiet_hub_libraries()
    pipeline = str(index.get("_class_name", ""))
    if pipeline.startswith("Flux"):
        return _load_flux_folder(path, index, pipeline, dtype, device)
    if pipeline in SD3_PIPELINES:
        return _load_sd3_folder(path, index, dtype, device)
    if pipeline in SDXL_PIPELINES:
        from kernels.sdxl import load_sdxl_folder  # lazily: kernels.sdxl builds on this module

        return load_sdxl_folder(path, index, dtype, device)
    check_components(path, index, SUPPORTED_COMPONENTS,
                      "Loomwork loads UNet text-to-image folders: SD 1.x/2.x and pixel-space "
                      "models, and SD3 folders")
    load_key = model_folder_key(path, dtype, device)
    parts = load_components(path, index, ("unet", "text_encoder", "tokenizer", "vae"), dtype, device)
    for required in ("unet", "text_encoder", "tokenizer"):
        if required not in parts:
            raise ModelLoadError(f"{path}: model_index.json has no {required!r} component")
    scheduler_config = read_scheduler_config(path)
    in_channels = parts["unet"].config.in_channels
    shuffle = declared_pixel_shuffle(index, path, in_channels, has_vae="vae" in parts)
    vae = build_vae_bundle(parts.get("vae"), path, load_key, in_channels, pixel_shuffle=shuffle)
    return (ModelBundle(parts["unet"], scheduler_config, path, load_key, pixel_shuffle=shuffle),
            TextEncoderBundle(parts["tokenizer"], parts["text_encoder"], path, load_key),
            vae)


def _load_sd3_folder(path: str, index: dict, dtype: torch.dtype,
                     device: str) -> tuple[ModelBundle, TextEncoderBundle, VaeBundle]:
    """An SD3 folder: the MM-DiT as MODEL, CLIP-L + CLIP-G (+ T5) as CLIP."""
    from kernels.text import SD3TextEncoders, SD3Tokenizers

    check_components(path, index, SD3_COMPONENTS, "an SD3 folder has transformer, vae, "
                      "scheduler, text_encoder(_2, _3) and tokenizer(_2, _3)")
    load_key = model_folder_key(path, dtype, device)
    parts = load_components(path, index, sorted(SD3_COMPONENTS - {"scheduler"}), dtype, device)
    for required in ("transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        if required not in parts:
            raise ModelLoadError(f"{path}: model_index.json has no {required!r} component")
    if ("text_encoder_3" in parts) != ("tokenizer_3" in parts):
        raise ModelLoadError(f"{path}: text_encoder_3 (T5) and tokenizer_3 come together or not at all")
    scheduler_config = read_scheduler_config(path)
    transformer = parts["transformer"]
    t5_tok = parts.get("tokenizer_3")
    t5_length = 256 if t5_tok is None else min(256, int(t5_tok.model_max_length))
    encoders = SD3TextEncoders(parts["text_encoder"], parts["text_encoder_2"],
                               parts.get("text_encoder_3"), transformer.config.joint_attention_dim)
    tokenizers = SD3Tokenizers(parts["tokenizer"], parts["tokenizer_2"], t5_tok, t5_length)
    return (ModelBundle(transformer, scheduler_config, path, load_key),
            TextEncoderBundle(tokenizers, encoders, path, load_key),
            build_vae_bundle(parts.get("vae"), path, load_key, transformer.config.in_channels,
                             patch_size=transformer.config.patch_size))


def _load_flux_folder(path: str, index: dict, pipeline: str, dtype: torch.dtype,
                      device: str) -> tuple[ModelBundle, TextEncoderBundle, VaeBundle]:
    from kernels.flux import FLUX_PIPELINES, load_flux_folder

    if pipeline not in FLUX_PIPELINES:
        raise ModelLoadError(f"{path}: a {pipeline} folder; of the FLUX pipelines Loomwork loads "
                             f"only text-to-image folders ({', '.join(sorted(FLUX_PIPELINES))})")
    return load_flux_folder(path, index, dtype, device)
