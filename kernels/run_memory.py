"""The memory a run will take, estimated from the sizes a graph declares, before anything runs.

Nodes that make or change images and latents declare an estimate (`Node.memory_estimate`): the
`Size` of each output they know, from their params and their inputs' sizes, and the working
memory they need while they run (activations, decode buffers). The executor walks its plan in
order: every output stays alive for the rest of the run (in the run's values and the memory
cache), so the memory at a node is everything made before it, plus its own outputs and working
memory. A run whose peak exceeds the run budget is refused before its first node runs.

The working-memory constants are floors measured on the shipped ShapesT2I and the tiny test
models (bench/reliability.py's `run_memory` section prints the measurement): they are meant to
refuse what cannot fit, never to plan a run to the byte. Large latent models need more than
these floors (their UNet is wider), so a run of theirs can still fail late; none is refused
wrongly.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

from kernels.memory import budget_from_env, default_ram_budget, format_bytes, parse_bytes

RUN_BUDGET_ENV = "LOOMWORK_RUN_BUDGET"
# A run gets this share of the machine's RAM: the models' budget (kernels.memory) and the OS
# share the rest, and one run's peak beyond it is what swaps or kills the process.
RUN_FRACTION = 0.5
MEMORY_CACHE_BUDGET_ENV = "LOOMWORK_MEMORY_CACHE_BUDGET"
# The memory cache of results gets this share of RAM (16 GB: 3.2 GB), a ceiling it fills only
# as results accumulate; a fixed size would be most of a small machine's memory.
MEMORY_CACHE_FRACTION = 0.2
DISK_RESULT_LIMIT_ENV = "LOOMWORK_DISK_RESULT_LIMIT"
DEFAULT_DISK_RESULT_LIMIT = 256 << 20  # a bigger result costs more to write and read than to recompute

FLOAT_BYTES = 4
# Sampler: bytes of UNet activations per image pixel and per batch item, counting classifier-
# free guidance's doubled batch. Measured on ShapesT2I (a pixel-space UNet): the peak RSS of a
# one-step guided run at 128x128 and 256x256 over a 16x16 run is 6.4-7.9 and 5.0 KB a pixel,
# rounded down so that the estimate stays a floor; a latent model's 8x smaller latent has about
# as many bytes of activations per image pixel in its wider UNet.
SAMPLER_BYTES_PER_PIXEL = 4096
# VAEDecode/VAEEncode of a latent VAE: its decoder's full-size activations (128 channels of
# float32, about three alive at once) per image pixel. Pixel-space models have no decoder.
VAE_BYTES_PER_PIXEL = 128 * FLOAT_BYTES * 3
# LoadImage: the decoded file (its mode's bytes), the RGBA copy (4), two float32 RGBA arrays
# alive together in kernels.images.from_pil (32), then the image and mask (16), per pixel.
LOAD_IMAGE_BYTES_PER_PIXEL = 4 + 32
# Unknown before a model loads: an upscale model's scale (the common 4x; 8x models exist).
ASSUMED_UPSCALE = 4
# Pillow's decoded bytes per pixel by mode (modes not listed count 4).
MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
              "RGBA": 4, "RGBa": 4, "CMYK": 4, "RGBX": 4, "I": 4, "F": 4, "I;16": 2,
              "I;16B": 2, "I;16L": 2, "I;16N": 2}


class RunMemoryError(RuntimeError):
    """A run whose estimate exceeds the budget; the message names the node, the sizes and the budget."""


@dataclass(frozen=True)
class Size:
    """The declared shape of an IMAGE, MASK or LATENT: batch x channels x height x width of
    `bytes_per_element`, and `scale` image pixels per element side (a latent VAE's factor; 1 for
    images and pixel-space latents)."""

    batch: int
    channels: int
    height: int
    width: int
    scale: int = 1
    bytes_per_element: int = FLOAT_BYTES

    @property
    def nbytes(self) -> int:
        return self.batch * self.channels * self.height * self.width * self.bytes_per_element

    @property
    def image_pixels(self) -> int:
        """Image pixels of the whole batch (a latent's decoded size)."""
        return self.batch * self.height * self.width * self.scale * self.scale

    def scaled(self, factor: float) -> "Size":
        return Size(self.batch, self.channels, max(1, round(self.height * factor)),
                    max(1, round(self.width * factor)), self.scale, self.bytes_per_element)

    def describe(self, kind: str = "") -> str:
        what = f" {kind}" if kind else ""
        return (f"a {self.batch}x{self.channels}x{self.height}x{self.width}{what} "
                f"({format_bytes(self.nbytes)})")


@dataclass
class Estimate:
    """What a node declares: its outputs' sizes (by port) and its working memory while it runs."""

    outputs: dict[str, Size] = field(default_factory=dict)
    working: int = 0

    @property
    def output_bytes(self) -> int:
        return sum(s.nbytes for s in self.outputs.values())


@dataclass
class Peak:
    node_id: str
    bytes: int
    estimate: Estimate


def run_budget(setting: "int | str | None" = None, device: str = "cpu") -> int:
    """Bytes one run may take: `setting` ("12G" or bytes), else LOOMWORK_RUN_BUDGET, else a share
    of RAM (and of the accelerator's memory, where activations then live)."""
    if setting is not None:
        return parse_bytes(setting, "run budget")
    default = default_ram_budget(RUN_FRACTION)
    if device != "cpu":
        from kernels.memory import default_vram_budget

        default += default_vram_budget(device) or 0
    return budget_from_env(RUN_BUDGET_ENV, default)


def memory_cache_budget(setting: "int | str | None" = None) -> int:
    """Bytes the memory cache of results may hold: `setting` ("2G" or bytes), else
    LOOMWORK_MEMORY_CACHE_BUDGET, else a share of RAM."""
    if setting is not None:
        return parse_bytes(setting, "memory cache budget")
    return budget_from_env(MEMORY_CACHE_BUDGET_ENV, default_ram_budget(MEMORY_CACHE_FRACTION))


def disk_result_limit(setting: "int | str | None" = None) -> int:
    """Bytes above which a result is not stored on disk: `setting`, else LOOMWORK_DISK_RESULT_LIMIT, else 256 MiB."""
    if setting is not None:
        return parse_bytes(setting, "disk result limit")
    return budget_from_env(DISK_RESULT_LIMIT_ENV, DEFAULT_DISK_RESULT_LIMIT)


def plan_peak(order: Iterable[str], wires: Mapping[str, Mapping[str, tuple[str, str]]],
              estimate: Callable[[str, dict[str, Any]], Optional[Estimate]]) -> Optional[Peak]:
    """The node of `order` where the run's memory is largest, and that memory. `wires` maps a
    node to {port: (source node, source port)}; `estimate(node, input_sizes)` gives a node's
    Estimate or None (nothing declared: its outputs count 0 and are of unknown size)."""
    sizes: dict[str, dict[str, Size]] = {}
    held, best = 0, None
    for nid in order:
        inputs = {port: sizes.get(src, {}).get(src_port) for port, (src, src_port) in wires.get(nid, {}).items()}
        est = estimate(nid, inputs)
        if est is None:
            continue
        sizes[nid] = est.outputs
        now = held + est.output_bytes + est.working
        held += est.output_bytes
        if best is None or now > best.bytes:
            best = Peak(nid, now, est)
    return best


def refusal(label: str, peak: Peak, budget: int) -> Optional[str]:
    """The message refusing a run whose peak exceeds `budget` (None when it fits)."""
    if peak.bytes <= budget:
        return None
    made = ", ".join(f"{port}: {size.describe()}" for port, size in peak.estimate.outputs.items())
    parts = [made] if made else []
    if peak.estimate.working:
        parts.append(f"about {format_bytes(peak.estimate.working)} of working memory")
    return (f"{label}: the run would need about {format_bytes(peak.bytes)} here "
            f"({'; '.join(parts)}), over the run budget of {format_bytes(budget)} "
            f"({RUN_BUDGET_ENV}); make the image or batch smaller, or tile it")


# -- estimates of the core kinds of work ----------------------------------------------------
def latent_size(width: int, height: int, batch: int, vae_hint: Any = None) -> Size:
    """EmptyLatent's latent. Before the VAE loads, the largest per pixel the families have: a
    pixel-space model's 3-channel full-size latent (a latent VAE's is 48x smaller)."""
    scale = getattr(vae_hint, "scale_factor", 1)
    channels = getattr(vae_hint, "latent_channels", 3)
    return Size(batch, channels, height // scale, width // scale, scale)


def decoded_size(latent: Size) -> Size:
    return Size(latent.batch, 3, latent.height * latent.scale, latent.width * latent.scale)


def vae_working(image_pixels: int, scale: int, tile: Optional[int]) -> int:
    """A latent VAE's decoder activations, over the whole image or one tile; none in pixel space."""
    if scale == 1:
        return 0
    if tile:
        image_pixels = min(image_pixels, tile * tile)
    return image_pixels * VAE_BYTES_PER_PIXEL


def sampler_working(latent: Size) -> int:
    return latent.image_pixels * SAMPLER_BYTES_PER_PIXEL


def image_header(path: str) -> Optional[tuple[int, int, str]]:
    """(width, height, mode) from an image file's header, not decoding it; None when unreadable
    (the node then says why, when it runs)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the size is what is checked here
            with Image.open(path) as im:
                return im.size[0], im.size[1], im.mode
    except Exception:  # noqa: BLE001 - any unreadable file is the node's to report
        return None


def load_image_estimate(width: int, height: int, mode: str) -> Estimate:
    pixels = width * height
    image, mask = Size(1, 3, height, width), Size(1, 1, height, width)
    return Estimate({"image": image, "mask": mask}, pixels * (MODE_BYTES.get(mode, 4) + LOAD_IMAGE_BYTES_PER_PIXEL))


def max_image_pixels(budget: int) -> int:
    """The most pixels an image file may decode to within `budget` (Pillow's MAX_IMAGE_PIXELS)."""
    return max(1, budget // (4 * 2 + LOAD_IMAGE_BYTES_PER_PIXEL + 16))


@contextmanager
def pillow_pixel_limit(max_pixels: int):
    """Pillow's MAX_IMAGE_PIXELS at `max_pixels`, and its decompression-bomb warning an error, for
    one load: Pillow only warns past the limit and refuses past twice it, so a file that decodes
    to more than the budget allows would otherwise be loaded. Both are module-wide settings, put
    back after."""
    import warnings

    from PIL import Image

    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def release_free_memory() -> None:
    """Give freed heap pages back to the OS after a run (glibc's malloc_trim; elsewhere nothing).
    A run frees large activations around the small results the memory cache keeps; without
    this the heap around those results stays resident, and RSS grows run after run."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl has no malloc_trim)
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
