"""Train the Transfusion VAE (diffusers AutoencoderKL) with Accelerate.

    accelerate launch train_vae.py --mixture transfusion --data_root /data \
        --validation_source /data/ImageNet/val --output_dir vae-out
    python train_vae.py                 # no data flags: the offline demo on bundled photographs

Reads top to bottom: parse -> build -> prepare -> loop -> export. Each training step is
`Trainer.train_step`: one optimizer step for the autoencoder (G) and, from `--disc_start`, one
for the discriminator (D) on the detached reconstruction of the same batch. The recipe, its
normalisation and the evaluation protocol are written down in docs/recipe.md.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DistributedDataParallelKwargs,
    GradScalerKwargs,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    broadcast_object_list,
    gather_object,
    set_seed,
)
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import data
from autoencoder.models import build_vae, init_from_pretrained, load_vae
from common.cli import fail, parse_config, to_dict
from common.errors import DataError, ModelError, PerceptionWeightsError, UserError
from common.helpers import set_torch_backends, stderr_is_terminal
from losses import TransfusionLoss
from losses.regularisers import (
    EquivarianceTransform,
    EqvaeDraw,
    add_latent_noise,
    build_vf_projection,
    draw_equivariance,
    draw_eqvae,
    transform_generator,
)
from losses.weights import build_on_every_node, weights_fingerprint
from metrics import (
    chroma_error,
    chroma_ratio,
    drift,
    held_out_metrics,
    latent_diagnostics,
    latent_pca_rgb,
    latents,
    reconstruct,
    save_grid,
    to_unit,
)
from metrics.pixel import MIN_CHROMA
from publishing import export, hub
from training import checkpointing, cluster
from training.config import TrainConfig, apply_demo_defaults
from training.runlog import METRICS_LOG, SAMPLES_DIR, RunLog, log_images

PROG = "train_vae.py"
# EX_TEMPFAIL ("try again later"): a preemption signal stopped the run after it wrote a checkpoint;
# `--resume_from_checkpoint latest` continues it exactly.
PREEMPTED_EXIT_CODE = 75
logger = get_logger(__name__)


class TrainingDivergedError(UserError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class Preempted(Exception):
    """A stop signal arrived; a checkpoint of the last finished step has been written."""

    def __init__(self, step: int, signum: int, checkpoint: str):
        super().__init__(
            f"stopped by signal {signum} at step {step}; the checkpoint of this step is written: "
            "resume with --resume_from_checkpoint latest"
        )
        self.step, self.signum, self.checkpoint = step, signum, checkpoint


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


@torch.compiler.disable
def apply_transform(transform: EquivarianceTransform, z: torch.Tensor, x: torch.Tensor):
    """(T(z), T(x)), outside torch.compile's graphs: traced, each (scale, quarter_turns) became a graph of its own
    (dynamo guards on the transform's fields), and dynamo stops compiling a frame after 8 of them (its
    recompile limit). Outside, the graphs differ only by the shape of T(z), which dynamo then marks dynamic."""
    return transform.apply(z, x)


class VAEForTraining(nn.Module):
    """encode -> sample z -> decode in one forward, so DDP sees (and syncs) a single call.

    With the latent regularisers on, the same forward also decodes T(z) (equivariance) and projects z to the
    foundation model's width (VF alignment, `vf_projection`): every gradient is still synced once per step.
    """

    def __init__(self, vae: AutoencoderKL, vf_projection: nn.Module | None = None, latent_noise_aug: float = 0.0):
        super().__init__()
        self.vae = vae
        self.vf_projection = vf_projection  # trained with the autoencoder, checkpointed, never exported
        self.latent_noise_aug = latent_noise_aug  # σ_max of --latent_noise_aug (0: off, nothing drawn)

    def _decode_main(self, z: torch.Tensor) -> torch.Tensor:
        """The step's reconstruction: decode(z), or with --latent_noise_aug decode of z noised (add_latent_noise)."""
        if self.latent_noise_aug > 0:
            z = add_latent_noise(z, self.latent_noise_aug)
        return self.vae.decode(z).sample

    def forward(self, x: torch.Tensor, equivariance: EquivarianceTransform | None = None, replace: bool = False):
        """(recon, mean, logvar), plus a dict of the regularisers' inputs when any is on:
        "equivariance": (T(x), decode(T(z))) for a transform given, "latent_projection": z' (B, D, h, w).
        With `replace` (EQ-VAE's scheme) only T(z) is decoded: (decode(T(z)), mean, logvar, {"target": T(x)})."""
        posterior = self.vae.encode(x).latent_dist  # mean/logvar: (B, C_lat, H/8, W/8), logvar clamped [-30, 20]
        z = posterior.sample()
        if replace:
            tz, tx = apply_transform(equivariance, z, x)
            return self._decode_main(tz), posterior.mean, posterior.logvar, {"target": tx}
        if equivariance is None and self.vf_projection is None:
            recon = self._decode_main(z)  # (B, 3, H, W); training decodes a *sampled* z
            return recon, posterior.mean, posterior.logvar
        extras = {}
        if equivariance is not None:
            tz, tx = apply_transform(equivariance, z, x)
            # Decoded before z: the adaptive weight's hook keeps the input of decoder.conv_out of the last decode.
            extras["equivariance"] = (tx, self.vae.decode(tz).sample)
        recon = self._decode_main(z)
        if self.vf_projection is not None:
            extras["latent_projection"] = self.vf_projection(z)
        return recon, posterior.mean, posterior.logvar, extras


def equivariance_transform(cfg: TrainConfig, step: int, micro_batch: int = 0) -> EquivarianceTransform | None:
    """This (step, micro-batch)'s transform T of the equivariance term, or None (term off, or not drawn).

    Drawn from a generator seeded from (seed, step, micro-batch): every rank and a resumed run draw the
    same T, and the global RNG is never touched (with the term off, nothing is drawn at all)."""
    if cfg.equivariance_weight == 0 or cfg.equivariance_prob == 0:
        return None
    return draw_equivariance(
        transform_generator(cfg.seed, step, micro_batch),
        cfg.equivariance_prob,
        cfg.equivariance_scales,
        cfg.equivariance_rotations,
    )


def eqvae_draw(cfg: TrainConfig, step: int, micro_batch: int = 0) -> EqvaeDraw | None:
    """This (step, micro-batch)'s draw of EQ-VAE's scheme (--equivariance_mode eqvae), else None; from the same
    (seed, step, micro-batch) generator as the additive term's transform."""
    if cfg.equivariance_mode != "eqvae":
        return None
    return draw_eqvae(transform_generator(cfg.seed, step, micro_batch), cfg.equivariance_prob, cfg.eqvae_low_res_prob)


@dataclass
class TrainerState:
    """What a checkpoint needs beyond models, optimizers, schedulers and RNG (JSON-serialisable)."""

    global_step: int = 0
    images_seen: int = 0
    skipped_g_steps: int = 0
    skipped_d_steps: int = 0
    nonfinite_streak: int = 0
    skipped_images: dict[str, int] = field(default_factory=dict)
    initial_metrics: dict[str, float] = field(default_factory=dict)
    last_metrics: dict[str, float] = field(default_factory=dict)


def shut_down_workers(loader) -> None:
    """Stop a DataLoader's (persistent) workers now, through their queues.

    Left to interpreter exit, multiprocessing would stop them with SIGTERM, which the workers ignore
    (cluster.ignore_stop_signals), and then wait for them forever.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    if loader is not None:
        loader._iterator = None


def requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


# ----------------------------------------------------------------------------------------
# Builders: each callable on its own (tests and benchmarks build a Trainer without data)
# ----------------------------------------------------------------------------------------


def build_data(cfg: TrainConfig):
    """(training sources, held-out sources, whether the held-out images are disjoint from training).

    Without --validation_source the held-out images are a seeded sample of the training mixture
    (in proportion to its weights): spread over the data, but not disjoint from it.
    """
    if cfg.is_demo:
        train, heldout = data.demo_sources(os.path.join(cfg.output_dir, "demo_data"), cfg.resolution)
        sources, heldout_sources, disjoint = [train], [heldout], True
    else:
        if cfg.mixture:
            sources = data.load_mixture(cfg.mixture, data_root=cfg.data_root)
        else:
            sources = [data.parse_source(s) for s in cfg.source]
        if cfg.validation_source:
            heldout_sources, disjoint = [data.parse_source(cfg.validation_source)], True
        else:
            heldout_sources, disjoint = sources, False
    return sources, heldout_sources, disjoint


@dataclass
class DataPlan:
    """The job's data, listed once: the sources as given (the card names them) and as resolved."""

    sources: list  # SourceSpec
    heldout_sources: list  # SourceSpec
    heldout_disjoint: bool
    resolved: list  # ResolvedSource, for the training streams
    heldout_resolved: list  # ResolvedSource, for the held-out sample


def resolve_data(cfg: TrainConfig) -> DataPlan:
    """`build_data`, then every source listed (the held-out ones once more only when they are other sources)."""
    sources, heldout_sources, disjoint = build_data(cfg)
    resolved = data.resolve_sources(sources)
    heldout = resolved if heldout_sources is sources else data.resolve_sources(heldout_sources)
    return DataPlan(sources, heldout_sources, disjoint, resolved, heldout)


def on_main_process(accelerator: Accelerator, make):
    """`make()` on rank 0 alone, its result on every rank; the UserError it raised is raised on every rank."""
    result = [None]
    if accelerator.is_main_process:
        try:
            result[0] = (make(), None)
        except UserError as e:
            result[0] = (None, e)
    if accelerator.num_processes > 1:
        broadcast_object_list(result)
    value, error = result[0]
    if error is not None:
        raise error
    return value


def list_data(cfg: TrainConfig, accelerator: Accelerator) -> DataPlan:
    """The sources resolved once per job: on rank 0 (which also writes the demo's photographs into the shared
    --output_dir), broadcast to every rank. Each node's local main process then checks that it sees a few
    of the listed files, so a node-local copy that differs stops all ranks in one line instead of failing
    in a DataLoader worker."""
    plan = on_main_process(accelerator, lambda: resolve_data(cfg))
    if accelerator.num_processes > 1:
        listed = list({id(s): s for s in plan.resolved + plan.heldout_resolved}.values())
        local = data.missing_files(listed) if accelerator.is_local_main_process else []
        blind = {rank: missing for rank, missing in enumerate(gather_object([local])) if missing}
        if blind:
            first = min(blind)
            raise DataError(
                f"rank(s) {', '.join(map(str, sorted(blind)))} do not see files rank 0 listed (rank {first}: "
                f"{len(blind[first])} missing, e.g. {blind[first][0]}): put the data on a filesystem all nodes "
                "share, or the same files at the same path on every node"
            )
    return plan


def draw_held_out(cfg: TrainConfig, accelerator: Accelerator, heldout_resolved: list) -> torch.Tensor:
    """The fixed held-out batch: drawn on rank 0 alone (reading images spread over the data), broadcast."""
    return on_main_process(
        accelerator,
        lambda: data.sample_images(
            heldout_resolved, cfg.num_validation_images, cfg.resolution, seed=cfg.seed, interpolation=cfg.interpolation
        )[0],
    )


def build_autoencoder(cfg: TrainConfig) -> AutoencoderKL:
    """The model to train: --pretrained_model_name_or_path as it is (fp32), else a fresh --model_config, into
    which --init_from copies its tensors; then the frozen parameters (--freeze, --train_decoder_only) marked."""
    if cfg.pretrained_model_name_or_path:
        vae = load_vae(cfg.pretrained_model_name_or_path, dtype=torch.float32, config=cfg.model_config)
        logger.info(
            f"starting from {cfg.pretrained_model_name_or_path} as it is: latent_channels "
            f"{vae.config.latent_channels}, block_out_channels {list(vae.config.block_out_channels)}, "
            f"scaling_factor {vae.config.scaling_factor}, shift_factor {vae.config.shift_factor}",
            main_process_only=True,
        )
    else:
        vae = build_vae(cfg.model_config, latent_channels=cfg.latent_channels)
    frozen = cfg.frozen_prefixes()
    if cfg.init_from:
        source = load_vae(cfg.init_from)
        report = init_from_pretrained(vae, source)
        logger.info(report.summary(), main_process_only=True)
        fresh = [n for n in report.adapted + report.reinitialized if n.startswith(("encoder.", "quant_conv."))]
        fresh = [n for n in fresh if n.startswith(tuple(frozen))]
        if fresh:
            # A frozen encoder whose new latent channels are random would feed the decoder noise forever.
            raise ModelError(
                f"{'--train_decoder_only' if cfg.train_decoder_only else '--freeze'} would freeze encoder layers "
                f"that --init_from could not copy ({', '.join(fresh)}: the latent channel count changed); train "
                "the encoder too"
            )
        if cfg.latent_scaling == "keep" and report.latent_convention is None:
            raise ModelError(
                f"--latent_scaling keep: --init_from {cfg.init_from} has {source.config.latent_channels} latent "
                f"channels and this model {vae.config.latent_channels}, so it has no latent convention to keep; "
                "use --latent_scaling auto or measure"
            )
    for name, p in vae.named_parameters():
        if any(name.startswith(prefix) for prefix in frozen):
            p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    if cfg.channels_last:
        vae.to(memory_format=torch.channels_last)
    return vae


def build_base(cfg: TrainConfig, vae: AutoencoderKL) -> AutoencoderKL | None:
    """The model the run starts from, frozen in eval mode, for the drift metrics: a copy of
    --pretrained_model_name_or_path's model as loaded (`vae` before any step), --init_from's model as it is;
    None for a fresh model or a start in another latent space (nothing to compare latents with)."""
    if cfg.pretrained_model_name_or_path:
        base = copy.deepcopy(vae)
    elif cfg.init_from:
        base = load_vae(cfg.init_from, dtype=torch.float32)
    else:
        return None
    if not drift.same_latent_space(vae, base):
        logger.info("no encoder drift metrics: the start model has another latent space", main_process_only=True)
        return None
    return base.requires_grad_(False).eval()


def build_loss(cfg: TrainConfig) -> TransfusionLoss:
    """The loss module (LPIPS, MoCo and a fresh discriminator inside). 'auto' perception weights fall
    back to random ones, loudly, when the pretrained files are not available; `loss.perception_weights`
    records which were used."""
    kw = cfg.loss_kwargs()
    if cfg.perception_weights != "auto":
        loss, used = TransfusionLoss(perception_weights=cfg.perception_weights, **kw), cfg.perception_weights
    else:
        try:
            loss, used = TransfusionLoss(perception_weights="pretrained", **kw), "pretrained"
        except PerceptionWeightsError as e:
            bar = "!" * 88
            logging.getLogger(__name__).warning(
                f"\n{bar}\n!! pretrained perception weights unavailable: {e}\n"
                f"!! -> LPIPS-VGG and MoCo use RANDOM weights: fine for the demo, meaningless for a real run.\n{bar}"
            )
            loss, used = TransfusionLoss(perception_weights="random", **kw), "random"
    loss.perception_weights = used if (loss.perceptual is not None or loss.identity is not None) else "none"
    return loss


def build_loss_on_every_node(cfg: TrainConfig, accelerator: Accelerator) -> TransfusionLoss:
    """`build_loss` on each node's local main process first, then on its other ranks; the ranks then compare the
    perception weights they loaded and all stop in one line when a rank failed or holds others
    (`losses.weights.build_on_every_node`): a node without the files would otherwise train with random LPIPS/MoCo
    under `auto` while rank 0's card says "pretrained", or exit alone under `pretrained` and leave the others
    waiting for --ddp_timeout."""
    return build_on_every_node(
        accelerator,
        lambda: build_loss(cfg),
        lambda loss: weights_fingerprint(perception_nets(loss), loss.perception_weights),
    )


def perception_nets(loss: TransfusionLoss) -> dict[str, nn.Module | None]:
    """The loss's frozen networks by name (None: the term is off)."""
    return {"LPIPS": loss.perceptual, "MoCo": loss.identity, "DINOv2": loss.foundation}


def build_optimizer(cfg: TrainConfig, params, lr: float, device: torch.device) -> torch.optim.Optimizer:
    # Fused Adam: one kernel per step on CUDA, and on CPU 3.3× faster than the default for-loop
    # for 83.7 M parameters (benchmarks/README.md).
    kw = dict(
        lr=lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        fused=device.type in ("cuda", "cpu") or None,
    )
    if cfg.adam_weight_decay > 0:
        return torch.optim.AdamW(params, weight_decay=cfg.adam_weight_decay, **kw)
    return torch.optim.Adam(params, **kw)


def build_optimizers(
    cfg: TrainConfig, vae: AutoencoderKL, disc: nn.Module, device: torch.device, extra: nn.Module | None = None
):
    """Adam for the autoencoder's trainable parameters (and `extra`'s, e.g. the VF projection, after them) and for D."""
    g_params = [p for p in vae.parameters() if p.requires_grad]
    if extra is not None:
        g_params += list(extra.parameters())
    if not g_params:
        raise ModelError("every autoencoder parameter is frozen: nothing to train")
    opt_g = build_optimizer(cfg, g_params, cfg.learning_rate, device)
    return opt_g, build_optimizer(cfg, disc.parameters(), cfg.disc_learning_rate or cfg.learning_rate, device)


def build_ema(cfg: TrainConfig, vae: AutoencoderKL, device: torch.device) -> EMAModel | None:
    if not cfg.use_ema:
        return None
    ema = EMAModel(
        vae.parameters(), decay=cfg.ema_decay, model_cls=AutoencoderKL, model_config=vae.config, foreach=True
    )
    ema.to(device)
    return ema


def build_schedules(cfg: TrainConfig, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer):
    """LR schedules. D is stepped only once the GAN is on, so its schedule spans the steps from
    disc_start to the end: warm-up and decay then happen where D actually trains."""
    sched_g = get_scheduler(
        cfg.lr_scheduler, opt_g, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_train_steps
    )
    sched_d = get_scheduler(
        cfg.lr_scheduler,
        opt_d,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=max(cfg.max_train_steps - cfg.disc_start, 1),
    )
    return sched_g, sched_d


def build_dataloader(cfg: TrainConfig, accelerator: Accelerator, sources):
    """(stream, StatefulDataLoader) of this rank's share of the training mixture."""
    stream = data.build_train_stream(
        sources,
        cfg.resolution,
        seed=cfg.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        shuffle_block=cfg.shuffle_block,
        random_flip=cfg.random_flip,
        interpolation=cfg.interpolation,
        crop_mode=cfg.crop_mode,
    )
    # Its own generator: creating the iterator must not draw from the global RNG, or a resumed
    # run's posterior samples would differ from an uninterrupted run's.
    loader = data.make_dataloader(
        stream,
        cfg.train_batch_size,
        num_workers=cfg.dataloader_num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=cfg.dataloader_num_workers > 0,
        worker_init_fn=cluster.ignore_stop_signals,
    )
    return stream, loader


def scaler_kwargs(cfg: TrainConfig) -> GradScalerKwargs:
    """fp16: G's grad scaler starts at 2^16 / C·H·W (rounded up to a power of two), not at torch's 2^16.

    G's loss is a sum over the C·H·W pixels (the recipe's normalisation), not a mean, so its gradients are about
    C·H·W times those torch's default is made for: at 2^16 the first steps overflow (the parameter gradients are
    sums over every pixel of the batch) and are skipped until the scale has fallen that far.
    """
    pixels = 3 * cfg.resolution**2
    return GradScalerKwargs(init_scale=2.0 ** (16 - math.ceil(math.log2(pixels))))


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    project = ProjectConfiguration(
        project_dir=cfg.output_dir, logging_dir=os.path.join(cfg.output_dir, cfg.logging_dir)
    )
    if cfg.deterministic != "off":
        # cuBLAS needs this before its first handle is made, i.e. before anything touches CUDA.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=project,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[
            # Gradients as views into DDP's all-reduce buckets: one copy of them less per step.
            DistributedDataParallelKwargs(gradient_as_bucket_view=True),
            InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.ddp_timeout)),
            scaler_kwargs(cfg),
        ],
    )
    deterministic = cfg.deterministic != "off"
    set_torch_backends(cfg.allow_tf32, deterministic, cfg.cudnn_benchmark, warn_only=cfg.deterministic == "warn")
    return accelerator


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------


class Trainer:
    """The prepared models, optimizers and schedules; `train_step` is one step, `fit` the loop.

    Built without data, so tests and benchmarks call `train_step` on their own tensors.
    """

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.device = accelerator.device
        self.state = TrainerState()
        self.stream = self.dataloader = self.heldout_images = None
        self.sources, self.heldout_sources, self.heldout_disjoint = [], [], True
        self.repo_id: str | None = None  # the Hub repository, once checked writable (main process)
        self.pusher: hub.BackgroundPusher | None = None
        self.run_log = RunLog(cfg.output_dir)
        # Under SLURM or Kubernetes stderr is a file: no carriage-return bar then, a log line per logging step.
        self.plain_progress = not stderr_is_terminal()

        self.loss_fn = build_loss_on_every_node(cfg, accelerator).to(self.device)
        if cfg.init_discriminator:
            export.load_discriminator(cfg.init_discriminator, self.loss_fn.discriminator)
            logger.info(f"discriminator initialised from {cfg.init_discriminator}", main_process_only=True)
        with accelerator.main_process_first():  # a Hub start model (or --init_from) downloaded once, not by every rank
            self.vae = vae = build_autoencoder(cfg)
        # The start model (validation, main process only): how far the latents move from it.
        self.base_vae = build_base(cfg, vae) if accelerator.is_main_process else None
        if self.base_vae is not None:
            self.base_vae.to(self.device)
        self.loss_fn.watch(vae.decoder.conv_out, fast=cfg.adaptive_weight_mode == "fast")
        # VA-VAE's trainable 1×1 conv z -> z' (VF alignment); None when off.
        self.vf_projection = None
        if self.loss_fn.foundation is not None:
            self.vf_projection = build_vf_projection(vae.config.latent_channels, self.loss_fn.foundation.width)
        disc = self.loss_fn.discriminator
        opt_g, opt_d = build_optimizers(cfg, vae, disc, self.device, extra=self.vf_projection)
        sched_g, sched_d = build_schedules(cfg, opt_g, opt_d)
        (self.model, self.disc, self.opt_g, self.opt_d, self.sched_g, self.sched_d) = accelerator.prepare(
            VAEForTraining(vae, self.vf_projection, cfg.latent_noise_aug), disc, opt_g, opt_d, sched_g, sched_d
        )
        if cfg.torch_compile:
            # After prepare: compiling the DDP-wrapped module lets DDP overlap its gradient all-reduce with
            # the backward pass (compiled before, DDP would wrap one opaque graph).
            self.model = torch.compile(self.model)
        self.ema = build_ema(cfg, vae, self.device)
        # fp16: D's loss is a mean, G's a sum over C·H·W (docs/recipe.md, "Loss"): their gradients lie ~C·H·W
        # apart, so D gets a grad scaler of its own; G's is accelerate's (`scaler_kwargs`). D's starts at 2^10, not
        # torch's 2^16: on the tiny preset its gradients overflowed at 2^17 (tests/test_fp16.py).
        self.d_scaler = None
        if accelerator.scaler is not None:
            self.d_scaler = torch.amp.GradScaler(self.device.type, init_scale=TransfusionLoss.D_FP16_INIT_SCALE)
            accelerator.register_for_checkpointing(self.d_scaler)
        cluster.seed_ranks_apart(accelerator, cfg.seed)
        self.stop_vote = cluster.StopVote(accelerator.num_processes, self.device)
        self.signals: cluster.StopSignals | None = None  # set by fit: what the stop vote reports for this rank
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    def attach_data(self, plan: DataPlan) -> None:
        """The training stream of this rank, and the fixed held-out batch (a seeded sample spread over the data,
        drawn on rank 0). The export's latent statistics sample the resolved held-out sources again, unlisted."""
        cfg = self.cfg
        self.sources, self.heldout_sources = plan.sources, plan.heldout_resolved
        self.heldout_disjoint = plan.heldout_disjoint
        self.stream, self.dataloader = build_dataloader(cfg, self.accelerator, plan.resolved)
        self.heldout_images = draw_held_out(cfg, self.accelerator, plan.heldout_resolved)
        if not plan.heldout_disjoint:
            logger.warning(
                "no --validation_source: the held-out images are sampled from the training mixture, "
                "so held-out metrics are not on unseen images",
                main_process_only=True,
            )

    # -- checkpoint hooks: the VAE as a diffusers folder, D and EMA beside it ---------------
    def _save_hook(self, models, weights, output_dir):
        main = self.accelerator.is_main_process
        for model in models:
            if main:
                checkpointing.save_model(self._discriminator_or_none(model), output_dir, self.vae)
        if self.vf_projection is not None and main:
            checkpointing.save_vf_projection(self.vf_projection, output_dir)
        weights.clear()  # saved above; keep accelerate from writing model_N.safetensors too
        if self.ema is not None and main:
            checkpointing.save_ema(self.ema, output_dir)

    def _load_hook(self, models, input_dir):
        while models:
            checkpointing.load_model(self._discriminator_or_none(models.pop()), input_dir, self.vae)
        checkpointing.load_vf_projection(self.vf_projection, input_dir)
        if self.ema is not None:
            checkpointing.load_ema(self.ema, input_dir, self.device)

    def _discriminator_or_none(self, model: nn.Module) -> nn.Module | None:
        """The unwrapped discriminator, or None for the autoencoder (saved as the diffusers folder vae/)."""
        unwrapped = self.accelerator.unwrap_model(model)
        return None if isinstance(unwrapped, VAEForTraining) or hasattr(unwrapped, "_orig_mod") else unwrapped

    def save_checkpoint(self) -> str:
        modules = [self.vae, self.loss_fn.discriminator] + ([self.vf_projection] if self.vf_projection else [])
        checkpointing.check_replicas(self.accelerator, modules, self.state.global_step)
        start = time.perf_counter()
        path = checkpointing.save(
            self.accelerator,
            self.cfg.output_dir,
            self.state.global_step,
            self._checkpoint_state(),
            self.dataloader.state_dict(),
            self.cfg.checkpoints_total_limit,
            to_dict(self.cfg),
        )
        # What a cluster's shutdown window must cover (docs/cluster.md): one step plus this.
        logger.info(f"{os.path.basename(path)} written in {time.perf_counter() - start:.1f} s", main_process_only=True)
        return path

    def push_checkpoint(self) -> None:
        """--hub_strategy every_save: the exported model of this checkpoint (no optimizer states) goes up in the
        background; a failed upload is logged and the next save uploads everything again. Never after a
        preemption's save: the ranks' time is then the launcher's shutdown window."""
        if self.pusher is not None and self.accelerator.is_main_process:
            step = self.state.global_step
            folder = os.path.join(self.cfg.output_dir, "hub_staging", f"step-{step}")
            export_to(self, folder, repo_id=self.repo_id, quick=True)
            self.pusher.push(folder, f"Step {step}: exported model", cleanup=True)

    def _checkpoint_state(self) -> dict:
        state = self.state.__dict__.copy()
        state["lecam"] = {k: v.tolist() for k, v in self.loss_fn.lecam.state_dict().items()}
        return state

    def maybe_resume(self) -> None:
        path = resolve_resume(self.cfg, self.accelerator)
        if path is None:
            if self.cfg.resume_from_checkpoint:
                logger.info("no checkpoint to resume from: starting a new run", main_process_only=True)
            return
        extra, data_state = checkpointing.load(self.accelerator, path, to_dict(self.cfg), dict(self.vae.config))
        lecam = extra.pop("lecam", {})
        self.loss_fn.lecam.load_state_dict({k: torch.tensor(v) for k, v in lecam.items()})
        self.state = TrainerState(**extra)
        if "node_states" in data_state:
            self._hand_over(path, data_state)
        else:
            self.dataloader.load_state_dict(data_state)
        if self.accelerator.is_main_process:
            self.run_log.truncate_after(self.state.global_step)
        logger.info(f"resumed from {path} at step {self.state.global_step}", main_process_only=True)

    def _hand_over(self, path: str, data_state: dict) -> None:
        """A checkpoint of another number of processes (or of DataLoader workers per rank): the new ranks (workers)
        share out what the old ones had left of their epochs; with another number of processes each rank's RNG
        starts from (seed, step, rank), with the same number it is the one restored."""
        acc, step, old = self.accelerator, self.state.global_step, data_state["written_by"]
        self.stream.hand_over(data_state["node_states"])
        if old == acc.num_processes:
            logger.warning(
                f"{path} was written with {data_state['workers']} DataLoader workers per rank, resumed with "
                f"{self.cfg.dataloader_num_workers}: weights, EMA, D, optimizers, schedules and random numbers "
                "restore exactly and every image of the current epoch is still seen once (the rest of each old "
                "worker's epoch is shared out among the new ones), in another order: exact in data, not bit for bit "
                "the run the old workers would have made",
                main_process_only=True,
            )
            return
        checkpointing.reseed(self.cfg.seed, step, acc.process_index)
        logger.warning(
            f"{path} was written by {old} processes, resumed on {acc.num_processes}: weights, "
            "EMA, D, optimizers and schedules restore exactly and every image of the current epoch is still seen "
            "once (the rest of each old rank's epoch is shared out among the new ranks), but random numbers restart "
            f"from (seed, step, rank): exact in data, not bit for bit the run {old} processes would have made",
            main_process_only=True,
        )

    # -- one training step -------------------------------------------------------------------
    def train_step(self, batch: torch.Tensor | list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """One optimizer step: G on every micro-batch, then D on its detached reconstruction once the GAN is on.

        batch: (B, 3, R, R) in [-1, 1], or a list of `gradient_accumulation_steps` such micro-batches.
        An update (G's or D's) whose loss or gradient is non-finite changes nothing of its network: weights,
        optimizer states and schedules stay as they were (see `_update`), and when D's is skipped so do its
        BatchNorm buffers and LeCAM's EMAs (a skipped G update alone leaves D's finished update whole); it is
        counted in `state`. Returns the last micro-batch's logs as detached 0-d tensors.

        fp16: G and D each have a grad scaler; each scale changes once per step, after the updates (here, not in
        accelerate's optimizer step), so that every micro-batch is unscaled by the scale it was made with.
        """
        micro_batches = list(batch) if isinstance(batch, (list, tuple)) else [batch]
        if len(micro_batches) != self.cfg.gradient_accumulation_steps:
            raise ValueError(
                f"train_step got {len(micro_batches)} micro-batches for "
                f"gradient_accumulation_steps={self.cfg.gradient_accumulation_steps}"
            )
        gan_buffers = list(self.loss_fn.discriminator.buffers()) + list(self.loss_fn.lecam.buffers())
        before = [b.detach().clone() for b in gan_buffers]  # BatchNorm statistics and LeCAM EMAs: a few KiB
        g_ok = d_ok = True
        for micro, x in enumerate(micro_batches):
            x = x.to(self.device, non_blocking=True)
            if self.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.accelerator.accumulate(self.model, self.disc):
                (target, recon), logs, g_ok = self.generator_step(x, step, micro)
                if self.loss_fn.gan_active(step):
                    d_logs, d_ok = self.discriminator_step(target, recon, step)
                    logs.update(d_logs)
        # Each scale changes once per step, after its optimizer's update: every micro-batch is unscaled by the
        # scale it was made with (accelerate's optimizer step would update G's scale before D's last backward).
        if self.accelerator.scaler is not None:
            self.accelerator.scaler.update()
        if self.d_scaler is not None and self.loss_fn.gan_active(step):
            self.d_scaler.update()
        st = self.state
        st.skipped_g_steps += not g_ok
        st.skipped_d_steps += not d_ok
        st.nonfinite_streak = 0 if (g_ok and d_ok) else st.nonfinite_streak + 1
        if not d_ok:
            # The forward passes already moved D's BatchNorm statistics and LeCAM's EMAs, maybe to NaN: undo
            # them when D did not step, or a NaN would stay there for good (and go into every later checkpoint).
            # When D stepped, its loss was finite (so were x̂ and the statistics) and they belong to its new weights.
            for buffer, saved in zip(gan_buffers, before, strict=False):
                buffer.copy_(saved)
        if self.ema is not None and g_ok:
            self.ema.step(self.vae.parameters())
        return logs

    def generator_step(self, x: torch.Tensor, step: int, micro_batch: int = 0):
        """One generator update; returns ((target, reconstruction), logs, applied), the pair the D step trains on:
        (x, decode(z)), or under EQ-VAE's scheme (T(x), decode(T(z))) or the downscaled x and its decode."""
        requires_grad(self.loss_fn.discriminator, False)  # D is a constant in the G step
        transform = equivariance_transform(self.cfg, step, micro_batch)
        draw = eqvae_draw(self.cfg, step, micro_batch)
        eq_logs = {}
        if draw is not None:
            factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            x, transform = draw.input(x, factor), draw.transform
            scale = draw.transform.scale if draw.transform is not None else draw.input_scale
            eq_logs = {"eqvae/transformed": float(draw.transform is not None), "eqvae/scale": scale}
        with self.accelerator.autocast():
            if draw is not None and transform is not None:
                recon, mean, logvar, extras = self.model(x, transform, replace=True)
                x, regularisers = extras["target"], {}
            elif transform is None and self.vf_projection is None:
                recon, mean, logvar = self.model(x)
                regularisers = {}
            else:
                recon, mean, logvar, regularisers = self.model(x, transform)
                if self.vf_projection is not None:
                    regularisers["encoder_last_layer"] = self.vae.encoder.conv_out
            # The unwrapped D: the G step needs only ∂D(x̂)/∂x̂, never D's parameter gradients, so DDP
            # must not expect (and wait for) a gradient all-reduce of D here. The D step uses self.disc.
            loss, logs = self.loss_fn.generator_loss(
                x,
                recon,
                mean,
                logvar,
                step,
                discriminator=self.loss_fn.discriminator,
                **regularisers,
            )
        logs = {f"loss/{k}": v for k, v in logs.items()}
        logs.update({k: torch.tensor(v) for k, v in eq_logs.items()})
        self.accelerator.backward(loss)  # fp16: scaled by accelerate's scaler, G's
        applied = self._update(
            self.model, self.opt_g, self.sched_g, logs, "grad_norm/generator", self.accelerator.scaler, vote=True
        )
        return (x, recon.detach()), logs, applied

    def discriminator_step(self, x: torch.Tensor, recon: torch.Tensor, step: int):
        requires_grad(self.loss_fn.discriminator, True)
        with self.accelerator.autocast():
            loss, logs = self.loss_fn.discriminator_loss(x, recon, step, discriminator=self.disc)
        logs = {f"disc/{k}": v for k, v in logs.items()}
        if self.d_scaler is None:
            self.accelerator.backward(loss)
        else:  # accelerator.backward, with D's own scaler
            self.d_scaler.scale(loss / self.accelerator.gradient_accumulation_steps).backward()
        applied = self._update(self.disc, self.opt_d, self.sched_d, logs, "grad_norm/discriminator", self.d_scaler)
        return logs, applied

    def _update(
        self, model: nn.Module, optimizer, scheduler, logs: dict, norm_key: str, scaler=None, vote: bool = False
    ) -> bool:
        """Clip, then step unless the gradient is non-finite (the weights then stay untouched).

        Only at the last micro-batch of an accumulation; returns whether the step was applied.
        scaler: fp16's grad scaler that scaled this model's gradients (None without one). `vote`: the ranks'
        stop vote (`stop_vote.agreed`) is read in the same host sync as the gradient's finiteness.
        """
        if not self.accelerator.sync_gradients:
            return True
        # clip_grad_norm_ with an infinite bound only measures: the norm is logged and checked.
        limit = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        if scaler is None:
            grad_norm = self.accelerator.clip_grad_norm_(model.parameters(), limit)
        else:
            # fp16: unscale this optimizer's gradients only. accelerator.clip_grad_norm_ unscales every
            # prepared optimizer, which would unscale D's gradients (still accumulating) before D's own update.
            scaler.unscale_(optimizer.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
        logs[norm_key] = grad_norm.detach()
        # Decided from the (unscaled, all-reduced) gradient itself: with a fused Adam the grad scaler always
        # calls step() and lets the kernel skip an overflow, so accelerate's step_was_skipped reads False.
        if vote:
            local = self.signals.poll() if self.signals is not None else 0
            applied = self.stop_vote.finite_and_vote(grad_norm, local)  # the host sync of this update
        else:
            applied = bool(torch.isfinite(grad_norm))  # the host sync of this update
        if scaler is not None:
            # Not optimizer.step(): accelerate's would also update() the scale, between G's update and D's last
            # backward. The scaler skips a non-finite step itself; train_step updates the scale.
            scaler.step(optimizer.optimizer)
        elif applied:
            optimizer.step()
        if applied:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return applied

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, signals: cluster.StopSignals | None = None) -> None:
        """Train to max_train_steps. Raises Preempted (after a checkpoint) when a stop signal arrives.

        signals: installed by the caller (main installs them before the models are built); by default for
        the loop only."""
        cfg, acc, st = self.cfg, self.accelerator, self.state
        if acc.is_main_process and not st.initial_metrics:
            st.initial_metrics = evaluate_held_out(self, st.global_step)
        progress = tqdm(
            total=cfg.max_train_steps,
            initial=st.global_step,
            disable=not acc.is_main_process or self.plain_progress,
            desc="steps",
        )
        self.model.train()
        self.loss_fn.train()
        try:
            # Log lines go through tqdm.write: each on a line of its own, not glued to the progress bar.
            own = cluster.StopSignals() if signals is None else contextlib.nullcontext(signals)
            with own as self.signals, logging_redirect_tqdm():
                self._loop(iter(self.dataloader), progress)
        finally:
            progress.close()  # so that an error message starts on a line of its own
            shut_down_workers(self.dataloader)
            self.signals = None

    def _loop(self, data_iter, progress) -> None:
        cfg, acc, st = self.cfg, self.accelerator, self.state
        per_step = cfg.train_batch_size * acc.num_processes * cfg.gradient_accumulation_steps
        skipped_images = torch.zeros(len(self.stream.source_names), dtype=torch.long)
        window = LogWindow()
        while st.global_step < cfg.max_train_steps:
            micro_batches = []
            for _ in range(cfg.gradient_accumulation_steps):
                batch = next(data_iter)
                skipped_images += batch["skipped"].sum(0)
                micro_batches.append(batch["pixel_values"])
            logs = self.train_step(micro_batches, st.global_step)
            st.global_step += 1
            st.images_seen += per_step
            window.add(logs, per_step)
            progress.update(1)
            if st.nonfinite_streak >= cfg.max_nonfinite_steps:
                raise TrainingDivergedError(
                    f"{st.nonfinite_streak} consecutive steps had a non-finite loss or gradient (step {st.global_step}); "
                    "stopping. The last checkpoint is intact: lower the learning rate or use bf16, then resume."
                )
            done = st.global_step == cfg.max_train_steps
            stop = self.stop_vote.agreed  # voted in this step's update of the autoencoder
            if st.global_step % cfg.logging_steps == 0 or done or stop:
                self._update_skip_counts(skipped_images)
                skipped_images.zero_()
                self.log_scalars(window, progress)
                window = LogWindow()
            if (st.global_step % cfg.validation_steps == 0 or done) and not stop:
                if acc.is_main_process:
                    st.last_metrics = evaluate_held_out(self, st.global_step)
                acc.wait_for_everyone()
            if st.global_step % cfg.checkpointing_steps == 0 or done or stop:
                self._update_skip_counts(skipped_images)  # the checkpoint holds every skip so far
                skipped_images.zero_()
                path = self.save_checkpoint()
                # A stop signalled during a periodic save takes that checkpoint: no second save.
                stop = stop or self.stop_vote.now(self.signals.poll())
                if stop and acc.is_main_process:
                    cluster.write_preempted_marker(cfg.output_dir, stop, path)  # now names the new checkpoint
                elif not stop:
                    self.push_checkpoint()
            if stop:
                raise Preempted(st.global_step, stop, path)

    def _update_skip_counts(self, skipped_images: torch.Tensor) -> None:
        totals = self.accelerator.reduce(skipped_images.to(self.device), reduction="sum").cpu()
        for name, n in zip(self.stream.source_names, totals.tolist(), strict=False):
            self.state.skipped_images[name] = self.state.skipped_images.get(name, 0) + int(n)

    def log_scalars(self, window: LogWindow, progress) -> None:
        scalars = window.means(self.accelerator)
        st = self.state
        scalars.update(
            {
                "perf/images_per_s": window.images_per_s() * self.accelerator.num_processes,
                "lr/generator": self.sched_g.get_last_lr()[0],
                "lr/discriminator": self.sched_d.get_last_lr()[0],
                "skipped/g_steps": st.skipped_g_steps,
                "skipped/d_steps": st.skipped_d_steps,
                **{f"skipped/images/{k}": v for k, v in st.skipped_images.items()},
            }
        )
        self.accelerator.log(scalars, step=st.global_step)
        if self.accelerator.is_main_process:
            self.run_log.append(st.global_step, scalars)
            if self.plain_progress:
                logger.info(
                    f"step {st.global_step}/{self.cfg.max_train_steps}: loss {scalars.get('loss/total', float('nan')):.4g}, "
                    f"{scalars['perf/images_per_s']:.1f} img/s"
                )
            progress.set_postfix(
                loss=f"{scalars.get('loss/total', float('nan')):.4g}", img_s=f"{scalars['perf/images_per_s']:.1f}"
            )

    def gan_start(self) -> int | None:
        """The step the curves mark as the GAN's start (None: the GAN term never switches on in this run)."""
        cfg = self.cfg
        return cfg.disc_start if cfg.gan_weight > 0 and cfg.disc_start < cfg.max_train_steps else None

    def averaged_model(self, copy_live: bool = False) -> AutoencoderKL:
        """The weights to evaluate and export: an EMA copy when on, else the live model (or a copy of it)."""
        if self.ema is not None:
            return export.averaged_copy(self.vae, self.ema)
        return copy.deepcopy(self.vae) if copy_live else self.vae


class LogWindow:
    """Sums of the logged terms since the last log line; each key averaged over the steps that logged it."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.images = 0
        self.start = time.perf_counter()

    def add(self, logs: dict[str, torch.Tensor], images: int) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()
            self.counts[k] = self.counts.get(k, 0) + 1
        self.images += images

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        names = sorted(self.sums)
        if not names:
            return {}
        # One collective for all terms: average over steps here, then over ranks.
        local = torch.stack([self.sums[k] / self.counts[k] for k in names])
        return dict(zip(names, accelerator.reduce(local, reduction="mean").tolist(), strict=False))

    def images_per_s(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)


def evaluate_held_out(trainer: Trainer, step: int) -> dict[str, float]:
    """Held-out PSNR/SSIM/LPIPS and latent diagnostics (EMA weights when on), the grid, the curves; main process only."""
    images = trainer.heldout_images.to(trainer.device)
    vae = trainer.averaged_model()
    metrics, recon = held_out_metrics(
        vae,
        images,
        trainer.loss_fn.perceptual,
        trainer.cfg.train_batch_size,
        autocast=trainer.accelerator.autocast,
    )
    # Latent diagnostics on the posterior mean: no RNG draw, so validating never changes the run.
    diag, means = latent_diagnostics(vae, images, trainer.cfg.train_batch_size, autocast=trainer.accelerator.autocast)
    pca = latent_pca_rgb(means, images.shape[-2:])
    grid = save_grid(images, [recon, pca], trainer.run_log.grid_path(step), labels=["input", "recon", "latent PCA"])
    scalars = {f"validation/{k}": v for k, v in metrics.items()} | latents.scalars(diag)
    moved = ""
    if trainer.base_vae is not None:
        per_image = drift.encoder_drift(
            vae, trainer.base_vae, images, trainer.cfg.train_batch_size, autocast=trainer.accelerator.autocast
        )
        means = {k: v.mean().item() for k, v in per_image.items()}
        scalars |= {f"drift/{k}": v for k, v in means.items()}
        moved = "; " + drift.describe(means)
    trainer.accelerator.log(scalars, step=step)
    log_images(trainer.accelerator, grid, step)
    trainer.run_log.append(step, scalars)
    trainer.run_log.plot_curves(trainer.gan_start())
    logger.info(
        f"step {step}: held-out "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        + "; "
        + latents.describe(diag)
        + moved,
        main_process_only=True,
    )
    return metrics


def export_to(trainer: Trainer, folder: str, repo_id: str | None, quick: bool = False) -> dict:
    """The trainer's exported model folder (EMA weights when on), as publishing.export.export_run writes it.

    quick: the latent statistics from the held-out batch already in memory, not a fresh sample of
    --latent_stats_samples images: a checkpoint's export for the Hub then costs seconds of rank 0's
    time while the other ranks wait, not minutes.
    """
    # Its own copy in eval mode: the EMA's is one already, the live model must not be switched to eval.
    vae = trainer.averaged_model(copy_live=True).eval()
    return export.export_run(
        folder, vae, trainer.loss_fn.discriminator, run_record(trainer), repo_id=repo_id, full_sample=not quick
    )


def run_record(trainer: Trainer) -> export.TrainingRun:
    """What the export, the card and the summary need to know of the trainer's run so far."""
    st = trainer.state
    return export.TrainingRun(
        config=trainer.cfg,
        sources=trainer.sources,
        heldout_sources=trainer.heldout_sources,
        heldout_disjoint=trainer.heldout_disjoint,
        heldout_images=trainer.heldout_images,
        steps=st.global_step,
        images_seen=st.images_seen,
        num_processes=trainer.accelerator.num_processes,
        perception_weights=trainer.loss_fn.perception_weights,
        metrics_initial=st.initial_metrics,
        metrics_final=st.last_metrics,
    )


def publish(trainer: Trainer) -> None:
    """The final model folder in --output_dir; then, with --push_to_hub, the upload (one line if it fails);
    then the run's summary line. Main process only."""
    if not trainer.accelerator.is_main_process:
        return
    trainer.run_log.plot_curves(trainer.gan_start())
    export_to(trainer, trainer.cfg.output_dir, repo_id=trainer.repo_id)
    if trainer.pusher is not None:
        trainer.pusher.finish(timeout=3600)  # the final upload below sends everything anyway
    if trainer.repo_id:
        hub.push_folder(
            trainer.repo_id, trainer.cfg.output_dir, commit_message=f"Step {trainer.state.global_step}: exported model"
        )
    logger.info(export.run_summary(run_record(trainer)), main_process_only=True)
    logger.info(colour_summary(trainer), main_process_only=True)


def colour_summary(trainer: Trainer) -> str:
    """How much of the held-out colour crops' chroma the exported weights keep (metrics.chroma_ratio), and how far
    their colours are from the input's (metrics.chroma_error), in one line."""
    images = trainer.heldout_images.to(trainer.device)
    recon = reconstruct(
        trainer.averaged_model(),
        images,
        batch_size=trainer.cfg.train_batch_size,
        autocast=trainer.accelerator.autocast,
    )
    ratio, kept = chroma_ratio(to_unit(images), to_unit(recon))
    error, _ = chroma_error(to_unit(images), to_unit(recon))
    if not kept:
        return f"held-out colour: none of the {len(images)} held-out images has colour (mean |Cb, Cr| >= {MIN_CHROMA})"
    return (
        f"held-out colour: the model keeps {ratio:.2f} of the input's chroma (mean |Cb, Cr| of reconstruction / "
        f"input over the {kept} held-out images with mean |Cb, Cr| >= {MIN_CHROMA}); colour error {error:.2f} "
        "(mean |Cb, Cr| of the difference / input's: 0 = the input's colours, 1 = grey)"
    )


def resolve_resume(cfg: TrainConfig, accelerator: Accelerator) -> str | None:
    """The checkpoint to resume from, as rank 0 sees it, on every rank: ranks that resolved `latest` each on
    their own could pick different steps (a folder listed mid-prune, a node that does not see it) and then
    wait in mismatched collectives."""
    found = [checkpointing.resolve(cfg.output_dir, cfg.resume_from_checkpoint) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(found)
    return found[0]


def claim_output_dir(cfg: TrainConfig, accelerator: Accelerator) -> None:
    """A run that does not resume must not mix with another run's checkpoints and metrics log in
    --output_dir: `--resume_from_checkpoint latest` would later pick the other run's newest checkpoint,
    and the curves would draw both runs as one. Refused in one line, or removed with --overwrite_output_dir
    (or when --resume_from_checkpoint finds no checkpoint: what is there cannot be continued)."""
    if resolve_resume(cfg, accelerator) is not None:
        return
    leftovers = checkpointing.previous_run(cfg.output_dir, (METRICS_LOG, SAMPLES_DIR))
    if not leftovers:
        return
    if not (cfg.overwrite_output_dir or cfg.resume_from_checkpoint):
        raise UserError(
            f"{cfg.output_dir} holds another run ({', '.join(leftovers)}): continue it with "
            "--resume_from_checkpoint latest, start over with --overwrite_output_dir (removes those), "
            "or choose another --output_dir"
        )
    if accelerator.is_main_process:
        logger.info(f"starting over in {cfg.output_dir}: removing {', '.join(leftovers)}", main_process_only=True)
        checkpointing.start_over(cfg.output_dir, leftovers)
    accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> None:
    cfg, explicit = parse_config(TrainConfig, argv, PROG, description=__doc__.split("\n\n")[0])
    cfg = apply_demo_defaults(cfg, explicit)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    signals = None
    try:
        if cfg.is_demo:
            cfg.check()  # again, with the demo's defaults (64² crops, ...) that parsing did not see
        checkpointing.check_writable(cfg.output_dir)
        accelerator = build_accelerator(cfg)
        cluster.check_shared_output_dir(accelerator, cfg.output_dir)
        claim_output_dir(cfg, accelerator)
        if accelerator.is_main_process:
            cluster.clear_markers(cfg.output_dir)
        accelerator.wait_for_everyone()  # no rank marks a stop before the last run's markers are gone
        # From here on a stop signal is remembered (and marked), not fatal: start-up goes on, then one step, a checkpoint.
        signals = cluster.StopSignals(cfg.output_dir).__enter__()
        # A missing token or an unwritable repository ends the run now, not after days of training.
        repo_id = (
            hub.prepare_repo(cfg.hub_model_id, cfg.hub_private)
            if cfg.push_to_hub and accelerator.is_main_process
            else None
        )
        plan = list_data(cfg, accelerator)
        # After the listing, which rank 0 alone did: every rank builds its networks from the same random state.
        set_seed(cfg.seed)
        trainer = Trainer(cfg, accelerator)
        trainer.attach_data(plan)
        trainer.repo_id = repo_id
        if repo_id and cfg.hub_strategy == "every_save":
            trainer.pusher = hub.BackgroundPusher(repo_id)
        if accelerator.is_main_process:
            checkpointing.clean_partial(cfg.output_dir)
            with open(os.path.join(cfg.output_dir, "train_config.json"), "w") as f:
                json.dump(to_dict(cfg), f, indent=2)
            tracker_config = {k: str(v) if isinstance(v, list) else v for k, v in to_dict(cfg).items()}
            accelerator.init_trackers(cfg.tracker_project_name, config=tracker_config)
        accelerator.wait_for_everyone()
        trainer.maybe_resume()
        trainer.fit(signals)
        accelerator.wait_for_everyone()
        publish(trainer)
        if accelerator.is_main_process:
            cluster.write_done_marker(cfg.output_dir, trainer.state.global_step)
        accelerator.end_training()
    except UserError as e:
        fail(PROG, str(e))
    except Preempted as e:
        logger.warning(str(e))  # PREEMPTED names e.checkpoint: written by rank 0 right after the save
        accelerator.end_training()
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    finally:
        if signals is not None:
            signals.__exit__(None, None, None)


if __name__ == "__main__":
    main(sys.argv[1:])
