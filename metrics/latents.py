"""Latent diagnostics: per-channel moments and KL (dead channels), DCT high-frequency share, equivariance, PCA picture.

What a latent space looks like to a diffusion model, measured on the posterior mean (never a sample: nothing
here draws from any RNG, so a validation cannot change the training run):

- per latent channel: mean and std of μ over images and positions, and the KL to N(0, 1),
  0.5·(μ² + σ² − 1 − log σ²) averaged over images and positions (nats per latent element); its activity
  Var_x(μ) (Burda et al. 2016, "Importance Weighted Autoencoders", §5.2: the variance over images of the
  posterior mean of each latent element; here averaged over the channel's positions), its posterior variance
  E[σ²] and its SNR Var_x(μ) / E[σ²]. A channel is inactive, with one reason:
  "prior-collapsed" when its KL is below DEAD_KL_NATS (the posterior is the prior: "dead"), else
  "constant" when its activity is below ACTIVE_VAR (μ is the same for every image, whatever σ: its KL
  can be large, it still carries nothing).
- the DCT diagnostic of "Improving the Diffusability of Autoencoders" (arXiv 2502.14831): the share of the
  spectral energy in the high band, for the latents (all channels, and per channel), for the images, and for
  the images box-filtered to the latent's resolution (see HF_BAND).
- equivariance: decode(T(z)) vs T(x) in PSNR for T = ×0.5 downscale and one quarter turn, with
  losses.equivariance.equivariant_transform on both sides (the regulariser's own definition).
- a PCA-to-RGB picture of the latents for the reconstruction grid.

Every accumulated quantity is a sum (LatentStats), so batches and ranks add up exactly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from losses.equivariance import equivariant_transform
from metrics.pixel import psnr, to_unit

# A channel transmitting nothing has KL 0 exactly (posterior = prior). 1e-3 nats per element is ~1 nat per image
# for a 32×32 latent (256² images): far below anything a used channel carries (a trained KL-VAE's channels sit
# at O(1) nats per element even at KL weight 1e-6), far above float32 round-off of a collapsed channel.
DEAD_KL_NATS = 1e-3
# Burda et al. 2016 (arXiv 1509.00519, §5.2) count a latent unit as active when Cov_x(E_q[u]) > 10^-2 (a N(0, 1)
# prior's units): the same threshold on a channel's mean over positions of Var_x(μ). A trained KL-VAE's used
# channels vary by O(1) or more over images; a channel forced constant varies by float32 round-off only.
ACTIVE_VAR = 1e-2
INACTIVE_REASONS = ("prior-collapsed", "constant")
HF_BAND = (
    "2-D orthonormal DCT-II per channel; high band = coefficients with max(u/H, v/W) >= 1/2 (above half the "
    "Nyquist frequency along either axis, a square band); share = high-band energy / energy of every "
    "coefficient but the DC one (so a channel's constant offset does not count)"
)
# The transforms of the equivariance diagnostic: (name, equivariant_transform keywords).
EQUIVARIANCE_TRANSFORMS = {"scale": {"scale": 0.5}, "rot90": {"quarter_turns": 1}}


# ---------------------------------------------------------------------------------------------
# Per-channel moments and KL
# ---------------------------------------------------------------------------------------------


def channel_sums(mean: torch.Tensor, logvar: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel sums over images and positions, float64 on the CPU, plus the counts.

    mean, logvar: (B, C, h, w) posterior mean and log-variance. Returns {"count": () elements per channel,
    "images": () images, "mu", "mu2", "kl", "var": (C,) sums of μ, μ², the KL and σ², "pos_mu", "pos_mu2": (C, h, w)
    sums over images of μ and μ² at each position}; channel_stats turns (summed) sums into moments.
    """
    mu, logvar = mean.to(torch.float64), logvar.to(torch.float64)
    kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)
    dims = (0, 2, 3)
    count = torch.tensor(float(mu.numel() // mu.shape[1]), dtype=torch.float64)
    return {
        "count": count,
        "images": torch.tensor(float(len(mu)), dtype=torch.float64),
        "mu": mu.sum(dims).cpu(),
        "mu2": mu.square().sum(dims).cpu(),
        "kl": kl.sum(dims).cpu(),
        "var": logvar.exp().sum(dims).cpu(),
        "pos_mu": mu.sum(0).cpu(),
        "pos_mu2": mu.square().sum(0).cpu(),
    }


def inactive_reason(kl: float, activity: float, dead_kl: float = DEAD_KL_NATS, active_var: float = ACTIVE_VAR):
    """ "prior-collapsed" (KL < dead_kl), "constant" (Var_x(μ) < active_var) or None (an active channel)."""
    if kl < dead_kl:
        return "prior-collapsed"
    if activity < active_var:  # NaN (fewer than 2 images) compares False: not judged
        return "constant"
    return None


def channel_stats(sums: dict[str, torch.Tensor], dead_kl: float = DEAD_KL_NATS) -> dict:
    """Per-channel lists "mean", "std", "kl", "activity", "posterior_var", "snr"; "dead_channels" (KL < dead_kl) and
    "inactive_channels" ([{"channel", "reason"}]) from channel_sums. Activity needs at least 2 images (else NaN)."""
    n, images = sums["count"], sums["images"]
    mean = sums["mu"] / n
    std = (sums["mu2"] / n - mean.square()).clamp_min(0.0).sqrt()  # population std over images and positions
    kl = sums["kl"] / n
    if images >= 2:  # population variance over images at each position, averaged over the positions
        pos_mean = sums["pos_mu"] / images
        activity = (sums["pos_mu2"] / images - pos_mean.square()).clamp_min(0.0).mean((1, 2))
    else:
        activity = torch.full_like(kl, math.nan)
    posterior_var = sums["var"] / n
    snr = activity / posterior_var  # a zero posterior variance gives inf (or NaN for a constant channel)
    reasons = [inactive_reason(k, a, dead_kl) for k, a in zip(kl.tolist(), activity.tolist(), strict=True)]
    return {
        "mean": mean.tolist(),
        "std": std.tolist(),
        "kl": kl.tolist(),
        "activity": activity.tolist(),
        "posterior_var": posterior_var.tolist(),
        "snr": snr.tolist(),
        "dead_channels": [i for i, v in enumerate(kl.tolist()) if v < dead_kl],
        "inactive_channels": [{"channel": i, "reason": r} for i, r in enumerate(reasons) if r is not None],
    }


# ---------------------------------------------------------------------------------------------
# DCT high-frequency share
# ---------------------------------------------------------------------------------------------


def dct_matrix(n: int, dtype: torch.dtype = torch.float64, device: torch.device | None = None) -> torch.Tensor:
    """The orthonormal DCT-II basis (n, n): row k = sqrt(2/n)·cos(π(2i+1)k / 2n), row 0 scaled by 1/sqrt(2)."""
    i = torch.arange(n, dtype=torch.float64)
    k = i[:, None]
    basis = math.sqrt(2.0 / n) * torch.cos(math.pi * (2.0 * i[None, :] + 1.0) * k / (2.0 * n))
    basis[0] /= math.sqrt(2.0)
    return basis.to(device=device, dtype=dtype)


def dct2(x: torch.Tensor) -> torch.Tensor:
    """2-D orthonormal DCT-II over the last two dims (= scipy.fft.dctn(x, axes=(-2, -1), norm="ortho")), float64."""
    x = x.to(torch.float64)
    ch = dct_matrix(x.shape[-2], device=x.device)
    cw = dct_matrix(x.shape[-1], device=x.device)
    return ch @ x @ cw.T


def high_band_mask(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(h, w) bool: the DCT coefficients (u, v) with max(u/h, v/w) >= 1/2 (see HF_BAND)."""
    u = torch.arange(h, device=device)[:, None] * 2 >= h
    v = torch.arange(w, device=device)[None, :] * 2 >= w
    return u | v


def spectral_energy(x: torch.Tensor) -> torch.Tensor:
    """(high-band energy, AC energy) of (B, C, H, W), summed over images and channels: float64 (2,) on the CPU."""
    return channel_spectral_energy(x).sum(0)


def channel_spectral_energy(x: torch.Tensor) -> torch.Tensor:
    """(high-band energy, AC energy) per channel of (B, C, H, W), summed over images: float64 (C, 2) on the CPU."""
    energy = dct2(x).square()
    high = energy[..., high_band_mask(*x.shape[-2:], device=x.device)].sum((0, 2))
    ac = energy.sum((0, 2, 3)) - energy[..., 0, 0].sum(0)
    return torch.stack([high, ac], dim=1).cpu()


def high_frequency_share(energy: torch.Tensor) -> float:
    """High-band share of the AC energy from (summed) spectral_energy; NaN when there is no AC energy."""
    high, ac = energy.tolist()
    return high / ac if ac > 0 else math.nan


def at_latent_resolution(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """images (B, 3, H, W) box-filtered to `size` (F.interpolate mode "area": the mean of each f×f block when f
    divides H and W), so the image's high-band share is measured on the latent's frequency grid."""
    return F.interpolate(images.to(torch.float64), size=tuple(size), mode="area")


# ---------------------------------------------------------------------------------------------
# Equivariance
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def equivariance_psnr(
    vae, images: torch.Tensor, z: torch.Tensor, autocast: Callable[[], contextlib.AbstractContextManager] | None = None
) -> dict[str, torch.Tensor]:
    """{transform name: per-image PSNR (B,) float64 of decode(T(z)) against T(images)} for EQUIVARIANCE_TRANSFORMS.

    images: (B, 3, H, W) in [-1, 1]; z: their posterior mean. Both sides go through
    losses.equivariance.equivariant_transform; PSNR as metrics.pixel.psnr on [-1, 1] -> [0, 1] clipped
    (an exact match gives inf). When T(z) decodes to another size than T(images) (an odd latent halved),
    that transform's PSNR is NaN.
    """
    autocast = autocast or contextlib.nullcontext
    out = {}
    for name, kwargs in EQUIVARIANCE_TRANSFORMS.items():
        target = equivariant_transform(images.float(), **kwargs)
        with autocast():
            decoded = vae.decode(equivariant_transform(z.float(), **kwargs)).sample
        if decoded.shape != target.shape:
            out[name] = torch.full((len(images),), math.nan, dtype=torch.float64)
            continue
        out[name] = psnr(to_unit(target), to_unit(decoded.float())).cpu()
    return out


# ---------------------------------------------------------------------------------------------
# Accumulation over batches and ranks
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def batch_sums(
    vae,
    images: torch.Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the diagnostics' sums for one batch, its posterior mean (B, C, h, w) float32): encode, moments, DCT, equivariance."""
    autocast = autocast or contextlib.nullcontext
    with autocast():
        posterior = vae.encode(images).latent_dist
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    sums = channel_sums(mean, logvar)
    sums["hf_channels"] = channel_spectral_energy(mean)  # (C, 2); its sum over channels is the latent's share
    sums["hf_image"] = spectral_energy(images)
    sums["hf_image_latent_res"] = spectral_energy(at_latent_resolution(images, mean.shape[-2:]))
    for name, values in equivariance_psnr(vae, images, mean, autocast).items():
        sums[f"eq_{name}"] = torch.stack([values.sum(), torch.tensor(float(len(values)), dtype=torch.float64)])
    return sums, mean


def add_sums(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Elementwise sum of two batch_sums dicts (a None: b itself)."""
    return dict(b) if a is None else {k: a[k] + b[k] for k in b}


def summarize(sums: dict[str, torch.Tensor], dead_kl: float = DEAD_KL_NATS) -> dict:
    """The JSON-ready diagnostics of (summed) batch_sums: per-channel lists, dead and inactive channels, KL, hf
    shares, PSNRs."""
    stats = channel_stats(sums, dead_kl)
    kl = stats["kl"]
    channels = {k: stats[k] for k in ("mean", "std", "kl", "activity", "posterior_var", "snr")}
    channels["hf_share"] = [high_frequency_share(e) for e in sums["hf_channels"]]
    return {
        "channels": channels,
        "dead_channels": stats["dead_channels"],
        "dead_threshold_nats": dead_kl,
        "inactive_channels": stats["inactive_channels"],
        "active_threshold_var": ACTIVE_VAR,
        "images": int(sums["eq_rot90"][1].item()),
        "kl_mean": sum(kl) / len(kl),
        "kl_min": min(kl),
        "hf_share": high_frequency_share(sums["hf_channels"].sum(0)),
        "hf_share_image": high_frequency_share(sums["hf_image"]),
        "hf_share_image_latent_res": high_frequency_share(sums["hf_image_latent_res"]),
        "hf_band": HF_BAND,
        "equivariance_psnr": {
            name: (sums[f"eq_{name}"][0] / sums[f"eq_{name}"][1]).item() for name in EQUIVARIANCE_TRANSFORMS
        },
    }


def scalars(summary: dict, prefix: str = "latent/") -> dict[str, float]:
    """The summary's scalars under `prefix`: kl_mean, kl_min, dead_channels and inactive_channels (counts),
    hf_share(_image, _image_latent_res), PSNRs."""
    keys = ("kl_mean", "kl_min", "hf_share", "hf_share_image", "hf_share_image_latent_res")
    out = {k: float(summary[k]) for k in keys}
    out["dead_channels"] = float(len(summary["dead_channels"]))
    out["inactive_channels"] = float(len(summary["inactive_channels"]))
    out.update({f"equivariance_psnr_{k}": float(v) for k, v in summary["equivariance_psnr"].items()})
    return {prefix + k: v for k, v in out.items()}


def describe_inactive(summary: dict) -> str:
    """'none' or '3 (constant), 5 (prior-collapsed)'."""
    return ", ".join(f"{c['channel']} ({c['reason']})" for c in summary["inactive_channels"]) or "none"


def describe(summary: dict) -> str:
    """One log line: 'latent KL mean .. min .., inactive channels .., hf share latent .. / image .., equivariance ..'."""
    eq = ", ".join(f"{k} {v:.2f} dB" for k, v in summary["equivariance_psnr"].items())
    return (
        f"latent KL mean {summary['kl_mean']:.4g} min {summary['kl_min']:.4g} nats, "
        f"inactive channels {describe_inactive(summary)}, hf share latent {summary['hf_share']:.3f} / "
        f"image {summary['hf_share_image']:.3f} (at latent resolution {summary['hf_share_image_latent_res']:.3f}), "
        f"equivariance PSNR {eq}"
    )


@torch.no_grad()
def latent_diagnostics(
    vae,
    images: torch.Tensor,
    batch_size: int,
    *,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> tuple[dict, torch.Tensor]:
    """(summarize'd diagnostics, the posterior means (N, C, h, w) float32) of images (N, 3, H, W) in [-1, 1].

    `batch_size` images at a time under `autocast`, like metrics.reconstruction.held_out_metrics.
    """
    total, means = None, []
    for chunk in images.split(batch_size):
        sums, mean = batch_sums(vae, chunk, autocast)
        total = add_sums(total, sums)
        means.append(mean)
    return summarize(total), torch.cat(means)


# ---------------------------------------------------------------------------------------------
# PCA picture
# ---------------------------------------------------------------------------------------------


def latent_pca_rgb(mean: torch.Tensor, size: tuple[int, int], quantile: float = 0.01) -> torch.Tensor:
    """(B, 3, H, W) float32 in [-1, 1]: each position's latent projected on the batch's first 3 principal components.

    mean: (B, C, h, w) posterior means; the components come from every position of every image (centred
    covariance, float64). Each component is mapped to [-1, 1] from its `quantile` and 1 − `quantile`
    quantiles over the batch (robust to a few outliers; clipped beyond them), component k giving colour
    channel k; signs are fixed so that each component's largest loading is positive. Upscaled to `size`
    (nearest). Fewer than 3 channels leave the missing colours at 0.
    """
    b, c, h, w = mean.shape
    x = mean.detach().to(torch.float64).permute(0, 2, 3, 1).reshape(-1, c)
    x = x - x.mean(0)
    cov = x.T @ x / max(1, len(x) - 1)
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    vectors = vectors.flip(1)[:, :3]  # (C, k) the largest first
    largest = vectors.gather(0, vectors.abs().argmax(0, keepdim=True))  # (1, k)
    vectors = torch.where(largest >= 0, vectors, -vectors)
    proj = x @ vectors  # (N·h·w, k)
    lo = torch.quantile(proj, quantile, dim=0)
    hi = torch.quantile(proj, 1.0 - quantile, dim=0)
    spread = hi - lo
    scaled = ((proj - lo) / spread.clamp_min(1e-12) * 2.0 - 1.0).clamp(-1.0, 1.0)
    scaled = torch.where(spread > 1e-12, scaled, torch.zeros_like(scaled))  # a flat component: mid grey
    rgb = torch.zeros(len(proj), 3, dtype=torch.float64, device=proj.device)
    rgb[:, : scaled.shape[1]] = scaled
    rgb = rgb.reshape(b, h, w, 3).permute(0, 3, 1, 2).float()
    return F.interpolate(rgb, size=tuple(size), mode="nearest")
