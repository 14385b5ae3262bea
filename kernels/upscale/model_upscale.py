"""Super-resolution and restoration models (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, SPAN, ...)
through spandrel, which tells the architecture and its hyper-parameters from the weights' names
and shapes, run tile by tile within a memory budget.

A file is read here, not by spandrel's `ModelLoader.load_from_file`: that opens `.pt` files with
`torch.jit.load` (a TorchScript program) and pickles with its own unpickler. Here a
`.safetensors` file is read by safetensors, and a pickled `.pth`/`.pt`/`.ckpt`/`.bin` only by
`torch.load(weights_only=True)`, which rebuilds tensors and plain containers and refuses any
other global, so a crafted file cannot run code. The state dict then goes through spandrel's
`canonicalize_state_dict` and `MAIN_REGISTRY`.

Memory: the activations a model needs grow with the pixels it sees, so a probe measures them once
on a small tile (`activation_bytes_per_pixel`, every tensor allocated during the forward pass
counted until it is freed) and the tile is the largest square that fits the budget beside the
result buffer. The probe assumes activations grow linearly with the tile's area, which holds
for convolutional and windowed-attention models.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from kernels.hashing import key_of
from kernels.upscale.tiling import TileGrid, plan_tiles, tiled_apply

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".pth", ".pt", ".ckpt", ".bin")
DEFAULT_TILE = 0  # 0: the largest tile the memory budget allows
DEFAULT_OVERLAP = 32  # input pixels shared by neighbouring tiles
DEFAULT_MEMORY_BUDGET_MB = 2048
PROBE_SIZE = 64  # input pixels per side of the tile the activation probe runs on
MIN_TILE = 64  # smaller tiles spend more on their overlaps than on the image
# Share of the room beside the result that tiles plan to use: the allocator's slack (freed tile
# buffers of other sizes not yet reused) is the rest; bench/upscale.py measures the real peak.
TILE_HEADROOM = 0.5


class UpscaleModelError(ValueError):
    """A model file that cannot be used as an upscaler, or a run that cannot fit; the message
    names the file or the value."""


@dataclass(frozen=True)
class UpscaleModel:
    """UPSCALE_MODEL: a spandrel image model and what it needs of its input."""

    descriptor: Any  # spandrel.ImageModelDescriptor
    module: torch.nn.Module  # the descriptor's network, a field so the model manager finds it
    source: str
    load_key: str
    architecture: str
    scale: int
    input_channels: int
    output_channels: int
    multiple_of: int = 1
    minimum: int = 0
    tiling: str = "supported"  # "supported", "discouraged" or "internal" (must not be tiled)

    def content_key(self) -> str:
        return key_of("UPSCALE_MODEL", self.load_key)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW in 0..1 at the model's device and dtype -> NCHW in 0..1, `scale` times larger."""
        return self.descriptor(x)


@dataclass(frozen=True)
class UpscalePlan:
    """What a run used: the tile (clamped to the image), overlap, grid, and the memory estimate."""

    tile_h: int
    tile_w: int
    overlap: int
    tiles: int
    bytes_per_pixel: int
    result_bytes: int
    estimated_bytes: int
    clamped: bool  # the asked tile was larger than the image


def read_state_dict(path: str) -> dict:
    """The tensors of a model file, never running code from it."""
    lower = path.lower()
    if not os.path.isfile(path):
        raise UpscaleModelError(f"upscale model file {path!r} does not exist")
    if lower.endswith(SAFETENSORS_EXTENSIONS):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise UpscaleModelError(f"{path}: not a readable safetensors file ({exc})") from None
    if lower.endswith(PICKLE_EXTENSIONS):
        import pickle

        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            reason = _unpickler_reason(exc)
            if "global" not in reason.lower():
                raise UpscaleModelError(f"{path}: not a readable PyTorch weights file ({reason})") from None
            raise UpscaleModelError(
                f"{path}: refused: the pickle holds more than tensors ({reason}); only plain "
                f"weights are loaded from pickles, since unpickling anything else can run code") from None
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise UpscaleModelError(f"{path}: not a readable PyTorch weights file ({exc})") from None
    raise UpscaleModelError(f"{path}: unsupported file type; an upscale model is a .safetensors "
                            f"or .pth file")


def _unpickler_reason(exc: Exception) -> str:
    """The one line of torch's weights-only refusal that says what it met."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [t.strip() for t in text.splitlines() if t.strip()]
    return lines[0].split(". ")[0] if lines else type(exc).__name__


def model_from_state_dict(state_dict: Any, source: str, load_key: str = "") -> UpscaleModel:
    """Detect the architecture with spandrel and build the model (CPU, float32, eval)."""
    import spandrel

    if not isinstance(state_dict, dict) or not state_dict:
        raise UpscaleModelError(f"{source}: holds no state dict of weights")
    state_dict = spandrel.canonicalize_state_dict(state_dict)
    try:
        descriptor = spandrel.MAIN_REGISTRY.load(state_dict)
    except spandrel.UnsupportedModelError:
        raise UpscaleModelError(
            f"{source}: spandrel cannot identify this model's architecture from its weights "
            f"(is it an upscaler? supported: ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, SPAN, ...)") from None
    except (KeyError, RuntimeError, ValueError, IndexError, AssertionError) as exc:
        raise UpscaleModelError(f"{source}: looks like a {_guess(state_dict)} model but its weights "
                                f"do not fit it ({type(exc).__name__}: {exc})") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise UpscaleModelError(f"{source}: is a {descriptor.architecture.name} "
                                f"{descriptor.purpose.lower()} model, not an image-to-image upscaler")
    req = descriptor.size_requirements
    return UpscaleModel(
        descriptor=descriptor.eval(), module=descriptor.model, source=source, load_key=load_key or source,
        architecture=descriptor.architecture.name, scale=descriptor.scale,
        input_channels=descriptor.input_channels, output_channels=descriptor.output_channels,
        multiple_of=req.multiple_of, minimum=req.minimum, tiling=descriptor.tiling.name.lower())


def _guess(state_dict: dict) -> str:
    import spandrel

    for support in spandrel.MAIN_REGISTRY.architectures("detection"):
        try:
            if support.detect(state_dict):
                return support.architecture.name
        except Exception:  # a detector that trips over foreign keys says only "not mine"
            continue
    return "known"


def load_upscale_model(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> UpscaleModel:
    """Load an upscale model file; the call shape of the model manager's loaders."""
    from kernels.models import model_folder_key

    model = model_from_state_dict(read_state_dict(path), path, model_folder_key(path, dtype, device))
    d = model.descriptor
    if dtype == torch.float16 and not d.supports_half:
        raise UpscaleModelError(f"{path}: this {model.architecture} model does not run in float16")
    if dtype == torch.bfloat16 and not d.supports_bfloat16:
        raise UpscaleModelError(f"{path}: this {model.architecture} model does not run in bfloat16")
    d.to(device=torch.device(device), dtype=dtype)
    return model


# -- memory ------------------------------------------------------------------------------------

class TensorMemoryMeter:
    """Counts the bytes of every tensor allocated inside the context until it is freed, and
    keeps the peak: torch has no allocator statistics on the CPU, so this watches each op's
    outputs (views of a counted tensor add nothing)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        meter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                meter._count(out)
                return out

        self._mode = _Mode()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _count(self, out) -> None:
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self._live:
                continue
            self._live[key] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def activation_bytes_per_pixel(model: UpscaleModel, size: int = PROBE_SIZE) -> int:
    """Peak bytes a forward pass allocates per input pixel (its output included), measured on a
    `size` x `size` tile of the model's own grid."""
    side = max(size, model.minimum)
    side += -side % model.multiple_of
    d = model.descriptor
    probe = torch.rand(1, model.input_channels, side, side, generator=torch.Generator().manual_seed(0))
    probe = probe.to(d.device, d.dtype)
    with torch.inference_mode(), TensorMemoryMeter() as meter:
        model(probe)
    return math.ceil(meter.peak / (side * side))


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB"


def plan_upscale(model: UpscaleModel, height: int, width: int, *, batch: int = 1,
                 tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET_MB << 20,
                 bytes_per_pixel: Optional[int] = None) -> UpscalePlan:
    """Choose the tile for an image (or check the one asked for) against the budget: the float32
    result buffer, then one tile's activations (plus its weighted copy when there are several)."""
    s, c = model.scale, model.output_channels
    result = batch * height * s * width * s * c * 4
    if result >= memory_budget:
        raise UpscaleModelError(
            f"a {width * s}x{height * s} result ({batch} image(s), x{s}) needs {_mb(result)}, "
            f"more than the memory budget of {_mb(memory_budget)}: upscale a smaller image or "
            f"raise the budget")
    activations = bytes_per_pixel or activation_bytes_per_pixel(model)
    per_pixel = activations + 2 * s * s * c * 4  # a tile's output weighted, then added in
    room = int((memory_budget - result) * TILE_HEADROOM)
    if model.tiling == "internal":  # tiles itself, or needs the whole image at once
        asked = (height, width)
    elif tile > 0:
        asked = (tile, tile)
    elif height * width * activations <= room:  # one pass fits
        asked = (height, width)
    else:
        side = int(math.isqrt(room // per_pixel))
        side -= side % max(8, model.multiple_of)
        if side < min(MIN_TILE, height, width):
            raise UpscaleModelError(
                f"the memory budget of {_mb(memory_budget)} leaves {_mb(room)} for tiles beside the result, "
                f"less than a {MIN_TILE}x{MIN_TILE} tile of this {model.architecture} model needs "
                f"({_mb(per_pixel * MIN_TILE * MIN_TILE)}): raise the budget")
        asked = (side, side)
    grid = plan_tiles(height, width, asked, overlap, model.multiple_of)
    step = max(8, model.multiple_of)
    while tile <= 0 and not grid.single and per_pixel * _largest_tile(grid) > room \
            and asked[0] - step >= min(MIN_TILE, height, width):
        # plan_tiles evens the tiles out over the image, which can make them larger than asked
        asked = (asked[0] - step, asked[1] - step)
        grid = plan_tiles(height, width, asked, overlap, model.multiple_of)
    if grid.single:  # the output is copied into the result as it is, never weighted
        per_pixel = activations
    tile_bytes = per_pixel * _largest_tile(grid)
    if tile_bytes > room:
        raise UpscaleModelError(
            f"a {grid.tile_w}x{grid.tile_h} tile of this {model.architecture} model needs "
            f"{_mb(tile_bytes)} beside the {_mb(result)} result, over the memory budget of "
            f"{_mb(memory_budget)}: use a smaller tile (0 chooses one) or raise the budget")
    clamped = tile > 0 and (tile > height or tile > width)
    return UpscalePlan(grid.tile_h, grid.tile_w, grid.overlap, grid.count, per_pixel, result,
                       result + tile_bytes, clamped)


def _largest_tile(grid: TileGrid) -> int:
    return max(e - s for s, e in grid.rows) * max(e - s for s, e in grid.cols)


def upscale_images(model: UpscaleModel, images: torch.Tensor, plan: UpscalePlan,
                   progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """IMAGE (NHWC, 0..1) -> IMAGE `model.scale` times larger, one image and tile at a time."""
    if images.shape[-1] != model.input_channels:
        raise UpscaleModelError(f"{model.source}: the model takes {model.input_channels}-channel "
                                f"images, got {images.shape[-1]} channels")
    d = model.descriptor
    n, h, w, _ = images.shape
    out = torch.empty(n, h * model.scale, w * model.scale, model.output_channels)
    total = n * plan.tiles

    def run_tile(tile: torch.Tensor) -> torch.Tensor:
        return model(tile.to(d.device, d.dtype)).float().cpu()

    with torch.inference_mode():
        for i in range(n):
            def step(done, _count, i=i):
                if progress:
                    progress(i * plan.tiles + done, total)

            x = images[i:i + 1].permute(0, 3, 1, 2)
            tiled_apply(run_tile, x, scale=model.scale, tile=(plan.tile_h, plan.tile_w),
                        overlap=plan.overlap, multiple_of=model.multiple_of, channels_last=True,
                        out=out[i:i + 1], progress=step)
    return out
