"""benchmarks/dit_recipe.py: its DiT sizes cost what the DiT paper says, its latent cache holds the VAE's normalised
posterior samples, its EMA is DiT's, its flags fail in one line, and cache -> train -> FID runs end to end at toy size
(a one-block DiT on 4×4 latents of a tiny VAE, 32² images, a random-weight torch-fidelity Inception)."""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from diffusers import DiTTransformer2DModel
from PIL import Image

from autoencoder.models import build_vae, load_vae

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import dit_recipe  # benchmarks/ is not a package

pytestmark = pytest.mark.usefixtures("one_thread")


def write_torch_fidelity_file(path: str) -> None:
    """A random-weight state dict of torch-fidelity's FeatureExtractorInceptionV3 (as tests/test_fid.py writes it)."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    with pytest.MonkeyPatch.context() as mp:  # the architecture without its download and load
        mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    state = net.state_dict()
    gen = torch.Generator().manual_seed(0)
    for name, tensor in state.items():  # He init: activations survive the random layers
        if name.endswith("conv.weight"):
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * (2.0 / tensor[0].numel()) ** 0.5)
    torch.save(state, path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, image_folder):
    """A tiny VAE whose config holds a non-trivial latent convention, and a random Inception file."""
    root = tmp_path_factory.mktemp("dit_recipe")
    torch.manual_seed(0)
    vae = build_vae("tiny")
    vae.register_to_config(scaling_factor=2.0, shift_factor=0.5)
    vae.save_pretrained(root / "vae")
    write_torch_fidelity_file(str(root / "inception.pth"))
    return root


class PooledColour(torch.nn.Module):
    """A cheap FID feature network (as tests/test_probe.py): uint8 (B, 3, H, W) -> 2×2 pooled colours (12-d)."""

    num_features = 12

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 2).flatten(1)


@pytest.fixture
def pooled_fid(monkeypatch):
    """FID on PooledColour instead of the Inception file (tests where the feature network does not matter)."""
    from metrics.fid import build_fid

    def cheap(weights_path=None, features=2048, **kwargs):
        return build_fid(feature_extractor=PooledColour(), **kwargs)

    monkeypatch.setattr(dit_recipe, "build_fid", cheap)


def cache_argv(workspace, image_folder, out) -> list[str]:
    return ["cache", "--vae", str(workspace / "vae"), "--source", image_folder, "--resolution", "32", "--flip"] + [
        "--batch_size", "4", "--device", "cpu", "--mixed_precision", "no", "--num_workers", "0", "--out_dir", str(out)
    ]  # fmt: skip


@pytest.mark.parametrize("size", ["S", "B", "XL"])
def test_forward_cost_is_the_dit_papers(size):
    """FlopCounterMode on diffusers' DiT of each size gives the DiT paper's Table 4 Gflops (multiply-adds) at /2."""
    assert dit_recipe.forward_macs(size, 2) / 1e9 == pytest.approx(dit_recipe.DIT_PAPER_GFLOPS[(size, 2)], rel=0.01)


def test_gpu_hours_arithmetic():
    one_hour = dit_recipe.H100_BF16_TFLOPS * 1e12 * 0.4 * 3600
    assert dit_recipe.gpu_hours(one_hour, dit_recipe.H100_BF16_TFLOPS, 0.4) == pytest.approx(1.0)
    assert dit_recipe.gpu_hours(one_hour, dit_recipe.H100_BF16_TFLOPS, 0.2) == pytest.approx(2.0)


def test_cost_estimate_counts_three_forwards_per_training_latent_and_one_decode_per_sample(monkeypatch):
    monkeypatch.setattr(dit_recipe, "forward_macs", lambda *a: 1e9)
    monkeypatch.setattr(dit_recipe, "decoder_macs", lambda *a: 5e9)
    argv = ["estimate", "--steps", "1000", "--batch_size", "10", "--eval_at", "500,1000"]
    args = dit_recipe.parse_args([*argv, "--fid_samples", "100", "--sample_steps", "20", "--mfu", "0.5"])
    est = dit_recipe.cost_estimate(args)
    assert est["train_pflop"] == pytest.approx(2 * 3 * 1e9 * 10 * 1000 / 1e15)
    assert est["sample_pflop"] == pytest.approx(2 * (1e9 * 20 + 5e9) * 100 * 2 / 1e15)
    seconds = 2 * 3 * 1e9 * 10 * 1000 / (dit_recipe.H100_BF16_TFLOPS * 1e12 * 0.5)
    assert est["train_gpu_hours"] == pytest.approx(seconds / 3600)


def test_ema_starts_at_the_initial_weights_as_dits():
    """EMA after 2 steps at decay 0.5, from the init w0 (DiT copies it before step 1): 0.25 w0 + 0.25 w1 + 0.5 w2;
    and what each evaluation samples from is that EMA, not the raw weights."""
    args = dit_recipe.parse_args(["train", "--latents", "x", "--out_dir", "y", "--model", "toy", "--steps", "2"])
    args.batch_size, args.ema_decay, args.eval_at, args.device = 4, 0.5, [1, 2], "cpu"
    settings = dit_recipe.dit_settings("toy", 2)
    model = dit_recipe.probe.build_probe_model(4, 4, settings)
    snapshots = [torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()]
    seen = []

    def on_eval(ema_model, step):
        snapshots.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone())
        seen.append(torch.nn.utils.parameters_to_vector(ema_model.parameters()).detach().clone())

    latents = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    dit_recipe.train_loop(model, latents, args, torch.device("cpu"), dit_recipe.autocast_for(None, "no"), on_eval)
    w0, w1, w2 = snapshots
    assert not torch.allclose(w1, w2)
    torch.testing.assert_close(seen[0], 0.5 * w0 + 0.5 * w1)
    torch.testing.assert_close(seen[1], 0.25 * w0 + 0.25 * w1 + 0.5 * w2)


def test_flag_errors_are_one_line_before_anything_is_built(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        dit_recipe.main(["train", "--latents", str(tmp_path), "--out_dir", str(tmp_path), "--steps", "4"] + ["--eval_at", "2,5"])  # fmt: skip
    assert e.value.code == 2 and "--eval_at steps must lie in [1, --steps=4], got [5]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        dit_recipe.main(["train", "--latents", str(tmp_path), "--out_dir", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "no latent cache in" in err and "run `cache` first" in err


def _with_flips(keys: list[str]) -> list[str]:
    plain = [k for k in keys if not k.endswith("#flip")]
    return plain + [f"{k}#flip" for k in plain]


@pytest.fixture(scope="module")
def cached(workspace, image_folder):
    """The latent cache of the ten test images and their mirrors, written once by `cache`."""
    lat = workspace / "latents"
    return lat, dit_recipe.main(cache_argv(workspace, image_folder, lat))


def train_argv(workspace, lat, out, steps: int, eval_at: str, *extra: str) -> list[str]:
    """A toy `train`: a one-block DiT, batch 4, FID on 6 samples of 2 Euler steps against 8 images, 64-d features."""
    return (
        ["train", "--latents", str(lat), "--model", "toy", "--steps", str(steps), "--batch_size", "4"]
        + ["--eval_at", eval_at, "--fid_samples", "6", "--sample_steps", "2", "--fid_real", "8", "--fid_features", "64"]
        + ["--inception_weights", str(workspace / "inception.pth"), "--eval_batch_size", "8", "--device", "cpu"]
        + ["--mixed_precision", "no", "--num_workers", "0", "--log_every", "1", "--ema_decay", "0.5"]
        + ["--checkpoint_every", "2", "--lr", "1e-2", "--out_dir", str(out), *extra]
    )


@pytest.mark.e2e
def test_cache_train_fid_end_to_end(workspace, image_folder, cached, tmp_path, capsys):
    lat, meta = cached
    cached_latents, labels, stored = dit_recipe.read_cache(str(lat))
    assert labels is None
    assert meta["count"] == 20 == len(cached_latents) == len(stored["keys"])  # 10 images and their mirrors
    keys = stored["keys"]
    assert tuple(cached_latents.shape[1:]) == (8, 4, 4) and sorted(keys) == sorted(_with_flips(keys))
    # The cache holds (z - 0.5) * 2 for z ~ q(z|x): back in z units, (z - μ) / σ is standard normal.
    vae = load_vae(str(workspace / "vae")).eval()
    crops = {s["key"]: s["pixel_values"] for s in dit_recipe.data.build_eval_stream(image_folder, 32)}
    crops.update({f"{k}#flip": v.flip(-1) for k, v in list(crops.items())})
    pixels = dit_recipe.to_uint8(torch.stack([crops[k] for k in keys]), "round").float().div(127.5).sub(1.0)
    with torch.no_grad():
        post = vae.encode(pixels).latent_dist
    eps = (cached_latents / 2.0 + 0.5 - post.mean) / post.std
    assert abs(eps.mean().item()) < 0.1 and 0.9 < eps.std().item() < 1.1, (eps.mean(), eps.std())

    out = tmp_path / "run"
    record = dit_recipe.main(train_argv(workspace, lat, out, 4, "2,4"))
    assert [p["step"] for p in record["points"]] == [2, 4]
    assert all(p["fid"] > 0 and torch.isfinite(torch.tensor(p["fid"])) for p in record["points"])
    assert record["points"][0]["fid"] != record["points"][1]["fid"]  # the model moved between the two
    assert record["fid_real_images"] == 8 and [s for s, _ in record["loss"]] == [1, 2, 3, 4]
    with open(out / "dit_recipe.json") as f:
        assert json.load(f)["points"] == record["points"]
    table = (out / "fid_vs_steps.txt").read_text().splitlines()
    assert table[1].split()[0] == "2" and float(table[2].split()[1]) == pytest.approx(
        record["points"][1]["fid"], abs=1e-3
    )
    assert all((out / f"samples_step{n}.png").is_file() for n in (2, 4))
    ema = DiTTransformer2DModel.from_pretrained(out / "ema")
    assert ema.config.num_layers == 1 and ema.config.in_channels == 8
    assert "FID" in capsys.readouterr().out


@pytest.mark.e2e
def test_resumed_run_equals_an_uninterrupted_one(workspace, cached, tmp_path, capsys, pooled_fid):
    """2 steps, then --steps 4 from its checkpoint: the weights, EMA, losses and FID points of one 4-step run."""
    from safetensors.torch import load_file

    lat, _ = cached
    whole = dit_recipe.main(train_argv(workspace, lat, tmp_path / "whole", 4, "2,4"))
    dit_recipe.main(train_argv(workspace, lat, tmp_path / "parts", 2, "2"))
    resumed = dit_recipe.main(train_argv(workspace, lat, tmp_path / "parts", 4, "2,4"))
    assert resumed["resumed_from_step"] == 2
    assert [(p["step"], p["fid"]) for p in resumed["points"]] == [(p["step"], p["fid"]) for p in whole["points"]]
    assert resumed["loss"] == whole["loss"]
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(tmp_path / run / "checkpoint" / name) for run in ("whole", "parts"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # another learning rate is another run: refused in one line
        dit_recipe.main(train_argv(workspace, lat, tmp_path / "parts", 6, "6", "--lr", "2e-4"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "was written with --lr 0.01" in err


def test_folder_labels_are_the_keys_first_folder():
    labels, classes = dit_recipe.folder_labels(["b/1.png", "a/x/2.png", "b/3.png#flip"])
    assert classes == ["a", "b"] and labels.tolist() == [1, 0, 1]
    with pytest.raises(dit_recipe.DataError, match="lies in no folder"):
        dit_recipe.folder_labels(["a/1.png", "2.png"])


class LabelVelocity(torch.nn.Module):
    """A stand-in DiT: the velocity is the label's value everywhere (the null label is num_classes)."""

    def forward(self, x, timestep, class_labels):
        return SimpleNamespace(sample=class_labels.float().view(-1, 1, 1, 1).expand_as(x).clone())


class ZeroVelocity(torch.nn.Module):
    def forward(self, x, timestep, class_labels):
        return SimpleNamespace(sample=torch.zeros_like(x))


@pytest.mark.parametrize("cfg", [1.0, 1.5, 4.0])
def test_guided_sampling_steps_on_v_null_plus_scale_times_the_difference(cfg):
    """One Euler step from t = 1 to 0: x_0 = ε − v, v = v_null + cfg·(v_class − v_null), class i mod K for sample i."""
    settings = dit_recipe.dit_settings("toy", 2, batch_size=3, sample_steps=1)
    noise = dit_recipe.sample_guided(ZeroVelocity(), 5, (2, 4, 4), 3, cfg, settings, "cpu")  # v = 0: x_0 = ε
    got = dit_recipe.sample_guided(LabelVelocity(), 5, (2, 4, 4), 3, cfg, settings, "cpu")
    v = 3.0 + cfg * (torch.arange(5) % 3 - 3.0)
    torch.testing.assert_close(got, noise - v.view(-1, 1, 1, 1))


@pytest.mark.e2e
def test_class_conditional_end_to_end(workspace, cached, tmp_path, capsys, pooled_fid):
    """cache --labels folder on two class folders, then a conditional DiT with guidance: two classes in the model."""
    rng = torch.Generator().manual_seed(0)
    for c, name in enumerate(("cat", "dog")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            pixels = (torch.rand(3, 36, 40, generator=rng) * 60 + 90 * c).to(torch.uint8)
            Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(tmp_path / "data" / name / f"{i}.png")
    lat = tmp_path / "latents"
    argv = cache_argv(workspace, str(tmp_path / "data"), lat)
    meta = dit_recipe.main([a for a in argv if a != "--flip"] + ["--labels", "folder"])
    _, labels, stored = dit_recipe.read_cache(str(lat))
    assert meta["classes"] == stored["classes"] == ["cat", "dog"]
    assert [stored["classes"][i] for i in labels.tolist()] == [k.split("/")[0] for k in stored["keys"]]
    out = tmp_path / "run"
    args = train_argv(workspace, lat, out, 2, "2", "--class_conditional", "--cfg_scale", "1.5", "--fid_real", "6")
    record = dit_recipe.main(args)
    assert record["classes"] == 2 and [p["step"] for p in record["points"]] == [2]
    assert DiTTransformer2DModel.from_pretrained(out / "ema").config.num_embeds_ada_norm == 2
    capsys.readouterr()
    with pytest.raises(SystemExit):  # an unlabelled cache cannot train a conditional model
        dit_recipe.main(train_argv(workspace, cached[0], tmp_path / "x", 2, "2", "--class_conditional"))
    assert "holds no labels; cache with --labels folder" in capsys.readouterr().err
