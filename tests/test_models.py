"""Presets, loading, latent-channel surgery (--init_from) and decoder-only training."""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from autoencoder.models import ModelError, build_vae, count_parameters, init_from_pretrained, load_vae


def test_transfusion_preset_size_and_latent_shape():
    vae = build_vae("transfusion")
    assert count_parameters(vae) == pytest.approx(83.7e6, rel=0.002)
    assert vae.config.latent_channels == 8 and list(vae.config.block_out_channels) == [128, 256, 512, 512]
    with torch.no_grad():
        posterior = vae.encode(torch.zeros(1, 3, 256, 256)).latent_dist
    assert posterior.mean.shape == (1, 8, 32, 32)


def test_tiny_preset_keeps_the_8x_geometry():
    vae = build_vae("tiny", latent_channels=16)
    with torch.no_grad():
        z = vae.encode(torch.zeros(2, 3, 32, 32)).latent_dist.mean
        x = vae.decode(z).sample
    assert z.shape == (2, 16, 4, 4) and x.shape == (2, 3, 32, 32)


def test_unknown_preset_and_model_path_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="unknown model config 'nope'"):
        build_vae("nope")
    with pytest.raises(ModelError, match="does not exist"):
        load_vae(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="holds no AutoencoderKL"):
        load_vae(str(tmp_path / "empty"))


def test_load_vae_accepts_training_checkpoint_folders(tmp_path):
    vae = build_vae("tiny")
    vae.save_pretrained(tmp_path / "checkpoint-5" / "vae")
    loaded = load_vae(str(tmp_path / "checkpoint-5"))
    for (k, a), b in zip(vae.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_channel_surgery_4_to_8_copies_every_matching_tensor():
    torch.manual_seed(0)
    source = build_vae("tiny", latent_channels=4)
    target = build_vae("tiny", latent_channels=8)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    report = init_from_pretrained(target, source)
    src, dst = source.state_dict(), target.state_dict()
    latent_facing = {"encoder.conv_out", "quant_conv", "post_quant_conv", "decoder.conv_in"}
    assert {name.rsplit(".", 1)[0] for name in report.adapted} == latent_facing
    assert len(report.copied) == len(dst) - len(report.adapted)
    for name in report.copied:
        assert torch.equal(dst[name], src[name]), name
    # encoder.conv_out stacks (mean, logvar): old mean rows 0..3 -> 0..3, old logvar rows 4..7 -> 8..11.
    w_new, w_old = dst["encoder.conv_out.weight"], src["encoder.conv_out.weight"]
    assert torch.equal(w_new[:4], w_old[:4]) and torch.equal(w_new[8:12], w_old[4:8])
    assert torch.equal(w_new[4:8], fresh["encoder.conv_out.weight"][4:8])  # new channels keep their init
    # decoder.conv_in reads the latent: the first 4 input channels come from the source.
    assert torch.equal(dst["decoder.conv_in.weight"][:, :4], src["decoder.conv_in.weight"])
    assert torch.equal(dst["decoder.conv_in.weight"][:, 4:], fresh["decoder.conv_in.weight"][:, 4:])
    assert torch.equal(dst["quant_conv.weight"][:4, :4], src["quant_conv.weight"][:4, :4])
    assert torch.equal(dst["quant_conv.weight"][8:12, 8:12], src["quant_conv.weight"][4:8, 4:8])
    assert torch.equal(dst["post_quant_conv.weight"][:4, :4], src["post_quant_conv.weight"])


def test_surgery_without_adaptation_reinitialises_latent_layers():
    source, target = build_vae("tiny", latent_channels=4), build_vae("tiny", latent_channels=8)
    fresh = target.state_dict()["decoder.conv_in.weight"].clone()
    report = init_from_pretrained(target, source, adapt_latent=False)
    assert "decoder.conv_in.weight" in report.reinitialized and not report.adapted
    assert torch.equal(target.state_dict()["decoder.conv_in.weight"], fresh)


def test_surgery_rejects_other_architecture_changes():
    source = build_vae("tiny")
    target = AutoencoderKL(**{**dict(build_vae("tiny").config), "in_channels": 4, "out_channels": 4})
    with pytest.raises(ModelError, match="only the latent-facing layers may differ"):
        init_from_pretrained(target, source)
    with pytest.raises(ModelError, match="architectures differ"):
        init_from_pretrained(build_vae("small"), source)


@pytest.mark.e2e
def test_init_from_4_channels_trains_to_8_and_reconstructs(image_folder, tmp_path, tiny_args, run_main):
    """A 4-channel pretrained VAE becomes an 8-channel one whose held-out PSNR improves in a few steps."""
    torch.manual_seed(1)
    build_vae("tiny", latent_channels=4).save_pretrained(tmp_path / "sd_like")
    run_main(
        tiny_args(
            image_folder,
            tmp_path / "run",
            16,
            init_from=tmp_path / "sd_like",
            latent_channels=8,
            lpips_weight=0,
            disc_start=1000,
            validation_steps=16,
            checkpointing_steps=16,
            train_batch_size=4,
            num_validation_images=4,
        )
    )
    state = json.loads((tmp_path / "run" / "checkpoint-16" / "trainer_state.json").read_text())
    assert state["last_metrics"]["psnr"] > state["initial_metrics"]["psnr"] + 1.0, state
    assert AutoencoderKL.from_pretrained(tmp_path / "run").config.latent_channels == 8


@pytest.mark.e2e
def test_train_decoder_only_keeps_the_encoder_bit_identical(image_folder, tmp_path, tiny_args, run_main):
    torch.manual_seed(2)
    build_vae("tiny").save_pretrained(tmp_path / "pretrained")
    source = load_file(tmp_path / "pretrained" / "diffusion_pytorch_model.safetensors")
    run_main(tiny_args(image_folder, tmp_path / "run", 3, init_from=tmp_path / "pretrained", train_decoder_only=True))
    trained = load_file(tmp_path / "run" / "checkpoint-3" / "vae" / "diffusion_pytorch_model.safetensors")
    frozen = [k for k in source if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(source[k], trained[k]) for k in frozen)
    decoder = [k for k in source if k.startswith(("decoder.", "post_quant_conv."))]
    assert any(not torch.equal(source[k], trained[k]) for k in decoder), "the decoder did not train"
    # The optimizer holds exactly the decoder's parameters.
    opt = torch.load(tmp_path / "run" / "checkpoint-3" / "optimizer.bin", weights_only=True)
    n_params = sum(len(group["params"]) for group in opt["param_groups"])
    assert n_params == len([k for k in decoder if not k.endswith(("running_mean", "running_var"))])


# ---------------------------------------------------------------------------------------------
# Where the model starts: --model_config (any config), --pretrained_model_name_or_path (as it is), --init_from
# ---------------------------------------------------------------------------------------------


def test_model_config_reads_a_folder_or_checkpoint_but_not_its_weights(tmp_path):
    torch.manual_seed(0)
    saved = build_vae("tiny", latent_channels=4)
    saved.save_pretrained(tmp_path / "checkpoint-3" / "vae")
    for where in (tmp_path / "checkpoint-3", tmp_path / "checkpoint-3" / "vae"):
        fresh = build_vae(str(where))
        assert fresh.config.latent_channels == 4 and fresh.state_dict().keys() == saved.state_dict().keys()
        assert not torch.equal(
            fresh.state_dict()["decoder.conv_in.weight"], saved.state_dict()["decoder.conv_in.weight"]
        )
    with pytest.raises(ModelError, match="'nobody/nothing' is neither a local path nor a Hub model in the local cache"):
        build_vae("nobody/nothing")  # offline in the tests: one line, not a traceback


def test_single_file_start_loads_as_it_is_with_a_local_config(tmp_path):
    from autoencoder.single_file import save_single_file

    torch.manual_seed(1)
    vae = build_vae("tiny", latent_channels=4)
    vae.register_to_config(scaling_factor=0.13025)
    vae.save_pretrained(tmp_path / "sdxl_like")
    path = save_single_file(vae, str(tmp_path / "vae.safetensors"))
    for config in (str(tmp_path / "sdxl_like"), str(tmp_path / "sdxl_like" / "config.json")):
        loaded = load_vae(path, config=config)
        assert loaded.config.scaling_factor == 0.13025 and loaded.config.latent_channels == 4
        assert all(
            torch.equal(a, b) for a, b in zip(vae.state_dict().values(), loaded.state_dict().values(), strict=True)
        )
    with pytest.raises(ModelError, match="offline: give its config"):
        load_vae(path)  # diffusers would fetch the config of the model it guesses from the Hub
    with pytest.raises(ModelError, match="does not exist"):
        load_vae(str(tmp_path / "missing.safetensors"), config="tiny")


def test_init_from_takes_over_the_latent_convention_only_with_the_same_latent_channels():
    source = build_vae("tiny")
    source.register_to_config(scaling_factor=0.3611, shift_factor=0.1159)
    same = build_vae("tiny")
    assert init_from_pretrained(same, source).latent_convention["scaling_factor"] == 0.3611
    assert (same.config.scaling_factor, same.config.shift_factor) == (0.3611, 0.1159)
    other = build_vae("tiny", latent_channels=4)
    assert init_from_pretrained(other, source).latent_convention is None
    assert other.config.scaling_factor != 0.3611


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (dict(train_decoder_only=True), "--train_decoder_only would freeze encoder layers"),
        (dict(freeze=["encoder.", "quant_conv."]), "--freeze would freeze encoder layers"),
        (dict(freeze=["encoder.conv_out"]), "--freeze would freeze encoder layers that --init_from could not copy"),
        (dict(freeze=["quant_conv."]), "(quant_conv.weight, quant_conv.bias: the latent channel count changed)"),
        (dict(latent_scaling="keep"), "--latent_scaling keep: --init_from .* has 4 latent channels and this model 8"),
        (dict(freeze=["encoder.down_blocks."]), None),  # the adapted layers train: allowed
        (dict(freeze=["decoder."]), None),
        (dict(latent_channels=4, freeze=["encoder.", "quant_conv."], latent_scaling="keep"), None),  # all copied
    ],
)
def test_init_from_another_latent_shape_neither_freezes_fresh_encoder_layers_nor_keeps(
    tmp_path, flags, message, accelerator
):
    """--init_from a 4-channel VAE into 8 channels re-initialises (part of) encoder.conv_out and quant_conv: freezing
    them (--train_decoder_only or --freeze) would feed the decoder noise for ever, and the start's latent convention
    is not taken over, so an explicit --latent_scaling keep has nothing to keep (auto measures: the encoder trains)."""
    import re

    import train_vae
    from publishing.export import latent_scaling_mode
    from tiny import tiny_config

    source = build_vae("tiny", latent_channels=4)
    source.register_to_config(scaling_factor=0.13025)
    source.save_pretrained(tmp_path / "four")
    cfg = tiny_config(tmp_path, init_from=str(tmp_path / "four"), **flags)
    if message is not None:
        with pytest.raises(ModelError, match=re.escape(message).replace(r"\.\*", ".*")):
            train_vae.build_autoencoder(cfg)
        return
    vae = train_vae.build_autoencoder(cfg)
    frozen = {n for n, p in vae.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in vae.named_parameters() if n.startswith(tuple(cfg.frozen_prefixes()))}
    mode, _ = latent_scaling_mode(cfg, vae)
    same = vae.config.latent_channels == 4
    assert mode == ("keep" if same else "measure") and (vae.config.scaling_factor == 0.13025) == same


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--pretrained_model_name_or_path", "a/vae", "--init_from", "b/vae"], "not both"),
        (
            ["--pretrained_model_name_or_path", "a/vae", "--latent_channels", "16"],
            "--init_from a/vae --latent_channels 16",
        ),
        (["--pretrained_model_name_or_path", "a/vae", "--model_config", "tiny"], "brings its own config"),
        (["--pretrained_model_name_or_path", "./missing.safetensors"], "does not exist"),
        (["--model_config", "./no_such_folder"], "unknown --model_config"),
    ],
)
def test_model_start_conflicts_are_one_line_before_any_model_is_built(flags, message, capsys, monkeypatch, run_main):
    import train_vae

    monkeypatch.setattr(train_vae, "build_vae", lambda *a, **k: pytest.fail("a model was built"))
    monkeypatch.setattr(train_vae, "load_vae", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as info:
        run_main(flags)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and message in err and len(err.splitlines()) == 1, err


def _paths(tmp_path) -> dict[str, str]:
    """An empty folder, a file that is no model, and a Hub id that is not in the (offline) cache."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    return {"EMPTY": str(tmp_path / "empty"), "PNG": str(tmp_path / "x.png"), "HUB": "nobody/nothing"}


@pytest.mark.parametrize(
    ("flag", "where", "message"),
    [
        (flag, where, message)
        for flag in ("--model_config", "--pretrained_model_name_or_path", "--init_from")
        for where, message in (
            ("EMPTY", "is a folder but holds no AutoencoderKL (no config.json, vae/ or vae_ema/)"),
            ("HUB", "'nobody/nothing' is neither a local path nor a Hub model in the local cache, and HF_HUB_OFFLINE"),
            ("PNG", "is not a model file (.safetensors/.ckpt/.pt/.pth/.bin)"),
        )
        if not (flag == "--model_config" and where == "PNG")
    ]
    + [("--model_config", "PNG", "unknown --model_config")],
)
def test_bad_model_paths_are_one_line_before_data_or_models(
    flag, where, message, tmp_path, capsys, monkeypatch, run_main, image_folder
):
    """A folder without a model, a file of another kind, an uncached Hub id offline: refused by the flag check, naming
    the flag and the path, before the data is listed or anything is built (no huggingface_hub warnings above it)."""
    import train_vae

    for name in ("list_data", "build_vae", "load_vae", "build_loss_on_every_node"):
        monkeypatch.setattr(train_vae, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran before the check"))
    path = _paths(tmp_path)[where]
    with pytest.raises(SystemExit) as info:
        run_main(["--source", image_folder, "--output_dir", str(tmp_path / "out"), flag, path])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"{flag}" in err and path in err and message in err, err


def test_a_cached_hub_model_passes_the_offline_check(tmp_path, monkeypatch):
    """Offline, a Hub id whose config.json is in the local cache is accepted; the same id without it is not."""
    import huggingface_hub

    from autoencoder.models import check_model_location

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--someone--vae"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    with pytest.raises(ModelError, match="nor a Hub model in the local cache"):
        check_model_location("someone/vae", "--init_from")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    check_model_location("someone/vae", "--init_from")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online, an id is left to the Hub to answer
    check_model_location("nobody/nothing", "--init_from")


@pytest.mark.e2e
def test_decoder_fine_tune_from_a_single_file_is_a_drop_in(image_folder, tmp_path, tiny_args, run_main):
    """SD-style start (scaling_factor 0.18215, no shift) as one LDM file with a local config, decoder only:
    the export keeps the convention exactly, says so, measures anyway, and writes its own single file."""
    from autoencoder.single_file import save_single_file
    from publishing.export import SINGLE_FILE

    torch.manual_seed(2)
    base = build_vae("tiny", latent_channels=4)
    base.register_to_config(scaling_factor=0.18215, shift_factor=None)
    base.save_pretrained(tmp_path / "config_only")
    save_single_file(base, str(tmp_path / "base.safetensors"))
    args = tiny_args(image_folder, tmp_path / "run", 2, train_decoder_only=True, export_single_file=True)
    args[args.index("--model_config") + 1] = str(tmp_path / "config_only")
    run_main([*args, "--pretrained_model_name_or_path", str(tmp_path / "base.safetensors")])
    out = tmp_path / "run"
    config = json.loads((out / "config.json").read_text())
    assert (config["scaling_factor"], config["shift_factor"], config["latents_mean"]) == (0.18215, None, None)
    assert config["latent_channels"] == 4
    stats = json.loads((out / "latent_stats.json").read_text())
    assert stats["config"]["scaling_factor"] == 0.18215 and stats["scaling_factor"] != 0.18215
    card = (out / "README.md").read_text()
    assert "keeps the start model's latent convention" in card and "base.safetensors" in card
    trained = AutoencoderKL.from_pretrained(out)
    exported = AutoencoderKL.from_single_file(str(out / SINGLE_FILE), config=str(out), local_files_only=True)
    for (name, a), b in zip(trained.state_dict().items(), exported.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(trained.state_dict()["encoder.conv_out.weight"], base.state_dict()["encoder.conv_out.weight"])


def test_the_demo_keeps_a_pretrained_models_own_architecture(tmp_path):
    from common.cli import parse_config
    from training.config import TrainConfig, apply_demo_defaults

    build_vae("tiny").save_pretrained(tmp_path / "mine")
    cfg, explicit = parse_config(TrainConfig, ["--pretrained_model_name_or_path", str(tmp_path / "mine")], "t")
    cfg = apply_demo_defaults(cfg, explicit)
    assert cfg.is_demo and cfg.model_config is None and cfg.resolution == 64  # other demo defaults still apply
    cfg, explicit = parse_config(TrainConfig, [], "t")
    assert apply_demo_defaults(cfg, explicit).model_config == "tiny"


def test_diffusers_model_config_name_or_path_is_model_config(tmp_path, capsys):
    from common.cli import parse_config
    from training.config import TrainConfig

    build_vae("tiny", latent_channels=4).save_pretrained(tmp_path / "cfg")
    cfg, explicit = parse_config(TrainConfig, ["--model_config_name_or_path", str(tmp_path / "cfg")], "t")
    assert cfg.model_config == str(tmp_path / "cfg") and "model_config" in explicit and cfg.source == []
    assert build_vae(cfg.model_config).config.latent_channels == 4
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--model_config_name_or_path", "tiny", "--model_config", "small"], "t")
    assert "not both" in capsys.readouterr().err
