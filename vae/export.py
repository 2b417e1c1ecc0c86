"""The end of a run: latent statistics into the config, save_pretrained, a model card, the Hub."""

from __future__ import annotations

import logging
import os
import shutil

import torch
from diffusers import AutoencoderKL

from vae.validation import load_images

logger = logging.getLogger(__name__)

# What never goes to the Hub: resumable state, logs, the demo's copy of its photographs.
HUB_IGNORE = ["checkpoint-*", "checkpoint-*/**", "logs/**", "demo_data/**", "samples/**", "*.tmp"]


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, images: torch.Tensor, batch_size: int, seed: int = 0) -> dict:
    """Mean and std of sampled latents (what a diffusion model trains on), overall and per channel.

    A diffusion model then uses z' = (z - shift_factor) * scaling_factor, which has zero mean
    and unit variance on this data.
    """
    generator = torch.Generator(device=images.device).manual_seed(seed)
    latents = []
    for chunk in images.split(batch_size):
        latents.append(vae.encode(chunk).latent_dist.sample(generator=generator).float())
    z = torch.cat(latents)  # (N, C, h, w)
    per_channel = z.transpose(0, 1).flatten(1)
    return {
        "shift_factor": z.mean().item(),
        "scaling_factor": 1.0 / z.std().item(),
        "latents_mean": per_channel.mean(1).tolist(),
        "latents_std": per_channel.std(1).tolist(),
    }


def model_card(cfg, vae: AutoencoderKL, state, sources, stats: dict) -> str:
    repo = cfg.hub_model_id or os.path.abspath(cfg.output_dir)
    mixture = "\n".join(f"| {s.name} | `{s.path}` | {s.split} | {s.weight:g} |" for s in sources)
    metrics = state.last_metrics or {}
    initial = state.initial_metrics or {}
    rows = "\n".join(f"| {k} | {initial.get(k, float('nan')):.4f} | {v:.4f} |" for k, v in metrics.items())
    return f"""---
library_name: diffusers
tags:
- autoencoder
- vae
- transfusion
---

# {os.path.basename(repo.rstrip('/'))}

A diffusers `AutoencoderKL` trained with the Transfusion VAE recipe
(L1 + {cfg.lpips_weight:g}·LPIPS + {cfg.gan_weight:g}·GAN (patch discriminator, adaptive weight, from step {cfg.disc_start})
+ {cfg.id_weight:g}·ID (MoCo features) + {cfg.kl_weight:g}·KL).

- latent channels: {vae.config.latent_channels}, block_out_channels: {list(vae.config.block_out_channels)}, resolution: {cfg.resolution}
- steps: {state.global_step}, images seen: {state.images_seen}, batch per device: {cfg.train_batch_size}
- perception weights: {cfg.perception_weights}
- scaling_factor {stats['scaling_factor']:.6f}, shift_factor {stats['shift_factor']:.6f}
  (use `(latents - shift_factor) * scaling_factor`)

## Data mixture

| source | path | split | weight |
|---|---|---|---|
{mixture}

## Held-out reconstruction (posterior mean, {cfg.num_validation_images} images)

| metric | step 0 | final |
|---|---|---|
{rows}

![reconstructions](reconstructions.png)

Top row: inputs; bottom row: reconstructions.

## Use

```python
from diffusers import AutoencoderKL
vae = AutoencoderKL.from_pretrained("{repo}")
posterior = vae.encode(images).latent_dist          # images in [-1, 1], (B, 3, H, W)
latents = (posterior.sample() - vae.config.shift_factor) * vae.config.scaling_factor
recon = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
```
"""


def push_to_hub(cfg) -> None:
    """Upload the exported folder. The token comes from HF_TOKEN or `hf auth login` and is never written."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(cfg.hub_model_id, exist_ok=True, private=cfg.hub_private).repo_id
    upload_folder(repo_id=repo_id, folder_path=cfg.output_dir, ignore_patterns=HUB_IGNORE,
                  commit_message="Upload Transfusion VAE")
    logger.info("pushed %s to https://huggingface.co/%s", cfg.output_dir, repo_id)


def export_model(cfg, vae: AutoencoderKL, heldout_source, state, sources) -> None:
    device = next(vae.parameters()).device
    images = load_images(heldout_source, cfg.resolution, cfg.latent_stats_samples, cfg.interpolation).to(device)
    stats = latent_statistics(vae, images, cfg.train_batch_size, seed=cfg.seed)
    vae.register_to_config(**stats)
    vae.save_pretrained(cfg.output_dir, safe_serialization=True)
    last_grid = os.path.join(cfg.output_dir, "samples", f"step_{state.global_step:07d}.png")
    if os.path.isfile(last_grid):
        shutil.copyfile(last_grid, os.path.join(cfg.output_dir, "reconstructions.png"))
    with open(os.path.join(cfg.output_dir, "README.md"), "w") as f:
        f.write(model_card(cfg, vae, state, sources, stats))
    logger.info("exported the model to %s (scaling_factor %.4f, shift_factor %.4f)",
                cfg.output_dir, stats["scaling_factor"], stats["shift_factor"])
    if cfg.push_to_hub:
        push_to_hub(cfg)
