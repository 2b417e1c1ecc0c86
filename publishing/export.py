"""The end of a run (and, with `--hub_strategy every_save`, each checkpoint): an exported model folder.

    <folder>/config.json, diffusion_pytorch_model.safetensors   the AutoencoderKL (save_pretrained)
    <folder>/latent_stats.json                                 per-channel and overall latent statistics
    <folder>/discriminator/{model.safetensors,config.json}     the PatchGAN discriminator
    <folder>/reconstructions.png                               the last held-out grid, when given
    <folder>/README.md                                         the model card (publishing/card.py)
    <folder>/vae_single_file.safetensors                       with --export_single_file: the VAE in the original
                                                               LDM key layout (autoencoder/single_file.py)

The latent convention (shift_factor / scaling_factor in config.json, measured or kept): autoencoder/latents.py.
An existing folder (or training checkpoint) gets its single file with
`python -m publishing.export --single_file FOLDER [--output FILE.safetensors]`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL
from diffusers.training_utils import EMAModel
from huggingface_hub import snapshot_download
from safetensors.torch import load_file, save_file
from torch import nn

from autoencoder.latents import apply_latent_convention, latent_statistics, write_latent_stats
from autoencoder.models import count_parameters, latent_convention, load_vae, resolve_vae_location
from autoencoder.single_file import save_single_file
from common.errors import DataError, HubError, ModelError
from common.helpers import hub_offline, key_mismatch, one_line
from data import sample_images
from publishing.card import GRID_PNG, build_model_card
from training.config import TrainConfig
from training.runlog import CURVES_PNG, RunLog

logger = logging.getLogger(__name__)

DISCRIMINATOR_DIR = "discriminator"
DISCRIMINATOR_WEIGHTS = "model.safetensors"
DISCRIMINATOR_CONFIG = "config.json"
SINGLE_FILE = "vae_single_file.safetensors"


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
        resolve_vae_location(path)  # the model loader's rule for path vs hub id: ModelError for a missing path
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
    missing, unexpected = key_mismatch(own, state)
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
    latent_scaling: str = "measure",
    latent_scaling_reason: str = "",
    single_file: bool = False,
) -> dict:
    """Write the model folder; returns the latent statistics (reuse them to skip the encode pass).

    latent_images: (N, 3, R, R) in [-1, 1] for `latent_statistics` (or pass `latent_stats` already
        computed); `images_note` says how they were drawn and lands in latent_stats.json and the card.
    reconstructions: a grid PNG to copy as GRID_PNG (reconstructions.png, the last held-out grid).
    card: keyword arguments of `publishing.card.build_model_card` other than folder, latent_stats,
        has_discriminator, kept_latent_convention and single_file, which this function fills in.
    latent_scaling: "measure" writes the measured shift_factor / scaling_factor into config.json (and no
        latents_mean / latents_std); "keep" leaves the four as `vae.config` holds them (the start model's),
        said in the log and card with `latent_scaling_reason`. latent_stats.json gets the measured values either way.
    single_file: also write SINGLE_FILE, the weights in the original LDM key layout.
    Writes no optimizer or trainer state: the folder is what goes to the Hub.
    """
    if latent_stats is None:
        if latent_images is None:
            raise ValueError("export_model needs latent_images or latent_stats")
        latent_stats = latent_statistics(vae, latent_images, batch_size, seed=seed)
    stats = {**latent_stats, "images": latent_stats.get("images", images_note)}
    if latent_scaling not in ("keep", "measure"):
        raise ValueError(f"latent_scaling must be keep or measure, got {latent_scaling!r}")
    kept = latent_convention(vae) if latent_scaling == "keep" else None
    os.makedirs(folder, exist_ok=True)
    if kept is None:
        apply_latent_convention(vae, stats)
    vae.save_pretrained(folder, safe_serialization=True)
    write_latent_stats(folder, stats, kept=kept)
    if single_file:
        save_single_file(vae, os.path.join(folder, SINGLE_FILE))
    if discriminator is not None:
        save_discriminator(discriminator, folder)
    if reconstructions and os.path.isfile(reconstructions):
        target = os.path.join(folder, GRID_PNG)
        if os.path.abspath(reconstructions) != os.path.abspath(target):
            shutil.copyfile(reconstructions, target)
    model_card = build_model_card(
        folder=folder,
        latent_stats=stats,
        has_discriminator=discriminator is not None,
        kept_latent_convention=kept and {**kept, "reason": latent_scaling_reason},
        single_file=SINGLE_FILE if single_file else None,
        **dict(card or {}),
    )
    model_card.save(os.path.join(folder, "README.md"))
    if kept is None:
        how = f"measured: scaling_factor {stats['scaling_factor']:.4f}, shift_factor {stats['shift_factor']:.4f}"
    else:
        how = (
            f"scaling_factor {kept['scaling_factor']}, shift_factor {kept['shift_factor']}, latents_mean/std "
            f"{'set' if kept['latents_mean'] is not None else 'None'} KEPT from the start model"
            + (f" ({latent_scaling_reason})" if latent_scaling_reason else "")
            + f"; measured 1/σ {stats['scaling_factor']:.4f}, μ {stats['shift_factor']:.4f} in latent_stats.json"
        )
    logger.info("exported the model to %s (%s; %d images)", folder, how, stats["num_images"])
    return stats


def export_single_file(folder: str, output: str | None = None) -> str:
    """Write the single-file (LDM layout) VAE of an existing export folder or training checkpoint;
    returns its path (default: <folder>/vae_single_file.safetensors)."""
    vae = load_vae(folder)
    return save_single_file(vae, output or os.path.join(folder, SINGLE_FILE))


# ----------------------------------------------------------------------------------------
# A training run's export: the folder above, with the run's card
# ----------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """What the export, its card and the run's summary need to know of a training run so far."""

    config: TrainConfig
    sources: list
    heldout_sources: list
    heldout_disjoint: bool
    heldout_images: torch.Tensor  # (N, 3, R, R) in [-1, 1]: the fixed held-out batch
    steps: int
    images_seen: int
    num_processes: int
    perception_weights: str  # pretrained, random or none: what LPIPS/MoCo actually were
    metrics_initial: dict = field(default_factory=dict)
    metrics_final: dict = field(default_factory=dict)


def averaged_copy(vae: nn.Module, ema: EMAModel) -> nn.Module:
    """A copy of `vae` holding the EMA's weights; the live model and its optimizer state stay untouched."""
    averaged = copy.deepcopy(vae)
    ema.copy_to(averaged.parameters())
    return averaged


def latent_sample(run: TrainingRun) -> tuple[torch.Tensor, str]:
    """(images, how they were drawn) for the latent statistics: --latent_stats_samples seeded images of the
    held-out sources, fewer when those run short; never lose a trained model over this sample."""
    cfg = run.config
    how = "held-out images" if run.heldout_disjoint else "images sampled from the training mixture"
    images, count = None, cfg.latent_stats_samples
    while images is None:
        try:
            images, _ = sample_images(
                run.heldout_sources, count, cfg.resolution, seed=cfg.seed, interpolation=cfg.interpolation
            )
        except DataError as e:
            if count <= len(run.heldout_images):
                logger.warning("latent statistics from the %d held-out images: %s", count, e)
                images = run.heldout_images
            else:
                count = max(count // 2, len(run.heldout_images))
                logger.warning("latent statistics: %s; trying %d images", e, count)
    return images, f"{len(images)} {how}, a seeded random sample (seed {cfg.seed})"


def latent_scaling_mode(cfg: TrainConfig, vae: nn.Module) -> tuple[str, str]:
    """("keep" or "measure", why) for --latent_scaling: auto keeps the start model's convention when the run
    started from a model and every encoder and quant_conv parameter was frozen (the latents are then the start's).
    TrainConfig.check refuses keep without a start model, and train_vae.build_autoencoder refuses a frozen encoder
    that --init_from could not copy and keep when --init_from's latent channels differ (no convention taken over):
    so a frozen encoder here is the start model's, and a kept convention is always one the start model had."""
    start = cfg.pretrained_model_name_or_path or cfg.init_from
    frozen = cfg.frozen_prefixes()
    encoder = [n for n, _ in vae.named_parameters() if n.startswith(("encoder.", "quant_conv."))]
    encoder_frozen = bool(encoder) and all(n.startswith(tuple(frozen)) for n in encoder)
    if start and encoder_frozen:
        why = (
            f"encoder and quant_conv frozen: the latents are those of {start}, so pipelines and diffusion models "
            "made for them can take this VAE in its place"
        )
    else:
        why = "the encoder trained: the latents are no longer the start model's" if start else "a model trained here"
    if cfg.latent_scaling != "auto":
        return cfg.latent_scaling, f"--latent_scaling {cfg.latent_scaling}; {why}"
    return ("keep" if start and encoder_frozen else "measure"), why


def export_run(
    folder: str,
    vae: AutoencoderKL,
    discriminator: nn.Module,
    run: TrainingRun,
    repo_id: str | None,
    full_sample: bool = True,
) -> dict:
    """Write a run's model folder: the VAE (in eval mode, as given), its latent statistics, D, the grid of its
    last validation, its curves and its card. Returns the latent statistics.

    full_sample: latent statistics from --latent_stats_samples seeded images; False takes the held-out batch
    (a checkpoint's quick export while training goes on).
    """
    cfg = run.config
    if full_sample:
        images, note = latent_sample(run)
    else:
        images, note = run.heldout_images, f"the {len(run.heldout_images)} held-out validation images"
    card = dict(
        repo_id=repo_id,
        license=cfg.license,
        base_model=cfg.pretrained_model_name_or_path or cfg.init_from,
        base_loaded_as_is=bool(cfg.pretrained_model_name_or_path),
        sources=run.sources,
        heldout_name=", ".join(s.name for s in run.heldout_sources),
        heldout_disjoint=run.heldout_disjoint,
        num_validation_images=len(run.heldout_images),
        recipe=cfg.recipe(),
        steps=run.steps,
        images_seen=run.images_seen,
        batch_size=cfg.train_batch_size,
        num_processes=run.num_processes,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        resolution=cfg.resolution,
        vae_config=dict(vae.config),
        num_parameters=count_parameters(vae),
        perception_weights=run.perception_weights,
        metrics_initial=run.metrics_initial,
        metrics_final=run.metrics_final,
    )
    run_log = RunLog(cfg.output_dir)
    if folder != cfg.output_dir and os.path.isfile(run_log.curves_path):  # a Hub staging folder shows the curves too
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(run_log.curves_path, os.path.join(folder, CURVES_PNG))
    device = next(vae.parameters()).device
    latent_scaling, reason = latent_scaling_mode(cfg, vae)
    return export_model(
        folder,
        vae,
        latent_images=images.to(device),
        images_note=note,
        batch_size=cfg.train_batch_size,
        seed=cfg.seed,
        discriminator=discriminator,
        reconstructions=run_log.grid_path(run.steps),
        card=card,
        latent_scaling=latent_scaling,
        latent_scaling_reason=reason,
        single_file=cfg.export_single_file,
    )


def run_summary(run: TrainingRun) -> str:
    """The run in one line: held-out metrics first and last, and where to look."""
    first, last, out = run.metrics_initial, run.metrics_final, run.config.output_dir
    metrics = ", ".join(
        f"{name} {first[name]:.{digits}f} -> {last[name]:.{digits}f}{unit}"
        for name, digits, unit in (("psnr", 2, " dB"), ("ssim", 3, ""), ("lpips", 3, ""))
        if name in first and name in last
    )
    held_out = f"held-out {metrics} ({len(run.heldout_images)} images); " if metrics else ""
    pictures = [
        f"{what} {path}"
        for what, path in (("curves", os.path.join(out, CURVES_PNG)), ("grid", os.path.join(out, GRID_PNG)))
        if os.path.isfile(path)
    ]
    return f"done at step {run.steps}: {held_out}" + ", ".join(
        [f"model in {out} (AutoencoderKL.from_pretrained)", *pictures]
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m publishing.export --single_file FOLDER [--output FILE]`: the single file of an existing folder."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m publishing.export", description=main.__doc__)
    parser.add_argument(
        "--single_file",
        required=True,
        metavar="FOLDER",
        help="an exported model folder, a diffusers AutoencoderKL folder or a training checkpoint folder",
    )
    parser.add_argument("--output", help=f"the .safetensors file to write (default: FOLDER/{SINGLE_FILE})")
    args = parser.parse_args(argv)
    try:
        path = export_single_file(args.single_file, args.output)
    except ModelError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"wrote {path} (the VAE in the original LDM key layout; AutoencoderKL.from_single_file reads it)")


if __name__ == "__main__":
    main(sys.argv[1:])
