"""The fast adaptive-weight path at the Trainer level: --adaptive_weight_mode fast against reference.

tests/test_losses.py compares the two paths inside the loss module, on a hand-run autoencoder.
Here the real Trainer runs them: the forward hook on decoder.conv_out must capture the input of
the conv that produced the reconstruction under the trainer's own options (channels-last,
gradient checkpointing, bf16 autocast, a frozen encoder), a few `Trainer.train_step` calls (G then
D) must keep the two modes on the same trajectory, and the loss must not keep the captured
activation past the step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import set_seed
from PIL import Image

import train_vae
from losses import vae_loss
from training.config import TrainConfig

# The real Trainer, several whole steps per case: part of the e2e set.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.e2e]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return str(root)


def reset_accelerate():
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()


@pytest.fixture
def accelerator_for():
    """Accelerator(mixed_precision=...) with accelerate's process-wide singletons reset around the test."""
    reset_accelerate()
    yield lambda mixed_precision: Accelerator(mixed_precision=mixed_precision, cpu=True)
    reset_accelerate()


def make_trainer(folder, out, accelerator, mode, **extra):
    cfg = TrainConfig(
        source=[folder],
        model_config="tiny",
        resolution=32,
        train_batch_size=2,
        disc_start=0,
        perception_weights="random",
        report_to="none",
        output_dir=str(out),
        dataloader_num_workers=0,
        num_validation_images=2,
        shuffle_block=4,
        learning_rate=1e-4,
        adaptive_weight_mode=mode,
        **extra,
    )
    cfg.check()
    set_seed(0)  # identical weights (VAE, D, random LPIPS and MoCo) in both modes
    trainer = train_vae.Trainer(cfg, accelerator)
    trainer.model.train()
    trainer.loss_fn.train()
    return trainer


def record_generator_grads(trainer) -> list[dict[str, torch.Tensor]]:
    """Wrap the trainer's _update to keep a copy of the autoencoder's gradients of every G step."""
    record, update = [], trainer._update

    def wrapped(model, optimizer, scheduler, logs, norm_key, *args, **kwargs):
        if norm_key == "grad_norm/generator":
            record.append({n: p.grad.detach().clone() for n, p in trainer.vae.named_parameters() if p.grad is not None})
        return update(model, optimizer, scheduler, logs, norm_key, *args, **kwargs)

    trainer._update = wrapped
    return record


def count_fast_lambda(monkeypatch) -> list[int]:
    """Count the fast path's ∇_W computations (two per G step with the GAN on; none in reference mode)."""
    calls, original = [0], vae_loss.conv_weight_grad

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(vae_loss, "conv_weight_grad", counted)
    return calls


def run_steps(trainer, x, steps):
    """`steps` calls of Trainer.train_step (G then D) on x, same posterior noise in both modes."""
    torch.manual_seed(1)
    history = []
    for step in range(steps):
        logs = trainer.train_step(x, step)
        assert trainer.state.skipped_g_steps == trainer.state.skipped_d_steps == 0
        assert trainer.loss_fn._watched_input is None  # the captured activation is not kept past the step
        history.append({k: v.float() for k, v in logs.items()})
    return history


CASES = {
    "default": ({}, "no"),
    "channels_last": ({"channels_last": True}, "no"),
    "gradient_checkpointing": ({"gradient_checkpointing": True}, "no"),
    "decoder_only": ({"train_decoder_only": True}, "no"),
    "bf16": ({}, "bf16"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_and_reference_modes_give_the_same_step(case, image_folder, tmp_path, accelerator_for, monkeypatch):
    extra, precision = CASES[case]
    accelerator = accelerator_for(precision)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fast_lambda = count_fast_lambda(monkeypatch)
    runs = {}
    for mode in ("reference", "fast"):
        trainer = make_trainer(image_folder, tmp_path / mode, accelerator, mode, **extra)
        grads = record_generator_grads(trainer)
        steps = 1 if precision == "bf16" else 3
        calls_before = fast_lambda[0]
        history = run_steps(trainer, x, steps)
        # The fast mode must really take the fast path (the hook captured conv_out's input), the reference never.
        assert fast_lambda[0] - calls_before == (2 * steps if mode == "fast" else 0)
        runs[mode] = history, grads
    (hist_ref, grads_ref), (hist_fast, grads_fast) = runs["reference"], runs["fast"]

    # Step 0 starts from identical weights: the two modes must agree to rounding. bf16: λ comes from a
    # bf16 conv backward in one path and a float32 one in the other.
    keys = ("loss/total", "loss/nll", "loss/kl", "loss/gan", "loss/adaptive_weight", "disc/loss")
    bf16 = precision == "bf16"
    assert hist_ref[0]["loss/gan_factor"].item() == 0.5 and hist_ref[0]["loss/adaptive_weight"].item() > 0
    for key in keys:
        torch.testing.assert_close(
            hist_fast[0][key],
            hist_ref[0][key],
            rtol=1e-3 if bf16 else 1e-5,
            atol=0,
            msg=lambda m, key=key: f"{key}: {m}",
        )
    first_ref, first_fast = grads_ref[0], grads_fast[0]
    assert set(first_ref) == set(first_fast) and "decoder.conv_out.weight" in first_ref
    if extra.get("train_decoder_only"):
        assert not any(name.startswith("encoder.") for name in first_ref)
    if bf16:
        # bf16 rounds each gradient element differently in the two paths: compare the whole vector. Here
        # the two paths differ by ~2.5% of its norm, bf16 itself from float32 by ~20%.
        flat_ref = torch.cat([first_ref[n].flatten() for n in sorted(first_ref)])
        flat_fast = torch.cat([first_fast[n].flatten() for n in sorted(first_ref)])
        assert (flat_fast - flat_ref).norm() <= 5e-2 * flat_ref.norm()
    else:
        scale = max(g.abs().max() for g in first_ref.values())
        for name, g in first_ref.items():
            # atol: parameters whose true gradient is 0 (attention key biases) carry rounding noise only.
            torch.testing.assert_close(
                first_fast[name], g, rtol=1e-4, atol=1e-6 * scale, msg=lambda m, name=name: f"{name}: {m}"
            )
    # Later steps: Adam moves every weight by about ±lr whatever the gradient's size, so rounding
    # differences grow step by step (chaotically in bf16): a loose check that the trajectories stay together.
    if not bf16:
        for step in (1, 2):
            for key in keys:
                torch.testing.assert_close(
                    hist_fast[step][key],
                    hist_ref[step][key],
                    rtol=1e-2,
                    atol=0,
                    msg=lambda m, step=step, key=key: f"step {step} {key}: {m}",
                )


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(image_folder, tmp_path, accelerator_for):
    """--gradient_checkpointing recomputes the decoder's blocks in the backward (their forward runs twice per
    step, not once) and must give the loss, logs and autoencoder gradients of the run without it."""
    accelerator = accelerator_for("no")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    runs = {}
    for checkpointing in (False, True):
        trainer = make_trainer(
            image_folder, tmp_path / str(checkpointing), accelerator, "fast", gradient_checkpointing=checkpointing
        )
        grads = record_generator_grads(trainer)
        forwards = [0]
        # A pre-hook: the recomputation stops early, once it has every tensor the backward needs (torch's
        # non-reentrant checkpoint), so a forward hook at the block's end does not see it.
        trainer.vae.decoder.up_blocks[0].register_forward_pre_hook(
            lambda *_, forwards=forwards: forwards.__setitem__(0, forwards[0] + 1)
        )
        history = run_steps(trainer, x, 1)
        runs[checkpointing] = history[0], grads[0], forwards[0]
    (logs, grads, forwards), (logs_ckpt, grads_ckpt, forwards_ckpt) = runs[False], runs[True]
    assert (forwards, forwards_ckpt) == (1, 2), "checkpointing did not recompute the decoder's block"
    assert logs.keys() == logs_ckpt.keys() and grads.keys() == grads_ckpt.keys()
    for key in logs:
        assert torch.equal(logs_ckpt[key], logs[key]), key
    for name in grads:
        assert torch.equal(grads_ckpt[name], grads[name]), name
