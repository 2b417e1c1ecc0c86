"""pix2pix NLayer PatchGAN discriminator, as taming-transformers and the reference implementation use it.

Architecture and init: docs/recipe.md, section "Discriminator".
"""

from __future__ import annotations

from torch import nn


def _init_weights(module: nn.Module) -> None:
    """pix2pix init: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0 (conv biases keep the default)."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: k4 convs, 3 → 64 (s2) → 128 (s2) → 256 (s2) → 512 (s1) → 1 (s1); 256² in, 30×30 logits out.

    Parameter names (`main.<i>.*`) match taming-transformers, so discriminator weights of that code family
    (the reference implementation's included) load as they are.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        channels = base_channels
        for n in range(1, n_layers + 1):
            out_channels = base_channels * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            # No conv bias before BatchNorm: BN's shift makes it redundant.
            layers += [
                nn.Conv2d(channels, out_channels, kernel_size=4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.LeakyReLU(0.2),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x):
        return self.main(x)  # (B, 1, H/8 − 2, W/8 − 2)
