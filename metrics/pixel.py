"""Pixel metrics: PSNR and SSIM per image, the [-1, 1] -> [0, 1] / uint8 conversions, mean and std over images.

The numbers follow the reference implementation's evaluation protocol (docs/recipe.md, "Evaluation protocol"):
PSNR and SSIM per image on float [0, 1] clipped, with scikit-image's definitions
(`peak_signal_noise_ratio(data_range=1)`, `structural_similarity(data_range=1,
channel_axis=-1)`), re-implemented here in float64 torch so they run batched on the GPU
and match scikit-image to ~1e-10.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Pixel conversions
# ---------------------------------------------------------------------------------------------


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] clipped, in float64 (the space PSNR and SSIM are measured in)."""
    return ((x.to(torch.float64) + 1.0) / 2.0).clamp(0.0, 1.0)


def to_uint8(x: torch.Tensor, rounding: str = "round") -> torch.Tensor:
    """[-1, 1] float (B, 3, H, W) -> uint8 with the same shape, as saved to PNG and fed to FID.

    "truncate" is the reference implementation's conversion (`((x + 1) / 2).clip(0, 1) * 255` then `astype(uint8)`,
    in float32): a pixel that decodes to 199.9999 becomes 199, so even the reference images
    lose up to one grey level after the [-1, 1] round trip. "round" adds 0.5 before truncating.
    """
    if rounding not in ("round", "truncate"):
        raise ValueError(f"rounding must be 'round' or 'truncate', got {rounding!r}")
    # Same float32 arithmetic as the reference implementation (numpy on float32 arrays), so "truncate" matches it bit for bit.
    scaled = ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0
    if rounding == "round":
        scaled = scaled + 0.5
    return scaled.clamp(0.0, 255.0).to(torch.uint8)


def _float64_device(x: torch.Tensor) -> torch.device:
    # MPS has no float64; everything else computes in place.
    return torch.device("cpu") if x.device.type == "mps" else x.device


# ---------------------------------------------------------------------------------------------
# PSNR / SSIM (scikit-image definitions)
# ---------------------------------------------------------------------------------------------


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, (B,), of images in [0, 1] (clipped), data_range 1, float64.

    Equals `skimage.metrics.peak_signal_noise_ratio(a, b, data_range=1)`; identical images give inf.
    """
    device = _float64_device(x)
    x = x.to(device, torch.float64).clamp(0.0, 1.0)
    y = y.to(device, torch.float64).clamp(0.0, 1.0)
    mse = (x - y).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse)


def _gaussian_kernel1d(sigma: float, radius: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # scipy.ndimage.gaussian_filter's kernel: exp(-x²/2σ²) on [-radius, radius], normalised to sum 1.
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, window: str = "uniform") -> torch.Tensor:
    """Per-image SSIM, (B,), of images (B, C, H, W) in [0, 1] (clipped), data_range 1, float64.

    window="uniform": `structural_similarity(a, b, data_range=1, channel_axis=-1)` — 7×7 box,
    sample covariance (N/(N−1)); the reference implementation's choice.
    window="gaussian": the same with `gaussian_weights=True, sigma=1.5, use_sample_covariance=False`
    (Wang et al. 2004): 11-tap Gaussian, population covariance.
    Like scikit-image, the SSIM map is averaged over the region the window fits in entirely
    (it crops (win−1)/2 pixels per side), then over channels.
    """
    if window == "uniform":
        win, cov_norm = 7, 49.0 / 48.0
    elif window == "gaussian":
        sigma, truncate = 1.5, 3.5
        win, cov_norm = 2 * int(truncate * sigma + 0.5) + 1, 1.0
    else:
        raise ValueError(f"window must be 'uniform' or 'gaussian', got {window!r}")
    if min(x.shape[-2:]) < win:
        raise ValueError(f"SSIM needs images of at least {win}×{win} pixels, got {tuple(x.shape[-2:])}")
    device = _float64_device(x)
    x = x.to(device, torch.float64).clamp(0.0, 1.0)
    y = y.to(device, torch.float64).clamp(0.0, 1.0)
    _b, c = x.shape[:2]
    if window == "uniform":
        k1d = torch.full((win,), 1.0 / win, dtype=torch.float64, device=device)
    else:
        k1d = _gaussian_kernel1d(sigma, (win - 1) // 2, torch.float64, device)

    # Filter x, y, x², y², xy at once. A "valid" convolution yields exactly skimage's cropped
    # region, so its border mode (reflect) never matters.
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (B, 5C, H, W)
    groups = stack.shape[1]
    filtered = F.conv2d(stack, k1d.view(1, 1, win, 1).expand(groups, 1, win, 1), groups=groups)
    filtered = F.conv2d(filtered, k1d.view(1, 1, 1, win).expand(groups, 1, 1, win), groups=groups)
    ux, uy, uxx, uyy, uxy = filtered.split(c, dim=1)  # each (B, C, H−win+1, W−win+1)

    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1, c2 = 0.01**2, 0.03**2  # (K1·R)², (K2·R)² with R = data_range = 1
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(2).mean(dim=2).mean(dim=1)


# ---------------------------------------------------------------------------------------------
# Colour kept: chroma of a reconstruction against its input
# ---------------------------------------------------------------------------------------------

# ITU-R BT.601 RGB -> (Cb, Cr) rows, offsets left out (JPEG's YCbCr; PIL's "YCbCr" mode less its 128).
_CBCR = ((-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
MIN_CHROMA = 0.02  # mean |Cb, Cr| below which a crop counts as grey


def _cbcr(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) float64 (Cb, Cr) of images (B, 3, H, W) in [0, 1] (clipped), offsets left out."""
    device = _float64_device(x)
    x = x.to(device, torch.float64).clamp(0.0, 1.0)
    weights = torch.tensor(_CBCR, dtype=torch.float64, device=device)
    return torch.einsum("kc,bchw->bkhw", weights, x)


def chroma(x: torch.Tensor) -> torch.Tensor:
    """Per-image mean |Cb, Cr| (BT.601, both channels, every pixel), (B,), of images (B, 3, H, W) in [0, 1] (clipped).

    0 for a grey image; at most 0.5 (pure blue or red: |Cb| or |Cr| = 0.5).
    """
    return _cbcr(x).abs().flatten(1).mean(dim=1)


def _over_colour_images(x: torch.Tensor, y: torch.Tensor, per_image, min_chroma: float) -> tuple[float, int]:
    if x.shape != y.shape:
        raise ValueError(f"chroma: inputs {tuple(x.shape)} and reconstructions {tuple(y.shape)} differ")
    ref = chroma(x)
    kept = ref >= min_chroma
    if not kept.any():
        return math.nan, 0
    return (per_image(x[kept], y[kept].to(ref.device)) / ref[kept]).mean().item(), int(kept.sum())


def chroma_ratio(x: torch.Tensor, y: torch.Tensor, min_chroma: float = MIN_CHROMA) -> tuple[float, int]:
    """(mean over the colour images of chroma(reconstruction) / chroma(input), how many images that is).

    x: inputs, y: their reconstructions, (B, 3, H, W) in [0, 1] (clipped). Inputs whose chroma is below
    `min_chroma` are left out (a grey crop has no colour to keep); 1 when the colours come back as strong,
    0 for a grey reconstruction. (nan, 0) when no input has colour. It measures strength, not hue: see
    `chroma_error` for that.
    """
    return _over_colour_images(x, y, lambda a, b: chroma(b), min_chroma)


def chroma_error(x: torch.Tensor, y: torch.Tensor, min_chroma: float = MIN_CHROMA) -> tuple[float, int]:
    """(mean over the colour images of mean |(Cb, Cr)(reconstruction) - (Cb, Cr)(input)| / chroma(input), count).

    The hue-aware companion of `chroma_ratio`, over the same images: 0 when every pixel's colour comes back,
    exactly 1 for a grey reconstruction, above 1 when the colours come back wrong (a red cast on a blue sky).
    """
    return _over_colour_images(x, y, lambda a, b: (_cbcr(b) - _cbcr(a)).abs().flatten(1).mean(dim=1), min_chroma)


class MeanStd:
    """Keeps per-image values of named metrics; reports mean, std (population, like np.std) and count."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = defaultdict(list)

    def update(self, **metrics: torch.Tensor | list[float]) -> None:
        for name, v in metrics.items():
            v = v.detach().reshape(-1).to("cpu", torch.float64).tolist() if torch.is_tensor(v) else list(v)
            self.values[name].extend(float(a) for a in v)

    def summary(self) -> dict[str, dict[str, float | int]]:
        out = {}
        for name, vals in self.values.items():
            t = torch.tensor(vals, dtype=torch.float64)
            n = t.numel()
            mean = t.mean().item() if n else math.nan
            std = t.std(correction=0).item() if n else math.nan
            out[name] = {"mean": mean, "std": std, "count": n}
        return out
