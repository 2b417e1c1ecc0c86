"""Pure loss terms of the Transfusion VAE recipe; each one is a formula of docs/recipe.md, section "Loss".

Every function here is stateless and returns float32 tensors: the sums over C·H·W of a
256² image (196,608 terms) are too coarse in bf16, so inputs are upcast before reducing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def reconstruction_nll(
    inputs: torch.Tensor,
    recon: torch.Tensor,
    lpips_per_image: torch.Tensor | None = None,
    id_loss: torch.Tensor | None = None,
    l1_weight: float = 1.0,
    lpips_weight: float = 1.0,
    id_weight: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The recipe's nll: Σ_{C,H,W} r / B with r = l1·|x − x̂| + lpips·LPIPS_b + id·ID and logvar 0.

    docs/recipe.md, section "Loss", gives the normalisation and where it comes from.

    LPIPS (one value per image) and ID (one scalar) are broadcast over the C·H·W pixels
    before the sum, so each weighs C·H·W times its value; that scale is what the 1e-6 KL
    weight and the adaptive GAN weight are calibrated against.

    Returns (nll, parts) where parts holds each unweighted term in nll units, so that
    nll == l1_weight·parts["l1"] + lpips_weight·parts["lpips"] + id_weight·parts["id"].
    """
    batch = inputs.shape[0]
    pixels = inputs[0].numel()  # C·H·W
    l1 = (inputs.float() - recon.float()).abs().sum() / batch
    zero = l1.new_zeros(())
    lpips_term = zero if lpips_per_image is None else lpips_per_image.float().reshape(batch).sum() * pixels / batch
    id_term = zero if id_loss is None else id_loss.float().reshape(()) * pixels
    nll = l1_weight * l1 + lpips_weight * lpips_term + id_weight * id_term
    return nll, {"l1": l1, "lpips": lpips_term, "id": id_term}


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) = 0.5·Σ_{C,H,W}(μ² + σ² − 1 − log σ²), mean over the batch."""
    mean = mean.float()
    logvar = logvar.float().clamp(-30.0, 20.0)
    per_sample = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)  # (B,)
    return per_sample.mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss 0.5·(mean relu(1 − D(x)) + mean relu(1 + D(x̂)))."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator adversarial term g = −mean D(x̂)."""
    return -logits_fake.float().mean()


def adaptive_weight(
    nll_grad: torch.Tensor, gan_grad: torch.Tensor, eps: float = 1e-4, max_value: float = 1e4
) -> torch.Tensor:
    """λ = ‖∇_W nll‖ / (‖∇_W g‖ + eps), clamped to [0, max_value] and detached."""
    nll_norm = torch.linalg.vector_norm(nll_grad.detach().float())
    gan_norm = torch.linalg.vector_norm(gan_grad.detach().float())
    return (nll_norm / (gan_norm + eps)).clamp(0.0, max_value).detach()


# conv_weight_grad upcasts its input in batch chunks of at most this many bytes (float32), not all at once.
WEIGHT_GRAD_CHUNK_BYTES = 64 * 2**20


def conv_weight_grad(
    layer_input: torch.Tensor, conv: nn.Conv2d, grad_output: torch.Tensor, chunk_bytes: int = WEIGHT_GRAD_CHUNK_BYTES
) -> torch.Tensor:
    """∂L/∂conv.weight from the conv's input and ∂L/∂(conv output), in float32.

    The weight gradient of a convolution only needs those two tensors, so the adaptive
    weight can be had without a second backward pass through the networks after the conv.
    `conv` may be any object with the attributes of an nn.Conv2d (weight, stride, padding,
    dilation, groups, padding_mode).

    The gradient is a sum over the batch: an input in bf16/fp16 (autocast) is upcast and summed chunk by chunk
    over the batch, so that no float32 copy of the whole input (~1 GB for decoder.conv_out's at batch 32, 256²)
    is made; at most `chunk_bytes` of it (one image at least) exist at a time. A float32 input is used as it is.
    """
    padding = conv.padding
    if isinstance(padding, str):
        raise ValueError(f"conv_weight_grad needs numeric padding, got padding={padding!r}")
    layer_input, grad_output = layer_input.detach(), grad_output.detach().float()
    padding_mode = getattr(conv, "padding_mode", "zeros")
    batch = layer_input.shape[0]
    step = batch
    if layer_input.dtype != torch.float32 or padding_mode != "zeros":
        step = max(1, min(batch, chunk_bytes // max(4 * layer_input[0].numel(), 1)))
    grad = None
    with torch.no_grad():
        for start in range(0, batch, step):
            x = layer_input[start : start + step].float()
            conv_padding = padding
            if padding_mode != "zeros":
                # Non-zero padding modes pad the input explicitly and then run an unpadded conv.
                pad = [p for p in reversed(padding) for _ in range(2)]
                x = F.pad(x, pad, mode=padding_mode)
                conv_padding = (0, 0)
            part = torch.nn.grad.conv2d_weight(
                x,
                conv.weight.shape,
                grad_output[start : start + step],
                stride=conv.stride,
                padding=conv_padding,
                dilation=conv.dilation,
                groups=conv.groups,
            )
            grad = part if grad is None else grad.add_(part)
    return grad


def gan_ramp(step: int, disc_start: int, ramp_steps: int) -> float:
    """GAN gate: 0 before disc_start, then (step − disc_start)/ramp_steps capped at 1.

    ramp_steps 0 gives the recipe's hard gate (the reference implementation's): 1 from disc_start on.
    """
    if step < disc_start:
        return 0.0
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - disc_start) / ramp_steps)


def lecam_reg(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, ema_real: torch.Tensor, ema_fake: torch.Tensor
) -> torch.Tensor:
    """LeCAM regulariser (Tseng et al. 2021): mean relu(D(x) − ema_fake)² + mean relu(ema_real − D(x̂))²."""
    real_term = F.relu(logits_real.float() - ema_fake.float()).pow(2).mean()
    fake_term = F.relu(ema_real.float() - logits_fake.float()).pow(2).mean()
    return real_term + fake_term
