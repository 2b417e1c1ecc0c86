"""Train the Transfusion VAE (diffusers AutoencoderKL) with Accelerate.

    accelerate launch train_vae.py --mixture transfusion --data_root /data --output_dir vae-out
    python train_vae.py                 # no data flags: the offline demo on bundled photographs

Reads top to bottom: parse -> build -> prepare -> loop -> export. One optimizer step per
batch for the autoencoder (G) and, from `--disc_start`, one for the discriminator (D) on
the detached reconstruction of the same batch.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import data
from losses import TransfusionLoss
from losses.perceptual import PerceptionWeightsError
from vae import checkpointing, export
from vae.config import fail, parse_config, to_dict
from vae.models import ModelError, build_vae, init_from_pretrained, load_vae
from vae.train_config import TrainConfig, apply_demo_defaults
from vae.validation import held_out_metrics, load_images, log_images, save_grid

PROG = "train_vae.py"
logger = get_logger(__name__)


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


class VAEForTraining(nn.Module):
    """encode -> sample z -> decode in one forward, so DDP sees (and syncs) a single call."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor):
        posterior = self.vae.encode(x).latent_dist  # mean/logvar: (B, C_lat, H/8, W/8), logvar clamped [-30, 20]
        recon = self.vae.decode(posterior.sample()).sample  # (B, 3, H, W); training decodes a *sampled* z
        return recon, posterior.mean, posterior.logvar


class InputCapture:
    """Forward hook keeping the input of a layer (decoder.conv_out) for the fast adaptive weight."""

    def __init__(self, module: nn.Module):
        self.value: torch.Tensor | None = None
        module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.value = inputs[0]


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


def requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def build_data(cfg: TrainConfig):
    """(training sources, held-out source); one clear DataError for anything unusable.

    Without --validation_source the held-out batch comes from the first training source
    (centre crops of its first images), i.e. not truly held out: pass one for honest metrics.
    """
    if cfg.is_demo:
        train, heldout = data.demo_sources(os.path.join(cfg.output_dir, "demo_data"))
        sources = [train]
    elif cfg.mixture:
        sources = data.load_mixture(cfg.mixture, data_root=cfg.data_root)
    else:
        sources = [data.parse_source(s) for s in cfg.source]
    if not cfg.is_demo:
        heldout = data.parse_source(cfg.validation_source) if cfg.validation_source else sources[0]
    data.validate_sources(sources + ([heldout] if heldout not in sources else []))
    return sources, heldout


def build_autoencoder(cfg: TrainConfig) -> AutoencoderKL:
    vae = build_vae(cfg.model_config, latent_channels=cfg.latent_channels)
    if cfg.init_from:
        report = init_from_pretrained(vae, load_vae(cfg.init_from))
        logger.info(report.summary(), main_process_only=True)
    frozen = list(cfg.freeze) + (["encoder.", "quant_conv."] if cfg.train_decoder_only else [])
    for name, p in vae.named_parameters():
        if any(name.startswith(prefix) for prefix in frozen):
            p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    return vae


def build_loss(cfg: TrainConfig) -> TransfusionLoss:
    """The loss module (LPIPS, MoCo and the discriminator inside); 'auto' perception weights fall
    back to random ones, loudly, when the pretrained files are not available."""
    kw = dict(
        l1_weight=cfg.l1_weight, lpips_weight=cfg.lpips_weight, gan_weight=cfg.gan_weight,
        id_weight=cfg.id_weight, kl_weight=cfg.kl_weight, disc_start=cfg.disc_start,
        adaptive_weight_max=cfg.adaptive_weight_max, gan_ramp_steps=cfg.gan_ramp_steps,
        lecam_weight=cfg.lecam_weight, lecam_decay=cfg.lecam_decay,
        moco_weights=cfg.id_checkpoint, id_feature=cfg.id_feature,
    )
    if cfg.perception_weights != "auto":
        return TransfusionLoss(perception_weights=cfg.perception_weights, **kw)
    try:
        return TransfusionLoss(perception_weights="pretrained", **kw)
    except PerceptionWeightsError as e:
        bar = "!" * 88
        logging.getLogger(__name__).warning(
            f"\n{bar}\n!! pretrained perception weights unavailable: {e}\n"
            f"!! -> LPIPS-VGG and MoCo use RANDOM weights: fine for the demo, meaningless for a real run.\n{bar}")
        return TransfusionLoss(perception_weights="random", **kw)


def build_optimizer(cfg: TrainConfig, params, lr: float, device: torch.device) -> torch.optim.Optimizer:
    # Fused Adam: one kernel per step on CUDA, and on CPU 3.3× faster than the default for-loop
    # for 83.7 M parameters (benchmarks/README.md).
    kw = dict(lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
              fused=device.type in ("cuda", "cpu") or None)
    if cfg.adam_weight_decay > 0:
        return torch.optim.AdamW(params, weight_decay=cfg.adam_weight_decay, **kw)
    return torch.optim.Adam(params, **kw)


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------


class Trainer:
    """Holds the prepared objects; `run()` is the loop, the rest are its named steps."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.device = accelerator.device
        self.state = TrainerState()

        sources, heldout = build_data(cfg)
        self.sources = sources
        self.loss_fn = build_loss(cfg).to(self.device)
        vae = build_autoencoder(cfg)
        if cfg.channels_last:
            vae.to(memory_format=torch.channels_last)
        self.vae = vae
        self.last_layer_input = InputCapture(vae.decoder.conv_out)
        self.heldout_images = load_images(heldout, cfg.resolution, cfg.num_validation_images, cfg.interpolation)
        self.heldout_source = heldout

        self.stream = data.build_train_stream(
            sources, cfg.resolution, seed=cfg.seed, rank=accelerator.process_index,
            world_size=accelerator.num_processes, shuffle_block=cfg.shuffle_block, random_flip=cfg.random_flip,
            interpolation=cfg.interpolation, crop_mode=cfg.crop_mode)
        # Its own generator: creating the iterator must not draw from the global RNG, or a resumed
        # run's posterior samples would differ from an uninterrupted run's.
        self.dataloader = data.make_dataloader(
            self.stream, cfg.train_batch_size, num_workers=cfg.dataloader_num_workers,
            generator=torch.Generator().manual_seed(cfg.seed), pin_memory=self.device.type == "cuda",
            persistent_workers=cfg.dataloader_num_workers > 0)

        g_params = [p for p in vae.parameters() if p.requires_grad]
        if not g_params:
            raise ModelError("every autoencoder parameter is frozen: nothing to train")
        disc = self.loss_fn.discriminator
        self.opt_g = build_optimizer(cfg, g_params, cfg.learning_rate, self.device)
        self.opt_d = build_optimizer(cfg, disc.parameters(), cfg.disc_learning_rate or cfg.learning_rate, self.device)
        sched = dict(num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_train_steps)
        sched_g = get_scheduler(cfg.lr_scheduler, self.opt_g, **sched)
        sched_d = get_scheduler(cfg.lr_scheduler, self.opt_d, **sched)

        model = VAEForTraining(vae)
        if cfg.torch_compile:
            model = torch.compile(model)
        (self.model, self.disc, self.opt_g, self.opt_d, self.sched_g, self.sched_d) = accelerator.prepare(
            model, disc, self.opt_g, self.opt_d, sched_g, sched_d)

        self.ema = None
        if cfg.use_ema:
            self.ema = EMAModel(vae.parameters(), decay=cfg.ema_decay, model_cls=AutoencoderKL, model_config=vae.config)
            self.ema.to(self.device)
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    # -- checkpoint hooks: the VAE as a diffusers folder, D and EMA beside it ---------------
    def _save_hook(self, models, weights, output_dir):
        for model in models:
            unwrapped = self.accelerator.unwrap_model(model)
            if self.accelerator.is_main_process:
                if isinstance(unwrapped, VAEForTraining) or hasattr(unwrapped, "_orig_mod"):
                    self.vae.save_pretrained(os.path.join(output_dir, "vae"))
                else:
                    save_file(unwrapped.state_dict(), os.path.join(output_dir, "discriminator.safetensors"))
        weights.clear()  # saved above; keep accelerate from writing model_N.safetensors too
        if self.ema is not None and self.accelerator.is_main_process:
            self.ema.save_pretrained(os.path.join(output_dir, "vae_ema"))

    def _load_hook(self, models, input_dir):
        while models:
            model = models.pop()
            unwrapped = self.accelerator.unwrap_model(model)
            if isinstance(unwrapped, VAEForTraining) or hasattr(unwrapped, "_orig_mod"):
                loaded = AutoencoderKL.from_pretrained(input_dir, subfolder="vae")
                self.vae.load_state_dict(loaded.state_dict())
            else:
                unwrapped.load_state_dict(load_file(os.path.join(input_dir, "discriminator.safetensors")))
        if self.ema is not None:
            loaded = EMAModel.from_pretrained(os.path.join(input_dir, "vae_ema"), model_cls=AutoencoderKL)
            self.ema.load_state_dict(loaded.state_dict())
            self.ema.to(self.device)

    def check_replicas(self) -> None:
        """DDP keeps every rank's weights identical; verify it (one gather per checkpoint) rather than trust it."""
        if self.accelerator.num_processes == 1:
            return
        params = list(self.vae.parameters()) + list(self.loss_fn.discriminator.parameters())
        checksum = torch.stack([p.detach().double().sum() for p in params]).to(self.device)  # (n_tensors,)
        gathered = self.accelerator.gather(checksum[None])  # (world, n_tensors)
        if not bool((gathered == gathered[0]).all()):
            raise RuntimeError(f"ranks hold different weights at step {self.state.global_step}: DDP is out of sync")
        logger.info(f"weights identical across {self.accelerator.num_processes} ranks at step {self.state.global_step}",
                    main_process_only=True)

    def save_checkpoint(self) -> None:
        self.check_replicas()
        checkpointing.save(self.accelerator, self.cfg.output_dir, self.state.global_step, self._extra_state(),
                           self.dataloader.state_dict(), self.cfg.checkpoints_total_limit)

    def _extra_state(self) -> dict:
        state = self.state.__dict__.copy()
        state["lecam"] = {k: v.tolist() for k, v in self.loss_fn.lecam.state_dict().items()}
        return state

    def maybe_resume(self) -> None:
        path = checkpointing.resolve(self.cfg.output_dir, self.cfg.resume_from_checkpoint)
        if path is None:
            if self.cfg.resume_from_checkpoint:
                logger.info("no checkpoint to resume from: starting a new run", main_process_only=True)
            return
        try:
            self.accelerator.load_state(path)
        except pickle.UnpicklingError as e:  # accelerate loads with weights_only: a pickle that would run code
            fail(PROG, f"refused to resume from {path}: {checkpointing.load_error(e)}")
        extra, data_state = checkpointing.load_extra(path, self.accelerator.process_index, self.accelerator.num_processes)
        lecam = extra.pop("lecam", {})
        self.loss_fn.lecam.load_state_dict({k: torch.tensor(v) for k, v in lecam.items()})
        self.state = TrainerState(**extra)
        self.dataloader.load_state_dict(data_state)
        logger.info(f"resumed from {path} at step {self.state.global_step}", main_process_only=True)

    # -- one optimizer step ------------------------------------------------------------------
    def generator_step(self, x: torch.Tensor, step: int):
        requires_grad(self.loss_fn.discriminator, False)  # D is a constant in the G step
        with self.accelerator.autocast():
            recon, mean, logvar = self.model(x)
            fast = self.cfg.adaptive_weight_mode == "fast"
            loss, logs = self.loss_fn.generator_loss(
                x, recon, mean, logvar, step,
                last_layer_weight=self.vae.decoder.conv_out,
                last_layer_input=self.last_layer_input.value if fast else None,
                discriminator=self.loss_fn.discriminator)
        logs = {f"loss/{k}": v for k, v in logs.items()}
        self.accelerator.backward(loss)
        self.last_layer_input.value = None
        applied = self._update(self.model, self.opt_g, self.sched_g, logs, "grad_norm/generator")
        return recon.detach(), logs, applied

    def discriminator_step(self, x: torch.Tensor, recon: torch.Tensor, step: int):
        requires_grad(self.loss_fn.discriminator, True)
        with self.accelerator.autocast():
            loss, logs = self.loss_fn.discriminator_loss(x, recon, step, discriminator=self.disc)
        logs = {f"disc/{k}": v for k, v in logs.items()}
        self.accelerator.backward(loss)
        applied = self._update(self.disc, self.opt_d, self.sched_d, logs, "grad_norm/discriminator")
        return logs, applied

    def _update(self, model: nn.Module, optimizer, scheduler, logs: dict, norm_key: str) -> bool:
        """Clip, then step unless the gradient is non-finite (the weights then stay untouched).

        Only at the last micro-batch of an accumulation; returns whether the step was applied.
        """
        if not self.accelerator.sync_gradients:
            return True
        # clip_grad_norm_ with an infinite bound only measures: the norm is logged and checked.
        limit = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        grad_norm = self.accelerator.clip_grad_norm_(model.parameters(), limit)
        logs[norm_key] = grad_norm.detach()
        if self.accelerator.scaler is not None:  # fp16: the grad scaler skips inf steps itself
            optimizer.step()
            applied = not optimizer.step_was_skipped
        else:
            applied = bool(torch.isfinite(grad_norm))  # the one host sync per step; norms are all-reduced
            if applied:
                optimizer.step()
        if applied:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return applied

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        cfg, acc, st = self.cfg, self.accelerator, self.state
        if acc.is_main_process and not st.initial_metrics:
            st.initial_metrics = self.validate(st.global_step)
        per_step = cfg.train_batch_size * acc.num_processes * cfg.gradient_accumulation_steps
        progress = tqdm(total=cfg.max_train_steps, initial=st.global_step, disable=not acc.is_main_process, desc="steps")
        data_iter = iter(self.dataloader)
        self.model.train()
        self.loss_fn.train()
        try:
            self._loop(data_iter, per_step, progress)
        finally:
            progress.close()  # so that an error message starts on a line of its own

    def _loop(self, data_iter, per_step: int, progress) -> None:
        cfg, acc, st = self.cfg, self.accelerator, self.state
        skipped_images = torch.zeros(len(self.stream.source_names), dtype=torch.long)
        log_sums: dict[str, torch.Tensor] = {}
        log_count, tic, images_since = 0, time.perf_counter(), 0
        while st.global_step < cfg.max_train_steps:
            step = st.global_step
            for _ in range(cfg.gradient_accumulation_steps):
                batch = next(data_iter)
                skipped_images += batch["skipped"].sum(0)
                x = batch["pixel_values"].to(self.device, non_blocking=True)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with acc.accumulate(self.model, self.disc):
                    recon, logs, g_ok = self.generator_step(x, step)
                    d_ok = True
                    if self.loss_fn.gan_active(step):
                        d_logs, d_ok = self.discriminator_step(x, recon, step)
                        logs.update(d_logs)
            st.global_step += 1
            st.images_seen += per_step
            images_since += per_step
            st.skipped_g_steps += not g_ok
            st.skipped_d_steps += not d_ok
            st.nonfinite_streak = 0 if (g_ok and d_ok) else st.nonfinite_streak + 1
            if self.ema is not None and g_ok:
                self.ema.step(self.vae.parameters())
            for k, v in logs.items():
                log_sums[k] = log_sums.get(k, 0) + v.detach().float()
            log_count += 1
            progress.update(1)
            if st.nonfinite_streak >= cfg.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{st.nonfinite_streak} consecutive steps had a non-finite loss or gradient (step {st.global_step}); "
                    "stopping. The last checkpoint is intact: lower the learning rate or use bf16, then resume.")
            done = st.global_step == cfg.max_train_steps
            if st.global_step % cfg.logging_steps == 0 or done:
                self._update_skip_counts(skipped_images)
                skipped_images.zero_()
                elapsed = time.perf_counter() - tic
                self.log_scalars(log_sums, log_count, images_since / max(elapsed, 1e-9), progress)
                log_sums, log_count, tic, images_since = {}, 0, time.perf_counter(), 0
            if st.global_step % cfg.validation_steps == 0 or done:
                if acc.is_main_process:
                    st.last_metrics = self.validate(st.global_step)
                acc.wait_for_everyone()
            if st.global_step % cfg.checkpointing_steps == 0 or done:
                self._update_skip_counts(skipped_images)  # the checkpoint holds every skip so far
                skipped_images.zero_()
                self.save_checkpoint()

    def _update_skip_counts(self, skipped_images: torch.Tensor) -> None:
        totals = self.accelerator.reduce(skipped_images.to(self.device), reduction="sum").cpu()
        for name, n in zip(self.stream.source_names, totals.tolist()):
            self.state.skipped_images[name] = self.state.skipped_images.get(name, 0) + int(n)

    def log_scalars(self, sums: dict, count: int, img_per_s: float, progress) -> None:
        names = sorted(sums)
        # One collective for all terms: average over steps here, then over ranks.
        values = self.accelerator.reduce(torch.stack([sums[k] / count for k in names]), reduction="mean").tolist() if names else []
        scalars = dict(zip(names, values))
        st = self.state
        scalars.update({
            "perf/images_per_s": img_per_s * self.accelerator.num_processes,
            "lr/generator": self.sched_g.get_last_lr()[0],
            "skipped/g_steps": st.skipped_g_steps, "skipped/d_steps": st.skipped_d_steps,
            **{f"skipped/images/{k}": v for k, v in st.skipped_images.items()},
        })
        self.accelerator.log(scalars, step=st.global_step)
        if self.accelerator.is_main_process:
            progress.set_postfix(loss=f"{scalars.get('loss/total', float('nan')):.4g}", img_s=f"{scalars['perf/images_per_s']:.1f}")

    def validate(self, step: int) -> dict[str, float]:
        """Held-out PSNR/SSIM/LPIPS (EMA weights when on) and a reconstruction grid; main process only."""
        vae = self.eval_vae()
        images = self.heldout_images.to(self.device)
        with self.accelerator.autocast():
            metrics, recon = held_out_metrics(vae, images, self.loss_fn.perceptual, self.cfg.train_batch_size)
        path = os.path.join(self.cfg.output_dir, "samples", f"step_{step:07d}.png")
        grid = save_grid(images, recon, path)
        self.accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=step)
        log_images(self.accelerator, grid, step)
        logger.info(f"step {step}: held-out " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), main_process_only=True)
        return metrics

    def eval_vae(self) -> AutoencoderKL:
        """The weights to evaluate and export: an EMA copy when on, else the live model."""
        if self.ema is None:
            return self.vae
        vae = copy.deepcopy(self.vae)
        self.ema.copy_to(vae.parameters())
        return vae

    def export(self) -> None:
        if not self.accelerator.is_main_process:
            return
        vae = copy.deepcopy(self.eval_vae()).eval()
        export.export_model(self.cfg, vae, self.heldout_source, self.state, self.sources)


def main(argv: list[str] | None = None) -> None:
    cfg, explicit = parse_config(TrainConfig, argv, PROG, description=__doc__.split("\n\n")[0])
    cfg = apply_demo_defaults(cfg, explicit)
    checkpointing.check_writable(cfg.output_dir, PROG)
    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=os.path.join(cfg.output_dir, cfg.logging_dir))
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to, project_config=project,
        step_scheduler_with_optimizer=False)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(cfg.seed)
    try:
        trainer = Trainer(cfg, accelerator)
    except (data.DataError, ModelError, PerceptionWeightsError) as e:
        fail(PROG, str(e))
    if accelerator.is_main_process:
        checkpointing.clean_partial(cfg.output_dir)
        with open(os.path.join(cfg.output_dir, "train_config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=2)
        accelerator.init_trackers(cfg.tracker_project_name, config={k: str(v) if isinstance(v, list) else v for k, v in to_dict(cfg).items()})
    accelerator.wait_for_everyone()
    trainer.maybe_resume()
    try:
        trainer.run()
    except FloatingPointError as e:
        fail(PROG, str(e))
    accelerator.wait_for_everyone()
    trainer.export()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1:])
