"""The reconstruction grid: inputs above their reconstructions, labelled rows, small tiles upscaled."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from metrics.pixel import to_uint8

GRID_PER_ROW = 8  # tiles per row; more images wrap into further input/recon row pairs
GRID_MIN_TILE = 128  # smaller tiles are upscaled (nearest, integer factor) to at least this size
GRID_PAD = 2  # white pixels between tiles
GRID_CHUNK_GAP = 8  # extra white pixels between one input/recon row group and the next
LABEL_PAD = 6  # pixels left and right of the row labels


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 images as they are; float images in [-1, 1] rounded to uint8 (clipped). On the CPU."""
    return x.cpu() if x.dtype == torch.uint8 else to_uint8(x.detach().cpu(), "round")


def upscale_factor(size: int, min_tile: int = GRID_MIN_TILE) -> int:
    """The integer factor that brings a tile of `size` pixels to at least `min_tile` (1 when already there)."""
    return 1 if size >= min_tile else -(-min_tile // size)


def _label_font(tile: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font, scaled with the tile (about a tenth of it, at least 10 px) where FreeType is present."""
    try:
        return ImageFont.load_default(size=max(10, tile // 10))
    except (TypeError, ValueError, OSError, ImportError):  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def label_margin(labels: Sequence[str], tile: int) -> int:
    """Width in pixels of the left margin holding the row labels of a grid with `tile`-pixel tiles."""
    font = _label_font(tile)
    return 2 * LABEL_PAD + max(math.ceil(font.getlength(text)) for text in labels)


def save_grid(
    images: torch.Tensor,
    recon: torch.Tensor | Sequence[torch.Tensor],
    path: str | None,
    *,
    labels: Sequence[str] | None = None,
    per_row: int = GRID_PER_ROW,
    min_tile: int = GRID_MIN_TILE,
) -> torch.Tensor:
    """Inputs and their reconstructions, labelled, as a (3, H, W) uint8 grid; also a PNG at `path` (None: not saved).

    images: (N, 3, h, w); recon: one such tensor or a sequence of them (several models). Float
    tensors are [-1, 1] (rounded to uint8), uint8 ones are used as they are. For each chunk of
    `per_row` images: a row of inputs, then one row of reconstructions per recon tensor, each row
    labelled in a left margin (labels default to "input", "recon"). Tiles smaller than `min_tile`
    pixels are upscaled by an integer factor, nearest neighbour, so small runs stay readable.
    """
    recons = [recon] if torch.is_tensor(recon) else list(recon)
    rows = [_as_uint8(images), *(_as_uint8(r) for r in recons)]  # each (N, 3, h, w) uint8
    if labels is None:
        labels = ["input", "recon"] if len(recons) == 1 else ["input", *(f"recon {i + 1}" for i in range(len(recons)))]
    labels = [str(label) for label in labels]
    if len(labels) != len(rows):
        raise ValueError(f"{len(labels)} labels for {len(rows)} rows (inputs + {len(recons)} reconstructions)")
    if any(r.shape != rows[0].shape for r in rows) or rows[0].ndim != 4 or rows[0].shape[1] != 3:
        shapes = [tuple(r.shape) for r in rows]
        raise ValueError(f"images and reconstructions must share one (N, 3, h, w) shape, got {shapes}")
    n, _, h, w = rows[0].shape
    if n == 0:
        raise ValueError("no images for the grid")
    k = upscale_factor(min(h, w), min_tile)
    if k > 1:
        rows = [r.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3) for r in rows]
    th, tw = h * k, w * k
    cols, chunks = min(per_row, n), -(-n // per_row)
    margin = label_margin(labels, th)
    group_h = len(rows) * (th + GRID_PAD)
    height = GRID_PAD + chunks * group_h + (chunks - 1) * GRID_CHUNK_GAP
    width = margin + GRID_PAD + cols * (tw + GRID_PAD)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    label_rows = []
    for c in range(chunks):
        y0 = GRID_PAD + c * (group_h + GRID_CHUNK_GAP)
        for r, tiles in enumerate(rows):
            y = y0 + r * (th + GRID_PAD)
            label_rows.append((labels[r], y))
            for j, tile in enumerate(tiles[c * per_row : (c + 1) * per_row]):
                x = margin + GRID_PAD + j * (tw + GRID_PAD)
                canvas[y : y + th, x : x + tw] = tile.permute(1, 2, 0).numpy()
    picture = Image.fromarray(canvas)
    draw, font = ImageDraw.Draw(picture), _label_font(th)
    for text, y in label_rows:
        top, bottom = draw.textbbox((0, 0), text, font=font)[1::2]
        draw.text((LABEL_PAD, y + (th - (bottom - top)) // 2 - top), text, fill=(0, 0, 0), font=font)
    if path is not None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        picture.save(path)
    return torch.from_numpy(np.array(picture)).permute(2, 0, 1).contiguous()
