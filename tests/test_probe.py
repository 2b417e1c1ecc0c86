"""The latent probe (metrics/probe.py, eval_vae.py --probe): it learns, it is seeded, it holds images out,
it normalises latents with the model's own factors, and the evaluator writes its outputs for every model."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

import eval_vae
from autoencoder.models import build_vae
from metrics import probe as latent_probe

# A tiny probe: one DiT block of 2 heads × 16 on 4×4 latents.
TINY = dict(num_layers=1, num_heads=2, head_dim=16, batch_size=16, lr=1e-3, sample_steps=2, samples=0)


class PooledColour(torch.nn.Module):
    """Stand-in FID feature network (as tests/test_eval.py): uint8 (B, 3, H, W) -> 2×2 pooled colours (12-d)."""

    num_features = 12

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 2).flatten(1)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Six photographs (various sizes) in a folder, a tiny model and a tiny baseline (another seed)."""
    root = tmp_path_factory.mktemp("probe")
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket(), skdata.immunohistochemistry()]
    photos.append(np.stack([skdata.camera()] * 3, axis=-1))
    sizes = [(64, 56), (56, 72), (60, 60), (80, 56), (64, 64), (72, 64)]
    (root / "images").mkdir()
    for i, (photo, size) in enumerate(zip(photos, sizes, strict=True)):
        Image.fromarray(photo).resize(size, Image.Resampling.BILINEAR).save(root / "images" / f"img{i}.png")
    torch.manual_seed(0)
    build_vae("tiny").save_pretrained(root / "model")
    torch.manual_seed(1)
    build_vae("tiny").save_pretrained(root / "baseline")
    return root


def structured_latents(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 4, 4, 4): a per-channel offset and a spatial pattern a network can learn, plus a little noise."""
    gen = torch.Generator().manual_seed(seed)
    pattern = torch.linspace(-1.5, 1.5, 4).view(1, 4, 1, 1) * torch.cos(torch.arange(4.0)).view(1, 1, 4, 1)
    return pattern + 0.3 * torch.randn((n, 4, 4, 4), generator=gen)


def test_training_loss_falls():
    settings = latent_probe.ProbeSettings(steps=60, **TINY)
    model = latent_probe.build_probe_model(4, 4, settings)
    losses = latent_probe.train_probe(model, structured_latents(64), settings, progress=False)
    assert len(losses) == 60 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def _probe(workspace, seed: int) -> tuple[latent_probe.ProbeData, dict]:
    from autoencoder.models import load_vae

    settings = latent_probe.ProbeSettings(steps=6, seed=seed, crops_per_image=2, held_out_fraction=0.34, **TINY)
    probe_data = latent_probe.load_probe_data(str(workspace / "images"), 32, settings)
    vae = load_vae(str(workspace / "model")).eval()
    return probe_data, latent_probe.run_probe(vae, probe_data, settings, progress=False)


def test_one_seed_gives_identical_figures_another_seed_different_ones(workspace):
    rng_before = torch.get_rng_state()
    data_a, first = _probe(workspace, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the probe never draws from the global RNG
    torch.manual_seed(1234)  # ...nor depends on it
    data_b, second = _probe(workspace, seed=0)
    _, other = _probe(workspace, seed=1)

    assert torch.equal(data_a.pixels, data_b.pixels) and data_a.crop_keys == data_b.crop_keys
    figures = ("held_out_loss", "train_loss", "latent_std", "latent_mean")
    assert {k: first[k] for k in figures} == {k: second[k] for k in figures}
    assert first["train_loss"] != other["train_loss"]
    assert first["held_out_loss"] != other["held_out_loss"]
    assert set(first["held_out_loss"]) == {"0.25", "0.5", "0.75"}


def test_held_out_loss_is_on_images_the_probe_never_trained_on(workspace, monkeypatch):
    settings = latent_probe.ProbeSettings(steps=3, crops_per_image=3, held_out_fraction=0.34, **TINY)
    probe_data = latent_probe.load_probe_data(str(workspace / "images"), 32, settings)
    keys = {f"img{i}.png" for i in range(6)}
    train, held = set(probe_data.train_images), set(probe_data.held_out_images)
    assert train | held == keys and not train & held and len(held) == 2
    assert len(probe_data.pixels) == 6 * 3 == len(probe_data.image_keys)
    # Three different crops of one image (a seeded random crop each), every crop of an image on one side.
    crops_of_first = probe_data.pixels[[i for i, k in enumerate(probe_data.image_keys) if k == "img0.png"]]
    assert len(crops_of_first) == 3 and not torch.equal(crops_of_first[0], crops_of_first[1])
    assert {probe_data.image_keys[i] for i in probe_data.train_index.tolist()} == train
    assert {probe_data.image_keys[i] for i in probe_data.held_out_index.tolist()} == held

    seen = {}
    real_train, real_held = latent_probe.train_probe, latent_probe.held_out_losses

    def spy_train(model, latents, *args, **kwargs):
        seen["train"] = latents.clone()
        return real_train(model, latents, *args, **kwargs)

    def spy_held(model, latents, *args, **kwargs):
        seen["held"] = latents.clone()
        return real_held(model, latents, *args, **kwargs)

    monkeypatch.setattr(latent_probe, "train_probe", spy_train)
    monkeypatch.setattr(latent_probe, "held_out_losses", spy_held)
    torch.manual_seed(0)
    vae = build_vae("tiny").eval()
    record = latent_probe.run_probe(vae, probe_data, settings, progress=False)
    every = latent_probe.encode_latents(
        vae,
        probe_data.pixels,
        probe_data.crop_keys,
        seed=latent_probe.derive_seed(settings.seed, latent_probe._ENCODE),
        batch_size=5,  # another batching: the latent sample of a crop depends on its key only
    )
    if record["normalisation"] != "config":  # a random tiny VAE's latents are far from unit std: standardised
        every = (every - every.mean()) / every.std()
    torch.testing.assert_close(seen["train"], every[probe_data.train_index])
    torch.testing.assert_close(seen["held"], every[probe_data.held_out_index])
    # No held-out latent among the training latents.
    distances = torch.cdist(seen["held"].flatten(1), seen["train"].flatten(1))
    assert distances.min() > 1e-3

    # The split depends on the keys and the seed only.
    assert latent_probe.split_images(sorted(keys, reverse=True), 0.34, 0) == (sorted(train), sorted(held))


class HandMadeEncoder(torch.nn.Module):
    """encode(x) -> q(z|x) with mean `mean` and std `std` everywhere; config with the given factors."""

    def __init__(self, mean: float, std: float, scaling_factor: float, shift_factor: float | None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # a device to be on
        self.mean, self.std = mean, std
        self.config = SimpleNamespace(scaling_factor=scaling_factor, shift_factor=shift_factor)

    def encode(self, x):
        shape = (len(x), 4, x.shape[2] // 8, x.shape[3] // 8)
        dist = SimpleNamespace(mean=torch.full(shape, self.mean), std=torch.full(shape, self.std))
        return SimpleNamespace(latent_dist=dist)


def test_the_untrained_probe_outputs_zeros_and_learns_away_from_them():
    settings = latent_probe.ProbeSettings(steps=1, **TINY)
    model = latent_probe.build_probe_model(4, 4, settings)
    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        assert torch.equal(latent_probe.predict_velocity(model, x, t), torch.zeros_like(x))  # adaLN-zero, DiT's init
    for block in model.transformer_blocks:
        assert not block.norm1.linear.weight.any() and block.norm1.linear.weight.requires_grad
        assert not block.norm1.linear.bias.any()
    for final in (model.proj_out_1, model.proj_out_2):  # the final layer's modulation and its output linear
        assert not final.weight.any() and not final.bias.any() and final.weight.requires_grad
    latent_probe.train_probe(model, structured_latents(16), settings, progress=False)
    with torch.no_grad():
        assert latent_probe.predict_velocity(model, x, t).abs().sum() > 0  # one step moves the output layer


def test_ema_weights_sample_and_a_zero_decay_is_the_trained_weights(workspace):
    base = dict(TINY, samples=0, steps=6, crops_per_image=2, held_out_fraction=0.34)
    probe_data = latent_probe.load_probe_data(str(workspace / "images"), 32, latent_probe.ProbeSettings(**base))
    torch.manual_seed(0)
    vae = build_vae("tiny").eval()
    averaged = latent_probe.run_probe(vae, probe_data, latent_probe.ProbeSettings(**base), progress=False)
    plain = latent_probe.run_probe(vae, probe_data, latent_probe.ProbeSettings(**base, ema_decay=0.0), progress=False)
    assert averaged["held_out_loss_raw"] == plain["held_out_loss_raw"] == plain["held_out_loss"]  # same training
    assert averaged["held_out_loss"] != averaged["held_out_loss_raw"]


def test_channel_normalisation_gives_every_channel_unit_std_and_sampling_undoes_it():
    gen = torch.Generator().manual_seed(3)
    scales = torch.tensor([0.1, 1.0, 10.0, 0.0]).view(1, 4, 1, 1)  # the last channel is constant
    latents = torch.randn(40, 4, 4, 4, generator=gen) * scales + torch.tensor([1.0, -2.0, 0.5, 3.0]).view(1, 4, 1, 1)
    train = torch.arange(30)
    x, record = latent_probe.standardise(latents, train, "channel")
    stats = x[train]
    torch.testing.assert_close(stats.mean(dim=(0, 2, 3))[:3], torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.std(dim=(0, 2, 3))[:3], torch.ones(3), atol=1e-5, rtol=0)
    assert torch.isfinite(x).all() and x[:, 3].abs().max() < 1e-2  # divided by the floor, not by ~0
    torch.testing.assert_close(latent_probe.unstandardise(x, record), latents, atol=1e-5, rtol=1e-5)
    assert record["normalisation"].startswith("channel") and len(record["scale"]) == 4
    # global: one number; the config's factors kept when they give about unit std.
    unit = torch.randn(40, 4, 4, 4, generator=gen)
    y, record = latent_probe.standardise(unit, train, "global")
    assert torch.equal(y, unit) and record["normalisation"] == "config"
    y, record = latent_probe.standardise(latents, train, "global")  # std far from 1: its own mean and std
    assert record["normalisation"].startswith("measured") and y.std().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(latent_probe.unstandardise(y, record), latents, atol=1e-4, rtol=1e-5)


def _probe_result(shapes):
    settings = latent_probe.ProbeSettings(steps=5).record()
    models = [
        {
            "label": f"m{i}",
            "probe": {
                "latent_shape": shape,
                "held_out_loss": {"0.25": 0.5, "0.5": 0.4, "0.75": 0.3},
                "gfid": 10.0,
                "kid": 0.01,
                "kid_std": 0.002,
                "seconds": 3.0,
            },
        }
        for i, shape in enumerate(shapes)
    ]
    probe = {"settings": settings, "gfid": "FID of ...", "kid": "KID of ...", "gfid_standard": True}
    probe |= {"num_images": 4, "model": "DiT", "objective": "flow", "held_out_images": ["a"]}
    return {"probe": probe, "models": models, "resolution": 32}


def test_the_probe_table_marks_rows_of_another_latent_shape():
    from evaluation.report import probe_table

    same = probe_table(_probe_result([[8, 4, 4], [8, 4, 4]]))
    assert "not comparable" not in same and "| m1 | 8×4×4 | 0.5000 |" in same
    mixed = probe_table(_probe_result([[8, 4, 4], [16, 2, 2]]))
    rows = [line for line in mixed.splitlines() if line.startswith("| m")]
    assert "not comparable" not in rows[0] and "16×2×2 (loss not comparable)" in rows[1]
    assert "| 10.00 | 0.0100 ± 0.0020 |" in rows[1]  # gFID and KID still shown
    assert "gFID and KID compare across shapes" in mixed


@pytest.mark.parametrize(
    ("mean", "std", "scaling", "shift", "want_mean", "want_std"),
    [
        (2.0, 4.0, 0.25, 2.0, 0.0, 1.0),  # the model's own factors: mean 0, std 1
        (3.0, 4.0, 0.5, None, 1.5, 2.0),  # shift_factor None -> 0: (z - 0) * 0.5
        (1.0, 2.0, 1.0, 1.0, 0.0, 2.0),
    ],
)
def test_latents_are_normalised_with_the_models_factors(mean, std, scaling, shift, want_mean, want_std):
    vae = HandMadeEncoder(mean, std, scaling, shift)
    pixels = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    keys = [f"k{i}" for i in range(64)]
    latents = latent_probe.encode_latents(vae, pixels, keys, seed=0, batch_size=16)  # (64, 4, 4, 4)
    assert latents.mean().item() == pytest.approx(want_mean, abs=0.1 * want_std)
    assert latents.std().item() == pytest.approx(want_std, rel=0.08)
    z = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(latent_probe.normalise_latents(z, vae.config), (z - (shift or 0.0)) * scaling)
    torch.testing.assert_close(
        latent_probe.denormalise_latents(latent_probe.normalise_latents(z, vae.config), vae.config), z
    )


@pytest.mark.e2e
def test_eval_with_probe_writes_entries_table_curve_and_card(workspace, terminal, monkeypatch):
    capsys = terminal
    from losses.perceptual import build_lpips

    ws = workspace
    torch.manual_seed(0)
    lpips = build_lpips(pretrained=False)
    out = ws / "out"
    argv = [
        "--pretrained_model_name_or_path", str(ws / "model"),
        "--baseline", str(ws / "baseline"),
        "--dataset", str(ws / "images"),
        "--resolution", "32",
        "--batch_size", "3",
        "--num_workers", "0",
        "--perception_weights", "random",
        "--grid_images", "0",
        "--output_dir", str(out),
        "--update_model_card", str(ws / "model"),
        "--probe", "--probe_steps", "12", "--probe_batch_size", "8", "--probe_crops_per_image", "4",
        "--probe_samples", "24", "--probe_sample_steps", "2", "--probe_held_out_fraction", "0.34",
    ]  # fmt: skip
    real_sides = []
    real_fid = latent_probe.real_fid
    monkeypatch.setattr(latent_probe, "real_fid", lambda m, px, bs: real_sides.append(px) or real_fid(m, px, bs))
    result = eval_vae.main(argv, feature_extractor=PooledColour(), lpips=lpips)
    captured = capsys.readouterr()
    # The real side of gFID and KID: the held-out images' crops only (2 images × 4 crops), never a trained-on one.
    probe_data = latent_probe.load_probe_data(
        str(ws / "images"), 32, latent_probe.ProbeSettings(crops_per_image=4, held_out_fraction=0.34)
    )
    assert len(real_sides) == 2 and all(
        torch.equal(px, probe_data.pixels[probe_data.held_out_index]) for px in real_sides
    )
    assert "probe 1/2 model" in captured.err and "probe 2/2 baseline" in captured.err  # the progress bars

    saved = json.loads((out / "eval.json").read_text())
    assert [m["label"] for m in saved["models"]] == ["model", "baseline"]
    for m in saved["models"]:
        p = m["probe"]
        assert set(p["held_out_loss"]) == {"0.25", "0.5", "0.75"} and len(p["train_loss"]) == 12
        assert p["gfid"] is not None and p["gfid"] >= 0 and p["seconds"] > 0
        assert p["kid"] is not None and p["kid_std"] >= 0
        assert p["latent_shape"] == [8, 4, 4] and p["num_held_out_latents"] == 2 * 4
    assert saved["models"][0]["probe"]["held_out_loss"] != saved["models"][1]["probe"]["held_out_loss"]
    assert saved["probe"]["settings"]["steps"] == 12 and not saved["probe"]["gfid_standard"]
    assert "custom feature extractor" in saved["probe"]["gfid"]
    assert saved["probe"]["curve_png"] == str(out / "probe_curve.png") and os.path.isfile(out / "probe_curve.png")
    assert result["models"][1]["probe"]["held_out_loss"] == saved["models"][1]["probe"]["held_out_loss"]

    rows = [line for line in captured.out.splitlines() if line.startswith("| probe: ")]
    assert len(rows) == 1 and "held-out loss t=0.25" in rows[0] and "not gFID" in rows[0]
    markdown = (out / "eval.md").read_text()
    assert markdown.startswith("| images validation") and "| probe: 6 images × 4 crops, 32², 12 steps" in markdown
    assert "\n| model | " in markdown.split("| probe:")[1] and "\n| baseline | " in markdown.split("| probe:")[1]
    card = (ws / "model" / "README.md").read_text()
    assert card.count("## Latent probe: images validation, 32²") == 1 and "## Reconstruction:" in card

    # Off by default: no probe entries, no curve.
    plain = eval_vae.main([*argv[: argv.index("--update_model_card")], "--output_dir", str(ws / "plain")],
                          feature_extractor=PooledColour(), lpips=lpips)  # fmt: skip
    assert "probe" not in plain and all("probe" not in m for m in plain["models"])
    assert not os.path.exists(ws / "plain" / "probe_curve.png")


def test_latents_far_from_unit_std_are_standardised_and_said_so(workspace):
    """A checkpoint's config still has the preset's scaling_factor: its latents are standardised with their own
    statistics (else its losses would compare with no other row), and the record names it."""
    settings = latent_probe.ProbeSettings(steps=2, crops_per_image=2, held_out_fraction=0.34, **TINY)
    probe_data = latent_probe.load_probe_data(str(workspace / "images"), 32, settings)
    torch.manual_seed(0)
    vae = build_vae("tiny").eval()
    vae.register_to_config(scaling_factor=100.0, shift_factor=None)
    record = latent_probe.run_probe(vae, probe_data, settings, progress=False)
    assert record["latent_std"] > latent_probe.LATENT_STD_RANGE[1]
    assert record["normalisation"].startswith("measured")
