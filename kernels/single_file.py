"""Single-file checkpoints (`.safetensors`) to MODEL / CLIP / VAE bundles, offline.

A file's family is told from its tensor names (kernels.model_folders.family_from_keys); the
modules are built from a config folder (kernels.model_configs: the shipped skeleton of that
family, or the caller's folder) and filled by diffusers' own single-file converters
(`from_single_file` with a state dict and a local `config=`, and its CLIP/T5 helpers), so the
key layouts read are exactly those diffusers reads: the original LDM/SGM layouts of SD 1.x/2.x
and SDXL (with CLIP and VAE inside), SD3 files as Stability publishes them (text encoders and
VAE inside or not) and FLUX transformer files (the text encoders and VAE as separate files).

Tensors are read with safetensors (never unpickled), one component at a time, so a component's
tensors are freed once its module holds them.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Optional

import torch

from kernels.hashing import key_of
from kernels.model_configs import ConfigError, ConfigSource, load_tokenizer
from kernels.model_folders import family_from_keys
from kernels.models import (
    ModelBundle,
    ModelLoadError,
    TextEncoderBundle,
    VaeBundle,
    build_vae_bundle,
    model_folder_key,
    quiet_hub_libraries,
)

UNET_FAMILIES = ("sd1", "sd2", "sdxl")
DENOISER_PREFIX = "model.diffusion_model."
# Where each component of a family's single file lives (prefixes of its tensor names).
TEXT_PREFIXES = {
    "sd1": {"text_encoder": "cond_stage_model.transformer."},
    "sd2": {"text_encoder": "cond_stage_model.model."},
    "sdxl": {"text_encoder": "conditioner.embedders.0.transformer.",
             "text_encoder_2": "conditioner.embedders.1.model."},
    "sd3": {"text_encoder": "text_encoders.clip_l.transformer.",
            "text_encoder_2": "text_encoders.clip_g.transformer.",
            "text_encoder_3": "text_encoders.t5xxl.transformer."},
    "flux": {"text_encoder": "text_encoders.clip_l.transformer.",
             "text_encoder_2": "text_encoders.t5xxl.transformer."},
}
VAE_PREFIXES = ("first_stage_model.", "vae.")
OTHER_PREFIXES = VAE_PREFIXES + ("text_encoders.", "conditioner.", "cond_stage_model.", "model_ema.")
DENOISER_CLASSES = {"sd1": "UNet2DConditionModel", "sd2": "UNet2DConditionModel",
                    "sdxl": "UNet2DConditionModel", "sd3": "SD3Transformer2DModel",
                    "flux": "FluxTransformer2DModel"}
# The separate text-encoder files each family takes, by role, and the component each fills.
TEXT_ROLES = {"sd1": {"clip_l": "text_encoder"}, "sdxl": {"clip_l": "text_encoder", "clip_g": "text_encoder_2"},
              "sd3": {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"},
              "flux": {"clip_l": "text_encoder", "t5": "text_encoder_2"}}
OPTIONAL_ROLES = {("sd3", "t5")}  # SD3 runs without T5, as diffusers allows
PARTS_NOTE = ("load it with LoadDiffusionModel, its text encoders with LoadTextEncoders and its "
              "VAE with LoadVAE")


# safetensors' dtype names -> torch's
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2}


class SingleFile:
    """An open safetensors file: its tensor names and shapes, from the header (checked by
    safetensors' own reader); tensors on demand. Errors name the file."""

    def __init__(self, path: str):
        import json
        import struct

        from safetensors import SafetensorError, safe_open

        self.path = path
        if not os.path.isfile(path):
            raise ModelLoadError(f"{path}: does not exist")
        try:
            with safe_open(path, framework="pt", device="cpu") as checked:  # validates the layout
                self.keys = list(checked.keys())
                self.metadata = checked.metadata() or {}
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                self._header = json.loads(f.read(length))
            self._data_start = 8 + length
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: not a readable safetensors single-file checkpoint, perhaps "
                                 f"truncated or corrupt ({exc})") from None

    def shape(self, key: str) -> tuple:
        return tuple(self._header[key]["shape"])

    def tensors(self, keep) -> dict[str, torch.Tensor]:
        """The tensors whose names `keep` accepts, each read into fresh memory.

        Read by hand rather than through safetensors' mapped views: a view at its file offset is
        unaligned (the BLAS kernels then round differently and run slower), and copying each view
        would hold the tensor twice, once in the copy and once in the mapped pages.
        """
        out = {}
        try:
            with open(self.path, "rb") as f:
                for key in self.keys:
                    if not keep(key):
                        continue
                    info = self._header[key]
                    begin, end = info["data_offsets"]
                    tensor = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
                    f.seek(self._data_start + begin)
                    if f.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy())) != end - begin:
                        raise OSError("short read")
                    out[key] = tensor
        except (OSError, KeyError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"{self.path}: cannot read its tensors, perhaps truncated or "
                                 f"corrupt ({type(exc).__name__}: {exc})") from None
        return out

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        return self.tensors(lambda k: k.startswith(prefix))

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.keys)

    def family(self) -> str:
        """The family from the tensor names; a UNet-only SD file by its shapes (SDXL's UNet has
        the added embedding; SD 1's cross attention reads 768 features, SD 2's 1024)."""
        family = family_from_keys(self.keys, self.metadata)
        if family == "unknown" and self.has_prefix(DENOISER_PREFIX + "input_blocks."):
            if self.has_prefix(DENOISER_PREFIX + "label_emb."):
                return "sdxl"
            widths = {self.shape(k)[1] for k in self.keys if k.endswith("attn2.to_k.weight")}
            family = {768: "sd1", 1024: "sd2"}.get(next(iter(widths), None), "unknown")
        return family

    def denoiser_tensors(self) -> dict[str, torch.Tensor]:
        """The denoiser's tensors, named without the `model.diffusion_model.` prefix (a bare
        transformer file's: every tensor that is not a VAE's or a text encoder's)."""
        if self.has_prefix(DENOISER_PREFIX):
            return {k[len(DENOISER_PREFIX):]: v for k, v in self.with_prefix(DENOISER_PREFIX).items()}
        return self.tensors(lambda k: not k.startswith(OTHER_PREFIXES))


def open_checkpoint(path: str, families=None) -> tuple[SingleFile, str]:
    """The open file and its family; ModelLoadError for a pickle, a non-safetensors file or a
    family Loomwork does not load."""
    from kernels.model_folders import PICKLE_SUFFIXES

    if path.lower().endswith(PICKLE_SUFFIXES):
        raise ModelLoadError(f"{path}: a pickled checkpoint, which Loomwork never opens (unpickling "
                             f"can run code): convert it to .safetensors with a tool you trust")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path}: a folder; a config folder applies to single files only")
    sf = SingleFile(path)
    family = sf.family()
    if family not in (families or DENOISER_CLASSES):
        what = "a LoRA, not a model" if family == "lora" else f"of family {family!r}"
        raise ModelLoadError(f"{path}: not a checkpoint Loomwork can load ({what}); its tensors "
                             f"are named like {sf.keys[:2]}. Single files of SD 1.x/2.x, SDXL, "
                             f"SD3 and FLUX.1 load")
    return sf, family


def config_source(path: str, family: str, config: Optional[str]) -> ConfigSource:
    source = ConfigSource(family, config or None)
    try:
        source.check(path)
    except ConfigError as exc:
        raise ModelLoadError(str(exc)) from None
    return source


def _file_key(paths, dtype, device, config: Optional[str]) -> str:
    from kernels.files import path_fingerprint

    return key_of(tuple(model_folder_key(p, dtype, device) for p in paths),
                  path_fingerprint(os.path.abspath(config)) if config else None)


def _require_filled(module, path: str, what: str):
    """A module whose every weight the file filled (diffusers leaves missing ones on `meta`)."""
    missing = [n for n, p in module.named_parameters() if p.is_meta]
    if missing:
        raise ModelLoadError(f"{path}: the {what} is incomplete: {len(missing)} weights are "
                             f"missing, e.g. {missing[:2]}")
    return module


def _finish(module, path: str, what: str, device):
    """The module on `device`, for inference (its dtype is set where it is built)."""
    if hasattr(module, "tie_weights"):
        module.tie_weights()  # T5's encoder.embed_tokens is `shared`; files hold it once
    return _require_filled(module, path, what).to(device).eval().requires_grad_(False)


# -- components ----------------------------------------------------------------------------

def _transformer_kwargs(sf: SingleFile, family: str) -> dict:
    """Config values the shipped skeleton cannot know, read from the tensors' names and shapes
    (SD3 medium vs 3.5, FLUX dev vs schnell)."""
    keys = [k[len(DENOISER_PREFIX):] if k.startswith(DENOISER_PREFIX) else k for k in sf.keys]
    def count(block: str) -> int:
        return len({int(m.group(1)) for k in keys if (m := re.match(block + r"\.(\d+)\.", k))})
    if family == "flux":
        return {"num_layers": count("double_blocks"), "num_single_layers": count("single_blocks"),
                "guidance_embeds": any(k.startswith("guidance_in.") for k in keys)}
    prefix = DENOISER_PREFIX if sf.has_prefix(DENOISER_PREFIX) else ""
    width = sf.shape(prefix + "x_embedder.proj.weight")[0]
    out = {"num_layers": count("joint_blocks"), "num_attention_heads": width // 64,
           "caption_projection_dim": width, "pos_embed_max_size": int(math.isqrt(sf.shape(prefix + "pos_embed")[1]))}
    if any(".attn.ln_q." in k for k in keys):
        out["qk_norm"] = "rms_norm"
    dual = sorted({int(m.group(1)) for k in keys if (m := re.match(r"joint_blocks\.(\d+)\.x_block\.attn2\.", k))})
    if dual:
        out["dual_attention_layers"] = tuple(dual)
    return out


def load_denoiser(sf: SingleFile, family: str, source: ConfigSource, dtype, device):
    import diffusers

    name = "unet" if family in UNET_FAMILIES else "transformer"
    cls = getattr(diffusers, DENOISER_CLASSES[family])
    tensors = sf.denoiser_tensors()
    if not tensors:
        raise ModelLoadError(f"{sf.path}: holds no {family} denoiser ({name}) weights")
    kwargs = _transformer_kwargs(sf, family) if name == "transformer" and source.root_for(name) == source.shipped else {}
    try:
        # diffusers' UNet converter reads the prefixed names; its transformer ones either
        module = cls.from_single_file({DENOISER_PREFIX + k: v for k, v in tensors.items()}
                                      if name == "unet" else tensors,
                                      config=source.root_for(name), subfolder=name,
                                      local_files_only=True, torch_dtype=dtype, **kwargs)
    except (KeyError, ValueError, RuntimeError, IndexError) as exc:
        raise ModelLoadError(f"{sf.path}: its {family} {name} does not fit the config in "
                             f"{source.root_for(name)} ({type(exc).__name__}: {exc})") from None
    return _finish(module, sf.path, name, device)


def load_vae_tensors(tensors: dict, path: str, source: ConfigSource, dtype, device):
    from diffusers import AutoencoderKL

    try:
        module = AutoencoderKL.from_single_file(tensors, config=source.root_for("vae"), subfolder="vae",
                                                local_files_only=True, torch_dtype=dtype)
    except (KeyError, ValueError, RuntimeError, IndexError) as exc:
        raise ModelLoadError(f"{path}: its VAE does not fit the config in {source.root_for('vae')} "
                             f"({type(exc).__name__}: {exc})") from None
    return _finish(module, path, "VAE", device)


def _file_vae(sf: SingleFile, family: str, source: ConfigSource, dtype, device):
    if not source.has("vae"):
        return None  # a pixel-space model
    prefix = next((p for p in VAE_PREFIXES if sf.has_prefix(p)), None)
    if prefix is None:
        raise ModelLoadError(f"{sf.path}: this {family} file has no VAE inside (no "
                             f"{VAE_PREFIXES[0]}* tensors); {PARTS_NOTE}")
    return load_vae_tensors(sf.with_prefix(prefix), sf.path, source, dtype, device)


def _text_class(source: ConfigSource, name: str):
    import transformers

    spec = source.index().get(name) or []
    cls = getattr(transformers, str(spec[1]), None) if len(spec) == 2 else None
    if cls is None:
        raise ModelLoadError(f"{source.root_for(name)}: model_index.json names no transformers class for {name!r}")
    return cls


def load_text_encoder(sf: SingleFile, family: str, name: str, source: ConfigSource, dtype, device):
    """One text encoder from its prefix in a checkpoint, by diffusers' single-file helpers."""
    from diffusers.loaders.single_file_utils import (
        create_diffusers_clip_model_from_ldm,
        create_diffusers_t5_model_from_checkpoint,
    )

    prefix = TEXT_PREFIXES[family][name]
    tensors = sf.with_prefix(prefix)
    cls = _text_class(source, name)
    make = create_diffusers_t5_model_from_checkpoint if "t5xxl" in prefix else create_diffusers_clip_model_from_ldm
    try:
        module = make(cls, tensors, subfolder=name, config=source.root_for(name), torch_dtype=dtype,
                      local_files_only=True)
    except (KeyError, ValueError, RuntimeError, IndexError, OSError) as exc:
        raise ModelLoadError(f"{sf.path}: its text encoder {prefix}* does not fit the config in "
                             f"{source.root_for(name)} ({type(exc).__name__}: {exc})") from None
    if "clip_l" in prefix and prefix + "text_model.text_projection.weight" not in tensors and \
            prefix + "text_projection.weight" in tensors and hasattr(module, "text_projection"):
        # diffusers puts an identity here; a file that carries CLIP-L's projection keeps it
        module.text_projection.weight.data = tensors[prefix + "text_projection.weight"].to(module.dtype)
    return _finish(module, sf.path, f"text encoder {prefix}*", device)


# -- bundles -------------------------------------------------------------------------------

def text_bundle(family: str, source: ConfigSource, encoders: dict, path: str, load_key: str,
                joint_attention_dim: Optional[int] = None) -> TextEncoderBundle:
    """The family's CLIP bundle from its text encoders (component name -> module) and the config
    folder's tokenizers."""
    from kernels.flux import MAX_T5_LENGTH, FluxTextEncoders, FluxTokenizers
    from kernels.sdxl import SDXLTextEncoders, SDXLTokenizers
    from kernels.text import SD3TextEncoders, SD3Tokenizers

    def tokenizer(name):
        try:
            return load_tokenizer(source, name.replace("text_encoder", "tokenizer"), path)
        except ConfigError as exc:
            raise ModelLoadError(str(exc)) from None

    if family in ("sd1", "sd2"):
        return TextEncoderBundle(tokenizer("text_encoder"), encoders["text_encoder"], path, load_key)
    if family == "sdxl":
        index = source.index()
        return TextEncoderBundle(SDXLTokenizers(tokenizer("text_encoder"), tokenizer("text_encoder_2")),
                                 SDXLTextEncoders(encoders["text_encoder"], encoders["text_encoder_2"],
                                                  bool(index.get("force_zeros_for_empty_prompt", True))),
                                 path, load_key)
    if family == "sd3":
        t5 = encoders.get("text_encoder_3")
        t5_tok = tokenizer("text_encoder_3") if t5 is not None else None
        length = 256 if t5_tok is None else min(256, int(t5_tok.model_max_length))
        return TextEncoderBundle(SD3Tokenizers(tokenizer("text_encoder"), tokenizer("text_encoder_2"), t5_tok, length),
                                 SD3TextEncoders(encoders["text_encoder"], encoders["text_encoder_2"], t5,
                                                 joint_attention_dim or source.config("transformer")["joint_attention_dim"]),
                                 path, load_key)
    t5_tok = tokenizer("text_encoder_2")
    return TextEncoderBundle(FluxTokenizers(tokenizer("text_encoder"), t5_tok,
                                            min(MAX_T5_LENGTH, int(t5_tok.model_max_length))),
                             FluxTextEncoders(encoders["text_encoder"], encoders["text_encoder_2"]), path, load_key)


def model_bundle(family: str, denoiser, source: ConfigSource, path: str, load_key: str,
                 vae_scale_factor: int = 8) -> ModelBundle:
    scheduler = source.scheduler_config()
    if family == "flux" and not denoiser.config.guidance_embeds and source.root_for("scheduler") == source.shipped:
        scheduler = ConfigSource("flux").config("scheduler_schnell")  # schnell: a fixed shift of 1
    if family == "sdxl":
        from kernels.sdxl import SDXLModelBundle

        return SDXLModelBundle(denoiser, scheduler, path, load_key, vae_scale_factor=vae_scale_factor)
    return ModelBundle(denoiser, scheduler, path, load_key)


def load_checkpoint_file(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                         config: Optional[str] = None) -> tuple[ModelBundle, TextEncoderBundle, VaeBundle]:
    """MODEL, CLIP and VAE from one checkpoint file that holds all three. `config` is a folder
    whose subfolders replace the shipped config skeleton's (a tiny test model, a T5 tokenizer)."""
    sf, family = open_checkpoint(path)
    quiet_hub_libraries()
    source = config_source(path, family, config)
    missing = [name for name, prefix in TEXT_PREFIXES[family].items()
               if not sf.has_prefix(prefix) and (family, name) != ("sd3", "text_encoder_3")]
    if missing:
        raise ModelLoadError(f"{path}: a {family} file without its text encoders ({', '.join(missing)} "
                             f"missing: no {TEXT_PREFIXES[family][missing[0]]}* tensors); {PARTS_NOTE}")
    load_key = _file_key([path], dtype, device, config)
    denoiser = load_denoiser(sf, family, source, dtype, device)
    encoders = {name: load_text_encoder(sf, family, name, source, dtype, device)
                for name, prefix in TEXT_PREFIXES[family].items() if sf.has_prefix(prefix)}
    if family == "sd3" and "text_encoder_3" not in encoders:
        encoders["text_encoder_3"] = None
    vae = build_vae_bundle(_file_vae(sf, family, source, dtype, device), path, load_key,
                           denoiser.config.in_channels)
    return (model_bundle(family, denoiser, source, path, load_key, vae.scale_factor),
            text_bundle(family, source, encoders, path, load_key,
                        getattr(denoiser.config, "joint_attention_dim", None)),
            vae)


def load_diffusion_model_file(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                              config: Optional[str] = None) -> ModelBundle:
    """MODEL alone from a file that holds a denoiser (a UNet or transformer file, or a whole
    checkpoint, whose other parts are left unread)."""
    sf, family = open_checkpoint(path)
    quiet_hub_libraries()
    source = config_source(path, family, config)
    denoiser = load_denoiser(sf, family, source, dtype, device)
    # SDXL's time ids are in pixels: the VAE this model is configured with gives the factor
    factor = 2 ** (len(source.config("vae")["block_out_channels"]) - 1) if source.has("vae") else 1
    return model_bundle(family, denoiser, source, path, _file_key([path], dtype, device, config), factor)


def load_vae_file(path: str, family: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                  config: Optional[str] = None) -> VaeBundle:
    """VAE from a VAE file (the original layout, as sdxl_vae.safetensors or FLUX's ae.safetensors,
    or a checkpoint's `first_stage_model.`/`vae.` part) with `family`'s config (its scaling)."""
    from kernels.model_folders import PICKLE_SUFFIXES

    if path.lower().endswith(PICKLE_SUFFIXES):
        raise ModelLoadError(f"{path}: a pickled file, which Loomwork never opens: convert it to .safetensors")
    sf = SingleFile(path)
    source = ConfigSource(family, config or None)
    prefix = next((p for p in VAE_PREFIXES if sf.has_prefix(p)), "")
    tensors = sf.with_prefix(prefix)
    if not any(k.startswith(prefix + "decoder.") for k in tensors):
        raise ModelLoadError(f"{path}: holds no VAE (no decoder.* tensors); its tensors are named like {sf.keys[:2]}")
    latent = sf.shape(prefix + "decoder.conv_in.weight")[1]
    expected = source.config("vae")["latent_channels"]
    if latent != expected:
        raise ModelLoadError(f"{path}: a VAE of {latent} latent channels, but {family}'s has {expected}: "
                             f"choose the family the VAE belongs to")
    vae = load_vae_tensors(tensors, path, source, dtype, device)
    return build_vae_bundle(vae, path, key_of(_file_key([path], dtype, device, config), family), 3)


def load_text_encoder_files(family: str, files: dict[str, str], dtype: torch.dtype = torch.float32,
                            device: str = "cpu", config: Optional[str] = None,
                            load=None) -> TextEncoderBundle:
    """CLIP from separate text-encoder files (transformers' own key layout, as ComfyUI's
    `text_encoders` folder holds them): `files` maps a role (clip_l, clip_g, t5) to its file.
    `load(path, role)` loads one file (the model manager's, so a file shared by graphs loads
    once); by default each loads here, from `config` when given."""
    from kernels.text_encoder_files import fit_to_family, load_text_encoder_file

    roles = TEXT_ROLES.get(family)
    if roles is None:
        raise ModelLoadError(f"separate text-encoder files are loaded for {', '.join(TEXT_ROLES)}, not {family!r}")
    files = {role: path for role, path in files.items() if path}
    extra = sorted(set(files) - set(roles))
    if extra:
        raise ModelLoadError(f"{family} takes no {', '.join(extra)} text encoder (it takes {', '.join(roles)})")
    missing = [r for r in roles if r not in files and (family, r) not in OPTIONAL_ROLES]
    if missing:
        raise ModelLoadError(f"{family} needs the text encoder files {', '.join(missing)} too "
                             f"(given: {', '.join(f'{r}={p}' for r, p in files.items()) or 'none'})")
    source = ConfigSource(family, config or None)
    if load is None:
        def load(path, role):
            return load_text_encoder_file(path, role, dtype, device, config=config,
                                          component=roles[role], family=family)
    quiet_hub_libraries()
    encoders: dict[str, Any] = {roles[r]: fit_to_family(load(files[r], r), r, family, files[r])
                                for r in roles if r in files}
    if family == "sd3":
        encoders.setdefault("text_encoder_3", None)
    ordered = [files[r] for r in roles if r in files]
    return text_bundle(family, source, encoders, ordered[0], _file_key(ordered, dtype, device, config))
