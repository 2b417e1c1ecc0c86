"""The spatial transforms that a latent space should commute with: downscaling and quarter turns.

An autoencoder is equivariant to a transform T when decode(T(encode(x))) ≈ T(x). EQ-VAE (Kouzelis et al.
2025, github.com/zelaki/eqvae) trains for it with random scalings and 90° rotations of the latent; "Improving
the Diffusability of Autoencoders" (arXiv 2502.14831) with ×1/2 and ×1/4 downsampling. Latents and images go
through the same function, so the regulariser (losses) and the diagnostic (metrics) apply one definition.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from losses.separable import deterministic_algorithms, deterministic_resize


def equivariant_transform(
    t: torch.Tensor, scale: float = 1.0, quarter_turns: int = 0, antialias: bool = True
) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, round(H·scale), round(W·scale)), turned by quarter_turns × 90° (counter-clockwise).

    Downscaling is bilinear, by default with antialiasing (a box-like prefilter, so a ×1/2 image keeps no
    aliased detail that its ×1/2 latent could not carry); antialias=False is EQ-VAE's plain bilinear
    resize. Scale 1 and no turn return `t` itself. Under torch.use_deterministic_algorithms (`--deterministic`)
    the downscale runs as two matmuls of the same values.
    """
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    if scale != 1.0:
        size = (max(1, round(t.shape[-2] * scale)), max(1, round(t.shape[-1] * scale)))
        resize = functools.partial(F.interpolate, size=size, mode="bilinear", antialias=antialias, align_corners=False)
        # --deterministic: the same resize as two matmuls, whose backward is deterministic on CUDA (losses/separable.py)
        if deterministic_algorithms():
            t = deterministic_resize(t, resize, ("equivariance", size, antialias))
        else:
            t = resize(t)
    if quarter_turns % 4:
        t = torch.rot90(t, quarter_turns % 4, dims=(-2, -1))
    return t
