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
from losses import vae_loss
from losses.perceptual import LPIPS
from tiny import batch, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fresh_accelerator():
    def make(mixed_precision: str = "no"):
        for state in (AcceleratorState, GradientState, PartialState):
            state._reset_state()
        accelerator = Accelerator(
            cpu=True, mixed_precision=mixed_precision, gradient_accumulation_steps=make.accumulation
        )
        if mixed_precision == "fp16":
            accelerator.native_amp = True  # fp16 autocast on CPU, as accelerate turns it on for a GPU
        return accelerator

    make.accumulation = 1
    yield make
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()


def trainer_for(tmp_path, accelerator, scale=None, growth_interval: int = 2000, **extra) -> train_vae.Trainer:
    """A tiny Trainer; with `scale`, under fp16's grad scalers on CPU: the accelerator gets G's scaler before the
    Trainer is built (as accelerate makes its CUDA one, "auto": from the trainer's scaler_kwargs), and the
    Trainer makes D's own. growth_interval: both scalers'."""
    cfg = tiny_config(tmp_path, **extra)
    if scale is not None:
        kwargs = train_vae.scaler_kwargs(cfg).to_kwargs() if scale == "auto" else {"init_scale": scale}
        accelerator.scaler = torch.amp.GradScaler("cpu", **kwargs)
    set_seed(0)
    trainer = train_vae.Trainer(cfg, accelerator)
    for scaler in (accelerator.scaler, trainer.d_scaler):
        if scaler is not None:
            scaler.set_growth_interval(growth_interval)
    return trainer


def test_lpips_head_runs_in_float32():
    """Without autocast LPIPS is the package's forward to the bit; under fp16 autocast its head (and so the
    gradient that enters it, C·H·W/B times a loss scale) is float32, and the value stays float32's."""
    torch.manual_seed(0)
    lpips_net = LPIPS(pretrained=False)
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1 for _ in range(2))
    assert torch.equal(lpips_net(x, y), lpips_net.net(x, y).reshape(2))
    y = y.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.float16):
        value = lpips_net(x, y)
        package = lpips_net.net(x, y).reshape(2)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, lpips_net(x, y).detach(), rtol=1e-2, atol=0)
    scale = vae_loss.fp16_grad_scale(2) * 3 * 32 * 32 / 2  # the nll's C·H·W/B times λ's scale
    (grad,) = torch.autograd.grad(value.sum() * scale, y)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    (grad,) = torch.autograd.grad(package.float().sum() * scale, y)
    assert not torch.isfinite(grad).all(), "the package's fp16 head was expected to overflow here"


def test_a_skipped_fp16_step_is_seen_and_moves_nothing(tmp_path, fresh_accelerator, monkeypatch):
    trainer = trainer_for(
        tmp_path, fresh_accelerator(), 2.0**10, use_ema=True, lr_scheduler="linear", max_train_steps=10, disc_start=100
    )
    assert trainer.opt_g.optimizer.defaults["fused"], "the case at hand: a fused Adam under a grad scaler"
    scaler = trainer.accelerator.scaler
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
    # A power of two: scaling and unscaling are exact in float32.
    scaled = trainer_for(tmp_path / "scaled", fresh_accelerator(), 2.0**16, gradient_accumulation_steps=2)
    logs = scaled.train_step(micro_batches, step=0)
    for key in ("grad_norm/generator", "grad_norm/discriminator"):
        torch.testing.assert_close(logs[key], expected[key], rtol=1e-5, atol=0, msg=key)
    assert scaled.state.skipped_g_steps == scaled.state.skipped_d_steps == 0


def test_the_adaptive_weight_gets_a_scale_of_its_own(tmp_path, fresh_accelerator, monkeypatch):
    """Under fp16 autocast the loss takes λ's gradients at fp16_grad_scale(B), whatever the GradScaler's
    scale (here 2^24, at which they would overflow); in float32 it takes them unscaled."""
    seen = []
    original = vae_loss._scaled_grad

    def spy(output, inputs, grad_scale, retain_graph=False):
        seen.append(grad_scale)
        return original(output, inputs, grad_scale, retain_graph)

    monkeypatch.setattr(vae_loss, "_scaled_grad", spy)
    trainer = trainer_for(tmp_path / "fp32", fresh_accelerator())
    trainer.train_step(batch(0), step=0)
    assert seen and all(s is None for s in seen)
    seen.clear()
    trainer = trainer_for(tmp_path / "fp16", fresh_accelerator("fp16"), 2.0**24)
    trainer.train_step(batch(0), step=0)
    assert seen and all(s == vae_loss.fp16_grad_scale(2) == 2.0**7 for s in seen)
    assert trainer.state.skipped_g_steps == 1, "at 2^24 the autoencoder's own backward must overflow"


def test_fp16_trains_from_the_first_step_with_lpips_and_its_lambda_is_fp32s(tmp_path, fresh_accelerator):
    """fp16 autocast with LPIPS, the GAN and the trainer's own GradScaler settings: no step is skipped over the
    first steps, the scale has not fallen, and λ of the first step equals float32's within fp16's rounding."""
    cfg = dict(lpips_weight=1.0, disc_start=0, learning_rate=1e-4)
    fp32 = trainer_for(tmp_path / "fp32", fresh_accelerator(), **cfg)
    torch.manual_seed(1)
    expected = fp32.train_step(batch(0), step=0)
    fp16 = trainer_for(tmp_path / "fp16", fresh_accelerator("fp16"), "auto", **cfg)
    scalers = (fp16.accelerator.scaler, fp16.d_scaler)
    start = [scaler.get_scale() for scaler in scalers]
    torch.manual_seed(1)
    logs = [fp16.train_step(batch(step), step=step) for step in range(3)]
    assert logs[0]["loss/lpips"] > 0 and logs[0]["loss/adaptive_weight"] > 0
    torch.testing.assert_close(logs[0]["loss/adaptive_weight"], expected["loss/adaptive_weight"], rtol=2e-2, atol=0)
    torch.testing.assert_close(logs[0]["loss/total"], expected["loss/total"], rtol=1e-2, atol=0)
    assert fp16.state.skipped_g_steps == fp16.state.skipped_d_steps == 0
    assert [scaler.get_scale() for scaler in scalers] == start, "a scale fell"
    assert start == [2.0**4, 2.0**10]  # G's: 2^16 / (3·32·32 rounded up to 2^12)


def test_a_skipped_g_update_keeps_the_d_update_whole(tmp_path, fresh_accelerator, monkeypatch):
    """An fp16 overflow in G's backward only: D still stepped, so its BatchNorm statistics and LeCAM's EMAs
    must be those of D's update (as in the same step without the overflow), not reverted under D's new weights."""
    cfg = dict(lecam_weight=0.1)
    control = trainer_for(tmp_path / "control", fresh_accelerator(), 2.0**10, **cfg)
    torch.manual_seed(1)
    control.train_step(batch(0), step=0)
    trainer = trainer_for(tmp_path / "skip", fresh_accelerator(), 2.0**10, **cfg)
    original = train_vae.TransfusionLoss.generator_loss

    def overflowing(self, *args, **kw):
        loss, logs = original(self, *args, **kw)
        return loss * float("inf"), logs

    monkeypatch.setattr(train_vae.TransfusionLoss, "generator_loss", overflowing)
    d_before = {k: v.clone() for k, v in trainer.loss_fn.discriminator.state_dict().items()}
    torch.manual_seed(1)
    trainer.train_step(batch(0), step=0)
    assert trainer.state.skipped_g_steps == 1 and trainer.state.skipped_d_steps == 0
    d_after = trainer.loss_fn.discriminator.state_dict()
    assert not torch.equal(d_after["main.3.running_mean"], d_before["main.3.running_mean"])
    for key, value in control.loss_fn.discriminator.state_dict().items():
        assert torch.equal(d_after[key], value), key
    for key, value in control.loss_fn.lecam.state_dict().items():
        assert torch.equal(trainer.loss_fn.lecam.state_dict()[key], value), key


def test_d_micro_batches_are_unscaled_by_the_scale_they_were_made_with(tmp_path, fresh_accelerator):
    """Gradient accumulation under a scale that grows after every step: G's update on the last micro-batch
    comes before D's last backward. D's accumulated update must equal the one without a scaler (the scale
    may change only once per step, after both updates), and the scale grows once per step."""
    fresh_accelerator.accumulation = 2
    micro_batches = [batch(0), batch(1)]
    plain = trainer_for(tmp_path / "plain", fresh_accelerator(), gradient_accumulation_steps=2)
    torch.manual_seed(1)
    plain.train_step(micro_batches, step=0)
    scaled = trainer_for(
        tmp_path / "scaled", fresh_accelerator(), 2.0**10, growth_interval=1, gradient_accumulation_steps=2
    )
    torch.manual_seed(1)
    scaled.train_step(micro_batches, step=0)
    assert scaled.state.skipped_g_steps == scaled.state.skipped_d_steps == 0
    assert scaled.accelerator.scaler.get_scale() == scaled.d_scaler.get_scale() == 2.0**11
    for module in ("discriminator", "lecam"):
        expected = getattr(plain.loss_fn, module).state_dict()
        for key, value in getattr(scaled.loss_fn, module).state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=0, msg=f"{module}.{key}")
    for key, value in plain.vae.state_dict().items():
        torch.testing.assert_close(scaled.vae.state_dict()[key], value, rtol=1e-6, atol=0, msg=key)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_accumulated_d_gradient_equals_one_large_batch(tmp_path, fresh_accelerator, monkeypatch):
    """Two micro-batches of 2 under fp16's scalers (growing after every step) give D the gradient of one batch of
    4 without a scaler: each micro-batch's loss counts 1/2, and each is unscaled by the scale it was made with.
    Both D's see the same (x, x̂) pairs (x̂ a fixed function of x, not the posterior's draw), and their BatchNorm
    layers are replaced by identities: in training mode BatchNorm normalises each micro-batch by its own
    statistics, so with it accumulation is *not* a large batch (true of the reference's PatchGAN in any trainer)."""
    original = train_vae.Trainer.generator_step

    def fixed_pairs(self, x, step, micro_batch=0):
        (target, _), logs, applied = original(self, x, step, micro_batch)
        return (target, torch.tanh(1.5 * target.flip(-1) + 0.2)), logs, applied

    monkeypatch.setattr(train_vae.Trainer, "generator_step", fixed_pairs)
    images = torch.cat([batch(0), batch(1)])

    def d_gradient(trainer, step_batch) -> list[torch.Tensor]:
        discriminator = trainer.loss_fn.discriminator
        for name, module in list(discriminator.named_modules()):
            if isinstance(module, torch.nn.BatchNorm2d):
                parent, _, child = name.rpartition(".")
                setattr(discriminator.get_submodule(parent) if parent else discriminator, child, torch.nn.Identity())
        seen, step_fn = [], trainer.opt_d.optimizer.step

        def spy(*args, **kwargs):
            seen.append([p.grad.clone() for p in discriminator.parameters()])
            return step_fn(*args, **kwargs)

        trainer.opt_d.optimizer.step = spy
        torch.manual_seed(1)
        trainer.train_step(step_batch, step=0)
        assert len(seen) == 1, "D must step once per optimizer step"
        return seen[0]

    large = d_gradient(trainer_for(tmp_path / "large", fresh_accelerator(), train_batch_size=4), images)
    fresh_accelerator.accumulation = 2
    accumulated = trainer_for(
        tmp_path / "accumulated", fresh_accelerator(), 2.0**10, growth_interval=1, gradient_accumulation_steps=2
    )
    gradient = d_gradient(accumulated, [images[:2], images[2:]])
    assert accumulated.state.skipped_d_steps == 0 and accumulated.d_scaler.get_scale() == 2.0**11
    assert any(g.abs().max() > 0 for g in large)
    for got, expected in zip(gradient, large, strict=True):
        # Summation order differs (two halves of 2 against one mean of 4): float32 rounding of the largest entry.
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
