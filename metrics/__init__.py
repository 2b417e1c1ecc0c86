"""Measuring reconstructions: PSNR/SSIM, the rFID backends, the reconstruct + image-metrics path, the grid, latent diagnostics."""

from metrics.fid import (
    FID_BACKENDS,
    INCEPTION_WEIGHTS_FILE,
    build_fid,
    compute_fid,
    default_inception_path,
    resolve_inception_weights,
)
from metrics.grid import save_grid
from metrics.latents import latent_diagnostics, latent_pca_rgb
from metrics.pixel import MeanStd, chroma, chroma_error, chroma_ratio, psnr, ssim, to_uint8, to_unit
from metrics.reconstruction import held_out_metrics, image_metrics, load_images, noisy_reconstructions, reconstruct

__all__ = [
    "FID_BACKENDS",
    "INCEPTION_WEIGHTS_FILE",
    "MeanStd",
    "build_fid",
    "chroma",
    "chroma_error",
    "chroma_ratio",
    "compute_fid",
    "default_inception_path",
    "held_out_metrics",
    "image_metrics",
    "latent_diagnostics",
    "latent_pca_rgb",
    "load_images",
    "noisy_reconstructions",
    "psnr",
    "reconstruct",
    "resolve_inception_weights",
    "save_grid",
    "ssim",
    "to_uint8",
    "to_unit",
]
