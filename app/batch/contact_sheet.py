"""The contact sheet: every job's first image in a grid, labelled with its axis values (Pillow).

Two crossed axes make a table (first axis down, second across, values as row and column
headings); any other sweep is a grid in job order with each cell captioned by its values. A job
not finished yet is a grey cell (failed ones say so), so the sheet can be redrawn as jobs finish.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from .manifest import FAILED, first_image

CELL = 128
HEADER = 18
MAX_SIDE = 4096  # cells shrink (to 24 px at least) so a sweep of thousands stays a sheet, not a poster
BACKGROUND, EMPTY, INK, FAILED_INK = (255, 255, 255), (225, 225, 225), (20, 20, 20), (170, 20, 20)


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow before 10.1: the bitmap font, one size
        return ImageFont.load_default()


def _value_text(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _fit(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _thumb(rec: dict, out_dir: Path, cell: int):
    from PIL import Image

    path = first_image(rec, out_dir) if rec.get("status") == "done" else None
    if path is None:
        return None
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((cell, cell), Image.NEAREST if max(im.size) <= cell else Image.LANCZOS)
        return im.copy()


def render(records: list[dict], axes, mode: str, out_dir: Path, cell: int = CELL):
    """The sheet as a PIL image. `axes`: the plan's ResolvedAxis list (labels and values)."""
    from PIL import Image, ImageDraw

    font = _font()
    table = mode == "cross" and len(axes) == 2
    if table:
        rows, cols = len(axes[0].values), len(axes[1].values)
        left, top = cell // 2 + 8, HEADER
    else:
        n = max(1, len(records))
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        left, top = 0, 0
    cell = max(24, min(cell, MAX_SIDE // max(cols, 1)))
    cap = 0 if table else HEADER
    width, height = left + cols * cell, top + rows * (cell + cap)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if table:
        draw.text((2, 2), _fit(draw, f"{axes[0].label} \\ {axes[1].label}", font, left + cell), fill=INK, font=font)
        for c, v in enumerate(axes[1].values):
            draw.text((left + c * cell + 4, 3), _fit(draw, _value_text(v), font, cell - 8), fill=INK, font=font)
        for r, v in enumerate(axes[0].values):
            draw.text((2, top + r * cell + cell // 2 - 6), _fit(draw, _value_text(v), font, left - 4), fill=INK, font=font)
    for i, rec in enumerate(sorted(records, key=lambda r: r["index"])):
        r, c = divmod(rec["index"] if table else i, cols)
        x, y = left + c * cell, top + r * (cell + cap)
        image = _thumb(rec, out_dir, cell)
        if image is None:
            draw.rectangle([x + 1, y + 1, x + cell - 2, y + cell - 2], fill=EMPTY)
            if rec.get("status") == FAILED:
                draw.text((x + 6, y + cell // 2 - 6), "failed", fill=FAILED_INK, font=font)
        else:
            sheet.paste(image, (x + (cell - image.width) // 2, y + (cell - image.height) // 2))
        if not table:
            caption = ", ".join(f"{a.label}={_value_text(rec['overrides'].get(a.param))}" for a in axes)
            draw.text((x + 3, y + cell + 2), _fit(draw, caption, font, cell - 6), fill=INK, font=font)
    return sheet


def write_contact_sheet(path: Path, records: list[dict], axes, mode: str, out_dir: Path,
                        cell: int = CELL) -> Optional[Path]:
    from app.graph.png import png_bytes
    from kernels.files import atomic_write

    sheet = render(records, axes, mode, out_dir, cell)
    atomic_write(path, png_bytes(sheet, None), durable=False)
    return path
