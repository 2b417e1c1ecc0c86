"""eval_vae.py end to end on CPU: tiny models, a generated image folder, 1 vs 2 real DDP ranks, bad inputs.

Also: the trainer's held-out metrics equal eval_vae.py's, and --update_model_card.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import data
import eval_vae
import metrics
from autoencoder.models import build_vae, load_vae
from common.errors import MetricError
from metrics.grid import GRID_PAD, label_margin
from metrics.reconstruction import held_out_metrics, load_images, reconstruct
from publishing import card as model_card

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = 5  # odd: a 2-rank run that padded its last batch would count 6


class PooledColour(torch.nn.Module):
    """Stand-in FID feature network: uint8 (B, 3, H, W) -> 4×4 pooled colours (48-d)."""

    num_features = 48

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 4).flatten(1)


def write_random_inception(path: str) -> None:
    """A random-weight Inception v3 in torch-fidelity's file format (its real weights can't be downloaded here)."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    with pytest.MonkeyPatch.context() as mp:
        # Build the architecture without its weights: skip the download and the load.
        mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    gen = torch.Generator().manual_seed(0)
    state = net.state_dict()
    for name, tensor in state.items():
        if name.endswith("conv.weight"):  # He init keeps activations alive through ~50 random layers
            fan_in = tensor[0].numel()
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
    torch.save(state, path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """An image folder of NUM_IMAGES photos (various sizes), a tiny model, a baseline checkpoint folder."""
    root = tmp_path_factory.mktemp("eval")
    images = root / "images"
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket(), skdata.immunohistochemistry()]
    for i, (photo, size) in enumerate(
        zip(photos[:NUM_IMAGES], [(48, 40), (40, 56), (37, 37), (64, 44), (40, 40)], strict=False)
    ):
        sub = images / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo).resize(size, Image.Resampling.BILINEAR).save(sub / f"img{i}.png")
    torch.manual_seed(0)
    build_vae("tiny").save_pretrained(root / "model")
    torch.manual_seed(1)
    # A training checkpoint folder with a 4-channel VAE: loads through vae/ like the trainer writes it.
    build_vae("tiny", latent_channels=4).save_pretrained(root / "run" / "checkpoint-3" / "vae")
    (root / "empty").mkdir()
    write_random_inception(str(root / "inception.pth"))
    return root


@pytest.fixture(scope="module")
def random_lpips():
    """Built once: a random VGG16 takes seconds to initialise on a busy CPU."""
    from losses.perceptual import build_lpips

    torch.manual_seed(0)
    return build_lpips(pretrained=False)


def base_args(ws, out: str, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(ws / "model"),
        "--dataset", str(ws / "images"),
        "--resolution", "32",
        "--batch_size", "2",
        "--num_workers", "0",
        "--perception_weights", "random",
        "--output_dir", str(ws / out),
        *extra,
    ]  # fmt: skip


@pytest.mark.e2e
def test_end_to_end_table_json_images(workspace, random_lpips, terminal):
    capsys = terminal
    ws = workspace
    baseline = str(ws / "run" / "checkpoint-3")
    argv = base_args(ws, "out_e2e", "--baseline", baseline, "--save_images", "--grid_images", "3")
    result = eval_vae.main(argv, feature_extractor=PooledColour(), lpips=random_lpips)
    captured = capsys.readouterr()
    stdout = captured.out
    assert f"{NUM_IMAGES}/{NUM_IMAGES}" in captured.err and "img/s" in captured.err  # the progress bar finished

    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert lines[0] == (  # a custom feature extractor's rFID is not FID, and the column says so
        f"| images validation {NUM_IMAGES}, 32² | rFID (custom features, not FID) | PSNR | SSIM | "
        "LPIPS (RANDOM VGG, not LPIPS) |"
    )
    assert lines[2].startswith("| model | ") and lines[3].startswith("| checkpoint-3 | ")
    assert "RANDOM VGG16" in stdout and "Protocol default: latent=mean, uint8=round, ssim_window=uniform" in stdout

    with open(ws / "out_e2e" / "eval.json") as f:
        saved = json.load(f)
    assert saved["num_images"] == NUM_IMAGES and saved["models"][0]["role"] == "model"
    assert [m["latent_channels"] for m in saved["models"]] == [8, 4]
    for m in saved["models"]:
        assert m["metrics"]["rfid"]["value"] is not None and m["metrics"]["rfid"]["value"] >= 0
        for name in ("psnr", "ssim", "lpips"):
            assert m["metrics"][name]["count"] == NUM_IMAGES and m["metrics"][name]["std"] >= 0
    assert saved["protocol"]["lpips_weights"] == "random" and "custom feature extractor" in saved["protocol"]["rfid"]
    assert set(saved["versions"]) >= {"torch", "diffusers", "torchmetrics"}
    assert saved["models"][0]["metrics"] == result["models"][0]["metrics"]
    assert (ws / "out_e2e" / "eval.md").read_text().startswith("| images validation")

    # Images: reference + one folder per model, every image once; the grid has 3 labelled rows of 3
    # tiles, 32 px upscaled to 128.
    for folder in ("reference", "model", "checkpoint-3"):
        assert len(os.listdir(ws / "out_e2e" / "images" / folder)) == NUM_IMAGES
    grid = Image.open(ws / "out_e2e" / "grid.png")
    margin = label_margin(["reference", "model", "checkpoint-3"], 128)
    assert grid.size == (margin + GRID_PAD + 3 * (128 + GRID_PAD), GRID_PAD + 3 * (128 + GRID_PAD))
    assert saved["grid"]["rows"] == ["reference", "model", "checkpoint-3"] and len(saved["grid"]["images"]) == 3

    # Independent recomputation with scikit-image: the same crops, the posterior mean, skimage metrics.
    stream = data.build_eval_stream(str(ws / "images"), 32, interpolation="bilinear")
    vae = load_vae(str(ws / "model")).eval()
    psnrs, ssims, keys = [], [], []
    with torch.no_grad():
        for sample in stream:
            x = sample["pixel_values"][None]
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample
            a = ((x[0].permute(1, 2, 0).double().numpy() + 1) / 2).clip(0, 1)
            b = ((rec[0].permute(1, 2, 0).double().numpy() + 1) / 2).clip(0, 1)
            psnrs.append(peak_signal_noise_ratio(a, b, data_range=1))
            ssims.append(structural_similarity(a, b, data_range=1, channel_axis=-1))
            keys.append(sample["key"])
            if sample["key"] == "a/img1.png":  # the saved reference PNG is the rounded uint8 crop
                png = np.asarray(Image.open(ws / "out_e2e" / "images" / "reference" / "a__img1.png.png"))
                want = np.floor(((x[0].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1) * 255 + 0.5).astype(np.uint8)
                np.testing.assert_array_equal(png, want)
    assert len(keys) == NUM_IMAGES
    got = saved["models"][0]["metrics"]
    assert got["psnr"]["mean"] == pytest.approx(np.mean(psnrs), abs=1e-4)
    assert got["psnr"]["std"] == pytest.approx(np.std(psnrs), abs=1e-4)
    assert got["ssim"]["mean"] == pytest.approx(np.mean(ssims), abs=1e-5)


@pytest.mark.e2e
def test_seed_protocol_is_recorded_and_sampling_is_reproducible(workspace, random_lpips, capsys):
    ws = workspace
    argv = base_args(ws, "out_seed", "--protocol", "seed", "--max_samples", "3", "--grid_images", "0", "--no-fid")
    first = eval_vae.main(argv, lpips=random_lpips)
    second = eval_vae.main(argv + ["--batch_size", "3"], lpips=random_lpips)  # other batching, same noise per image
    p = first["protocol"]
    chosen = (p["name"], p["latent"], p["uint8"], p["ssim_window"], p["interpolation"])
    assert chosen == ("seed", "sample", "truncate", "uniform", "bilinear")
    assert first["num_images"] == 3 and first["models"][0]["metrics"]["rfid"]["value"] is None
    assert "skipped (--no-fid)" in p["rfid"] and "| model | – |" in capsys.readouterr().out
    for name in ("psnr", "ssim", "lpips"):
        want = first["models"][0]["metrics"][name]["mean"]
        assert second["models"][0]["metrics"][name]["mean"] == pytest.approx(want, rel=1e-5)


def _generators(seed: int, keys) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(eval_vae.image_noise_seed(seed, k)) for k in keys]


def test_reconstruct_samples_per_image_noise():
    torch.manual_seed(0)
    vae = build_vae("tiny").eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    mean = reconstruct(vae, x, latent="mode", batch_size=3)
    with torch.no_grad():
        direct = vae.decode(vae.encode(x).latent_dist.mean).sample
    torch.testing.assert_close(mean, direct)
    keys = ("a.png", "b.png", "c.png")
    sample = reconstruct(vae, x, latent="sample", batch_size=3, generator=_generators(0, keys))
    assert sample.dtype == torch.float32 and sample.shape == x.shape
    assert not torch.allclose(sample, mean, atol=1e-4)
    # image 1 alone, or in batches of 2, gets the noise it got in the batch: its key decides, not its position
    alone = reconstruct(vae, x[1:2], latent="sample", batch_size=1, generator=_generators(0, keys[1:2]))
    torch.testing.assert_close(alone, sample[1:2], rtol=1e-4, atol=1e-5)
    rebatched = reconstruct(vae, x, latent="sample", batch_size=2, generator=_generators(0, keys))
    torch.testing.assert_close(rebatched, sample, rtol=1e-4, atol=1e-5)
    other = reconstruct(vae, x, latent="sample", batch_size=3, generator=_generators(1, keys))
    assert not torch.allclose(other, sample, atol=1e-4)
    # One generator for the whole batch also works; wrong counts and names are refused.
    one = reconstruct(vae, x, latent="sample", batch_size=2, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(one, mean, atol=1e-4)
    with pytest.raises(ValueError, match="generators"):
        reconstruct(vae, x, latent="sample", batch_size=3, generator=_generators(0, keys[:2]))
    with pytest.raises(ValueError, match="latent"):
        reconstruct(vae, x, latent="mean", batch_size=3)


def test_reconstruction_is_not_clamped():
    """A decoder that overshoots [-1, 1] comes back as it is (LPIPS sees it; PSNR/SSIM clip themselves)."""
    torch.manual_seed(0)
    vae = build_vae("tiny").eval()
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(3.0)
    recon = reconstruct(vae, torch.zeros(1, 3, 32, 32), latent="mode", batch_size=1)
    assert recon.max() > 1.5


@pytest.mark.e2e
def test_held_out_metrics_equal_eval(workspace, random_lpips, capsys):
    """The trainer's held-out numbers are eval_vae.py's for the same weights, images and batch size: exactly."""
    ws = workspace
    result = eval_vae.main(base_args(ws, "out_same", "--no-fid", "--grid_images", "0"), lpips=random_lpips)
    capsys.readouterr()
    images = load_images(data.SourceSpec(name="images", path=str(ws / "images")), 32, NUM_IMAGES, "bilinear")
    vae = load_vae(str(ws / "model")).eval()
    held_out, recon = held_out_metrics(vae, images, random_lpips, 2)
    assert recon.shape == images.shape and recon.dtype == torch.float32
    evaluated = {name: result["models"][0]["metrics"][name]["mean"] for name in ("psnr", "ssim", "lpips")}
    assert held_out == evaluated  # exact floats, not approx


@pytest.mark.e2e
def test_two_processes_match_one(workspace, random_lpips, capsys):
    """Real 2-rank gloo DDP on CPU vs one process: same count (no padded duplicates), same metrics.

    rFID goes through the real Inception loading code with a random-weight file in
    torch-fidelity's format, and the reference implementation's protocol (--protocol seed) exercises
    the per-image latent noise.
    """
    ws = workspace
    # 64-d Inception features: the same weights file and loading code, without a 2048² eigendecomposition on CPU.
    fid = ["--inception_weights", str(ws / "inception.pth"), "--fid_features", "64"]
    argv = base_args(ws, "out_1proc", "--protocol", "seed", *fid, "--grid_images", "2")
    one = eval_vae.main(argv, lpips=random_lpips)  # built as each rank builds it: manual_seed(0), random VGG
    capsys.readouterr()

    argv2 = base_args(ws, "out_2proc", "--protocol", "seed", *fid, "--grid_images", "2")
    launch = [
        os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, "eval_vae.py"),
    ]  # fmt: skip
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(launch + argv2, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| model |") == 1 and "| rFID-64 |" in proc.stdout  # main process only
    with open(ws / "out_2proc" / "eval.json") as f:
        two = json.load(f)

    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["num_images"] == one["num_images"] == NUM_IMAGES
    m1, m2 = one["models"][0]["metrics"], two["models"][0]["metrics"]
    for name in ("psnr", "ssim", "lpips"):
        assert m2[name]["count"] == NUM_IMAGES
        assert m2[name]["mean"] == pytest.approx(m1[name]["mean"], rel=1e-5)
        assert m2[name]["std"] == pytest.approx(m1[name]["std"], rel=1e-4, abs=1e-7)
    assert m1["rfid"]["value"] > 0
    assert m2["rfid"]["value"] == pytest.approx(m1["rfid"]["value"], rel=1e-4)
    assert "inception.pth" in two["protocol"]["inception_weights"]


def write_hub_snapshot(root) -> dict[str, list[str]]:
    """What `hf download ID --repo-type dataset --local-dir root` leaves: a dataset card and PNG photos in
    data/<split>-NNNNN-of-NNNNN.parquet shards, other photos in each split. Returns {split: stored image paths}."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket(), skdata.camera()]
    shards = {"train-00000-of-00002": [0], "train-00001-of-00002": [1], "validation-00000-of-00001": [2, 3, 4]}
    stored = {}
    (root / "data").mkdir(parents=True)
    for shard, indices in shards.items():
        images = []
        for i in indices:
            buffer = io.BytesIO()
            Image.fromarray(photos[i]).resize((40, 36), Image.Resampling.BILINEAR).save(buffer, format="PNG")
            images.append({"bytes": buffer.getvalue(), "path": f"{shard}_{i}.png"})
        pq.write_table(pa.table({"image": images}), root / "data" / f"{shard}.parquet")
        stored.setdefault(shard.split("-")[0], []).extend(image["path"] for image in images)
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
        "  - split: validation\n    path: data/validation-*\n---\n\n# photos\n"
    )
    return stored


def test_dataset_flag_takes_a_path_an_id_or_a_source_description(tmp_path):
    def source(dataset, **flags):
        return eval_vae.dataset_source(eval_vae.EvalConfig(dataset=dataset, **flags))

    folder = tmp_path / "in1k"
    folder.mkdir()
    spec = source(str(folder))  # a path: named after its folder, split from --split
    assert (spec.name, spec.path, spec.kind, spec.split, spec.config) == (
        "in1k",
        str(folder),
        "auto",
        "validation",
        None,
    )
    spec = source("ILSVRC/imagenet-1k", dataset_config="full", image_column="jpg")
    assert (spec.name, spec.kind, spec.config, spec.image_column) == ("ILSVRC/imagenet-1k", "auto", "full", "jpg")
    # The trainer's syntax: what it says wins, what it leaves out comes from the flags.
    spec = source(f"path={folder},kind=hub_snapshot,split=test", split="train", dataset_config="c")
    assert (spec.name, spec.path, spec.kind, spec.split, spec.config) == (
        "in1k",
        str(folder),
        "hub_snapshot",
        "test",
        "c",
    )
    spec = source("name=in1k,path=ILSVRC/imagenet-1k,kind=hub")
    assert (spec.name, spec.path, spec.kind, spec.split) == ("in1k", "ILSVRC/imagenet-1k", "hub", "validation")
    assert source("path=ILSVRC/imagenet-1k").name == "ILSVRC/imagenet-1k"  # the card's dataset id, as a bare id
    odd = tmp_path / "run=3,best"  # an existing path stays a path, '=' and ',' included
    odd.mkdir()
    assert source(str(odd)).path == str(odd) and source(str(odd)).name == "run=3,best"
    with pytest.raises(data.DataError, match="unknown key"):
        source(f"path={folder},spilt=train")


@pytest.mark.e2e
def test_hub_snapshot_folder_by_path_or_description(workspace, random_lpips, tmp_path, terminal):
    capsys = terminal
    """A downloaded Hub dataset is evaluated on the split asked for: by its path (--split), or described."""
    stored = write_hub_snapshot(tmp_path / "in1k")
    root = str(tmp_path / "in1k")
    for dataset, extra in (
        (root, []),  # --split validation, the default
        (f"name=in1k,path={root},kind=hub_snapshot,split=validation", ["--split", "train"]),  # the description wins
    ):
        argv = base_args(workspace, "out_snapshot", "--no-fid", "--grid_images", "8", *extra)
        result = eval_vae.main(argv + ["--dataset", dataset], lpips=random_lpips)
        err = capsys.readouterr().err
        assert result["num_images"] == len(stored["validation"]) == 3 and "3/3" in err  # the bar knew the count
        assert result["split"] == "validation" and result["dataset_name"] == "in1k"
        assert result["source"]["kind"] == "hub_snapshot"
        assert sorted(key.split(":", 1)[1] for key in result["grid"]["images"]) == sorted(stored["validation"])
    argv = base_args(workspace, "out_snapshot", "--no-fid", "--split", "val")
    err = _error_line(capsys, argv + ["--dataset", root])
    assert "split 'val'" in err and "its splits: train, validation" in err


def _error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        eval_vae.main(argv)
    assert e.value.code not in (0, None)
    # One error line, last on stderr (libraries may warn before it, e.g. huggingface_hub offline).
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("eval_vae.py: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


def test_a_single_file_model_evaluates_with_its_config_offline(workspace, random_lpips, capsys, tmp_path):
    """The model exported as one LDM-layout file, with --model_config naming its config (offline: diffusers would
    otherwise fetch one), gives exactly the figures of its diffusers folder; --model_config without a single-file
    model is refused in one line."""
    import shutil

    from publishing.export import SINGLE_FILE
    from publishing.export import main as export_main

    ws = workspace
    folder = tmp_path / "model"
    shutil.copytree(ws / "model", folder)
    export_main(["--single_file", str(folder)])
    capsys.readouterr()
    argv = ["--no-fid", "--grid_images", "0"]
    from_folder = eval_vae.main(base_args(ws, "out_folder", *argv), lpips=random_lpips)
    single = ["--pretrained_model_name_or_path", str(folder / SINGLE_FILE), "--model_config", str(folder)]
    from_file = eval_vae.main(base_args(ws, "out_file", *argv, *single), lpips=random_lpips)
    capsys.readouterr()
    for name in ("psnr", "ssim", "lpips"):
        got = from_file["models"][0]["metrics"][name]["mean"]
        assert got == from_folder["models"][0]["metrics"][name]["mean"], name
    err = _error_line(capsys, base_args(ws, "bad", "--model_config", "tiny"))
    assert "--model_config" in err and "single-file" in err


@pytest.mark.e2e
def test_bad_inputs_fail_with_one_line(workspace, capsys, tmp_path, monkeypatch):
    ws = workspace
    err = _error_line(capsys, base_args(ws, "bad") + ["--dataset", str(ws / "empty")])
    assert "no image files" in err
    err = _error_line(capsys, base_args(ws, "bad") + ["--dataset", "no-such-org/no-such-dataset"])
    assert "no-such-org/no-such-dataset" in err
    fid_ok = ["--inception_weights", str(ws / "inception.pth")]
    err = _error_line(capsys, base_args(ws, "bad", *fid_ok) + ["--pretrained_model_name_or_path", str(ws / "nowhere")])
    assert "nowhere" in err and "does not exist" in err
    # A mistyped model path is reported before missing metric weights (fix the typo first, not the cache).
    no_fid = ["--inception_weights", str(tmp_path / "missing.pth")]
    err = _error_line(capsys, base_args(ws, "bad", *no_fid) + ["--pretrained_model_name_or_path", str(ws / "nowhere")])
    assert "nowhere" in err and "does not exist" in err
    err = _error_line(capsys, base_args(ws, "bad", *fid_ok) + ["--baseline", "no-such-org/no-such-vae"])
    assert "no-such-org/no-such-vae" in err
    err = _error_line(capsys, base_args(ws, "bad", *fid_ok) + ["--resolution", "30"])
    assert "multiple of 8" in err
    err = _error_line(capsys, base_args(ws, "bad") + ["--inception_weights", str(tmp_path / "missing.pth")])
    assert "missing.pth" in err and "Inception" in err
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    err = _error_line(capsys, base_args(ws, "bad"))
    assert metrics.INCEPTION_WEIGHTS_FILE in err and str(tmp_path / "hub") in err
    err = _error_line(capsys, base_args(ws, "bad") + ["--protocol", "seed", "--latent", "mean"])
    assert "--protocol seed" in err
    err = _error_line(capsys, base_args(ws, "bad") + ["--update_model_card", str(tmp_path / "no-such-model")])
    assert "--update_model_card" in err and "no-such-model" in err
    broken = tmp_path / "broken_card"
    broken.mkdir()
    (broken / "README.md").write_text("---\nmodel-index: [unclosed\n---\n\ntext\n")
    err = _error_line(capsys, base_args(ws, "bad", *fid_ok) + ["--update_model_card", str(broken)])
    assert "model card" in err and "README.md" in err
    assert not (ws / "bad").exists()  # nothing written before the checks


def test_inception_file_loads_like_torch_fidelity(workspace):
    """build_fid reads torch-fidelity's file format and resizes as torch-fidelity does (TF1 bilinear, no antialias)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = str(workspace / "inception.pth")
    fid = metrics.build_fid(weights_path=path, features=64)
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["64"], feature_extractor_weights_path=path)
    images = torch.randint(0, 256, (2, 3, 400, 352), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ours, theirs = fid.inception(images), reference(images)[0]
    assert ours.shape == (2, 64) and ours.abs().sum() > 0
    torch.testing.assert_close(ours, theirs)
    bad = workspace / "not_inception.pth"
    torch.save({"weight": torch.zeros(1)}, bad)
    with pytest.raises(MetricError, match="cannot load Inception weights"):
        metrics.build_fid(weights_path=str(bad))


def _fake_result(psnr: float = 25.0, lpips_weights: str = "pretrained", fid_features: int = 2048) -> dict:
    """The parts of an eval result the model card reads."""

    def scores(rfid, psnr, ssim, lpips):
        means = {"psnr": psnr, "ssim": ssim, "lpips": lpips}
        return {"rfid": {"value": rfid}, **{k: {"mean": v, "std": 0.0, "count": 10} for k, v in means.items()}}

    models = [
        {"label": "model", "role": "model", "metrics": scores(1.25, psnr, 0.75, 0.1)},
        {"label": "sd-vae", "role": "baseline", "metrics": scores(0.5, 30.0, 0.9, 0.05)},
    ]
    protocol = {"name": "default", "latent": "mean", "uint8": "round", "ssim_window": "uniform",
                "preprocessing": "Resize + CenterCrop", "mixed_precision": "no", "lpips_weights": lpips_weights,
                "rfid": "torchmetrics FrechetInceptionDistance"}  # fmt: skip
    config = {"fid_features": fid_features, "dataset_config": None}
    return {"dataset_name": "imagenet-1k", "split": "validation", "resolution": 256, "num_images": 10,
            "protocol": protocol, "config": config, "models": models}  # fmt: skip


def test_model_card_metadata_and_section(tmp_path):
    from huggingface_hub import ModelCard

    # Standard metrics go into model-index; only the evaluated model's, not the baseline's.
    entries = {r.metric_type: r.metric_value for r in model_card.card_eval_results(_fake_result())}
    assert entries == {"rfid": 1.25, "psnr": 25.0, "ssim": 0.75, "lpips": 0.1}
    # A random-VGG "LPIPS" or an rFID on other Inception features is not published as such.
    entries = {
        r.metric_type for r in model_card.card_eval_results(_fake_result(lpips_weights="random", fid_features=64))
    }
    assert entries == {"psnr", "ssim"}

    # No README yet: a minimal diffusers card is created.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    result = _fake_result()
    path = model_card.update_model_card(str(fresh), result, eval_vae.markdown_table(result))
    card = ModelCard.load(path)
    assert card.data.library_name == "diffusers" and card.data.model_name == "fresh"
    assert {r.metric_type for r in card.data.eval_results} == {"rfid", "psnr", "ssim", "lpips"}

    # An existing card keeps its metadata, text and other evaluations; a re-run replaces its own section.
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: mit\ntags:\n- vae\n---\n\n# My VAE\n\nIntro text.\n")
    for psnr in (25.0, 26.5):
        result = _fake_result(psnr=psnr)
        model_card.update_model_card(str(folder), result, eval_vae.markdown_table(result))
    other = {**_fake_result(psnr=20.0), "dataset_name": "coco", "resolution": 512}
    model_card.update_model_card(str(folder), other, eval_vae.markdown_table(other))
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "mit" and card.data.tags == ["vae"] and "Intro text." in card.text
    psnrs = {(r.dataset_type, r.metric_value) for r in card.data.eval_results if r.metric_type == "psnr"}
    assert psnrs == {("imagenet-1k", 26.5), ("coco", 20.0)}
    assert card.text.count("## Reconstruction: imagenet-1k validation, 256²") == 1
    assert card.text.count("| model | 1.250 | 26.500 |") == 1 and "25.500" not in card.text
    assert card.text.count("## Reconstruction: coco validation, 512²") == 1
    assert card.text.index("Intro text.") < card.text.index("## Reconstruction")


@pytest.mark.e2e
def test_update_model_card_end_to_end(workspace, random_lpips, capsys, tmp_path):
    from huggingface_hub import ModelCard

    ws = workspace
    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "README.md").write_text("# exported\n\nTrained on photos.\n")
    argv = base_args(ws, "out_card", "--no-fid", "--grid_images", "0", "--max_samples", "2",
                     "--update_model_card", str(folder))  # fmt: skip
    for _ in range(2):
        result = eval_vae.main(argv, lpips=random_lpips)
    assert f"wrote {folder / 'README.md'}" in capsys.readouterr().out
    card = ModelCard.load(folder / "README.md")
    got = {r.metric_type: r.metric_value for r in card.data.eval_results}
    want = result["models"][0]["metrics"]
    assert got == {"psnr": round(want["psnr"]["mean"], 4), "ssim": round(want["ssim"]["mean"], 4)}  # no random LPIPS
    assert card.data.model_name == "exported" and card.data.library_name is None  # an existing card is not rewritten
    assert card.text.count("<!-- eval_vae results") == 1 and card.text.count("| model |") == 1
    assert "Trained on photos." in card.text and eval_vae.markdown_table(result) in card.text


# ---------------------------------------------------------------------------------------------
# Encoder drift from a base model
# ---------------------------------------------------------------------------------------------


def scaled_latents(vae, factor: float):
    """A copy of `vae` whose posterior means are `factor` × the original's (quant_conv's mean half scaled)."""
    import copy

    out = copy.deepcopy(vae)
    half = out.config.latent_channels
    with torch.no_grad():
        out.quant_conv.weight[:half] *= factor
        out.quant_conv.bias[:half] *= factor
    return out


def test_encoder_drift_formulas_on_hand_made_models():
    from metrics.drift import encoder_drift

    torch.manual_seed(0)
    base = build_vae("tiny").eval()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mu = base.encode(images).latent_dist.mean.flatten(1)
    same = encoder_drift(base, base, images, 2)
    assert torch.equal(same["latent_mse"], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(same["latent_cosine"], torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6)
    own, _ = held_out_metrics(base, images, None, 2)  # decoding its own latents is its reconstruction
    assert same["base_latents_psnr"].mean().item() == pytest.approx(own["psnr"], abs=1e-9)

    doubled = encoder_drift(scaled_latents(base, 2.0), base, images, 2)
    torch.testing.assert_close(doubled["latent_mse"], mu.double().pow(2).mean(1), rtol=1e-5, atol=0)  # (2μ - μ)²
    torch.testing.assert_close(doubled["latent_cosine"], torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6)
    flipped = encoder_drift(scaled_latents(base, -1.0), base, images, 3)
    torch.testing.assert_close(flipped["latent_cosine"], -torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6)
    # Its decoder is the base's: decoding the base's latents is the base's reconstruction, whatever its encoder.
    torch.testing.assert_close(flipped["base_latents_psnr"], same["base_latents_psnr"])
    new_decoder = scaled_latents(base, 1.0)
    with torch.no_grad():
        new_decoder.decoder.conv_out.bias += 0.2
    shifted = encoder_drift(new_decoder, base, images, 2)
    assert torch.equal(shifted["latent_mse"], torch.zeros(3, dtype=torch.float64))
    assert (shifted["base_latents_psnr"] < same["base_latents_psnr"]).all()


@pytest.mark.e2e
def test_eval_reports_drift_from_the_first_baseline(workspace, random_lpips, capsys, tmp_path):
    """--baseline BASE: the model's drift from BASE, per image in eval.json, one sentence in eval.md; a baseline in
    another latent space (the 4-channel checkpoint) has none."""
    from metrics.drift import encoder_drift

    ws = workspace
    model = load_vae(str(ws / "model")).eval()
    scaled_latents(model, 0.5).save_pretrained(tmp_path / "base")  # the model's latents are 2 × the base's
    argv = base_args(ws, "out_drift", "--no-fid", "--grid_images", "0", "--baseline", str(tmp_path / "base"))
    result = eval_vae.main([*argv, "--baseline", str(ws / "run" / "checkpoint-3")], lpips=random_lpips)
    capsys.readouterr()
    first = result["models"][0]
    assert first["drift_from"] == "base" and all(m["drift_from"] is None for m in result["models"][1:])
    images = load_images(data.SourceSpec(name="images", path=str(ws / "images")), 32, NUM_IMAGES, "bilinear")
    want = encoder_drift(model, load_vae(str(tmp_path / "base")).eval(), images, 2)
    for name, values in want.items():
        got = first["metrics"][f"drift_{name}"]
        assert got["count"] == NUM_IMAGES and got["mean"] == pytest.approx(values.mean().item(), rel=1e-6)
    assert first["metrics"]["drift_latent_cosine"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert "Encoder drift of model from base" in (ws / "out_drift" / "eval.md").read_text()
    # The first baseline in another latent space: no drift to measure.
    models = [eval_vae.ModelUnderEval(label, "", role, vae, None) for label, role, vae in
              [("model", "model", model), ("ckpt", "baseline", load_vae(str(ws / "run" / "checkpoint-3")))]]  # fmt: skip
    assert eval_vae.drift_pair(models) is None
