"""The evaluator's configuration: every eval_vae.py flag (EvalConfig) and the named protocols."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import data
import metrics
from autoencoder.models import is_single_file
from common.cli import arg
from common.errors import ConfigError
from metrics import fid as fid_backends

# "seed": the reference implementation's choices (its eval encodes a sampled latent and makes
# uint8 by truncation; scikit-image's default SSIM window; torchvision's Resize, i.e. PIL
# bilinear); ours default to the deterministic ones.
PROTOCOLS = {
    "default": {
        "latent": "mean",
        "uint8": "round",
        "ssim_window": "uniform",
        "interpolation": "bilinear",
        "fid_backend": "torch-fidelity",
    },
    "seed": {
        "latent": "sample",
        "uint8": "truncate",
        "ssim_window": "uniform",
        "interpolation": "bilinear",
        "fid_backend": "pytorch-fid",  # its eval.py runs `python -m pytorch_fid gt/ rec/` on PNG folders
    },
}


@dataclass
class EvalConfig:
    # What to evaluate, on what.
    pretrained_model_name_or_path: str = arg(
        "", help="the VAE to evaluate: diffusers folder, training output or checkpoint-N folder, or hub id"
    )
    model_config: str | None = arg(
        None,
        help="the config of a single-file (original LDM layout) --pretrained_model_name_or_path or --baseline: a "
        "preset, a JSON file, a folder holding config.json or a Hub id; left out, diffusers infers it (it then "
        "needs the Hub or its cache). Models in diffusers folders bring their own",
    )
    baseline: list[str] = arg(
        [],
        help="a baseline VAE evaluated on the same images (repeatable); the first is also the base model the "
        "model's encoder drift is measured from (when their latent spaces match)",
    )
    dataset: str = arg(
        "",
        help="hub dataset id or local folder (ImageNet/COCO/FFHQ reference layouts, a downloaded Hub dataset, "
        "parquet/webdataset shards or a plain image folder), or 'name=..,path=..,kind=..,split=..,config=..,"
        "image_column=..' as the trainer's --validation_source (keys left out: --split, --dataset_config, --image_column)",
    )
    split: str = arg("validation", help="dataset split")
    dataset_config: str | None = arg(None, help="hub dataset config name")
    image_column: str = arg("auto", help="image column of a hub / parquet dataset")
    resolution: int = arg(256, help="Resize shorter side + CenterCrop to this size; divisible by 8")
    max_samples: int | None = arg(None, help="evaluate only the first N images (deterministic order)")
    # Protocol: every choice that changes the numbers.
    protocol: str = arg(
        "default",
        choices=tuple(PROTOCOLS),
        help="default: mean, round, uniform, bilinear; seed (the reference implementation's): sample, truncate, "
        "uniform, bilinear",
    )
    latent: str | None = arg(
        None, choices=("mean", "sample"), help="decode the posterior mean or a seeded sample; default from --protocol"
    )
    uint8: str | None = arg(
        None, choices=("round", "truncate"), help="float -> uint8 for PNGs and FID; default from --protocol"
    )
    ssim_window: str | None = arg(None, choices=("uniform", "gaussian"), help="SSIM window; default from --protocol")
    interpolation: str | None = arg(
        None, choices=("bilinear", "bicubic"), help="PIL filter of the shorter-side resize; default from --protocol"
    )
    seed: int = arg(0, help="seed of the per-image latent noise (--latent sample) and of a random LPIPS VGG")
    fid: bool = arg(True, help="compute rFID (--no-fid skips it; recorded in the output)")
    fid_features: int = arg(
        2048,
        choices=(2048, 768, 192, 64),
        help="Inception layer for rFID: 2048 = pool3, the standard; others for quick checks only",
    )
    fid_backend: str | None = arg(
        None,
        choices=metrics.FID_BACKENDS,
        help="rFID package, each with its own Inception file, resize and distance (pytorch-fid = the reference's); "
        "default from --protocol (default: torch-fidelity, seed: pytorch-fid)",
    )
    inception_weights: str | None = arg(
        None,
        help="Inception file of --fid_backend; default: <torch hub dir>/checkpoints/ + "
        f"{', '.join(f'{fid_backends.BACKENDS[b].weights_file} ({b})' for b in metrics.FID_BACKENDS)}",
    )
    latent_diagnostics: bool = arg(
        True,
        help="per model: dead latent channels, KL, DCT high-frequency share, equivariance PSNR (metrics/latents.py); "
        "about one more encode and 1.25 decodes per image (--no-latent_diagnostics skips them)",
    )
    latent_noise: bool = arg(
        True,
        help="noise robustness: per model, PSNR/SSIM/LPIPS of decode(mu + sigma/scaling_factor * eps) for each "
        "--latent_noise_sigma (one seeded eps per image); one more encode and a decode per sigma and image "
        "(--no-latent_noise skips it)",
    )
    latent_noise_sigma: list[float] = arg(
        [0.1, 0.25, 0.5], help="a sigma of --latent_noise, in units of the normalised latent's std (repeatable)"
    )
    perception_weights: str = arg(
        "pretrained",
        choices=("pretrained", "random"),
        help="LPIPS VGG weights; random = offline smoke runs only, NOT LPIPS",
    )
    # Infrastructure.
    batch_size: int = arg(16, help="images per batch and process")
    num_workers: int = arg(2, help="DataLoader workers per process")
    mixed_precision: str | None = arg(
        None,
        choices=("no", "fp16", "bf16"),
        help="autocast for encode/decode; default: the accelerate launch setting, else no",
    )
    allow_tf32: bool = arg(
        True, help="TF32 matmuls on Ampere+ GPUs, as the trainer's default, so its held-out figures equal these"
    )
    output_dir: str = arg("eval-out", help="where the JSON, the table, the grid and PNGs go")
    output_json: str | None = arg(None, help="JSON results path (default: <output_dir>/eval.json)")
    save_images: bool = arg(False, help="save reference and reconstruction PNGs (the uint8 images FID sees)")
    grid_images: int = arg(
        8, help="images in the comparison grid PNG (8 a row; rows: reference, then each model; labelled); 0 = none"
    )
    update_model_card: str | None = arg(
        None, help="model folder whose README.md (model card) gets the results table and model-index metadata"
    )
    # Latent probe (metrics/probe.py, docs/latent_quality.md): off by default.
    probe: bool = arg(
        False,
        help="also train a small DiT (rectified flow) on each model's normalised latents of this split: held-out "
        "denoising loss at t=0.25/0.5/0.75, loss curve, gFID of its samples; same settings for every model",
    )
    probe_steps: int = arg(2000, help="probe training steps (Adam, constant lr)", bound="at_least_1")
    probe_batch_size: int = arg(64, help="probe latents per step", bound="at_least_1")
    probe_lr: float = arg(3e-4, help="probe Adam learning rate", bound="positive")
    probe_seed: int = arg(0, help="seed of the probe's crops, split, latent samples, init, batches and noise")
    probe_crops_per_image: int = arg(
        8, help="seeded random crops per image at --resolution (the probe's data)", bound="at_least_1"
    )
    probe_crop_mode: str = arg(
        "random_scale", choices=data.CROP_MODES, help="how the probe's crops are taken (the trainer's --crop_mode)"
    )
    probe_held_out_fraction: float = arg(
        0.25, help="fraction of the images (all their crops) held out for the probe's held-out loss"
    )
    probe_max_images: int | None = arg(
        1024, help="the probe reads at most the first N images of the split (crops are held in memory as uint8)"
    )
    probe_samples: int = arg(256, help="probe samples decoded for gFID (0: no gFID)", bound="non_negative")
    probe_sample_steps: int = arg(50, help="Euler steps of the probe's flow when sampling", bound="at_least_1")
    probe_normalise: str = arg(
        "global",
        choices=("global", "channel"),
        help="global: the model's own shift/scaling factors (one number each); channel: each channel standardised "
        "with its own mean and std over the probe's training latents (every channel weighs the same in the loss)",
    )
    probe_ema_decay: float = arg(
        0.9999,
        help="the probe's EMA (held-out loss, samples): decay min(this, 1 - (1 + step)^(-2/3)); 0 = no averaging",
    )

    def check(self) -> None:
        if not self.pretrained_model_name_or_path:
            raise ConfigError("--pretrained_model_name_or_path is required")
        if not self.dataset:
            raise ConfigError("--dataset is required")
        models = [self.pretrained_model_name_or_path, *self.baseline]
        if self.model_config is not None and not any(is_single_file(m) for m in models):
            raise ConfigError(
                "--model_config is the config of a single-file checkpoint (.safetensors/.ckpt), and no model or "
                "baseline is one: diffusers folders and Hub ids bring their own"
            )
        if self.resolution <= 0 or self.resolution % 8:
            raise ConfigError(
                f"--resolution must be a positive multiple of 8 (the VAE downsamples 8×), got {self.resolution}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"--max_samples must be >= 1, got {self.max_samples}")
        if self.ssim_window == "gaussian" and self.resolution < 16:
            raise ConfigError("--ssim_window gaussian needs --resolution >= 16 (an 11×11 window)")
        if self.num_workers < 0 or self.grid_images < 0:
            raise ConfigError("--num_workers and --grid_images must be >= 0")
        if self.update_model_card is not None and not os.path.isdir(self.update_model_card):
            raise ConfigError(f"--update_model_card {self.update_model_card!r} is not a folder")
        if self.protocol == "seed":
            for key, value in PROTOCOLS["seed"].items():
                given = getattr(self, key)
                if given is not None and given != value:
                    raise ConfigError(
                        f"--protocol seed means --{key} {value}; drop --{key} {given} or the --protocol flag"
                    )

        if not 0.0 < self.probe_held_out_fraction < 1.0:
            raise ConfigError(f"--probe_held_out_fraction must be in (0, 1), got {self.probe_held_out_fraction}")
        sigmas = self.latent_noise_sigma
        if self.latent_noise and (not sigmas or any(not (math.isfinite(s) and s > 0) for s in sigmas)):
            raise ConfigError(f"--latent_noise_sigma values must be positive (at least one), got {sigmas}")
        if len(set(sigmas)) != len(sigmas):
            raise ConfigError(f"--latent_noise_sigma values must differ, got {sigmas}")
        if not 0.0 <= self.probe_ema_decay < 1.0:
            raise ConfigError(f"--probe_ema_decay must be in [0, 1), got {self.probe_ema_decay}")
        if self.probe_max_images is not None and self.probe_max_images < 2:
            raise ConfigError(
                f"--probe_max_images must be >= 2 (one image to train on, one held out), got {self.probe_max_images}"
            )
        backend = self.fid_backend or PROTOCOLS[self.protocol]["fid_backend"]
        if self.fid and backend == "clean-fid" and self.fid_features != 2048:
            raise ConfigError("--fid_backend clean-fid has only the 2048-d pool3 features; drop --fid_features")

    def resolved_protocol(self) -> dict[str, str]:
        """latent / uint8 / ssim_window / interpolation / fid_backend after applying --protocol defaults."""
        base = PROTOCOLS[self.protocol]
        return {key: getattr(self, key) or base[key] for key in base}
