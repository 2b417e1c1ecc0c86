"""Reconstructions and their metrics, shared by the trainer's held-out batch and eval_vae.py; the grid image.

`reconstruct` (encode -> mean or sample -> decode, unclamped) and `image_metrics` (per-image
PSNR / SSIM / LPIPS) are the one path both use, so a held-out number during training equals
what eval_vae.py reports for the same weights, images and batch size.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from diffusers import AutoencoderKL
from PIL import Image, ImageDraw, ImageFont

import data
from vae.metrics import reconstruction_metrics, to_uint8

LATENTS = ("mode", "sample")
GRID_PER_ROW = 8  # tiles per row; more images wrap into further input/recon row pairs
GRID_MIN_TILE = 128  # smaller tiles are upscaled (nearest, integer factor) to at least this size
GRID_PAD = 2  # white pixels between tiles
GRID_CHUNK_GAP = 8  # extra white pixels between one input/recon row group and the next
LABEL_PAD = 6  # pixels left and right of the row labels


def load_images(source, resolution: int, count: int, interpolation: str = "bilinear") -> torch.Tensor:
    """The first `count` images of a source, eval transform (Resize + CenterCrop): (N, 3, R, R) in [-1, 1]."""
    stream = data.build_eval_stream(source, resolution, max_samples=count, interpolation=interpolation)
    images = [sample["pixel_values"] for sample in stream]
    if not images:
        raise data.DataError(f"held-out source {source.path!r} yielded no readable images")
    return torch.stack(images)


def _latent_noise(shape: torch.Size, generator, device: torch.device) -> torch.Tensor:
    """Standard normal noise of `shape` (float32): one generator for the batch, one per image, or the global RNG."""
    if generator is None:
        return torch.randn(shape, device=device)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device)
    # One generator per image: an image's noise does not depend on its batch or position in it.
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device) for g in generator])


@torch.no_grad()
def reconstruct(
    vae: AutoencoderKL,
    images: torch.Tensor,
    *,
    latent: str = "mode",
    batch_size: int,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """encode -> posterior mode (its mean) or a sample -> decode, `batch_size` images at a time.

    images: (B, 3, H, W) in [-1, 1]. Returns the decoder output as float32 (B, 3, H, W), NOT clamped:
    LPIPS sees it as is, PSNR/SSIM clip it themselves. latent="sample" draws z = mean + std·ε with ε
    from `generator`: one torch.Generator for the whole batch, a sequence of B generators (one per
    image, what the evaluator uses so batching and ranks never change the noise), or None (global
    RNG). `autocast`: a context-manager factory wrapped around encode and decode only (e.g.
    `accelerator.autocast`), so mixed precision never reaches the metrics.
    """
    if latent not in LATENTS:
        raise ValueError(f"latent must be one of {LATENTS}, got {latent!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    per_image = generator is not None and not isinstance(generator, torch.Generator)
    if per_image and len(generator) != len(images):
        raise ValueError(f"{len(generator)} generators for {len(images)} images")
    autocast = autocast or contextlib.nullcontext
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        with autocast():
            posterior = vae.encode(chunk).latent_dist  # mean, std: (b, C_lat, H/f, W/f)
            z = posterior.mode()
            if latent == "sample":
                gen = generator[start : start + batch_size] if per_image else generator
                noise = _latent_noise(z.shape, gen, z.device)
                z = posterior.mean + posterior.std * noise.to(z.device, z.dtype)
            recon = vae.decode(z).sample  # (b, 3, H, W)
        out.append(recon.float())
    # Standard layout whatever the decoder's (channels_last models): LPIPS's convolutions round
    # differently per memory layout, and the trainer and the evaluator must get the same numbers.
    return torch.cat(out).contiguous()


@torch.no_grad()
def image_metrics(
    images: torch.Tensor, recon: torch.Tensor, *, lpips: nn.Module | None = None, ssim_window: str = "uniform"
) -> dict[str, torch.Tensor]:
    """Per-image PSNR, SSIM (and LPIPS when a module is given), float64 (B,) each; the trainer and eval_vae.py.

    images, recon: (B, 3, H, W) in [-1, 1]; recon unclamped, as `reconstruct` returns it. PSNR and
    SSIM clip both to [0, 1]; LPIPS sees the unclamped float32 tensors. Runs outside any autocast
    the caller holds, so the numbers do not depend on the training precision.
    """
    images, recon = images.float().contiguous(), recon.float().contiguous()  # one memory layout: same LPIPS bits
    with torch.autocast(images.device.type, enabled=False):
        return reconstruction_metrics(images, recon, lpips=lpips, ssim_window=ssim_window)


@torch.no_grad()
def held_out_metrics(
    vae: AutoencoderKL,
    images: torch.Tensor,
    perceptual: nn.Module | None,
    batch_size: int,
    *,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """({psnr, ssim[, lpips]} means over the images, unclamped float32 reconstructions).

    Exactly what eval_vae.py computes with its default protocol (posterior mean, uniform SSIM
    window) and the same batch size: the same `reconstruct` and `image_metrics`, batch by batch.
    """
    recon = reconstruct(vae, images, latent="mode", batch_size=batch_size, autocast=autocast)
    per_batch = [
        image_metrics(x.float(), r, lpips=perceptual)
        for x, r in zip(images.split(batch_size), recon.split(batch_size), strict=False)
    ]
    return {k: torch.cat([m[k] for m in per_batch]).mean().item() for k in per_batch[0]}, recon


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


def log_images(accelerator, grid: torch.Tensor, step: int) -> None:
    """Send a (3, H, W) uint8 grid to whichever trackers are active."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation/reconstructions", grid, step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation/reconstructions": wandb.Image(grid.permute(1, 2, 0).numpy())}, step=step)
