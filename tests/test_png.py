"""Reading the graph out of a PNG through Pillow: where the chunk may sit, and Pillow's own text
limits left as they were (the file-format tests cover round trips and damaged files)."""

from __future__ import annotations

import struct
import zlib

import pytest
from PIL import Image, PngImagePlugin

from app.graph import Graph, GraphFileError, dumps, load
from app.graph.png import MAX_GRAPH_BYTES, png_bytes, read_graph_text


def _graph_text() -> str:
    g = Graph(meta={"note": "after the pixels"})
    g.add_node("EmptyLatent", {"width": 64}, title="Empty")
    return dumps(g)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_graph_chunk_after_the_image_data_is_found(tmp_path):
    """Some tools move text chunks behind the image data; Pillow reads them while decoding."""
    data = png_bytes(Image.new("RGB", (8, 8), (1, 2, 3)), None)
    iend = data.index(b"IEND") - 4
    text = _graph_text()
    path = tmp_path / "late.png"
    path.write_bytes(data[:iend] + _chunk(b"tEXt", b"loomwork.graph\0" + text.encode("latin-1")) + data[iend:])
    assert read_graph_text(path) == text
    assert dumps(load(path)) == text


def test_a_big_graph_leaves_pillows_text_limits_as_they_were(tmp_path):
    before = PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY
    text = '{"pad": "' + "x" * (3 << 20) + '"}'  # past Pillow's 1 MB default, inside ours
    assert before[0] < len(text) < MAX_GRAPH_BYTES
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(Image.new("RGB", (4, 4)), text))
    assert read_graph_text(path) == text
    assert (PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY) == before
    path.write_bytes(path.read_bytes()[:100])  # and after a read that fails
    with pytest.raises(GraphFileError, match="damaged PNG"):
        read_graph_text(path)
    assert (PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY) == before
