"""Latent regularisers (off by default): EQ-VAE's equivariance term, VA-VAE's vision-foundation alignment, and
the latent noise augmentation of the decoder.

Both make the latent space easier for a diffusion model to learn (docs/recipe.md, "Latent regularisers (off
by default)"). Pure pieces live here: the seeded transform draw, the two formulas, the frozen DINOv2 feature
extractor and the trainable 1×1 projection; `TransfusionLoss.generator_loss` weighs and adds them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from common.errors import PerceptionWeightsError
from common.helpers import FrozenModule, text_seed
from losses.equivariance import equivariant_transform
from losses.functional import reconstruction_nll

logger = logging.getLogger(__name__)

DINOV2_BASE = "facebook/dinov2-base"
DINOV2_LARGE = "facebook/dinov2-large"  # ViT-L/14, the model VA-VAE aligns to (timm vit_large_patch14_dinov2.lvd142m)
# The architectures of the two, for a random DINOv2 offline (--perception_weights random) without a cached config.
DINOV2_ARCHITECTURES = {
    DINOV2_BASE: dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    DINOV2_LARGE: dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
}
# ImageNet statistics DINOv2 was trained with (its image processor's).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# VA-VAE clamps its VF adaptive weight to [0, 1e8] (LightningDiT vavae/ldm/modules/losses/contperceptual.py).
VF_ADAPTIVE_WEIGHT_MAX = 1e8


# ----------------------------------------------------------------------------------------
# Equivariance (EQ-VAE, Kouzelis et al. 2025; scale equivariance of arXiv 2502.14831)
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EquivarianceTransform:
    """T: a downscale by `scale`, then `quarter_turns` × 90° (counter-clockwise), of a latent and its image."""

    scale: float = 1.0
    quarter_turns: int = 0
    antialias: bool = True  # False: EQ-VAE's plain bilinear resize (--equivariance_mode eqvae)

    def apply(self, z: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T(z), T(x)) for a latent z (B, C, h, w) of an image x (B, 3, H, W).

        The image is scaled by the latent's own size ratio h'/h (h' = round(h·scale)), so that T(x) is
        exactly H/h times T(z) in each side even where h·scale is not a whole number.
        """
        # In float32: antialiased bilinear resizing has no bf16 kernel on CPU (and T(z) is tiny).
        tz = equivariant_transform(z.float(), self.scale, self.quarter_turns, self.antialias).to(z.dtype)
        new_h = max(1, round(z.shape[-2] * self.scale))
        tx = equivariant_transform(x.float(), new_h / z.shape[-2], self.quarter_turns, self.antialias).to(x.dtype)
        factor = x.shape[-2] // z.shape[-2]
        if tx.shape[-2:] != (tz.shape[-2] * factor, tz.shape[-1] * factor):
            raise ValueError(
                f"T(x) {tuple(tx.shape[-2:])} does not match T(z) {tuple(tz.shape[-2:])} at factor {factor}: "
                "the equivariance term needs images whose sides scale alike (square training crops)"
            )
        return tz, tx


def transform_generator(seed: int, step: int, micro_batch: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, step, micro-batch) alone: a resumed run draws the same transforms,
    and the global RNG (the posterior noise) is never touched."""
    return torch.Generator().manual_seed(text_seed(f"equivariance:{seed}:{step}:{micro_batch}"))


def draw_equivariance(
    generator: torch.Generator, prob: float, scales: list[float], rotations: bool
) -> EquivarianceTransform | None:
    """With probability `prob` a transform, else None: a scale drawn uniformly from `scales` (1 if empty) and,
    with `rotations`, k·90° for k uniform in {0, 1, 2, 3} ({1, 2, 3} when the scale is 1: never the identity)."""
    if float(torch.rand((), generator=generator)) >= prob:
        return None
    scale = 1.0
    if scales:
        scale = float(scales[int(torch.randint(len(scales), (), generator=generator))])
    turns = 0
    if rotations:
        low = 1 if scale == 1.0 else 0
        turns = int(torch.randint(low, 4, (), generator=generator))
    return EquivarianceTransform(scale, turns)


# EQ-VAE's scales: zelaki/eqvae train_eqvae/ldm/models/autoencoder.py, random.choice([s / 32 for s in range(8, 32)]).
EQVAE_SCALES = tuple(s / 32 for s in range(8, 32))


@dataclass(frozen=True)
class EqvaeDraw:
    """One step of EQ-VAE's own training scheme (--equivariance_mode eqvae).

    transform: T, whose pair (T(x), decode(T(z))) replaces the step's (x, decode(z)) in the whole loss, or None;
    input_scale: on a step without T, the downscale of the input image itself (EQ-VAE's prior preservation at
    low resolution), 1 for the plain full-resolution step.
    """

    transform: EquivarianceTransform | None = None
    input_scale: float = 1.0

    def input(self, x: torch.Tensor, factor: int) -> torch.Tensor:
        """x, downscaled by input_scale (bilinear, no antialiasing, as EQ-VAE) to sides that stay multiples of
        the autoencoder's downsampling `factor` (exactly input_scale × 256 at 256², for every EQ-VAE scale)."""
        if self.input_scale == 1.0:
            return x
        size = tuple(max(1, round(side // factor * self.input_scale)) * factor for side in x.shape[-2:])
        return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False).to(x.dtype)


def draw_eqvae(generator: torch.Generator, prob: float = 0.5, low_res_prob: float = 0.25) -> EqvaeDraw:
    """EQ-VAE's draw: with probability `prob` a transform (a scale uniform in EQVAE_SCALES, then k·90°, k
    uniform in {1, 2, 3}: a rotation always, no antialiasing); else, with probability `low_res_prob`, a
    downscale of the input (scale uniform in EQVAE_SCALES); else the plain step."""
    if float(torch.rand((), generator=generator)) < prob:
        scale = EQVAE_SCALES[int(torch.randint(len(EQVAE_SCALES), (), generator=generator))]
        turns = int(torch.randint(1, 4, (), generator=generator))
        return EqvaeDraw(EquivarianceTransform(scale, turns, antialias=False))
    if float(torch.rand((), generator=generator)) < low_res_prob:
        return EqvaeDraw(input_scale=EQVAE_SCALES[int(torch.randint(len(EQVAE_SCALES), (), generator=generator))])
    return EqvaeDraw()


def equivariance_nll(
    target: torch.Tensor,
    reconstruction: torch.Tensor,
    perceptual: nn.Module | None,
    l1_weight: float = 1.0,
    lpips_weight: float = 1.0,
) -> torch.Tensor:
    """The recipe's reconstruction nll (L1 + LPIPS when on; no ID, GAN or KL) of decode(T(z)) against T(x).

    Normalised as the recipe's nll: a sum over T(x)'s C·H'·W' terms, mean over the batch.
    """
    target = target.detach()
    lpips_per_image = None if perceptual is None else perceptual(target, reconstruction)
    nll, _ = reconstruction_nll(target, reconstruction, lpips_per_image, None, l1_weight, lpips_weight, 0.0)
    return nll


# ----------------------------------------------------------------------------------------
# Vision-foundation alignment (VA-VAE's VF loss, LightningDiT vavae/ldm/modules/losses/contperceptual.py)
# ----------------------------------------------------------------------------------------


def vf_loss(
    projected: torch.Tensor, features: torch.Tensor, margin_cos: float = 0.5, margin_distmat: float = 0.25
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VA-VAE's margin losses between the projected latent z' and the foundation features f, both (B, D, h, w).

    cos term:     mean_{b,i} relu(1 − m1 − cos(z'_i, f_i))
    distmat term: mean_{b,i,j} relu(|cos(z'_i, z'_j) − cos(f_i, f_j)| − m2)
    Returns (cos + distmat, {"cos": ..., "distmat": ...}), float32.
    """
    z, f = projected.float(), features.detach().float()
    cos_term = F.relu(1.0 - margin_cos - F.cosine_similarity(z, f, dim=1)).mean()
    zn = F.normalize(z.flatten(2), dim=1)  # (B, D, N)
    fn = F.normalize(f.flatten(2), dim=1)
    sim_z = torch.einsum("bci,bcj->bij", zn, zn)
    sim_f = torch.einsum("bci,bcj->bij", fn, fn)
    distmat_term = F.relu((sim_z - sim_f).abs() - margin_distmat).mean()
    return cos_term + distmat_term, {"cos": cos_term, "distmat": distmat_term}


class FoundationFeatures(FrozenModule):
    """A frozen DINOv2 whose patch features, resized to a latent grid, are the VF loss's targets.

    Images in [−1, 1] are normalised with ImageNet statistics and resized so that one patch covers about
    16 pixels (256² -> 224², DINOv2's 16×16 patch grid), then the patch tokens (CLS dropped) are
    bilinearly resized to the latent's (h, w). VA-VAE instead feeds [−1, 1] resized to 224² without
    antialiasing (docs/recipe.md lists each difference).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.patch_size = int(model.config.patch_size)
        self.width = int(model.config.hidden_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, 3, H, W) in [−1, 1] -> (B, width, *grid) float32."""
        b, _, h, w = images.shape
        rows, cols = max(1, round(h / 16)), max(1, round(w / 16))
        x = ((images.float() + 1) / 2 - self.mean) / self.std
        x = F.interpolate(x, size=(rows * self.patch_size, cols * self.patch_size), mode="bilinear", antialias=True)
        tokens = self.model(pixel_values=x.to(self.model.dtype)).last_hidden_state  # (B, 1 + R + rows·cols, D)
        patches = tokens[:, -rows * cols :].float()
        feats = patches.transpose(1, 2).reshape(b, self.width, rows, cols)
        return F.interpolate(feats, size=tuple(grid), mode="bilinear", align_corners=False)


def build_foundation(name_or_path: str = DINOV2_BASE, random_init: bool = False) -> FoundationFeatures:
    """The frozen DINOv2 (transformers' Dinov2Model) of the VF loss; random weights for offline smoke runs."""
    if random_init:
        bar = "!" * 88
        logger.warning(
            f"\n{bar}\n!! the VF loss uses a RANDOM DINOv2 (perception_weights=random): smoke runs only\n{bar}"
        )
        try:
            config = Dinov2Config.from_pretrained(name_or_path)
        except OSError:
            if name_or_path not in DINOV2_ARCHITECTURES:
                raise PerceptionWeightsError(
                    f"no DINOv2 config for {name_or_path!r} offline: give {DINOV2_BASE}, {DINOV2_LARGE} or a local "
                    "folder with --vf_model"
                ) from None
            config = Dinov2Config(**DINOV2_ARCHITECTURES[name_or_path])
        return FoundationFeatures(Dinov2Model(config))
    try:
        model = Dinov2Model.from_pretrained(name_or_path)
    except OSError as e:
        raise PerceptionWeightsError(
            f"cannot load DINOv2 {name_or_path!r} for the VF loss ({str(e).splitlines()[0]}): give a local folder "
            "with --vf_model, or --perception_weights random for a smoke run"
        ) from None
    return FoundationFeatures(model)


def build_vf_projection(latent_channels: int, width: int) -> nn.Conv2d:
    """The trainable 1×1 conv z -> z' from the latent channels to the foundation model's width, without bias
    as VA-VAE's (`linear_proj`, reverse_proj: bias=False): a bias could take DINOv2's mean feature and meet
    part of the cosine term without z moving."""
    return nn.Conv2d(latent_channels, width, kernel_size=1, bias=False)


# ----------------------------------------------------------------------------------------
# Latent noise augmentation (--latent_noise_aug; the decoder side of σ-VAE / l-DeTok's idea)
# ----------------------------------------------------------------------------------------


def add_latent_noise(z: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """z + σ_b·s·ε: σ_b ~ U[0, sigma_max] per image, s the batch's latent std (detached: one unit of the
    normalised latent, whose scaling_factor is 1/std of sampled latents), ε ~ N(0, I).

    Drawn from the global RNG, as the posterior's own noise (a resumed run restores it); gradients flow to z.
    """
    scale = z.detach().float().std()
    sigma = torch.rand(z.shape[0], 1, 1, 1, device=z.device) * sigma_max
    noise = torch.randn(z.shape, device=z.device)
    return z + (sigma * scale * noise).to(z.dtype)
