"""Model folders: list the models under one or more roots (a ComfyUI or A1111 install, its
`models` folder, or a plain folder of models) and find one by name.

Standard library only, so the app and the CLI can list models without loading torch. A file's
family is told from its safetensors header (the tensor names) or a diffusers folder's
`model_index.json`; tensors are never loaded and pickles are never opened.
"""

from __future__ import annotations

import difflib
import json
import os
import struct
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Mapping, Optional

KINDS = ("checkpoint", "diffusion_model", "text_encoder", "vae", "lora", "upscale_model",
         "controlnet", "ipadapter", "clip_vision", "diffusers")
# Kinds a LoadModel `ckpt:NAME` is searched in.
CHECKPOINT_KINDS = ("checkpoint", "diffusers")

# Folder name -> kind: ComfyUI's names, then A1111's.
KIND_FOLDERS = {
    "checkpoints": "checkpoint", "diffusion_models": "diffusion_model", "unet": "diffusion_model",
    "clip": "text_encoder", "text_encoders": "text_encoder", "vae": "vae", "loras": "lora",
    "upscale_models": "upscale_model", "controlnet": "controlnet", "ipadapter": "ipadapter",
    "clip_vision": "clip_vision", "diffusers": "diffusers",
    "Stable-diffusion": "checkpoint", "Lora": "lora", "VAE": "vae", "ESRGAN": "upscale_model",
}
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
PICKLE_NOTE = "a pickle: convert it to .safetensors (pickles can run code, so Loomwork never opens them)"

MAX_DEPTH = 4  # folder levels below a kind folder (sdxl/realistic/v2/x.safetensors is 3)
MAX_VISITS = 20000  # directory entries looked at per root, so a root of `/` cannot hang
MAX_HEADER_BYTES = 64 << 20  # a real header is kilobytes to a few megabytes

ENV_VAR = "LOOMWORK_MODELS"


@dataclass(frozen=True)
class ModelEntry:
    name: str  # relative to its kind folder, forward slashes
    kind: str
    path: str
    family: str = "unknown"
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


class ModelNotFound(LookupError):
    """A name that no model folder holds; the message names the folders searched and close matches."""


def roots_from_env(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """The roots in LOOMWORK_MODELS (os.pathsep-separated), `~` expanded, empty parts dropped."""
    text = (os.environ if environ is None else environ).get(ENV_VAR, "")
    return [os.path.expanduser(part) for part in text.split(os.pathsep) if part.strip()]


# -- layouts -------------------------------------------------------------------------------

def kind_folders(root: str) -> list[tuple[str, str]]:
    """(folder, kind) pairs a root holds: ROOT/models/NAME or ROOT/NAME for the known names;
    a root with none of them is a plain folder of checkpoints and diffusers folders."""
    found, seen = [], set()
    for base in (os.path.join(root, "models"), root):
        for folder_name, kind in KIND_FOLDERS.items():
            folder = os.path.join(base, folder_name)
            if not os.path.isdir(folder):
                continue
            real = os.path.realpath(folder)
            if real in seen:  # `vae` and `VAE` on a case-insensitive disk, or a symlink
                continue
            seen.add(real)
            found.append((folder, kind))
    if not found and os.path.isdir(root):
        found.append((root, "checkpoint"))
    return found


# -- scanning ------------------------------------------------------------------------------

def scan(roots: Iterable[str], *, max_depth: int = MAX_DEPTH, max_visits: int = MAX_VISITS) -> list[ModelEntry]:
    """Every model under the roots, in root order, then by kind folder, then by name. Never raises
    for a bad file or an unreadable folder: those are listed or skipped."""
    entries: list[ModelEntry] = []
    for root in roots:
        budget = [max_visits]  # per root: a huge first root does not hide the others' models
        for folder, kind in kind_folders(os.path.expanduser(root)):
            entries.extend(sorted(_scan_kind_folder(folder, kind, max_depth, budget), key=lambda e: e.name))
    return entries


def _scan_kind_folder(folder: str, kind: str, max_depth: int, budget: list[int]) -> Iterator[ModelEntry]:
    pending = [(folder, 0)]
    seen = {os.path.realpath(folder)}
    while pending:
        current, depth = pending.pop()
        try:
            children = sorted(os.scandir(current), key=lambda d: d.name)
        except OSError:
            continue
        for child in children:
            budget[0] -= 1
            if budget[0] < 0:
                return
            if child.name.startswith("."):
                continue
            name = os.path.relpath(child.path, folder).replace(os.sep, "/")
            try:
                is_dir = child.is_dir()
            except OSError:
                continue
            if is_dir:
                component = None if kind in CHECKPOINT_KINDS else component_folder_entry(child.path, name, kind)
                if os.path.isfile(os.path.join(child.path, "model_index.json")):
                    yield ModelEntry(name, "diffusers", child.path, diffusers_family(child.path))
                elif component is not None:
                    yield component
                elif depth + 1 < max_depth:
                    real = os.path.realpath(child.path)
                    if real not in seen:  # a symlink loop would otherwise go round to the depth bound
                        seen.add(real)
                        pending.append((child.path, depth + 1))
                continue
            entry = file_entry(child.path, name, kind)
            if entry is not None:
                yield entry


CROSS_ATTENTION_FAMILIES = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def component_folder_entry(path: str, name: str, kind: str) -> Optional[ModelEntry]:
    """A diffusers/transformers component saved on its own (a ControlNet, VAE or image-encoder
    folder: config.json beside safetensors weights), or None."""
    try:
        has_weights = any(f.lower().endswith(SAFETENSORS_SUFFIXES) for f in os.listdir(path))
    except OSError:
        return None
    config = _read_json(os.path.join(path, "config.json")) if has_weights else None
    if config is None:
        return None
    family = CROSS_ATTENTION_FAMILIES.get(config.get("cross_attention_dim"), "unknown")
    return ModelEntry(name, kind, path, family)


def file_entry(path: str, name: str, kind: str) -> Optional[ModelEntry]:
    """The entry for a weights file, or None for a file that is not weights (a preview, a yaml)."""
    lower = path.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        return ModelEntry(name, kind, path, "pickle", PICKLE_NOTE)
    if not lower.endswith(SAFETENSORS_SUFFIXES):
        return None
    try:
        keys, metadata = read_safetensors_header(path)
    except ValueError as exc:
        return ModelEntry(name, kind, path, "unreadable", str(exc))
    return ModelEntry(name, kind, path, family_from_keys(keys, metadata))


# -- telling the family --------------------------------------------------------------------

def read_safetensors_header(path: str) -> tuple[list[str], dict]:
    """The tensor names and `__metadata__` of a safetensors file, from its header alone (8 bytes
    of little-endian length, then that much JSON). ValueError says what is wrong."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"truncated: {len(head)} bytes, shorter than a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"not a safetensors file: its header would be {length} bytes")
            if 8 + length > size:
                raise ValueError(f"truncated: the header needs {length} bytes but the file has {size - 8}")
            raw = f.read(length)
    except OSError as exc:
        raise ValueError(f"cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    return list(header), metadata if isinstance(metadata, dict) else {}


def family_from_keys(keys: list[str], metadata: Optional[Mapping] = None) -> str:
    """sd1, sd2, sdxl, sd3, flux or lora from tensor names; `unknown` when they say nothing known."""
    def has(fragment: str) -> bool:
        return any(fragment in key for key in keys)

    if any(key.startswith(("lora_unet_", "lora_te")) for key in keys) or has(".lora_A.") or has("lora_down"):
        return "lora"
    if has("joint_blocks."):
        return "sd3"
    if any(key.startswith("double_blocks.") for key in keys) or has("model.diffusion_model.double_blocks"):
        return "flux"
    # transformer files in diffusers' own layout (many fine-tunes are published so)
    if any(key.startswith("single_transformer_blocks.") for key in keys):
        return "flux"
    if "pos_embed.pos_embed" in keys and has(".attn.add_q_proj."):
        return "sd3"
    if has("conditioner.embedders.1"):
        return "sdxl"
    if has("cond_stage_model.model"):
        return "sd2"
    if has("model.diffusion_model.input_blocks") and has("cond_stage_model.transformer"):
        return "sd1"
    return _family_from_metadata(metadata or {})


def _family_from_metadata(metadata: Mapping) -> str:
    # The modelspec convention's architecture string, e.g. "stable-diffusion-xl-v1-base".
    arch = str(metadata.get("modelspec.architecture", "")).lower()
    for fragment, family in (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-3", "sd3"),
                             ("flux", "flux"), ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1")):
        if fragment in arch:
            return family
    return "unknown"


def diffusers_family(folder: str) -> str:
    """A diffusers folder's family from `model_index.json`'s `_class_name` (and, for SD 1/2, the
    unet's cross_attention_dim: 768 is SD 1, 1024 SD 2)."""
    index = _read_json(os.path.join(folder, "model_index.json"))
    if index is None:
        return "unreadable"
    class_name = str(index.get("_class_name", ""))
    for prefix, family in (("StableDiffusionXL", "sdxl"), ("StableDiffusion3", "sd3"), ("Flux", "flux")):
        if class_name.startswith(prefix):
            return family
    if class_name.startswith("StableDiffusion"):
        unet = _read_json(os.path.join(folder, "unet", "config.json")) or {}
        return {768: "sd1", 1024: "sd2"}.get(unet.get("cross_attention_dim"), "sd1/sd2")
    return "unknown"


def _read_json(path: str) -> Optional[dict]:
    try:
        if os.path.getsize(path) > MAX_HEADER_BYTES:
            return None
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# -- finding by name -----------------------------------------------------------------------

def find_model(name: str, roots: Iterable[str], kinds: Iterable[str] = CHECKPOINT_KINDS) -> str:
    """The path of the model called `name` (as `scan` names it; the suffix may be left off) in
    the first root that has it. ModelNotFound names the folders searched and close matches."""
    roots, kinds = list(roots), tuple(kinds)
    clean = name.strip().replace("\\", "/").strip("/")
    folders = [(folder, kind) for root in roots for folder, kind in kind_folders(os.path.expanduser(root))
               if kind in kinds]
    # A direct look first: a graph's every run resolves its paths, and a full scan can be slow.
    # A name stays inside its kind folder: no `..`, no drive.
    if clean and ".." not in clean.split("/") and not os.path.splitdrive(clean)[0]:
        for folder, kind in folders:
            for candidate in (clean,) + tuple(clean + suffix for suffix in SAFETENSORS_SUFFIXES):
                path = os.path.join(folder, *candidate.split("/"))
                if os.path.isfile(path) or os.path.isfile(os.path.join(path, "model_index.json")):
                    return path
                if kind not in CHECKPOINT_KINDS and os.path.isdir(path) and \
                        component_folder_entry(path, clean, kind) is not None:
                    return path
    raise ModelNotFound(_not_found_message(name, roots, folders, kinds))


def _not_found_message(name: str, roots: list[str], folders: list[tuple[str, str]], kinds: tuple) -> str:
    if not roots:
        return (f"no model called {name!r}: no model folders are set "
                f"(set {ENV_VAR} or pass --models DIR)")
    searched = ", ".join(folder for folder, _ in folders) or f"none found under {', '.join(roots)}"
    names = [e.name for e in scan(roots) if e.kind in kinds]
    stems = {n.rsplit(".", 1)[0] if n.lower().endswith(SAFETENSORS_SUFFIXES) else n: n for n in names}
    close = difflib.get_close_matches(name, list(stems), n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join(stems[c] for c in close)}" if close else ""
    return f"no model called {name!r} in the model folders ({searched}){hint}"
