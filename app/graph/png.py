"""The graph inside the PNGs Loomwork saves: an iTXt chunk keyed `loomwork.graph`."""

from __future__ import annotations

import io
import os
import zlib
from typing import Optional

from PIL import Image, PngImagePlugin

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


# Bounds for reading: a graph is text, so anything near these is a damaged or hostile file.
MAX_GRAPH_BYTES = 64 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_graph_text(path: os.PathLike | str) -> str:
    """The graph JSON of a PNG Loomwork saved. Raises GraphFileError.

    The chunks are read here rather than through Pillow: Pillow refuses text chunks over
    1 MB (MAX_TEXT_CHUNK), so a big graph we wrote ourselves could not be read back; and the
    graph of a PNG whose image data is cut short is still recovered if its own chunk is whole.
    """
    from .fileformat import GraphFileError

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise GraphFileError(f"cannot read: {exc.strerror}", path) from None
    try:
        text = _find_graph_chunk(data)
    except _Damaged as exc:
        raise GraphFileError(f"a damaged PNG: {exc}", path) from None
    if text is None:
        raise GraphFileError("this PNG has no Loomwork graph in it", path)
    return text


class _Damaged(ValueError):
    pass


def _find_graph_chunk(data: bytes) -> Optional[str]:
    if not data.startswith(PNG_SIGNATURE):
        raise _Damaged("not a PNG signature")
    pos = len(PNG_SIGNATURE)
    key = PNG_KEY.encode("latin-1") + b"\0"
    while pos < len(data):
        if pos + 8 > len(data):
            raise _Damaged(f"the file ends inside a chunk header at byte {pos}")
        length = int.from_bytes(data[pos:pos + 4], "big")
        ctype = data[pos + 4:pos + 8]
        end = pos + 8 + length + 4
        if length > 0x7FFFFFFF or end > len(data):
            raise _Damaged(f"chunk {ctype!r} at byte {pos} runs past the end of the file")
        body = data[pos + 8:pos + 8 + length]
        if zlib.crc32(ctype + body) != int.from_bytes(data[end - 4:end], "big"):
            raise _Damaged(f"chunk {ctype!r} at byte {pos} fails its checksum")
        if ctype in (b"iTXt", b"tEXt", b"zTXt") and body.startswith(key):
            return _chunk_text(ctype, body[len(key):])
        if ctype == b"IEND":
            break
        pos = end
    return None


def _chunk_text(ctype: bytes, rest: bytes) -> str:
    try:
        if ctype == b"tEXt":
            return rest.decode("latin-1")
        if ctype == b"zTXt":
            return _inflate(rest[1:]).decode("latin-1")
        compressed, _method = rest[0], rest[1]
        _lang, _, rest = rest[2:].partition(b"\0")
        _translated, _, text = rest.partition(b"\0")
        return (_inflate(text) if compressed else text).decode("utf-8")
    except (IndexError, UnicodeDecodeError, zlib.error) as exc:
        raise _Damaged(f"its graph text cannot be read ({exc})") from None


def _inflate(data: bytes) -> bytes:
    d = zlib.decompressobj()
    out = d.decompress(data, MAX_GRAPH_BYTES)
    if d.unconsumed_tail:
        raise _Damaged(f"its graph text is larger than {MAX_GRAPH_BYTES >> 20} MB")
    return out
