"""rFID backends (metrics/fid.py): each gives its own package's result from the same weights file, offline.

The real Inception files cannot be downloaded here, so each test writes its backend's file in the
package's real format and under its real name, with random weights: a torch-fidelity state dict, a
pytorch-fid state dict of `fid_inception_v3()`'s architecture in a temporary TORCH_HOME's hub
cache, and a TorchScript file with the interface clean-fid's InceptionV3W calls. The package's own
pipeline (its image loading, resize, network, statistics and distance) then runs on PNG folders of
the same images, and our evaluation path must agree with it.

The 2048-d pool3 path of every backend is checked on a handful of images feature by feature; FID
values are compared on the 64-d features (pytorch-fid, torch-fidelity) or a 64-d marginal of the
2048-d statistics (clean-fid, which has only pool3): a 2048² matrix square root takes minutes on a
shared CPU and tests the distance code, not the backend.
"""

import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

import eval_vae
import metrics
from autoencoder.models import build_vae
from common.errors import MetricError, UserError
from metrics import fid as fid_backends

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = 4  # per side: a handful (the 299² Inception forward is the cost)


# ---------------------------------------------------------------------------------------------
# Random-weight Inception files in each package's real format
# ---------------------------------------------------------------------------------------------


def _he_init(state: dict, seed: int) -> dict:
    """He-normal conv weights: keep activations alive through ~50 random layers (the default init fades them)."""
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in state.items():
        if name.endswith("conv.weight"):
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * (2.0 / tensor[0].numel()) ** 0.5)
    return state


def write_torch_fidelity_file(path: str) -> None:
    """A state dict of torch-fidelity's FeatureExtractorInceptionV3, the format of weights-inception-...pth."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    with pytest.MonkeyPatch.context() as mp:  # the architecture without its download and load
        mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(_he_init(net.state_dict(), 0), path)


def pytorch_fid_architecture() -> torch.nn.Module:
    """pytorch-fid's own fid_inception_v3() (torchvision's Inception3 with the FID blocks), no weights loaded."""
    import torchvision
    from pytorch_fid import inception as pf

    with pytest.MonkeyPatch.context() as mp:  # its loader fetches the file; the load then expects all keys
        mp.setattr(pf, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(torchvision.models.Inception3, "load_state_dict", lambda self, *a, **k: None)
        return pf.fid_inception_v3()


def write_pytorch_fid_file(path: str) -> None:
    """A state dict of fid_inception_v3(): the format of pt_inception-2015-12-05-6726825d.pth."""
    torch.save(_he_init(pytorch_fid_architecture().state_dict(), 1), path)


class _TorchScriptInception(torch.nn.Module):
    """What clean-fid's InceptionV3W uses of inception-2015-12-05.pt: `layers` maps (x − 128) / 128 at 299²
    to (B, 2048, 1, 1) pool3 features; forward(x, return_features) takes [0, 255] images of any size
    (the resize_inside path; the real file returns logits unless return_features)."""

    def __init__(self, layers: torch.nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128).flatten(1)


def write_clean_fid_file(path: str) -> None:
    """A TorchScript file named inception-2015-12-05.pt: pytorch-fid's Inception graph up to pool3, random weights."""
    net = pytorch_fid_architecture()
    net.load_state_dict(_he_init(net.state_dict(), 2))
    layers = torch.nn.Sequential(
        net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, torch.nn.MaxPool2d(3, 2),
        net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, torch.nn.MaxPool2d(3, 2),
        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e,
        net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, torch.nn.AdaptiveAvgPool2d(1),
    ).eval()  # fmt: skip
    with torch.no_grad():
        traced = torch.jit.trace(layers, torch.zeros(1, 3, 299, 299))
    torch.jit.save(torch.jit.script(_TorchScriptInception(traced)), path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, str]:
    """{backend: path}: the three files under <TORCH_HOME>/hub/checkpoints/ with their real names."""
    home = tmp_path_factory.mktemp("torch_home")
    folder = home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    paths = {name: str(folder / b.weights_file) for name, b in fid_backends.BACKENDS.items()}
    write_torch_fidelity_file(paths["torch-fidelity"])
    write_pytorch_fid_file(paths["pytorch-fid"])
    write_clean_fid_file(paths["clean-fid"])
    return paths


@pytest.fixture
def torch_home(weights, monkeypatch) -> str:
    """TORCH_HOME pointing at the files: torch.hub's cache, where the packages look for them."""
    home = os.path.dirname(os.path.dirname(os.path.dirname(weights["pytorch-fid"])))
    monkeypatch.setenv("TORCH_HOME", home)
    assert torch.hub.get_dir() == os.path.join(home, "hub")
    return home


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """real/ and fake/ PNG folders (48×48 photographs; fakes noisier and darker) and the same images as uint8."""
    root = tmp_path_factory.mktemp("fid_images")
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()][:NUM_IMAGES]
    rng = np.random.default_rng(0)
    out = {"real_dir": str(root / "real"), "fake_dir": str(root / "fake"), "real": [], "fake": []}
    for side in ("real", "fake"):
        os.makedirs(out[f"{side}_dir"])
    for i, photo in enumerate(photos):
        real = np.asarray(Image.fromarray(photo).resize((48, 48), Image.Resampling.BILINEAR))
        fake = np.clip(0.8 * real + rng.normal(0, 25, real.shape), 0, 255).astype(np.uint8)
        for side, img in (("real", real), ("fake", fake)):
            Image.fromarray(img).save(os.path.join(out[f"{side}_dir"], f"{i}.png"))
            out[side].append(img)
    for side in ("real", "fake"):
        out[side] = torch.from_numpy(np.stack(out[side])).permute(0, 3, 1, 2).contiguous()  # (N, 3, 48, 48) uint8
    return out


def _our_fid(folders, backend: str, features: int, weights_path: str | None = None) -> tuple[float, object]:
    """Our eval path: build_fid, uint8 batches of 2 into the accumulation, then the backend's distance."""
    fid = metrics.build_fid(weights_path, features=features, backend=backend)
    for side in ("real", "fake"):
        for chunk in folders[side].split(2):
            fid.update(chunk, real=side == "real")
    return metrics.compute_fid(fid, backend), fid


def _files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder))


# ---------------------------------------------------------------------------------------------
# The packages' own pipelines
# ---------------------------------------------------------------------------------------------


def test_backend_files_are_the_packages_own():
    from cleanfid import downloads_helper
    from pytorch_fid import inception as pf
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    b = fid_backends.BACKENDS
    assert tuple(b) == metrics.FID_BACKENDS == ("torch-fidelity", "pytorch-fid", "clean-fid")
    assert b["torch-fidelity"].weights_url == tf_inception.URL_INCEPTION_V3
    assert b["pytorch-fid"].weights_url == pf.FID_WEIGHTS_URL
    assert b["clean-fid"].weights_url == downloads_helper.inception_url
    for backend in b.values():  # torch.hub caches a download under the URL's last component
        assert backend.weights_url.rsplit("/", 1)[1] == backend.weights_file
        assert fid_backends.package_version(backend.name) == importlib.metadata.version(backend.name)
    with pytest.raises(MetricError, match="unknown FID backend"):
        fid_backends.backend_info("tf-fid")


def test_pytorch_fid_matches_its_own_pipeline(weights, folders, torch_home):
    """Our pytorch-fid backend = `python -m pytorch_fid real/ fake/` (calculate_fid_given_paths) on the same file."""
    from pytorch_fid.fid_score import calculate_fid_given_paths, get_activations
    from pytorch_fid.inception import InceptionV3

    # 2048-d pool3, feature by feature: ours on uint8 tensors, pytorch-fid's on the PNG files (ToTensor,
    # its InceptionV3 built by the package, whose torch.hub loader reads the file from the TORCH_HOME cache).
    ours = metrics.build_fid(backend="pytorch-fid").inception
    assert ours.num_features == 2048
    theirs = get_activations(_files(folders["real_dir"]), InceptionV3([3]), batch_size=NUM_IMAGES, dims=2048)
    got = ours(folders["real"]).double().numpy()
    assert got.shape == (NUM_IMAGES, 2048) and np.abs(got).sum() > 0
    # float32 network outputs; the same operations, possibly other conv kernels for another batch layout
    np.testing.assert_allclose(got, theirs, rtol=1e-4, atol=1e-6 * np.abs(theirs).max())

    # FID (64-d): the package's whole pipeline vs our accumulation + its calculate_frechet_distance.
    value, _ = _our_fid(folders, "pytorch-fid", 64)
    want = calculate_fid_given_paths([folders["real_dir"], folders["fake_dir"]], 50, "cpu", 64, num_workers=0)
    assert value > 1e-3
    # float64 statistics from float32 features: one-pass sums vs np.cov agree to ~1e-12; the rest is the
    # float32 feature noise above, through a singular 64×64 product (4 images).
    assert value == pytest.approx(want, rel=1e-5)


def test_torch_fidelity_matches_its_own_pipeline(weights, folders, torch_home):
    """Our torch-fidelity backend = torch_fidelity.calculate_metrics(input1=real/, input2=fake/, fid=True)."""
    import torch_fidelity
    from torch_fidelity.datasets import ImagesPathDataset
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = weights["torch-fidelity"]
    ours = metrics.build_fid(backend="torch-fidelity").inception  # default: the file in the TORCH_HOME cache
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
    loaded = torch.stack([ImagesPathDataset(_files(folders["real_dir"]))[i] for i in range(NUM_IMAGES)])
    assert torch.equal(loaded, folders["real"])  # torch-fidelity reads the PNGs into the very uint8 tensors we feed
    got, want = ours(folders["real"]), reference(loaded)[0]
    assert got.shape == (NUM_IMAGES, 2048) and got.abs().sum() > 0
    torch.testing.assert_close(got, want)

    value, _ = _our_fid(folders, "torch-fidelity", 64)
    kwargs = dict(cuda=False, cache=False, save_cpu_ram=True, verbose=False, feature_layer_fid="64")
    theirs = torch_fidelity.calculate_metrics(
        input1=folders["real_dir"], input2=folders["fake_dir"], fid=True, feature_extractor_weights_path=path, **kwargs
    )["frechet_inception_distance"]
    assert value > 1e-3
    # torch-fidelity keeps the mean in float32 (np.mean of float32 features); ours is float64.
    assert value == pytest.approx(theirs, rel=1e-5)


def test_clean_fid_matches_its_own_pipeline(weights, folders, torch_home):
    """Our clean-fid backend = cleanfid.fid.compute_fid(real/, fake/, mode="clean") on the same TorchScript file.

    Its folder pipeline (ResizeDataset with the "clean" PIL-bicubic resize, InceptionV3W, np.mean/np.cov)
    gives 2048-d features and statistics that must equal ours; its frechet_distance is then compared on
    a 64-d marginal of both (the full 2048² square root is minutes on a shared CPU).
    """
    from cleanfid import fid as cleanfid_fid
    from cleanfid.inception_torchscript import InceptionV3W

    fid = metrics.build_fid(backend="clean-fid")
    assert fid.inception.num_features == 2048
    for side in ("real", "fake"):
        for chunk in folders[side].split(2):
            fid.update(chunk, real=side == "real")

    model = InceptionV3W(os.path.dirname(weights["clean-fid"]), download=False)  # the package's own wrapper
    kwargs = dict(num_workers=0, batch_size=NUM_IMAGES, device=torch.device("cpu"), mode="clean", verbose=False)
    feats = {
        side: cleanfid_fid.get_folder_features(folders[f"{side}_dir"], model, **kwargs) for side in ("real", "fake")
    }
    assert feats["real"].shape == (NUM_IMAGES, 2048) and np.abs(feats["real"]).sum() > 0

    # 2048-d: per image (our features module on the uint8 tensors vs theirs on the PNG files) and the statistics.
    np.testing.assert_allclose(fid.inception(folders["real"]).numpy(), feats["real"], rtol=1e-4, atol=1e-5)
    stats = {}
    for side in ("real", "fake"):
        mu, sigma = fid_backends.statistics_from_sums(
            getattr(fid, f"{side}_features_sum"), getattr(fid, f"{side}_features_cov_sum"), NUM_IMAGES
        )
        scale = np.abs(np.cov(feats[side], rowvar=False)).max()
        np.testing.assert_allclose(mu, feats[side].mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(sigma, np.cov(feats[side], rowvar=False), atol=1e-4 * scale)
        stats[side] = mu, sigma

    k = 64  # the first 64 features: a marginal of both Gaussians, the same distance code at 1/512 of the cost
    (mu_r, sig_r), (mu_f, sig_f) = stats["real"], stats["fake"]
    value = fid_backends.frechet_distance("clean-fid", mu_r[:k], sig_r[:k, :k], mu_f[:k], sig_f[:k, :k])
    want = cleanfid_fid.fid_from_feats(feats["real"][:, :k], feats["fake"][:, :k])
    assert value > 1e-3
    assert value == pytest.approx(want, rel=1e-4)


def test_clean_fid_resize_is_the_packages_clean_mode(weights, torch_home):
    """Non-square uint8 images: PIL bicubic per float32 channel to 299 (cleanfid.resize), not torch's resize."""
    from cleanfid.resize import make_resizer

    class Recorder(torch.nn.Module):
        def forward(self, batch):
            seen.append(batch)
            return torch.zeros(batch.shape[0], 2048)

    extractor = metrics.build_fid(backend="clean-fid").inception
    seen = []
    extractor.net = Recorder()  # what reaches InceptionV3W
    images = torch.randint(0, 256, (2, 3, 37, 53), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    extractor(images)
    resize = make_resizer("PIL", False, "bicubic", (299, 299))
    want = torch.from_numpy(np.stack([resize(img) for img in images.permute(0, 2, 3, 1).numpy()])).permute(0, 3, 1, 2)
    assert seen[0].dtype == torch.float32 and seen[0].shape == (2, 3, 299, 299)
    torch.testing.assert_close(seen[0], want, rtol=0, atol=0)
    bilinear = torch.nn.functional.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
    assert (seen[0] - bilinear).abs().max() > 1  # a different resize would not pass


# ---------------------------------------------------------------------------------------------
# Offline: a missing or unreadable file is one line, and nothing reaches for the network
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Any connection, torch.hub download or urllib fetch fails the test; the packages' loaders are recorded."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    calls = []
    from cleanfid import inception_torchscript
    from pytorch_fid import inception as pf
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    monkeypatch.setattr(pf, "load_state_dict_from_url", lambda *a, **k: calls.append("pytorch-fid") or refuse(*a))
    monkeypatch.setattr(
        tf_inception, "load_state_dict_from_url", lambda *a, **k: calls.append("torch-fidelity") or refuse(*a)
    )
    monkeypatch.setattr(
        inception_torchscript, "check_download_inception", lambda *a, **k: calls.append("clean-fid") or refuse(*a)
    )
    return calls


@pytest.mark.parametrize("backend", metrics.FID_BACKENDS)
def test_missing_weights_file_is_one_line_and_no_download(backend, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setattr(fid_backends, "CLEANFID_DOWNLOAD_DIR", str(tmp_path / "empty_tmp"))
    b = fid_backends.BACKENDS[backend]
    with pytest.raises(MetricError) as e:
        metrics.build_fid(backend=backend)
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, UserError)
    # where to put the file, and where it comes from
    assert os.path.join(str(tmp_path / "empty_home"), "hub", "checkpoints", b.weights_file) in msg
    assert b.weights_url in msg and "--inception_weights" in msg and backend in msg
    with pytest.raises(MetricError, match=r"nowhere\.pth") as e:
        metrics.build_fid(weights_path=str(tmp_path / "nowhere.pth"), backend=backend)
    assert "\n" not in str(e.value)
    assert no_network == []  # no package loader was even called


def test_clean_fid_finds_its_own_download_folder_and_needs_its_file_name(weights, tmp_path, monkeypatch):
    """clean-fid's own downloader keeps the file in /tmp: found there when the hub cache lacks it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setattr(fid_backends, "CLEANFID_DOWNLOAD_DIR", os.path.dirname(weights["clean-fid"]))
    assert metrics.resolve_inception_weights(backend="clean-fid") == weights["clean-fid"]
    renamed = tmp_path / "my_inception.pt"
    renamed.write_bytes(b"x")
    with pytest.raises(MetricError, match=r"inception-2015-12-05\.pt"):
        metrics.resolve_inception_weights(str(renamed), backend="clean-fid")


@pytest.mark.parametrize("backend", ["pytorch-fid", "clean-fid"])
def test_unreadable_weights_file_is_one_line(backend, tmp_path, no_network):
    bad = tmp_path / fid_backends.BACKENDS[backend].weights_file
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(MetricError, match="cannot load Inception weights") as e:
        metrics.build_fid(str(bad), backend=backend)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)


class Given(torch.nn.Module):
    """The "images" are the 8-d features themselves."""

    num_features = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_frechet_distance_is_each_packages_own(monkeypatch):
    """compute() gives the statistics from the sums to the package's function, real first (`pytorch_fid gt/ rec/`)."""
    from cleanfid import fid as cleanfid_fid
    from pytorch_fid import fid_score
    from torch_fidelity import metric_fid

    g = torch.Generator().manual_seed(0)
    real, fake = (
        torch.randn(30, 8, generator=g, dtype=torch.float64),
        torch.randn(30, 8, generator=g, dtype=torch.float64) + 0.5,
    )
    fid = metrics.build_fid(feature_extractor=Given())
    fid.update(real, real=True)
    fid.update(fake, real=False)
    mu_r, mu_f = real.mean(0).numpy(), fake.mean(0).numpy()
    sig_r, sig_f = np.cov(real.numpy(), rowvar=False), np.cov(fake.numpy(), rowvar=False)
    want = fid_score.calculate_frechet_distance(mu_r, sig_r, mu_f, sig_f)
    seen = {}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen[name] = args
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(
        fid_score, "calculate_frechet_distance", spy("pytorch-fid", fid_score.calculate_frechet_distance)
    )
    monkeypatch.setattr(cleanfid_fid, "frechet_distance", spy("clean-fid", cleanfid_fid.frechet_distance))
    monkeypatch.setattr(
        metric_fid, "fid_statistics_to_metric", spy("torch-fidelity", metric_fid.fid_statistics_to_metric)
    )
    for backend in metrics.FID_BACKENDS:
        assert metrics.compute_fid(fid, backend) == pytest.approx(want, rel=1e-9)
    assert set(seen) == set(metrics.FID_BACKENDS)
    np.testing.assert_allclose(seen["pytorch-fid"][0], mu_r, rtol=1e-12)  # real first
    np.testing.assert_allclose(seen["clean-fid"][1], sig_r, rtol=1e-10)
    np.testing.assert_allclose(seen["torch-fidelity"][1]["sigma"], sig_f, rtol=1e-10)

    one = metrics.build_fid(feature_extractor=Given())
    one.update(real[:1], real=True)
    one.update(fake[:1], real=False)
    with pytest.raises(MetricError, match="at least 2 images"):
        metrics.compute_fid(one, "pytorch-fid")


# ---------------------------------------------------------------------------------------------
# eval_vae.py: --fid_backend, --protocol seed, the JSON record
# ---------------------------------------------------------------------------------------------


class MeanAbs(torch.nn.Module):
    """Stand-in for LPIPS (not under test here): mean |x − y| per image, (B, 1, 1, 1)."""

    def forward(self, x, y):
        return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)


@pytest.fixture(scope="module")
def eval_workspace(tmp_path_factory, folders):
    root = tmp_path_factory.mktemp("fid_eval")
    torch.manual_seed(0)
    build_vae("tiny").save_pretrained(root / "model")
    return root


def _eval_args(ws, folders, out: str, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(ws / "model"),
        "--dataset", folders["real_dir"],
        "--resolution", "32",
        "--batch_size", "3",
        "--num_workers", "0",
        "--perception_weights", "random",
        "--grid_images", "0",
        "--fid_features", "64",
        "--output_dir", str(ws / out),
        *extra,
    ]  # fmt: skip


def test_eval_seed_protocol_is_the_reference_pytorch_fid_command(eval_workspace, folders, torch_home, capsys):
    """--protocol seed uses pytorch-fid; its rFID equals `python -m pytorch_fid reference/ model/` on the saved PNGs."""
    from pytorch_fid.fid_score import calculate_fid_given_paths

    ws = eval_workspace
    result = eval_vae.main(_eval_args(ws, folders, "seed", "--protocol", "seed", "--save_images"), lpips=MeanAbs())
    capsys.readouterr()
    with open(ws / "seed" / "eval.json") as f:
        saved = json.load(f)
    p = saved["protocol"]
    assert p["name"] == "seed" and p["fid_backend"] == "pytorch-fid"
    assert p["fid_backend_version"] == importlib.metadata.version("pytorch-fid")
    assert p["rfid"].startswith(f"pytorch-fid {importlib.metadata.version('pytorch-fid')}")
    assert p["inception_weights"].endswith("pt_inception-2015-12-05-6726825d.pth")
    value = saved["models"][0]["metrics"]["rfid"]["value"]
    assert value == result["models"][0]["metrics"]["rfid"]["value"] and value > 0

    images = ws / "seed" / "images"  # the uint8 crops (truncated, as the reference implementation saves them)
    want = calculate_fid_given_paths([str(images / "reference"), str(images / "model")], 50, "cpu", 64, num_workers=0)
    assert value == pytest.approx(want, rel=1e-5)


def test_eval_records_each_backend(eval_workspace, folders, torch_home, capsys):
    ws = eval_workspace
    default = eval_vae.main(_eval_args(ws, folders, "default", "--max_samples", "3"), lpips=MeanAbs())
    assert default["protocol"]["fid_backend"] == "torch-fidelity" and default["protocol"]["name"] == "default"
    assert default["protocol"]["fid_backend_version"] == importlib.metadata.version("torch-fidelity")
    clean = eval_vae.main(
        _eval_args(ws, folders, "clean", "--fid_backend", "clean-fid", "--no-fid", "--max_samples", "3"),
        lpips=MeanAbs(),
    )
    with open(ws / "clean" / "eval.json") as f:
        saved = json.load(f)
    assert saved["protocol"] == clean["protocol"] and saved["protocol"]["name"] == "custom"
    assert saved["protocol"]["fid_backend"] == "clean-fid"
    assert saved["protocol"]["fid_backend_version"] == importlib.metadata.version("clean-fid")
    assert "| rFID-64 |" in capsys.readouterr().out


def _error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        eval_vae.main(argv, lpips=MeanAbs())
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("eval_vae.py: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


def test_eval_backend_errors_are_one_line(eval_workspace, folders, tmp_path, monkeypatch, capsys, no_network):
    ws = eval_workspace
    err = _error_line(capsys, _eval_args(ws, folders, "bad", "--protocol", "seed", "--fid_backend", "clean-fid"))
    assert "--protocol seed means --fid_backend pytorch-fid" in err
    err = _error_line(capsys, _eval_args(ws, folders, "bad", "--fid_backend", "clean-fid"))  # with --fid_features 64
    assert "clean-fid" in err and "2048" in err
    err = _error_line(capsys, _eval_args(ws, folders, "bad", "--fid_backend", "tf-fid"))
    assert "tf-fid" in err
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    err = _error_line(capsys, _eval_args(ws, folders, "bad", "--protocol", "seed"))
    assert "pt_inception-2015-12-05-6726825d.pth" in err and str(tmp_path / "empty_home") in err
    assert no_network == [] and not (ws / "bad").exists()


@pytest.mark.e2e
def test_two_processes_match_one_with_pytorch_fid(eval_workspace, folders, torch_home, capsys):
    """Real 2-rank gloo DDP on CPU: every image's features enter once, the rFID equals one process's."""
    ws = eval_workspace
    one = eval_vae.main(_eval_args(ws, folders, "one", "--fid_backend", "pytorch-fid"), lpips=MeanAbs())
    capsys.readouterr()
    launch = [
        os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, "eval_vae.py"),
    ]  # fmt: skip
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    argv = _eval_args(ws, folders, "two", "--fid_backend", "pytorch-fid")
    proc = subprocess.run(launch + argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(ws / "two" / "eval.json") as f:
        two = json.load(f)
    assert two["world_size"] == 2 and two["num_images"] == one["num_images"] == NUM_IMAGES
    assert two["protocol"]["fid_backend"] == "pytorch-fid"
    m1, m2 = one["models"][0]["metrics"]["rfid"], two["models"][0]["metrics"]["rfid"]
    assert m2["count"] == m1["count"] == NUM_IMAGES
    assert m1["value"] > 0 and m2["value"] == pytest.approx(m1["value"], rel=1e-4)
