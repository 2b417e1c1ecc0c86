"""The largest gradients in the backward of the loss's nll and of the GAN term g, to place their fp16 scale.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/fp16_grad_magnitudes.py --resolution 128 --batch 1

Float32, random LPIPS/MoCo/D (the pretrained files are not on the machines this ran on): the gradient at x̂ of
nll (L1 + LPIPS + 0.2·ID, the recipe's normalisation) and of g = −mean D(x̂), and the largest gradient at any
conv/linear/BatchNorm output inside the part of their backward that runs in the autocast dtype (LPIPS' 1×1
`lin` layers and MoCo's projection head `fc` run in float32). losses.vae_loss.fp16_grad_scale takes these, times 2^7·B,
to stay inside fp16's range.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

# The repository root, for the trainer's packages: the script runs without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from losses import TransfusionLoss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    loss_fn = TransfusionLoss(perception_weights="random", disc_start=0)
    largest: dict[str, float] = {}

    def keep(name):
        def hook(module, inputs, output):
            if output.requires_grad:
                output.register_hook(
                    lambda g: largest.__setitem__(name, max(largest.get(name, 0.0), g.abs().max().item()))
                )

        return hook

    for name, module in loss_fn.named_modules():
        if name.startswith(("perceptual.net.lin", "identity.encoder.fc")):
            continue  # float32 under autocast
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.BatchNorm2d)):
            module.register_forward_hook(keep(name))
    x = torch.rand(args.batch, 3, args.resolution, args.resolution) * 2 - 1
    xr = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    for term in ("nll", "g"):
        largest.clear()
        value = loss_fn._nll(x, xr)[0] if term == "nll" else -loss_fn.discriminator(xr).float().mean()
        (grad,) = torch.autograd.grad(value, xr)
        inside = max(largest.items(), key=lambda kv: kv[1])
        print(
            f"{term:>3} at {args.resolution}², B={args.batch}: |∂/∂x̂| max {grad.abs().max().item():.3g}, "
            f"median {grad.abs().median().item():.3g}; largest inside: {inside[1]:.3g} ({inside[0]})"
        )


if __name__ == "__main__":
    main()
