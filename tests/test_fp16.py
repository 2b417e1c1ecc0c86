"""fp16 with a gradient scaler, on CPU: `torch.amp.GradScaler("cpu")` in the places accelerate puts its CUDA one.

accelerate gives no scaler on CPU, so each test hands the trainer's accelerator and both prepared
optimizers the same CPU GradScaler: `accelerator.backward` then scales the loss, and each optimizer's
`step()` goes through `scaler.step` / `scaler.update`, exactly as under `--mixed_precision fp16` on a
GPU. The fused Adam the trainer builds (on CPU as on CUDA) takes the scaler's found-inf flag into its
kernel, so `scaler.step` always calls `step()`: the case in which accelerate's `step_was_skipped`
reads False for a skipped step.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import set_seed

import train_vae
from tiny import batch, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fresh_accelerator():
    def make():
        for state in (AcceleratorState, GradientState, PartialState):
            state._reset_state()
        return Accelerator(cpu=True, gradient_accumulation_steps=make.accumulation)

    make.accumulation = 1
    yield make
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()


def trainer_for(tmp_path, accelerator, **extra) -> train_vae.Trainer:
    cfg = tiny_config(tmp_path, **extra)
    set_seed(0)
    return train_vae.Trainer(cfg, accelerator)


def give_scaler(trainer, init_scale: float) -> torch.amp.GradScaler:
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    trainer.accelerator.scaler = scaler
    for optimizer in (trainer.opt_g, trainer.opt_d):
        optimizer.scaler = scaler
        optimizer.__setstate__({})  # what AcceleratedOptimizer.__init__ does with a scaler: wrap step()
    return scaler


def test_a_skipped_fp16_step_is_seen_and_moves_nothing(tmp_path, fresh_accelerator, monkeypatch):
    trainer = trainer_for(
        tmp_path, fresh_accelerator(), use_ema=True, lr_scheduler="linear", max_train_steps=10, disc_start=100
    )
    assert trainer.opt_g.optimizer.defaults["fused"], "the case at hand: a fused Adam under a grad scaler"
    scaler = give_scaler(trainer, 2.0**10)
    original = train_vae.TransfusionLoss.generator_loss

    def overflowing(self, *args, **kw):
        loss, logs = original(self, *args, **kw)
        return loss * float("inf"), logs

    monkeypatch.setattr(train_vae.TransfusionLoss, "generator_loss", overflowing)
    weights = {k: v.clone() for k, v in trainer.vae.state_dict().items()}
    lr, ema_steps = trainer.sched_g.get_last_lr(), trainer.ema.optimization_step
    trainer.train_step(batch(0), step=0)
    assert trainer.state.skipped_g_steps == 1 and trainer.state.nonfinite_streak == 1
    assert all(torch.equal(weights[k], v) for k, v in trainer.vae.state_dict().items())
    assert trainer.sched_g.get_last_lr() == lr, "the schedule advanced on a skipped step"
    assert trainer.ema.optimization_step == ema_steps, "the EMA averaged a skipped step"
    assert scaler.get_scale() < 2.0**10, "the scaler did not see the overflow"

    monkeypatch.setattr(train_vae.TransfusionLoss, "generator_loss", original)
    trainer.train_step(batch(1), step=1)
    assert trainer.state.skipped_g_steps == 1 and trainer.state.nonfinite_streak == 0
    assert trainer.sched_g.get_last_lr() != lr and trainer.ema.optimization_step == ema_steps + 1


def test_each_optimizer_is_unscaled_once_under_gradient_accumulation(tmp_path, fresh_accelerator):
    """G's update on the last micro-batch must not unscale D's gradients, which D's update unscales after its
    own backward: the gradient norms (measured after unscaling) equal those of the same step without a scaler."""
    fresh_accelerator.accumulation = 2
    micro_batches = [batch(0), batch(1)]
    plain = trainer_for(tmp_path / "plain", fresh_accelerator(), gradient_accumulation_steps=2)
    expected = plain.train_step(micro_batches, step=0)
    scaled = trainer_for(tmp_path / "scaled", fresh_accelerator(), gradient_accumulation_steps=2)
    give_scaler(scaled, 2.0**16)  # a power of two: scaling and unscaling are exact in float32
    logs = scaled.train_step(micro_batches, step=0)
    for key in ("grad_norm/generator", "grad_norm/discriminator"):
        torch.testing.assert_close(logs[key], expected[key], rtol=1e-5, atol=0, msg=key)
    assert scaled.state.skipped_g_steps == scaled.state.skipped_d_steps == 0


def test_the_adaptive_weight_is_measured_on_the_scaled_loss(tmp_path, fresh_accelerator, monkeypatch):
    """The trainer hands the loss the scaler's current scale (see test_losses: with it, λ survives fp16)."""
    trainer = trainer_for(tmp_path, fresh_accelerator())
    seen = []
    original = train_vae.TransfusionLoss.generator_loss

    def spy(self, *args, **kw):
        seen.append(kw.get("grad_scale"))
        return original(self, *args, **kw)

    monkeypatch.setattr(train_vae.TransfusionLoss, "generator_loss", spy)
    trainer.train_step(batch(0), step=0)
    scaler = give_scaler(trainer, 2.0**12)
    trainer.train_step(batch(1), step=1)  # the scaler's first scale(): its initial value, as a float
    trainer.train_step(batch(2), step=2)  # then its live scale tensor
    assert seen[0] is None and seen[1] == 2.0**12
    assert torch.is_tensor(seen[2]) and seen[2] is scaler._get_scale_async()
