"""Small helpers shared by the pipelines' nodes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.utils import make_grid


def mask_to_image(mask: torch.Tensor) -> torch.Tensor:
    """A ``{0, 1}`` mask (1 = missing) as an image in ``[-1, 1]``: missing pixels white."""
    return mask.float() * 2.0 - 1.0


def make_image_grid(
    columns: Sequence[torch.Tensor],
    nrow: int | None = None,
    scale: int = 1,
    padding: int = 2,
    pad_value: float = 0.5,
) -> Image.Image:
    """Columns of images side by side, one row per example, as a PIL image.

    columns: batches ``(N_i, C_i, H, W)`` in ``[-1, 1]`` (values outside are clipped), e.g.
        ``[corrupted, restored, clean]``; row ``r`` shows example ``r`` of every column. Columns
        may mix 1 and 3 channels (gray ones are repeated to RGB).
    nrow: number of examples (rows) to show, from the front of each column; default: all that
        every column has.
    scale: integer nearest-neighbour enlargement, so that small images stay legible.
    padding, pad_value: width of the separating lines and their gray level in ``[0, 1]``.

    Returns an ``L`` image when every column is gray, else ``RGB``.
    """
    if not columns:
        raise ValueError("make_image_grid needs at least one column")
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
        return Image.fromarray(pixels[0].numpy())
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())
