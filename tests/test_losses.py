"""Tests of losses/: each term against its formula, the fast adaptive-weight path against the direct one,
gradient isolation between G, D and the frozen nets, and the weight loaders on files written here.

Offline and CPU only: random-trunk LPIPS, random MoCo, tiny AutoencoderKL at 32².
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import types

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from losses import (
    LPIPS,
    MOCO_V2_800EP_URL,
    IdentityLoss,
    NLayerDiscriminator,
    PerceptionWeightsError,
    TransfusionLoss,
    adaptive_weight,
    build_identity_loss,
    build_lpips,
    build_moco_encoder,
    conv_weight_grad,
    gan_ramp,
    generator_adv_loss,
    hinge_d_loss,
    kl_loss,
    lecam_reg,
    load_moco,
    reconstruction_nll,
)
from losses import identity as identity_module
from losses import perceptual as perceptual_module
from losses import vae_loss as vae_loss_module
from losses import weights as weights_module
from losses.vae_loss import LeCamEMA, _as_conv

# ----------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lpips_random() -> LPIPS:
    return build_lpips(pretrained=False)


@pytest.fixture(scope="module")
def moco_random() -> IdentityLoss:
    torch.manual_seed(0)
    return build_identity_loss(random_init=True)


@pytest.fixture(scope="module")
def moco_small(moco_random) -> IdentityLoss:
    """The random MoCo at 64² instead of 224²: ~12× cheaper where the resize size is not the point."""
    return IdentityLoss(moco_random.encoder, size=64)


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=8,
        norm_num_groups=8,
        layers_per_block=1,
    )


def images(batch=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def autoencode(vae, x, seed=1):
    """Encode, sample, decode with a fixed sampling seed; returns (x̂, mean, logvar, conv_out input)."""
    captured = {}
    hook = vae.decoder.conv_out.register_forward_hook(lambda m, args, out: captured.__setitem__("input", args[0]))
    try:
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=torch.Generator().manual_seed(seed))
        reconstructions = vae.decode(z).sample
    finally:
        hook.remove()
    return reconstructions, posterior.mean, posterior.logvar, captured["input"]


class CountingDiscriminator(NLayerDiscriminator):
    calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


# ----------------------------------------------------------------------------- pure terms


def test_reconstruction_nll_matches_hand_computation():
    x = torch.zeros(2, 1, 1, 2)
    xr = torch.tensor([[[[1.0, -2.0]]], [[[3.0, 0.0]]]])
    lpips_b = torch.tensor([0.1, 0.3])
    id_value = torch.tensor(0.5)
    # Σ|x − x̂| = 6 → /B = 3; LPIPS broadcast over C·H·W = 2 pixels: (0.1 + 0.3)·2 / 2 = 0.4; ID: 0.5·2 = 1.
    nll, parts = reconstruction_nll(x, xr, lpips_b, id_value)
    assert nll.item() == pytest.approx(3 + 0.4 + 0.2 * 1)
    assert parts["l1"].item() == pytest.approx(3)
    assert parts["lpips"].item() == pytest.approx(0.4)
    assert parts["id"].item() == pytest.approx(1)
    nll, _ = reconstruction_nll(x, xr, lpips_b, id_value, l1_weight=2.0, lpips_weight=0.5, id_weight=0.1)
    assert nll.item() == pytest.approx(6 + 0.2 + 0.1)
    nll, parts = reconstruction_nll(x, xr)
    assert nll.item() == pytest.approx(3) and parts["lpips"].item() == 0 and parts["id"].item() == 0


def test_reconstruction_nll_gradient_is_sign_over_batch():
    x = torch.zeros(2, 1, 1, 2)
    xr = torch.tensor([[[[1.0, -2.0]]], [[[3.0, -0.5]]]], requires_grad=True)
    nll, _ = reconstruction_nll(x, xr)
    nll.backward()
    torch.testing.assert_close(xr.grad, torch.sign(xr.detach()) / 2)


def test_kl_loss_closed_form_by_hand():
    mean = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(2, 2, 1, 1)
    logvar = torch.tensor([[0.0, math.log(4.0)], [0.0, 0.0]]).view(2, 2, 1, 1)
    # sample 0: 0.5·[(1 + 1 − 1 − 0) + (0 + 4 − 1 − ln 4)]; sample 1: 0.
    expected = 0.5 * (1 + 3 - math.log(4.0)) / 2
    assert kl_loss(mean, logvar).item() == pytest.approx(expected, rel=1e-6)


def test_kl_loss_clamps_logvar_and_matches_torch_distributions():
    big = kl_loss(torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 50.0))
    assert big.item() == pytest.approx(0.5 * (math.exp(20) - 1 - 20), rel=1e-5)
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1).mean()
    torch.testing.assert_close(kl_loss(mean, logvar), expected)


def test_hinge_and_generator_terms():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 − real) = [0, 0.5, 2] → 5/6; relu(1 + fake) = [0, 1, 2] → 1.
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert generator_adv_loss(fake).item() == pytest.approx(1 / 3)


def test_adaptive_weight_is_ratio_of_gradient_norms():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=g).requires_grad_()
    a, b = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    nll = (w * a).pow(2).sum()
    gan = (w * b).sin().sum()
    nll_grad = torch.autograd.grad(nll, w)[0]
    gan_grad = torch.autograd.grad(gan, w)[0]
    expected = nll_grad.norm().item() / (gan_grad.norm().item() + 1e-4)
    lam = adaptive_weight(nll_grad, gan_grad)
    assert lam.item() == pytest.approx(expected, rel=1e-5)
    assert not lam.requires_grad
    # clamped at max_value, and eps keeps a vanishing GAN gradient finite
    assert adaptive_weight(nll_grad, gan_grad, max_value=1e-3).item() == pytest.approx(1e-3)
    assert adaptive_weight(torch.ones(4), torch.zeros(4)).item() == pytest.approx(1e4)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=4, stride=2, padding=1, bias=False),
        dict(kernel_size=3, padding=2, dilation=2, groups=2),
        dict(kernel_size=3, padding=1, padding_mode="reflect"),
    ],
)
def test_conv_weight_grad_equals_autograd(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **kwargs)
    x = torch.randn(2, 4, 9, 9)
    out = conv(x)
    upstream = torch.randn_like(out)
    expected = torch.autograd.grad(out, conv.weight, upstream)[0]
    torch.testing.assert_close(conv_weight_grad(x, conv, upstream), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_conv_weight_grad_upcasts_a_low_precision_input_chunk_by_chunk(padding_mode, monkeypatch):
    """A bf16 input (decoder.conv_out's under autocast) is upcast at most `chunk_bytes` at a time: the float32
    copies made are of one image here, never of the batch, and the gradient equals the float32 one of the
    whole batch at once."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3, padding=1, padding_mode=padding_mode)
    x = torch.randn(5, 4, 9, 9).bfloat16()
    upstream = torch.randn(5, 3, 9, 9)
    expected = torch.autograd.grad(conv(x.float()), conv.weight, upstream)[0]
    shapes, original = [], torch.nn.grad.conv2d_weight

    def spy(inputs, *args, **kwargs):
        shapes.append(tuple(inputs.shape))
        return original(inputs, *args, **kwargs)

    monkeypatch.setattr(torch.nn.grad, "conv2d_weight", spy)
    one_image = 4 * 4 * 9 * 9  # float32 bytes
    got = conv_weight_grad(x, conv, upstream, chunk_bytes=one_image)
    assert len(shapes) == 5 and all(shape[0] == 1 for shape in shapes)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    shapes.clear()
    torch.testing.assert_close(conv_weight_grad(x, conv, upstream, chunk_bytes=2 * one_image), expected)
    assert [shape[0] for shape in shapes] == [2, 2, 1]


def test_bare_weight_is_taken_as_same_padding_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 3, 3, padding=1)
    x, upstream = torch.randn(1, 8, 5, 5), torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(
        conv_weight_grad(x, _as_conv(conv.weight), upstream), conv_weight_grad(x, conv, upstream)
    )


def test_gan_ramp():
    assert gan_ramp(9, 10, 0) == 0.0
    assert gan_ramp(10, 10, 0) == 1.0
    assert gan_ramp(10, 10, 4) == 0.0
    assert gan_ramp(11, 10, 4) == 0.25
    assert gan_ramp(14, 10, 4) == 1.0
    assert gan_ramp(100, 10, 4) == 1.0


def test_lecam_reg_by_hand():
    real = torch.tensor([1.0, -1.0, 3.0])
    fake = torch.tensor([0.0, -2.0])
    ema_real, ema_fake = torch.tensor(0.5), torch.tensor(0.0)
    # relu(real − 0)² = [1, 0, 9] → 10/3; relu(0.5 − fake)² = [0.25, 6.25] → 3.25
    assert lecam_reg(real, fake, ema_real, ema_fake).item() == pytest.approx(10 / 3 + 3.25)


def test_lecam_ema_is_zero_debiased():
    ema = LeCamEMA(decay=0.9)
    ema.update(torch.tensor(2.0), torch.tensor(-1.0))
    real, fake = ema.values()
    assert real.item() == pytest.approx(2.0) and fake.item() == pytest.approx(-1.0)
    ema.update(torch.tensor(4.0), torch.tensor(1.0))
    real, _ = ema.values()
    assert real.item() == pytest.approx((0.9 * 0.1 * 2 + 0.1 * 4) / (1 - 0.81))
    assert set(ema.state_dict()) == {"biased_real", "biased_fake", "steps"}


# ----------------------------------------------------------------------------- discriminator


def test_discriminator_shape_and_init():
    torch.manual_seed(0)
    d = NLayerDiscriminator()
    with torch.no_grad():
        assert d(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 64, 2),
        (64, 128, 2),
        (128, 256, 2),
        (256, 512, 1),
        (512, 1, 1),
    ]
    assert [c.bias is None for c in convs] == [False, True, True, True, False]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    assert [n.num_features for n in norms] == [128, 256, 512]
    weights = torch.cat([c.weight.flatten() for c in convs[1:4]])
    assert weights.mean().abs() < 1e-3 and weights.std().item() == pytest.approx(0.02, rel=0.02)
    bn = torch.cat([n.weight for n in norms])
    assert bn.mean().item() == pytest.approx(1.0, abs=3e-3) and bn.std().item() == pytest.approx(0.02, rel=0.15)
    assert all(n.bias.abs().max() == 0 for n in norms)
    slopes = {m.negative_slope for m in d.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.2}


# ----------------------------------------------------------------------------- the loss module


def test_fast_path_matches_direct_path(lpips_random, moco_random):
    vae = tiny_vae()
    torch.manual_seed(0)
    loss_fn = TransfusionLoss(disc_start=0, gan_ramp_steps=4, perceptual=lpips_random, identity=moco_random)
    x = images()
    step = 2  # ramp 0.5: gan_factor 0.25

    def run(fast: bool):
        vae.zero_grad(set_to_none=True)
        loss_fn.discriminator.zero_grad(set_to_none=True)
        reconstructions, mean, logvar, conv_in = autoencode(vae, x)
        loss, logs = loss_fn.generator_loss(
            x,
            reconstructions,
            mean,
            logvar,
            step,
            last_layer_weight=vae.decoder.conv_out if fast else vae.decoder.conv_out.weight,
            last_layer_input=conv_in if fast else None,
        )
        loss.backward()
        # D's parameters require grad here on purpose: the G loss must still leave them untouched.
        assert all(p.requires_grad and p.grad is None for p in loss_fn.discriminator.parameters())
        return loss.detach(), logs, {n: p.grad.clone() for n, p in vae.named_parameters()}

    loss_a, logs_a, grads_a = run(fast=False)
    loss_b, logs_b, grads_b = run(fast=True)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    for key in logs_a:
        torch.testing.assert_close(logs_b[key], logs_a[key], rtol=1e-5, atol=0, msg=key)
    assert logs_a["gan_factor"].item() == pytest.approx(0.25)
    assert logs_a["adaptive_weight"].item() > 0 and logs_a["id"].item() > 0 and logs_a["lpips"].item() > 0
    scale = max(g.abs().max() for g in grads_a.values())
    assert set(grads_a) == set(grads_b)
    for name in grads_a:
        # atol covers parameters whose true gradient is 0 (attention key biases): rounding noise only.
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6 * scale, msg=name)
    # the perception nets never get gradients
    assert all(p.grad is None for p in lpips_random.parameters())
    assert all(p.grad is None for p in moco_random.parameters())


def test_total_is_nll_plus_weighted_kl_and_gan():
    vae = tiny_vae()
    loss_fn = TransfusionLoss(lpips_weight=0, id_weight=0, disc_start=0, kl_weight=1e-3)
    x = images()
    reconstructions, mean, logvar, conv_in = autoencode(vae, x)
    loss, logs = loss_fn.generator_loss(
        x, reconstructions, mean, logvar, 5, last_layer_weight=vae.decoder.conv_out, last_layer_input=conv_in
    )
    expected = logs["nll"] + 1e-3 * logs["kl"] + 0.5 * logs["adaptive_weight"] * logs["gan"]
    torch.testing.assert_close(loss.detach(), expected)
    torch.testing.assert_close(logs["l1"], (x - reconstructions).abs().mean().detach())
    torch.testing.assert_close(logs["kl"], kl_loss(mean, logvar).detach())
    assert loss_fn.perceptual is None and loss_fn.identity is None
    assert all(v.dim() == 0 and not v.requires_grad and v.dtype == torch.float32 for v in logs.values())
    assert set(logs) >= {"total", "nll", "l1", "lpips", "id", "kl", "gan", "adaptive_weight", "gan_factor"}


@pytest.mark.parametrize("fast", [False, True])
def test_gan_off_before_disc_start_calls_no_discriminator(fast):
    vae = tiny_vae()
    disc = CountingDiscriminator()
    loss_fn = TransfusionLoss(lpips_weight=0, id_weight=0, disc_start=10, discriminator=disc)
    x = images()
    reconstructions, mean, logvar, conv_in = autoencode(vae, x)
    loss, logs = loss_fn.generator_loss(
        x,
        reconstructions,
        mean,
        logvar,
        9,
        last_layer_weight=vae.decoder.conv_out,
        last_layer_input=conv_in if fast else None,
    )
    d_loss, d_logs = loss_fn.discriminator_loss(x, reconstructions, 9)
    assert disc.calls == 0
    assert logs["gan"].item() == 0 and logs["adaptive_weight"].item() == 0 and logs["gan_factor"].item() == 0
    torch.testing.assert_close(loss.detach(), logs["nll"] + 1e-6 * logs["kl"])
    assert d_loss.item() == 0 and d_logs["loss"].item() == 0
    loss_fn.discriminator_loss(x, reconstructions, 10)
    assert disc.calls == 2  # real and fake in separate calls


def test_discriminator_step_grads_only_discriminator():
    vae = tiny_vae()
    torch.manual_seed(0)
    loss_fn = TransfusionLoss(lpips_weight=0, id_weight=0, disc_start=0)
    x = images()
    reconstructions, _, _, _ = autoencode(vae, x)
    loss, logs = loss_fn.discriminator_loss(x, reconstructions, 0)
    loss.backward()
    assert all(p.grad is None for p in vae.parameters())
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())
    with torch.no_grad():
        real, fake = loss_fn.discriminator(x), loss_fn.discriminator(reconstructions)
    torch.testing.assert_close(logs["loss"], hinge_d_loss(real, fake))
    torch.testing.assert_close(logs["logits_real"], real.mean())
    assert logs["lecam"].item() == 0


def test_discriminator_loss_with_lecam():
    torch.manual_seed(0)
    loss_fn = TransfusionLoss(lpips_weight=0, id_weight=0, disc_start=0, lecam_weight=0.3, lecam_decay=0.9)
    loss_fn.discriminator.eval()  # eval BN: the recomputation below sees the same logits
    x, xr = images(seed=0), images(seed=1)
    loss, logs = loss_fn.discriminator_loss(x, xr, 0)
    with torch.no_grad():
        real, fake = loss_fn.discriminator(x), loss_fn.discriminator(xr)
    # after the first update the debiased EMAs equal this step's mean logits
    reg = lecam_reg(real, fake, real.mean(), fake.mean())
    torch.testing.assert_close(logs["lecam"], reg)
    torch.testing.assert_close(loss.detach(), hinge_d_loss(real, fake) + 0.3 * reg)
    assert loss_fn.lecam.steps.item() == 1
    loss_fn.discriminator_loss(x, xr, 0)
    assert loss_fn.lecam.steps.item() == 2


def test_frozen_nets_stay_eval_and_deterministic(lpips_random, moco_small):
    moco_random = moco_small
    loss_fn = TransfusionLoss(perceptual=lpips_random, identity=moco_small)
    loss_fn.train()
    assert loss_fn.training and loss_fn.discriminator.training
    for net in (loss_fn.perceptual, loss_fn.identity):
        assert not any(m.training for m in net.modules())
        assert not any(p.requires_grad for p in net.parameters())
    dropouts = [m for m in lpips_random.modules() if isinstance(m, nn.Dropout)]
    assert dropouts, "lpips should carry dropout layers (p 0.5) that eval mode switches off"
    x, xr = images(seed=0), images(seed=1)
    torch.testing.assert_close(lpips_random(x, xr), lpips_random(x, xr), rtol=0, atol=0)
    bn = moco_random.encoder.bn1
    before = bn.running_mean.clone()
    first, second = moco_random(x[:1], xr[:1]), moco_random(x[:1], xr[:1])
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_mean, before, rtol=0, atol=0)
    lpips_random.train()
    moco_random.train(True)
    assert not lpips_random.training and not moco_random.training


def test_generator_loss_without_autograd_has_zero_lambda():
    vae = tiny_vae()
    loss_fn = TransfusionLoss(lpips_weight=0, id_weight=0, disc_start=0)
    x = images()
    with torch.no_grad():
        reconstructions, mean, logvar, conv_in = autoencode(vae, x)
        loss, logs = loss_fn.generator_loss(
            x, reconstructions, mean, logvar, 3, last_layer_weight=vae.decoder.conv_out, last_layer_input=conv_in
        )
    assert logs["adaptive_weight"].item() == 0 and logs["gan"].item() != 0
    torch.testing.assert_close(loss, logs["nll"] + 1e-6 * logs["kl"])


def test_rejects_bad_options():
    with pytest.raises(ValueError, match="perception_weights"):
        TransfusionLoss(perception_weights="imagenet")
    with pytest.raises(ValueError, match="negative"):
        TransfusionLoss(lpips_weight=0, id_weight=0, gan_weight=-1)


# ----------------------------------------------------------------------------- fp16 loss scaling of λ


GRAD_SCALES = [None, 1.0, torch.ones(1), 2.0**16, torch.full((1,), 2.0**16)]


def test_grad_scale_leaves_float32_results_bit_identical(lpips_random):
    """In float32 nothing underflows, and scaling by a power of two is exact: every grad_scale must give
    today's loss, logs and autoencoder gradients to the bit, on both paths; the direct path is also
    checked against the recipe's formula written out here."""
    vae = tiny_vae()
    torch.manual_seed(0)
    loss_fn = TransfusionLoss(disc_start=0, gan_ramp_steps=4, id_weight=0, perceptual=lpips_random)
    loss_fn.discriminator.requires_grad_(False)  # as in the trainer's G step
    conv = vae.decoder.conv_out
    x, step, factor = images(), 2, 0.25  # ramp 0.5 · gan_weight 0.5

    def gradients():
        grads = {n: p.grad.clone() for n, p in vae.named_parameters()}
        vae.zero_grad(set_to_none=True)
        return grads

    # The direct path as the reference implementation writes it.
    reconstructions, mean, logvar, _ = autoencode(vae, x)
    nll, _ = reconstruction_nll(x, reconstructions, lpips_random(x, reconstructions), id_weight=0)
    g = generator_adv_loss(loss_fn.discriminator(reconstructions))
    nll_grad = torch.autograd.grad(nll, conv.weight, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(g, conv.weight, retain_graph=True)[0]
    lam = adaptive_weight(nll_grad, gan_grad)
    formula = nll + 1e-6 * kl_loss(mean, logvar) + factor * lam * g
    formula.backward()
    formula_grads = gradients()

    results = {}
    for fast in (False, True):
        for i, grad_scale in enumerate(GRAD_SCALES):
            reconstructions, mean, logvar, conv_in = autoencode(vae, x)
            loss, logs = loss_fn.generator_loss(
                x,
                reconstructions,
                mean,
                logvar,
                step,
                last_layer_weight=conv if fast else conv.weight,
                last_layer_input=conv_in if fast else None,
                grad_scale=grad_scale,
            )
            loss.backward()
            results[fast, i] = loss.detach(), logs, gradients()
    assert torch.equal(results[False, 0][0], formula.detach())
    assert torch.equal(results[False, 0][1]["adaptive_weight"], lam)
    assert all(torch.equal(results[False, 0][2][n], formula_grads[n]) for n in formula_grads)
    for fast in (False, True):
        loss_0, logs_0, grads_0 = results[fast, 0]
        for i in range(1, len(GRAD_SCALES)):
            loss_i, logs_i, grads_i = results[fast, i]
            assert torch.equal(loss_i, loss_0), (fast, GRAD_SCALES[i])
            assert all(torch.equal(logs_i[k], logs_0[k]) for k in logs_0), (fast, GRAD_SCALES[i])
            assert all(torch.equal(grads_i[n], grads_0[n]) for n in grads_0), (fast, GRAD_SCALES[i])
    # And the scaled fast path's surrogate still back-propagates the direct path's gradient.
    _, logs_direct, grads_direct = results[False, 3]
    _, logs_fast, grads_fast = results[True, 3]
    torch.testing.assert_close(logs_fast["adaptive_weight"], logs_direct["adaptive_weight"], rtol=1e-5, atol=0)
    scale = max(g.abs().max() for g in grads_direct.values())
    for name in grads_direct:
        torch.testing.assert_close(grads_fast[name], grads_direct[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


class TinySlopeDiscriminator(nn.Module):
    """D(x) = c·w⊙x in float32: ∂g/∂x̂ = −c·w/N (N = x̂.numel()), cast to fp16 at an fp16 x̂."""

    def __init__(self, shape, c):
        super().__init__()
        self.register_buffer("w", torch.rand(shape, generator=torch.Generator().manual_seed(3)) + 0.5)
        self.c = c

    def forward(self, x):
        return self.c * self.w * x.float()


@pytest.mark.parametrize("fast", [False, True], ids=["direct", "fast"])
def test_grad_scale_rescues_fp16_lambda(fast):
    """fp16 autocast, as the trainer runs it: x̂ = conv_out(h) is fp16 and D's gradient at x̂ is
    ~1.5e-8 per element, under fp16's smallest subnormal (6e-8), while summed over the 512 positions
    it gives ‖∇_W g‖ ≈ 1e-3, ten times the 1e-4 in λ's denominator."""
    batch, size = 2, 16
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 3, 3, padding=1)
    gen = torch.Generator().manual_seed(0)
    h = 10 + torch.randn(batch, 8, size, size, generator=gen)
    with torch.no_grad():
        target = conv(h)
    # Inputs 1 away from x̂: |x − x̂|'s sign, hence ∂nll/∂x̂, is the same whether x̂ is rounded to fp16 or not.
    x = target + torch.where(torch.rand(target.shape, generator=gen) < 0.5, -1.0, 1.0)
    mean = logvar = torch.zeros(batch, 4, 4, 4)
    disc = TinySlopeDiscriminator(x.shape, c=1.5e-8 * x.numel())
    # l1_weight 3e-3 puts the true λ (~2.4e3) inside the clamp: the underflow is what pushes it to 1e4.
    loss_fn = TransfusionLoss(lpips_weight=0, id_weight=0, disc_start=0, l1_weight=3e-3, discriminator=disc)
    loss_fn.watch(conv, fast=fast)

    def lam(fp16, grad_scale=None):
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            reconstructions = conv(h)
            assert reconstructions.dtype == (torch.float16 if fp16 else torch.float32)
            _, logs = loss_fn.generator_loss(x, reconstructions, mean, logvar, 0, grad_scale=grad_scale)
        assert loss_fn._watched_input is None  # the fast path took the captured input (or none was kept)
        return logs["adaptive_weight"]

    expected = lam(fp16=False)
    assert 1e3 < expected.item() < 5e3
    # Unscaled, ∇_W g underflowed to 0: λ = ‖∇_W nll‖/1e-4.
    assert lam(fp16=True, grad_scale=1.0).item() == loss_fn.adaptive_weight_max
    # By default under fp16 autocast: fp16_grad_scale(2) = 2^7 lifts the 1.5e-8 to ~2e-6, subnormal in fp16
    # (steps of 6e-8) but no longer zero.
    torch.testing.assert_close(lam(fp16=True), expected, rtol=2e-2, atol=0)
    # fp16 keeps 11 significant bits: λ from 2^16-scaled fp16 gradients is within 0.05% here (rtol 2e-3).
    torch.testing.assert_close(lam(fp16=True, grad_scale=2.0**16), expected, rtol=2e-3, atol=0)
    torch.testing.assert_close(lam(fp16=True, grad_scale=torch.full((1,), 2.0**16)), expected, rtol=2e-3, atol=0)


# ----------------------------------------------------------------------------- the watch hook and copies


def reachable(root) -> list:
    """Every object reachable from `root` through instances, containers, closures and bound methods (not
    through classes, modules or a function's globals, which would reach everything)."""
    seen, stack = {id(root)}, [root]
    found = []
    while stack:
        obj = stack.pop()
        found.append(obj)
        if isinstance(obj, types.FunctionType):
            cells = []
            for cell in obj.__closure__ or ():
                with contextlib.suppress(ValueError):  # an empty cell
                    cells.append(cell.cell_contents)
            referents = cells + list(obj.__defaults__ or ()) + list((obj.__kwdefaults__ or {}).values())
        else:
            referents = gc.get_referents(obj)
        for ref in referents:
            if isinstance(ref, type | types.ModuleType) or id(ref) in seen:
                continue
            seen.add(id(ref))
            stack.append(ref)
    return found


def test_deep_copy_of_watched_model_copies_no_part_of_the_loss(lpips_random, moco_small, monkeypatch):
    vae = tiny_vae()
    torch.manual_seed(0)
    loss_fn = TransfusionLoss(disc_start=0, perceptual=lpips_random, identity=moco_small)
    loss_fn.watch(vae.decoder.conv_out, fast=True)
    loss_types = (TransfusionLoss, LPIPS, IdentityLoss, NLayerDiscriminator)
    for model in (vae, copy.deepcopy(vae)):
        found = [type(obj).__name__ for obj in reachable(model) if isinstance(obj, loss_types)]
        assert found == [], f"reachable from the model: {found}"

    # Running a copy must not replace the input the original's forward left for the loss.
    x = images()
    reconstructions, mean, logvar, conv_in = autoencode(vae, x)
    captured = loss_fn._watched_input
    assert captured is not None and torch.equal(captured, conv_in)
    twin = copy.deepcopy(vae)
    twin_reconstructions, _, _, _ = autoencode(twin, x)
    torch.testing.assert_close(twin_reconstructions, reconstructions, rtol=0, atol=0)
    assert loss_fn._watched_input is captured
    # Nor does the copy keep an activation of its own alive (nothing would ever read it).
    assert not any(isinstance(obj, torch.Tensor) and obj.grad_fn is not None for obj in reachable(twin))

    # The original's fast path still runs on what its hook captured, and agrees with the direct path.
    calls, original = [0], vae_loss_module.conv_weight_grad

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(vae_loss_module, "conv_weight_grad", counted)
    _, logs_fast = loss_fn.generator_loss(x, reconstructions, mean, logvar, 0)
    assert calls[0] == 2 and loss_fn._watched_input is None
    _, logs_direct = loss_fn.generator_loss(
        x, reconstructions, mean, logvar, 0, last_layer_weight=vae.decoder.conv_out.weight
    )
    assert calls[0] == 2
    torch.testing.assert_close(logs_fast["adaptive_weight"], logs_direct["adaptive_weight"], rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- LPIPS weights


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    # torch.hub.set_dir would outlive the test (restoring get_dir()'s value pins it over TORCH_HOME): patch the
    # module's setting and let monkeypatch put back what was there, unset included.
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def test_lpips_pretrained_offline_without_file_is_a_clear_error(empty_hub):
    with pytest.raises(PerceptionWeightsError) as info:
        build_lpips(pretrained=True)
    message = str(info.value)
    assert "vgg16-397923af.pth" in message and "--perception_weights random" in message and "\n" not in message


def test_unreachable_host_is_a_clear_error(empty_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(weights_module.socket, "create_connection", no_network)
    with pytest.raises(PerceptionWeightsError, match="unreachable"):
        load_moco(MOCO_V2_800EP_URL)


def test_lpips_loads_vgg16_trunk_from_hub_cache(empty_hub, lpips_random):
    torch.manual_seed(0)
    # torchvision's layout: features.<index>.<weight|bias>; lpips keeps the index inside its slices.
    state = {
        "features." + name.split(".", 3)[3]: torch.randn_like(value)
        for name, value in lpips_random.state_dict().items()
        if name.startswith("net.net.slice")
    }
    state["classifier.0.weight"] = torch.zeros(1)  # ignored: LPIPS uses the conv trunk only
    assert len(state) == 27
    (empty_hub / "checkpoints").mkdir(parents=True)
    torch.save(state, empty_hub / "checkpoints" / "vgg16-397923af.pth")
    net = build_lpips(pretrained=True)
    torch.testing.assert_close(net.net.net.slice1.get_submodule("0").weight, state["features.0.weight"])
    torch.testing.assert_close(net.net.net.slice5.get_submodule("28").bias, state["features.28.bias"])
    assert not any(p.requires_grad for p in net.parameters())
    # the package's calibrated linear heads are loaded too (not a fresh random init)
    bundled = torch.load(
        os.path.join(os.path.dirname(perceptual_module.lpips.__file__), "weights/v0.1/vgg.pth"), map_location="cpu"
    )
    torch.testing.assert_close(net.net.lin0.model[1].weight, bundled["lin0.model.1.weight"])


# ----------------------------------------------------------------------------- MoCo


def moco_checkpoint(version: str, seed: int = 0):
    """(source encoder, state_dict in the official layout) with random weights and non-trivial BN stats."""
    torch.manual_seed(seed)
    encoder = build_moco_encoder(version).eval()
    for m in encoder.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    name = "encoder_q" if version == "v2" else "base_encoder"
    state = {f"module.{name}.{k}": v for k, v in encoder.state_dict().items()}
    if version == "v2":
        state["module.queue"] = torch.randn(128, 16)
        state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
        state["module.encoder_k.conv1.weight"] = torch.randn(64, 3, 7, 7)
    else:
        state["module.momentum_encoder.conv1.weight"] = torch.randn(64, 3, 7, 7)
        state["module.predictor.0.weight"] = torch.randn(4096, 256)
    return encoder, state


@pytest.fixture(scope="module")
def moco_v2_checkpoint():
    return moco_checkpoint("v2")


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_load_moco_official_format(tmp_path, version, moco_v2_checkpoint):
    source, state = moco_v2_checkpoint if version == "v2" else moco_checkpoint("v3")
    path = tmp_path / f"moco_{version}.pth.tar"
    torch.save({"epoch": 800, "arch": "resnet50", "state_dict": state, "optimizer": {"state": {}}}, path)
    loaded = load_moco(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = images(batch=1, size=64)
    ours, theirs = IdentityLoss(loaded, size=64), IdentityLoss(source, size=64)
    with torch.no_grad():
        features = ours.features(x)
        torch.testing.assert_close(features, theirs.features(x), rtol=0, atol=0)
    assert features.shape == (1, 128 if version == "v2" else 256)


def test_load_moco_from_hub_cache_by_url(empty_hub, moco_v2_checkpoint):
    _, state = moco_v2_checkpoint
    (empty_hub / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": state}, empty_hub / "checkpoints" / "moco_v2_800ep_pretrain.pth.tar")
    loaded = load_moco(MOCO_V2_800EP_URL)
    torch.testing.assert_close(loaded.fc[2].weight, state["module.encoder_q.fc.2.weight"])


def test_load_moco_offline_without_file_is_a_clear_error(empty_hub):
    with pytest.raises(PerceptionWeightsError, match=r"moco_v2_800ep_pretrain\.pth\.tar"):
        load_moco(MOCO_V2_800EP_URL)


def test_load_moco_wrong_keys_is_a_clear_error(tmp_path, moco_v2_checkpoint):
    state = dict(moco_v2_checkpoint[1])
    del state["module.encoder_q.layer4.2.bn3.running_var"]
    state["module.encoder_q.fc.4.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth.tar"
    torch.save({"state_dict": state}, path)
    with pytest.raises(PerceptionWeightsError) as info:
        load_moco(path)
    message = str(info.value)
    assert "\n" not in message
    assert "1 missing keys (layer4.2.bn3.running_var)" in message
    assert "1 unexpected keys (fc.4.weight)" in message


def test_load_moco_not_moco_is_a_clear_error(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(PerceptionWeightsError, match="not a MoCo v2/v3 checkpoint"):
        load_moco(path)


class _Payload:
    """Unpickling this would create a file: weights_only loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_moco_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)}, "x": _Payload(str(marker))}, path)
    with pytest.raises(PerceptionWeightsError, match="refused"):
        load_moco(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- MoCo resize


def _gaussian_then_bicubic(x: torch.Tensor, size: int) -> torch.Tensor:
    """Independent re-statement of the reference's resize: Gaussian σ = (f − 1)/2, reflect pad, bicubic align_corners."""
    factor = x.shape[-1] / size
    sigma = max((factor - 1) / 2, 0.001)
    k = int(max(4 * sigma, 3))
    k = k if k % 2 else k + 1
    offsets = torch.arange(k, dtype=torch.float64) - k // 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.pad(x, (k // 2,) * 4, mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    x = F.conv2d(x, kernel.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=True)


@pytest.mark.parametrize("in_size", [256, 512])
def test_moco_resize_is_gaussian_then_bicubic(in_size):
    x = images(batch=1, size=in_size)
    ours = identity_module.moco_resize(x)
    torch.testing.assert_close(ours, _gaussian_then_bicubic(x, 224), rtol=1e-5, atol=1e-5)
    torchs = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
    assert (ours - torchs).abs().max() > 0.1


def test_identity_loss_uses_moco_resize(monkeypatch, moco_small):
    calls = []

    def spy(x, size=224):
        calls.append(tuple(x.shape[-2:]))
        return identity_module.kornia.geometry.transform.resize(
            x, (size, size), interpolation="bicubic", align_corners=True, antialias=True
        )

    monkeypatch.setattr(identity_module, "moco_resize", spy)
    x = images(batch=1, size=32)
    xr = (x + 0.1).requires_grad_()
    loss = moco_small(x, xr)
    assert calls == [(32, 32), (32, 32)]
    loss.backward()
    assert xr.grad is not None and xr.grad.abs().sum() > 0


def test_identity_pooled_feature_is_cosine_distance(moco_random):
    pooled = IdentityLoss(moco_random.encoder, feature="pooled", size=64)
    x = images(batch=2, size=32)
    with torch.no_grad():
        a, b = pooled.features(x), pooled.features(-x)
        assert a.shape == (2, 2048)
        torch.testing.assert_close(pooled(x, -x), 1 - F.cosine_similarity(a, b).mean())
        assert pooled(x, x).abs().item() < 1e-5
    with pytest.raises(ValueError, match="feature"):
        IdentityLoss(moco_random.encoder, feature="logits")


def test_equivariant_transform_scales_and_turns():
    from losses.equivariance import equivariant_transform

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    assert equivariant_transform(x) is x
    half = equivariant_transform(x, 0.5)
    assert half.shape == (2, 3, 4, 4)
    # antialiased ×1/2 of a linear ramp: away from the border, the mean of each 2×2 block (a symmetric filter)
    torch.testing.assert_close(half[..., 1:-1, 1:-1], torch.nn.functional.avg_pool2d(x, 2)[..., 1:-1, 1:-1])
    turned = equivariant_transform(x, quarter_turns=1)
    assert torch.equal(turned[0, 0, 0], x[0, 0, :, -1])  # the last column becomes the first row
    assert torch.equal(equivariant_transform(x, quarter_turns=4), x)
    with pytest.raises(ValueError, match="scale"):
        equivariant_transform(x, 1.5)
