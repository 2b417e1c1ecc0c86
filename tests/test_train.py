"""The training script end to end: exact resume, 2-process DDP, NaN steps, export, the Hub token."""

import json
import os
import subprocess
import sys

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from diffusers import AutoencoderKL
from safetensors.torch import load_file

import train_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resume_equals_uninterrupted_run(image_folder, tmp_path, tiny_args, run_main, tensors_of):
    """2k steps in one go == k steps, resume, k steps: weights, D, both optimizers, EMA, data position."""
    extra = dict(use_ema=True, ema_decay=0.9)
    run_main(tiny_args(image_folder, tmp_path / "a", 6, **extra))
    run_main(tiny_args(image_folder, tmp_path / "b", 4, **extra))
    run_main(tiny_args(image_folder, tmp_path / "b", 6, resume_from_checkpoint="latest", **extra))
    a, b = tmp_path / "a" / "checkpoint-6", tmp_path / "b" / "checkpoint-6"
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys() and len(ta) > 100
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=0, msg=key)
    ema_a = load_file(os.path.join(a, "vae_ema", "diffusion_pytorch_model.safetensors"))
    ema_b = load_file(os.path.join(b, "vae_ema", "diffusion_pytorch_model.safetensors"))
    for key in ema_a:
        assert torch.equal(ema_a[key], ema_b[key]), key
    assert torch.load(a / "data_state_0.pt", weights_only=True) == torch.load(b / "data_state_0.pt", weights_only=True)
    state_a, state_b = (json.loads((p / "trainer_state.json").read_text()) for p in (a, b))
    for key in ("global_step", "images_seen", "skipped_g_steps", "skipped_d_steps"):
        assert state_a[key] == state_b[key], key
    # The run really trained: the weights moved away from the step-4 checkpoint.
    t4 = tensors_of(tmp_path / "b" / "checkpoint-4")
    assert not torch.equal(t4["vae.decoder.conv_out.weight"], ta["vae.decoder.conv_out.weight"])
    assert not torch.equal(t4["disc.model.0.weight"] if "disc.model.0.weight" in t4 else next(v for k, v in t4.items() if k.startswith("disc.") and v.is_floating_point()),
                           ta["disc.model.0.weight"] if "disc.model.0.weight" in ta else next(v for k, v in ta.items() if k.startswith("disc.") and v.is_floating_point()))


def test_two_process_ddp_run(image_folder, tmp_path, tiny_args):
    """Real 2-rank DDP on CPU (gloo): G and D steps, checkpoints, identical replicas, loadable export."""
    out = tmp_path / "ddp"
    argv = tiny_args(image_folder, out, 4, id_weight=0.2, disc_start=2)
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch",
           "--config_file", os.path.join(ROOT, "accelerate_configs", "cpu_2proc.yaml"), "train_vae.py", *argv]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in (2, 4):
        ckpt = out / f"checkpoint-{step}"
        assert (ckpt / "vae" / "config.json").is_file() and (ckpt / "discriminator.safetensors").is_file()
        assert (ckpt / "data_state_0.pt").is_file() and (ckpt / "data_state_1.pt").is_file()
        assert f"weights identical across 2 ranks at step {step}" in proc.stderr
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["images_seen"] == 4 * 2 * 2
    # D trained from disc_start: its weights moved between the two checkpoints.
    d2 = load_file(out / "checkpoint-2" / "discriminator.safetensors")
    d4 = load_file(out / "checkpoint-4" / "discriminator.safetensors")
    assert any(not torch.equal(d2[k], d4[k]) for k in d2 if d2[k].is_floating_point())
    vae = AutoencoderKL.from_pretrained(out)
    assert vae.config.latent_channels == 8
    assert vae.config.scaling_factor != 1.0 and vae.config.shift_factor is not None
    assert (out / "README.md").is_file() and (out / "reconstructions.png").is_file()


def _nan_from(monkeypatch, bad_steps):
    """Make the generator loss non-finite at the given global steps (as an fp overflow would)."""
    from losses import TransfusionLoss

    original = TransfusionLoss.generator_loss

    def patched(self, inputs, recon, mean, logvar, global_step, **kw):
        loss, logs = original(self, inputs, recon, mean, logvar, global_step, **kw)
        return (loss * float("nan") if bad_steps(global_step) else loss), logs

    monkeypatch.setattr(TransfusionLoss, "generator_loss", patched)


def test_nonfinite_step_is_skipped_and_counted(image_folder, tmp_path, monkeypatch, tiny_args, run_main, tensors_of):
    _nan_from(monkeypatch, lambda step: step == 2)
    run_main(tiny_args(image_folder, tmp_path, 4, checkpointing_steps=1))
    c2, c3, c4 = (tensors_of(tmp_path / f"checkpoint-{i}") for i in (2, 3, 4))
    vae_keys = [k for k in c2 if k.startswith("vae.") or k.startswith("optimizer.bin")]
    assert all(torch.equal(c2[k], c3[k]) for k in vae_keys), "the NaN step changed the autoencoder"
    assert any(not torch.equal(c3[k], c4[k]) for k in vae_keys), "training did not continue after the NaN step"
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["skipped_g_steps"] == 1 and state["global_step"] == 4


def test_many_nonfinite_steps_stop_with_loadable_checkpoint(image_folder, tmp_path, monkeypatch, capsys, tiny_args, run_main, tensors_of):
    _nan_from(monkeypatch, lambda step: step >= 2)
    with pytest.raises(SystemExit) as exit_info:
        run_main(tiny_args(image_folder, tmp_path, 10, max_nonfinite_steps=3))
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("train_vae.py: error: 3 consecutive steps had a non-finite")
    # Steps 3 and 4 were skipped: the last checkpoint (4) loads and holds step 2's weights.
    assert not (tmp_path / "checkpoint-6").exists()
    last = AutoencoderKL.from_pretrained(tmp_path / "checkpoint-4", subfolder="vae")
    assert last.config.latent_channels == 8
    c2, c4 = tensors_of(tmp_path / "checkpoint-2"), tensors_of(tmp_path / "checkpoint-4")
    assert all(torch.equal(c2[k], c4[k]) for k in c2 if k.startswith("vae."))


def test_export_latent_statistics_and_token_never_written(image_folder, tmp_path, monkeypatch, capsys, tiny_args, run_main):
    import huggingface_hub

    import data

    secret = "hf_SECRETtoken1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    calls = {}

    class Repo:
        repo_id = "someone/tiny-vae"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.setdefault("create", (repo_id, kw)) and Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.setdefault("upload", kw))
    run_main(tiny_args(image_folder, tmp_path, 2, push_to_hub=True, hub_model_id="someone/tiny-vae",
                       report_to="tensorboard", latent_stats_samples=6))
    assert calls["upload"]["folder_path"] == str(tmp_path) and calls["upload"]["repo_id"] == "someone/tiny-vae"
    assert "checkpoint-*" in calls["upload"]["ignore_patterns"]
    for folder, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                assert secret.encode() not in f.read(), os.path.join(folder, name)
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err
    # scaling/shift factors are the statistics of sampled latents of the held-out images.
    vae = AutoencoderKL.from_pretrained(tmp_path)
    images = torch.stack([s["pixel_values"] for s in data.build_eval_stream(data.parse_source(image_folder), 32, max_samples=6, interpolation="bilinear")])
    with torch.no_grad():
        z = vae.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    assert vae.config.shift_factor == pytest.approx(z.mean().item(), abs=1e-5)
    assert vae.config.scaling_factor == pytest.approx(1 / z.std().item(), rel=1e-4)
    card = (tmp_path / "README.md").read_text()
    assert "library_name: diffusers" in card and "someone/tiny-vae" in card


BAD_COMMAND_LINES = [
    (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
    (["--train_batch_size", "-2"], "--train_batch_size must be positive"),
    (["--resolution", "100"], "--resolution must be a positive multiple of 8"),
    (["--source", "/nonexistent/images"], "/nonexistent/images"),
    (["--model_config", "huge"], "unknown --model_config 'huge'"),
    (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
    (["--learning_rate", "abc"], "invalid float value: 'abc'"),
    (["--mixed_precision", "fp8"], "invalid choice: 'fp8'"),
]


@pytest.mark.parametrize("argv,message", BAD_COMMAND_LINES, ids=[a[0] for a, _ in BAD_COMMAND_LINES])
def test_bad_command_line_is_one_line_before_any_model(argv, message, tmp_path, monkeypatch, capsys, run_main):
    def no_model(*a, **k):
        raise AssertionError("a model was built before the bad input was rejected")

    monkeypatch.setattr(train_vae, "build_vae", no_model)
    monkeypatch.setattr(train_vae, "TransfusionLoss", no_model)
    with pytest.raises(SystemExit) as exit_info:
        run_main(["--output_dir", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_vae.py: error:") and message in err[0], err


def test_unwritable_output_dir(tmp_path, capsys, run_main):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit):
        run_main(["--output_dir", str(blocker / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not writable" in err[0]


def test_config_file_sets_flags_and_rejects_unknown_keys(tmp_path, capsys):
    from vae.config import parse_config
    from vae.train_config import TrainConfig

    good = tmp_path / "run.yaml"
    good.write_text("resolution: 128\nuse_ema: true\nsource: [/data/a, /data/b]\n")
    cfg, _ = parse_config(TrainConfig, ["--config", str(good), "--resolution", "64"], "train_vae.py")
    assert (cfg.resolution, cfg.use_ema, cfg.source) == (64, True, ["/data/a", "/data/b"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("resolutoin: 128\n")
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--config", str(bad)], "train_vae.py")
    assert "unknown key(s) resolutoin" in capsys.readouterr().err
