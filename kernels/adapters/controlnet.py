"""ControlNet on MODEL: a conditioning image steers the UNet through added residuals, for one run.

Zhang, Rao and Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models": a copy
of the UNet's encoder reads the noisy latent, the step's text and an image (edges, depth, a
scribble) and returns one residual per skip connection and one for the middle block, each scaled
by a strength; the UNet adds them to its own. The ControlNet itself is diffusers'
`ControlNetModel` (a diffusers folder via `from_pretrained`, a single .safetensors file via
`from_single_file` with its local config, or with one read off its tensors' shapes); so is the
addition (the UNet's
`down_block_additional_residuals` / `mid_block_additional_residual`).

What is ours is the wiring, checked against StableDiffusionControlNetPipeline and
StableDiffusionXLControlNetPipeline (tests/test_controlnet.py): the ControlNet runs on exactly
the UNet call's inputs (the batched [negative, positive] latent, the timestep, the text, SDXL's
added conditioning), with the control image resized to the latent's pixel size as the pipelines'
`prepare_image` does, repeated per image and for guidance; a step is inside [start, end] by the
pipelines' rule (step i of n runs when i/n >= start and (i+1)/n <= end); several ControlNets
chain and their residuals sum, as MultiControlNetModel sums them. Guess mode (and ControlNets
with `global_pool_conditions`) run the ControlNet on the positive rows only, zeros for the rest.

`ControlNetPatch` is a value: the ControlNet, the image's content hash, strength, start, end and
guess mode. Its `applied()` registers a forward pre-hook on the UNet that adds the residuals to
the call's keyword arguments, and removes it on exit, so it composes with every other patch and
with other ControlNets. Outside the window, or at strength 0, the ControlNet is not run at all:
the UNet call is the plain one (the pipelines run it at scale 0, which adds zeros).

A T2I-Adapter (Mou et al., "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability
for Text-to-Image Diffusion Models"; diffusers' `T2IAdapter`) loads and applies through the same
nodes: its features depend on the image alone, so they are computed once per run, scaled by the
strength and fed as the UNet's `down_intrablock_additional_residuals`, as
StableDiffusionAdapterPipeline feeds them (its SDXL pipeline's `adapter_conditioning_factor` f
is the window [0, f]).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from kernels.hashing import content_hash, key_of
from kernels.model_folders import PICKLE_NOTE, PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, read_safetensors_header
from kernels.patching import ModelPatch, SamplingRun

CONTROL_CLASSES = ("ControlNetModel", "T2IAdapter")
# keys only a ControlNet has: diffusers' layout, and the original (ldm/A1111) one
CONTROLNET_KEYS = ("controlnet_cond_embedding.conv_in.weight", "input_hint_block.0.weight",
                   "control_model.input_hint_block.0.weight")
# the UNet's config values the residuals' shapes and the ControlNet's inputs depend on
FIT_FIELDS = (("in_channels", "latent channels"), ("cross_attention_dim", "cross-attention width"),
              ("block_out_channels", "block widths"), ("layers_per_block", "layers per block"),
              ("addition_embed_type", "added conditioning"),
              ("projection_class_embeddings_input_dim", "added embedding width"))


class ControlNetError(ValueError):
    """A ControlNet that cannot be loaded or applied; the message names the file and what is wrong."""


@dataclass(frozen=True, eq=False)
class ControlNet:
    """CONTROL_NET: a loaded ControlNetModel (or T2IAdapter) and the file or folder it came from."""

    module: Any
    path: str
    load_key: str

    def content_key(self) -> str:
        return key_of("CONTROL_NET", self.load_key)

    @property
    def is_adapter(self) -> bool:
        return type(self.module).__name__ == "T2IAdapter"

    @property
    def pixel_factor(self) -> int:
        """Image pixels per latent pixel the ControlNet expects: its conditioning embedding halves
        the size once per block after the first. A T2I-Adapter unshuffles by its downscale factor
        to the first block's size (SDXL's adapter to the size after the first block: twice that)."""
        if self.is_adapter:
            xl = self.module.config.adapter_type == "full_adapter_xl"
            return self.module.downscale_factor // (2 if xl else 1)
        channels = self.module.config.conditioning_embedding_out_channels
        return 2 ** (len(channels) - 1)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def load_control_net(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> ControlNet:
    """A ControlNet from a diffusers folder (config.json + safetensors weights) or a .safetensors
    file. A file's config is, in order: `<name>.yaml` beside it (the original format's config, as
    A1111 keeps them), a diffusers `config.json` in its folder, or one read off the tensors'
    shapes (ComfyUI keeps the file alone). Nothing is downloaded; pickles are refused by their
    suffix."""
    from kernels.models import model_folder_key, quiet_hub_libraries

    quiet_hub_libraries()
    path = os.path.abspath(path)
    if os.path.isdir(path):
        module = _load_folder(path, dtype)
    elif os.path.isfile(path):
        module = _load_file(path, dtype)
    else:
        raise ControlNetError(f"ControlNet {path!r} does not exist")
    if torch.device(device) != module.device:  # `to` warns about float32 modules even when it moves nothing
        module = module.to(device)
    module = module.eval().requires_grad_(False)
    return ControlNet(module, path, model_folder_key(path, dtype, device))


def _load_folder(path: str, dtype: torch.dtype):
    import json

    import diffusers

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ControlNetError(f"ControlNet folder {path!r} has no config.json: it is not a diffusers ControlNet")
    with open(config_path, encoding="utf-8") as f:
        class_name = json.load(f).get("_class_name")
    if class_name not in CONTROL_CLASSES:
        raise ControlNetError(f"ControlNet folder {path!r} holds a {class_name}, not a ControlNetModel or "
                              f"T2IAdapter")
    names = os.listdir(path)
    if not any(n.endswith(SAFETENSORS_SUFFIXES) for n in names):
        pickled = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
        what = f"only {pickled[0]}, {PICKLE_NOTE}" if pickled else "no .safetensors weights"
        raise ControlNetError(f"ControlNet folder {path!r} has {what}")
    try:
        return getattr(diffusers, class_name).from_pretrained(path, torch_dtype=dtype, use_safetensors=True,
                                                              local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ControlNetError(f"ControlNet folder {path!r} cannot be loaded: {_first_line(exc)}") from None


def _load_file(path: str, dtype: torch.dtype):
    from diffusers import ControlNetModel

    low = path.lower()
    if low.endswith(PICKLE_SUFFIXES):
        raise ControlNetError(f"ControlNet file {path!r} is {PICKLE_NOTE}")
    if not low.endswith(SAFETENSORS_SUFFIXES):
        raise ControlNetError(f"ControlNet file {path!r} is not a .safetensors file; ControlNets are read "
                              f"from safetensors or diffusers folders only")
    try:
        keys, _metadata = read_safetensors_header(path)
    except ValueError as exc:
        raise ControlNetError(f"ControlNet file {path!r} is {exc}") from None
    folder, stem = os.path.dirname(path), os.path.splitext(os.path.basename(path))[0]
    if any(k.startswith("adapter.") for k in keys):
        return _load_adapter_file(path, os.path.join(folder, "config.json"), dtype)
    if not any(k in keys for k in CONTROLNET_KEYS):
        raise ControlNetError(f"ControlNet file {path!r} has no ControlNet tensors (no conditioning "
                              f"embedding / input hint block): it is not a ControlNet")
    kwargs: dict = {"torch_dtype": dtype, "local_files_only": True}
    try:
        yaml_path = os.path.join(folder, stem + ".yaml")
        if os.path.isfile(yaml_path):
            return _load_original_layout(path, _read_yaml(yaml_path), dtype)
        if os.path.isfile(os.path.join(folder, "config.json")):
            return ControlNetModel.from_single_file(path, config=folder, **kwargs)
        shapes = tensor_shapes(path)
        if "controlnet_cond_embedding.conv_in.weight" in shapes:  # diffusers' layout: no conversion
            module = ControlNetModel.from_config(diffusers_config_from_shapes(shapes))
            module.load_state_dict(_read_tensors(path), strict=True)
            return module.to(dtype)
        return _load_original_layout(path, original_config_from_shapes(shapes), dtype)
    except ControlNetError:
        raise
    except Exception as exc:  # diffusers raises config, key and conversion errors of many types
        raise ControlNetError(f"ControlNet file {path!r} cannot be loaded: {_first_line(exc)}; put its "
                              f"original {stem}.yaml or its diffusers config.json beside it") from None


# the ControlNetModel config fields diffusers takes from an original config's UNet part
ORIGINAL_CONFIG_FIELDS = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block",
                          "cross_attention_dim", "attention_head_dim", "use_linear_projection", "class_embed_type",
                          "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                          "transformer_layers_per_block")


def _read_yaml(path: str) -> dict:
    import yaml

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)  # data only: safe_load builds no objects


def _load_original_layout(path: str, original_config: dict, dtype: torch.dtype):
    """An original-layout (ldm) ControlNet converted by diffusers' own functions. They are called
    here rather than through `from_single_file(original_config=...)`, whose ControlNet config
    step fails in diffusers 0.42 (it calls the UNet config step without the checkpoint)."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint, create_unet_diffusers_config_from_ldm

    tensors = _read_tensors(path)
    unet_config = create_unet_diffusers_config_from_ldm(original_config, tensors)
    hint = original_config["model"]["params"]["control_stage_config"]["params"]["hint_channels"]
    config = {**{k: unet_config[k] for k in ORIGINAL_CONFIG_FIELDS}, "conditioning_channels": hint}
    module = ControlNetModel.from_config(config)
    module.load_state_dict(convert_controlnet_checkpoint(tensors, config), strict=True)
    return module.to(dtype)


def _read_tensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path, device="cpu")


def _load_adapter_file(path: str, config_path: str, dtype: torch.dtype):
    """A T2I-Adapter's weights in one file: diffusers has no single-file loader for adapters, so
    it is built from the diffusers config.json beside it and the weights loaded strictly."""
    from diffusers import T2IAdapter

    if not os.path.isfile(config_path):
        raise ControlNetError(f"T2I-Adapter file {path!r} needs its diffusers config.json in the same folder")
    try:
        module = T2IAdapter.from_config(T2IAdapter.load_config(os.path.dirname(config_path)))
        module.load_state_dict(_read_tensors(path), strict=True)
    except Exception as exc:  # config, shape and key errors alike
        raise ControlNetError(f"T2I-Adapter file {path!r} cannot be loaded: {_first_line(exc)}") from None
    return module.to(dtype)


# A file without its config: the architecture read off the tensors' shapes. The widths, blocks,
# depths and text width are in the shapes; the attention heads are not, so they follow the
# families' rule (SD 1.x: 8 heads; SD 2.x and SDXL: 64 channels a head), as does SDXL's time
# embedding width (256).
def tensor_shapes(path: str) -> dict[str, tuple]:
    """Every tensor's shape, from the safetensors header (no data is read)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _heads(context_dim: int, widths: list[int]):
    return 8 if context_dim == 768 else [max(1, w // 64) for w in widths]


def _context_dim(shapes: dict) -> int:
    return next(v[1] for k, v in shapes.items() if k.endswith("attn2.to_k.weight"))


def diffusers_config_from_shapes(shapes: dict) -> dict:
    """A ControlNetModel config for a diffusers-layout state dict."""
    blocks = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("down_blocks.")})
    widths = [shapes[f"down_blocks.{b}.resnets.0.conv1.weight"][0] for b in blocks]
    layers = len({k.split(".")[3] for k in shapes if k.startswith("down_blocks.0.resnets.")})

    def depth(prefix: str) -> int:
        return len({k.split(".")[4] for k in shapes if k.startswith(prefix + ".transformer_blocks.")})

    attention = [f"down_blocks.{b}.attentions.0.proj_in.weight" in shapes for b in blocks]
    proj_in = next((v for k, v in shapes.items() if k.endswith("proj_in.weight")), (0, 0))
    embedding = [shapes["controlnet_cond_embedding.conv_in.weight"][0]] + [
        shapes[k][0] for k in sorted((k for k in shapes if k.startswith("controlnet_cond_embedding.blocks.")
                                      and k.endswith(".weight")), key=lambda k: int(k.split(".")[2]))[1::2]]
    context = _context_dim(shapes)
    config = {
        "in_channels": shapes["conv_in.weight"][1],
        "conditioning_channels": shapes["controlnet_cond_embedding.conv_in.weight"][1],
        "block_out_channels": widths, "layers_per_block": layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "transformer_layers_per_block": [max(1, depth(f"down_blocks.{b}.attentions.0")) for b in blocks],
        "cross_attention_dim": context, "attention_head_dim": _heads(context, widths),
        "use_linear_projection": len(proj_in) == 2, "conditioning_embedding_out_channels": embedding,
        "mid_block_type": "UNetMidBlock2DCrossAttn" if "mid_block.attentions.0.proj_in.weight" in shapes else None,
    }
    if "add_embedding.linear_1.weight" in shapes:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=shapes["add_embedding.linear_1.weight"][1])
    return config


def original_config_from_shapes(shapes: dict) -> dict:
    """The original format's config (as its yaml would give it) for an original-layout
    ControlNet, for diffusers' own conversion."""
    s = {k.removeprefix("control_model."): v for k, v in shapes.items()}
    levels, current, i = [], [], 1
    while f"input_blocks.{i}.0.in_layers.2.weight" in s or f"input_blocks.{i}.0.op.weight" in s:
        if f"input_blocks.{i}.0.op.weight" in s:
            levels.append(current)
            current = []
        else:
            current.append(i)
        i += 1
    levels.append(current)
    channels = s["input_blocks.0.0.weight"][0]
    widths = [s[f"input_blocks.{level[0]}.0.in_layers.2.weight"][0] for level in levels]
    depths = [len({k.split(".")[4] for k in s if k.startswith(f"input_blocks.{level[0]}.1.transformer_blocks.")})
              for level in levels]
    context = _context_dim(s)
    linear = len(next(v for k, v in s.items() if k.endswith("proj_in.weight"))) == 2
    params = {
        "in_channels": s["input_blocks.0.0.weight"][1], "out_channels": s["input_blocks.0.0.weight"][1],
        "hint_channels": s["input_hint_block.0.weight"][1], "model_channels": channels,
        "channel_mult": [w // channels for w in widths], "num_res_blocks": len(levels[0]),
        "attention_resolutions": [2 ** n for n, d in enumerate(depths) if d], "transformer_depth": depths,
        "context_dim": context, "use_linear_in_transformer": linear,
    }
    params.update({"num_head_channels": 64} if linear and context != 768 else {"num_heads": 8})
    if "label_emb.0.0.weight" in s:  # SDXL's added embedding
        params.update(num_classes="sequential", adm_in_channels=s["label_emb.0.0.weight"][1])
    return {"model": {"params": {"control_stage_config": {"params": params}, "unet_config": {"params": params},
                                 "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


# ---------------------------------------------------------------------------------------------
# checking the fit
# ---------------------------------------------------------------------------------------------
def _family(config) -> str:
    if config.get("addition_embed_type") == "text_time":
        return "Stable Diffusion XL"
    return {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x"}.get(config.get("cross_attention_dim"),
                                                                         "Stable Diffusion")


def check_fits(control_net: ControlNet, unet) -> None:
    """Raise ControlNetError unless the ControlNet's residuals fit this UNet, naming the file and
    the first difference: a ControlNet for another family would fail inside the UNet, or worse
    (same widths, other blocks) add its residuals in the wrong places."""
    if type(unet).__name__ != "UNet2DConditionModel":
        raise ControlNetError(f"ControlNet {control_net.path!r} applies to UNet models (SD 1.x/2.x, SDXL); "
                              f"this MODEL's denoiser is a {type(unet).__name__}")
    cn, un = dict(control_net.module.config), dict(unet.config)
    if control_net.is_adapter:
        _check_adapter_fits(control_net, cn, un)
        return
    for name, what in FIT_FIELDS:
        ours, theirs = _normalised(cn.get(name)), _normalised(un.get(name))
        if ours != theirs:
            raise ControlNetError(
                f"ControlNet {control_net.path!r} is for a {_family(cn)} UNet but this MODEL is "
                f"{_family(un)}: its {what} is {ours} where the UNet's is {theirs}; use a ControlNet "
                f"made for this model family")


def _check_adapter_fits(control_net: ControlNet, cn: dict, un: dict) -> None:
    xl_adapter, xl_unet = cn.get("adapter_type") == "full_adapter_xl", un.get("addition_embed_type") == "text_time"
    problem = None
    if xl_adapter != xl_unet:
        problem = f"it is {'an SDXL' if xl_adapter else 'a Stable Diffusion 1.x/2.x'} adapter"
    elif not xl_adapter:
        # (width, downsampling from the latent) of each feature: the adapter halves the size per
        # level; the UNet adds one inside each cross-attention block and after each other block
        made = [(c, 2 ** i) for i, c in enumerate(cn["channels"])]
        wanted, down = [], 1
        types = list(un["down_block_types"])
        for i, (kind, width) in enumerate(zip(types, un["block_out_channels"])):
            last = i == len(types) - 1
            wanted.append((width, down if "CrossAttn" in kind or last else 2 * down))
            down *= 1 if last else 2
        if made != wanted:
            problem = (f"its features (width, downsampling) are {made} where the UNet's blocks take "
                       f"{wanted}")
    if problem:
        raise ControlNetError(f"T2I-Adapter {control_net.path!r} does not fit this {_family(un)} MODEL: {problem}; "
                              f"use an adapter made for this model family")


def _normalised(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------------------------------------
# the control image
# ---------------------------------------------------------------------------------------------
def control_pixels(image: torch.Tensor, height: int, width: int, factor: int = 8) -> torch.Tensor:
    """(N, 3, height, width) float32 in 0..1 from an IMAGE (NHWC in 0..1), by diffusers' control
    image processor (RGB, no normalising) as the ControlNet pipelines prepare theirs. An image of
    the right size passes as a tensor, unchanged; another size is resized as the pipelines resize
    the PIL images they are given (Lanczos)."""
    from diffusers.image_processor import VaeImageProcessor

    from kernels.images import to_pil

    if image.ndim != 4:
        raise ControlNetError(f"a control image is a batch of NHWC images; got shape {tuple(image.shape)}")
    channels = image.shape[-1]
    image = image[..., :3] if channels >= 3 else image[..., :1].expand(*image.shape[:-1], 3)
    processor = VaeImageProcessor(vae_scale_factor=factor, do_convert_rgb=True, do_normalize=False)
    if tuple(image.shape[1:3]) == (height, width):
        return processor.preprocess(image.permute(0, 3, 1, 2).float(), height=height, width=width)
    return processor.preprocess(to_pil(image), height=height, width=width).float()


def step_of(scheduler, timestep) -> Optional[tuple[int, int]]:
    """(step index, steps) of `timestep` in the scheduler's schedule, or None without one."""
    schedule = getattr(scheduler, "timesteps", None)
    if schedule is None or not len(schedule):
        return None
    t = torch.as_tensor(timestep).flatten()[0].float().cpu()
    return int(torch.argmin((schedule.float().cpu() - t).abs())), len(schedule)


def in_control_window(i: int, n: int, start: float, end: float) -> bool:
    """The ControlNet pipelines' rule (their `controlnet_keep`): step i of n runs when
    i/n >= start and (i+1)/n <= end."""
    return not (i / n < start or (i + 1) / n > end)


# ---------------------------------------------------------------------------------------------
# the patch
# ---------------------------------------------------------------------------------------------
class ControlRun:
    """One sampling run of a ControlNetPatch: the control image at the sizes the run meets."""

    def __init__(self, patch: "ControlNetPatch", run: Optional[SamplingRun]):
        self.patch = patch
        self.run = run
        self.images: dict = {}

    def active(self, timestep) -> bool:
        step = step_of(getattr(self.run, "scheduler", None), timestep)
        if step is None:  # no schedule to place the call in (a call outside a sampler's run)
            return True
        return in_control_window(*step, self.patch.start, self.patch.end)

    def images_per_call(self, rows: int) -> int:
        """Images one UNet call of `rows` samples is for: the run's batch (twice that is guidance)."""
        if self.run is None:
            return rows
        images = int(self.run.latent_shape[0])
        if rows % images:
            raise ControlNetError(f"ControlNet {self.patch.control_net.path!r}: a UNet call on {rows} latents in a "
                                  f"run of {images} images; ControlNets follow the sampler's batch")
        return images

    def condition(self, rows: int, height: int, width: int, device, dtype) -> torch.Tensor:
        """The control image for a ControlNet call on `rows` latents of height x width."""
        key = (rows, height, width, str(device), dtype)
        if key not in self.images:
            cn = self.patch.control_net
            f = cn.pixel_factor
            pixels = control_pixels(self.patch.image, height * f, width * f, f)
            images = self.images_per_call(rows)
            if pixels.shape[0] == 1:
                pixels = pixels.repeat_interleave(images, dim=0)
            elif pixels.shape[0] != images:
                raise ControlNetError(f"ControlNet {cn.path!r}: the control image batch has {pixels.shape[0]} "
                                      f"images but {images} are being sampled; give one image or one per image")
            if rows != images:
                pixels = torch.cat([pixels] * (rows // images))
            self.images[key] = pixels.to(device=device, dtype=dtype)
        return self.images[key]

    def adapter_features(self, rows: int, height: int, width: int, device, dtype) -> list[torch.Tensor]:
        """A T2I-Adapter's features for `rows` latents of height x width, scaled by the strength:
        they depend on the image alone, so they are made once per run and size."""
        key = ("adapter", rows, height, width, str(device), dtype)
        if key not in self.images:
            cn = self.patch.control_net
            f = cn.pixel_factor
            pixels = control_pixels(self.patch.image, height * f, width * f, f)
            if cn.module.config.in_channels == 1:  # sketch adapters read one grey channel
                from kernels.adapters.preprocess import gray

                pixels = gray(pixels.permute(0, 2, 3, 1))[:, None]
            with torch.no_grad():
                features = [v * self.patch.strength for v in cn.module(pixels.to(device=device, dtype=cn.module.dtype))]
            images = self.images_per_call(rows)
            if pixels.shape[0] == 1 and images > 1:
                features = [v.repeat(images, 1, 1, 1) for v in features]
            elif pixels.shape[0] not in (1, images):
                raise ControlNetError(f"T2I-Adapter {cn.path!r}: the control image batch has {pixels.shape[0]} "
                                      f"images but {images} are being sampled; give one image or one per image")
            if rows != images:
                features = [torch.cat([v] * (rows // images)) for v in features]
            self.images[key] = [v.to(dtype) for v in features]
        return self.images[key]

    def residuals(self, sample: torch.Tensor, timestep, text: torch.Tensor,
                  added: Optional[dict]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The ControlNet's (down residuals, mid residual) for one UNet call's inputs."""
        module = self.patch.control_net.module
        guess = self.patch.guess_mode or bool(module.config.global_pool_conditions)
        rows, out_dtype = sample.shape[0], sample.dtype
        split = guess and rows == 2 * self.images_per_call(rows)
        if split:  # the positive rows only, as the pipelines' guess mode
            half = rows // 2
            sample, text = sample[half:], text[half:]
            added = {k: v[half:] for k, v in added.items()} if added else added
        dtype = module.dtype
        cond = self.condition(sample.shape[0], sample.shape[2], sample.shape[3], sample.device, dtype)
        if added:
            added = {k: v.to(dtype) for k, v in added.items()}
        down, mid = module(sample.to(dtype), timestep, encoder_hidden_states=text.to(dtype),
                           controlnet_cond=cond, conditioning_scale=self.patch.strength, guess_mode=guess,
                           added_cond_kwargs=added, return_dict=False)
        if split:
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return [d.to(out_dtype) for d in down], mid.to(out_dtype)

    def pre_hook(self, _module, args, kwargs):
        """The UNet's forward pre-hook: the call's keyword arguments with the residuals added."""
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        if not self.active(timestep):
            return None
        sample = args[0] if args else kwargs["sample"]
        kwargs = dict(kwargs)
        if self.patch.control_net.is_adapter:
            features = self.adapter_features(sample.shape[0], sample.shape[2], sample.shape[3], sample.device,
                                             sample.dtype)
            earlier = kwargs.get("down_intrablock_additional_residuals")  # summed, as MultiAdapter
            # a new list at every call: the UNet pops the features it has used
            kwargs["down_intrablock_additional_residuals"] = (
                list(features) if earlier is None else [e + v for e, v in zip(earlier, features)])
            return args, kwargs
        text = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        down, mid = self.residuals(sample, timestep, text, kwargs.get("added_cond_kwargs"))
        earlier_down = kwargs.get("down_block_additional_residuals")
        if earlier_down is not None:  # an earlier ControlNet in the chain: sum, as MultiControlNetModel
            down = [e + d for e, d in zip(earlier_down, down)]
            mid = kwargs["mid_block_additional_residual"] + mid
        kwargs["down_block_additional_residuals"] = down
        kwargs["mid_block_additional_residual"] = mid
        return args, kwargs


@dataclass(frozen=True, eq=False)
class ControlNetPatch(ModelPatch):
    """A ControlNet with its control image at one strength and step window. A value: nothing in
    it changes; each run's state is a ControlRun in `run.state`."""

    control_net: ControlNet
    image: torch.Tensor  # NHWC in 0..1
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    image_key: str = field(default="", compare=False)

    kind = "controlnet"

    def __post_init__(self):
        if not self.image_key:
            object.__setattr__(self, "image_key", content_hash(self.image))

    def cache_key(self) -> str:
        return f"{self.kind}:" + content_hash(self.control_net.load_key, self.image_key, float(self.strength),
                                              float(self.start), float(self.end), bool(self.guess_mode))

    def describe(self) -> str:
        return f"ControlNet {os.path.basename(self.control_net.path)} ({self.strength:g}, {self.start:g}-{self.end:g})"

    @contextlib.contextmanager
    def applied(self, unet, run) -> Iterator[Optional[ControlRun]]:
        if self.strength == 0.0 or self.end <= self.start:
            yield None
            return
        state = ControlRun(self, run)
        handle = unet.register_forward_pre_hook(state.pre_hook, with_kwargs=True)
        if run is not None:
            run.state[self] = state
        try:
            yield state
        finally:
            handle.remove()
            if run is not None:
                run.state.pop(self, None)


def controlnet_patch(control_net: ControlNet, unet, image: torch.Tensor, strength: float = 1.0,
                     start: float = 0.0, end: float = 1.0, guess_mode: bool = False) -> ControlNetPatch:
    """A ControlNetPatch, checked before any run: the ControlNet fits the UNet, the window is a window."""
    check_fits(control_net, unet)
    if not 0.0 <= start < end <= 1.0:
        raise ControlNetError(f"the step window must satisfy 0 <= start < end <= 1; got start {start}, end {end}")
    return ControlNetPatch(control_net, image.detach().float().cpu().contiguous(), float(strength), float(start),
                           float(end), bool(guess_mode))
