"""Resizes as two matrix products, for `--deterministic`: the same values, a backward that is deterministic on CUDA.

torch.use_deterministic_algorithms(True) raises on CUDA in the backward of F.interpolate's linear modes (with or
without antialias) and of reflection padding: they accumulate gradients with atomics. The resizes the losses use
(kornia's antialiased bicubic resize for the ID term, the equivariance term's antialiased bilinear downscale) are
linear, act on rows and columns separately and keep a constant image constant, so each equals M_h · x · M_wᵀ for
two small matrices. `deterministic_resize` measures those matrices once per (resize, size, device) by running the
resize itself on row and column indicator images, and then applies them with matmuls, whose backward is two more
matmuls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def deterministic_algorithms() -> bool:
    """torch.use_deterministic_algorithms is on (raising or warn-only)."""
    return torch.are_deterministic_algorithms_enabled()


def _matrices(resize: Callable[[torch.Tensor], torch.Tensor], h: int, w: int, device: torch.device):
    """(M_h (h', h), M_w (w', w)) such that resize(x) = M_h · x · M_wᵀ for a separable, constant-keeping resize."""
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        # Image i has row i (column i) set to one: resize gives M_h[:, i] ⊗ (M_w · 1) = M_h[:, i] ⊗ 1.
        rows = torch.eye(h, device=device).view(h, 1, h, 1).expand(h, 1, h, w).contiguous()
        cols = torch.eye(w, device=device).view(w, 1, 1, w).expand(w, 1, h, w).contiguous()
        m_h = resize(rows)[:, 0, :, 0].T.contiguous()
        m_w = resize(cols)[:, 0, 0, :].T.contiguous()
    return m_h, m_w


def deterministic_resize(x: torch.Tensor, resize: Callable[[torch.Tensor], torch.Tensor], key: tuple) -> torch.Tensor:
    """resize(x) for x (B, C, H, W) as M_h · x · M_wᵀ in float32 (then x's dtype); `key` names the resize and its
    parameters (the matrices are cached under key, H, W and the device)."""
    h, w = x.shape[-2:]
    cache_key = (*key, h, w, str(x.device))
    if cache_key not in _CACHE:
        _CACHE[cache_key] = _matrices(resize, h, w, x.device)
    m_h, m_w = _CACHE[cache_key]
    with torch.autocast(x.device.type, enabled=False):
        return (m_h @ x.float() @ m_w.T).to(x.dtype)
