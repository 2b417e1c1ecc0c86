"""The exported folder (latent convention, latent_stats.json, model card, discriminator) and the Hub helpers.

Offline and quick: a tiny AutoencoderKL, a small PatchGAN, and stand-ins for HfApi.
"""

import json
import os
import shlex
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import huggingface_hub
import pytest
import torch
from diffusers import AutoencoderKL
from huggingface_hub import ModelCard

from autoencoder.latents import LATENT_STATS_FILE, latent_statistics
from autoencoder.models import ModelError, build_vae
from common.errors import HubError
from losses.discriminator import NLayerDiscriminator
from publishing import hub
from publishing.export import export_model, load_discriminator, save_discriminator
from publishing.hub import HUB_IGNORE

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED, BATCH = 7, 3


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return build_vae("tiny").eval()


@pytest.fixture(scope="module")
def images():
    """Smooth colour fields in [-1, 1]: (10, 3, 32, 32)."""
    g = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    freq = torch.rand(10, 3, 3, generator=g) * 4
    return torch.sin(freq[..., 0, None, None] * xx + freq[..., 1, None, None] * yy + freq[..., 2, None, None] * 6)


def card_args(**extra):
    args = dict(
        repo_id=None,
        license="other",
        base_model=None,
        sources=[
            {
                "name": "imagenet",
                "path": "/data/secret_home/ImageNet",
                "split": "train",
                "weight": 3.0,
                "kind": "imagenet",
            }
        ],
        heldout_name="coco_val",
        heldout_disjoint=True,
        num_validation_images=2,
        recipe=dict(
            l1_weight=1.0,
            lpips_weight=1.0,
            gan_weight=0.5,
            id_weight=0.2,
            kl_weight=1e-6,
            disc_start=50001,
            gan_ramp_steps=0,
            adaptive_weight_max=1e4,
            lecam_weight=0.0,
        ),
        steps=4,
        images_seen=16,
        batch_size=2,
        resolution=32,
        vae_config={"latent_channels": 8, "block_out_channels": [16, 32, 32, 32], "layers_per_block": 1},
        perception_weights="pretrained",
        metrics_initial={"psnr": 10.0},
        metrics_final={"psnr": 20.0},
    )
    args.update(extra)
    return args


@pytest.fixture(scope="module")
def exported(tiny_vae, images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "my-vae"
    disc = NLayerDiscriminator(base_channels=8, n_layers=2)
    stats = export_model(
        str(folder),
        tiny_vae,
        latent_images=images,
        batch_size=BATCH,
        seed=SEED,
        images_note="10 test images",
        discriminator=disc,
        card=card_args(),
    )
    return folder, stats


# ---------------------------------------------------------------------------------------------
# 1. one latent convention
# ---------------------------------------------------------------------------------------------


def independent_latents(vae, images, seed, batch):
    """z = mean + std·ε with ε drawn chunk by chunk from a seeded generator, as DiagonalGaussian.sample does."""
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    g = torch.Generator().manual_seed(seed)
    eps = torch.cat(
        [torch.randn(posterior.mean[i : i + batch].shape, generator=g) for i in range(0, len(images), batch)]
    )
    return (posterior.mean + posterior.std * eps).double()


def test_config_holds_only_scale_and_shift(exported, tiny_vae, images):
    folder, _ = exported
    config = json.loads((folder / "config.json").read_text())
    assert config.get("latents_mean") is None and config.get("latents_std") is None
    vae = AutoencoderKL.from_pretrained(folder)
    z = independent_latents(vae, images, SEED, BATCH)
    normalised = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(normalised.mean().item()) < 1e-5
    assert normalised.std().item() == pytest.approx(1.0, abs=1e-5)
    # ... and the convention is really a normalisation: the raw latents are not already standard.
    assert abs(z.std().item() - 1) > 1e-2 or abs(z.mean().item()) > 1e-2


def test_latent_stats_json_matches_an_independent_computation(exported, images):
    folder, _ = exported
    saved = json.loads((folder / LATENT_STATS_FILE).read_text())
    z = independent_latents(AutoencoderKL.from_pretrained(folder), images, SEED, BATCH)
    per_channel = z.transpose(0, 1).flatten(1)
    torch.testing.assert_close(
        torch.tensor(saved["latents_mean"], dtype=torch.float64), per_channel.mean(1), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        torch.tensor(saved["latents_std"], dtype=torch.float64), per_channel.std(1), rtol=1e-4, atol=1e-5
    )
    assert saved["mean"] == pytest.approx(z.mean().item(), abs=1e-5)
    assert saved["std"] == pytest.approx(z.std().item(), rel=1e-4)
    assert saved["num_images"] == 10 and saved["seed"] == SEED and saved["images"] == "10 test images"
    assert len(saved["latents_mean"]) == 8
    assert saved["scaling_factor"] == pytest.approx(1 / saved["std"]) and saved["shift_factor"] == saved["mean"]


def test_latent_statistics_depend_on_the_seed_only_through_the_samples(tiny_vae, images):
    a = latent_statistics(tiny_vae, images, BATCH, seed=1)
    b = latent_statistics(tiny_vae, images, BATCH, seed=1)
    c = latent_statistics(tiny_vae, images, BATCH, seed=2)
    assert a == b and a["std"] != c["std"]


# ---------------------------------------------------------------------------------------------
# 3. the model card
# ---------------------------------------------------------------------------------------------


def test_card_parses_and_never_shows_this_machines_paths(exported):
    folder, stats = exported
    card = ModelCard.load(folder / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "other" and meta["library_name"] == "diffusers"
    assert set(meta["tags"]) >= {"diffusers", "autoencoder", "vae", "transfusion", "autoencoderkl"}
    assert "base_model" not in meta and "datasets" not in meta  # no init_from, no hub source
    text = (folder / "README.md").read_text()
    assert str(folder.parent) not in text and "/data/secret_home" not in text and os.path.expanduser("~") not in text
    assert 'from_pretrained("./my-vae")' in text
    assert "random" not in text.lower() and "smoke test" not in text
    assert "ImageNet" in text and "(local imagenet)" in text  # local sources: in the body only
    assert f"{stats['scaling_factor']:.6f}" in text and "latent_stats.json" in text
    assert "discriminator/" in text


def test_card_of_a_random_init_from_run_on_hub_data(tmp_path):
    from publishing.card import build_model_card

    (tmp_path / "training_curves.png").write_bytes(b"png")
    sources = [
        {"name": "in1k", "path": "ILSVRC/imagenet-1k", "split": "train", "weight": 1, "kind": "hub"},
        {"name": "ffhq", "path": str(tmp_path / "FFHQ"), "split": "training", "weight": 1, "kind": "ffhq"},
    ]
    card = build_model_card(
        **card_args(
            folder=str(tmp_path),
            repo_id="someone/tiny-vae",
            base_model="stabilityai/sdxl-vae",
            sources=sources,
            perception_weights="random",
            heldout_disjoint=False,
        )
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    meta = loaded.data.to_dict()
    assert meta["base_model"] == "stabilityai/sdxl-vae" and meta["datasets"] == ["ILSVRC/imagenet-1k"]
    top = loaded.text.strip().splitlines()[:4]
    assert any(line.startswith("> **WARNING") and "RANDOM" in line and "smoke test" in line for line in top), top
    assert "not disjoint" in loaded.text.lower()
    assert "![Training curves](training_curves.png)" in loaded.text
    assert "reconstructions.png" not in loaded.text  # not in the folder: not embedded
    assert 'from_pretrained("someone/tiny-vae")' in loaded.text and str(tmp_path) not in loaded.text


def test_card_of_a_local_init_from_has_no_base_model_metadata(tmp_path):
    from publishing.card import build_model_card

    card = build_model_card(**card_args(folder=str(tmp_path), base_model=str(tmp_path)))
    assert "base_model" not in card.data.to_dict() and str(tmp_path) not in card.content


def test_card_without_perception_terms_has_no_random_warning():
    from publishing.card import build_model_card

    recipe = dict(card_args()["recipe"], lpips_weight=0.0, id_weight=0.0)
    text = build_model_card(**card_args(perception_weights="none", recipe=recipe)).content
    assert "WARNING" not in text and "LPIPS and ID terms are off" in text


def test_card_names_the_latent_regularisers_only_when_on():
    from publishing.card import build_model_card
    from training.config import TrainConfig

    off = build_model_card(**card_args(recipe=TrainConfig().recipe())).content
    assert "equivariance" not in off and "DINOv2" not in off
    recipe = TrainConfig(equivariance_weight=0.5, vf_weight=0.1).recipe()
    on = build_model_card(**card_args(recipe=recipe)).content
    assert (
        "equivariance, additive term (ours, after EQ-VAE): weight 0.5, probability 0.5, scales [0.5, 0.75], quarter turns"
        in on
    )
    eqvae = build_model_card(**card_args(recipe=TrainConfig(equivariance_mode="eqvae").recipe())).content
    assert "equivariance, EQ-VAE's scheme: with probability 0.5 the step's whole loss" in eqvae
    assert "at a random low resolution with probability 0.25" in eqvae and "additive" not in eqvae
    assert "T a scale uniform in {8/32, ..., 31/32} and a quarter turn" in eqvae
    noise = build_model_card(**card_args(recipe=TrainConfig(latent_noise_aug=0.5).recipe())).content
    assert (
        "latent noise augmentation (ours, after σ-VAE and l-DeTok): the decoder trained on z + σ·std(z)·ε, "
        "σ ~ U[0, 0.5] per image" in noise
    )
    assert "latent noise" not in off
    assert (
        "DINOv2 alignment (VA-VAE's VF loss; its foundation model, preprocessing and λ's nll differ from the "
        "reference's, listed in the trainer's docs/recipe.md): weight 0.1, margins 0.5 / 0.25, foundation model "
        "facebook/dinov2-base" in on
    )
    recipe = TrainConfig(vf_weight=0.1, vf_margin_start=500, vf_model="facebook/dinov2-large").recipe()
    on = build_model_card(**card_args(recipe=recipe)).content
    assert "margins 0.5 / 0.25 from step 500 (0 before), foundation model facebook/dinov2-large" in on


# ---------------------------------------------------------------------------------------------
# 4. the discriminator ships
# ---------------------------------------------------------------------------------------------


def trained_discriminator():
    torch.manual_seed(3)
    disc = NLayerDiscriminator(base_channels=8, n_layers=2).train()
    with torch.no_grad():
        for _ in range(3):  # moves BatchNorm's running stats and num_batches_tracked
            disc(torch.randn(2, 3, 32, 32))
        for p in disc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return disc


def test_discriminator_round_trip_is_bit_identical(tmp_path):
    disc = trained_discriminator()
    target = save_discriminator(disc, str(tmp_path))
    config = json.loads(Path(target, "config.json").read_text())
    assert config == {
        "_class_name": "NLayerDiscriminator",
        "in_channels": 3,
        "base_channels": 8,
        "n_layers": 2,
        "norm": "BatchNorm2d",
    }
    for where in (str(tmp_path), target):  # the export folder or its discriminator/ folder
        torch.manual_seed(99)
        fresh = NLayerDiscriminator(base_channels=8, n_layers=2)
        load_discriminator(where, fresh)
        ours, theirs = disc.state_dict(), fresh.state_dict()
        assert ours.keys() == theirs.keys() and any("running_var" in k for k in ours)
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("other", [dict(base_channels=16, n_layers=2), dict(base_channels=8, n_layers=3)])
def test_discriminator_of_another_architecture_is_one_line(tmp_path, other):
    save_discriminator(trained_discriminator(), str(tmp_path))
    with pytest.raises(ModelError) as e:
        load_discriminator(str(tmp_path), NLayerDiscriminator(**other))
    assert "\n" not in str(e.value) and "another architecture" in str(e.value)
    os.remove(tmp_path / "discriminator" / "config.json")  # no config: the tensors still refuse
    with pytest.raises(ModelError) as e:
        load_discriminator(str(tmp_path), NLayerDiscriminator(**other))
    assert "\n" not in str(e.value) and "does not fit" in str(e.value)


def test_discriminator_from_the_hub_offline_is_one_line():
    with pytest.raises(HubError) as e:
        load_discriminator("someone/tiny-vae", NLayerDiscriminator())
    assert "\n" not in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
    with pytest.raises(ModelError):
        load_discriminator("/no/such/folder", NLayerDiscriminator())


# ---------------------------------------------------------------------------------------------
# 5. the export folder
# ---------------------------------------------------------------------------------------------


def test_export_folder_loads_and_holds_what_goes_to_the_hub(exported):
    folder, _ = exported
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert names == [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "discriminator/config.json",
        "discriminator/model.safetensors",
        LATENT_STATS_FILE,
    ]
    assert AutoencoderKL.from_pretrained(folder).config.latent_channels == 8
    for pattern in ("checkpoint-*", "logs/**", "demo_data/**", "samples/**", "hub_staging/**"):
        assert pattern in HUB_IGNORE


# ---------------------------------------------------------------------------------------------
# 5b. a fine-tune's latent convention (--latent_scaling) and the single-file export
# ---------------------------------------------------------------------------------------------

SD_CONVENTION = {"scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None}


def sd_like_vae(**convention):
    """A tiny random-weight VAE whose config carries a start model's latent convention (SD 1.x's by default)."""
    torch.manual_seed(3)
    vae = build_vae("tiny").eval()
    vae.register_to_config(**{**SD_CONVENTION, **convention})
    return vae


@pytest.mark.parametrize(
    "convention", [{}, {"scaling_factor": 0.3611, "shift_factor": 0.1159, "latents_mean": [0.1] * 8}]
)
def test_keep_leaves_the_start_models_convention_exactly_and_still_measures(images, tmp_path, convention):
    vae = sd_like_vae(**convention)
    expected = {**SD_CONVENTION, **convention}
    stats = export_model(
        str(tmp_path / "kept"),
        vae,
        latent_images=images,
        batch_size=BATCH,
        seed=SEED,
        card=card_args(base_model="stabilityai/sd-vae-ft-mse", base_loaded_as_is=True),
        latent_scaling="keep",
        latent_scaling_reason="encoder and quant_conv frozen",
    )
    config = json.loads((tmp_path / "kept" / "config.json").read_text())
    assert {k: config.get(k) for k in expected} == expected
    # latent_stats.json holds the measured values (the same as an independent computation) and the kept ones.
    record = json.loads((tmp_path / "kept" / LATENT_STATS_FILE).read_text())
    z = independent_latents(vae, images, SEED, BATCH)
    assert record["scaling_factor"] == pytest.approx(1 / z.std().item(), rel=1e-6) == stats["scaling_factor"]
    assert record["config"] == expected and "not in config.json" in record["convention"]
    card = ModelCard.load(tmp_path / "kept" / "README.md")
    assert card.data.to_dict()["base_model"] == "stabilityai/sd-vae-ft-mse"
    assert "keeps the start model's latent convention" in card.text and "frozen" in card.text
    assert "Fine-tuned from `stabilityai/sd-vae-ft-mse` (loaded as it is" in card.text


def test_measure_replaces_a_start_models_convention(images, tmp_path):
    vae = sd_like_vae(latents_mean=[0.1] * 8, latents_std=[2.0] * 8)
    stats = export_model(
        str(tmp_path / "m"), vae, latent_images=images, batch_size=BATCH, seed=SEED, latent_scaling="measure"
    )
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(stats["scaling_factor"]) != SD_CONVENTION["scaling_factor"]
    assert config["shift_factor"] == pytest.approx(stats["shift_factor"])
    assert config["latents_mean"] is None and config["latents_std"] is None
    assert "config" not in json.loads((tmp_path / "m" / LATENT_STATS_FILE).read_text())
    with pytest.raises(ValueError, match="keep or measure"):
        export_model(str(tmp_path / "x"), vae, latent_stats=stats, latent_scaling="auto")


@pytest.mark.parametrize(
    ("flags", "expected", "why"),
    [
        (dict(pretrained_model_name_or_path="START", train_decoder_only=True), "keep", "in its place"),
        (dict(init_from="START", freeze=["encoder.", "quant_conv."]), "keep", "in its place"),
        (dict(init_from="START", freeze=["encoder."]), "measure", "no longer"),  # quant_conv trains: the latents move
        (dict(pretrained_model_name_or_path="START"), "measure", "no longer"),
        (dict(train_decoder_only=True), "measure", "trained here"),  # a random frozen encoder: nothing to keep
        (
            dict(pretrained_model_name_or_path="START", train_decoder_only=True, latent_scaling="measure"),
            "measure",
            "--latent_scaling measure",
        ),
        (dict(pretrained_model_name_or_path="START", latent_scaling="keep"), "keep", "no longer the start model's"),
    ],
)
def test_latent_scaling_auto_keeps_only_a_start_models_frozen_encoder(tmp_path, flags, expected, why):
    from publishing.export import latent_scaling_mode
    from tiny import tiny_config

    build_vae("tiny").save_pretrained(tmp_path / "start")
    flags = {k: str(tmp_path / "start") if v == "START" else v for k, v in flags.items()}
    mode, reason = latent_scaling_mode(tiny_config(tmp_path, **{"model_config": None, **flags}), build_vae("tiny"))
    assert mode == expected and why in reason, reason


@pytest.mark.parametrize("flags", [dict(), dict(train_decoder_only=True), dict(freeze=["encoder.", "quant_conv."])])
def test_latent_scaling_keep_without_a_start_model_is_refused_by_the_flag_check(tmp_path, flags):
    """A fresh model has no convention to keep: `keep` would export diffusers' default 0.18215 and claim it kept it."""
    from common.errors import ConfigError
    from tiny import tiny_config

    with pytest.raises(ConfigError, match="--latent_scaling keep keeps the start model's latent convention"):
        tiny_config(tmp_path, latent_scaling="keep", **flags)
    tiny_config(tmp_path, latent_scaling="measure", **flags)  # measuring needs no start model


def test_single_file_is_the_ldm_layout_and_loads_back_equal(tmp_path, capsys):
    """A random-weight tiny model -> LDM keys (ours) -> AutoencoderKL.from_single_file (diffusers' map, offline,
    local config): the same tensors and the same outputs."""
    from safetensors.torch import load_file

    from autoencoder.single_file import ldm_key
    from publishing.export import SINGLE_FILE
    from publishing.export import main as export_main

    torch.manual_seed(5)
    vae = build_vae("tiny").eval()
    vae.save_pretrained(tmp_path / "vae")
    export_main(["--single_file", str(tmp_path / "vae")])
    assert SINGLE_FILE in capsys.readouterr().out
    ldm = load_file(tmp_path / "vae" / SINGLE_FILE)
    # The original names: (tiny: 4 levels, 1 resnet per encoder level, 2 per decoder level, 16 -> 32 shortcut)
    for key, shape in [
        ("encoder.down.1.block.0.nin_shortcut.weight", (32, 16, 1, 1)),
        ("encoder.down.0.downsample.conv.weight", (16, 16, 3, 3)),
        ("encoder.mid.block_2.norm2.weight", (32,)),
        ("encoder.mid.attn_1.q.weight", (32, 32, 1, 1)),
        ("decoder.mid.attn_1.proj_out.weight", (32, 32, 1, 1)),
        ("decoder.up.3.upsample.conv.weight", (32, 32, 3, 3)),  # diffusers' up_blocks.0, the lowest resolution
        ("decoder.up.0.block.1.conv1.weight", (16, 16, 3, 3)),  # its last, the highest (16 channels)
        ("decoder.norm_out.weight", (16,)),
        ("quant_conv.weight", (16, 16, 1, 1)),
    ]:
        assert tuple(ldm[key].shape) == shape, key
    assert "decoder.up.0.upsample.conv.weight" not in ldm
    diffusers_words = ("_blocks", "resnets", "attentions", "conv_shortcut", "to_q", "group_norm", "conv_norm_out")
    assert not [k for k in ldm if any(w in k for w in diffusers_words)]
    loaded = AutoencoderKL.from_single_file(
        str(tmp_path / "vae" / SINGLE_FILE), config=str(tmp_path / "vae"), local_files_only=True
    ).eval()
    ours, theirs = vae.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae(x).sample, loaded(x).sample)
    with pytest.raises(ModelError, match="no place for the tensor"):
        ldm_key("encoder.extra_head.weight", 4)


def test_single_file_export_of_a_missing_folder_is_one_line(tmp_path, capsys):
    from publishing.export import main as export_main

    with pytest.raises(SystemExit) as info:
        export_main(["--single_file", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# 6. the Hub: fail fast, fail soft
# ---------------------------------------------------------------------------------------------


class NoCalls:
    """An HfApi that fails the test when touched."""

    def __getattr__(self, name):
        raise AssertionError(f"HfApi.{name} was called")


@pytest.fixture
def online(monkeypatch):
    """As if HF_HUB_OFFLINE were unset (the stand-in APIs below are still the only 'network')."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_prepare_repo_without_a_token_is_one_line(online, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubError) as e:
        hub.prepare_repo("someone/tiny-vae", private=False, api=NoCalls())
    assert "\n" not in str(e.value) and "no Hugging Face token" in str(e.value)


def test_prepare_repo_offline_sends_no_request(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(HubError) as e:
        hub.prepare_repo("someone/tiny-vae", private=True, token="hf_x", api=NoCalls())
    assert "\n" not in str(e.value) and "HF_HUB_OFFLINE" in str(e.value) and time.perf_counter() - started < 1


class RepoApi:
    def __init__(self, write=True, hang=False):
        self.calls, self.write, self.hang = [], write, hang

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        if self.hang:
            time.sleep(30)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def auth_check(self, repo_id, *, repo_type=None, token=None, write=False):
        self.calls.append(("auth_check", repo_id, write))
        if not self.write:
            raise RuntimeError("403 Forbidden: you do not have write access\nRequest ID: 1234")


def test_prepare_repo_checks_write_access(online):
    api = RepoApi()
    assert hub.prepare_repo("someone/tiny-vae", private=True, token="hf_x", api=api) == "someone/tiny-vae"
    assert (
        api.calls[0][2]["exist_ok"]
        and api.calls[0][2]["private"]
        and api.calls[1] == ("auth_check", "someone/tiny-vae", True)
    )
    with pytest.raises(HubError) as e:
        hub.prepare_repo("someone/tiny-vae", token="hf_x", api=RepoApi(write=False))
    assert "\n" not in str(e.value) and "cannot write" in str(e.value) and "403" in str(e.value)


def test_prepare_repo_gives_up_within_its_timeout(online):
    started = time.perf_counter()
    with pytest.raises(HubError) as e:
        hub.prepare_repo("someone/tiny-vae", token="hf_x", api=RepoApi(hang=True), timeout=0.3)
    assert "no answer" in str(e.value) and time.perf_counter() - started < 5


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_folder_failure_keeps_the_folder_and_says_how_to_upload(online, exported):
    folder, _ = exported
    before = tree(folder)

    class Failing:
        def upload_folder(self, **kw):
            raise ConnectionError("connection reset by peer\n(traceback-ish detail)")

    with pytest.raises(HubError) as e:
        hub.push_folder("someone/tiny-vae", str(folder), token="hf_x", api=Failing())
    message = str(e.value)
    assert "\n" not in message and "connection reset" in message and tree(folder) == before
    command = message.split("upload it later with: ")[1]
    expected = ["hf", "upload", "someone/tiny-vae", str(folder), "."] + [f"--exclude={p}" for p in HUB_IGNORE]
    assert shlex.split(command) == expected


def test_upload_command_is_valid_hf_cli_syntax(tmp_path):
    """The real CLI parses the command: offline it stops at the network, not at the arguments."""
    command = shlex.split(hub.upload_command("someone/tiny-vae", str(tmp_path)))
    hf = os.path.join(ROOT, ".venv", "bin", "hf")
    if not os.path.exists(hf):
        pytest.skip("no hf CLI in .venv")
    result = subprocess.run(
        [hf, *command[1:]],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_x"},
    )
    assert result.returncode != 2, result.stderr  # 2: usage error
    assert "offline" in (result.stdout + result.stderr).lower()


class StubUploader:
    """HfApi.upload_folder(run_as_future=True) on a thread; records the files each upload saw."""

    def __init__(self, fail_first=0, gate: threading.Event | None = None):
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.fail_first, self.gate = fail_first, gate
        self.attempts, self.commits = [], []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()

    def upload_folder(self, *, repo_id, folder_path, commit_message, ignore_patterns, token, run_as_future):
        assert run_as_future and repo_id == "someone/tiny-vae" and "checkpoint-*" in ignore_patterns
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.attempts.append(commit_message)
        failing = len(self.attempts) <= self.fail_first

        def work():
            try:
                if self.gate is not None:
                    self.gate.wait(10)
                if failing:
                    raise ConnectionError("503 Service Unavailable\nretry later")
                self.commits.append((commit_message, tree(Path(folder_path))))
                return "https://huggingface.co/someone/tiny-vae/commit/abc"
            finally:
                with self.lock:
                    self.in_flight -= 1

        return self.pool.submit(work)


def test_every_save_pushes_each_checkpoint_and_survives_a_failed_upload(online, tiny_vae, images, tmp_path, caplog):
    api = StubUploader(fail_first=1)
    pusher = hub.BackgroundPusher("someone/tiny-vae", token="hf_x", api=api)
    stats = latent_statistics(tiny_vae, images, BATCH, seed=SEED)
    folders = []
    for step in (2, 4):
        folder = tmp_path / "hub_staging" / f"step-{step}"
        export_model(
            str(folder),
            tiny_vae,
            latent_stats=stats,
            discriminator=trained_discriminator(),
            card=card_args(steps=step, repo_id="someone/tiny-vae"),
        )
        folders.append(folder)
        with caplog.at_level("WARNING", logger="publishing.hub"):
            pusher.push(str(folder), f"step {step}", cleanup=True)
        assert pusher.finish(timeout=30)
    assert api.attempts == ["step 2", "step 4"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "step 2" in warnings[0] and "503" in warnings[0] and "\n" not in warnings[0]
    assert pusher.failures == 1 and pusher.uploaded == ["step 4"]
    ((message, files),) = api.commits
    assert message == "step 4" and "- steps: 4," in files["README.md"].decode()
    assert {
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "latent_stats.json",
        "README.md",
        "discriminator/model.safetensors",
        "discriminator/config.json",
    } <= set(files)
    assert not any(f.exists() for f in folders)  # cleanup: staging folders go once their upload ended


def test_pusher_keeps_one_upload_in_flight_and_queues_only_the_newest(online, tmp_path):
    gate = threading.Event()
    api = StubUploader(gate=gate)
    pusher = hub.BackgroundPusher("someone/tiny-vae", api=api)
    folders = []
    for step in (1, 2, 3):
        folder = tmp_path / f"step-{step}"
        folder.mkdir()
        (folder / "weights.bin").write_text(f"step {step}")
        folders.append(folder)
        pusher.push(str(folder), f"step {step}", cleanup=True)  # returns at once: training is not blocked
    assert pusher.busy and api.attempts == ["step 1"] and not folders[1].exists()  # step 2 superseded by 3
    gate.set()
    assert pusher.finish(timeout=30)
    assert api.attempts == ["step 1", "step 3"] and api.max_in_flight == 1
    assert [m for m, _ in api.commits] == ["step 1", "step 3"] and api.commits[1][1] == {"weights.bin": b"step 3"}


def test_pusher_offline_or_broken_api_is_never_fatal(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pusher = hub.BackgroundPusher("someone/tiny-vae", api=NoCalls())
    with caplog.at_level("WARNING", logger="publishing.hub"):
        pusher.push(str(tmp_path), "step 1")
    assert pusher.finish(timeout=5) and pusher.failures == 1 and "HF_HUB_OFFLINE" in pusher.last_error
    assert tmp_path.exists()  # no cleanup asked: the folder stays


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        ("stabilityai/sd-vae-ft-mse", "stabilityai/sd-vae-ft-mse"),
        (
            "https://huggingface.co/stabilityai/sd-vae-ft-mse-original/blob/main/vae-ft-mse-840000-ema-pruned.safetensors",
            "stabilityai/sd-vae-ft-mse-original",
        ),
        ("https://example.com/vae.safetensors", None),
        ("./vae.safetensors", None),
        ("/models/vae/my_vae.safetensors", None),
    ],
)
def test_card_base_model_metadata_names_the_start_when_it_is_on_the_hub(start, expected):
    from publishing.card import build_model_card

    card = build_model_card(**card_args(base_model=start, base_loaded_as_is=True))
    assert card.data.to_dict().get("base_model") == expected
    assert "Fine-tuned from `" in card.content and "/models/vae" not in card.content
