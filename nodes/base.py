"""How a node type is declared: typed ports, params, version, category, docstring.

The inspector, the file format (migrations), validation, the CLI's `--set` and `loomwork nodes`
are all generated from these declarations. A node's `run` is short: unpack, call a kernel, pack.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Sequence


# -- port types ------------------------------------------------------------------------------
class DataType:
    """A port type: a name people read and a colour for its wires."""

    def __init__(self, name: str, color: str, doc: str = ""):
        self.name, self.color, self.doc = name, color, doc

    def accepts(self, other: "DataType") -> bool:
        return self.name == "*" or other.name == self.name

    def optional(self, doc: str = "") -> "Input":
        return Input(self, optional=True, doc=doc)

    def __repr__(self) -> str:
        return self.name


MODEL = DataType("MODEL", "#b07cd8", "a denoiser (UNet or transformer) with its scheduler config")
CLIP = DataType("CLIP", "#f0c040", "a tokenizer and text encoder")
VAE = DataType("VAE", "#e0566a", "latent <-> pixel codec (identity for pixel-space models)")
CONDITIONING = DataType("CONDITIONING", "#e89a3c", "text embeddings with the word -> token map")
LATENT = DataType("LATENT", "#e86fa8", "a batch of latents")
IMAGE = DataType("IMAGE", "#64b5f6", "a batch of images, float NHWC in 0..1")
MASK = DataType("MASK", "#81c784", "a batch of masks, float NHW in 0..1")
LAYOUT = DataType("LAYOUT", "#4dd0c8", "boxes with phrases, in 0..1 image coordinates")
ATTENTION_MAPS = DataType("ATTENTION_MAPS", "#a1887f", "per-token cross-attention maps")
UPSCALE_MODEL = DataType("UPSCALE_MODEL", "#9575cd", "a super-resolution model (ESRGAN, SwinIR, HAT, DAT...)")
IP_ADAPTER = DataType("IP_ADAPTER", "#ba68c8", "an IP-Adapter's weights with its CLIP image encoder")
CONTROL_NET = DataType("CONTROL_NET", "#2bb673", "a ControlNet or T2I-Adapter for ControlNetApply")
TABLE = DataType("TABLE", "#90a4ae", "a small table of results (columns and rows)")
DATA_TYPES = {t.name: t for t in (MODEL, CLIP, VAE, CONDITIONING, LATENT, IMAGE, MASK, LAYOUT,
                                  ATTENTION_MAPS, UPSCALE_MODEL, IP_ADAPTER, CONTROL_NET, TABLE)}


# words a type name keeps whole (and how they are written) when it is split into words
NAME_WORDS = {"LoRA": "LoRA", "VAE": "VAE", "IPAdapter": "IP-Adapter", "ControlNet": "ControlNet",
              "Flux": "FLUX", "T2I": "T2I"}


def humanized(type_name: str) -> str:
    import re

    parts = re.split("(" + "|".join(sorted(NAME_WORDS, key=len, reverse=True)) + ")", type_name)
    words = []
    for part in parts:
        if part in NAME_WORDS:
            words.append(NAME_WORDS[part])
        elif part:
            words.extend(re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", part).split())
    return " ".join(words)


@dataclass(frozen=True)
class Input:
    type: DataType
    optional: bool = False
    doc: str = ""


def as_input(spec: "DataType | Input") -> Input:
    return spec if isinstance(spec, Input) else Input(spec)


# -- params ----------------------------------------------------------------------------------
class ParamError(ValueError):
    pass


class Param:
    """A node parameter. `check` returns a message for a bad value; `parse` reads CLI text.

    Subclasses are dataclasses that declare `default` and `help` (positional order: the value
    fields a reader expects first, e.g. Int(default, min, max)).
    """

    default: Any = None
    help: str = ""
    kind: ClassVar[str] = "any"

    def check(self, value: Any) -> Optional[str]:
        return None

    def parse(self, text: str) -> Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ParamError(f"{shown(text)} is not valid JSON") from None

    def describe(self) -> dict:
        return {"kind": self.kind, "default": self.default, "help": self.help}


def shown(value: Any, limit: int = 80) -> str:
    """A value as a message shows it: cut to `limit` characters, a huge integer by its digit
    count (printing one is slow, and Python refuses past 4,300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    try:
        text = repr(value)
    except ValueError:  # a huge integer nested in a container
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _range_problem(param, value) -> Optional[str]:
    if param.min is not None and value < param.min:
        return f"{shown(value)} is below the minimum {param.min}"
    if param.max is not None and value > param.max:
        return f"{shown(value)} is above the maximum {param.max}"
    return None


def _parse_number(kind, text: str, what: str):
    try:
        return kind(text.strip())
    except ValueError:
        raise ParamError(f"{shown(text)} is not {what}") from None


def _describe_range(param, base: dict) -> dict:
    return {**base, "min": param.min, "max": param.max, "step": param.step}


@dataclass
class Int(Param):
    default: int = 0
    min: Optional[int] = None
    max: Optional[int] = None
    help: str = ""
    step: int = 1
    kind: ClassVar[str] = "int"

    def check(self, value):
        if not isinstance(value, int) or isinstance(value, bool):
            return f"expected a whole number, got {shown(value)}"
        return _range_problem(self, value)

    def parse(self, text):
        return _parse_number(int, text, "a whole number")

    def describe(self):
        return _describe_range(self, super().describe())


@dataclass
class Seed(Int):
    default: int = 0
    min: Optional[int] = 0
    max: Optional[int] = 2**63 - 1
    help: str = "random seed: the same seed gives the same image"
    kind: ClassVar[str] = "seed"


@dataclass
class Float(Param):
    default: float = 0.0
    min: Optional[float] = None
    max: Optional[float] = None
    help: str = ""
    step: float = 0.1
    kind: ClassVar[str] = "float"

    def check(self, value):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"expected a number, got {shown(value)}"
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer past a float's range (over 308 digits)
            return f"expected a number a float can hold, got {shown(value)}"
        if not finite:
            return f"expected a finite number, got {shown(value)}"
        return _range_problem(self, value)

    def parse(self, text):
        return _parse_number(float, text, "a number")

    def describe(self):
        return _describe_range(self, super().describe())


@dataclass
class Bool(Param):
    default: bool = False
    help: str = ""
    kind: ClassVar[str] = "bool"

    def check(self, value):
        return None if isinstance(value, bool) else f"expected true or false, got {shown(value)}"

    def parse(self, text):
        t = text.strip().lower()
        if t in ("1", "true", "yes", "on"):
            return True
        if t in ("0", "false", "no", "off"):
            return False
        raise ParamError(f"{text!r} is not true or false")


# Bytes a file name may take: most file systems hold 255; a counter or suffix may follow it.
FILE_NAME_BYTES = 200


def file_name_problem(name: str) -> Optional[str]:
    """Why `name` cannot be a file's name inside a folder (a path, `..`, too long), or None."""
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "holds a character no file name can (a lone surrogate)"
    if size > FILE_NAME_BYTES:
        return f"is {size} bytes long; a file name takes at most {FILE_NAME_BYTES}"
    if "/" in name or "\\" in name or "\0" in name:
        return f"{shown(name)} is a path; give a plain file name (no / or \\)"
    if name.strip() in (".", ".."):
        return f"{name!r} is not a file name"
    return None


@dataclass
class String(Param):
    default: str = ""
    help: str = ""
    multiline: bool = False
    # the text is a file name inside a folder (a prefix, an eraser's name): checked as one
    file_name: bool = False
    kind: ClassVar[str] = "string"

    def check(self, value):
        if not isinstance(value, str):
            return f"expected text, got {shown(value)}"
        return file_name_problem(value) if self.file_name else None

    def parse(self, text):
        return text

    def describe(self):
        return {**super().describe(), "multiline": self.multiline}


@dataclass
class Path(String):
    """A file or folder on disk; the inspector shows a picker."""

    mode: str = "file"  # "file", "folder" or "save"
    filters: str = ""   # Qt file-dialog filter, e.g. "Images (*.png *.jpg)"
    # kinds of model (kernels.model_folders.KINDS) the path may name as `ckpt:NAME`: the inspector
    # then offers the models folders' list, and the node resolves the name among those kinds
    models: tuple = ()
    kind: ClassVar[str] = "path"

    def describe(self):
        return {**super().describe(), "mode": self.mode, "filters": self.filters, "models": list(self.models)}


@dataclass
class Choice(Param):
    options: Sequence[str] = ()
    default: str = ""
    help: str = ""
    kind: ClassVar[str] = "choice"

    def __post_init__(self):
        if not self.default and self.options:
            self.default = self.options[0]

    def check(self, value):
        if not isinstance(value, str) or value not in self.options:
            return f"{shown(value)} is not one of: {', '.join(self.options)}"
        return None

    def parse(self, text):
        return text.strip()

    def describe(self):
        return {**super().describe(), "options": list(self.options)}


@dataclass
class Json(Param):
    """Structured data (a list of boxes, say), checked by an optional validator."""

    default: Any = None
    help: str = ""
    validator: Optional[Callable[[Any], Optional[str]]] = None
    kind: ClassVar[str] = "json"

    def check(self, value):
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            return f"not storable as JSON: {shown(str(exc), 200)}"
        return self.validator(value) if self.validator else None


# -- nodes -----------------------------------------------------------------------------------
class NodeError(RuntimeError):
    """A node's own, user-facing failure (a missing file, an incompatible model)."""


class Node:
    """Base class of node types. Subclasses declare; the engine calls `run`."""

    category: ClassVar[str] = "misc"
    version: ClassVar[int] = 1
    inputs: ClassVar[dict[str, DataType | Input]] = {}
    params: ClassVar[dict[str, Param]] = {}
    outputs: ClassVar[dict[str, DataType]] = {}
    # Output nodes (save, preview) are what "Run" targets.
    output_node: ClassVar[bool] = False
    # Side-effecting nodes run whenever they are pulled, even with a cache hit.
    always_run: ClassVar[bool] = False
    # version -> function(params) -> params of version + 1
    migrations: ClassVar[dict[int, Callable[[dict], dict]]] = {}
    display_name: ClassVar[str] = ""  # when the type name in words reads badly (see label())

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.inputs = {name: as_input(spec) for name, spec in cls.inputs.items()}

    # the name files and the registry use
    @classmethod
    def type_name(cls) -> str:
        return cls.__name__

    @classmethod
    def resolve_model_path(cls, ctx, path: str, kinds) -> str:
        """`ctx.resolve_path` for a path that may name a model of `kinds` (`ckpt:NAME`); a name
        the models folders do not hold is this node's error."""
        try:
            return ctx.resolve_path(path, kinds=kinds)
        except NodeError as exc:
            raise NodeError(f"{cls.type_name()}: {exc}") from None

    @classmethod
    def model_path_fingerprint(cls, ctx, path: str, kinds):
        """The resolved file's fingerprint, or a marker when it cannot be found (running the node
        then says why)."""
        from kernels.files import path_fingerprint

        try:
            return path_fingerprint(cls.resolve_model_path(ctx, path, kinds))
        except NodeError:
            return ("missing", path)

    @classmethod
    def label(cls) -> str:
        """The name people read (palette, search, a new node's title): `display_name`, else the
        type name in words ("VAEDecode" -> "VAE Decode", "LoadLoRA" -> "Load LoRA")."""
        return cls.display_name or humanized(cls.__name__)

    @classmethod
    def doc(cls) -> str:
        return (cls.__doc__ or "").strip()

    @classmethod
    def migrate(cls, params: dict, from_version: int) -> dict:
        for v in range(from_version, cls.version):
            step = cls.migrations.get(v)
            if step is None:
                raise ValueError(f"no migration from version {v} to {v + 1}")
            params = step(params)
        return params

    @classmethod
    def resolved_params(cls, stored: dict) -> dict:
        """Stored params over declared defaults (files keep only what they saved)."""
        return {name: stored.get(name, p.default) for name, p in cls.params.items()}

    @classmethod
    def fingerprint(cls, params: dict, ctx) -> Any:
        """What the result depends on outside its inputs and params (file size and mtime...).

        `ctx` offers `resolve_path`; the value goes into the cache key.
        """
        return None

    @classmethod
    def memory_estimate(cls, params: dict, input_sizes: dict, ctx) -> Any:
        """A kernels.run_memory.Estimate of this node's outputs and working memory, from its
        params and its inputs' declared sizes (a port's Size, or None when unknown), before the
        run; `ctx` offers `resolve_path`. None: nothing declared (counted as 0)."""
        return None

    @classmethod
    def describe(cls) -> dict:
        return {
            "type": cls.type_name(), "category": cls.category, "version": cls.version,
            "doc": cls.doc(), "output_node": cls.output_node,
            "inputs": {n: {"type": i.type.name, "optional": i.optional} for n, i in cls.inputs.items()},
            "outputs": {n: t.name for n, t in cls.outputs.items()},
            "params": {n: p.describe() for n, p in cls.params.items()},
        }

    def run(self, ctx, **kwargs) -> dict[str, Any]:
        raise NotImplementedError

