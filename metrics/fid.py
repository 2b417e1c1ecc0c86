"""rFID backends: torch-fidelity, pytorch-fid and clean-fid, each with its own package's Inception, resize and distance.

Published VAE tables do not agree on which FID code they ran, and the three packages give different
numbers for the same images (same TF Inception weights, different resize to 299 and slightly
different graphs): a table is comparable only with the backend it was made with. The reference
implementation (lavinal712/AutoencoderKL, branch transfusion_vae), whose eval.py runs
`python -m pytorch_fid gt/ rec/` on PNG folders, used pytorch-fid.

  torch-fidelity  torch-fidelity's FeatureExtractorInceptionV3 (as torchmetrics wraps it): uint8 ->
                  float, TF1-compatible bilinear resize to 299, (x − 128) / 128; weights
                  `weights-inception-2015-12-05-6726825d.pth`; torch-fidelity's Fréchet distance.
  pytorch-fid     `pytorch_fid.inception.InceptionV3([BLOCK_INDEX_BY_DIM[d]])` fed [0, 1] floats
                  (uint8 / 255, as its PNG loader's ToTensor): bilinear resize to 299
                  (align_corners=False), 2x − 1; weights `pt_inception-2015-12-05-6726825d.pth`;
                  `pytorch_fid.fid_score.calculate_frechet_distance`.
  clean-fid       mode "clean": each uint8 image resized by `cleanfid.resize.build_resizer("clean")`
                  (PIL bicubic to 299 on float32 channels), then the TorchScript Inception
                  `inception-2015-12-05.pt` through `cleanfid.inception_torchscript.InceptionV3W`
                  ((x − 128) / 128, 2048-d); `cleanfid.fid.frechet_distance`.

Accumulation is the same for all three: a backend's feature extractor (uint8 (B, 3, H, W) ->
(B, d)) is the `feature` module of torchmetrics' FrechetInceptionDistance, which keeps float64
sums of the features and of their outer products. Across processes those sums are added with one
all-reduce, and every image is counted on the one rank that evaluated it, so each image's features
enter exactly once. `compute` turns the sums into the mean and the unbiased covariance (the
quantities np.mean / np.cov give the packages from their full feature matrices, here in float64)
and hands them to the backend package's own Fréchet distance.

Weights are never downloaded: each file is looked up where the package's own downloader caches it
(<torch hub dir>/checkpoints/ for torch-fidelity and pytorch-fid; clean-fid's /tmp download folder
is accepted too) or given with --inception_weights, and a missing file is a one-line MetricError
raised before the package is called.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import pickle
import platform
import sys
from dataclasses import dataclass
from unittest import mock

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from common.errors import MetricError
from common.helpers import FrozenModule, one_line

# torch-fidelity's release file name; torchvision-style caches keep it under <hub dir>/checkpoints/.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"


@dataclass(frozen=True)
class Backend:
    name: str  # the --fid_backend value, also the PyPI distribution name
    weights_file: str  # the file name the package's own downloader writes
    weights_url: str  # where that file is published
    features: tuple[int, ...]  # feature sizes the package offers (2048 = pool3, the standard)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("torch-fidelity", INCEPTION_WEIGHTS_FILE, INCEPTION_WEIGHTS_URL, (2048, 768, 192, 64)),
        Backend(
            "pytorch-fid",
            "pt_inception-2015-12-05-6726825d.pth",
            "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
            "pt_inception-2015-12-05-6726825d.pth",
            (2048, 768, 192, 64),
        ),
        Backend(
            "clean-fid",
            "inception-2015-12-05.pt",
            "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
            (2048,),
        ),
    )
}
FID_BACKENDS = tuple(BACKENDS)  # the --fid_backend choices

# clean-fid's own feature_extractor() downloads its TorchScript file into this folder.
CLEANFID_DOWNLOAD_DIR = "./" if platform.system() == "Windows" else "/tmp"


def backend_info(name: str) -> Backend:
    if name not in BACKENDS:
        raise MetricError(f"unknown FID backend {name!r}; choose one of {', '.join(FID_BACKENDS)}")
    return BACKENDS[name]


def package_version(name: str) -> str:
    """The installed version of the backend's package (importlib.metadata), e.g. '0.3.0'."""
    try:
        return importlib.metadata.version(backend_info(name).name)
    except importlib.metadata.PackageNotFoundError:
        raise MetricError(f"--fid_backend {name} needs the {name} package: pip install {name}") from None


# ---------------------------------------------------------------------------------------------
# Weights files
# ---------------------------------------------------------------------------------------------


def default_inception_path(backend: str = "torch-fidelity") -> str:
    """<torch hub dir>/checkpoints/<the backend's file>: where torch.hub's load_state_dict_from_url caches it."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", backend_info(backend).weights_file)


def resolve_inception_weights(weights_path: str | None = None, backend: str = "torch-fidelity") -> str:
    """The backend's Inception file to use; MetricError (one line) naming the expected file when it is absent.

    Never downloads: each package would fetch its file when it is missing (torch.hub, urllib), which
    hangs or fails offline, so the packages only ever get an existing local file.
    """
    name, b = backend, backend_info(backend)
    if weights_path:
        path = os.path.expanduser(weights_path)
        if not os.path.isfile(path):
            raise MetricError(
                f"Inception weights for rFID ({name}) not found: {path!r} is not a file; "
                f"download {b.weights_url}, or use --no-fid"
            )
        if name == "clean-fid" and os.path.basename(path) != b.weights_file:
            # InceptionV3W(folder) always opens <folder>/inception-2015-12-05.pt.
            raise MetricError(f"clean-fid loads its Inception from a file named {b.weights_file}; rename {path!r}")
        return path
    candidates = [default_inception_path(name)]
    if name == "clean-fid":
        candidates.append(os.path.join(CLEANFID_DOWNLOAD_DIR, b.weights_file))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise MetricError(
        f"Inception weights for rFID ({name}) not found: expected {candidates[0]!r} (torch hub cache); "
        f"download {b.weights_url} there, pass --inception_weights PATH, or use --no-fid"
    )


def _load_error(path: str, e: BaseException) -> MetricError:
    return MetricError(f"cannot load Inception weights from {path!r}: {one_line(e, name=False, limit=200)}")


_LOAD_ERRORS = (RuntimeError, OSError, KeyError, EOFError, ValueError, AttributeError, pickle.UnpicklingError)


# ---------------------------------------------------------------------------------------------
# Feature extractors: uint8 (B, 3, H, W) -> (B, d) float
# ---------------------------------------------------------------------------------------------


class PytorchFidInception(FrozenModule):
    """pytorch-fid's InceptionV3 on uint8 images, as its own CLI sees PNG files.

    pytorch-fid reads a PNG with ToTensor (uint8 / 255 in float32), resizes inside the network
    (bilinear to 299, align_corners=False) and scales 2x − 1; `dims` picks the block (2048 = pool3).
    """

    def __init__(self, weights_path: str, dims: int = 2048):
        super().__init__()
        from pytorch_fid import inception as pf

        if dims not in pf.InceptionV3.BLOCK_INDEX_BY_DIM:
            raise MetricError(f"pytorch-fid offers {sorted(pf.InceptionV3.BLOCK_INDEX_BY_DIM)}-d features, not {dims}")

        def load_local(url, *args, **kwargs):
            # Stands in for torch.hub's load_state_dict_from_url inside fid_inception_v3: the file it would
            # read from the hub cache (or --inception_weights), and never the network.
            return torch.load(weights_path, map_location="cpu", weights_only=True)

        try:
            with mock.patch.object(pf, "load_state_dict_from_url", load_local):
                self.net = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
        except _LOAD_ERRORS as e:
            raise _load_error(weights_path, e) from None
        self.num_features = dims
        self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x.float() / 255.0)[0]  # (B, d, h, w); h = w = 1 for pool3
        if out.shape[2] != 1 or out.shape[3] != 1:  # as fid_score.get_activations does for 64/192/768
            out = nn.functional.adaptive_avg_pool2d(out, output_size=(1, 1))
        return out.flatten(1)


class CleanFidInception(FrozenModule):
    """clean-fid's "clean" mode on uint8 images: PIL bicubic resize to 299 per image, then InceptionV3W.

    clean-fid's ResizeDataset does exactly this per file: uint8 HWC -> build_resizer("clean") (each
    channel as a float32 PIL image, bicubic, clipped to [0, 255]) -> CHW float32 tensor (ToTensor on
    a float array does not rescale) -> InceptionV3W, which applies (x − 128) / 128 and the
    TorchScript network's `layers`, giving 2048-d pool3 features.
    """

    num_features = 2048

    def __init__(self, weights_path: str):
        super().__init__()
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        self.resize = build_resizer("clean")
        try:
            # download=False: the package must not reach for the network; the file exists (resolve_inception_weights).
            self.net = InceptionV3W(os.path.dirname(os.path.abspath(weights_path)), download=False)
        except _LOAD_ERRORS as e:
            raise _load_error(weights_path, e) from None
        self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3) uint8
        resized = np.stack([self.resize(img) for img in images])  # (B, 299, 299, 3) float32 in [0, 255]
        batch = torch.from_numpy(resized).permute(0, 3, 1, 2).contiguous().to(x.device)
        return self.net(batch)  # (B, 2048)


def build_feature_extractor(name: str, weights_path: str, features: int = 2048) -> nn.Module:
    """The pytorch-fid or clean-fid feature module (uint8 (B, 3, H, W) -> (B, features)) from an existing file.

    torch-fidelity's is built by torchmetrics itself (build_fid).
    """
    b = backend_info(name)
    if features not in b.features:
        raise MetricError(f"{name} offers {'/'.join(map(str, b.features))}-d Inception features, not {features}")
    if name == "pytorch-fid":
        return PytorchFidInception(weights_path, features)
    if name == "clean-fid":
        return CleanFidInception(weights_path)
    raise MetricError(f"{name}'s feature extractor is built by torchmetrics (build_fid)")


def build_fid(
    weights_path: str | None = None,
    feature_extractor: nn.Module | None = None,
    features: int = 2048,
    backend: str = "torch-fidelity",
    **metric_kwargs,
):
    """torchmetrics FrechetInceptionDistance fed uint8 (B, 3, H, W); real = references, fake = reconstructions.

    It accumulates the features (float64 sums, synced across processes by torchmetrics); the rFID
    of a backend is `compute_fid(metric, backend)`, the backend package's own Fréchet distance.
    The feature network is the backend's own (above), loaded from `weights_path` or the torch
    hub cache: torch-fidelity's Inception v3 resized to 299 with TF1-compatible bilinear
    interpolation (as torch-fidelity and the original TF FID; torchmetrics' default antialiased
    resize differs when downscaling), pytorch-fid's InceptionV3, or clean-fid's PIL-bicubic resize
    and TorchScript Inception. `features` 64/192/768 take an earlier Inception layer (smaller sets,
    quick checks; not rFID as published; not offered by clean-fid).
    `feature_extractor`: any module mapping uint8 images to (B, d) features (tests, offline runs).
    """
    if feature_extractor is not None:
        return FrechetInceptionDistance(feature=feature_extractor, normalize=False, **metric_kwargs)
    path = resolve_inception_weights(weights_path, backend)
    if backend != "torch-fidelity":
        extractor = build_feature_extractor(backend, path, features)
        return FrechetInceptionDistance(feature=extractor, normalize=False, **metric_kwargs)
    try:
        return FrechetInceptionDistance(
            feature=features, normalize=False, feature_extractor_weights_path=path, antialias=False, **metric_kwargs
        )
    except _LOAD_ERRORS as e:
        raise _load_error(path, e) from None


# ---------------------------------------------------------------------------------------------
# Statistics and distance
# ---------------------------------------------------------------------------------------------


def statistics_from_sums(total: torch.Tensor, outer: torch.Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d), float64 numpy, from Σx (d,), Σxxᵀ (d, d) and the count.

    Equal to np.mean(X, 0) and np.cov(X, rowvar=False) of the (n, d) feature matrix X, up to float64
    rounding of the one-pass formula (Σxxᵀ − n·μμᵀ) / (n − 1).
    """
    if n < 2:
        raise MetricError(f"FID needs at least 2 images per side, got {n}")
    total, outer = total.detach().to("cpu", torch.float64), outer.detach().to("cpu", torch.float64)
    mu = total / n
    sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
    return mu.numpy(), sigma.numpy()


def frechet_distance(name: str, mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The backend package's own Fréchet distance between N(mu1, sigma1) (real) and N(mu2, sigma2) (fake)."""
    backend_info(name)
    # pytorch-fid and clean-fid print a note on stdout when they add ε to a singular product; stdout
    # carries the results table, so the note goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            if name == "pytorch-fid":
                from pytorch_fid.fid_score import calculate_frechet_distance

                return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))
            if name == "clean-fid":
                from cleanfid.fid import frechet_distance as cleanfid_frechet_distance

                return float(cleanfid_frechet_distance(mu1, sigma1, mu2, sigma2))
            from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

            stats = fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, False)
            return float(stats[KEY_METRIC_FID])
        except ValueError as e:  # "Imaginary component ...": the covariance product has no real square root
            raise MetricError(f"{name}'s Fréchet distance failed: {str(e).strip()[:200]}") from None


def compute_fid(metric, name: str = "torch-fidelity") -> float:
    """rFID of a (synced) torchmetrics FrechetInceptionDistance: its sums -> mean/cov -> the backend's distance."""
    mu_r, sigma_r = statistics_from_sums(
        metric.real_features_sum, metric.real_features_cov_sum, int(metric.real_features_num_samples)
    )
    mu_f, sigma_f = statistics_from_sums(
        metric.fake_features_sum, metric.fake_features_cov_sum, int(metric.fake_features_num_samples)
    )
    return frechet_distance(name, mu_r, sigma_r, mu_f, sigma_f)


def describe(name: str, layer: str) -> str:
    """One line for the output's protocol record: package, version, feature network, resize, distance."""
    version = package_version(name)
    if name == "pytorch-fid":
        return (
            f"pytorch-fid {version}: pytorch_fid.inception.InceptionV3 {layer} on uint8/255, bilinear resize "
            "to 299 (align_corners=False), 2x-1; pytorch_fid.fid_score.calculate_frechet_distance"
        )
    if name == "clean-fid":
        return (
            f"clean-fid {version} mode clean: PIL bicubic resize to 299 (float32 per channel), TorchScript "
            f"Inception (InceptionV3W) {layer}, (x-128)/128; cleanfid.fid.frechet_distance"
        )
    return (
        f"torch-fidelity {version}: Inception v3 {layer} via torchmetrics FrechetInceptionDistance, TF1-compatible "
        "bilinear resize to 299, (x-128)/128; torch_fidelity.metric_fid.fid_statistics_to_metric"
    )
