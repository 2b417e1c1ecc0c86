"""Losses of the Transfusion VAE: pure terms, the frozen perception nets, the PatchGAN, the loss module."""

from common.errors import PerceptionWeightsError
from losses.discriminator import NLayerDiscriminator
from losses.functional import (
    adaptive_weight,
    conv_weight_grad,
    gan_ramp,
    generator_adv_loss,
    hinge_d_loss,
    kl_loss,
    lecam_reg,
    reconstruction_nll,
)
from losses.identity import MOCO_V2_800EP_URL, IdentityLoss, build_identity_loss, build_moco_encoder, load_moco
from losses.perceptual import LPIPS, VGG16_URL, build_lpips
from losses.vae_loss import LeCamEMA, TransfusionLoss

__all__ = [
    "LPIPS",
    "MOCO_V2_800EP_URL",
    "VGG16_URL",
    "IdentityLoss",
    "LeCamEMA",
    "NLayerDiscriminator",
    "PerceptionWeightsError",
    "TransfusionLoss",
    "adaptive_weight",
    "build_identity_loss",
    "build_lpips",
    "build_moco_encoder",
    "conv_weight_grad",
    "gan_ramp",
    "generator_adv_loss",
    "hinge_d_loss",
    "kl_loss",
    "lecam_reg",
    "load_moco",
    "reconstruction_nll",
]
