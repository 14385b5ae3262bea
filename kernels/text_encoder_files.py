"""Separate text-encoder files (CLIP-L, CLIP-G, T5 in transformers' own key layout, as
ComfyUI's `text_encoders` folder and the SD3/FLUX releases ship them) to transformers modules.

A file loads the same way whichever family it is used for (so the model manager can share it
by its path): CLIP as CLIPTextModelWithProjection when the file carries `text_projection`, else
as CLIPTextModel; T5 as T5EncoderModel. `fit_to_family` then gives each family what its
pipeline calls: FLUX reads CLIP-L's pooled output (a CLIPTextModel), SD3 its projection.

transformers' `from_pretrained` wants a folder; these files are single tensors files with no
config beside them, so the config comes from the shipped skeleton (or the caller's folder) and
the weights are assigned into an empty module.
"""

from __future__ import annotations

from typing import Optional

import torch

from kernels.model_configs import ConfigSource
from kernels.models import ModelLoadError

# The shipped config a role's file is built with when no config folder is given: CLIP-L's and
# CLIP-G's and T5's configs are the same in every family that uses them.
ROLE_CONFIGS = {"clip_l": ("sd3", "text_encoder"), "clip_g": ("sd3", "text_encoder_2"),
                "t5": ("sd3", "text_encoder_3")}
CLIP_PREFIXES = ("text_model.", "embeddings.", "encoder.layers.", "final_layer_norm.", "text_projection.")


def _file_kind(keys) -> str:
    if any(k.startswith("encoder.block.") for k in keys) or "shared.weight" in keys:
        return "t5"
    if any(k.startswith(CLIP_PREFIXES) for k in keys):
        return "clip"
    return "unknown"


def load_text_encoder_file(path: str, role: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                           config: Optional[str] = None, component: Optional[str] = None,
                           family: Optional[str] = None):
    """The transformers module in one text-encoder file, for `role` (clip_l, clip_g, t5)."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    from kernels.single_file import SingleFile, _finish

    sf = SingleFile(path)
    kind = _file_kind(sf.keys)
    if kind == "unknown":
        raise ModelLoadError(f"{path}: not a text encoder file (CLIP or T5 in transformers' layout); "
                             f"its tensors are named like {sf.keys[:2]}")
    if (kind == "t5") != (role == "t5"):
        raise ModelLoadError(f"{path}: a {kind.upper()} file, given as the {role} text encoder")
    if config:
        source, name = ConfigSource(family or ROLE_CONFIGS[role][0], config), component or ROLE_CONFIGS[role][1]
    else:
        source, name = ConfigSource(ROLE_CONFIGS[role][0]), ROLE_CONFIGS[role][1]
    if kind == "t5":
        cls = T5EncoderModel
    else:
        cls = CLIPTextModelWithProjection if "text_projection.weight" in sf.keys else CLIPTextModel
    model_config = cls.config_class.from_pretrained(source.root_for(name), subfolder=name, local_files_only=True)
    width = model_config.d_model if kind == "t5" else model_config.hidden_size
    embed = "shared.weight" if kind == "t5" else next(k for k in sf.keys if k.endswith("token_embedding.weight"))
    if sf.shape(embed)[1] != width:
        raise ModelLoadError(f"{path}: a text encoder {sf.shape(embed)[1]} wide, but {role} is "
                             f"{width} wide ({source.root_for(name)}/{name}): is it another encoder?")
    tensors = sf.tensors(lambda k: not k.endswith("position_ids") and not k.startswith("decoder."))
    with init_empty_weights():
        model = cls(model_config)
    own = set(model.state_dict())
    state = {}
    for key, tensor in tensors.items():
        bare = key[len("text_model."):] if key.startswith("text_model.") else key
        state[next((k for k in (key, bare, "text_model." + bare) if k in own), key)] = tensor
    _missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ModelLoadError(f"{path}: {len(unexpected)} tensors that a {cls.__name__} does not have, "
                             f"e.g. {sorted(unexpected)[:2]}")
    return _finish(model, path, f"{role} text encoder", device).to(dtype)


def fit_to_family(module, role: str, family: str, path: str):
    """The module as `family`'s pipeline calls it (see the module docstring)."""
    from transformers import CLIPTextModelWithProjection

    if role == "t5":
        return module
    has_projection = isinstance(module, CLIPTextModelWithProjection)
    if family == "sd3" or (family == "sdxl" and role == "clip_g"):
        if not has_projection:
            raise ModelLoadError(f"{path}: has no text_projection, which {family}'s {role} needs")
        return module
    return module.text_model if has_projection else module
