"""Held-out reconstructions during training: a fixed batch, PSNR/SSIM/LPIPS, a grid image."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
from diffusers import AutoencoderKL
from PIL import Image
from torchvision.utils import make_grid

import data
from vae.metrics import reconstruction_metrics


def load_images(source, resolution: int, count: int, interpolation: str = "bilinear") -> torch.Tensor:
    """The first `count` images of a source, eval transform (Resize + CenterCrop): (N, 3, R, R) in [-1, 1]."""
    stream = data.build_eval_stream(source, resolution, max_samples=count, interpolation=interpolation)
    images = [sample["pixel_values"] for sample in stream]
    if not images:
        raise data.DataError(f"held-out source {source.path!r} yielded no readable images")
    return torch.stack(images)


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Deterministic reconstructions from the posterior mean, clamped to [-1, 1]."""
    out = []
    for chunk in images.split(batch_size):
        z = vae.encode(chunk).latent_dist.mode()
        out.append(vae.decode(z).sample.float().clamp(-1, 1))
    return torch.cat(out)


@torch.no_grad()
def held_out_metrics(vae: AutoencoderKL, images: torch.Tensor, perceptual: nn.Module | None, batch_size: int):
    """({psnr, ssim[, lpips]} means over the batch, reconstructions), via the evaluator's metrics."""
    recon = reconstruct(vae, images, batch_size)
    per_image = reconstruction_metrics(images.float(), recon, lpips=perceptual)
    return {k: v.mean().item() for k, v in per_image.items()}, recon


def save_grid(images: torch.Tensor, recon: torch.Tensor, path: str) -> torch.Tensor:
    """Inputs on the top row, reconstructions below; saved as PNG, returned as (3, H, W) uint8."""
    both = torch.cat([images.float().cpu(), recon.float().cpu()])
    grid = make_grid(both, nrow=len(images), padding=2, normalize=True, value_range=(-1, 1))
    grid = (grid * 255).round().clamp(0, 255).to(torch.uint8)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(np.ascontiguousarray(grid.permute(1, 2, 0).numpy())).save(path)
    return grid


def log_images(accelerator, grid: torch.Tensor, step: int) -> None:
    """Send a (3, H, W) uint8 grid to whichever trackers are active."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation/reconstructions", grid, step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation/reconstructions": wandb.Image(grid.permute(1, 2, 0).numpy())}, step=step)
