"""Reconstructions and their metrics: the one path of the trainer's held-out batch and of eval_vae.py.

`reconstruct` (encode -> mean or sample -> decode, unclamped) and `image_metrics` (per-image
PSNR / SSIM / LPIPS) are what both use, so a held-out number during training equals what
eval_vae.py reports for the same weights, images and batch size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from diffusers import AutoencoderKL

import data
from common.errors import DataError
from metrics.pixel import psnr, ssim, to_unit

LATENTS = ("mode", "sample")


def load_images(source, resolution: int, count: int, interpolation: str = "bilinear") -> torch.Tensor:
    """The first `count` images of a source, eval transform (Resize + CenterCrop): (N, 3, R, R) in [-1, 1]."""
    stream = data.build_eval_stream(source, resolution, max_samples=count, interpolation=interpolation)
    images = [sample["pixel_values"] for sample in stream]
    if not images:
        raise DataError(f"held-out source {source.path!r} yielded no readable images")
    return torch.stack(images)


def latent_noise(shape: torch.Size, generator, device: torch.device) -> torch.Tensor:
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
                noise = latent_noise(z.shape, gen, z.device)
                z = posterior.mean + posterior.std * noise.to(z.device, z.dtype)
            recon = vae.decode(z).sample  # (b, 3, H, W)
        out.append(recon.float())
    # Standard layout whatever the decoder's (channels_last models): LPIPS's convolutions round
    # differently per memory layout, and the trainer and the evaluator must get the same numbers.
    return torch.cat(out).contiguous()


@torch.no_grad()
def noisy_reconstructions(
    vae: AutoencoderKL,
    images: torch.Tensor,
    sigmas: Sequence[float],
    generator: torch.Generator | Sequence[torch.Generator] | None,
    *,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[float, torch.Tensor]:
    """{σ: decode(μ + σ / scaling_factor · ε)} for each σ: how the decoder degrades with latent noise.

    images: (B, 3, H, W) in [-1, 1]; μ is the posterior mean; σ is in units of the normalised latent
    (z − shift_factor) · scaling_factor, the space a diffusion model works in (unit std when the config's factors
    were measured, as an exported model's are); ε ~ N(0, I) is drawn once (latent_noise: one generator per image
    makes it independent of batching) and shared by every σ. Returns float32 (B, 3, H, W) unclamped, as
    `reconstruct`.
    """
    autocast = autocast or contextlib.nullcontext
    scale = float(getattr(vae.config, "scaling_factor", None) or 1.0)
    with autocast():
        mean = vae.encode(images).latent_dist.mean
    noise = latent_noise(mean.shape, generator, mean.device).to(mean.device, mean.dtype)
    out = {}
    for sigma in sigmas:
        with autocast():
            out[sigma] = vae.decode(mean + (sigma / scale) * noise).sample.float().contiguous()
    return out


@torch.no_grad()
def image_metrics(
    images: torch.Tensor, recon: torch.Tensor, *, lpips: nn.Module | None = None, ssim_window: str = "uniform"
) -> dict[str, torch.Tensor]:
    """Per-image PSNR, SSIM (and LPIPS when a module is given), float64 (B,) each; the trainer and eval_vae.py.

    images, recon: (B, 3, H, W) in [-1, 1]; recon unclamped, as `reconstruct` returns it. PSNR and
    SSIM clip both to [0, 1]; LPIPS sees the unclamped float32 tensors, like the reference
    implementation. Runs outside any autocast the caller holds, so the numbers do not depend on
    the training precision.
    """
    images, recon = images.float().contiguous(), recon.float().contiguous()  # one memory layout: same LPIPS bits
    with torch.autocast(images.device.type, enabled=False):
        ref, rec = to_unit(images), to_unit(recon)
        out = {"psnr": psnr(ref, rec), "ssim": ssim(ref, rec, window=ssim_window)}
        if lpips is not None:
            out["lpips"] = lpips(images, recon).reshape(-1).to(torch.float64)
    return out


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
