"""LoRA files on MODEL and CLIP: read safely, checked against the model, applied for one run.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models": W + s (alpha / r) B A. The files
people have are read as diffusers reads them: kohya/A1111 (`lora_unet_…`, `lora_te_…`,
`lora_te1_…`/`lora_te2_…` for SDXL's two encoders, each with its `.alpha`), diffusers/PEFT
(`unet.….lora_A.weight`, with diffusers' `lora_adapter_metadata` when the file has it), LyCORIS
LoCon (kohya keys on convolutions) and FLUX LoRAs in diffusers and kohya/BFL spellings. Each
family's diffusers `LoraLoaderMixin` converts the keys (`lora_state_dict`), and loads, scales and
fuses the adapter (`load_lora_into_unet` / `_transformer` / `_text_encoder`, `set_adapters`,
`fuse_lora`, `unload_lora`), so no merge is written here. What is ours: reading only
safetensors (a pickle is refused), checking that every layer of the file is a layer of the model
with the factors' shapes before anything is touched, and putting the module back exactly.

`LoraFilePatch` is a value: the file's path and fingerprint, the model family, the part (the
denoiser or the text encoders) and one strength. Its `applied()` loads the adapter with peft,
fuses it with safe fusing (the merged weights are new tensors; the originals are kept), removes
the peft layers again so the module has its own structure and parameter names during the run
(erasers that swap weights by name, and attention processors, compose with it), and on exit
points every parameter back at its original tensor and undoes the attributes loading set.
Fused rather than unfused: bench/adapters.py measures an unfused step at 1.15x a fused one and the
extra apply cost of fusing at about two steps; fused also keeps the parameter names.
The parsed file is cached per fingerprint (not run state: it is what the file says).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from kernels.files import path_fingerprint
from kernels.hashing import content_hash
from kernels.model_folders import PICKLE_NOTE, PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, read_safetensors_header
from kernels.patching import ModelPatch

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights puts the LoraConfig
PARTS = ("denoiser", "text")
# Module attributes that hold tensors or children: restored through the parameters themselves.
_STRUCTURE_ATTRIBUTES = ("_parameters", "_buffers", "_modules")


class LoraFileError(ValueError):
    """A LoRA file that cannot be applied; the message names the file and what is wrong."""


@dataclass(frozen=True)
class LoraFamily:
    """A model family as diffusers' LoRA loaders see it: the mixin that converts and loads its
    files, the state-dict prefix of its denoiser and those of its text encoders."""

    name: str
    title: str
    mixin: str
    denoiser: str
    text_encoders: tuple[str, ...]


FAMILIES = {f.name: f for f in (
    LoraFamily("sd", "Stable Diffusion 1.x/2.x", "StableDiffusionLoraLoaderMixin", "unet", ("text_encoder",)),
    LoraFamily("sdxl", "Stable Diffusion XL", "StableDiffusionXLLoraLoaderMixin", "unet",
               ("text_encoder", "text_encoder_2")),
    LoraFamily("sd3", "Stable Diffusion 3", "SD3LoraLoaderMixin", "transformer", ("text_encoder", "text_encoder_2")),
    # diffusers' FLUX loader puts text LoRAs on CLIP only (T5 LoRAs are not a FLUX convention)
    LoraFamily("flux", "FLUX.1", "FluxLoraLoaderMixin", "transformer", ("text_encoder",)),
)}


def denoiser_family(denoiser) -> LoraFamily:
    """The LoRA family of a MODEL's denoiser."""
    name = type(denoiser).__name__
    if name == "UNet2DConditionModel":
        return FAMILIES["sdxl" if denoiser.config.get("addition_embed_type") == "text_time" else "sd"]
    if name == "FluxTransformer2DModel":
        return FAMILIES["flux"]
    if name == "SD3Transformer2DModel":
        return FAMILIES["sd3"]
    raise LoraFileError(f"LoRA files apply to SD 1.x/2.x, SDXL, SD3 and FLUX models; this model's denoiser "
                        f"is a {name}")


def text_encoder_family(text_encoder) -> LoraFamily:
    """The LoRA family of a CLIP bundle's text encoder (one module, or a family's encoder set)."""
    from kernels.flux import FluxTextEncoders
    from kernels.sdxl import SDXLTextEncoders
    from kernels.text import SD3TextEncoders, TextEncoderSet

    for cls, family in ((SDXLTextEncoders, "sdxl"), (FluxTextEncoders, "flux"), (SD3TextEncoders, "sd3")):
        if isinstance(text_encoder, cls):
            return FAMILIES[family]
    if isinstance(text_encoder, TextEncoderSet):
        raise LoraFileError(f"LoRA files cannot be applied to a {type(text_encoder).__name__}")
    return FAMILIES["sd"]


def text_encoder_parts(text_encoder, family: LoraFamily) -> list[tuple[str, torch.nn.Module]]:
    """(state-dict prefix, module) of each text encoder a LoRA of `family` may change."""
    if family.name == "sd":
        return [("text_encoder", text_encoder)]
    return [(name, getattr(text_encoder, name)) for name in family.text_encoders
            if getattr(text_encoder, name, None) is not None]


# ---------------------------------------------------------------------------------------------
# reading and converting a file
# ---------------------------------------------------------------------------------------------
def read_lora_file(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and `__metadata__` of a LoRA file. Only safetensors are read: a pickle could
    run code when opened, so it is refused by its suffix before a byte is read."""
    from safetensors.torch import load_file

    low = path.lower()
    if low.endswith(PICKLE_SUFFIXES):
        raise LoraFileError(f"LoRA file {path!r} is {PICKLE_NOTE}")
    if not low.endswith(SAFETENSORS_SUFFIXES):
        raise LoraFileError(f"LoRA file {path!r} is not a .safetensors file; LoRAs are read from safetensors only")
    if not os.path.isfile(path):
        raise LoraFileError(f"LoRA file {path!r} does not exist")
    try:
        _keys, metadata = read_safetensors_header(path)
    except ValueError as exc:
        raise LoraFileError(f"LoRA file {path!r} is {exc}") from None
    try:
        tensors = load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own error types (a truncated data section)
        raise LoraFileError(f"LoRA file {path!r} cannot be read: {exc} (is the file truncated?)") from None
    return tensors, metadata


def _adapter_metadata(path: str, metadata: dict) -> Optional[dict]:
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if raw is None:
        return None
    try:
        parsed = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        raise LoraFileError(f"LoRA file {path!r}: its {ADAPTER_METADATA_KEY} metadata is not JSON") from None
    return parsed if isinstance(parsed, dict) and parsed else None


def _format_problem(path: str, tensors: dict, metadata: dict) -> Optional[str]:
    """Why a file is not a LoRA diffusers can convert, said before its converters fail on it."""
    keys = list(tensors)
    if metadata.get("format") == "loomwork.eraser" and not any("lora" in k for k in keys):
        return "is a Loomwork eraser chain, not a LoRA: load it with LoadEraser"
    for fragment, kind in (("hada_w", "LyCORIS LoHa"), ("lokr_w", "LyCORIS LoKr"), (".diff", "full-weight diff")):
        if any(fragment in k for k in keys):
            return (f"is a {kind} file; diffusers' LoRA converters read LoRA and LoCon files only, so "
                    f"it cannot be applied")
    if not any("lora" in k for k in keys):
        return "has no LoRA tensors (no lora_down/lora_up or lora_A/lora_B keys)"
    return None


@dataclass(frozen=True)
class ParsedLora:
    """A LoRA file in diffusers' layout: prefixed keys ("unet.…", "text_encoder_2.…"), the kohya
    alphas when the file had them, and diffusers' adapter metadata when it had that."""

    path: str
    family: LoraFamily
    state_dict: dict
    network_alphas: Optional[dict]
    adapter_metadata: Optional[dict]

    def part(self, prefix: str) -> dict:
        return {k: v for k, v in self.state_dict.items() if k.startswith(prefix + ".")}

    def prefixes(self) -> set[str]:
        return {k.split(".", 1)[0] for k in self.state_dict}


def _converted(family: LoraFamily, tensors: dict, unet_config: Optional[dict]) -> tuple[dict, Optional[dict]]:
    import diffusers.loaders

    mixin = getattr(diffusers.loaders, family.mixin)
    tensors = dict(tensors)  # the converters pop from the dict they are given
    if family.name == "flux":
        return mixin.lora_state_dict(tensors, return_alphas=True)
    if family.name == "sd3":
        return mixin.lora_state_dict(tensors), None
    kwargs = {"unet_config": unet_config} if family.name == "sdxl" and unet_config else {}
    return mixin.lora_state_dict(tensors, **kwargs)


@functools.lru_cache(maxsize=4)
def _parse_cached(path: str, fingerprint: Any, family_name: str, unet_config_json: Optional[str]) -> ParsedLora:
    family = FAMILIES[family_name]
    tensors, metadata = read_lora_file(path)
    problem = _format_problem(path, tensors, metadata)
    if problem:
        raise LoraFileError(f"LoRA file {path!r} {problem}")
    unet_config = json.loads(unet_config_json) if unet_config_json else None
    try:
        state_dict, alphas = _converted(family, tensors, unet_config)
    except (ValueError, KeyError, RuntimeError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoraFileError(f"LoRA file {path!r}: diffusers cannot convert its keys for a {family.title} "
                            f"model ({first[:200]})") from None
    return ParsedLora(path, family, state_dict, alphas or None, _adapter_metadata(path, metadata))


def parse_lora(path: str, family: LoraFamily, unet_config: Optional[dict] = None) -> ParsedLora:
    """The file converted by `family`'s diffusers loader (cached per file fingerprint). SDXL's
    kohya files name the UNet's blocks in the original layout, which the UNet's config maps."""
    config = json.dumps(dict(unet_config), sort_keys=True, default=str) if unet_config else None
    return _parse_cached(os.path.abspath(path), path_fingerprint(os.path.abspath(path)), family.name, config)


# ---------------------------------------------------------------------------------------------
# checking the fit before anything is touched
# ---------------------------------------------------------------------------------------------
def peft_layer_factors(state: dict, prefix: str, module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A, B)} of one part, with the key conversions diffusers' loaders make."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    state = {k[len(prefix) + 1:]: v for k, v in state.items()}
    if prefix in ("unet", "transformer"):
        if state and "lora_A" not in next(iter(state)):
            state = convert_unet_state_dict_to_peft(state)
    else:
        state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
        if not hasattr(module, "text_model"):  # transformers 5 flattened CLIPTextModel
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
    layers: dict[str, dict] = {}
    for key, value in state.items():
        name, _, rest = key.partition(".lora_")
        if rest.startswith(("A.", "B.")) and rest.endswith("weight"):
            layers.setdefault(name, {})[rest[0]] = value
    return {name: (f.get("A"), f.get("B")) for name, f in layers.items()}


def _layer_problem(name: str, layer, a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[str]:
    if a is None or b is None:
        return f"layer {name} has only one of its two LoRA factors"
    if a.shape[0] != b.shape[1]:
        return f"layer {name}: the factors' ranks differ ({tuple(a.shape)} and {tuple(b.shape)})"
    if isinstance(layer, torch.nn.Linear):
        want_in, want_out = layer.in_features, layer.out_features
    elif isinstance(layer, torch.nn.Conv2d):
        want_in, want_out = layer.in_channels // layer.groups, layer.out_channels
    else:
        return f"layer {name} is a {type(layer).__name__}, which a LoRA cannot change"
    if a.shape[1] != want_in or b.shape[0] != want_out:
        return (f"layer {name} maps {want_in} to {want_out} features but the LoRA's factors are "
                f"{tuple(a.shape)} and {tuple(b.shape)} (rank {a.shape[0]})")
    return None


def check_fits(parsed: ParsedLora, prefix: str, module) -> int:
    """Raise LoraFileError unless every layer of the file's `prefix` part is a layer of `module`
    with the factors' shapes; returns the number of layers. diffusers would only warn about a
    layer it cannot place, and a half-applied LoRA is a silent wrong result."""
    layers = peft_layer_factors(parsed.part(prefix), prefix, module)
    named = dict(module.named_modules())
    missing = [n for n in layers if n not in named]
    what = f"{prefix} layers"
    if missing:
        share = "none" if len(missing) == len(layers) else f"{len(missing)}"
        raise LoraFileError(f"LoRA file {parsed.path!r}: {share} of its {len(layers)} {what} are in this "
                            f"{parsed.family.title} model (e.g. {missing[0]!r} is not): it is a LoRA for "
                            f"another model family or version")
    for name, (a, b) in layers.items():
        problem = _layer_problem(name, named[name], a, b)
        if problem:
            raise LoraFileError(f"LoRA file {parsed.path!r}: {problem}: it is a LoRA for another model "
                                f"family or version")
    return len(layers)


# ---------------------------------------------------------------------------------------------
# applying
# ---------------------------------------------------------------------------------------------
def _plain_attributes(module: torch.nn.Module) -> dict:
    return {k: v for k, v in vars(module).items() if k not in _STRUCTURE_ATTRIBUTES}


def _attribute_changes(saved: list[tuple[torch.nn.Module, dict]]) -> list[tuple[torch.nn.Module, dict, set]]:
    """Which plain attributes of the modules in `saved` differ from their saved values: what
    loading an adapter set (peft_config, flags). Only these are undone, so what the model sets
    lazily during the run itself (transformers installs its output hooks on the first forward,
    and remembers that it did) is left as the model wants it."""
    changes = []
    for module, attrs in saved:
        now = _plain_attributes(module)
        keys = {k for k in set(now) | set(attrs)
                if k not in attrs or k not in now or (now[k] is not attrs[k] and not _same_value(now[k], attrs[k]))}
        if keys:
            changes.append((module, attrs, keys))
    return changes


def _same_value(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # tensors and other values without a plain equality
        return False


def _undo_attributes(changes) -> None:
    for module, attrs, keys in changes:
        for key in keys:
            if key in attrs:
                module.__dict__[key] = attrs[key]
            else:
                module.__dict__.pop(key, None)


def _remove_peft_layers(module: torch.nn.Module) -> None:
    from diffusers.utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) for m in module.modules()):
        recurse_remove_peft_layers(module)


def _load_scale_fuse(family: LoraFamily, prefix: str, module, parsed: ParsedLora, strength: float,
                     name: str, fuse: bool) -> None:
    """diffusers' own steps, as a pipeline's load_lora_weights + set_adapters + fuse_lora take them."""
    import diffusers.loaders
    from diffusers.loaders.lora_base import fuse_text_encoder_lora, set_adapters_for_text_encoder

    mixin = getattr(diffusers.loaders, family.mixin)
    state = parsed.part(prefix)
    metadata = None if parsed.network_alphas else parsed.adapter_metadata
    if prefix == family.denoiser:
        load = mixin.load_lora_into_unet if prefix == "unet" else mixin.load_lora_into_transformer
        load(state, parsed.network_alphas, module, adapter_name=name, metadata=metadata)
        module.set_adapters([name], weights=[strength])
        if fuse:
            module.fuse_lora(safe_fusing=True, adapter_names=[name])
    else:
        mixin.load_lora_into_text_encoder(state, parsed.network_alphas, module, prefix=prefix,
                                          adapter_name=name, metadata=metadata)
        set_adapters_for_text_encoder([name], module, [strength])
        if fuse:
            fuse_text_encoder_lora(module, safe_fusing=True, adapter_names=[name])


@contextlib.contextmanager
def attached_lora(module: torch.nn.Module, prefix: str, parsed: ParsedLora, strength: float, *,
                  fuse: bool = True) -> Iterator[None]:
    """`parsed`'s `prefix` part on `module` at `strength` while the block runs; on exit every
    parameter is its original tensor again and the module its own structure and attributes.

    fuse: the weights are merged (safe fusing: into new tensors) and the peft layers removed
    before the block runs; otherwise the peft layers run beside the weights (unfused), which
    stacks on no other adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) for m in module.modules()):
        raise RuntimeError(f"{type(module).__name__} already carries peft layers; a LoRA patch expects the "
                           f"model as it was loaded")
    originals = {n: p.data for n, p in module.named_parameters()}
    saved = [(m, _plain_attributes(m)) for m in module.modules()]
    changes = None
    try:
        _load_scale_fuse(parsed.family, prefix, module, parsed, strength, "loomwork_lora", fuse)
        if fuse:  # the merged tensors stay in the parameters; the module is its own again
            _remove_peft_layers(module)
        changes = _attribute_changes(saved)
        if fuse:
            _undo_attributes(changes)
        yield
    finally:
        _remove_peft_layers(module)
        _undo_attributes(_attribute_changes(saved) if changes is None else changes)
        for n, p in module.named_parameters():
            p.data = originals[n]


class LoraFilePatch(ModelPatch):
    """A LoRA file on one part of a model (`denoiser`: MODEL; `text`: CLIP's encoders) at one
    strength. A value: path, fingerprint, family, part and strength never change."""

    kind = "lora-file"

    def __init__(self, path: str, family: LoraFamily, part: str, strength: float = 1.0,
                 fingerprint: Any = None):
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        self.path = os.path.abspath(path)
        self.family = family
        self.part = part
        self.strength = float(strength)
        self.fingerprint = path_fingerprint(self.path) if fingerprint is None else fingerprint
        self._key = f"{self.kind}:{content_hash(self.fingerprint, family.name, part, self.strength)}"

    def cache_key(self) -> str:
        return self._key

    def describe(self) -> str:
        return f"LoRA {os.path.basename(self.path)} ({self.part}, {self.strength:g})"

    def targets(self, module) -> list[tuple[str, torch.nn.Module]]:
        if self.part == "denoiser":
            return [(self.family.denoiser, module)]
        return text_encoder_parts(module, self.family)

    def parsed(self, module) -> ParsedLora:
        if path_fingerprint(self.path) != self.fingerprint:
            raise LoraFileError(f"LoRA file {self.path!r} changed since it was read; run the graph again")
        config = module.config if self.part == "denoiser" and self.family.name == "sdxl" else None
        return parse_lora(self.path, self.family, config)

    @contextlib.contextmanager
    def applied(self, module, run):
        if self.strength == 0.0:  # not even loaded: the module is untouched
            yield
            return
        parsed = self.parsed(module)
        with contextlib.ExitStack() as stack:
            for prefix, target in self.targets(module):
                if parsed.part(prefix):
                    stack.enter_context(attached_lora(target, prefix, parsed, self.strength))
            yield


def lora_patches(path: str, denoiser, text_encoder, strength_model: float,
                 strength_clip: float) -> tuple[Optional[LoraFilePatch], Optional[LoraFilePatch]]:
    """(MODEL patch, CLIP patch) of a LoRA file, each None where the file has nothing for that
    part or its strength is 0. Everything is checked here, before a run touches the model: the
    file is a readable safetensors LoRA, for this model's family, every layer fits."""
    family = denoiser_family(denoiser)
    if text_encoder is not None and text_encoder_family(text_encoder) is not family:
        raise LoraFileError(f"the MODEL is {family.title} but the CLIP is "
                            f"{text_encoder_family(text_encoder).title}: connect one model's pair")
    parsed = parse_lora(path, family, denoiser.config if family.name == "sdxl" else None)
    fingerprint = path_fingerprint(os.path.abspath(path))
    parts = [(family.denoiser, denoiser)]
    if text_encoder is not None:
        parts += text_encoder_parts(text_encoder, family)
    present = parsed.prefixes()
    if not present & {prefix for prefix, _ in parts}:
        found = ", ".join(sorted(present)) or "nothing"
        raise LoraFileError(f"LoRA file {path!r} matches nothing in this {family.title} model (its layers are "
                            f"for: {found}): it is a LoRA for another model family")
    for prefix, module in parts:
        if prefix in present:
            check_fits(parsed, prefix, module)
    text_present = any(prefix in present for prefix, _ in parts[1:])
    model_patch = clip_patch = None
    if family.denoiser in present and strength_model != 0.0:
        model_patch = LoraFilePatch(path, family, "denoiser", strength_model, fingerprint)
    if text_present and strength_clip != 0.0:
        clip_patch = LoraFilePatch(path, family, "text", strength_clip, fingerprint)
    return model_patch, clip_patch
