"""metrics/ (pixel metrics, FID, the reconstruction path) against independent computations (scikit-image, numpy, closed forms)."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.transform import resize

import metrics
from common.errors import MetricError


def _image_pairs(h: int = 37, w: int = 45) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) references in [0, 1] (two photos + noise) and distorted copies, some out of range."""
    g = torch.Generator().manual_seed(0)
    photos = [resize(img, (h, w), anti_aliasing=True) for img in (skdata.astronaut(), skdata.chelsea())]
    ref = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2)  # (2, 3, H, W) float64 in [0, 1]
    ref = torch.cat([ref, torch.rand(1, 3, h, w, generator=g, dtype=torch.float64)])
    rec = ref + 0.08 * torch.randn(ref.shape, generator=g, dtype=torch.float64)
    rec[1] = ref[1].flip(-1)  # a structurally different image, not just noise
    return ref, rec  # rec leaves [0, 1]: the metrics must clip


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.clamp(0, 1).permute(1, 2, 0).numpy()


def test_psnr_equals_skimage():
    ref, rec = _image_pairs()
    got = metrics.psnr(ref, rec)
    assert got.shape == (3,) and got.dtype == torch.float64
    want = [peak_signal_noise_ratio(_hwc(a), _hwc(b), data_range=1) for a, b in zip(ref, rec, strict=False)]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-10)
    assert torch.isinf(metrics.psnr(ref, ref)).all()


def test_ssim_uniform_equals_skimage_default():
    ref, rec = _image_pairs()
    got = metrics.ssim(ref, rec, window="uniform")
    want = [
        structural_similarity(_hwc(a), _hwc(b), data_range=1, channel_axis=-1) for a, b in zip(ref, rec, strict=False)
    ]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-9)
    # Different windows must give different values on these images, or the test proves nothing.
    assert (metrics.ssim(ref, rec, window="gaussian") - got).abs().max() > 1e-4


def test_ssim_gaussian_equals_skimage_wang():
    ref, rec = _image_pairs(h=24, w=30)
    got = metrics.ssim(ref, rec, window="gaussian")
    want = [
        structural_similarity(
            _hwc(a),
            _hwc(b),
            data_range=1,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        for a, b in zip(ref, rec, strict=False)
    ]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(metrics.ssim(ref, ref, window="gaussian").numpy(), 1.0, atol=1e-12)


def test_ssim_rejects_images_smaller_than_the_window():
    x = torch.rand(1, 3, 9, 9)
    metrics.ssim(x, x, window="uniform")
    with pytest.raises(ValueError, match="11"):
        metrics.ssim(x, x, window="gaussian")


def test_to_uint8_round_vs_truncate_by_hand():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 1.5, 2 * 254.6 / 255 - 1, 2 * 3.49 / 255 - 1, 2 * 3.51 / 255 - 1])
    x = x.view(1, 1, 1, -1)
    assert metrics.to_uint8(x, "truncate").flatten().tolist() == [0, 0, 127, 255, 255, 254, 3, 3]
    assert metrics.to_uint8(x, "round").flatten().tolist() == [0, 0, 128, 255, 255, 255, 3, 4]
    assert metrics.to_uint8(x).dtype == torch.uint8
    with pytest.raises(ValueError, match="rounding must be"):
        metrics.to_uint8(x, "nearest")


def test_to_uint8_truncate_is_the_seeds_numpy_conversion():
    # Seed: inputs = ((x + 1) / 2).clip(0, 1) on float32 numpy, then (inputs * 255).astype(np.uint8).
    # Grey levels k/255 pushed through [-1, 1] are where truncation loses a level, so test those.
    levels = torch.arange(256, dtype=torch.float32) / 255.0
    x = torch.cat([(levels - 0.5) / 0.5, torch.rand(4096, generator=torch.Generator().manual_seed(1)) * 2.4 - 1.2])
    a = x.numpy()
    seed = (((a + 1.0) / 2.0).clip(0.0, 1.0) * 255.0).astype(np.uint8)
    np.testing.assert_array_equal(metrics.to_uint8(x.view(1, 1, 1, -1), "truncate").flatten().numpy(), seed)
    # and rounding recovers every grey level exactly, where truncation does not
    assert torch.equal(
        metrics.to_uint8(x[:256].view(1, 1, 1, -1), "round").flatten(), torch.arange(256).to(torch.uint8)
    )


def test_mean_std_accumulator():
    acc = metrics.MeanStd()
    acc.update(psnr=torch.tensor([1.0, 2.0]), ssim=[0.5])
    acc.update(psnr=torch.tensor([3.0, 6.0]), ssim=torch.tensor([0.7]))
    s = acc.summary()
    assert s["psnr"]["count"] == 4 and s["ssim"]["count"] == 2
    assert s["psnr"]["mean"] == pytest.approx(3.0)
    assert s["psnr"]["std"] == pytest.approx(np.std([1, 2, 3, 6]))
    assert s["ssim"]["mean"] == pytest.approx(0.6)


class PooledColour(torch.nn.Module):
    """A stand-in FID feature network: uint8 (B, 3, H, W) -> 4×4 average-pooled colours, 48-d."""

    num_features = 48

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 4).flatten(1)


def _fid_of(real: torch.Tensor, fake: torch.Tensor) -> float:
    fid = metrics.build_fid(feature_extractor=PooledColour())
    for chunk in real.split(7):
        fid.update(chunk, real=True)
    for chunk in fake.split(7):
        fid.update(chunk, real=False)
    return float(fid.compute())


def test_fid_self_is_zero_and_grows_with_perturbation():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(80, 3, 1, 1, generator=g) * 2 - 1 + 0.3 * torch.randn(80, 3, 16, 16, generator=g)
    real = metrics.to_uint8(base)
    fake_small = metrics.to_uint8(base + 0.05 * torch.randn(base.shape, generator=g))
    fake_large = metrics.to_uint8(0.5 * base + 0.3)
    self_fid = _fid_of(real, real)
    small, large = _fid_of(real, fake_small), _fid_of(real, fake_large)
    assert abs(self_fid) < 1e-6
    assert 1e-4 < small < large


def test_fid_matches_closed_form():
    # FID = |mu1 - mu2|² + Tr(S1 + S2 - 2 (S1 S2)^½), here with scipy's sqrtm as the independent reference.
    from scipy import linalg

    g = torch.Generator().manual_seed(3)
    real = torch.randint(0, 256, (120, 3, 8, 8), generator=g, dtype=torch.uint8)
    fake = (real.float() * 0.8 + 20).to(torch.uint8)
    f1 = PooledColour()(real).double().numpy()
    f2 = PooledColour()(fake).double().numpy()
    m1, m2, s1, s2 = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    want = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert _fid_of(real, fake) == pytest.approx(want, rel=1e-4)


def test_missing_inception_weights_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(MetricError) as e:
        metrics.build_fid()
    msg = str(e.value)
    assert "\n" not in msg and metrics.INCEPTION_WEIGHTS_FILE in msg and str(tmp_path) in msg
    with pytest.raises(MetricError, match=r"nowhere\.pth"):
        metrics.build_fid(weights_path=str(tmp_path / "nowhere.pth"))


def test_image_metrics_with_random_lpips():
    from losses.perceptual import build_lpips

    lpips = build_lpips(pretrained=False)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    x_hat = x + 0.1 * torch.randn(x.shape, generator=g)
    out = metrics.image_metrics(x, x_hat, lpips=lpips)
    assert set(out) == {"psnr", "ssim", "lpips"} and all(v.shape == (2,) for v in out.values())
    assert torch.allclose(out["psnr"], metrics.psnr(metrics.to_unit(x), metrics.to_unit(x_hat)))
    same = metrics.image_metrics(x, x, lpips=lpips)
    assert torch.all(same["lpips"].abs() < 1e-6) and torch.all(out["lpips"] > same["lpips"])
    assert torch.all(same["ssim"] > out["ssim"])


def test_chroma_matches_pil_ycbcr_and_ratio_keeps_colour_crops_only():
    gen = torch.Generator().manual_seed(0)
    colour = torch.rand(3, 3, 16, 16, generator=gen)
    # BT.601 as PIL's YCbCr (uint8, +128 offset): the same mean |Cb, Cr| to within its rounding.
    u8 = (colour * 255).round().to(torch.uint8)
    for image, ours in zip(u8, metrics.chroma(u8.double() / 255), strict=True):
        ycbcr = np.asarray(Image.fromarray(image.permute(1, 2, 0).numpy()).convert("YCbCr"), dtype=np.float64)
        assert abs(np.abs(ycbcr[..., 1:] - 128).mean() / 255 - ours.item()) < 2 / 255
    grey = colour.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    assert metrics.chroma(grey).abs().max().item() < 1e-12
    assert metrics.chroma_ratio(colour, colour) == (pytest.approx(1.0), 3)
    ratio, kept = metrics.chroma_ratio(colour, grey)
    assert ratio == pytest.approx(0.0, abs=1e-12) and kept == 3
    # Half the chroma: a blend halfway to grey.
    assert metrics.chroma_ratio(colour, (colour + grey) / 2)[0] == pytest.approx(0.5)
    # A near-grey input (chroma < 0.02) is left out, however its reconstruction looks.
    faint = grey[:1] + 0.01 * (colour[:1] - 0.5)
    assert metrics.chroma(faint).item() < 0.02
    ratio, kept = metrics.chroma_ratio(torch.cat([colour[:1], faint]), torch.cat([colour[:1], colour[1:2]]))
    assert (ratio, kept) == (pytest.approx(1.0), 1)
    assert metrics.chroma_ratio(grey, colour)[1] == 0


def test_chroma_error_is_zero_for_the_same_colours_one_for_grey_and_sees_hue():
    gen = torch.Generator().manual_seed(0)
    colour = torch.rand(3, 3, 16, 16, generator=gen)
    grey = colour.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    assert metrics.chroma_error(colour, colour) == (pytest.approx(0.0, abs=1e-12), 3)
    assert metrics.chroma_error(colour, grey) == (pytest.approx(1.0), 3)
    assert metrics.chroma_error(colour, (colour + grey) / 2)[0] == pytest.approx(0.5)
    # Channels rotated: the same chroma strength, other hues. The ratio cannot tell; the error can.
    rotated = colour[:, [1, 2, 0]]
    assert metrics.chroma(rotated) == pytest.approx(metrics.chroma(colour), rel=0.5)
    error, _ = metrics.chroma_error(colour, rotated)
    cbcr = lambda x: torch.einsum("kc,bchw->bkhw", torch.tensor(metrics.pixel._CBCR).double(), x.double())  # noqa: E731
    expected = ((cbcr(rotated) - cbcr(colour)).abs().flatten(1).mean(1) / metrics.chroma(colour)).mean().item()
    assert error == pytest.approx(expected) and error > 1
    faint = grey[:1] + 0.01 * (colour[:1] - 0.5)
    assert metrics.chroma_error(torch.cat([colour[:1], faint]), torch.cat([colour[:1], colour[1:2]]))[1] == 1
