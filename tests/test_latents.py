"""Latent diagnostics (metrics/latents.py): dead channels, the DCT share, equivariance, the PCA picture, wiring."""

import json
import math
import types

import numpy as np
import pytest
import scipy.fft
import torch
import torch.nn.functional as F
from PIL import Image

import eval_vae
from metrics import latents
from metrics.grid import GRID_PAD, save_grid


class PoolVAE(torch.nn.Module):
    """Stand-in VAE: encode = 8× average pool (μ; log σ² = 0), decode = nearest 8× upsample, or a scrambled one.

    On images constant over 8×8 blocks, decode(T(encode(x))) == T(x) for a quarter turn (up to float32
    round-off: PSNR above EXACT_DB); the
    scrambled decoder (its output flipped upside down) is not equivariant.
    """

    def __init__(self, scrambled: bool = False):
        super().__init__()
        self.scrambled = scrambled

    def encode(self, x):
        mean = F.avg_pool2d(x, 8)
        posterior = types.SimpleNamespace(mean=mean, logvar=torch.zeros_like(mean))
        return types.SimpleNamespace(latent_dist=posterior)

    def decode(self, z):
        out = z.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
        return types.SimpleNamespace(sample=out.flip(2) if self.scrambled else out)


def blocky_images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, size // 8, size // 8, generator=gen) * 1.6 - 0.8
    return small.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)


def test_channel_stats_match_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, 6, generator=gen) * torch.tensor([0.5, 1.0, 2.0, 3.0]).view(1, 4, 1, 1) + 1.0
    logvar = torch.randn(3, 4, 5, 6, generator=gen)
    stats = latents.channel_stats(latents.channel_sums(mean, logvar))
    per_channel = mean.double().permute(1, 0, 2, 3).reshape(4, -1)
    kl = (0.5 * (mean.double() ** 2 + logvar.double().exp() - 1 - logvar.double())).permute(1, 0, 2, 3).reshape(4, -1)
    np.testing.assert_allclose(stats["mean"], per_channel.mean(1).numpy(), rtol=1e-10)
    np.testing.assert_allclose(stats["std"], per_channel.std(1, correction=0).numpy(), rtol=1e-8)
    np.testing.assert_allclose(stats["kl"], kl.mean(1).numpy(), rtol=1e-10)
    # Sums of two halves add up to the whole (batches and ranks).
    halves = [latents.channel_sums(mean[a:b], logvar[a:b]) for a, b in ((0, 1), (1, 3))]
    merged = latents.channel_stats(latents.add_sums(halves[0], halves[1]))
    np.testing.assert_allclose(merged["kl"], stats["kl"], rtol=1e-12)


def test_a_prior_channel_is_dead_the_others_not():
    gen = torch.Generator().manual_seed(1)
    mean = torch.randn(2, 4, 8, 8, generator=gen)
    logvar = torch.full_like(mean, -2.0)
    mean[:, 2], logvar[:, 2] = 0.0, 0.0  # μ = 0, σ = 1: the posterior is the prior, KL 0
    stats = latents.channel_stats(latents.channel_sums(mean, logvar))
    assert stats["dead_channels"] == [2]
    assert stats["kl"][2] == 0.0 and min(stats["kl"][i] for i in (0, 1, 3)) > latents.DEAD_KL_NATS
    # Barely used (KL just above the threshold) is alive.
    mean[:, 2] = math.sqrt(4 * latents.DEAD_KL_NATS)
    assert latents.channel_stats(latents.channel_sums(mean, logvar))["dead_channels"] == []


def test_a_constant_channel_and_a_prior_channel_are_inactive_with_their_reasons():
    gen = torch.Generator().manual_seed(4)
    mean = torch.randn(6, 4, 5, 5, generator=gen) * 2.0
    logvar = torch.full_like(mean, -3.0)
    mean[:, 1], logvar[:, 1] = 0.0, 0.0  # the prior: KL 0
    mean[:, 2], logvar[:, 2] = 2.5, -30.0  # the same sharp posterior for every image: large KL, carries nothing
    mean[:, 3] = torch.linspace(-1, 1, 5)  # varies over positions, never over images: constant too
    stats = latents.channel_stats(latents.channel_sums(mean, logvar))
    assert stats["dead_channels"] == [1]  # the KL criterion alone misses channels 2 and 3
    assert stats["kl"][2] > 1.0
    assert stats["inactive_channels"] == [
        {"channel": 1, "reason": "prior-collapsed"},
        {"channel": 2, "reason": "constant"},
        {"channel": 3, "reason": "constant"},
    ]
    # Activity = Var over images of μ at each position (population), averaged over positions; SNR = that / E[σ²].
    direct = mean.double().var(0, correction=0).mean((1, 2))
    np.testing.assert_allclose(stats["activity"], direct.numpy(), atol=1e-12)
    posterior_var = logvar.double().exp().mean((0, 2, 3))
    np.testing.assert_allclose(stats["posterior_var"], posterior_var.numpy(), rtol=1e-12)
    assert stats["snr"][0] == pytest.approx(direct[0].item() / posterior_var[0].item(), rel=1e-9)
    assert stats["activity"][0] > 1.0
    # Batches add up to the same activity (sums, not means).
    halves = [latents.channel_sums(mean[a:b], logvar[a:b]) for a, b in ((0, 2), (2, 6))]
    merged = latents.channel_stats(latents.add_sums(*halves))
    np.testing.assert_allclose(merged["activity"], stats["activity"], atol=1e-12)
    # Just above the threshold is active; one image cannot judge activity (NaN, nothing called constant).
    mean[:, 2] = 2.5 + torch.tensor([-1.0, 1.0] * 3).view(6, 1, 1) * 1.01 * math.sqrt(latents.ACTIVE_VAR)
    assert {c["channel"] for c in latents.channel_stats(latents.channel_sums(mean, logvar))["inactive_channels"]} == {
        1,
        3,
    }
    single = latents.channel_stats(latents.channel_sums(mean[:1], logvar[:1]))
    assert math.isnan(single["activity"][0]) and single["inactive_channels"] == [
        {"channel": 1, "reason": "prior-collapsed"}
    ]


def test_a_trained_tiny_model_with_quant_conv_channels_edited_each_way_names_both():
    from autoencoder.models import build_vae

    torch.manual_seed(0)
    vae = build_vae("tiny")
    images = blocky_images(6, size=32, seed=5)
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):  # trained briefly on L1 + 1e-6·KL, the recipe's two pixel-level terms
        posterior = vae.encode(images).latent_dist
        loss = (vae.decode(posterior.sample()).sample - images).abs().mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses  # it learned something: its latents carry the images
    vae.eval().requires_grad_(False)
    before, _ = latents.latent_diagnostics(vae, images, batch_size=3)
    assert before["inactive_channels"] == []
    c = vae.config.latent_channels  # quant_conv: 1×1 conv to (μ: channels 0..C-1, log σ²: C..2C-1)
    weight, bias = vae.quant_conv.weight, vae.quant_conv.bias
    for out, value in ((2, 0.0), (2 + c, 0.0), (5, 2.5), (5 + c, -30.0)):  # channel 2 -> the prior, 5 -> constant
        weight[out] = 0.0
        bias[out] = value
    after, _ = latents.latent_diagnostics(vae, images, batch_size=3)
    assert after["inactive_channels"] == [
        {"channel": 2, "reason": "prior-collapsed"},
        {"channel": 5, "reason": "constant"},
    ]
    assert after["dead_channels"] == [2] and after["channels"]["kl"][5] > 1.0
    assert latents.scalars(after)["latent/inactive_channels"] == 2.0
    assert "inactive channels 2 (prior-collapsed), 5 (constant)" in latents.describe(after)


def test_per_channel_high_band_shares_and_the_image_at_the_latents_resolution():
    gen = torch.Generator().manual_seed(6)
    smooth = torch.randn(3, 1, 8, 8, generator=gen).cumsum(-1).cumsum(-2)  # mostly low frequencies
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1.0  # Nyquist in both axes
    z = torch.cat([smooth, checker.expand(3, 1, 8, 8)], dim=1)
    per_channel = latents.channel_spectral_energy(z)
    shares = [latents.high_frequency_share(e) for e in per_channel]
    assert shares[1] > 0.95 and shares[0] < 0.3
    torch.testing.assert_close(per_channel.sum(0), latents.spectral_energy(z))
    # Images constant over 8×8 blocks: at the latent's resolution they are the blocks themselves.
    images = blocky_images(4, size=32, seed=7)
    small = images[:, :, ::8, ::8]
    torch.testing.assert_close(latents.at_latent_resolution(images, (4, 4)), small.double())
    summary, _ = latents.latent_diagnostics(PoolVAE(), images, batch_size=2)
    assert summary["hf_share_image_latent_res"] == pytest.approx(
        latents.high_frequency_share(latents.spectral_energy(small)), rel=1e-9
    )
    # PoolVAE's latent is that same block image: its share equals the image's at the latent's resolution.
    assert summary["hf_share"] == pytest.approx(summary["hf_share_image_latent_res"], rel=1e-6)
    assert len(summary["channels"]["hf_share"]) == 3


def test_latent_noise_decodes_mu_plus_sigma_over_scale_times_one_eps_per_image():
    from metrics.reconstruction import image_metrics, noisy_reconstructions

    vae = PoolVAE()
    vae.config = types.SimpleNamespace(scaling_factor=0.5)  # σ in normalised units = 2σ in raw latent units
    images = blocky_images(4)
    mean = vae.encode(images).latent_dist.mean
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(4)]  # noqa: E731
    recons = noisy_reconstructions(vae, images, [0.1, 0.5], gens())
    eps = torch.stack([torch.randn(3, 4, 4, generator=g) for g in gens()])
    for sigma, recon in recons.items():
        torch.testing.assert_close(recon, vae.decode(mean + 2 * sigma * eps).sample)
    # One generator per image: the same noise in any batching.
    halves = [noisy_reconstructions(vae, images[a:b], [0.5], gens()[a:b])[0.5] for a, b in ((0, 1), (1, 4))]
    torch.testing.assert_close(torch.cat(halves), recons[0.5])
    psnr = {s: image_metrics(images, r)["psnr"] for s, r in recons.items()}
    assert (psnr[0.5] < psnr[0.1]).all()  # PoolVAE decodes blocky images exactly: noise is all the error


def test_dct_is_orthonormal_and_matches_scipy():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 6, 10, generator=gen, dtype=torch.float64)
    ours = latents.dct2(x)
    reference = scipy.fft.dctn(x.numpy(), axes=(-2, -1), type=2, norm="ortho")
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-12)
    torch.testing.assert_close(ours.square().sum(), x.square().sum())  # energy preserved
    basis = latents.dct_matrix(7)
    torch.testing.assert_close(basis @ basis.T, torch.eye(7, dtype=torch.float64))


def test_noise_has_a_higher_spectral_share_than_a_smooth_latent():
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(4, 8, 16, 16, generator=gen)
    smooth = F.interpolate(torch.randn(4, 8, 4, 4, generator=gen), size=16, mode="bicubic", align_corners=False)
    share_noise = latents.high_frequency_share(latents.spectral_energy(noise))
    share_smooth = latents.high_frequency_share(latents.spectral_energy(smooth))
    assert 0.6 < share_noise < 0.9  # white noise: 3/4 of the coefficients lie in the band
    assert share_smooth < 0.1 < share_noise
    # A constant offset (the DC coefficient) does not count.
    share_offset = latents.high_frequency_share(latents.spectral_energy(smooth.double() + 5.0))
    assert share_offset == pytest.approx(share_smooth, rel=1e-6)
    # The band: max(u, v) >= N/2.
    mask = latents.high_band_mask(4, 6)
    assert mask.tolist() == [[False] * 3 + [True] * 3] * 2 + [[True] * 6] * 2


EXACT_DB = 120.0  # float32 round-off of an exact match (the pool's mean of 64 equal values) stays above this


def test_an_equivariant_decoder_scores_above_the_bound_a_scrambled_one_lower():
    images = blocky_images()
    for vae, expect_exact in ((PoolVAE(), True), (PoolVAE(scrambled=True), False)):
        z = vae.encode(images).latent_dist.mean
        scores = latents.equivariance_psnr(vae, images, z)
        assert set(scores) == {"scale", "rot90"} and scores["rot90"].shape == (3,)
        if expect_exact:
            assert (scores["rot90"] > EXACT_DB).all()
            exact_scale = scores["scale"]
        else:
            assert (scores["rot90"] < 30).all()
            assert (scores["scale"] < exact_scale).all()
    # ×0.5: halving a 4×4 latent blurs across the blocks more than halving the image does: finite.
    assert torch.isfinite(exact_scale).all()


def test_latent_diagnostics_of_a_batch_add_up_and_never_draw_from_the_rng():
    images = blocky_images(5)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    summary, means = latents.latent_diagnostics(PoolVAE(), images, batch_size=2)
    assert torch.equal(before, torch.random.get_rng_state())
    whole, _ = latents.latent_diagnostics(PoolVAE(), images, batch_size=5)
    assert means.shape == (5, 3, 4, 4)
    assert summary["dead_channels"] == whole["dead_channels"]
    assert summary["inactive_channels"] == whole["inactive_channels"]
    for key in ("kl_mean", "kl_min", "hf_share", "hf_share_image", "hf_share_image_latent_res"):
        assert summary[key] == pytest.approx(whole[key], rel=1e-9), key
    assert summary["equivariance_psnr"]["rot90"] > EXACT_DB
    flat = latents.scalars(summary)
    assert set(flat) == {
        "latent/kl_mean",
        "latent/kl_min",
        "latent/dead_channels",
        "latent/inactive_channels",
        "latent/hf_share",
        "latent/hf_share_image",
        "latent/hf_share_image_latent_res",
        "latent/equivariance_psnr_scale",
        "latent/equivariance_psnr_rot90",
    }


def test_pca_picture_shape_range_and_first_component():
    gen = torch.Generator().manual_seed(4)
    b, c, h, w = 3, 6, 4, 5
    mean = torch.randn(b, c, h, w, generator=gen) * 0.05
    ramp = torch.linspace(-3, 3, b * h * w).reshape(b, h, w)
    direction = torch.tensor([0.0, 0.6, 0.0, -0.8, 0.0, 0.0])  # the direction of largest variance
    mean = mean + ramp[:, None] * direction.view(1, c, 1, 1)
    rgb = latents.latent_pca_rgb(mean, (32, 40))
    assert rgb.shape == (b, 3, 32, 40) and rgb.dtype == torch.float32
    assert rgb.min() >= -1 and rgb.max() <= 1 and rgb.max() == 1 and rgb.min() == -1
    # Red follows the ramp (sign: the largest loading, -0.8, counts positive, so red decreases along it).
    red = rgb[:, 0, ::8, ::8].reshape(-1)
    corr = torch.corrcoef(torch.stack([red, ramp.reshape(-1)]))[0, 1]
    assert corr < -0.99
    # Nearest upscaling: each latent position is an 8×8 block.
    assert torch.equal(rgb[:, :, :8, :8], rgb[:, :, :1, :1].expand(-1, -1, 8, 8))
    # Fewer than 3 channels: the missing colours stay 0.
    assert latents.latent_pca_rgb(mean[:, :2], (4, 5))[:, 2].abs().max() == 0


def test_the_grid_takes_the_pca_row():
    images = blocky_images(2)
    rgb = latents.latent_pca_rgb(F.avg_pool2d(images, 8), images.shape[-2:])
    grid = save_grid(images, [images, rgb], None, labels=["input", "recon", "latent PCA"], min_tile=32)
    assert grid.shape[0] == 3 and grid.shape[1] == 2 + 3 * (32 + 2)


@pytest.mark.e2e
def test_trainer_logs_latent_keys_at_validation(image_folder, tmp_path, tiny_args, run_main):
    run_main(tiny_args(image_folder, tmp_path / "run", 2, validation_steps=1, checkpointing_steps=2))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    validations = [r for r in records if "validation/psnr" in r]
    assert [r["step"] for r in validations] == [0, 1, 2]  # before the first step, then every step
    for r in validations:
        for key in ("kl_mean", "kl_min", "dead_channels", "inactive_channels", "hf_share", "hf_share_image"):
            assert math.isfinite(r[f"latent/{key}"]), key
        assert 0 <= r["latent/hf_share"] <= 1 and r["latent/equivariance_psnr_rot90"] > 0
        assert "latent/equivariance_psnr_scale" in r
    # The held-out grid has a third row, the latent PCA picture: 3 rows of 32-px tiles upscaled to 128.
    with Image.open(tmp_path / "run" / "samples" / "step_0000002.png") as grid:
        assert grid.height == GRID_PAD + 3 * (128 + GRID_PAD)


@pytest.mark.e2e
def test_evaluator_writes_latent_per_model(image_folder, tmp_path, capsys):
    from autoencoder.models import build_vae
    from losses.perceptual import build_lpips

    torch.manual_seed(0)
    build_vae("tiny").save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    argv = [
        "--pretrained_model_name_or_path", str(tmp_path / "model"),
        "--dataset", str(image_folder),
        "--resolution", "32",
        "--batch_size", "2",
        "--num_workers", "0",
        "--perception_weights", "random",
        "--no-fid",
        "--max_samples", "3",
        "--output_dir", str(out),
    ]  # fmt: skip
    torch.manual_seed(0)
    result = eval_vae.main(argv, lpips=build_lpips(pretrained=False))
    stdout = capsys.readouterr().out
    with open(out / "eval.json") as f:
        saved = json.load(f)
    latent = saved["models"][0]["latent"]
    assert len(latent["channels"]["kl"]) == 8 and latent["images"] == 3
    assert 0 <= latent["hf_share"] <= 1 and 0 <= latent["hf_share_image"] <= 1
    assert set(latent["equivariance_psnr"]) == {"scale", "rot90"}
    assert result["models"][0]["latent"]["kl_mean"] == pytest.approx(latent["kl_mean"])
    tables = [line for line in stdout.splitlines() if line.startswith("|")]
    # The main table unchanged (header, separator, one row), then the latent table with its own row per model.
    assert " validation 3, 32² | rFID | PSNR |" in tables[0] and tables[2].startswith("| model | ")
    assert tables[3].startswith("| latent | inactive channels |") and tables[5].startswith("| model (8 ch) | ")
    assert len(latent["channels"]["activity"]) == 8 and isinstance(latent["inactive_channels"], list)
    assert tables[6].startswith("| latent noise | σ=0.1 PSNR | σ=0.1 LPIPS (RANDOM VGG, not LPIPS) | σ=0.25 PSNR")
    assert tables[8].startswith("| model (noised) | ") and len(tables) == 9
    noise = latent["channels"] and saved["models"][0]["latent_noise"]
    assert noise["sigmas"] == [0.1, 0.25, 0.5] and noise["scaling_factor"] > 0
    for sigma in ("0.1", "0.25", "0.5"):
        assert set(noise["metrics"][sigma]) == {"psnr", "ssim", "lpips"}
        assert noise["metrics"][sigma]["psnr"]["count"] == 3 and math.isfinite(noise["metrics"][sigma]["psnr"]["mean"])
    assert "latent_noise" in saved and all("@noise" not in k for k in saved["models"][0]["metrics"])

    # --no-latent_diagnostics: none computed, no second table, the main results unchanged.
    eval_vae.main([*argv, "--no-latent_diagnostics", "--no-latent_noise"], lpips=build_lpips(pretrained=False))
    stdout = capsys.readouterr().out
    with open(out / "eval.json") as f:
        skipped = json.load(f)
    assert skipped["models"][0]["latent"] is None and "| latent |" not in stdout
    assert skipped["models"][0]["latent_noise"] is None and "| latent noise |" not in stdout
    assert skipped["models"][0]["metrics"]["psnr"] == saved["models"][0]["metrics"]["psnr"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--latent_noise_sigma", "0"], "--latent_noise_sigma values must be positive"),
        (["--latent_noise_sigma", "0.1", "--latent_noise_sigma", "0.1"], "--latent_noise_sigma values must differ"),
        (["--probe_ema_decay", "1"], "--probe_ema_decay must be in [0, 1)"),
        (["--probe_normalise", "batch"], "argument --probe_normalise: invalid choice"),
    ],
)
def test_bad_noise_and_probe_flags_are_one_line_before_any_model(flags, message, capsys):
    argv = ["--pretrained_model_name_or_path", "/nonexistent/model", "--dataset", "/nonexistent/data", *flags]
    with pytest.raises(SystemExit) as exit_info:
        eval_vae.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eval_vae.py: error: ") and message in err[0], err
