"""LPIPS (the `lpips` package v0.1, VGG trunk), frozen and in eval mode for good.

Also home of the weight-fetching helpers the identity loss shares: a cached file is used
as is, and an offline machine gets a one-line error instead of a hanging download.
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.parse
import warnings

import lpips
import torch
from torch import nn

from vae.errors import UserError

logger = logging.getLogger(__name__)

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


_VGG_HINT = "copy torchvision's VGG16 file there or pass --perception_weights random"


class PerceptionWeightsError(UserError, RuntimeError):
    """Weights of a frozen perception network (VGG16 for LPIPS, MoCo for ID) are missing or wrong."""


def hub_checkpoint_path(url: str) -> str:
    """Where torch.hub (and torchvision) cache the file of `url`."""
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _offline_reason(url: str, timeout: float = 3.0) -> str | None:
    """Why `url` cannot be downloaded now (HF_HUB_OFFLINE set, host unreachable), or None."""
    if os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        # A short TCP probe: a firewalled machine would otherwise hang in the download.
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{parsed.hostname} is unreachable ({err.__class__.__name__})"


def fetch_checkpoint(url: str, hint: str) -> str:
    """Local path of `url`'s file: the torch hub cache if present, else a download; `hint` ends the error."""
    path = hub_checkpoint_path(url)
    if os.path.isfile(path):
        return path
    reason = _offline_reason(url)
    if reason is not None:
        raise PerceptionWeightsError(
            f"{os.path.basename(path)} is not in {os.path.dirname(path)} and cannot be downloaded ({reason}): {hint}"
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # torchvision-style names carry a sha256 prefix ("vgg16-397923af.pth"); check it like torch.hub does.
    match = torch.hub.HASH_REGEX.search(os.path.basename(path))
    torch.hub.download_url_to_file(url, path, hash_prefix=match.group(1) if match else None, progress=False)
    return path


class FrozenEval(nn.Module):
    """Base of the frozen perception nets: weights never train and the module never leaves eval mode.

    Training loops call `.train()` on whole module trees; overriding it here keeps dropout off
    and BatchNorm on running statistics whatever a parent does.
    """

    def freeze(self) -> None:
        """Turn off requires_grad everywhere and switch to eval."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenEval:
        return super().train(False)


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


class LPIPS(FrozenEval):
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
        return self.net(inputs, reconstructions).reshape(inputs.shape[0])  # (B,)


def build_lpips(pretrained: bool, vgg_path: str | None = None) -> LPIPS:
    """LPIPS-VGG; pretrained reads torchvision's vgg16-397923af.pth from the hub cache (or `vgg_path`)."""
    return LPIPS(pretrained=pretrained, vgg_path=vgg_path)
