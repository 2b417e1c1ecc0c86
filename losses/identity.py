"""ID loss: distance between MoCo ResNet-50 features of x̂ and of x (Transfusion's "L_ID").

The recipe (docs/recipe.md, section "ID loss"), as the reference implementation has it: kornia
bicubic resize to 224 (Gaussian antialias), [−1, 1] → ImageNet normalisation, the full MoCo v2
`encoder_q` output (128-d projection, not normalised), MSE. MoCo v3 ResNet-50 checkpoints load
too (256-d projection).
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import urllib.parse

import kornia
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from common.errors import PerceptionWeightsError
from common.helpers import FrozenModule, key_mismatch, one_line
from losses.separable import deterministic_algorithms, deterministic_resize
from losses.weights import fetch_checkpoint

logger = logging.getLogger(__name__)

MOCO_V2_800EP_URL = "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The query encoder's name inside each MoCo version's checkpoint (after DDP's "module.").
_ENCODER_PREFIX = {"v2": "encoder_q.", "v3": "base_encoder."}
_MOCO_HINT = "pass a local MoCo checkpoint path or --perception_weights random"


def build_moco_encoder(version: str = "v2") -> nn.Module:
    """A torchvision ResNet-50 whose `fc` is the MoCo projection head (v2: 2048→2048→128; v3: 2048→4096→256)."""
    net = torchvision.models.resnet50(weights=None)
    if version == "v2":
        net.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(inplace=True), nn.Linear(2048, 128))
    elif version == "v3":
        net.fc = nn.Sequential(
            nn.Linear(2048, 4096, bias=False),
            nn.BatchNorm1d(4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, 256, bias=False),
            nn.BatchNorm1d(256, affine=False),
        )
    else:
        raise ValueError(f"unknown MoCo version {version!r}; expected 'v2' or 'v3'")
    return net


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _read_checkpoint(path: str) -> dict:
    """torch.load with weights_only=True: a pickle that would run code is refused, not executed."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise PerceptionWeightsError(
            f"refused to load {path}: not a plain weights file (weights_only unpickling failed: {one_line(err, name=False)})"
        ) from None
    if not isinstance(ckpt, dict):
        raise PerceptionWeightsError(f"{path} holds a {type(ckpt).__name__}, not a MoCo checkpoint dict")
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict):
        raise PerceptionWeightsError(f"{path}: 'state_dict' is a {type(state).__name__}, not a dict")
    return state


def _encoder_state(state: dict, path: str) -> tuple[str, dict]:
    """(version, query-encoder state dict with its prefix stripped) of a MoCo v2 or v3 checkpoint."""
    for version, name in _ENCODER_PREFIX.items():
        for prefix in ("module." + name, name):
            encoder = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if encoder:
                return version, encoder
    raise PerceptionWeightsError(
        f"{path} is not a MoCo v2/v3 checkpoint: no 'module.encoder_q.*' or 'module.base_encoder.*' keys "
        f"({len(state)} keys, e.g. {_first(sorted(state))})"
    )


def load_moco(path_or_url: str | os.PathLike = MOCO_V2_800EP_URL) -> nn.Module:
    """MoCo v2 or v3 ResNet-50 query encoder (with its projection head) from a file or URL, frozen, eval.

    A URL goes through the torch hub cache (`<hub dir>/checkpoints/<file name>`) and is
    downloaded only when absent and the network is there. Loading is strict; a key or shape
    mismatch raises PerceptionWeightsError naming the first offending keys and their counts.
    """
    path = os.fspath(path_or_url)
    if urllib.parse.urlparse(path).scheme in ("http", "https"):
        path = fetch_checkpoint(path, _MOCO_HINT)
    elif not os.path.isfile(path):
        raise PerceptionWeightsError(f"MoCo checkpoint {path} does not exist; {_MOCO_HINT}")
    version, encoder_state = _encoder_state(_read_checkpoint(path), path)
    net = build_moco_encoder(version)
    expected = net.state_dict()
    missing, unexpected = key_mismatch(expected, encoder_state)
    if missing or unexpected:
        raise PerceptionWeightsError(
            f"{path} does not match a MoCo {version} ResNet-50: {len(missing)} missing keys ({_first(missing)}), "
            f"{len(unexpected)} unexpected keys ({_first(unexpected)})"
        )
    wrong = sorted(k for k in expected if tuple(expected[k].shape) != tuple(encoder_state[k].shape))
    if wrong:
        k = wrong[0]
        raise PerceptionWeightsError(
            f"{path} does not match a MoCo {version} ResNet-50: {len(wrong)} keys with wrong shapes "
            f"({k}: {tuple(encoder_state[k].shape)} vs {tuple(expected[k].shape)}; {_first(wrong)})"
        )
    net.load_state_dict(encoder_state, strict=True)
    return net.eval().requires_grad_(False)


def moco_resize(x: torch.Tensor, size: int = 224) -> torch.Tensor:
    """The reference implementation's resize: kornia bicubic, align_corners=True, Gaussian antialias when shrinking.

    docs/recipe.md, section "ID loss".

    Under torch.use_deterministic_algorithms (`--deterministic`) the same linear map as two matmuls, whose backward
    is deterministic on CUDA (kornia's reflect padding and bicubic sampling are not).

    Not F.interpolate(antialias=True): kornia blurs with σ = (f − 1)/2 and then samples plain
    bicubic, a different kernel (up to 1.2 apart on 256² images).
    """
    resize = functools.partial(_kornia_resize, size=size)
    if deterministic_algorithms():  # --deterministic: the same resize as two matmuls (losses/separable.py)
        return deterministic_resize(x, resize, ("moco_resize", size))
    return resize(x)


def _kornia_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return kornia.geometry.transform.resize(
        x, (size, size), interpolation="bicubic", align_corners=True, antialias=True
    )


class IdentityLoss(FrozenModule):
    """MSE (or 1 − cos) between MoCo features of x̂ and x; x's features under no_grad, gradient to x̂ only.

    feature="projection": the encoder's full output (MoCo v2: 128-d), MSE — the recipe.
    feature="pooled": the 2048-d average-pooled trunk features, 1 − cosine, mean over batch.
    """

    def __init__(self, encoder: nn.Module, feature: str = "projection", size: int = 224):
        super().__init__()
        if feature not in ("projection", "pooled"):
            raise ValueError(f"unknown ID feature {feature!r}; expected 'projection' or 'pooled'")
        self.encoder = encoder
        self.feature = feature
        self.size = size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [−1, 1] → (B, D) MoCo features.

        The projection head runs in float32 under any autocast (torchvision's ResNet forward otherwise): the
        gradient that enters it is id_weight·C·H·W/B times any loss scale, which overflows fp16.
        """
        x = moco_resize(x, self.size)  # (B, 3, 224, 224)
        x = ((x + 1) / 2 - self.mean) / self.std
        net = self.encoder
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        x = torch.flatten(net.avgpool(x), 1)  # (B, 2048)
        if self.feature == "pooled":
            return x
        with torch.autocast(x.device.type, enabled=False):
            return net.fc(x.float())

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.features(inputs).float()
        pred = self.features(reconstructions).float()
        if self.feature == "projection":
            return F.mse_loss(pred, target)
        return (1 - F.cosine_similarity(pred, target, dim=1)).mean()


def build_identity_loss(
    weights: str | os.PathLike | None = MOCO_V2_800EP_URL, *, feature: str = "projection", random_init: bool = False
) -> IdentityLoss:
    """IdentityLoss on MoCo weights from `weights` (path or URL), or on a random MoCo v2 net when random_init."""
    if random_init:
        logger.warning("ID loss uses a RANDOM MoCo ResNet-50 (perception_weights=random): smoke runs only")
        encoder = build_moco_encoder("v2")
    else:
        if weights is None:
            raise PerceptionWeightsError(f"no MoCo weights given; {_MOCO_HINT}")
        encoder = load_moco(weights)
    return IdentityLoss(encoder, feature=feature)
