"""LPIPS (the `lpips` package v0.1, VGG trunk), frozen and in eval mode for good."""

from __future__ import annotations

import logging
import warnings

import lpips
import torch

from common.errors import PerceptionWeightsError
from common.helpers import FrozenModule
from losses.weights import fetch_checkpoint

logger = logging.getLogger(__name__)

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


_VGG_HINT = "copy torchvision's VGG16 file there or pass --perception_weights random"


def _load_vgg16_trunk(net: lpips.LPIPS, path: str) -> None:
    """Copy torchvision VGG16 `features.*` weights from `path` into the LPIPS trunk slices."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    trunk = {}
    # lpips splits vgg16.features into slice1..slice5 keeping each layer's index as its name.
    for slice_name, block in net.net.named_children():
        for index, layer in block.named_children():
            for name in layer.state_dict():
                trunk[f"net.{slice_name}.{index}.{name}"] = f"features.{index}.{name}"
    missing = [src for src in trunk.values() if src not in state]
    if missing:
        raise PerceptionWeightsError(
            f"{path} is not a torchvision VGG16 state dict: {len(missing)} trunk keys missing, e.g. {missing[:3]}"
        )
    net.load_state_dict({dst: state[src] for dst, src in trunk.items()}, strict=False)


class LPIPS(FrozenModule):
    """LPIPS-VGG distance per image, inputs in [−1, 1]: (B, 3, H, W) × 2 → (B,)."""

    def __init__(self, pretrained: bool = True, vgg_path: str | None = None):
        super().__init__()
        # Resolve the file first: a missing checkpoint fails before seconds of network building.
        trunk_path = (vgg_path or fetch_checkpoint(VGG16_URL, _VGG_HINT)) if pretrained else None
        with warnings.catch_warnings():
            # lpips 0.1.4 calls torchvision's deprecated `pretrained=` argument; nothing to act on.
            warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
            # The trunk is always built random here and, when pretrained, filled from the
            # checkpoint file below, so torchvision never reaches for the network itself. The
            # package's bundled linear-layer weights (lin0..lin4) load in both cases.
            self.net = lpips.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False)
        if trunk_path is not None:
            _load_vgg16_trunk(self.net, trunk_path)
        else:
            logger.warning("LPIPS uses a RANDOM VGG16 backbone (perception_weights=random): smoke runs only")
        self.freeze()

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """`lpips.LPIPS.forward` (v0.1, not spatial) with its head in float32 under any autocast.

        The VGG trunk runs in the autocast dtype; each layer's features are then upcast and the head
        (channel normalisation, squared difference, the 1×1 `lin` layers, the spatial mean) and the
        per-image sum run in float32. In fp16 the head's channel sum of squares overflows for large
        features, and the gradient that enters it, C·H·W/B times the loss scale (the nll's
        normalisation, losses.functional.reconstruction_nll), overflows from the first step on.
        Without autocast this is the package's forward, op for op.
        """
        net = self.net
        outs0 = net.net(net.scaling_layer(inputs))
        outs1 = net.net(net.scaling_layer(reconstructions))
        total = 0
        with torch.autocast(inputs.device.type, enabled=False):
            for kk in range(net.L):
                feats0 = lpips.normalize_tensor(outs0[kk].float())
                feats1 = lpips.normalize_tensor(outs1[kk].float())
                total = total + lpips.lpips.spatial_average(net.lins[kk]((feats0 - feats1) ** 2), keepdim=True)
        return total.reshape(inputs.shape[0])  # (B,), float32


def build_lpips(pretrained: bool, vgg_path: str | None = None) -> LPIPS:
    """LPIPS-VGG; pretrained reads torchvision's vgg16-397923af.pth from the hub cache (or `vgg_path`)."""
    return LPIPS(pretrained=pretrained, vgg_path=vgg_path)
