"""Every knob of `train_vae.py`, with the Transfusion recipe as defaults; each flag's facts on its own field.

Besides its help, choices and bound, each field says:
- `resume`: what a resumed run does when the flag differs from the checkpoint's.
    fixed  refused (one line): the restored state would override the new value or could not follow it
           (Adam's settings and base learning rates live in the optimizer and scheduler states, the EMA
           decay in the EMA state; which parameters train; the shuffle blocks the data position counts in; the seed)
    free   changes silently: it does not touch the trajectory (where outputs go, how often things are
           logged, validated, saved or pushed; weights that the checkpoint then replaces)
    warn   takes effect, named in a warning: the run is then no longer a continuation of either setting
    model  compared through the model's shape (the checkpoint's config.json), not as a flag
- `recipe`: reported in the model card's recipe section.
- `loss`: passed to `TransfusionLoss` (True: under the same name, else the keyword it goes to).
- `demo`: its value in the offline demo (no data flags): real photographs shipped with scikit-image, the
  "tiny" preset and a schedule that ends in minutes on a laptop CPU; why each value was chosen, and what
  the alternatives measured, is in docs/measurements.md. Flags given explicitly always win.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from accelerate import tracking
from accelerate.utils import LoggerType

from autoencoder.models import (
    DEFAULT_PRESET,
    PRESETS,
    check_model_location,
    is_hub_id,
    is_single_file,
    model_config_form,
)
from common.cli import Alias, arg
from common.errors import ConfigError, ModelError
from losses.identity import MOCO_V2_800EP_URL

# accelerate's trackers (tensorboard, wandb, comet_ml, mlflow, clearml, ...), `all` and `none`.
TRACKERS = tuple(t.value for t in LoggerType) + ("none",)

# diffusers' example scripts' name for --model_config (train_autoencoderkl.py, train_unconditional.py).
MODEL_ALIASES = (
    Alias(
        "model_config_name_or_path",
        "diffusers' flag: the config of a freshly initialised model (a folder, Hub id or JSON file; here also a preset)",
        "`--model_config`",
    ),
)

# diffusers' example scripts' data flags, each mapped onto one --source (TrainConfig.apply_aliases).
DATA_ALIASES = (
    Alias(
        "dataset_name",
        "diffusers' flag: a Hub dataset id or a local dataset folder to train on",
        "one `--source PATH` (with `config=` / `image_column=` from the two flags below)",
    ),
    Alias("dataset_config_name", "diffusers' flag: the configuration of --dataset_name", "`config=` of that source"),
    Alias("image_column", "diffusers' flag: the image column of --dataset_name", "`image_column=` of that source"),
    Alias("train_data_dir", "diffusers' flag: a folder of training images", "one `--source DIR`"),
)


def alias_sources(given: dict[str, str]) -> list[str]:
    """The --source texts that diffusers' data flags in `given` stand for (ConfigError for a bad combination)."""
    extra = {k: given[k] for k in ("dataset_config_name", "image_column") if k in given}
    if extra and "dataset_name" not in given:
        raise ConfigError(f"--{next(iter(extra))} needs --dataset_name")
    texts = []
    if "dataset_name" in given:
        pairs = {"path": given["dataset_name"], "config": extra.get("dataset_config_name")}
        pairs["image_column"] = extra.get("image_column")
        texts.append(_source_text({k: v for k, v in pairs.items() if v is not None}))
    if "train_data_dir" in given:
        texts.append(_source_text({"path": given["train_data_dir"]}))
    return texts


def _source_text(pairs: dict[str, str]) -> str:
    """A bare path when that is all, else 'key=value,...' (--source's syntax)."""
    for key, value in pairs.items():
        if not value or "=" in value or (len(pairs) > 1 and "," in value):
            raise ConfigError(f"{key} {value!r} cannot be written as a --source (empty, or holds '=' or ',')")
    return pairs["path"] if len(pairs) == 1 else ",".join(f"{k}={v}" for k, v in pairs.items())


def check_tracker(report_to: str) -> None:
    """A named tracker whose package is missing: one line now (accelerate would drop it without a word)."""
    if report_to in ("all", "none"):
        return
    installed = [str(t) for t in tracking.get_available_trackers()]
    if report_to not in installed:
        raise ConfigError(
            f"--report_to {report_to} needs the {report_to} package (pip install {report_to}); "
            f"installed trackers: {', '.join(installed) or 'none'}"
        )


@dataclass
class TrainConfig:
    # --- model ---
    pretrained_model_name_or_path: str | None = arg(
        None,
        "start from this AutoencoderKL as it is, with its own config: a Hub id, a folder (or a training checkpoint), "
        "or a single file in the original LDM layout (.safetensors/.ckpt; its config from --model_config, else "
        "inferred by diffusers, which needs the Hub or its cache)",
        resume="free",
    )
    model_config: str | None = arg(
        None,
        f"the architecture of a freshly initialised model: a preset ({', '.join(PRESETS)}; default "
        f"{DEFAULT_PRESET}), a JSON config file, a folder holding config.json or a Hub id (only its config is "
        "read); with a single-file --pretrained_model_name_or_path, that file's config",
        resume="model",
        demo="tiny",
    )
    latent_channels: int | None = arg(
        None, "override the preset's latent channels (e.g. 4, 8, 16)", bound="positive", resume="model"
    )
    init_from: str | None = arg(
        None,
        "copy a pretrained AutoencoderKL (folder or hub id) into the architecture of --model_config / "
        "--latent_channels; latent-facing layers are adapted when the channel count differs",
        resume="free",
    )
    train_decoder_only: bool = arg(
        False, "freeze encoder and quant_conv: the latent space stays as it is", resume="fixed"
    )
    freeze: list[str] = arg(
        [],
        "freeze parameters whose name starts with this prefix (repeatable), e.g. encoder.down_blocks.0",
        resume="fixed",
    )
    gradient_checkpointing: bool = arg(False, "trade compute for memory in the autoencoder", resume="warn")
    channels_last: bool = arg(False, "channels-last memory format (faster convolutions on GPUs)", resume="warn")
    torch_compile: bool = arg(False, "torch.compile the autoencoder", resume="warn")
    # --- data ---
    source: list[str] = arg(
        [],
        "a data source, repeatable: a path/hub id or 'name=..,path=..,weight=..,split=..,kind=..,config=..,image_column=..'",
        resume="warn",
    )
    mixture: str | None = arg(
        None, "mixture file (YAML/JSON) or a ready-made name ('transfusion' with --data_root)", resume="warn"
    )
    data_root: str | None = arg(
        None,
        "folder holding ImageNet/, COCO/ and FFHQ/ in the reference implementation's layouts (docs/recipe.md) (for --mixture transfusion)",
        resume="warn",
    )
    validation_source: str | None = arg(
        None, "held-out images for in-training metrics and latent statistics (same syntax as --source)", resume="warn"
    )
    resolution: int = arg(256, "training crop size (divisible by 8)", resume="warn", demo=64)
    random_flip: bool = arg(False, "random horizontal flips (the recipe uses none)", resume="warn")
    crop_mode: str = arg(
        "resize",
        "training crops: resize (shorter side -> resolution, random crop; the recipe), native (a random window at the image's own scale), random_scale (shorter side resized to a random size between resolution and native, then a random crop)",
        choices=("resize", "native", "random_scale"),
        resume="warn",
        demo="random_scale",
    )
    interpolation: str = arg(
        "bilinear",
        "shorter-side resize filter (bilinear = torchvision's Resize, as the reference implementation)",
        choices=("bilinear", "bicubic"),
        resume="warn",
    )
    shuffle_block: int = arg(
        1000, "images per exactly-resumable shuffle block", bound="positive", resume="fixed", demo=16
    )
    dataloader_num_workers: int = arg(
        4, "DataLoader worker processes per rank", bound="non_negative", resume="warn", demo=0
    )
    num_validation_images: int = arg(
        8, "held-out images in the fixed validation batch", bound="positive", resume="free", demo=16
    )
    # --- loss (Transfusion: L1 + LPIPS + 0.5·GAN + 0.2·ID + 1e-6·KL) ---
    l1_weight: float = arg(1.0, "weight of the L1 term", bound="non_negative", resume="warn", recipe=True, loss=True)
    lpips_weight: float = arg(
        1.0, "weight of LPIPS-VGG", bound="non_negative", resume="warn", recipe=True, loss=True, demo=0.0
    )
    gan_weight: float = arg(
        0.5,
        "weight of the adaptive-weighted generator hinge term",
        bound="non_negative",
        resume="warn",
        recipe=True,
        loss=True,
    )
    id_weight: float = arg(
        0.2,
        "weight of the MoCo v2 feature (ID) loss",
        bound="non_negative",
        resume="warn",
        recipe=True,
        loss=True,
        demo=0.0,
    )
    kl_weight: float = arg(
        1e-6,
        "weight of the KL term (sum over C·H·W, mean over batch)",
        bound="non_negative",
        resume="warn",
        recipe=True,
        loss=True,
    )
    disc_start: int = arg(
        50001,
        "step at which the discriminator and the GAN term switch on",
        bound="non_negative",
        resume="warn",
        recipe=True,
        loss=True,
        demo=800,
    )
    adaptive_weight_max: float = arg(1e4, "clamp of the adaptive GAN weight", resume="warn", recipe=True, loss=True)
    gan_ramp_steps: int = arg(
        0,
        "ramp the GAN weight linearly over this many steps after disc_start (0 = switch on at once, as the recipe)",
        bound="non_negative",
        resume="warn",
        recipe=True,
        loss=True,
        demo=100,
    )
    lecam_weight: float = arg(
        0.0,
        "LeCAM regularisation of the discriminator (0 = off, as the recipe)",
        bound="non_negative",
        resume="warn",
        recipe=True,
        loss=True,
    )
    lecam_decay: float = arg(
        0.999, "EMA decay of LeCAM's logit anchors", bound="unit_interval", resume="warn", loss=True
    )
    # --- latent regularisers (off by default; docs/recipe.md, "Latent regularisers (off by default)") ---
    equivariance_mode: str = arg(
        "additive",
        "additive (ours): --equivariance_weight > 0 adds an L1 (+LPIPS) term on a transformed pair; eqvae (EQ-VAE's "
        "published scheme, on when chosen): with probability --equivariance_prob the step's whole loss (GAN and KL "
        "included) is that of (T(x), decode(T(z))), T a scale uniform in {8/32, ..., 31/32} and a quarter turn; "
        "else the step is EQ-VAE's prior preservation (--eqvae_low_res_prob)",
        choices=("additive", "eqvae"),
        resume="warn",
        recipe=True,
    )
    eqvae_low_res_prob: float = arg(
        0.25,
        "--equivariance_mode eqvae: probability that a step without T trains on the image downscaled by a scale "
        "uniform in {8/32, ..., 31/32} (EQ-VAE's prior preservation at low resolution, p_prior_s), in [0, 1)",
        bound="unit_interval",
        resume="warn",
        recipe=True,
    )
    equivariance_weight: float = arg(
        0.0,
        "--equivariance_mode additive: weight of the L1 (+LPIPS) loss between decode(T(z)) and T(x), T a random "
        "downscale and/or quarter turn (0 = off)",
        bound="non_negative",
        resume="warn",
        recipe=True,
        loss=True,
    )
    equivariance_prob: float = arg(
        0.5,
        "probability that a step adds the equivariance term (additive) or replaces its pair by the transformed "
        "one (eqvae), in [0, 1]",
        bound="non_negative",
        resume="warn",
        recipe=True,
    )
    equivariance_scales: list[float] = arg(
        [0.5, 0.75],
        "--equivariance_mode additive: downscale factors T draws from, each in (0, 1] (repeatable; 1 = rotation only)",
        resume="warn",
        recipe=True,
    )
    equivariance_rotations: bool = arg(
        True,
        "--equivariance_mode additive: T also turns by a random multiple of 90 degrees",
        resume="warn",
        recipe=True,
    )
    latent_noise_aug: float = arg(
        0.0,
        "train the decoder on noised latents: the step decodes z + sigma*std(z)*eps, sigma ~ U[0, this] per image, "
        "std(z) the batch's latent std (units of the normalised latent); 0 = off",
        bound="non_negative",
        resume="warn",
        recipe=True,
    )
    vf_weight: float = arg(
        0.0,
        "VA-VAE vision-foundation alignment: base weight of the adaptively weighted DINOv2 margin loss on the "
        "latent (0 = off; 0.1-0.5 in VA-VAE)",
        bound="non_negative",
        resume="warn",
        recipe=True,
        loss=True,
    )
    vf_margin_cos: float = arg(
        0.5,
        "margin m1 of the VF loss's per-position cosine term relu(1 - m1 - cos)",
        bound="non_negative",
        resume="warn",
        recipe=True,
        loss=True,
    )
    vf_margin_distmat: float = arg(
        0.25,
        "margin m2 of the VF loss's cosine-similarity-matrix term relu(|cos_z - cos_f| - m2)",
        bound="non_negative",
        resume="warn",
        recipe=True,
        loss=True,
    )
    vf_margin_start: int = arg(
        0,
        "the VF margins m1, m2 apply from this step; before it they are 0 (VA-VAE's released schedule trains its "
        "first stages without margins)",
        bound="non_negative",
        resume="warn",
        recipe=True,
        loss=True,
    )
    vf_model: str = arg(
        "facebook/dinov2-base",
        "the frozen DINOv2 of the VF loss: facebook/dinov2-base (ViT-B/14, 768-d), facebook/dinov2-large "
        "(ViT-L/14, 1024-d, VA-VAE's), or a transformers Dinov2Model folder (random weights with "
        "--perception_weights random)",
        resume="fixed",
        recipe=True,
        loss=True,
    )
    perception_weights: str = arg(
        "pretrained",
        "LPIPS-VGG and MoCo weights: pretrained (required for real runs), random (smoke tests), auto (pretrained when cached, else random, loudly)",
        choices=("pretrained", "random", "auto"),
        resume="free",
        demo="auto",
    )
    id_checkpoint: str = arg(
        MOCO_V2_800EP_URL,
        "MoCo v2/v3 ResNet-50 checkpoint file or URL for the ID loss",
        resume="free",
        loss="moco_weights",
    )
    id_feature: str = arg(
        "projection",
        "ID features: the 128-d MoCo projection with MSE (the recipe) or 2048-d pooled with cosine",
        choices=("projection", "pooled"),
        resume="warn",
        loss=True,
    )
    adaptive_weight_mode: str = arg(
        "fast",
        "fast: last-layer gradients derived from one backward through LPIPS/MoCo/D; reference: the reference implementation's autograd.grad on the last layer (same values)",
        choices=("fast", "reference"),
        resume="warn",
    )
    # --- optimisation ---
    learning_rate: float = arg(
        1e-4, "Adam learning rate of the autoencoder", bound="positive", resume="fixed", demo=1e-3
    )
    disc_learning_rate: float | None = arg(
        None, "Adam learning rate of the discriminator (default: --learning_rate)", bound="positive", resume="fixed"
    )
    adam_beta1: float = arg(0.9, "Adam beta1", bound="unit_interval", resume="fixed")
    adam_beta2: float = arg(0.999, "Adam beta2", bound="unit_interval", resume="fixed")
    adam_weight_decay: float = arg(
        0.0, "AdamW decoupled weight decay (0 = plain Adam, as the recipe)", bound="non_negative", resume="fixed"
    )
    adam_epsilon: float = arg(1e-8, "Adam epsilon", resume="fixed")
    max_grad_norm: float = arg(
        0.0, "clip gradients to this global norm (0 = no clipping, as the recipe)", bound="non_negative", resume="warn"
    )
    lr_scheduler: str = arg(
        "constant",
        "diffusers LR schedule",
        choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"),
        resume="warn",
        demo="cosine",
    )
    lr_warmup_steps: int = arg(0, "warm-up steps of the LR schedule", bound="non_negative", resume="warn")
    train_batch_size: int = arg(12, "images per device per micro-batch", bound="positive", resume="warn", demo=8)
    gradient_accumulation_steps: int = arg(1, "micro-batches per optimizer step", bound="positive", resume="warn")
    max_train_steps: int = arg(1_000_000, "optimizer steps to train", bound="positive", resume="warn", demo=900)
    mixed_precision: str | None = arg(
        None,
        "no, fp16 (with a grad scaler) or bf16 autocast over fp32 master weights (default: the accelerate config)",
        choices=("no", "fp16", "bf16"),
        resume="warn",
    )
    allow_tf32: bool = arg(True, "TF32 matmuls on Ampere+ GPUs", resume="warn")
    cudnn_benchmark: bool = arg(
        True, "let cuDNN time its convolution kernels once and keep the fastest (shapes never change)", resume="warn"
    )
    deterministic: str = arg(
        "off",
        "deterministic kernels (torch.use_deterministic_algorithms; slower): on makes a resumed GPU run equal an "
        "uninterrupted one bit for bit, not only in data and state (the ID and equivariance resizes then run as "
        "matmuls of the same values, losses/separable.py); warn: an op without a deterministic kernel warns instead "
        "of stopping the run",
        choices=("off", "on", "warn"),
        resume="warn",
    )
    ddp_timeout: int = arg(
        30,
        "minutes a rank waits in a collective (NCCL/gloo process-group timeout) before the job fails",
        bound="positive",
        resume="free",
    )
    use_ema: bool = arg(
        False, "keep an EMA of the autoencoder, used for validation and export", resume="fixed", demo=True
    )
    ema_decay: float = arg(0.9999, "EMA decay", bound="unit_interval", resume="fixed", demo=0.99)
    max_nonfinite_steps: int = arg(
        20, "stop after this many consecutive steps with a non-finite loss or gradient", bound="positive", resume="free"
    )
    seed: int = arg(0, "random seed (data order, init, sampling)", resume="fixed")
    # --- output, logging, checkpoints ---
    output_dir: str = arg(
        "vae-output", "where checkpoints, samples, logs and the exported model go", resume="free", demo="outputs/demo"
    )
    logging_dir: str = arg("logs", "tracker folder, relative to --output_dir", resume="free")
    report_to: str = arg(
        "tensorboard",
        "tracker (any that accelerate supports; all = every one installed)",
        choices=TRACKERS,
        resume="free",
    )
    tracker_project_name: str = arg("transfusion-vae", "tracker project name", resume="free")
    logging_steps: int = arg(50, "log losses every N steps", bound="positive", resume="free", demo=20)
    validation_steps: int = arg(
        1000,
        "held-out PSNR/SSIM/LPIPS and a reconstruction grid every N steps",
        bound="positive",
        resume="free",
        demo=100,
    )
    checkpointing_steps: int = arg(
        5000, "save a resumable checkpoint every N steps", bound="positive", resume="free", demo=300
    )
    checkpoints_total_limit: int | None = arg(
        None, "keep at most this many checkpoints", bound="at_least_1", resume="free"
    )
    resume_from_checkpoint: str | None = arg(
        None,
        "'latest' (the newest in --output_dir), a checkpoint's name in --output_dir (checkpoint-N, as diffusers' "
        "scripts), or a checkpoint folder's path",
        resume="free",
    )
    overwrite_output_dir: bool = arg(
        False,
        "start a new run in an --output_dir that holds another run's checkpoints or metrics log, removing them "
        "(without it, that is an error)",
        resume="warn",
        demo=True,
    )
    latent_stats_samples: int = arg(
        1024,
        "held-out images (a seeded sample) whose sampled latents give scaling_factor / shift_factor at export "
        "(1024: σ within ~0.4% between two samples, benchmarks/latent_stats_stability.py)",
        bound="positive",
        resume="free",
        demo=16,
    )
    latent_scaling: str = arg(
        "auto",
        "the exported config.json's scaling_factor / shift_factor / latents_mean / latents_std: keep the start "
        "model's (a decoder fine-tune stays a drop-in for models trained on its latents), measure them on this model "
        "(shift_factor = mean, scaling_factor = 1/std, no per-channel values), or auto: keep when the run starts "
        "from a model (--pretrained_model_name_or_path, --init_from) with encoder and quant_conv frozen, else "
        "measure; the measured statistics go to latent_stats.json in every case",
        choices=("auto", "keep", "measure"),
        resume="free",
    )
    export_single_file: bool = arg(
        False,
        "also write the exported VAE as one .safetensors file in the original LDM key layout "
        "(vae_single_file.safetensors, what ComfyUI and AUTOMATIC1111 load)",
        resume="free",
    )
    # --- Hub ---
    push_to_hub: bool = arg(
        False, "upload the exported model to the Hub (token from HF_TOKEN or `hf auth login`)", resume="free"
    )
    hub_model_id: str | None = arg(None, "Hub repository, e.g. user/transfusion-vae", resume="free")
    hub_private: bool = arg(False, "create the Hub repository as private", resume="free")
    hub_strategy: str = arg(
        "end",
        "end: upload the exported model once, at the end; every_save: also upload each checkpoint's exported model (not optimizer states) in the background",
        choices=("end", "every_save"),
        resume="free",
    )
    license: str = arg(
        "other",
        "license in the model card's metadata (weights trained on ImageNet/FFHQ are usually non-commercial)",
        resume="free",
    )
    init_discriminator: str | None = arg(
        None,
        "start the discriminator from an exported one: a folder holding discriminator/ (or the discriminator/ folder itself) or a Hub id",
        resume="free",
    )

    ALIASES = MODEL_ALIASES + DATA_ALIASES

    @staticmethod
    def apply_aliases(values: dict, given: dict[str, str]) -> None:
        """diffusers' data flags become --source entries (after any given with --source); its
        --model_config_name_or_path is --model_config."""
        given = dict(given)
        if "model_config_name_or_path" in given:
            if "model_config" in values:
                raise ConfigError("give --model_config or diffusers' --model_config_name_or_path, not both")
            values["model_config"] = given.pop("model_config_name_or_path")
        if given:
            values["source"] = list(values.get("source", [])) + alias_sources(given)

    def check(self) -> None:
        """Checks across flags, and those a bound cannot say (bounds are checked by common.cli.parse_config)."""
        if self.resolution <= 0 or self.resolution % 8:
            raise ConfigError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        self._check_model_start()
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("--push_to_hub needs --hub_model_id")
        check_tracker(self.report_to)
        if self.mixture == "transfusion" and not self.data_root:
            raise ConfigError("--mixture transfusion needs --data_root (the folder holding ImageNet/, COCO/, FFHQ/)")
        if self.torch_compile and self.adaptive_weight_mode == "reference":
            raise ConfigError(
                "--torch_compile needs --adaptive_weight_mode fast (the reference mode's "
                "retain_graph backward fails on compiled graphs)"
            )
        if self.source and self.mixture:
            raise ConfigError("give either --source (repeatable) or --mixture, not both")
        if not 0.0 <= self.equivariance_prob <= 1.0:
            raise ConfigError(f"--equivariance_prob must be in [0, 1], got {self.equivariance_prob}")
        bad = [s for s in self.equivariance_scales if not 0.0 < s <= 1.0]
        if bad:
            raise ConfigError(f"--equivariance_scales must each be in (0, 1], got {bad}")
        if self.equivariance_weight > 0 and not self.equivariance_rotations and set(self.equivariance_scales) <= {1.0}:
            raise ConfigError(
                "--equivariance_weight needs a transform: --equivariance_scales below 1 or --equivariance_rotations"
            )
        if self.equivariance_mode == "eqvae" and self.equivariance_weight > 0:
            raise ConfigError(
                "--equivariance_mode eqvae replaces the step's loss and has no weight: leave --equivariance_weight at 0"
            )
        smallest = self.resolution // 4  # EQ-VAE's smallest scale, 8/32
        if self.equivariance_mode == "eqvae" and (
            (self.gan_weight > 0 and smallest < 24) or (self.lpips_weight > 0 and smallest < 16)
        ):
            raise ConfigError(
                f"--equivariance_mode eqvae downscales images to 1/4 ({smallest} px at --resolution {self.resolution}), "
                "below the smallest input of the discriminator (24 px) or LPIPS (16 px): use --resolution >= 96, or "
                "--gan_weight 0 / --lpips_weight 0"
            )
        if self.equivariance_mode == "eqvae" and self.vf_weight > 0:
            raise ConfigError(
                "--equivariance_mode eqvae does not combine with --vf_weight (the VF loss would see transformed images)"
            )
        if self.vf_weight > 0 and (
            self.train_decoder_only or any("encoder.conv_out.weight".startswith(p) for p in self.freeze)
        ):
            raise ConfigError(
                "--vf_weight trains the encoder and measures its weight at encoder.conv_out: "
                "do not freeze it (--train_decoder_only, --freeze)"
            )
        vf_model = os.path.expanduser(self.vf_model)
        if self.vf_weight > 0 and not os.path.isdir(vf_model) and not ("/" in vf_model and is_hub_id(vf_model)):
            raise ConfigError(
                f"--vf_model {self.vf_model!r}: no such folder, and not a Hub id (facebook/dinov2-base, "
                "facebook/dinov2-large, or a Dinov2Model folder)"
            )

    def _check_model_start(self) -> None:
        """Where the model comes from: a fresh --model_config, --init_from's copy into it, or
        --pretrained_model_name_or_path as it is; combinations that would silently ignore a flag are refused, and
        each path is checked now (a folder without a model, a file of another kind, offline a Hub id not cached)."""
        pretrained, config = self.pretrained_model_name_or_path, self.model_config
        if self.latent_scaling == "keep" and not (pretrained or self.init_from):
            raise ConfigError(
                "--latent_scaling keep keeps the start model's latent convention, and a fresh model has none: give "
                "--pretrained_model_name_or_path or --init_from, or use --latent_scaling auto / measure"
            )
        if pretrained and self.init_from:
            raise ConfigError(
                "give either --pretrained_model_name_or_path (the model as it is) or --init_from (its tensors copied "
                "into the architecture of --model_config / --latent_channels), not both"
            )
        if pretrained and self.latent_channels is not None:
            raise ConfigError(
                "--latent_channels changes the architecture, and --pretrained_model_name_or_path loads the model as "
                f"it is: use --init_from {pretrained} --latent_channels {self.latent_channels} instead"
            )
        if pretrained and config is not None and not is_single_file(pretrained):
            raise ConfigError(
                "--pretrained_model_name_or_path brings its own config: --model_config is only for a fresh model "
                "or a single-file checkpoint (to copy the weights into another architecture use --init_from)"
            )
        try:
            if config is not None:
                model_config_form(config, "--model_config")
            for flag in ("pretrained_model_name_or_path", "init_from"):
                if getattr(self, flag):
                    check_model_location(getattr(self, flag), f"--{flag}")
        except ModelError as e:
            raise ConfigError(str(e)) from None

    def frozen_prefixes(self) -> list[str]:
        """Parameter-name prefixes that do not train: --freeze, and encoder + quant_conv with --train_decoder_only."""
        return list(self.freeze) + (["encoder.", "quant_conv."] if self.train_decoder_only else [])

    def recipe(self) -> dict:
        """The flags a model card reports as the recipe."""
        return {name: getattr(self, name) for name in RECIPE_KEYS}

    def loss_kwargs(self) -> dict:
        """TransfusionLoss's keyword arguments taken from the flags (all but perception_weights)."""
        return {(name if key is True else key): getattr(self, name) for name, key in LOSS_KEYWORDS.items()}

    @property
    def is_demo(self) -> bool:
        """No data given: train on the embedded photographs."""
        return not self.source and not self.mixture


def _with(key: str, value=True) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get(key) == value)


RESUME_POLICIES = ("fixed", "free", "warn", "model")
FIXED_ON_RESUME = _with("resume", "fixed")
FREE_ON_RESUME = _with("resume", "free")
CHECKED_AS_MODEL = _with("resume", "model")
RECIPE_KEYS = _with("recipe")
LOSS_KEYWORDS = {f.name: f.metadata["loss"] for f in dataclasses.fields(TrainConfig) if "loss" in f.metadata}
DEMO_DEFAULTS = {f.name: f.metadata["demo"] for f in dataclasses.fields(TrainConfig) if "demo" in f.metadata}


def apply_demo_defaults(cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    """Fill in the demo's defaults for every field the user did not set."""
    if cfg.is_demo:
        for key, value in DEMO_DEFAULTS.items():
            if key == "model_config" and cfg.pretrained_model_name_or_path:
                continue  # the pretrained model (or a single file's inferred config) is the architecture
            if key not in explicit:
                setattr(cfg, key, value)
    return cfg
