"""Every knob of `train_vae.py`, with the Transfusion recipe as defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass

from vae.config import ConfigError, arg
from vae.models import PRESETS

MOCO_V2_URL = "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar"

# With no data flags the trainer runs the offline demo: real photographs shipped with
# scikit-image, a small preset and a short schedule that finishes on a laptop CPU. Flags the
# user gives explicitly always win over these.
DEMO_DEFAULTS = dict(
    # "tiny" learns as fast per step as "small" here (18.6 vs 17.4 dB after 500 steps at lr 1e-3) at
    # two thirds of its CPU time a step.
    model_config="tiny",
    resolution=64,
    crop_mode="native",  # native-scale windows of the full photographs, like the held-out crops
    train_batch_size=8,  # 20.1 dB after 600 steps; batch 4 flattened at 19.5-19.6 dB after 700-1000 steps
    # Seeds 1/2 (one thread): 20.02/19.88 dB after 900 steps (seed 0: 20.41); 18.84/19.73 after 600 (README).
    max_train_steps=900,  # about 3 minutes on 2 idle cores, export included
    learning_rate=1e-3,  # 1.5e-3 ended equal (20.2 dB after 600 steps), 2e-3 lower and noisier
    # A 50-step warm-up (600 steps): seeds 0/1/2 at 19.81/19.96/19.75 dB (README).
    lr_scheduler="cosine",
    use_ema=True,  # EMA + cosine: a smooth held-out curve, +0.4 dB over a constant rate
    ema_decay=0.99,
    disc_start=800,
    gan_ramp_steps=100,  # the GAN term ramps in: no dip in the held-out curve
    validation_steps=100,
    num_validation_images=16,  # all the held-out crops
    checkpointing_steps=300,
    logging_steps=20,
    dataloader_num_workers=0,  # data in the main process: one worker gave the same result 2% slower (it competes with the step on 2 cores)
    shuffle_block=16,
    perception_weights="auto",
    # LPIPS needs ImageNet VGG16 weights, which an offline machine does not have; with a random VGG it
    # made the CPU step 3x slower and did not help (batch 4: 18.6 dB after a 400-step run with it;
    # without it 18.8 dB at step 400 of a 1000-step run). --lpips_weight 1 puts it back.
    lpips_weight=0.0,
    # The ID term resizes every image to 224² for a ResNet-50: on a CPU at 64² that is ~10× the
    # rest of the step, and with random MoCo weights (no download here) it teaches nothing.
    id_weight=0.0,
    latent_stats_samples=16,
    output_dir="outputs/demo",
    overwrite_output_dir=True,  # running the demo again starts it over (--resume_from_checkpoint latest continues it)
)


@dataclass
class TrainConfig:
    # --- model ---
    model_config: str = arg("transfusion", f"AutoencoderKL preset ({', '.join(PRESETS)}) or a JSON config file")
    latent_channels: int | None = arg(None, "override the preset's latent channels (e.g. 4, 8, 16)")
    init_from: str | None = arg(
        None,
        "start from a pretrained AutoencoderKL (folder or hub id); latent-facing layers are adapted when the channel count differs",
    )
    train_decoder_only: bool = arg(False, "freeze encoder and quant_conv: the latent space stays as it is")
    freeze: list[str] = arg(
        [], "freeze parameters whose name starts with this prefix (repeatable), e.g. encoder.down_blocks.0"
    )
    gradient_checkpointing: bool = arg(False, "trade compute for memory in the autoencoder")
    channels_last: bool = arg(False, "channels-last memory format (faster convolutions on GPUs)")
    torch_compile: bool = arg(False, "torch.compile the autoencoder")
    # --- data ---
    source: list[str] = arg(
        [],
        "a data source, repeatable: a path/hub id or 'name=..,path=..,weight=..,split=..,kind=..,config=..,image_column=..'",
    )
    mixture: str | None = arg(None, "mixture file (YAML/JSON) or a ready-made name ('transfusion' with --data_root)")
    data_root: str | None = arg(
        None,
        "folder holding ImageNet/, COCO/ and FFHQ/ in the reference implementation's layouts (docs/recipe.md) (for --mixture transfusion)",
    )
    validation_source: str | None = arg(
        None, "held-out images for in-training metrics and latent statistics (same syntax as --source)"
    )
    resolution: int = arg(256, "training crop size (divisible by 8)")
    random_flip: bool = arg(False, "random horizontal flips (the recipe uses none)")
    crop_mode: str = arg(
        "resize",
        "training crops: resize (shorter side -> resolution, random crop; the recipe), native (a random window at the image's own scale), random_scale (shorter side resized to a random size between resolution and native, then a random crop)",
        choices=("resize", "native", "random_scale"),
    )
    interpolation: str = arg(
        "bilinear",
        "shorter-side resize filter (bilinear = torchvision's Resize, as the reference implementation)",
        choices=("bilinear", "bicubic"),
    )
    shuffle_block: int = arg(1000, "images per exactly-resumable shuffle block")
    dataloader_num_workers: int = arg(4, "DataLoader worker processes per rank")
    num_validation_images: int = arg(8, "held-out images in the fixed validation batch")
    # --- loss (Transfusion: L1 + LPIPS + 0.5·GAN + 0.2·ID + 1e-6·KL) ---
    l1_weight: float = arg(1.0, "weight of the L1 term")
    lpips_weight: float = arg(1.0, "weight of LPIPS-VGG")
    gan_weight: float = arg(0.5, "weight of the adaptive-weighted generator hinge term")
    id_weight: float = arg(0.2, "weight of the MoCo v2 feature (ID) loss")
    kl_weight: float = arg(1e-6, "weight of the KL term (sum over C·H·W, mean over batch)")
    disc_start: int = arg(50001, "step at which the discriminator and the GAN term switch on")
    adaptive_weight_max: float = arg(1e4, "clamp of the adaptive GAN weight")
    gan_ramp_steps: int = arg(
        0, "ramp the GAN weight linearly over this many steps after disc_start (0 = switch on at once, as the recipe)"
    )
    lecam_weight: float = arg(0.0, "LeCAM regularisation of the discriminator (0 = off, as the recipe)")
    lecam_decay: float = arg(0.999, "EMA decay of LeCAM's logit anchors")
    perception_weights: str = arg(
        "pretrained",
        "LPIPS-VGG and MoCo weights: pretrained (required for real runs), random (smoke tests), auto (pretrained when cached, else random, loudly)",
        choices=("pretrained", "random", "auto"),
    )
    id_checkpoint: str = arg(MOCO_V2_URL, "MoCo v2/v3 ResNet-50 checkpoint file or URL for the ID loss")
    id_feature: str = arg(
        "projection",
        "ID features: the 128-d MoCo projection with MSE (the recipe) or 2048-d pooled with cosine",
        choices=("projection", "pooled"),
    )
    adaptive_weight_mode: str = arg(
        "fast",
        "fast: last-layer gradients derived from one backward through LPIPS/MoCo/D; reference: the reference implementation's autograd.grad on the last layer (same values)",
        choices=("fast", "reference"),
    )
    # --- optimisation ---
    learning_rate: float = arg(1e-4, "Adam learning rate of the autoencoder")
    disc_learning_rate: float | None = arg(None, "Adam learning rate of the discriminator (default: --learning_rate)")
    adam_beta1: float = arg(0.9, "Adam beta1")
    adam_beta2: float = arg(0.999, "Adam beta2")
    adam_weight_decay: float = arg(0.0, "AdamW decoupled weight decay (0 = plain Adam, as the recipe)")
    adam_epsilon: float = arg(1e-8, "Adam epsilon")
    max_grad_norm: float = arg(0.0, "clip gradients to this global norm (0 = no clipping, as the recipe)")
    lr_scheduler: str = arg(
        "constant",
        "diffusers LR schedule",
        choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"),
    )
    lr_warmup_steps: int = arg(0, "warm-up steps of the LR schedule")
    train_batch_size: int = arg(12, "images per device per micro-batch")
    gradient_accumulation_steps: int = arg(1, "micro-batches per optimizer step")
    max_train_steps: int = arg(1_000_000, "optimizer steps to train")
    mixed_precision: str | None = arg(
        None,
        "no, fp16 (with a grad scaler) or bf16 autocast over fp32 master weights (default: the accelerate config)",
        choices=("no", "fp16", "bf16"),
    )
    allow_tf32: bool = arg(True, "TF32 matmuls on Ampere+ GPUs")
    use_ema: bool = arg(False, "keep an EMA of the autoencoder, used for validation and export")
    ema_decay: float = arg(0.9999, "EMA decay")
    max_nonfinite_steps: int = arg(20, "stop after this many consecutive steps with a non-finite loss or gradient")
    seed: int = arg(0, "random seed (data order, init, sampling)")
    # --- output, logging, checkpoints ---
    output_dir: str = arg("vae-output", "where checkpoints, samples, logs and the exported model go")
    logging_dir: str = arg("logs", "tracker folder, relative to --output_dir")
    report_to: str = arg("tensorboard", "tracker", choices=("tensorboard", "wandb", "all", "none"))
    tracker_project_name: str = arg("transfusion-vae", "tracker project name")
    logging_steps: int = arg(50, "log losses every N steps")
    validation_steps: int = arg(1000, "held-out PSNR/SSIM/LPIPS and a reconstruction grid every N steps")
    checkpointing_steps: int = arg(5000, "save a resumable checkpoint every N steps")
    checkpoints_total_limit: int | None = arg(None, "keep at most this many checkpoints")
    resume_from_checkpoint: str | None = arg(None, "'latest' or a checkpoint folder")
    overwrite_output_dir: bool = arg(
        False,
        "start a new run in an --output_dir that holds another run's checkpoints or metrics log, removing them "
        "(without it, that is an error)",
    )
    latent_stats_samples: int = arg(
        1024,
        "held-out images (a seeded sample) whose sampled latents give scaling_factor / shift_factor at export "
        "(1024: σ within ~0.4% between two samples, benchmarks/latent_stats_stability.py)",
    )
    # --- Hub ---
    push_to_hub: bool = arg(False, "upload the exported model to the Hub (token from HF_TOKEN or `hf auth login`)")
    hub_model_id: str | None = arg(None, "Hub repository, e.g. user/transfusion-vae")
    hub_private: bool = arg(False, "create the Hub repository as private")
    hub_strategy: str = arg(
        "end",
        "end: upload the exported model once, at the end; every_save: also upload each checkpoint's exported model (not optimizer states) in the background",
        choices=("end", "every_save"),
    )
    license: str = arg(
        "other", "license in the model card's metadata (weights trained on ImageNet/FFHQ are usually non-commercial)"
    )
    init_discriminator: str | None = arg(
        None,
        "start the discriminator from an exported one: a folder holding discriminator/ (or the discriminator/ folder itself) or a Hub id",
    )

    def validate(self) -> None:
        positive = (
            "train_batch_size",
            "gradient_accumulation_steps",
            "max_train_steps",
            "logging_steps",
            "validation_steps",
            "checkpointing_steps",
            "num_validation_images",
            "shuffle_block",
            "max_nonfinite_steps",
            "latent_stats_samples",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        non_negative = (
            "l1_weight",
            "lpips_weight",
            "gan_weight",
            "id_weight",
            "kl_weight",
            "disc_start",
            "gan_ramp_steps",
            "lecam_weight",
            "max_grad_norm",
            "lr_warmup_steps",
            "dataloader_num_workers",
            "adam_weight_decay",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.resolution <= 0 or self.resolution % 8:
            raise ConfigError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if self.learning_rate <= 0 or (self.disc_learning_rate is not None and self.disc_learning_rate <= 0):
            raise ConfigError("learning rates must be positive")
        for name in ("adam_beta1", "adam_beta2", "ema_decay", "lecam_decay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError("--checkpoints_total_limit must be at least 1")
        if self.latent_channels is not None and self.latent_channels <= 0:
            raise ConfigError("--latent_channels must be positive")
        if self.model_config not in PRESETS and not (
            self.model_config.endswith(".json") and os.path.isfile(self.model_config)
        ):
            raise ConfigError(
                f"unknown --model_config {self.model_config!r}: use one of {', '.join(PRESETS)} or an existing .json file"
            )
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("--push_to_hub needs --hub_model_id")
        if self.mixture == "transfusion" and not self.data_root:
            raise ConfigError("--mixture transfusion needs --data_root (the folder holding ImageNet/, COCO/, FFHQ/)")
        if self.torch_compile and self.adaptive_weight_mode == "reference":
            raise ConfigError(
                "--torch_compile needs --adaptive_weight_mode fast (the reference mode's "
                "retain_graph backward fails on compiled graphs)"
            )
        if self.source and self.mixture:
            raise ConfigError("give either --source (repeatable) or --mixture, not both")

    @property
    def is_demo(self) -> bool:
        """No data given: train on the embedded photographs."""
        return not self.source and not self.mixture


def apply_demo_defaults(cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    """Fill in the demo's defaults for every field the user did not set."""
    if cfg.is_demo:
        for key, value in DEMO_DEFAULTS.items():
            if key not in explicit:
                setattr(cfg, key, value)
    return cfg
