"""Eraser files: the patches of a chain saved to one safetensors file, and read back.

An eraser that is one LoRA (ESD, All-but-One) is saved as an ordinary kohya LoRA file
(`lora_unet_<layer>.lora_down.weight` / `.lora_up.weight` / `.alpha`, with the eraser's strength
in the alpha), so LoadLoRA, ComfyUI and A1111 load it as they load any LoRA; Loomwork's own
fields ride along in the metadata. Any other chain (weight deltas, membranes, guidance, several
erasers) has no standard form: its tensors are stored under "<i>:<field>..." for the i-th patch.
The patches' kinds and plain fields go in the safetensors metadata as JSON, so loading unpickles
nothing. Version 1 files (the "<i>:" layout for every chain) still load.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch

from kernels.files import atomic_write

from .guidance import SafeGuidancePatch
from .membrane import MembranePatch
from .patches import EraserPatch, LoraPatch, WeightDeltaPatch

FORMAT = "loomwork.eraser"
VERSION = "2"
READABLE_VERSIONS = ("1", "2")
KOHYA_UNET_PREFIX = "lora_unet_"

PATCH_KINDS: dict[str, type[EraserPatch]] = {
    c.kind: c for c in (WeightDeltaPatch, LoraPatch, MembranePatch, SafeGuidancePatch)}


class EraserFileError(ValueError):
    pass


def default_eraser_dir() -> str:
    """Where erasers are saved unless a folder is given: $LOOMWORK_ERASER_DIR, else "erasers" in
    the user's data folder (platformdirs, as the rest of the app)."""
    env = os.environ.get("LOOMWORK_ERASER_DIR")
    if env:
        return env
    import platformdirs

    return os.path.join(platformdirs.user_data_dir("loomwork", appauthor=False), "erasers")


def kohya_lora_name(parameter: str) -> str:
    """A UNet parameter's kohya LoRA name: `lora_unet_` and the layer's path with `_` for `.`."""
    return KOHYA_UNET_PREFIX + parameter.removesuffix(".weight").replace(".", "_")


def is_plain_lora(patches: Sequence[EraserPatch]) -> bool:
    """A chain that is one LoRA eraser, which a standard LoRA file holds exactly."""
    return len(patches) == 1 and type(patches[0]) is LoraPatch and patches[0].target == "unet"


def kohya_lora_tensors(patch: LoraPatch) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The kohya LoRA tensors of a LoRA eraser (alpha = scale x rank x strength, so the file
    alone has the eraser's effect at multiplier 1) and {kohya name: parameter name}."""
    tensors, names = {}, {}
    for parameter, (a, b) in patch.loras.items():
        name = kohya_lora_name(parameter)
        tensors[f"{name}.lora_down.weight"] = a
        tensors[f"{name}.lora_up.weight"] = b
        tensors[f"{name}.alpha"] = torch.tensor(patch.scale * a.shape[0] * patch.strength, dtype=torch.float32)
        names[name] = parameter
    return tensors, names


def save_erasers(path: str, patches: Sequence[EraserPatch], extra: Optional[dict] = None) -> str:
    """Write patches (in order) to one safetensors file, atomically. Returns the path."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    entries = []
    metadata = {}
    if is_plain_lora(patches):
        lora = patches[0]
        tensors, names = kohya_lora_tensors(lora)
        _, info = lora.to_state()
        entries.append({"kind": lora.kind, "layout": "kohya", "modules": names, **info})
        rank = max(a.shape[0] for a, _ in lora.loras.values()) if lora.loras else 0
        metadata.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                         "ss_network_alpha": str(lora.scale * rank * lora.strength)})
    else:
        for i, p in enumerate(patches):
            t, info = p.to_state()
            for k, v in t.items():
                tensors[f"{i}:{k}"] = v
            entries.append({"kind": p.kind, **info})
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}  # no shared storage
    metadata.update({"format": FORMAT, "version": VERSION, "patches": json.dumps(entries),
                     "extra": json.dumps(extra or {})})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), durable=True)
    return path


def _entry_tensors(path: str, i: int, info: dict, tensors: dict) -> dict[str, torch.Tensor]:
    """The i-th entry's tensors as its patch class reads them (`from_state`)."""
    if info.get("layout") != "kohya":
        prefix = f"{i}:"
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    out = {}
    for name, parameter in dict(info.get("modules") or {}).items():
        down, up = tensors.get(f"{name}.lora_down.weight"), tensors.get(f"{name}.lora_up.weight")
        if down is None or up is None:
            raise EraserFileError(f"{path!r}: LoRA layer {name!r} is missing its lora_down or lora_up tensor")
        out[f"lora_A.{parameter}"], out[f"lora_B.{parameter}"] = down, up
    return out


def load_erasers(path: str) -> list[EraserPatch]:
    """Read the patches saved by `save_erasers` (safetensors only; nothing is unpickled)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise EraserFileError(f"eraser file {path!r} does not exist") from None
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise EraserFileError(f"{path!r} is not a readable safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise EraserFileError(f"{path!r} is not a Loomwork eraser file (no '{FORMAT}' metadata)")
    if meta.get("version") not in READABLE_VERSIONS:
        raise EraserFileError(f"{path!r} has eraser format version {meta.get('version')!r}; "
                              f"this Loomwork reads versions {', '.join(READABLE_VERSIONS)}")
    entries = json.loads(meta["patches"])
    out = []
    for i, info in enumerate(entries):
        cls = PATCH_KINDS.get(info.get("kind"))
        if cls is None:
            raise EraserFileError(f"{path!r}: unknown eraser kind {info.get('kind')!r}")
        state = {k: v for k, v in info.items() if k not in ("layout", "modules")}
        out.append(cls.from_state(_entry_tensors(path, i, info, tensors), state))
    return out
