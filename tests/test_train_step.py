"""`Trainer.train_step` on hand-made batches: no data stream, no script, the step the loop runs.

Covers the reliability edges of one step: a skipped non-finite step leaves D's BatchNorm statistics
and LeCAM's EMAs alone; D's learning-rate schedule spans the steps D trains; logged averages
divide by each key's own count; decoder-only training refuses an encoder that could not be copied.
"""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import set_seed

import train_vae
from autoencoder.models import ModelError, build_vae
from tiny import batch, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def gan_buffers(trainer) -> dict[str, torch.Tensor]:
    out = {f"d.{k}": v.clone() for k, v in trainer.loss_fn.discriminator.named_buffers()}
    out.update({f"lecam.{k}": v.clone() for k, v in trainer.loss_fn.lecam.named_buffers()})
    return out


def nan_discriminator_loss(monkeypatch):
    """The real D loss (BatchNorm and LeCAM updated as usual), made non-finite as an overflow would."""
    original = train_vae.TransfusionLoss.discriminator_loss

    def patched(self, *args, **kw):
        loss, logs = original(self, *args, **kw)
        return loss * float("nan"), logs

    monkeypatch.setattr(train_vae.TransfusionLoss, "discriminator_loss", patched)


def test_train_step_moves_weights_and_gan_buffers(tmp_path, accelerator):
    """The control for the next test: a finite step does change D's BatchNorm statistics and LeCAM's EMAs."""
    set_seed(0)
    trainer = train_vae.Trainer(tiny_config(tmp_path, lecam_weight=0.1), accelerator)
    before = gan_buffers(trainer)
    conv_before = trainer.vae.decoder.conv_out.weight.detach().clone()
    logs = trainer.train_step(batch(), step=0)
    after = gan_buffers(trainer)
    assert logs["disc/loss"].isfinite() and logs["loss/adaptive_weight"] > 0
    stats = [k for k in before if k.endswith("running_mean")]
    assert stats and all(not torch.equal(before[k], after[k]) for k in stats)
    assert after["lecam.steps"].item() == 1
    assert not torch.equal(conv_before, trainer.vae.decoder.conv_out.weight)
    assert trainer.state.skipped_d_steps == 0 and trainer.state.nonfinite_streak == 0


def test_nonfinite_d_step_leaves_batchnorm_and_lecam_untouched(tmp_path, accelerator, monkeypatch):
    set_seed(0)
    trainer = train_vae.Trainer(tiny_config(tmp_path, lecam_weight=0.1), accelerator)
    trainer.train_step(batch(0), step=0)  # a good step first: LeCAM's EMAs hold real values
    before = gan_buffers(trainer)
    d_before = {k: v.clone() for k, v in trainer.loss_fn.discriminator.state_dict().items()}
    nan_discriminator_loss(monkeypatch)
    trainer.train_step(batch(1), step=1)
    after = gan_buffers(trainer)
    assert trainer.state.skipped_d_steps == 1 and trainer.state.nonfinite_streak == 1
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    for key, value in trainer.loss_fn.discriminator.state_dict().items():
        assert torch.equal(value, d_before[key]), key
    assert all(torch.isfinite(v.float()).all() for v in after.values())


def test_discriminator_schedule_spans_the_steps_it_trains(tmp_path, accelerator):
    """Linear decay: D, on from step 3 of 8, must reach lr 0 at the last step, like G; not lag by 3 steps."""
    set_seed(0)
    cfg = tiny_config(tmp_path, disc_start=3, max_train_steps=8, lr_scheduler="linear")
    trainer = train_vae.Trainer(cfg, accelerator)
    lr_d = []
    for step in range(cfg.max_train_steps):
        trainer.train_step(batch(step), step)
        lr_d.append(trainer.sched_d.get_last_lr()[0])
    assert trainer.sched_g.get_last_lr()[0] == 0.0
    assert lr_d[:3] == [cfg.learning_rate] * 3  # not stepped before disc_start
    assert lr_d[-1] == 0.0 and lr_d[-2] > 0.0
    assert lr_d[3] == pytest.approx(cfg.learning_rate * 4 / 5)


def test_log_window_divides_each_key_by_its_own_count(accelerator):
    window = train_vae.LogWindow()
    window.add({"loss/total": torch.tensor(2.0)}, images=2)
    window.add({"loss/total": torch.tensor(4.0), "disc/loss": torch.tensor(1.0)}, images=2)
    window.add({"loss/total": torch.tensor(6.0), "disc/loss": torch.tensor(3.0)}, images=2)
    means = window.means(accelerator)
    assert means["loss/total"] == pytest.approx(4.0)
    assert means["disc/loss"] == pytest.approx(2.0)  # D logged on 2 of the 3 steps: (1 + 3) / 2, not / 3


def test_decoder_only_refuses_an_encoder_it_could_not_copy(tmp_path, accelerator):
    """--init_from a 4-channel VAE into the 8-channel preset re-initialises latent layers of the encoder:
    freezing them would train the decoder on noise. One line, before training."""
    source = build_vae("tiny", latent_channels=4)
    source.save_pretrained(tmp_path / "four")
    cfg = tiny_config(tmp_path, init_from=str(tmp_path / "four"), train_decoder_only=True)
    with pytest.raises(ModelError, match="--train_decoder_only would freeze encoder layers"):
        train_vae.build_autoencoder(cfg)
    same = tiny_config(tmp_path, init_from=str(tmp_path / "four"), latent_channels=4, train_decoder_only=True)
    vae = train_vae.build_autoencoder(same)  # nothing re-initialised: allowed
    assert not any(p.requires_grad for n, p in vae.named_parameters() if n.startswith("encoder."))
    both = tiny_config(tmp_path, init_from=str(tmp_path / "four"))
    assert train_vae.build_autoencoder(both).config.latent_channels == 8  # training the encoder too: allowed


def last_logged(trainer) -> dict:
    import json

    with open(trainer.run_log.metrics_path) as f:
        return json.loads(f.read().splitlines()[-1])


def test_validation_logs_drift_from_the_start_model(tmp_path, accelerator):
    """A run from --pretrained_model_name_or_path: at step 0 the latents have not moved (MSE 0, cosine 1) and the
    start model's latents decode as the model's own reconstruction; after a few steps that train the encoder, they
    have moved. The start model stays frozen, in eval mode, untouched by training."""
    set_seed(0)
    build_vae("tiny").save_pretrained(tmp_path / "start")
    start = str(tmp_path / "start")
    cfg = tiny_config(
        tmp_path, pretrained_model_name_or_path=start, model_config=None, lpips_weight=0.0, disc_start=100
    )
    trainer = train_vae.Trainer(cfg, accelerator)
    trainer.heldout_images = batch(5)
    base = trainer.base_vae
    assert base is not None and not base.training and not any(p.requires_grad for p in base.parameters())
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    start = train_vae.evaluate_held_out(trainer, 0)
    logged = last_logged(trainer)
    assert logged["drift/latent_mse"] == 0.0 and logged["drift/latent_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert logged["drift/base_latents_psnr"] == pytest.approx(start["psnr"], abs=1e-9)
    for step in range(3):
        trainer.train_step(batch(step), step=step)
    train_vae.evaluate_held_out(trainer, 3)
    logged = last_logged(trainer)
    assert logged["drift/latent_mse"] > 0 and logged["drift/latent_cosine"] < 1
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in frozen.items())


def test_no_drift_without_a_start_model_or_in_another_latent_space(tmp_path, accelerator):
    build_vae("tiny", latent_channels=4).save_pretrained(tmp_path / "four")
    assert train_vae.build_base(tiny_config(tmp_path), build_vae("tiny")) is None
    cfg = tiny_config(tmp_path, init_from=str(tmp_path / "four"))  # 4 channels copied into the 8 of the tiny preset
    assert train_vae.build_base(cfg, build_vae("tiny")) is None
    cfg = tiny_config(tmp_path, init_from=str(tmp_path / "four"), latent_channels=4)
    assert train_vae.build_base(cfg, build_vae("tiny", latent_channels=4)) is not None
