"""Latent statistics and the one latent convention of an exported model.

`config.json` holds `shift_factor` = μ and `scaling_factor` = 1/σ of sampled latents, and a
diffusion model trains on `(z - shift_factor) * scaling_factor` (mean 0, std 1), as diffusers
documents for SD3/Flux-style VAEs. `latents_mean` / `latents_std` stay None in the config:
diffusers' SDXL-family pipelines, when both are set, decode with
`latents * latents_std / scaling_factor + latents_mean`, i.e. a second normalisation on top of
the first. The per-channel values go to `latent_stats.json` instead.

A fine-tune whose encoder and quant_conv did not train keeps its start model's convention instead
(`--latent_scaling keep`): its latents are the start model's, so pipelines and diffusion models built on
them keep working. `latent_stats.json` then holds the measured statistics beside the kept values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
from diffusers import AutoencoderKL

LATENT_STATS_FILE = "latent_stats.json"


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, images: torch.Tensor, batch_size: int, seed: int = 0) -> dict:
    """Statistics of sampled latents z ~ q(z|x) (what a diffusion model trains on) of `images`.

    Returns shift_factor = μ and scaling_factor = 1/σ (overall mean and std, so that
    `(z - shift_factor) * scaling_factor` has mean 0 and std 1 on these images), the same μ and σ
    as "mean"/"std", per-channel "latents_mean"/"latents_std", "num_images" and "seed".
    Stds are unbiased (torch.std); sums are accumulated in float64.
    """
    device = next(vae.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    latents = [
        vae.encode(chunk.to(device)).latent_dist.sample(generator=generator).double()
        for chunk in images.split(batch_size)
    ]
    z = torch.cat(latents)  # (N, C, h, w)
    per_channel = z.transpose(0, 1).flatten(1)  # (C, N·h·w)
    mean, std = z.mean().item(), z.std().item()
    return {
        "shift_factor": mean,
        "scaling_factor": 1.0 / std,
        "mean": mean,
        "std": std,
        "latents_mean": per_channel.mean(1).tolist(),
        "latents_std": per_channel.std(1).tolist(),
        "num_images": len(images),
        "seed": seed,
    }


def apply_latent_convention(vae: AutoencoderKL, stats: Mapping) -> None:
    """Put shift_factor / scaling_factor into the config and make sure latents_mean / latents_std are None."""
    vae.register_to_config(
        shift_factor=float(stats["shift_factor"]),
        scaling_factor=float(stats["scaling_factor"]),
        latents_mean=None,
        latents_std=None,
    )


def write_latent_stats(folder: str, stats: Mapping, kept: Mapping | None = None) -> str:
    """latent_stats.json: the measured statistics; `kept`: the config's latent convention when it was kept
    from the start model (then the measured shift_factor / scaling_factor are NOT in config.json)."""
    path = os.path.join(folder, LATENT_STATS_FILE)
    if kept is None:
        head = {
            "convention": "latents = (z - shift_factor) * scaling_factor; z = latents / scaling_factor + shift_factor"
        }
    else:
        head = {
            "convention": "config.json keeps the start model's scaling_factor / shift_factor / latents_mean / "
            "latents_std (the values under 'config'); the statistics below were measured on this model and are "
            "not in config.json",
            "config": dict(kept),
        }
    record = {
        **head,
        **stats,
        "note": "the measured latents_mean / latents_std above are per channel and NOT in config.json; to normalise per channel "
        "instead, use (z - latents_mean[c]) / latents_std[c] on its own, never together with "
        "scaling_factor / shift_factor",
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    return path
