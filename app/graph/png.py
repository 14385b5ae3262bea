"""The graph inside the PNGs Loomwork saves: an iTXt chunk keyed `loomwork.graph`.

Pillow writes and reads the chunk. It is imported on first use, so loading a `.loom` file never
loads it.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import threading
from typing import TYPE_CHECKING, Iterator, Optional

from .errors import GraphFileError

if TYPE_CHECKING:
    from PIL import Image

PNG_KEY = "loomwork.graph"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Bounds for reading: a graph is text, so anything near these is a damaged or hostile file.
MAX_GRAPH_BYTES = 64 << 20


def png_bytes(image: "Image.Image", graph_text: Optional[str], extra: Optional[dict[str, str]] = None) -> bytes:
    """Encode `image` as PNG carrying the graph JSON (and any extra text fields)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if graph_text is not None:
        info.add_itxt(PNG_KEY, graph_text, zip=True)
    for key, value in (extra or {}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


# Pillow's text limits are module settings; reads that raise them take turns.
_TEXT_LIMITS_LOCK = threading.Lock()


@contextlib.contextmanager
def _graph_sized_text_limits() -> Iterator[None]:
    """Pillow's text-chunk limits raised to a graph's size for one read, then put back: by
    default it refuses text that inflates past 1 MB, less than a big graph we wrote ourselves."""
    from PIL import PngImagePlugin

    with _TEXT_LIMITS_LOCK:
        saved = PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY
        PngImagePlugin.MAX_TEXT_CHUNK = max(saved[0], MAX_GRAPH_BYTES)
        PngImagePlugin.MAX_TEXT_MEMORY = max(saved[1], 2 * MAX_GRAPH_BYTES)  # the graph and other text
        try:
            yield
        finally:
            PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY = saved


def _text_after_image_data(image) -> Optional[str]:
    """The graph of a PNG whose text chunks follow the image data (some tools move them there):
    Pillow reads those only while decoding the pixels, which a pixel bomb must not get to."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        return None
    image.load()
    return image.text.get(PNG_KEY)


def _problem(exc: BaseException) -> str:
    """Pillow's complaint about a PNG, as the sentence a person reads."""
    if isinstance(exc, ValueError) and "MAX_TEXT" in str(exc):  # the text limit it hit, by name
        return f"its text is larger than {MAX_GRAPH_BYTES >> 20} MB, more than any graph"
    if isinstance(exc.__cause__, struct.error) or (isinstance(exc, OSError) and "truncated" in str(exc).lower()):
        return "a damaged PNG, no Loomwork graph can be read from it: the file is cut short"
    return f"a damaged PNG, no Loomwork graph can be read from it: {exc}"


def read_graph_text(path: os.PathLike | str, data: Optional[bytes] = None) -> str:
    """The graph JSON of a PNG Loomwork saved (`data`: its bytes, if already read). Raises
    GraphFileError, whatever the damage.

    The graph of a PNG whose image data is cut short is still recovered if its own chunk, which
    Loomwork writes before the image data, is whole.
    """
    from PIL import PngImagePlugin

    if data is not None:
        f = io.BytesIO(data)
    else:
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise GraphFileError(f"cannot read: {exc.strerror}", path) from None
    try:
        with f, _graph_sized_text_limits(), PngImagePlugin.PngImageFile(f) as image:
            text = image.info.get(PNG_KEY)  # the text chunks before the image data
            if text is None:
                text = _text_after_image_data(image)
    except (SyntaxError, OSError, ValueError) as exc:  # how Pillow reports a broken or oversized PNG
        raise GraphFileError(_problem(exc), path) from None
    except Exception as exc:  # noqa: BLE001 - any other failure of Pillow on hostile bytes is damage too
        raise GraphFileError(f"a damaged PNG, no Loomwork graph can be read from it: "
                             f"{type(exc).__name__}: {exc}", path) from None
    if text is None:
        raise GraphFileError("this PNG has no Loomwork graph in it", path)
    return str(text)  # an iTXt chunk comes back as Pillow's str subclass
