"""The config folders a single-file checkpoint is loaded with, and their tokenizers.

A single file holds weights only. What builds the modules around them (each component's
config.json, the scheduler config, the tokenizers) comes from a *config folder*: a diffusers
folder without weights. Loomwork ships one per family in `resources/model_configs/<family>/`;
a user (or a test, with a tiny model) may pass their own folder instead, or one that holds only
some subfolders (say `tokenizer_2/` with T5's tokenizer for FLUX): each subfolder it has
replaces the shipped one.

Tokenizers: the shipped CLIP tokenizer subfolders hold only a `tokenizer_config.json` naming
the vocabulary "clip-bpe"; the vocabulary is built in memory from the BPE merges file that the
open_clip_torch package ships (`resources/model_configs/clip_bpe/`, MIT; see the README there).
T5's SentencePiece model is not shipped (no package on PyPI was found that ships it under a
licence that lets Loomwork ship it), so SD3's and FLUX's T5 tokenizer come from a user's folder.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from dataclasses import dataclass
from typing import Optional

from kernels.model_folders import diffusers_family

CONFIGS_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "resources", "model_configs")
FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")
CLIP_BPE_FILE = os.path.join(CONFIGS_ROOT, "clip_bpe", "bpe_simple_vocab_16e6.txt.gz")
CLIP_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes, 256 word-final bytes, merges, 2 specials
# A config folder's family must be in the same group as the file's (SD 1 and 2 share a layout).
FAMILY_GROUPS = {"sd1": "sd", "sd2": "sd", "sd1/sd2": "sd", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}
FLOW_FAMILIES = {"sd3", "flux"}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model")
T5_NOTE = ("T5's tokenizer is not shipped with Loomwork: pass a config folder holding it (a "
           "`{name}` subfolder with spiece.model or tokenizer.json, as in the model's diffusers "
           "folder)")


class ConfigError(ValueError):
    """A config folder that cannot configure a file; the message names both and what is wrong."""


def shipped_config(family: str) -> str:
    if family not in FAMILIES:
        raise ConfigError(f"no shipped config for family {family!r} (known: {', '.join(FAMILIES)})")
    return os.path.join(CONFIGS_ROOT, family)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: should be a JSON object")
    return value


@dataclass(frozen=True)
class ConfigSource:
    """The shipped config folder of `family`, with the subfolders of `override` (if any) in
    place of the shipped ones."""

    family: str
    override: Optional[str] = None

    @property
    def shipped(self) -> str:
        return shipped_config(self.family)

    def root_for(self, name: str) -> str:
        """The folder whose `name` subfolder configures that component."""
        if self.override and os.path.isdir(os.path.join(self.override, name)):
            return self.override
        return self.shipped

    def index(self) -> dict:
        """model_index.json: the override's when it has one (its components, its pipeline)."""
        if self.override and os.path.isfile(os.path.join(self.override, "model_index.json")):
            return _read_json(os.path.join(self.override, "model_index.json"))
        return _read_json(os.path.join(self.shipped, "model_index.json"))

    def has(self, name: str) -> bool:
        spec = self.index().get(name)
        return bool(spec) and spec != [None, None]

    def config(self, name: str) -> dict:
        folder = os.path.join(self.root_for(name), name)
        for file_name in ("config.json", "scheduler_config.json"):
            if os.path.isfile(os.path.join(folder, file_name)):
                return _read_json(os.path.join(folder, file_name))
        raise ConfigError(f"{folder}: no config.json")

    def scheduler_config(self) -> dict:
        return _read_json(os.path.join(self.root_for("scheduler"), "scheduler", "scheduler_config.json"))

    def check(self, file_path: str) -> None:
        """Refuse a config folder of another family than the file's, and a scheduler of the
        wrong kind (flow matching for SD3/FLUX, noise prediction for the UNet families)."""
        if self.override:
            if not os.path.isdir(self.override):
                raise ConfigError(f"config folder {self.override!r} does not exist")
            found = config_folder_family(self.override)
            if found not in ("unknown", "unreadable") and \
                    FAMILY_GROUPS.get(found) != FAMILY_GROUPS[self.family]:
                raise ConfigError(f"{file_path} is a {self.family} checkpoint but the config folder "
                                  f"{self.override} is for {found}: pass that family's config folder")
        scheduler = self.scheduler_config()
        is_flow = "FlowMatch" in str(scheduler.get("_class_name", ""))
        if is_flow != (self.family in FLOW_FAMILIES):
            where = os.path.join(self.root_for("scheduler"), "scheduler")
            want = "a flow-matching" if self.family in FLOW_FAMILIES else "a noise-prediction (not flow-matching)"
            raise ConfigError(f"{file_path} is a {self.family} checkpoint, which needs {want} "
                              f"scheduler, but {where} has {scheduler.get('_class_name')!r}")


def config_folder_family(folder: str) -> str:
    """A config folder's family: from its pipeline class, else from its denoiser's config
    (test and custom folders name their own pipeline class)."""
    family = diffusers_family(folder)
    if family not in ("unknown", "unreadable"):
        return family
    unet = os.path.join(folder, "unet", "config.json")
    if os.path.isfile(unet):
        try:
            return "sdxl" if _read_json(unet).get("addition_embed_type") == "text_time" else "sd1/sd2"
        except ConfigError:
            return "unreadable"
    transformer = os.path.join(folder, "transformer", "config.json")
    if os.path.isfile(transformer):
        name = str(_read_json(transformer).get("_class_name", ""))
        return {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}.get(name, "unknown")
    return family


# -- tokenizers ----------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) byte -> printable character table: printable bytes map to
    themselves, the rest to code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items(), key=lambda kv: (kv[0] not in printable, kv[0])))


@functools.lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict, list]:
    """(vocab, merges) of CLIP's BPE tokenizer, from the shipped merges file: the 256 byte
    symbols, the same with CLIP's word-end mark, one token per merge, then the two specials."""
    with gzip.open(CLIP_BPE_FILE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:CLIP_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


@functools.lru_cache(maxsize=4)
def _clip_tokenizer(pad_token: str, model_max_length: int):
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token,
                         model_max_length=model_max_length)


def load_tokenizer(source: ConfigSource, name: str, file_path: str):
    """The tokenizer of component `name`: the config folder's own files when it has them (by
    the class model_index.json names), else the shipped CLIP vocabulary with its settings."""
    root = source.root_for(name)
    folder = os.path.join(root, name)
    if any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        import transformers

        spec = source.index().get(name) or ["transformers", "AutoTokenizer"]
        cls = getattr(transformers, str(spec[1]), None) if spec[0] == "transformers" else None
        if cls is None or not hasattr(cls, "from_pretrained"):
            cls = transformers.AutoTokenizer
        try:
            return cls.from_pretrained(root, subfolder=name, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{folder}: cannot load the tokenizer ({exc})") from None
    settings_path = os.path.join(folder, "tokenizer_config.json")
    settings = _read_json(settings_path) if os.path.isfile(settings_path) else {}
    if settings.get("vocabulary") != "clip-bpe":
        raise ConfigError(f"{file_path}: no tokenizer for {name!r}; " + T5_NOTE.format(name=name))
    return _clip_tokenizer(str(settings.get("pad_token", "<|endoftext|>")),
                           int(settings.get("model_max_length", 77)))
