"""Encoder drift: how far a model trained from another one moved away from it, in latent space.

A fine-tune is a drop-in for models trained on the base model's latents (a diffusion model, a pipeline) only as
far as its encoder still gives the base encoder's latents and its decoder still decodes them. Per image, on the
posterior means μ (no noise drawn, so measuring never changes a run):

    latent_mse          mean over the C·h·w elements of (μ − μ_base)²
    latent_cosine       cosine between μ and μ_base, each flattened to one C·h·w vector
    base_latents_psnr   PSNR (dB, as the held-out PSNR: [0, 1], clipped) of the model's decoder decoding μ_base,
                        against the image

Both models' raw latents: neither scaling_factor nor shift_factor is applied. The two must have the same latent
shape (another latent channel count has no drift to measure).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from metrics.pixel import psnr, to_unit

DRIFT_METRICS = ("latent_mse", "latent_cosine", "base_latents_psnr")


def same_latent_space(vae: AutoencoderKL, base: AutoencoderKL) -> bool:
    """Whether drift can be measured: the same latent channels and the same downsampling (number of blocks)."""
    return vae.config.latent_channels == base.config.latent_channels and len(vae.config.block_out_channels) == len(
        base.config.block_out_channels
    )


@torch.no_grad()
def encoder_drift(
    vae: AutoencoderKL,
    base: AutoencoderKL,
    images: torch.Tensor,
    batch_size: int,
    *,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, torch.Tensor]:
    """{latent_mse, latent_cosine, base_latents_psnr}: float64 (N,) each, per image of `images` ((N, 3, H, W) in
    [-1, 1]). `autocast` wraps encode and decode only; the metrics are computed in float32/float64 outside it."""
    autocast = autocast or contextlib.nullcontext
    out = {name: [] for name in DRIFT_METRICS}
    for chunk in images.split(batch_size):
        with autocast():
            mu = vae.encode(chunk).latent_dist.mean
            mu_base = base.encode(chunk).latent_dist.mean
            decoded = vae.decode(mu_base.to(mu.dtype)).sample  # the model's decoder, the base encoder's latents
        mu, mu_base = mu.float().flatten(1), mu_base.float().flatten(1)  # (b, C·h·w)
        out["latent_mse"].append((mu - mu_base).pow(2).mean(dim=1).double())
        out["latent_cosine"].append(F.cosine_similarity(mu, mu_base, dim=1).double())
        with torch.autocast(chunk.device.type, enabled=False):
            out["base_latents_psnr"].append(psnr(to_unit(chunk.float()), to_unit(decoded.float())))
    return {name: torch.cat(values) for name, values in out.items()}


def describe(means: dict[str, float]) -> str:
    """One log phrase of the drift means."""
    return (
        f"drift from the start model: latent MSE {means['latent_mse']:.4g}, cosine {means['latent_cosine']:.4f}, "
        f"its latents decoded at {means['base_latents_psnr']:.2f} dB"
    )
