"""The latent regularisers (losses/regularisers.py): EQ-VAE's equivariance term and VA-VAE's VF alignment.

Off, they change nothing (loss, logs, gradients, global RNG: bit for bit the recipe's step); on, each term
equals its formula on hand-made tensors, its gradients reach the parameters it is meant to train (never the
frozen DINOv2's), its transform draw follows (seed, step) alone, and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import set_seed
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from transformers import Dinov2Config, Dinov2Model

import train_vae
from autoencoder.models import build_vae
from common.cli import parse_config
from common.errors import CheckpointError, ConfigError, PerceptionWeightsError
from losses import regularisers, vae_loss
from losses.equivariance import equivariant_transform
from losses.regularisers import (
    EquivarianceTransform,
    FoundationFeatures,
    draw_equivariance,
    equivariance_nll,
    transform_generator,
    vf_loss,
)
from tiny import batch, tiny_config
from training import checkpointing
from training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def tiny_dino() -> FoundationFeatures:
    config = Dinov2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=14, image_size=28
    )
    torch.manual_seed(123)
    return FoundationFeatures(Dinov2Model(config))


@pytest.fixture
def small_dino(monkeypatch):
    """TransfusionLoss builds a 2-layer-wide DINOv2 instead of dinov2-base (seconds, not minutes, on CPU)."""
    monkeypatch.setattr(vae_loss, "build_foundation", lambda name, random_init: tiny_dino())


def capture_gradients(monkeypatch, trainer) -> list[dict[str, torch.Tensor]]:
    """Make the trainer's G update record every parameter's gradient (and not step), so steps can be compared."""
    seen = []

    def record(model, optimizer, scheduler, logs, norm_key, scaler=None, vote=False):
        seen.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.zero_grad(set_to_none=True)
        return True

    monkeypatch.setattr(trainer, "_update", record)
    return seen


def forbid(monkeypatch, module, *names):
    def boom(*args, **kw):
        raise AssertionError("a regulariser ran while it was off")

    for name in names:
        monkeypatch.setattr(module, name, boom)


# ----------------------------------------------------------------------------------------
# all off: the recipe's step, bit for bit
# ----------------------------------------------------------------------------------------


def recipe_step(trainer, x: torch.Tensor, step: int):
    """The generator step as it was before the regularisers: encode, sample, decode, loss, backward."""
    model, vae = trainer.model, trainer.vae
    train_vae.requires_grad(trainer.loss_fn.discriminator, False)
    with trainer.accelerator.autocast():
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss, logs = trainer.loss_fn.generator_loss(
            x, recon, posterior.mean, posterior.logvar, step, discriminator=trainer.loss_fn.discriminator
        )
    trainer.accelerator.backward(loss)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), {f"loss/{k}": v for k, v in logs.items()}, grads


@pytest.mark.parametrize(
    "off",
    [
        {},
        dict(equivariance_weight=0.0, equivariance_prob=1.0, vf_weight=0.0),
        dict(equivariance_weight=1.0, equivariance_prob=0.0),
    ],
    ids=["defaults", "weights-0", "prob-0"],
)
@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_off_is_bit_identical_to_the_recipe_step(tmp_path, accelerator, monkeypatch, off, mode):
    """Same seed and batch: loss, logs and every gradient equal the pre-regulariser step with torch.equal, the
    global RNG ends in the same state, and no regulariser code runs (draw, equivariance, VF)."""
    cfg = tiny_config(tmp_path, adaptive_weight_mode=mode, **off)
    set_seed(0)
    trainer = train_vae.Trainer(cfg, accelerator)
    x, step = batch(), 3
    captured_loss = []
    original = trainer.loss_fn.generator_loss

    def keep_loss(*args, **kw):
        assert not {"equivariance", "latent_projection", "encoder_last_layer"} & set(kw), kw
        loss, logs = original(*args, **kw)
        captured_loss.append(loss.detach())
        return loss, logs

    torch.manual_seed(7)
    ref_loss, ref_logs, ref_grads = recipe_step(trainer, x, step)
    ref_rng = torch.get_rng_state()

    forbid(
        monkeypatch, train_vae, "draw_equivariance", "transform_generator", "build_vf_projection", "add_latent_noise"
    )
    forbid(monkeypatch, vae_loss, "equivariance_nll", "vf_loss")
    forbid(monkeypatch, regularisers, "equivariant_transform")
    monkeypatch.setattr(trainer.loss_fn, "generator_loss", keep_loss)
    grads = capture_gradients(monkeypatch, trainer)
    torch.manual_seed(7)
    _, logs, ok = trainer.generator_step(x, step)
    assert ok and trainer.vf_projection is None and trainer.loss_fn.foundation is None
    assert torch.equal(torch.get_rng_state(), ref_rng)
    assert torch.equal(captured_loss[0], ref_loss)
    logs.pop("grad_norm/generator", None)
    assert logs.keys() == ref_logs.keys()
    recipe_keys = {"total", "nll", "l1", "lpips", "id", "kl", "gan", "adaptive_weight", "gan_factor"}
    if cfg.equivariance_weight == 0:  # the recipe's logs, no key more (a configured term logs 0 on idle steps)
        assert logs.keys() == {f"loss/{k}" for k in recipe_keys}
    for key in ref_logs:
        assert torch.equal(logs[key], ref_logs[key]), key
    assert grads[0].keys() == ref_grads.keys() and len(ref_grads) > 50
    for name in ref_grads:
        assert torch.equal(grads[0][name], ref_grads[name]), name


def test_defaults_are_off_and_flags_parse():
    cfg = TrainConfig()
    assert cfg.equivariance_weight == 0 and cfg.vf_weight == 0
    argv = ["--equivariance_weight", "0.5", "--equivariance_scales", "0.25", "--equivariance_scales", "0.5"]
    argv += ["--no-equivariance_rotations", "--vf_weight", "0.1", "--vf_margin_cos", "0.4"]
    cfg, _ = parse_config(TrainConfig, argv, "train_vae.py")
    assert cfg.equivariance_scales == [0.25, 0.5] and cfg.equivariance_rotations is False
    kw = cfg.loss_kwargs()
    assert kw["equivariance_weight"] == 0.5 and kw["vf_weight"] == 0.1 and kw["vf_margin_cos"] == 0.4
    assert "equivariance_prob" not in kw  # the trainer draws; the loss only weighs
    recipe = cfg.recipe()
    assert recipe["equivariance_scales"] == [0.25, 0.5] and recipe["vf_margin_distmat"] == 0.25
    for bad in (
        dict(equivariance_prob=1.5),
        dict(equivariance_scales=[0.0]),
        dict(equivariance_scales=[1.5]),
        dict(equivariance_weight=1.0, equivariance_scales=[1.0], equivariance_rotations=False),
        dict(vf_weight=0.1, train_decoder_only=True),
        dict(vf_weight=0.1, freeze=["encoder."]),
    ):
        with pytest.raises(ConfigError):
            TrainConfig(**bad).check()


def test_a_vf_model_folder_that_does_not_exist_is_one_line_before_any_model(tmp_path):
    for missing in (str(tmp_path / "nope"), "./dinov2", "dinov2"):
        with pytest.raises(ConfigError, match="no such folder, and not a Hub id"):
            TrainConfig(vf_weight=0.1, vf_model=missing).check()
    (tmp_path / "dino").mkdir()
    for fine in (str(tmp_path / "dino"), "facebook/dinov2-large"):
        TrainConfig(vf_weight=0.1, vf_model=fine).check()
    TrainConfig(vf_model=str(tmp_path / "nope")).check()  # the VF loss off: the flag is not read


# ----------------------------------------------------------------------------------------
# formulas on hand-made tensors
# ----------------------------------------------------------------------------------------


class ConstantPerceptual(torch.nn.Module):
    """A stand-in LPIPS: per-image values given by hand."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values)

    def forward(self, inputs, reconstructions):
        return self.values + 0 * reconstructions.sum((1, 2, 3))


def test_equivariance_nll_is_l1_plus_lpips_of_the_transformed_pair():
    target = torch.zeros(2, 3, 2, 2)
    recon = torch.zeros(2, 3, 2, 2)
    recon[0, 0, 0, 0], recon[1, 2, 1, 1] = 0.5, -1.5  # Σ|x − x̂| = 2 over a batch of 2
    assert equivariance_nll(target, recon, None, l1_weight=1.0).item() == pytest.approx(1.0)
    lpips = ConstantPerceptual([0.1, 0.3])  # Σ LPIPS_b · C·H·W / B = 0.4 · 12 / 2 = 2.4
    value = equivariance_nll(target, recon, lpips, l1_weight=2.0, lpips_weight=0.5)
    assert value.item() == pytest.approx(2.0 * 1.0 + 0.5 * 2.4)


def test_generator_loss_adds_the_weighted_equivariance_term_and_logs_it_per_pixel():
    torch.manual_seed(0)
    loss_fn = vae_loss.TransfusionLoss(
        perceptual=ConstantPerceptual([0.1, 0.3]), id_weight=0, gan_weight=0, equivariance_weight=0.25
    )
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    mean, logvar = torch.randn(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    w = torch.randn(3, 8, 3, 3)
    target = torch.zeros(2, 3, 2, 2)
    eq_recon = torch.zeros(2, 3, 2, 2)
    eq_recon[0, 0, 0, 0], eq_recon[1, 2, 1, 1] = 0.5, -1.5
    base, base_logs = loss_fn.generator_loss(x, recon, mean, logvar, 0, last_layer_weight=w)
    loss, logs = loss_fn.generator_loss(x, recon, mean, logvar, 0, last_layer_weight=w, equivariance=(target, eq_recon))
    expected = 1.0 + 2.4  # L1 + LPIPS of the transformed pair (previous test)
    assert (loss - base).item() == pytest.approx(0.25 * expected, rel=1e-5)
    assert (logs["total"] - base_logs["total"]).item() == pytest.approx(0.25 * expected, rel=1e-5)
    assert logs["equivariance"].item() == pytest.approx(expected / 12)
    assert base_logs["equivariance"].item() == 0  # configured, not drawn this step: logged as 0


def test_transform_pairs_latent_and_image_sizes():
    z, x = torch.randn(1, 4, 4, 4), torch.randn(1, 3, 32, 32)
    tz, tx = EquivarianceTransform(0.75, 1).apply(z, x)
    assert tz.shape == (1, 4, 3, 3) and tx.shape == (1, 3, 24, 24)
    assert torch.equal(tx, equivariant_transform(x, 0.75, 1))
    # 5·0.75 rounds to 4: the image follows the latent (40 -> 32), not its own rounding (40·0.75 = 30).
    tz, tx = EquivarianceTransform(0.75, 0).apply(torch.randn(1, 4, 5, 5), torch.randn(1, 3, 40, 40))
    assert tz.shape[-2:] == (4, 4) and tx.shape[-2:] == (32, 32)
    tz, tx = EquivarianceTransform(1.0, 2).apply(z, x)
    assert torch.equal(tz, torch.rot90(z, 2, (-2, -1))) and torch.equal(tx, torch.rot90(x, 2, (-2, -1)))
    # A bf16 latent (autocast): transformed in float32 (no bf16 antialiasing kernel on CPU), returned in bf16.
    tz, _ = EquivarianceTransform(0.5, 0).apply(z.bfloat16(), x)
    assert tz.dtype == torch.bfloat16 and tz.shape == (1, 4, 2, 2)


def test_vf_loss_on_hand_made_features():
    # Two positions, D = 2: z'_1 = (1, 0), z'_2 = (0, 1); f_1 = f_2 = (1, 0) (scaled: cosines ignore norms).
    z = torch.tensor([[1.0, 0.0], [0.0, 3.0]]).T.reshape(1, 2, 1, 2)
    f = torch.tensor([[2.0, 0.0], [5.0, 0.0]]).T.reshape(1, 2, 1, 2)
    value, parts = vf_loss(z, f, margin_cos=0.5, margin_distmat=0.25)
    # cos(z'_i, f_i) = 1, 0 -> relu(0.5 − 1) = 0, relu(0.5 − 0) = 0.5: mean 0.25
    assert parts["cos"].item() == pytest.approx(0.25)
    # cos matrices [[1, 0], [0, 1]] vs [[1, 1], [1, 1]]: |diff| − 0.25 -> 0, 0.75, 0.75, 0: mean 0.375
    assert parts["distmat"].item() == pytest.approx(0.375)
    assert value.item() == pytest.approx(0.625)
    _, parts = vf_loss(z, f, margin_cos=0.0, margin_distmat=0.0)
    assert parts["cos"].item() == pytest.approx(0.5) and parts["distmat"].item() == pytest.approx(0.5)
    # Aligned within the margins: no loss, no gradient.
    zg = f.clone().requires_grad_(True)
    value, _ = vf_loss(zg, f)
    value.backward()
    assert value.item() == 0 and not zg.grad.any()


class FixedFeatures(torch.nn.Module):
    """A stand-in DINOv2: the same hand-made features for any image."""

    def __init__(self, features):
        super().__init__()
        self.features = features
        self.width = features.shape[1]

    def forward(self, images, grid):
        return self.features.expand(images.shape[0], -1, -1, -1)


def test_vf_margins_are_zero_before_vf_margin_start():
    # The hand-made pair of test_vf_loss_on_hand_made_features: VF = 1.0 without margins, 0.625 with (0.5, 0.25).
    z = torch.tensor([[1.0, 0.0], [0.0, 3.0]]).T.reshape(1, 2, 1, 2)
    f = torch.tensor([[2.0, 0.0], [5.0, 0.0]]).T.reshape(1, 2, 1, 2)
    loss_fn = vae_loss.TransfusionLoss(
        lpips_weight=0, id_weight=0, gan_weight=0, vf_weight=0.5, vf_margin_start=10, foundation=FixedFeatures(f)
    )
    assert loss_fn.vf_margins(9) == (0.0, 0.0) and loss_fn.vf_margins(10) == (0.5, 0.25)
    x = torch.zeros(1, 3, 16, 32)
    with torch.no_grad():  # λ_vf is 0 without autograd; the logged VF is the formula's value
        for step, expected in ((0, 1.0), (9, 1.0), (10, 0.625), (500, 0.625)):
            _, logs = loss_fn.generator_loss(
                x, x, torch.zeros(1, 2, 1, 2), torch.zeros(1, 2, 1, 2), step, last_layer_weight=torch.zeros(3, 8, 3, 3),
                latent_projection=z,
            )  # fmt: skip
            assert logs["vf"].item() == pytest.approx(expected), step
    assert TrainConfig().vf_margin_start == 0  # default: margins from step 0, as before


def test_vf_projection_has_no_bias():
    proj = regularisers.build_vf_projection(4, 8)
    assert proj.bias is None and proj.weight.shape == (8, 4, 1, 1)
    # Without a bias, z = 0 projects to z' = 0 whatever the weights: the cosine term cannot be met by a constant.
    assert not proj(torch.zeros(1, 4, 2, 2)).any()


def test_random_dinov2_offline_builds_the_named_architecture(monkeypatch):
    def no_config(name):
        raise OSError("offline")

    monkeypatch.setattr(regularisers.Dinov2Config, "from_pretrained", no_config)
    monkeypatch.setattr(regularisers, "Dinov2Model", lambda config: config)
    monkeypatch.setattr(regularisers, "FoundationFeatures", lambda model: model)
    large = regularisers.build_foundation("facebook/dinov2-large", random_init=True)
    base = regularisers.build_foundation("facebook/dinov2-base", random_init=True)
    assert (large.hidden_size, large.num_hidden_layers, large.num_attention_heads) == (1024, 24, 16)
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads) == (768, 12, 12)
    assert large.patch_size == base.patch_size == 14
    with pytest.raises(PerceptionWeightsError, match="no DINOv2 config"):
        regularisers.build_foundation("my/dino", random_init=True)


def test_foundation_features_sit_on_the_latent_grid_and_stay_frozen():
    dino = tiny_dino()
    feats = dino(torch.rand(2, 3, 32, 48) * 2 - 1, (4, 6))
    assert feats.shape == (2, 16, 4, 6) and feats.dtype == torch.float32
    dino.train()
    assert not dino.training and not any(m.training for m in dino.modules())
    assert not any(p.requires_grad for p in dino.parameters())


def test_foundation_features_preprocess_as_documented_and_keep_only_the_patch_tokens():
    """A stand-in DINOv2 records its pixel_values: ImageNet-normalised [0, 1] images, antialiased bilinear to
    14·round(H/16) × 14·round(W/16); its output's leading (CLS, register) tokens are dropped, patches row-major."""
    from types import SimpleNamespace

    class Recorder(torch.nn.Module):
        config = SimpleNamespace(patch_size=14, hidden_size=2)
        dtype = torch.float32

        def forward(self, pixel_values):
            self.seen = pixel_values
            b, _, h, w = pixel_values.shape
            n = (h // 14) * (w // 14)
            patches = torch.stack([torch.arange(n).float(), -torch.arange(n).float()], -1).expand(b, n, 2)
            return SimpleNamespace(last_hidden_state=torch.cat([torch.full((b, 2, 2), 99.0), patches], 1))

    recorder = Recorder()
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    feats = FoundationFeatures(recorder)(images, (2, 3))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = torch.nn.functional.interpolate(
        ((images + 1) / 2 - mean) / std, size=(28, 42), mode="bilinear", antialias=True
    )
    torch.testing.assert_close(recorder.seen, expected)
    grid = torch.arange(6.0).view(2, 3)  # the patch index, row-major on the 2×3 patch grid
    torch.testing.assert_close(feats, torch.stack([grid, -grid]).expand(2, 2, 2, 3))


# ----------------------------------------------------------------------------------------
# gradients reach what they should train
# ----------------------------------------------------------------------------------------


def test_equivariance_gradients_reach_encoder_and_decoder(tmp_path, accelerator):
    set_seed(0)
    trainer = train_vae.Trainer(tiny_config(tmp_path, equivariance_weight=1.0, lpips_weight=0.0), accelerator)
    model = trainer.model
    x = batch()
    _, _, _, extras = model(x, EquivarianceTransform(0.5, 1))
    target, eq_recon = extras["equivariance"]
    assert target.shape == eq_recon.shape == (2, 3, 16, 16) and not target.requires_grad
    equivariance_nll(target, eq_recon, None).backward()
    grads = {n: p.grad for n, p in trainer.vae.named_parameters()}
    for name in ("encoder.conv_in.weight", "encoder.conv_out.weight", "quant_conv.weight", "decoder.conv_out.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_equivariance_step_logs_and_changes_the_gradient(tmp_path, accelerator, monkeypatch):
    cfg = tiny_config(tmp_path, equivariance_weight=1.0, equivariance_prob=1.0)
    set_seed(0)
    trainer = train_vae.Trainer(cfg, accelerator)
    grads = capture_gradients(monkeypatch, trainer)
    torch.manual_seed(7)
    _, logs, _ = trainer.generator_step(batch(), 3)
    torch.manual_seed(7)
    trainer.cfg.equivariance_prob = 0.0  # the same step without the term
    _, logs_off, _ = trainer.generator_step(batch(), 3)
    assert logs["loss/equivariance"] > 0 and logs_off["loss/equivariance"] == 0
    # The main decode's terms are untouched by the extra decode (λ still sees the main decode's conv_out input).
    for key in ("loss/l1", "loss/lpips", "loss/kl", "loss/gan", "loss/adaptive_weight"):
        assert torch.equal(logs[key], logs_off[key]), key
    assert not torch.equal(grads[0]["vae.decoder.conv_out.weight"], grads[1]["vae.decoder.conv_out.weight"])
    assert not torch.equal(grads[0]["vae.encoder.conv_in.weight"], grads[1]["vae.encoder.conv_in.weight"])


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_vf_gradients_reach_projection_and_encoder_never_dinov2(tmp_path, accelerator, monkeypatch, small_dino, mode):
    cfg = tiny_config(tmp_path, vf_weight=0.5, adaptive_weight_mode=mode)
    set_seed(0)
    trainer = train_vae.Trainer(cfg, accelerator)
    dino = trainer.loss_fn.foundation
    trainer.model.train()
    trainer.loss_fn.train()
    assert not any(m.training for m in dino.modules())
    assert trainer.vf_projection is not None and trainer.vf_projection.weight.shape == (16, 8, 1, 1)
    # The projection is trained with the autoencoder's optimizer, after the autoencoder's parameters.
    opt_params = trainer.opt_g.optimizer.param_groups[0]["params"]
    assert opt_params[-1] is trainer.vf_projection.weight and trainer.vf_projection.bias is None

    # Only the VF term, through the loss: z' and the encoder get gradients, the decoder and DINOv2 none.
    x = batch()
    *_, extras = trainer.model(x)
    z_proj = extras["latent_projection"]
    assert z_proj.shape == (2, 16, 4, 4)
    features = dino(x, (4, 4))
    value, _ = vf_loss(z_proj, features)
    value.backward()
    named = dict(trainer.model.named_parameters())
    assert named["vf_projection.weight"].grad.abs().sum() > 0
    assert named["vae.encoder.conv_in.weight"].grad.abs().sum() > 0
    assert named["vae.decoder.conv_out.weight"].grad is None
    trainer.model.zero_grad(set_to_none=True)

    grads = capture_gradients(monkeypatch, trainer)
    _, logs, ok = trainer.generator_step(x, 0)
    assert ok and logs["loss/vf"] > 0 and logs["loss/vf_adaptive_weight"] > 0
    assert grads[0]["vf_projection.weight"].abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in dino.parameters())
    assert not any(m.training for m in dino.modules())


def test_vf_adaptive_weight_is_the_gradient_norm_ratio_at_encoder_conv_out(tmp_path, accelerator, small_dino):
    """λ_vf = ‖∂nll/∂W‖ / (‖∂VF/∂W‖ + 1e-4) at encoder.conv_out, the same from the fast and the reference path."""
    values = {}
    for mode in ("fast", "reference"):
        for state in (AcceleratorState, GradientState, PartialState):
            state._reset_state()
        set_seed(0)
        trainer = train_vae.Trainer(
            tiny_config(tmp_path, vf_weight=0.5, adaptive_weight_mode=mode), Accelerator(cpu=True)
        )
        x = batch()
        torch.manual_seed(3)
        recon, mean, logvar, extras = trainer.model(x)
        w = trainer.vae.encoder.conv_out.weight
        _, logs = trainer.loss_fn.generator_loss(
            x, recon, mean, logvar, 0, encoder_last_layer=trainer.vae.encoder.conv_out, **extras
        )
        torch.manual_seed(3)
        recon, mean, logvar, extras = trainer.model(x)
        nll, _ = trainer.loss_fn._nll(x, recon)
        features = trainer.loss_fn.foundation(x, (4, 4))
        vf, _ = vf_loss(extras["latent_projection"], features)
        g_nll = torch.autograd.grad(nll, w, retain_graph=True)[0]
        g_vf = torch.autograd.grad(vf, w)[0]
        expected = g_nll.norm() / (g_vf.norm() + 1e-4)
        torch.testing.assert_close(logs["vf_adaptive_weight"], expected)
        torch.testing.assert_close(logs["vf"], vf.detach())
        values[mode] = logs["vf_adaptive_weight"]
    torch.testing.assert_close(values["fast"], values["reference"], rtol=1e-4, atol=0)


def test_equivariance_fine_tunes_a_pretrained_autoencoder(tmp_path, accelerator, monkeypatch):
    """EQ-VAE's use: --init_from a trained autoencoder, GAN on, equivariance term on; the step starts from its weights."""
    set_seed(1)
    build_vae("tiny").save_pretrained(tmp_path / "pretrained")
    pretrained = AutoencoderKL.from_pretrained(tmp_path / "pretrained")
    cfg = tiny_config(
        tmp_path, init_from=str(tmp_path / "pretrained"), equivariance_weight=1.0, equivariance_prob=1.0, disc_start=0
    )
    set_seed(0)
    trainer = train_vae.Trainer(cfg, accelerator)
    for name, p in pretrained.named_parameters():
        assert torch.equal(trainer.vae.state_dict()[name], p), name
    logs = trainer.train_step(batch(), 0)
    assert logs["loss/equivariance"] > 0 and logs["loss/gan_factor"] > 0 and logs["disc/loss"].isfinite()
    assert not torch.equal(trainer.vae.decoder.conv_out.weight, pretrained.decoder.conv_out.weight)


# ----------------------------------------------------------------------------------------
# the draw: (seed, step) alone
# ----------------------------------------------------------------------------------------


def test_transform_draw_is_a_function_of_seed_and_step():
    rng = torch.get_rng_state()
    draws = [draw_equivariance(transform_generator(0, s), 0.5, [0.5, 0.75], True) for s in range(400)]
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is never touched
    again = [draw_equivariance(transform_generator(0, s), 0.5, [0.5, 0.75], True) for s in range(400)]
    assert draws == again
    other_seed = [draw_equivariance(transform_generator(1, s), 0.5, [0.5, 0.75], True) for s in range(400)]
    assert draws != other_seed
    drawn = [d for d in draws if d is not None]
    assert 150 < len(drawn) < 250  # p = 0.5
    assert {d.scale for d in drawn} == {0.5, 0.75} and {d.quarter_turns for d in drawn} == {0, 1, 2, 3}
    assert transform_generator(0, 5, 1).initial_seed() != transform_generator(0, 5, 0).initial_seed()
    assert all(draw_equivariance(transform_generator(0, s), 0.0, [0.5], True) is None for s in range(50))
    # Rotation only: never the identity.
    rot = [draw_equivariance(transform_generator(0, s), 1.0, [], True) for s in range(50)]
    assert {d.quarter_turns for d in rot} == {1, 2, 3} and {d.scale for d in rot} == {1.0}
    no_rot = [draw_equivariance(transform_generator(0, s), 1.0, [0.5], False) for s in range(20)]
    assert {d.quarter_turns for d in no_rot} == {0}


def test_trainer_draws_from_its_seed_and_step(tmp_path, accelerator):
    set_seed(0)
    trainer = train_vae.Trainer(tiny_config(tmp_path, equivariance_weight=1.0, seed=4), accelerator)
    for step in range(10):
        expected = draw_equivariance(transform_generator(4, step), 0.5, [0.5, 0.75], True)
        assert train_vae.equivariance_transform(trainer.cfg, step) == expected


# ----------------------------------------------------------------------------------------
# --equivariance_mode eqvae: EQ-VAE's own scheme (zelaki/eqvae, AutoencoderKL.training_step)
# ----------------------------------------------------------------------------------------


def test_eqvae_draw_is_the_reference_distribution():
    rng = torch.get_rng_state()
    draws = [regularisers.draw_eqvae(transform_generator(0, s), 0.5, 0.25) for s in range(2000)]
    assert torch.equal(torch.get_rng_state(), rng)
    assert draws == [regularisers.draw_eqvae(transform_generator(0, s), 0.5, 0.25) for s in range(2000)]
    transformed = [d.transform for d in draws if d.transform is not None]
    assert 900 < len(transformed) < 1100  # p = 0.5 replaces the step's pair
    assert {t.quarter_turns for t in transformed} == {1, 2, 3}  # a rotation always
    assert {t.scale for t in transformed} == set(regularisers.EQVAE_SCALES)  # 8/32 .. 31/32, uniform
    assert min(regularisers.EQVAE_SCALES) == 0.25 and max(regularisers.EQVAE_SCALES) == 31 / 32
    assert len(regularisers.EQVAE_SCALES) == 24 and not any(t.antialias for t in transformed)
    rest = [d for d in draws if d.transform is None]
    low_res = [d for d in rest if d.input_scale != 1.0]
    assert 0.2 < len(low_res) / len(rest) < 0.3  # prior preservation at low resolution, p_prior_s = 0.25
    assert {d.input_scale for d in low_res} == set(regularisers.EQVAE_SCALES)
    assert all(
        regularisers.draw_eqvae(transform_generator(0, s), 0.0, 0.0) == regularisers.EqvaeDraw() for s in range(50)
    )


@pytest.mark.parametrize("k", [8, 13, 24, 31])
def test_eqvae_resizes_are_the_references_bilinear_at_256(k):
    """At 256² (latent 32², factor 8) every EQ-VAE scale s = k/32 gives whole sizes, and the pair equals the
    reference's F.interpolate(scale_factor=s, mode="bilinear", align_corners=False) then rot90."""
    s = k / 32
    x, z = torch.rand(1, 3, 256, 256) * 2 - 1, torch.randn(1, 4, 32, 32)

    def reference(t, turns):
        t = torch.nn.functional.interpolate(t, scale_factor=s, mode="bilinear", align_corners=False)
        return torch.rot90(t, turns, dims=(-2, -1))

    tz, tx = EquivarianceTransform(s, 3, antialias=False).apply(z, x)
    assert tz.shape[-2:] == (k, k) and tx.shape[-2:] == (8 * k, 8 * k)
    torch.testing.assert_close(tz, reference(z, 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(tx, reference(x, 3), rtol=0, atol=1e-6)
    low = regularisers.EqvaeDraw(input_scale=s).input(x, 8)
    torch.testing.assert_close(low, reference(x, 0), rtol=0, atol=1e-6)
    # Antialiasing (the additive mode's) differs from it: the flag is what makes the pair EQ-VAE's.
    assert not torch.allclose(EquivarianceTransform(s, 3).apply(z, x)[1], tx, atol=1e-3)


def eqvae_steps(cfg, kind: str, count: int = 1) -> list[int]:
    """The first steps whose draw is of `kind` (transformed / low_res / plain)."""
    found = []
    for step in range(200):
        d = train_vae.eqvae_draw(cfg, step)
        got = "transformed" if d.transform is not None else "low_res" if d.input_scale != 1 else "plain"
        if got == kind:
            found.append(step)
        if len(found) == count:
            return found
    raise AssertionError(kind)


def test_eqvae_step_replaces_the_pair_and_keeps_the_kl_of_x(tmp_path, accelerator, monkeypatch):
    """A transformed step's loss is the whole loss of (T(x), decode(T(z))) (L1 here; KL of x's own posterior);
    a low-resolution step's is that of the downscaled x; a plain step is the recipe's step, bit for bit."""
    cfg = tiny_config(tmp_path, equivariance_mode="eqvae", lpips_weight=0.0, gan_weight=0.0)
    set_seed(0)
    trainer = train_vae.Trainer(cfg, accelerator)
    vae, x = trainer.vae, batch()
    capture_gradients(monkeypatch, trainer)
    for kind in ("transformed", "low_res"):
        step = eqvae_steps(cfg, kind)[0]
        draw = train_vae.eqvae_draw(cfg, step)
        torch.manual_seed(7)
        (target, recon), logs, _ = trainer.generator_step(x, step)
        torch.manual_seed(7)
        with torch.no_grad():
            posterior = vae.encode(draw.input(x, 8)).latent_dist
            z = posterior.sample()
            expected_target = draw.input(x, 8)
            if draw.transform is not None:
                z, expected_target = draw.transform.apply(z, x)
            expected_recon = vae.decode(z).sample
        assert torch.equal(target, expected_target) and torch.equal(recon, expected_recon), kind
        l1 = (expected_target - expected_recon).abs().sum() / 2 / expected_target[0].numel()
        torch.testing.assert_close(logs["loss/l1"], l1)
        kl = 0.5 * (posterior.mean**2 + posterior.logvar.exp() - 1 - posterior.logvar).sum() / 2
        torch.testing.assert_close(logs["loss/kl"], kl)  # the KL of the (possibly downscaled) x, never of T
        assert logs["eqvae/transformed"].item() == float(kind == "transformed")
        scale = draw.transform.scale if draw.transform is not None else draw.input_scale
        assert logs["eqvae/scale"].item() == scale and scale < 1
    step = eqvae_steps(cfg, "plain")[0]
    torch.manual_seed(7)
    (target, _), logs, _ = trainer.generator_step(x, step)
    trainer.cfg.equivariance_mode = "additive"
    torch.manual_seed(7)
    _, plain_logs, _ = trainer.generator_step(x, step)
    assert target is x and logs.pop("eqvae/transformed") == 0 and logs.pop("eqvae/scale") == 1
    assert logs.keys() == plain_logs.keys() and all(torch.equal(logs[k], plain_logs[k]) for k in logs)


def test_eqvae_discriminator_trains_on_the_transformed_pair(tmp_path, accelerator, monkeypatch):
    cfg = tiny_config(tmp_path, equivariance_mode="eqvae", lpips_weight=0.0, resolution=96)
    set_seed(0)
    trainer = train_vae.Trainer(cfg, accelerator)
    seen = []
    monkeypatch.setattr(trainer, "discriminator_step", lambda t, r, step: seen.append((t, r)) or ({}, True))
    x = torch.rand(2, 3, 96, 96) * 2 - 1
    for step in eqvae_steps(cfg, "transformed") + eqvae_steps(cfg, "low_res"):
        draw = train_vae.eqvae_draw(cfg, step)
        logs = trainer.train_step(x, step)
        assert logs["loss/gan"].isfinite() and logs["loss/gan"] != 0
        scale = draw.transform.scale if draw.transform is not None else draw.input_scale
        side = 8 * round(12 * scale)  # latent 12² at 96², factor 8
        target, recon = seen[-1]
        assert target.shape == recon.shape == (2, 3, side, side) and side < 96
        if draw.transform is not None:
            torch.testing.assert_close(target, draw.transform.apply(torch.zeros(2, 4, 12, 12), x)[1])


def test_eqvae_flags_are_checked():
    assert TrainConfig().equivariance_mode == "additive"  # default unchanged
    TrainConfig(equivariance_mode="eqvae", resolution=96).check()
    for bad, match in (
        (dict(equivariance_weight=1.0), "has no weight"),
        (dict(vf_weight=0.1, resolution=96), "does not combine with --vf_weight"),
        (dict(resolution=64), "below the smallest input"),
    ):
        with pytest.raises(ConfigError, match=match):
            TrainConfig(equivariance_mode="eqvae", **bad).check()
    with pytest.raises(SystemExit):  # argparse's one line: invalid choice
        parse_config(TrainConfig, ["--equivariance_mode", "eq"], "train_vae.py")


def test_eqvae_with_the_demos_small_crops_is_refused_before_any_model(tmp_path, monkeypatch, capsys):
    """The demo's defaults (64² crops, GAN on) are applied after parsing; the check sees them too."""
    monkeypatch.setattr(train_vae, "build_accelerator", lambda cfg: pytest.fail("went past the flag check"))
    with pytest.raises(SystemExit) as exit_info:
        train_vae.main(["--equivariance_mode", "eqvae", "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train_vae.py: error: --equivariance_mode eqvae downscales images to 1/4 (16 px")


# ----------------------------------------------------------------------------------------
# --latent_noise_aug: the decoder trained on noised latents
# ----------------------------------------------------------------------------------------


def test_latent_noise_is_uniform_sigma_times_the_batch_std():
    z = torch.randn(3, 4, 8, 8) * 2.5 + 1.0
    torch.manual_seed(5)
    noised = regularisers.add_latent_noise(z, 0.8)
    torch.manual_seed(5)
    sigma = torch.rand(3, 1, 1, 1) * 0.8  # per image, U[0, σ_max]
    eps = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(noised, z + sigma * z.std() * eps)  # in units of the batch's latent std
    # Per image, the added noise's std / std(z) is that image's σ: within [0, σ_max], and not all alike.
    torch.manual_seed(0)
    z = torch.randn(64, 4, 16, 16) * 3.0
    ratio = (regularisers.add_latent_noise(z, 0.5) - z).flatten(1).std(1) / z.std()
    assert ratio.max() < 0.55 and ratio.min() < 0.1 and ratio.max() > 0.4
    zg = z[:2].clone().requires_grad_(True)
    regularisers.add_latent_noise(zg, 0.5).sum().backward()
    assert torch.equal(zg.grad, torch.ones_like(zg))  # the scale is detached: d(noised)/dz = 1


def test_latent_noise_aug_trains_the_decoder_on_noised_latents(tmp_path, accelerator, monkeypatch):
    """On: the decoder's input is z + noise (its std within σ_max·std(z) per image), the loss and gradients
    change; off (the default), nothing is drawn (the bit-identity test above forbids add_latent_noise)."""
    cfg = tiny_config(tmp_path, latent_noise_aug=0.5)
    set_seed(0)
    trainer = train_vae.Trainer(cfg, accelerator)
    assert TrainConfig().latent_noise_aug == 0 and trainer.model.latent_noise_aug == 0.5
    seen = []
    hook = trainer.vae.post_quant_conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    grads = capture_gradients(monkeypatch, trainer)
    x = batch()
    torch.manual_seed(7)
    _, logs, _ = trainer.generator_step(x, 3)
    torch.manual_seed(7)
    posterior = trainer.vae.encode(x).latent_dist
    z = posterior.sample()
    trainer.model.latent_noise_aug = 0.0
    torch.manual_seed(7)
    _, logs_off, _ = trainer.generator_step(x, 3)
    hook.remove()
    noised, clean = seen[0], seen[-1]
    torch.testing.assert_close(clean, z.detach())  # off: the sampled z itself
    per_image = (noised - clean).flatten(1).std(1) / clean.std()
    assert (per_image > 0).all() and (per_image < 0.5).all()
    assert torch.equal(logs["loss/kl"], logs_off["loss/kl"])  # the posterior is the same
    assert not torch.equal(logs["loss/l1"], logs_off["loss/l1"])
    assert not torch.equal(grads[0]["vae.decoder.conv_in.weight"], grads[1]["vae.decoder.conv_in.weight"])
    assert grads[0]["vae.encoder.conv_in.weight"].abs().sum() > 0


# ----------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------


def test_vf_projection_is_checkpointed_and_a_changed_vf_setting_is_refused(tmp_path):
    proj = regularisers.build_vf_projection(4, 8)
    checkpointing.save_vf_projection(proj, str(tmp_path))
    other = regularisers.build_vf_projection(4, 8)
    checkpointing.load_vf_projection(other, str(tmp_path))
    assert torch.equal(other.weight, proj.weight) and proj.bias is None
    with pytest.raises(CheckpointError, match="with the VF loss"):
        checkpointing.load_vf_projection(None, str(tmp_path))
    os.remove(tmp_path / checkpointing.VF_PROJECTION_FILE)
    with pytest.raises(CheckpointError, match="without the VF loss"):
        checkpointing.load_vf_projection(other, str(tmp_path))
    checkpointing.load_vf_projection(None, str(tmp_path))  # off and absent: nothing to do
    # A projection saved with a bias (before it was bias-free): one line, not a state-dict traceback.
    checkpointing.save_vf_projection(torch.nn.Conv2d(4, 8, 1), str(tmp_path))
    with pytest.raises(CheckpointError, match="with a bias"):
        checkpointing.load_vf_projection(other, str(tmp_path))


@pytest.mark.e2e
def test_resume_equals_uninterrupted_run_with_equivariance(image_folder, tmp_path, tiny_args, run_main, tensors_of):
    """6 steps in one go == 4 steps, resume, 2 steps, with the equivariance term drawn on most steps."""
    extra = dict(equivariance_weight=1.0, equivariance_prob=0.75)
    run_main(tiny_args(image_folder, tmp_path / "a", 6, **extra))
    run_main(tiny_args(image_folder, tmp_path / "b", 4, **extra))
    run_main(tiny_args(image_folder, tmp_path / "b", 6, resume_from_checkpoint="latest", **extra))
    ta, tb = tensors_of(tmp_path / "a" / "checkpoint-6"), tensors_of(tmp_path / "b" / "checkpoint-6")
    assert ta.keys() == tb.keys() and len(ta) > 100
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    logged = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    eq = [row["loss/equivariance"] for row in logged if "loss/equivariance" in row]
    assert len(eq) == 6 and any(v > 0 for v in eq)
    resumed = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss/equivariance") for r in resumed if "loss/equivariance" in r] == eq


@pytest.mark.e2e
def test_resume_equals_uninterrupted_run_with_vf(image_folder, tmp_path, tiny_args, run_main, small_dino):
    """The projection is saved in each checkpoint and restored on resume (else the runs part); never exported."""
    extra = dict(vf_weight=0.5)
    run_main(tiny_args(image_folder, tmp_path / "a", 4, **extra))
    run_main(tiny_args(image_folder, tmp_path / "b", 2, **extra))
    run_main(tiny_args(image_folder, tmp_path / "b", 4, resume_from_checkpoint="latest", **extra))
    pa, pb = (load_file(tmp_path / r / "checkpoint-4" / checkpointing.VF_PROJECTION_FILE) for r in ("a", "b"))
    p2 = load_file(tmp_path / "b" / "checkpoint-2" / checkpointing.VF_PROJECTION_FILE)
    assert not torch.equal(p2["weight"], pa["weight"])  # it trains
    for key in pa:
        assert torch.equal(pa[key], pb[key]), key
    va, vb = (load_file(tmp_path / r / "checkpoint-4" / "vae" / "diffusion_pytorch_model.safetensors") for r in "ab")
    for key in va:
        assert torch.equal(va[key], vb[key]), key
    exported = load_file(tmp_path / "a" / "diffusion_pytorch_model.safetensors")
    assert not [k for k in exported if "vf" in k or "projection" in k]
    assert not (tmp_path / "a" / checkpointing.VF_PROJECTION_FILE).exists()


@pytest.mark.e2e
def test_two_process_ddp_run_with_both_regularisers(image_folder, tmp_path, tiny_args, two_rank_launch, repo_root):
    """Real 2-rank DDP on CPU (gloo) with T(z) decoded and z projected in the one DDP forward: every gradient
    (the projection's too) is synced, so the replicas stay identical; the projection goes in the checkpoints."""
    out = tmp_path / "ddp"
    argv = tiny_args(image_folder, out, 4, disc_start=2, equivariance_weight=1.0, equivariance_prob=1.0, vf_weight=0.5)
    cmd, env = two_rank_launch(argv, port=29617)
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in (2, 4):
        assert f"weights identical across 2 ranks at step {step}" in proc.stderr
        assert (out / f"checkpoint-{step}" / checkpointing.VF_PROJECTION_FILE).is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss/equivariance"] > 0 and r["loss/vf"] > 0 for r in rows if "loss/total" in r)


@pytest.mark.e2e
def test_torch_compile_with_vf_takes_its_weight_through_the_compiled_model(tmp_path, monkeypatch, small_dino):
    """--torch_compile with --vf_weight > 0: λ_vf's two retain_graph autograd.grad go back through the compiled
    model's graph (AOTAutograd) before the step's own backward. Compiled here with backend "aot_eager" (dynamo's
    capture and AOTAutograd's joint graph, eager kernels: inductor's C++ build takes minutes on this CPU): the step
    equals eager's."""
    runs, compile_ = {}, torch.compile
    for compiled in (False, True):
        for state in (AcceleratorState, GradientState, PartialState):
            state._reset_state()
        if compiled:
            monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend="aot_eager"))
        cfg = tiny_config(tmp_path / str(compiled), vf_weight=0.5, torch_compile=compiled)
        set_seed(0)
        trainer = train_vae.Trainer(cfg, Accelerator(cpu=True))
        assert hasattr(trainer.model, "_orig_mod") == compiled
        torch.manual_seed(1)
        logs = trainer.train_step(batch(0), step=0)
        assert trainer.state.skipped_g_steps == 0
        named = trainer.model.named_parameters()
        runs[compiled] = logs, {n.removeprefix("_orig_mod."): p.detach().clone() for n, p in named}
    (eager_logs, eager_weights), (logs, weights) = runs[False], runs[True]
    assert eager_logs["loss/vf_adaptive_weight"] > 0
    for key in ("loss/total", "loss/vf", "loss/vf_adaptive_weight", "loss/adaptive_weight"):
        torch.testing.assert_close(logs[key], eager_logs[key], rtol=1e-4, atol=0, msg=key)
    for name, value in eager_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.e2e
def test_equivariance_transforms_do_not_recompile_the_compiled_model(monkeypatch):
    """Under --torch_compile each drawn (scale, quarter_turns) used to be a graph of its own (and dynamo stops
    compiling after 8): the transform now runs outside the graphs, which differ only by T(z)'s shape (one dynamic
    graph once a second shape is seen). Counted with a backend that records each graph, recompile limit raised."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 64)
    torch._dynamo.reset()
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch.manual_seed(0)
    model = torch.compile(train_vae.VAEForTraining(build_vae("tiny", latent_channels=8)), backend=backend)
    draws = [EquivarianceTransform(s, k) for s in (1.0, 0.5) for k in range(4) if (s, k) != (1.0, 0)]
    x = batch()
    for transform in [None, *draws]:
        model(x, transform)
    first_pass = len(graphs)
    for transform in draws[::3]:
        model(x, transform)
    assert len(graphs) == first_pass, "a transform seen before compiled again"
    assert first_pass < len(draws), f"{first_pass} graphs for {len(draws)} transforms: one per transform"
    torch._dynamo.reset()
