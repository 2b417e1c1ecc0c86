"""The Transfusion VAE loss: L1 + LPIPS + ID + KL + adaptively weighted hinge GAN, and the D loss.

One module owns the frozen perception nets (LPIPS, MoCo), the discriminator, the start
gate, the adaptive weight and LeCAM's EMAs; the training loop only calls
`generator_loss(...)` and `discriminator_loss(...)`, each returning `(loss, logs)` with
logs as detached 0-d tensors (no host syncs, no logging in here).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

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
from losses.identity import MOCO_V2_800EP_URL, build_identity_loss
from losses.perceptual import build_lpips
from losses.regularisers import (
    DINOV2_BASE,
    VF_ADAPTIVE_WEIGHT_MAX,
    build_foundation,
    equivariance_nll,
    vf_loss,
)


class LeCamEMA(nn.Module):
    """Zero-debiased EMAs of D's mean logits on real and on fake images, as in the official LeCAM code."""

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("biased_real", torch.zeros(()))
        self.register_buffer("biased_fake", torch.zeros(()))
        self.register_buffer("steps", torch.zeros(()))

    @torch.no_grad()
    def update(self, real_mean: torch.Tensor, fake_mean: torch.Tensor) -> None:
        """Fold one step's mean logits into the EMAs."""
        self.biased_real.mul_(self.decay).add_(real_mean.float(), alpha=1 - self.decay)
        self.biased_fake.mul_(self.decay).add_(fake_mean.float(), alpha=1 - self.decay)
        self.steps.add_(1)

    def values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ema_real, ema_fake), debiased for their zero start; valid after the first update."""
        debias = 1 - torch.pow(self.decay, self.steps)
        return self.biased_real / debias, self.biased_fake / debias


def _as_conv(last_layer: nn.Conv2d | torch.Tensor):
    """The last conv (weight + geometry). A bare weight is taken as stride 1, 'same' zero padding, like
    diffusers' decoder.conv_out (k3, p1)."""
    if isinstance(last_layer, nn.Conv2d):
        return last_layer
    kh, kw = last_layer.shape[-2:]
    return SimpleNamespace(
        weight=last_layer, stride=(1, 1), padding=(kh // 2, kw // 2), dilation=(1, 1), groups=1, padding_mode="zeros"
    )


class _InputKeeper:
    """The forward hook of `watch(..., fast=True)`: keeps the watched layer's latest input in `.value`.

    The hook holds this small object, not the loss, so that a deep copy of the watched model (EMA
    validation, export) copies none of the loss's networks.
    """

    def __init__(self, active: bool = True) -> None:
        self.value: torch.Tensor | None = None
        self.active = active

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self.active:
            self.value = inputs[0]

    def __deepcopy__(self, memo: dict) -> _InputKeeper:
        # A copy of the model is not trained through this loss: its hook keeps nothing, so running
        # the copy neither overwrites what the loss is about to read nor holds an activation alive.
        return _InputKeeper(active=False)


# The scale of λ's own gradients under fp16 autocast, per image of the batch (see `fp16_grad_scale`).
FP16_GRAD_SCALE_PER_IMAGE = 2.0**6


def fp16_grad_scale(batch: int) -> float:
    """The fixed power of two by which the loss's own gradients (λ's, and the fast path's ∂nll/∂x̂) are taken
    under fp16 autocast: 2^6 times the largest power of two ≤ batch, whatever the GradScaler's scale.

    Every term is a mean over the batch, so every gradient of the loss is ∝ 1/B; times B the magnitudes no longer
    depend on the batch. benchmarks/fp16_grad_magnitudes.py (random nets, B=1): nll's largest gradient at x̂ and
    inside the fp16 parts of its backward (LPIPS' and MoCo's heads run in float32) is a few hundred at 128² and
    256²; × 2^6 that stays inside fp16's 65504. The GAN term's gradient at x̂ (~1e-6 at 256², B=32, from D's
    0.02-σ init) × 2^11 is ~2e-3, above fp16's smallest normal (6.1e-5) instead of subnormal.
    """
    return FP16_GRAD_SCALE_PER_IMAGE * 2.0 ** (max(int(batch), 1).bit_length() - 1)


def _fp16_autocast(device: torch.device) -> bool:
    return torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16


def _scaled_grad(
    output: torch.Tensor, inputs: torch.Tensor, grad_scale: float | torch.Tensor | None, retain_graph: bool = False
) -> torch.Tensor:
    """∂output/∂inputs in float32. With grad_scale, back-propagates output·grad_scale and divides the
    result by grad_scale, so that fp16 intermediate gradients stay above fp16's underflow."""
    if grad_scale is None:
        return torch.autograd.grad(output, inputs, retain_graph=retain_graph)[0].float()
    grad = torch.autograd.grad(output * grad_scale, inputs, retain_graph=retain_graph)[0]
    return grad.float() / grad_scale


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` averaged over the default process group's ranks (itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    world = dist.get_world_size()
    if world == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)  # SUM: gloo has no AVG
    return values / world


def _call_without_param_grads(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) with gradient flowing to x only, never into module's parameters."""
    if not any(p.requires_grad for p in module.parameters()):
        return module(x)
    params = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, params, (x,))


@dataclass
class _GeneratorStep:
    """What every term of one `generator_loss` call reads (and `nll_for_encoder`, which the λ path sets)."""

    inputs: torch.Tensor
    reconstructions: torch.Tensor
    global_step: int
    discriminator: nn.Module
    conv: nn.Conv2d | SimpleNamespace
    grad_scale: float | torch.Tensor | None
    weight_scale: float | torch.Tensor | None  # nll's gradients at a weight (sums over every pixel)
    kl: torch.Tensor
    nll_for_encoder: torch.Tensor | None = None

    @property
    def zero(self) -> torch.Tensor:
        return self.kl.new_zeros(())


class TransfusionLoss(nn.Module):
    """L_VAE = L1 + 1.0·LPIPS + 0.5·λ·L_GAN + 0.2·L_ID + 1e-6·L_KL (normalisation: docs/recipe.md, "Loss").

    perception_weights "pretrained" loads VGG16 (torch hub cache) and MoCo (`moco_weights`, path
    or URL); "random" builds both random, for offline smoke runs. `perceptual`, `identity` and
    `discriminator` accept ready modules instead (tests, custom nets); injected perception nets
    are frozen here. A term with weight 0 has no network (attribute None).
    """

    # fp16: the start of D's own grad scaler (train_vae.Trainer), not torch's 2^16: D's loss is a mean, and on the
    # tiny preset its gradients overflowed at 2^17 (tests/test_fp16.py).
    D_FP16_INIT_SCALE = 2.0**10

    def __init__(
        self,
        *,
        l1_weight: float = 1.0,
        lpips_weight: float = 1.0,
        gan_weight: float = 0.5,
        id_weight: float = 0.2,
        kl_weight: float = 1e-6,
        disc_start: int = 50001,
        adaptive_weight_max: float = 1e4,
        gan_ramp_steps: int = 0,
        lecam_weight: float = 0.0,
        lecam_decay: float = 0.999,
        perception_weights: str = "pretrained",
        moco_weights: str | os.PathLike | None = MOCO_V2_800EP_URL,
        id_feature: str = "projection",
        perceptual: nn.Module | None = None,
        identity: nn.Module | None = None,
        discriminator: nn.Module | None = None,
        equivariance_weight: float = 0.0,
        vf_weight: float = 0.0,
        vf_margin_cos: float = 0.5,
        vf_margin_distmat: float = 0.25,
        vf_margin_start: int = 0,
        vf_model: str = DINOV2_BASE,
        foundation: nn.Module | None = None,
    ):
        super().__init__()
        if perception_weights not in ("pretrained", "random"):
            raise ValueError(f"perception_weights must be 'pretrained' or 'random', got {perception_weights!r}")
        weights = dict(
            l1_weight=l1_weight,
            lpips_weight=lpips_weight,
            gan_weight=gan_weight,
            id_weight=id_weight,
            kl_weight=kl_weight,
            lecam_weight=lecam_weight,
            gan_ramp_steps=gan_ramp_steps,
            equivariance_weight=equivariance_weight,
            vf_weight=vf_weight,
        )
        negative = [name for name, value in weights.items() if value < 0]
        if negative:
            raise ValueError(f"loss weights must be >= 0, got negative {negative}")
        if not 0.0 <= lecam_decay < 1.0:
            raise ValueError(f"lecam_decay must be in [0, 1), got {lecam_decay}")
        self.l1_weight = l1_weight
        self.lpips_weight = lpips_weight
        self.gan_weight = gan_weight
        self.id_weight = id_weight
        self.kl_weight = kl_weight
        self.disc_start = disc_start
        self.adaptive_weight_max = adaptive_weight_max
        self.gan_ramp_steps = gan_ramp_steps
        self.lecam_weight = lecam_weight
        self.equivariance_weight = equivariance_weight
        self.vf_weight = vf_weight
        self.vf_margin_cos = vf_margin_cos
        self.vf_margin_distmat = vf_margin_distmat
        self.vf_margin_start = vf_margin_start
        random_weights = perception_weights == "random"

        if lpips_weight == 0:
            perceptual = None
        elif perceptual is None:
            perceptual = build_lpips(pretrained=not random_weights)
        if id_weight == 0:
            identity = None
        elif identity is None:
            identity = build_identity_loss(moco_weights, feature=id_feature, random_init=random_weights)
        for frozen in (perceptual, identity):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
        self.perceptual = perceptual
        self.identity = identity
        # The VF loss's frozen DINOv2 (losses.regularisers.FoundationFeatures: forward(images, grid), .width).
        if vf_weight == 0:
            foundation = None
        elif foundation is None:
            foundation = build_foundation(vf_model, random_init=random_weights)
        if foundation is not None:
            foundation.requires_grad_(False).eval()
        self.foundation = foundation
        self.discriminator = NLayerDiscriminator() if discriminator is None else discriminator
        self.lecam = LeCamEMA(lecam_decay)
        self._watched: nn.Conv2d | None = None
        self._keeper = _InputKeeper()
        self._watch_fast = False

    def watch(self, last_layer: nn.Conv2d, fast: bool = True) -> None:
        """Measure λ on `last_layer` (the decoder's conv_out) in every `generator_loss` call.

        fast=True registers a forward hook that keeps the layer's input, which turns on the
        fast path (see `generator_loss`); fast=False measures λ with two `autograd.grad` calls
        on the layer's weight, as the reference implementation does. Same values either way.
        The hook holds only a small keeper of that input; a deep copy of the model gets a hook
        that keeps nothing.
        """
        self._watched, self._watch_fast = last_layer, fast
        if fast:
            last_layer.register_forward_hook(self._keeper)

    @property
    def _watched_input(self) -> torch.Tensor | None:
        """The input the hook captured and `generator_loss` has not taken yet (None between steps)."""
        return self._keeper.value

    def train(self, mode: bool = True) -> TransfusionLoss:
        """Train mode reaches the discriminator only; the perception nets stay in eval."""
        super().train(mode)
        for frozen in (self.perceptual, self.identity, self.foundation):
            if frozen is not None:
                frozen.train(False)
        return self

    def gan_active(self, global_step: int) -> bool:
        """Whether the GAN terms (G's g and D's loss) are on at this step."""
        return self.gan_weight > 0 and global_step >= self.disc_start

    def _nll(self, inputs: torch.Tensor, reconstructions: torch.Tensor):
        inputs = inputs.detach()
        lpips_per_image = None if self.perceptual is None else self.perceptual(inputs, reconstructions)  # (B,)
        id_loss = None if self.identity is None else self.identity(inputs, reconstructions)  # ()
        return reconstruction_nll(
            inputs, reconstructions, lpips_per_image, id_loss, self.l1_weight, self.lpips_weight, self.id_weight
        )

    def generator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        mean: torch.Tensor,
        logvar: torch.Tensor,
        global_step: int,
        *,
        discriminator: nn.Module | None = None,
        last_layer_weight: nn.Conv2d | torch.Tensor | None = None,
        last_layer_input: torch.Tensor | None = None,
        grad_scale: float | torch.Tensor | None = None,
        equivariance: tuple[torch.Tensor, torch.Tensor] | None = None,
        latent_projection: torch.Tensor | None = None,
        encoder_last_layer: nn.Conv2d | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Autoencoder loss nll + kl_weight·KL + gan_weight·ramp·λ·g; returns (loss, logs).

        inputs / reconstructions: (B, 3, H, W) in [−1, 1]; mean / logvar: the posterior's (B, C, h, w).
        last_layer_weight: default the layer given to `watch`. Else decoder.conv_out (the module: its geometry is used) or its weight
        (then taken as stride 1, padding k//2, like diffusers' conv_out); λ is measured on it.
        last_layer_input: the input of decoder.conv_out (default: what `watch(..., fast=True)`
        captured in the forward that made `reconstructions`, released here), which turns on the fast path. `reconstructions` must then be that conv's output (a dtype cast
        aside). The fast path back-propagates once through LPIPS/MoCo and once through D to x̂
        only, gets ∇_W from the conv's input, and returns a surrogate with the same value and
        the same autoencoder gradients as the direct path, which back-propagates through the
        perception nets and D three times (two autograd.grad for λ, then the caller's backward).
        discriminator: defaults to self.discriminator; gradients never reach its parameters.
        grad_scale: the scale of the loss's own gradients (λ's two, the fast path's ∂nll/∂x̂ and ∂g/∂x̂, the VF
        weight's two): each is taken of term·grad_scale and divided by it in float32. None: under fp16
        autocast `fp16_grad_scale(B)`, a fixed power of two of its own, independent of any GradScaler
        (unscaled, g's gradients at an fp16 x̂, ~1e-6 and below early on, are subnormal or zero, which
        inflates λ up to its clamp; at the GradScaler's scale, nll's overflow until the scaler has fallen
        far), and for nll's gradient at a weight (the direct path's ∇_W nll, the VF weight's ∇nll), a sum
        over every pixel, that scale divided by H·W rounded up to a power of two; otherwise (bf16, fp32)
        unscaled. A float or a 1-element tensor (never read on the host); in fp32 a power-of-two scale
        gives the same values to the bit.

        With autograd off (evaluation) λ is 0, as in the reference implementation. Logs: total, nll, kl, gan (g),
        adaptive_weight (λ), gan_factor (gan_weight·ramp) and the raw terms l1 (mean |x − x̂|),
        lpips (mean per image) and id, each a detached float32 0-d tensor.

        Latent regularisers (docs/recipe.md, "Latent regularisers (off by default)"); with their weights 0
        and these arguments None, nothing of them runs and the loss, logs and gradients are the recipe's:
        equivariance: (T(x), decode(T(z))) of this step's transform, or None on a step that drew none; adds
        equivariance_weight·nll(T(x), decode(T(z))) (L1 + LPIPS, losses.regularisers.equivariance_nll).
        Logged (with equivariance_weight > 0) as `equivariance`, that nll per pixel of T(x) (0 without a draw).
        latent_projection: z' = the trainable 1×1 projection of the sampled latent, (B, D, h, w); adds
        vf_weight·λ_vf·VF(z', DINOv2(x)), λ_vf = ‖∇nll‖/‖∇VF‖ at `encoder_last_layer` (encoder.conv_out or its
        weight), clamped to [0, 1e8], as VA-VAE. Logged (with vf_weight > 0) as vf, vf_cos, vf_distmat and
        vf_adaptive_weight.
        """
        if last_layer_weight is None:
            if self._watched is None:
                raise ValueError("generator_loss needs last_layer_weight, or a layer given to watch() first")
            last_layer_weight = self._watched
            if self._watch_fast and last_layer_input is None:
                last_layer_input, self._keeper.value = self._keeper.value, None
        if isinstance(grad_scale, torch.Tensor):
            grad_scale = grad_scale.detach().float().reshape(())  # a (1,) tensor; the losses are 0-d
        # nll's gradients at a weight are sums over every pixel: under fp16 they get 1/H·W of x̂'s scale.
        weight_scale = grad_scale
        if grad_scale is None and _fp16_autocast(inputs.device):
            grad_scale = fp16_grad_scale(inputs.shape[0])
            weight_scale = grad_scale / 2.0 ** math.ceil(math.log2(inputs.shape[-2] * inputs.shape[-1]))
        step = _GeneratorStep(
            inputs=inputs,
            reconstructions=reconstructions,
            global_step=global_step,
            discriminator=self.discriminator if discriminator is None else discriminator,
            conv=_as_conv(last_layer_weight),
            grad_scale=grad_scale,
            weight_scale=weight_scale,
            kl=kl_loss(mean, logvar),
        )
        if last_layer_input is None or not torch.is_grad_enabled():
            loss, logs = self._direct_terms(step)
        else:
            loss, logs = self._fast_terms(step, last_layer_input, need_encoder_nll=latent_projection is not None)
        for term, term_logs in (
            self._equivariance_term(step, equivariance),
            self._vf_term(step, latent_projection, encoder_last_layer),
        ):
            if term is not None:
                logs["total"] = logs["total"] + term.detach()
                loss = loss + term
            logs.update(term_logs)
        return loss, logs

    # -- the terms of generator_loss: each returns (its addition to the loss or None, its logs) --------------

    def _recipe_logs(self, step: _GeneratorStep, total, nll, parts, g, lam, factor) -> dict[str, torch.Tensor]:
        pixels = step.inputs[0].numel()
        return {
            "total": total,
            "nll": nll.detach(),
            "l1": parts["l1"].detach() / pixels,
            "lpips": parts["lpips"].detach() / pixels,
            "id": parts["id"].detach() / pixels,
            "kl": step.kl.detach(),
            "gan": g.detach(),
            "adaptive_weight": lam.detach(),
            "gan_factor": torch.full_like(step.zero, factor),
        }

    def _gan_factor(self, global_step: int) -> tuple[bool, float]:
        active = self.gan_active(global_step)
        factor = self.gan_weight * gan_ramp(global_step, self.disc_start, self.gan_ramp_steps) if active else 0.0
        return active, factor

    def _direct_terms(self, step: _GeneratorStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """nll + kl_weight·KL + gan_weight·ramp·λ·g, λ from two autograd.grad calls at the conv's weight
        (the reference implementation's path; also every call with autograd off, where λ is 0)."""
        active, factor = self._gan_factor(step.global_step)
        g = lam = step.zero
        nll, parts = self._nll(step.inputs, step.reconstructions)
        if active:
            g = generator_adv_loss(_call_without_param_grads(step.discriminator, step.reconstructions))
            if torch.is_grad_enabled():
                nll_grad = _scaled_grad(nll, step.conv.weight, step.weight_scale, retain_graph=True)
                gan_grad = _scaled_grad(g, step.conv.weight, step.grad_scale, retain_graph=True)
                lam = adaptive_weight(nll_grad, gan_grad, max_value=self.adaptive_weight_max)
        loss = nll + self.kl_weight * step.kl + factor * lam * g
        step.nll_for_encoder = nll
        return loss, self._recipe_logs(step, loss.detach(), nll, parts, g, lam, factor)

    def _fast_terms(
        self, step: _GeneratorStep, last_layer_input: torch.Tensor, need_encoder_nll: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The same value and autoencoder gradients as `_direct_terms`, each frozen net crossed once:
        λ from the conv's input and ∂/∂x̂, and a surrogate whose gradient at x̂ is the direct path's."""
        active, factor = self._gan_factor(step.global_step)
        g = lam = step.zero
        reconstructions = step.reconstructions
        # Gradients w.r.t. a detached copy of x̂ stop at x̂, so each frozen net is crossed once.
        xr = reconstructions.detach().requires_grad_(True)
        nll, parts = self._nll(step.inputs, xr)
        coef = _scaled_grad(nll, xr, step.grad_scale)  # ∂nll/∂x̂, (B, 3, H, W)
        # Same gradients as nll at every autoencoder parameter (for the VF weight at the encoder).
        step.nll_for_encoder = (reconstructions.float() * coef).sum() if need_encoder_nll else None
        if active:
            g = generator_adv_loss(_call_without_param_grads(step.discriminator, xr))
            gan_coef = _scaled_grad(g, xr, step.grad_scale)  # ∂g/∂x̂
            lam = adaptive_weight(
                conv_weight_grad(last_layer_input, step.conv, coef),
                conv_weight_grad(last_layer_input, step.conv, gan_coef),
                max_value=self.adaptive_weight_max,
            )
            coef = coef + (factor * lam) * gan_coef
        total = (nll + self.kl_weight * step.kl + factor * lam * g).detach()
        # d(surrogate)/dx̂ = ∂nll/∂x̂ + gan_weight·ramp·λ·∂g/∂x̂, the direct path's gradient.
        surrogate = (reconstructions.float() * coef.detach()).sum() + self.kl_weight * step.kl
        loss = total + (surrogate - surrogate.detach())
        return loss, self._recipe_logs(step, total, nll, parts, g, lam, factor)

    def _equivariance_term(
        self, step: _GeneratorStep, equivariance: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """equivariance_weight·nll(T(x), decode(T(z))); logged per pixel of T(x) (0 on a step without a draw)."""
        if self.equivariance_weight == 0:
            return None, {}
        if equivariance is None:
            return None, {"equivariance": step.zero}
        target, eq_recon = equivariance
        eq = equivariance_nll(target, eq_recon, self.perceptual, self.l1_weight, self.lpips_weight)
        return self.equivariance_weight * eq, {"equivariance": eq.detach() / target[0].numel()}

    def vf_margins(self, global_step: int) -> tuple[float, float]:
        """(m1, m2) of the VF loss at this step: 0 before `vf_margin_start` (VA-VAE's released schedule trains
        its first stages without margins), the configured margins from it."""
        if global_step < self.vf_margin_start:
            return 0.0, 0.0
        return self.vf_margin_cos, self.vf_margin_distmat

    def _vf_term(
        self,
        step: _GeneratorStep,
        latent_projection: torch.Tensor | None,
        encoder_last_layer: nn.Conv2d | torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """vf_weight·λ_vf·VF(z', DINOv2(x)), λ_vf = ‖∇nll‖/‖∇VF‖ at the encoder's conv_out (VA-VAE); margins
        from `vf_margins`."""
        if self.vf_weight == 0:
            return None, {}
        zero = step.zero
        vf, vf_parts, vf_lam, term = zero, {"cos": zero, "distmat": zero}, zero, None
        if latent_projection is not None:
            if self.foundation is None:
                raise ValueError("latent_projection given but the loss has no foundation model (vf_weight 0)")
            features = self.foundation(step.inputs, latent_projection.shape[-2:])
            vf, vf_parts = vf_loss(latent_projection, features, *self.vf_margins(step.global_step))
            if torch.is_grad_enabled():
                if encoder_last_layer is None:
                    raise ValueError("the VF loss needs encoder_last_layer (the encoder's conv_out)")
                enc_w = _as_conv(encoder_last_layer).weight
                vf_lam = adaptive_weight(
                    _scaled_grad(step.nll_for_encoder, enc_w, step.weight_scale, retain_graph=True),
                    _scaled_grad(vf, enc_w, step.grad_scale, retain_graph=True),
                    max_value=VF_ADAPTIVE_WEIGHT_MAX,
                )
            term = (self.vf_weight * vf_lam) * vf
        logs = {
            "vf": vf.detach(),
            "vf_cos": vf_parts["cos"].detach(),
            "vf_distmat": vf_parts["distmat"].detach(),
            "vf_adaptive_weight": vf_lam,
        }
        return term, logs

    def discriminator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        global_step: int,
        *,
        discriminator: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge D loss on D(x) and D(x̂.detach()) (+ lecam_weight·LeCAM); returns (loss, logs).

        Real and fake go through D in separate calls, as in the reference implementation, so BatchNorm normalises
        each with its own batch statistics. Before disc_start (see gan_active) D is not called
        and the loss is a constant 0 without a graph: skip the D backward and step then.
        With lecam_weight > 0 under torch.distributed, the mean logits that update LeCAM's EMAs are
        averaged over the ranks (one all-reduce of 2 numbers), so every rank must make this call.
        Logs: loss, logits_real, logits_fake (this rank's mean logits), lecam.
        """
        disc = self.discriminator if discriminator is None else discriminator
        zero = torch.zeros((), device=inputs.device)
        if not self.gan_active(global_step):
            return zero, {"loss": zero, "logits_real": zero, "logits_fake": zero, "lecam": zero}
        logits_real = disc(inputs.detach())  # (B, 1, h, w)
        logits_fake = disc(reconstructions.detach())
        loss = hinge_d_loss(logits_real, logits_fake)
        real_mean = logits_real.detach().float().mean()
        fake_mean = logits_fake.detach().float().mean()
        reg = zero
        if self.lecam_weight > 0:
            # Every rank folds the same (all-rank) means into its EMAs, so that the copy rank 0
            # checkpoints is every rank's and a multi-GPU resume continues exactly.
            real_mean_all, fake_mean_all = _mean_over_ranks(torch.stack([real_mean, fake_mean]))
            self.lecam.update(real_mean_all, fake_mean_all)
            ema_real, ema_fake = self.lecam.values()
            reg = lecam_reg(logits_real, logits_fake, ema_real, ema_fake)
            loss = loss + self.lecam_weight * reg
        logs = {"loss": loss.detach(), "logits_real": real_mean, "logits_fake": fake_mean, "lecam": reg.detach()}
        return loss, logs
