"""Contact sheets of CT slices, drawn with Pillow (no matplotlib), fast enough for every series of a
study."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def montage(
    images: list[np.ndarray],
    captions: list[str],
    columns: int = 8,
    title: str = "",
    colors: list[str] | None = None,
    side: int = 128,
) -> Image.Image:
    """A grid of grey thumbnails, each with a caption and an optional coloured frame
    (e.g. green kept / red rejected). Drawn with Pillow: fast enough for every series of a study."""
    colors = colors or [None] * len(images)
    rows = max(1, -(-len(images) // columns))
    caption_h, title_h, pad = 24, 22 if title else 0, 4
    cell_w, cell_h = side + 2 * pad, side + caption_h + 2 * pad
    sheet = Image.new("RGB", (columns * cell_w, title_h + rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, 4), title, fill="black")
    for k, (image, caption, color) in enumerate(zip(images, captions, colors, strict=False)):
        x = (k % columns) * cell_w + pad
        y = title_h + (k // columns) * cell_h + pad
        thumb = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize(
            (side, side), Image.Resampling.BILINEAR
        )
        sheet.paste(thumb.convert("RGB"), (x, y + caption_h))
        if color:
            draw.rectangle(
                [x - 2, y + caption_h - 2, x + side + 1, y + caption_h + side + 1],
                outline=color,
                width=3,
            )
        draw.multiline_text((x, y), caption, fill=color or "black", spacing=1)
    return sheet
