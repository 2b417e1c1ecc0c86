"""The end of a run (and, with `--hub_strategy every_save`, each checkpoint): an exported model folder.

    <folder>/config.json, diffusion_pytorch_model.safetensors   the AutoencoderKL (save_pretrained)
    <folder>/latent_stats.json                                 per-channel and overall latent statistics
    <folder>/discriminator/{model.safetensors,config.json}     the PatchGAN discriminator
    <folder>/reconstructions.png                               the last held-out grid, when given
    <folder>/README.md                                         the model card (vae/card.py)

One latent convention: `config.json` holds `shift_factor` = μ and `scaling_factor` = 1/σ of sampled
latents, and a diffusion model trains on `(z - shift_factor) * scaling_factor` (mean 0, std 1),
as diffusers documents for SD3/Flux-style VAEs. `latents_mean` / `latents_std` stay None in the
config: diffusers' SDXL-family pipelines, when both are set, decode with
`latents * latents_std / scaling_factor + latents_mean`, i.e. a second normalisation on top of
the first. The per-channel values go to `latent_stats.json` instead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from torch import nn

from vae.card import GRID_PNG, build_model_card
from vae.errors import HubError
from vae.models import ModelError

logger = logging.getLogger(__name__)

# What never goes to the Hub: resumable state, logs, the demo's copy of its photographs, the
# per-checkpoint grids, the staging folders of `--hub_strategy every_save`.
HUB_IGNORE = ["checkpoint-*", "checkpoint-*/**", "logs/**", "demo_data/**", "samples/**", "hub_staging/**", "*.tmp"]
LATENT_STATS_FILE = "latent_stats.json"
DISCRIMINATOR_DIR = "discriminator"
DISCRIMINATOR_WEIGHTS = "model.safetensors"
DISCRIMINATOR_CONFIG = "config.json"


# ----------------------------------------------------------------------------------------
# Latent statistics
# ----------------------------------------------------------------------------------------


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


def write_latent_stats(folder: str, stats: Mapping) -> str:
    path = os.path.join(folder, LATENT_STATS_FILE)
    record = {
        "convention": "latents = (z - shift_factor) * scaling_factor; z = latents / scaling_factor + shift_factor",
        **stats,
        "note": "latents_mean / latents_std are per channel and NOT in config.json; to normalise per channel "
        "instead, use (z - latents_mean[c]) / latents_std[c] on its own, never together with "
        "scaling_factor / shift_factor",
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    return path


# ----------------------------------------------------------------------------------------
# The discriminator
# ----------------------------------------------------------------------------------------


def discriminator_config(disc: nn.Module) -> dict:
    """The constructor arguments of an NLayerDiscriminator, read off its layers.

    pix2pix names: input_nc = in_channels, ndf = base_channels; norm is the normalisation class.
    """
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in disc.modules() if isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm))]
    if not convs:
        raise ModelError(f"{type(disc).__name__} has no Conv2d layer: not a PatchGAN discriminator")
    return {
        "_class_name": type(disc).__name__,
        "in_channels": convs[0].in_channels,
        "base_channels": convs[0].out_channels,
        "n_layers": len(convs) - 2,
        "norm": type(norms[0]).__name__ if norms else None,
    }


def save_discriminator(disc: nn.Module, folder: str) -> str:
    """Write `<folder>/discriminator/model.safetensors` (every tensor, BatchNorm buffers included) and config.json."""
    target = os.path.join(folder, DISCRIMINATOR_DIR)
    os.makedirs(target, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in disc.state_dict().items()}
    save_file(state, os.path.join(target, DISCRIMINATOR_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(target, DISCRIMINATOR_CONFIG), "w") as f:
        json.dump(discriminator_config(disc), f, indent=2)
    return target


def _hub_discriminator(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    from vae.hub import hub_offline, one_line

    if hub_offline():
        raise HubError(f"cannot fetch the discriminator of {repo_id!r}: no such local folder and HF_HUB_OFFLINE is set")
    try:
        root = snapshot_download(repo_id, allow_patterns=f"{DISCRIMINATOR_DIR}/*")
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: all one line for the user
        raise HubError(f"cannot fetch the discriminator of {repo_id!r} from the Hub: {one_line(e)}") from None
    return root


def _find_discriminator(path_or_hub_id: str) -> tuple[str, str | None]:
    """(weights file, config file or None) of an export folder, its discriminator/ folder,
    a training checkpoint (discriminator.safetensors, no config) or a hub id."""
    path = os.path.expanduser(path_or_hub_id)
    if not os.path.exists(path):
        from vae.models import resolve_vae_location  # same rule for "looks like a path" vs hub id

        resolve_vae_location(path)  # raises ModelError for a missing local path
        path = _hub_discriminator(path_or_hub_id)
    for folder in (os.path.join(path, DISCRIMINATOR_DIR), path):
        weights = os.path.join(folder, DISCRIMINATOR_WEIGHTS)
        if os.path.isfile(weights):
            config = os.path.join(folder, DISCRIMINATOR_CONFIG)
            return weights, config if os.path.isfile(config) else None
    checkpoint = os.path.join(path, "discriminator.safetensors")
    if os.path.isfile(checkpoint):
        return checkpoint, None
    raise ModelError(f"no discriminator in {path_or_hub_id!r} (expected {DISCRIMINATOR_DIR}/{DISCRIMINATOR_WEIGHTS})")


def load_discriminator(path_or_hub_id: str, disc: nn.Module) -> nn.Module:
    """Load a saved discriminator into `disc` in place, after checking it has the same architecture.

    Accepts an export folder (or its discriminator/ folder), a training checkpoint folder, or a
    hub id (only discriminator/* is downloaded). A config or tensor mismatch is a one-line ModelError.
    """
    weights, config_path = _find_discriminator(path_or_hub_id)
    if config_path is not None:
        with open(config_path) as f:
            saved = json.load(f)
        ours = discriminator_config(disc)
        diff = [f"{k} {saved.get(k)!r} there, {ours[k]!r} here" for k in ours if saved.get(k) != ours[k]]
        if diff:
            raise ModelError(f"discriminator in {path_or_hub_id!r} has another architecture: {'; '.join(diff)}")
    try:
        state = load_file(weights)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for truncated/foreign files
        raise ModelError(f"cannot read discriminator weights {weights!r}: {type(e).__name__}: {e}") from None
    own = disc.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise ModelError(
            f"discriminator in {path_or_hub_id!r} does not fit this one: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(shapes)} mismatched tensors, e.g. "
            f"{(shapes + missing + unexpected)[:2]}"
        )
    disc.load_state_dict(state, strict=True)
    return disc


# ----------------------------------------------------------------------------------------
# The export
# ----------------------------------------------------------------------------------------


def export_model(
    folder: str,
    vae: AutoencoderKL,
    *,
    latent_images: torch.Tensor | None = None,
    latent_stats: Mapping | None = None,
    images_note: str = "held-out images",
    batch_size: int = 8,
    seed: int = 0,
    discriminator: nn.Module | None = None,
    reconstructions: str | None = None,
    card: Mapping | None = None,
) -> dict:
    """Write the model folder; returns the latent statistics (reuse them to skip the encode pass).

    latent_images: (N, 3, R, R) in [-1, 1] for `latent_statistics` (or pass `latent_stats` already
        computed); `images_note` says how they were drawn and lands in latent_stats.json and the card.
    reconstructions: a grid PNG to copy as GRID_PNG (reconstructions.png, the last held-out grid).
    card: keyword arguments of `vae.card.build_model_card` other than folder, latent_stats and
        has_discriminator, which this function fills in.
    Writes no optimizer or trainer state: the folder is what goes to the Hub.
    """
    if latent_stats is None:
        if latent_images is None:
            raise ValueError("export_model needs latent_images or latent_stats")
        latent_stats = latent_statistics(vae, latent_images, batch_size, seed=seed)
    stats = {**latent_stats, "images": latent_stats.get("images", images_note)}
    os.makedirs(folder, exist_ok=True)
    apply_latent_convention(vae, stats)
    vae.save_pretrained(folder, safe_serialization=True)
    write_latent_stats(folder, stats)
    if discriminator is not None:
        save_discriminator(discriminator, folder)
    if reconstructions and os.path.isfile(reconstructions):
        target = os.path.join(folder, GRID_PNG)
        if os.path.abspath(reconstructions) != os.path.abspath(target):
            shutil.copyfile(reconstructions, target)
    model_card = build_model_card(
        folder=folder, latent_stats=stats, has_discriminator=discriminator is not None, **dict(card or {})
    )
    model_card.save(os.path.join(folder, "README.md"))
    logger.info(
        "exported the model to %s (scaling_factor %.4f, shift_factor %.4f, %d images)",
        folder,
        stats["scaling_factor"],
        stats["shift_factor"],
        stats["num_images"],
    )
    return stats
