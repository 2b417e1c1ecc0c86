"""The training script end to end: exact resume, 2-process DDP, NaN steps, export, the Hub token."""

import concurrent.futures
import hashlib
import json
import os
import re
import subprocess
import types

import huggingface_hub
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from diffusers import AutoencoderKL
from safetensors.torch import load_file

import autoencoder.models
import train_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.e2e
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
    assert not torch.equal(
        t4["disc.model.0.weight"]
        if "disc.model.0.weight" in t4
        else next(v for k, v in t4.items() if k.startswith("disc.") and v.is_floating_point()),
        ta["disc.model.0.weight"]
        if "disc.model.0.weight" in ta
        else next(v for k, v in ta.items() if k.startswith("disc.") and v.is_floating_point()),
    )


@pytest.mark.e2e
def test_checkpoint_and_validation_schedule_do_not_change_the_run(
    image_folder, tmp_path, tiny_args, run_main, tensors_of
):
    """The same seed gives the same model whether it saved and validated every step or only at the end.

    Saving the EMA once drew from the training RNG (diffusers' EMAModel.save_pretrained builds a freshly
    initialised model), so the checkpoint interval changed the posterior noise of every later step.
    """
    extra = dict(use_ema=True, ema_decay=0.9)
    run_main(tiny_args(image_folder, tmp_path / "often", 6, checkpointing_steps=1, validation_steps=1, **extra))
    run_main(tiny_args(image_folder, tmp_path / "once", 6, checkpointing_steps=6, validation_steps=100, **extra))
    often, once = tmp_path / "often" / "checkpoint-6", tmp_path / "once" / "checkpoint-6"
    t_often, t_once = tensors_of(often), tensors_of(once)
    assert t_often.keys() == t_once.keys()
    for key in t_once:
        assert torch.equal(t_often[key], t_once[key]), key
    ema = [load_file(os.path.join(p, "vae_ema", "diffusion_pytorch_model.safetensors")) for p in (often, once)]
    assert all(torch.equal(ema[0][k], ema[1][k]) for k in ema[1])


@pytest.mark.e2e
def test_two_process_ddp_run(image_folder, tmp_path, tiny_args, two_rank_launch, tensors_of, caplog):
    """Real 2-rank DDP on CPU (gloo): G and D steps, checkpoints, identical replicas, loadable export; then its
    checkpoint resumed on 1 process."""
    out = tmp_path / "ddp"
    argv = tiny_args(image_folder, out, 4, id_weight=0.2, disc_start=2)
    cmd, env = two_rank_launch(argv)
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
    resume_on_one_process(out / "checkpoint-4", tmp_path / "one", image_folder, tiny_args, tensors_of, caplog)


def resume_on_one_process(checkpoint, out, image_folder, tiny_args, tensors_of, caplog):
    """The 2-rank checkpoint resumed on 1 process: every state restores exactly (saved again at once, it holds the
    same tensors), the stream takes over both ranks' data positions, the RNG restarts from (seed, step, rank), a
    warning says so, and training goes on."""
    from common.cli import parse_config
    from data.stream import derive_seed
    from training.config import TrainConfig

    # Without the ID term (a changed loss weight takes effect on resume): no MoCo ResNet-50 to build here.
    argv = tiny_args(image_folder, out, 6, disc_start=2, resume_from_checkpoint=str(checkpoint))
    cfg, _ = parse_config(TrainConfig, argv, "train_vae.py")
    for singleton in (AcceleratorState, GradientState, PartialState):
        singleton._reset_state()
    try:
        trainer = train_vae.Trainer(cfg, train_vae.build_accelerator(cfg))
        trainer.attach_data(train_vae.resolve_data(cfg))
        with caplog.at_level("WARNING"):
            trainer.maybe_resume()
        assert torch.initial_seed() == derive_seed(cfg.seed, 4, 0) % 2**32
        assert "written by 2 processes, resumed on 1" in caplog.text and "not bit for bit" in caplog.text
        handed = trainer.stream.state_dict()["handover"]["nodes"]
        assert [n["node"]["rank"] for n in handed] == [0, 1] and all(n["offset"] > 0 for n in handed)
        again = trainer.save_checkpoint()
        before, after = tensors_of(checkpoint), tensors_of(again)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        for name in ("scheduler.bin", "scheduler_1.bin"):
            assert torch.load(checkpoint / name, weights_only=True) == torch.load(
                os.path.join(again, name), weights_only=True
            )
        trainer.fit()
        assert trainer.state.global_step == 6 and trainer.state.images_seen == 4 * 2 * 2 + 2 * 2
    finally:
        for singleton in (AcceleratorState, GradientState, PartialState):
            singleton._reset_state()


@pytest.mark.e2e
def test_one_process_checkpoint_resumed_on_two_ranks(image_folder, tmp_path, tiny_args, two_rank_launch, tensors_of):
    """A 1-process checkpoint resumed on 2 real DDP ranks: exits 0 and warns; each rank's RNG starts from
    (seed, step, rank); weights, EMA, D, optimizers and schedules restore exactly (saved again at once: the same
    tensors); the replicas stay identical; the images the old process had left of its epoch are shared out, each
    once, and the two ranks then split the next epoch."""
    import resume_ranks
    from data.stream import derive_seed

    flags = dict(use_ema=True, ema_decay=0.9, validation_steps=100)
    for singleton in (AcceleratorState, GradientState, PartialState):
        singleton._reset_state()
    try:
        first = resume_ranks.run(str(tmp_path), tiny_args(image_folder, tmp_path / "one", 2, **flags))
    finally:
        for singleton in (AcceleratorState, GradientState, PartialState):
            singleton._reset_state()
    checkpoint = tmp_path / "one" / "checkpoint-2"
    argv = tiny_args(image_folder, tmp_path / "two", 4, resume_from_checkpoint=str(checkpoint), **flags)
    cmd, env = two_rank_launch(argv)
    script = os.path.join("tests", "resume_ranks.py")
    cmd[cmd.index("train_vae.py") :] = [script, str(tmp_path), "--", *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "written by 1 processes, resumed on 2" in proc.stderr and "not bit for bit" in proc.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["initial_seed"] for r in ranks] == [derive_seed(0, 2, rank) % 2**32 for rank in (0, 1)]
    again = ranks[0]["saved_at_resume"]
    before, after = tensors_of(checkpoint), tensors_of(again)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for name in ("scheduler.bin", "scheduler_1.bin"):
        assert torch.load(checkpoint / name, weights_only=True) == torch.load(
            os.path.join(again, name), weights_only=True
        )
    ema = [load_file(os.path.join(p, "vae_ema", "diffusion_pytorch_model.safetensors")) for p in (checkpoint, again)]
    assert ema[0].keys() == ema[1].keys() and all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])
    assert ranks[0]["weights"] == ranks[1]["weights"] and "weights identical across 2 ranks at step 4" in proc.stderr
    images = sorted(os.listdir(image_folder))
    left = len(images) - len(first["keys"])  # the old process's rest of epoch 0, shared out round-robin
    shares = [r["keys"][: len(range(r["rank"], left, 2))] for r in ranks]
    assert sorted(first["keys"] + shares[0] + shares[1]) == images  # each image of the epoch once, none twice
    following = ranks[0]["keys"][len(shares[0]) :] + ranks[1]["keys"][len(shares[1]) :]
    assert following and len(set(following)) == len(following)  # then the next epoch, split between the ranks


@pytest.mark.e2e
@pytest.mark.parametrize(("before", "after"), [(2, 0), (0, 1)])
def test_resume_with_another_number_of_data_workers(
    image_folder, tmp_path, tiny_args, tensors_of, caplog, before, after
):
    """A checkpoint of a run with `before` DataLoader workers, resumed with `after` (--dataloader_num_workers is
    "warn"): one warning says so, every state and the RNG restore as they were, and the images the old workers had
    left of their epoch are read once, none twice (data/stream.py hand_over shares them out); then the next epoch
    begins. (0 -> 1: the same one reader, but torchdata's loader state differs with and without workers.)"""
    import resume_ranks

    def run(out, steps, **flags):
        for singleton in (AcceleratorState, GradientState, PartialState):
            singleton._reset_state()
        try:
            return resume_ranks.run(str(out), tiny_args(image_folder, out, steps, **flags))
        finally:
            for singleton in (AcceleratorState, GradientState, PartialState):
                singleton._reset_state()

    first = run(tmp_path / "before", 2, dataloader_num_workers=before)
    checkpoint = tmp_path / "before" / "checkpoint-2"
    rng = torch.load(checkpoint / "random_states_0.pkl", weights_only=False)["torch_manual_seed"]
    rng = hashlib.sha256(rng.numpy().tobytes()).hexdigest()
    with caplog.at_level("WARNING"):
        second = run(tmp_path / "after", 6, resume_from_checkpoint=str(checkpoint), dataloader_num_workers=after)
    assert f"written with {before} DataLoader workers per rank, resumed with {after}" in caplog.text
    assert f"dataloader_num_workers: {before} -> {after}" in caplog.text
    assert second["rng_state"] == rng  # the RNG restored as it was: same ranks
    saved, again = tensors_of(checkpoint), tensors_of(second["saved_at_resume"])
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    images = sorted(os.listdir(image_folder))
    left = len(images) - len(first["keys"])
    assert sorted(first["keys"] + second["keys"][:left]) == images  # each image of the epoch once, none twice
    assert len(second["keys"]) > left  # and training went on into the next epoch


def _nan_from(monkeypatch, bad_steps):
    """Make the generator loss non-finite at the given global steps (as an fp overflow would)."""
    from losses import TransfusionLoss

    original = TransfusionLoss.generator_loss

    def patched(self, inputs, recon, mean, logvar, global_step, **kw):
        loss, logs = original(self, inputs, recon, mean, logvar, global_step, **kw)
        return (loss * float("nan") if bad_steps(global_step) else loss), logs

    monkeypatch.setattr(TransfusionLoss, "generator_loss", patched)


@pytest.mark.e2e
def test_nonfinite_step_is_skipped_and_counted(image_folder, tmp_path, monkeypatch, tiny_args, run_main, tensors_of):
    _nan_from(monkeypatch, lambda step: step == 2)
    run_main(tiny_args(image_folder, tmp_path, 4, checkpointing_steps=1))
    c2, c3, c4 = (tensors_of(tmp_path / f"checkpoint-{i}") for i in (2, 3, 4))
    vae_keys = [k for k in c2 if k.startswith(("vae.", "optimizer.bin"))]
    assert all(torch.equal(c2[k], c3[k]) for k in vae_keys), "the NaN step changed the autoencoder"
    assert any(not torch.equal(c3[k], c4[k]) for k in vae_keys), "training did not continue after the NaN step"
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["skipped_g_steps"] == 1 and state["global_step"] == 4


@pytest.mark.e2e
def test_many_nonfinite_steps_stop_with_loadable_checkpoint(
    image_folder, tmp_path, monkeypatch, capsys, tiny_args, run_main, tensors_of
):
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


class StubHub:
    """Stands in for huggingface_hub.HfApi: records every call; uploads fail when told to."""

    def __init__(self, fail_uploads: bool = False):
        self.calls, self.fail_uploads = [], fail_uploads

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id))
        return types.SimpleNamespace(repo_id=repo_id)

    def auth_check(self, repo_id, token=None, write=False):
        self.calls.append(("auth_check", repo_id, write))

    def upload_folder(self, *, folder_path, run_as_future=False, **kw):
        files = sorted(
            os.path.relpath(os.path.join(d, f), folder_path) for d, _, fs in os.walk(folder_path) for f in fs
        )
        self.calls.append(("upload_folder", folder_path, files, kw))
        if self.fail_uploads:
            error = ConnectionError("the Hub is unreachable")
            if not run_as_future:
                raise error
            future = concurrent.futures.Future()
            future.set_exception(error)
            return future
        result = types.SimpleNamespace(commit_url="https://huggingface.co/someone/tiny-vae/commit/0")
        if not run_as_future:
            return result
        future = concurrent.futures.Future()
        future.set_result(result)
        return future

    def uploads(self):
        return [c for c in self.calls if c[0] == "upload_folder"]


@pytest.fixture
def stub_hub(monkeypatch):
    from publishing import hub

    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    api = StubHub()
    monkeypatch.setattr(hub, "_api", lambda given, token: api)
    return api


@pytest.mark.e2e
def test_export_card_curves_and_every_save_uploads(
    image_folder, tmp_path, monkeypatch, capsys, caplog, tiny_args, run_main, stub_hub
):
    """A finished run: the model, D, latent_stats.json, curves and a card huggingface_hub parses; with
    --hub_strategy every_save each checkpoint's export goes up too; the token is written nowhere."""
    secret = "hf_SECRETtoken1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    caplog.set_level("INFO")
    run_main(
        tiny_args(
            image_folder,
            tmp_path,
            4,
            push_to_hub=True,
            hub_model_id="someone/tiny-vae",
            hub_strategy="every_save",
            report_to="tensorboard",
            latent_stats_samples=6,
            validation_steps=2,
        )
    )
    uploads = stub_hub.uploads()
    assert [os.path.basename(u[1]) for u in uploads] == ["step-2", "step-4", os.path.basename(tmp_path)]
    staged_files = uploads[0][2]
    assert "config.json" in staged_files and "discriminator/model.safetensors" in staged_files
    assert not any(f.startswith("checkpoint-") or f.endswith(".bin") for f in staged_files)  # no optimizer states
    final = uploads[-1][3]
    assert "checkpoint-*" in final["ignore_patterns"] and "hub_staging/**" in final["ignore_patterns"]
    assert not (tmp_path / "hub_staging").exists() or not any((tmp_path / "hub_staging").iterdir())
    for folder, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                assert secret.encode() not in f.read(), os.path.join(folder, name)
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err

    config = json.loads((tmp_path / "config.json").read_text())
    assert config.get("latents_mean") is None and config.get("latents_std") is None  # one latent convention
    stats = json.loads((tmp_path / "latent_stats.json").read_text())
    assert len(stats["latents_mean"]) == 8 and stats["num_images"] == 6
    assert (tmp_path / "discriminator" / "model.safetensors").is_file()
    assert (tmp_path / "training_curves.png").is_file()
    card = huggingface_hub.ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license == "other"
    assert "training_curves.png" in card.text and "reconstructions.png" in card.text
    assert "someone/tiny-vae" in card.text and str(tmp_path) not in card.text
    assert "RANDOM" in card.text  # random perception nets, said loudly
    assert "not disjoint" in card.text  # no --validation_source: held-out images come from the training data

    # The last log line sums the run up: held-out PSNR/SSIM first and last (as in metrics.jsonl), where to look.
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    psnr = [r["validation/psnr"] for r in rows if "validation/psnr" in r]
    ssim = [r["validation/ssim"] for r in rows if "validation/ssim" in r]
    assert caplog.records[-2].getMessage() == (
        f"[RANK 0] done at step 4: held-out psnr {psnr[0]:.2f} -> {psnr[-1]:.2f} dB, ssim {ssim[0]:.3f} -> "
        f"{ssim[-1]:.3f}, lpips {rows[0]['validation/lpips']:.3f} -> {rows[-1]['validation/lpips']:.3f} (2 images); "
        f"model in {tmp_path} (AutoencoderKL.from_pretrained), curves {tmp_path / 'training_curves.png'}, "
        f"grid {tmp_path / 'reconstructions.png'}"
    )
    # Then the colour kept (metrics.chroma_ratio, chroma_error; their values are tested in test_metrics.py).
    colour = caplog.records[-1].getMessage()
    assert re.fullmatch(
        r"\[RANK 0\] held-out colour: (the model keeps \d+\.\d\d of the input's chroma .* over the [12] held-out "
        r"images with mean \|Cb, Cr\| >= 0\.02\); colour error \d+\.\d\d \(.*\)|none of the 2 held-out images has colour .*)",
        colour,
    ), colour


@pytest.mark.e2e
def test_failing_final_upload_is_one_line_and_keeps_the_export(
    image_folder, tmp_path, monkeypatch, capsys, tiny_args, run_main, stub_hub
):
    monkeypatch.setenv("HF_TOKEN", "hf_token")
    stub_hub.fail_uploads = True
    with pytest.raises(SystemExit) as exit_info:
        run_main(
            tiny_args(
                image_folder, tmp_path, 4, push_to_hub=True, hub_model_id="someone/tiny-vae", hub_strategy="every_save"
            )
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train_vae.py: error: ") and "hf upload someone/tiny-vae" in err[-1], err[-1]
    assert len(stub_hub.uploads()) == 3  # both checkpoint uploads failed and training went on
    assert AutoencoderKL.from_pretrained(tmp_path).config.latent_channels == 8  # the export is intact


def test_push_to_hub_refused_before_any_model(image_folder, tmp_path, monkeypatch, capsys, tiny_args, run_main):
    """Offline, or without a token: one line and exit 2 within seconds, nothing built or trained."""
    from publishing import hub

    def no_model(*a, **k):
        raise AssertionError("a model was built before the Hub was checked")

    monkeypatch.setattr(train_vae, "build_vae", no_model)
    argv = tiny_args(image_folder, tmp_path, 4, push_to_hub=True, hub_model_id="someone/tiny-vae")
    with pytest.raises(SystemExit) as exit_info:
        run_main(argv)  # HF_HUB_OFFLINE=1 in every test
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "train_vae.py: error: cannot push to 'someone/tiny-vae': HF_HUB_OFFLINE is set (unset it, or drop "
        "--push_to_hub)"
    ]

    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(SystemExit) as exit_info:
        run_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "no Hugging Face token" in err[0], err
    assert not list(tmp_path.glob("checkpoint-*"))


@pytest.mark.e2e
def test_init_discriminator_and_base_model_round_trip(image_folder, tmp_path, monkeypatch, tiny_args, run_main):
    """The exported D starts a new run bit-identically; an --init_from hub id is the card's base_model."""
    from accelerate import Accelerator

    from autoencoder.models import build_vae
    from training.config import TrainConfig

    base = build_vae("tiny")
    monkeypatch.setattr(train_vae, "load_vae", lambda location, **_: base if location == "someone/base-vae" else None)
    # Offline, the flag check accepts a Hub id only from the local cache: this one stands in for a cached model.
    monkeypatch.setattr(autoencoder.models, "_in_hub_cache", lambda repo_id: repo_id == "someone/base-vae")
    run_main(tiny_args(image_folder, tmp_path / "first", 2, init_from="someone/base-vae"))
    card = huggingface_hub.ModelCard.load(tmp_path / "first" / "README.md")
    assert card.data.base_model == "someone/base-vae"

    exported = load_file(tmp_path / "first" / "discriminator" / "model.safetensors")
    cfg = TrainConfig(
        source=[image_folder],
        model_config="tiny",
        resolution=32,
        perception_weights="random",
        id_weight=0.0,
        report_to="none",
        output_dir=str(tmp_path / "second"),
        init_discriminator=str(tmp_path / "first"),
    )
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    trainer = train_vae.Trainer(cfg, Accelerator(cpu=True))
    loaded = trainer.loss_fn.discriminator.state_dict()
    assert loaded.keys() == exported.keys()
    assert all(torch.equal(loaded[k], exported[k]) for k in exported)
    fresh = train_vae.build_loss(cfg).discriminator.state_dict()
    assert not all(torch.equal(fresh[k], exported[k]) for k in exported if exported[k].is_floating_point())


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


@pytest.mark.parametrize(("argv", "message"), BAD_COMMAND_LINES, ids=[a[0] for a, _ in BAD_COMMAND_LINES])
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


@pytest.mark.parametrize("script", ["train_vae.py", "eval_vae.py"])
def test_help_lists_every_flag(script, capsys):
    """--help must print (argparse %-formats help text: one literal % in a help string crashed it)."""
    import dataclasses

    import eval_vae
    from common.cli import build_parser
    from training.config import TrainConfig

    cls = TrainConfig if script == "train_vae.py" else eval_vae.EvalConfig
    with pytest.raises(SystemExit) as exit_info:
        build_parser(cls, script, "").parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{f.name}" in text for f in dataclasses.fields(cls))


def test_config_file_sets_flags_and_rejects_unknown_keys(tmp_path, capsys):
    from common.cli import parse_config
    from training.config import TrainConfig

    good = tmp_path / "run.yaml"
    good.write_text("resolution: 128\nuse_ema: true\nsource: [/data/a, /data/b]\n")
    cfg, _ = parse_config(TrainConfig, ["--config", str(good), "--resolution", "64"], "train_vae.py")
    assert (cfg.resolution, cfg.use_ema, cfg.source) == (64, True, ["/data/a", "/data/b"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("resolutoin: 128\n")
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--config", str(bad)], "train_vae.py")
    assert "unknown key(s) resolutoin" in capsys.readouterr().err
