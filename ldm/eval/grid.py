"""A contact sheet of images with optional captions, for reports and training logs."""

from __future__ import annotations

import math
import textwrap

from PIL import Image, ImageDraw, ImageFont

from ldm.errors import LdmError

PAD = 4  # pixels between cells
LINE_HEIGHT = 12  # pixels per caption line (PIL's default bitmap font is ~11 px tall)


def make_grid(
    images: list[Image.Image], ncols: int, captions: list[str] | None = None, *, caption_lines: int = 3
) -> Image.Image:
    """Lay out `images` row-major in `ncols` columns of equal cells (the largest image's size), captions below each."""
    if not images:
        raise LdmError("make_grid: no images")
    if captions is not None and len(captions) != len(images):
        raise LdmError(f"make_grid: {len(images)} images but {len(captions)} captions")
    ncols = max(1, min(ncols, len(images)))
    nrows = math.ceil(len(images) / ncols)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    text_h = caption_lines * LINE_HEIGHT + PAD if captions is not None else 0
    grid = Image.new(
        "RGB", (ncols * cell_w + (ncols + 1) * PAD, nrows * (cell_h + text_h) + (nrows + 1) * PAD), "white"
    )
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    chars_per_line = max(4, cell_w // 6)  # the default font is ~6 px per character
    for i, im in enumerate(images):
        row, col = divmod(i, ncols)
        x = PAD + col * (cell_w + PAD)
        y = PAD + row * (cell_h + text_h + PAD)
        grid.paste(im.convert("RGB"), (x, y))
        if captions is not None:
            lines = textwrap.wrap(captions[i], chars_per_line)[:caption_lines] or [""]
            for k, line in enumerate(lines):
                draw.text((x, y + cell_h + PAD // 2 + k * LINE_HEIGHT), line, fill="black", font=font)
    return grid
