"""Small helpers shared by the pipelines' nodes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

#: Height in pixels of the band of column titles above a grid (two lines of small text).
TITLE_BAND = 30
_TITLE_FONT_SIZE = 11
_TITLE_LINE = 13


def mask_to_image(mask: torch.Tensor) -> torch.Tensor:
    """A ``{0, 1}`` mask (1 = missing) as an image in ``[-1, 1]``: missing pixels white."""
    return mask.float() * 2.0 - 1.0


def make_image_grid(
    columns: Sequence[torch.Tensor],
    nrow: int | None = None,
    scale: int = 1,
    padding: int = 2,
    pad_value: float = 0.5,
    titles: Sequence[str] | None = None,
) -> Image.Image:
    """Columns of images side by side, one row per example, as a PIL image.

    columns: batches ``(N_i, C_i, H, W)`` in ``[-1, 1]`` (values outside are clipped), e.g.
        ``[corrupted, restored, clean]``; row ``r`` shows example ``r`` of every column. Columns
        may mix 1 and 3 channels (gray ones are repeated to RGB).
    nrow: number of examples (rows) to show, from the front of each column; default: all that
        every column has.
    scale: integer nearest-neighbour enlargement, so that small images stay legible.
    padding, pad_value: width of the separating lines and their gray level in ``[0, 1]``.
    titles: one title per column (e.g. ``corrupted``, ``teacher NFE 10``, ``student NFE 1``,
        ``clean``), written in a white band of :data:`TITLE_BAND` pixels above the columns.

    Returns an ``L`` image when every column is gray, else ``RGB``.
    """
    if not columns:
        raise ValueError("make_image_grid needs at least one column")
    if titles is not None and len(titles) != len(columns):
        raise ValueError(f"got {len(titles)} titles for {len(columns)} columns")
    shapes = {tuple(column.shape[-2:]) for column in columns}
    if len(shapes) != 1 or any(column.ndim != 4 for column in columns):
        shown = [tuple(column.shape) for column in columns]
        raise ValueError(f"columns must be (N, C, H, W) batches of one image size, got {shown}")
    rows = min(len(column) for column in columns)
    if nrow is not None:
        if nrow < 1:
            raise ValueError(f"nrow must be at least 1, got {nrow}")
        rows = min(rows, nrow)
    if rows == 0:
        raise ValueError("make_image_grid got an empty column")
    channels = max(column.shape[1] for column in columns)
    if channels not in (1, 3) or any(column.shape[1] not in (1, channels) for column in columns):
        raise ValueError(f"columns must have 1 or 3 channels, got {[c.shape[1] for c in columns]}")

    prepared = [
        ((column[:rows].detach().cpu().float().clamp(-1.0, 1.0) + 1.0) / 2.0).expand(-1, channels, -1, -1)
        for column in columns
    ]
    # Interleave so that the images of one example are consecutive: one grid row per example.
    tiles = torch.stack(prepared, dim=1).flatten(0, 1)
    if scale > 1:
        tiles = torch.nn.functional.interpolate(tiles, scale_factor=scale, mode="nearest")
    grid = make_grid(tiles, nrow=len(columns), padding=padding, pad_value=pad_value)
    pixels = (grid * 255.0).round().clamp(0, 255).to(torch.uint8)
    if channels == 1:
        image = Image.fromarray(pixels[0].numpy())
    else:
        image = Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())
    if titles is None:
        return image
    return _with_titles(image, titles, column_width=tiles.shape[-1] + padding, padding=padding)


def _wrap(text: str, width: int, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont) -> list[str]:
    """``text`` in at most two lines that fit ``width`` where the words allow it."""
    words, lines = text.split(), [""]
    for word in words:
        candidate = f"{lines[-1]} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not lines[-1] or len(lines) == 2:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def _with_titles(image: Image.Image, titles: Sequence[str], column_width: int, padding: int) -> Image.Image:
    """``image`` under a white band with each column's title centred above it."""
    white = 255 if image.mode == "L" else (255, 255, 255)
    black = 0 if image.mode == "L" else (0, 0, 0)
    titled = Image.new(image.mode, (image.width, image.height + TITLE_BAND), white)
    titled.paste(image, (0, TITLE_BAND))
    draw = ImageDraw.Draw(titled)
    font = ImageFont.load_default(size=_TITLE_FONT_SIZE)
    for index, title in enumerate(titles):
        centre = padding + index * column_width + (column_width - padding) / 2
        for line_index, line in enumerate(_wrap(title, column_width - padding, draw, font)):
            x = centre - draw.textlength(line, font=font) / 2
            draw.text((x, 2 + line_index * _TITLE_LINE), line, fill=black, font=font)
    return titled
