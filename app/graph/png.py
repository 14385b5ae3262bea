"""The graph inside the PNGs Loomwork saves: an iTXt chunk keyed `loomwork.graph`."""

from __future__ import annotations

import io
import os
from typing import Optional

from PIL import Image, PngImagePlugin, UnidentifiedImageError

PNG_KEY = "loomwork.graph"


def png_bytes(image: Image.Image, graph_text: Optional[str], extra: Optional[dict[str, str]] = None) -> bytes:
    """Encode `image` as PNG carrying the graph JSON (and any extra text fields)."""
    info = PngImagePlugin.PngInfo()
    if graph_text is not None:
        info.add_itxt(PNG_KEY, graph_text, zip=True)
    for key, value in (extra or {}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_graph_text(path: os.PathLike | str) -> str:
    from .fileformat import GraphFileError
    try:
        with Image.open(path) as im:
            im.load()  # text chunks after the image data are only read by load()
            text = getattr(im, "text", {}).get(PNG_KEY)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise GraphFileError(f"a damaged PNG: {exc}", path) from None
    if text is None:
        raise GraphFileError("this PNG has no Loomwork graph in it", path)
    return text
