"""Reliability: kill -9 at any moment, a corpus of bad image files, untrusted pickles in a checkpoint.

The kill test runs `train_vae.py` in real OS processes and ends them with SIGKILL. They are forked
from a multiprocessing fork server that imported the trainer once, and each runs the script as
`__main__` exactly as `python train_vae.py ...` would; only the interpreter start-up (10-20 s on
two shared cores) is paid once instead of once per run.
"""

import functools
import io
import json
import multiprocessing
import multiprocessing.forkserver
import os
import pickle
import random
import re
import runpy
import shutil
import signal
import struct
import sys
import time
import zlib
from pathlib import Path

import datasets  # noqa: F401 - the trainer imports it lazily; imported here, the fork server holds it
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from torchdata import stateful_dataloader  # noqa: F401 - same reason

import data
from training import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_vae.py")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def fork_server(request):
    """The fork server of the kill test, started with this module's first test so that its imports
    run beside the in-process tests (the kill test comes last)."""
    if not any(
        "start_script" in item.fixturenames and item.module.__name__ == __name__ for item in request.session.items
    ):
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # torch, diffusers, accelerate, datasets and the trainer, once
    # Python 3.11's fork server ignores the sys.path it is sent: give it this module's folder through the
    # environment it starts with, or the preload fails silently and every run imports everything again.
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.abspath(__file__)), ROOT] + ([previous] if previous else [])
    )
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous
    return ctx


# ----------------------------------------------------------------------------------------
# Bad image files
# ----------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB and holds no pixel data at all."""

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


@functools.cache
def bad_corpus() -> dict[str, tuple[bytes, str]]:
    """file name -> (bytes, documented decision): 'skip' (counted as a bad file) or 'rgb' (converted, trained on)."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:40, 0:48]
    photo = Image.fromarray(np.stack([xx * 5, yy * 6, (xx + yy) * 3], -1).astype(np.uint8))  # 48 x 40
    noise = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG", quality=95)
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    frames = [Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 255))]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    return {
        "truncated.jpg": (noise[: len(noise) // 2], "skip"),
        "zero_bytes.jpg": (b"", "skip"),
        "text.png": (b"this is text with an image extension\n" * 8, "skip"),
        "bomb_header.png": (png_header(30_000, 30_000), "skip"),  # 9e8 pixels declared, no data
        "bomb_data.png": (encode(Image.new("1", (10_000, 10_000)), "PNG"), "skip"),  # 1e8 real pixels in 15 KB
        "png_named.jpg": (encode(photo, "PNG"), "rgb"),
        "one_pixel.png": (encode(Image.new("RGB", (1, 1), (200, 30, 60)), "PNG"), "rgb"),
        "cmyk.jpg": (encode(photo.convert("CMYK"), "JPEG"), "rgb"),
        "gray16.png": (encode(Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257), "PNG"), "rgb"),
        "palette_alpha.png": (encode(palette, "PNG", transparency=0), "rgb"),
        "gray.jpg": (encode(photo.convert("L"), "JPEG"), "rgb"),
        "animated.gif": (encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0), "rgb"),
        "exif_rotated.jpg": (encode(photo, "JPEG", exif=exif), "rgb"),
    }


SKIP_REASONS = {
    "truncated.jpg": "truncated",
    "zero_bytes.jpg": "cannot identify|empty",
    "text.png": "cannot identify",
    "bomb_header.png": "DecompressionBomb|exceeds the limit",
    "bomb_data.png": "DecompressionBomb|exceeds the limit",
}


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory, image_folder):
    """The 10 good images, the corpus, and a file without an image extension (never listed, never counted)."""
    root = tmp_path_factory.mktemp("corpus") / "mixed"
    shutil.copytree(image_folder, root)
    for name, (content, _) in bad_corpus().items():
        (root / name).write_bytes(content)
    (root / "notes.txt").write_text("not an image")
    return str(root)


@pytest.mark.parametrize("name", list(bad_corpus()))
def test_each_kind_is_skipped_or_converted_as_documented(mixed_folder, name):
    path = os.path.join(mixed_folder, name)
    if bad_corpus()[name][1] == "skip":
        with pytest.raises(data.BadImageError, match=SKIP_REASONS[name]):
            data.load_image(path)
        return
    img = data.load_image(path)
    assert img.mode == "RGB"
    assert img.size == {"one_pixel.png": (1, 1), "animated.gif": (40, 40), "exif_rotated.jpg": (40, 48)}.get(
        name, (48, 40)
    )
    if name == "animated.gif":
        assert img.getpixel((0, 0)) == (255, 0, 0)  # the first frame
    if name == "palette_alpha.png":
        assert (255, 255, 255) in {colour for _, colour in img.getcolors(256)}  # transparent index over white


def steps_for_one_pass_of_bad_files(folder: str, n_bad: int, seed: int, batch: int, shuffle_block: int) -> int | None:
    """Steps after which the trainer's stream has reported each bad file of its first pass, and nothing more."""
    stream = data.build_train_stream([folder], 32, seed=seed, shuffle_block=shuffle_block)
    reported = 0
    for i, sample in enumerate(stream):
        reported += int(sample["skipped"].sum())
        if reported > n_bad or i > 200:
            return None  # the second pass's first bad file lands in the same batch: try another seed
        if (i + 1) % batch == 0 and reported == n_bad:
            return (i + 1) // batch
    return None


@pytest.mark.e2e
def test_training_goes_on_over_bad_files_and_counts_them(mixed_folder, tmp_path, caplog, run_main, tiny_args):
    bad = sorted(name for name, (_, decision) in bad_corpus().items() if decision == "skip")
    # Stop right after the stream's first pass has reported every bad file once (a bad file is reported
    # with the next good image), so the count must be exactly the number of bad files.
    for seed in range(10):
        steps = steps_for_one_pass_of_bad_files(mixed_folder, len(bad), seed, batch=2, shuffle_block=4)
        if steps:
            break
    assert steps, "no seed stops the stream right after one pass over the bad files"
    caplog.clear()
    run_main(tiny_args(mixed_folder, tmp_path, steps, seed=seed, checkpointing_steps=steps))
    state = json.loads((tmp_path / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    assert state["global_step"] == steps and state["skipped_images"] == {"mixed": len(bad)}
    assert state["skipped_g_steps"] == 0
    skipped = re.findall(r"skipping bad image '([^']+)' of source 'mixed'", caplog.text)
    assert sorted(set(skipped)) == bad  # and never a converted file, nor notes.txt
    AutoencoderKL.from_pretrained(tmp_path)


@pytest.mark.e2e
def test_every_checkpoint_holds_the_skips_so_far(mixed_folder, tmp_path, run_main, tiny_args):
    run_main(tiny_args(mixed_folder, tmp_path, 6, checkpointing_steps=1, logging_steps=100))
    counts = {}  # step -> (trainer state's count, data stream's count)
    for step in range(1, 7):
        ckpt = tmp_path / f"checkpoint-{step}"
        state = json.loads((ckpt / "trainer_state.json").read_text())
        in_stream = sum(torch.load(ckpt / "data_state_0.pt", weights_only=True)["dataset_state"]["skipped"])
        counts[step] = (state["skipped_images"].get("mixed", 0), in_stream)
    assert counts[5][1] > 0, f"no bad file before the last checkpoint between logging steps: {counts}"
    assert all(ours == theirs for ours, theirs in counts.values()), (
        f"(trainer state, data stream) skip counts per checkpoint: {counts}"
    )


# ----------------------------------------------------------------------------------------
# Nothing unsafe is loaded; command lines missing from tests/test_train.py
# ----------------------------------------------------------------------------------------


class CodeOnUnpickle:
    """Unpickling this creates a file: a weights_only load must refuse it before that happens."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def one_step_checkpoint(image_folder, tmp_path_factory, run_main, tiny_args):
    out = tmp_path_factory.mktemp("one_step")
    run_main(tiny_args(image_folder, out, 1, checkpointing_steps=1))
    return out / "checkpoint-1"


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["data_state_0.pt", "random_states_0.pkl", "optimizer.bin"])
def test_resume_refuses_a_pickle_that_runs_code(
    name, one_step_checkpoint, image_folder, tmp_path, capsys, run_main, tiny_args
):
    out = tmp_path / "out"
    shutil.copytree(one_step_checkpoint, out / "checkpoint-1")
    marker = tmp_path / "code_ran"
    torch.save({"state": {}, "payload": CodeOnUnpickle(str(marker))}, out / "checkpoint-1" / name)
    with pytest.raises((pickle.UnpicklingError, SystemExit)) as refused:
        run_main(tiny_args(image_folder, out, 2, checkpointing_steps=1, resume_from_checkpoint="latest"))
    assert not marker.exists()
    assert not (out / "checkpoint-2").exists() and not (out / "config.json").exists()
    if refused.type is SystemExit:  # the trainer's own files; accelerate's raise torch's UnpicklingError
        assert refused.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"train_vae.py: error: refused to resume from {out / 'checkpoint-1'}")
        assert re.search(r"it would load (builtins|io)\.open", err)
    else:
        assert name == "optimizer.bin" and "Weights only load failed" in str(refused.value)


@pytest.mark.e2e
def test_resume_from_a_partial_folder_is_one_line(image_folder, tmp_path, capsys, run_main, tiny_args):
    partial = tmp_path / "checkpoint-3.tmp"
    partial.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        run_main(tiny_args(image_folder, tmp_path, 4, resume_from_checkpoint=str(partial)))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train_vae.py: error:") and "is not a complete checkpoint folder" in err[-1]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("flags", "says"),
    [
        # another model: the weights would not load (a page of size mismatches from torch otherwise)
        ({"model_config": "small"}, "holds another model (block_out_channels [16, 32, 32, 32], this run builds [32,"),
        # the restored optimizer and scheduler states would silently put the old learning rate back
        ({"learning_rate": 5e-4}, "was trained with --learning_rate 0.001 (now 0.0005)"),
        # the data position is one of shuffle blocks of this size
        ({"shuffle_block": 2}, "was trained with --shuffle_block 4 (now 2)"),
        ({"use_ema": True}, "was trained with --use_ema False (now True)"),
    ],
)
def test_resume_refuses_a_flag_the_checkpoint_cannot_follow(
    flags, says, one_step_checkpoint, image_folder, tmp_path, capsys, run_main, tiny_args
):
    out = tmp_path / "out"
    shutil.copytree(one_step_checkpoint, out / "checkpoint-1")
    with pytest.raises(SystemExit) as exit_info:
        run_main(tiny_args(image_folder, out, 2, checkpointing_steps=1, resume_from_checkpoint="latest", **flags))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"train_vae.py: error: {out / 'checkpoint-1'} ") and says in err[-1], err[-1]
    assert not (out / "checkpoint-2").exists() and not (out / "config.json").exists()


@pytest.mark.e2e
def test_resume_names_each_changed_flag_that_takes_effect(
    one_step_checkpoint, image_folder, tmp_path, caplog, run_main, tiny_args
):
    out = tmp_path / "out"
    shutil.copytree(one_step_checkpoint, out / "checkpoint-1")
    assert json.loads((out / "checkpoint-1" / checkpointing.RUN_CONFIG).read_text())["l1_weight"] == 1.0
    # a changed validation interval does not touch the trajectory: not named
    flags = dict(checkpointing_steps=1, resume_from_checkpoint="latest", l1_weight=2.0, validation_steps=7)
    with caplog.at_level("WARNING"):
        run_main(tiny_args(image_folder, out, 2, **flags))
    changed = [r.getMessage().removeprefix("[RANK 0] ") for r in caplog.records if "changed flag" in r.getMessage()]
    assert changed == [
        "resuming with a changed flag, l1_weight: 1.0 -> 2.0",
        "resuming with a changed flag, max_train_steps: 1 -> 2",  # extending a run: allowed, and said
    ]
    assert (out / "checkpoint-2").is_dir()
    assert json.loads((out / "checkpoint-2" / checkpointing.RUN_CONFIG).read_text())["l1_weight"] == 2.0


@pytest.mark.e2e
def test_a_new_run_does_not_mix_with_another_runs_checkpoints(
    one_step_checkpoint, image_folder, tmp_path, capsys, run_main, tiny_args
):
    out = tmp_path / "out"
    shutil.copytree(one_step_checkpoint, out / "checkpoint-1")
    (out / "metrics.jsonl").write_text('{"step": 0, "validation/psnr": 5.0}\n')
    # Without a word, `--resume_from_checkpoint latest` would later pick the other run's checkpoint-9.
    shutil.copytree(one_step_checkpoint, out / "checkpoint-9")
    with pytest.raises(SystemExit) as exit_info:
        run_main(tiny_args(image_folder, out, 2, checkpointing_steps=1))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"train_vae.py: error: {out} holds another run (checkpoint-1, checkpoint-9, metrics.jsonl): continue it "
        "with --resume_from_checkpoint latest, start over with --overwrite_output_dir (removes those), "
        "or choose another --output_dir"
    )
    assert (out / "checkpoint-9").is_dir() and not (out / "checkpoint-2").exists()  # refused before training

    run_main(tiny_args(image_folder, out, 2, checkpointing_steps=1, overwrite_output_dir=True))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert len(list(out.glob("*.deleting"))) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 0 and steps.count(0) == 1 and steps == sorted(steps)  # only the new run's record


def test_checkpoint_limit_below_one_is_refused(tmp_path, capsys, run_main):
    with pytest.raises(SystemExit) as exit_info:
        run_main(["--output_dir", str(tmp_path), "--checkpoints_total_limit", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--checkpoints_total_limit must be at least 1" in err[0]


# ----------------------------------------------------------------------------------------
# kill -9
# ----------------------------------------------------------------------------------------


def test_folders_a_kill_can_leave_behind(tmp_path):
    """The states a kill inside a save's rename or a prune leaves (too brief to hit by timing): `latest` takes
    the newest complete checkpoint, start-up removes only the partial folders, pruning keeps the newest."""

    def folder(name, state=True):
        os.makedirs(tmp_path / name)
        if state:
            (tmp_path / name / "trainer_state.json").write_text(json.dumps({"global_step": 0}))

    folder("checkpoint-2")
    folder("checkpoint-10")  # numeric order, not text order
    folder("checkpoint-1.deleting")  # a prune killed after its rename
    folder("checkpoint-11.tmp")  # every file written, killed before the rename
    folder("checkpoint-12.tmp", state=False)  # killed while writing
    folder("checkpoint-13", state=False)  # no trainer_state.json: never a resume target
    assert checkpointing.resolve(str(tmp_path), "latest") == str(tmp_path / "checkpoint-10")
    checkpointing.clean_partial(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-13", "checkpoint-2"]
    checkpointing.prune(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-13"]


def _script_process(argv: list[str], log_path: str) -> None:
    """Body of a forked training process: `python train_vae.py ARGV`, stdout and stderr into log_path."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    torch.set_num_threads(1)  # two processes, two shared cores
    sys.argv = [SCRIPT, *argv]
    runpy.run_path(SCRIPT, run_name="__main__")


@pytest.fixture
def start_script(fork_server):
    """start_script(argv, log_path) -> a running `train_vae.py` process; any still running at teardown is killed."""
    started = []

    def start(argv, log_path) -> multiprocessing.Process:
        proc = fork_server.Process(target=_script_process, args=(list(argv), str(log_path)), daemon=True)
        proc.start()  # returns once the process exists (after the fork server's imports, the first time)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.is_alive():
            proc.kill()
            proc.join(30)


def log_tail(log_path) -> str:
    return open(log_path, errors="replace").read()[-3000:] if os.path.exists(log_path) else "(no log)"


def partial_folders(out) -> set[str]:
    if not os.path.isdir(out):
        return set()
    return {name for name in os.listdir(out) if name.startswith("checkpoint-") and name.endswith((".tmp", ".deleting"))}


def complete_checkpoints(out) -> dict[int, str]:
    """step -> folder, found independently of training.checkpointing: checkpoint-N holding trainer_state.json."""
    found = {}
    if not os.path.isdir(out):  # a kill during start-up can come before the output folder exists
        return found
    for name in os.listdir(out):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isfile(os.path.join(out, name, "trainer_state.json")):
            found[int(match.group(1))] = os.path.join(out, name)
    return found


def kill_after(proc, out, saves: int, delay: float, log_path, timeout: float = 300.0) -> None:
    """SIGKILL `proc` `delay` s after the `saves`-th checkpoint-N.tmp folder appeared in this run (0: after start)."""

    def still_running():
        if not proc.is_alive():
            pytest.fail(f"the run ended (exit {proc.exitcode}) before it was killed:\n{log_tail(log_path)}")

    deadline = time.monotonic() + timeout
    present = {n for n in partial_folders(out) if n.endswith(".tmp")}  # leftovers of the last kill
    appeared = 0
    while appeared < saves:
        still_running()
        assert time.monotonic() < deadline, f"no checkpoint save began in {timeout} s:\n{log_tail(log_path)}"
        now = {n for n in partial_folders(out) if n.endswith(".tmp")}
        appeared += len(now - present)
        present = now
        time.sleep(0.003)  # a save of the tiny model takes ~0.1-0.3 s
    time.sleep(delay)
    still_running()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL


def resumed_lines(log_path) -> list[tuple[str, int]]:
    text = Path(log_path).read_text(errors="replace") if os.path.exists(log_path) else ""
    return [(path, int(step)) for path, step in re.findall(r"resumed from (\S+) at step (\d+)", text)]


KILL_MAX_STEPS = 16
KILL_LIMIT = 2
# What every complete checkpoint of the tiny run holds (one process, G and D optimizers).
CHECKPOINT_FILES = (
    "trainer_state.json",
    "data_state_0.pt",
    "random_states_0.pkl",
    "optimizer.bin",
    "optimizer_1.bin",
    "scheduler.bin",
    "scheduler_1.bin",
    "discriminator.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)


def check_after_kill(out, resumed_at: int | None) -> int | None:
    """Invariants of the output folder after a SIGKILL; returns the newest complete step."""
    complete = complete_checkpoints(out)
    for step, path in complete.items():
        for name in CHECKPOINT_FILES:
            assert os.path.isfile(os.path.join(path, name)), f"complete checkpoint {path} lacks {name}"
        state = json.loads(Path(path, "trainer_state.json").read_text())
        assert state["global_step"] == step and state["images_seen"] == 2 * step
    # A kill between the rename of a new checkpoint and the pruning leaves one more than the limit.
    assert len(complete) <= KILL_LIMIT + 1, sorted(complete)
    newest = max(complete) if complete else None
    if resumed_at is not None:
        # Pruning never removed the newest complete checkpoint: progress never goes back past it.
        assert newest is not None and newest >= resumed_at, (newest, resumed_at)
    return newest


@pytest.mark.e2e
def test_kill_9_at_random_moments_then_resume_latest(image_folder, tmp_path, start_script, tiny_args, tensors_of):
    """Five SIGKILLs in a row on one output folder (during start-up, as a save begins, inside saves,
    between saves); every restart with `--resume_from_checkpoint latest` continues from the newest
    complete checkpoint, and the last run ends with the weights of a run that was never interrupted."""
    out, ref = tmp_path / "killed", tmp_path / "reference"
    common = dict(checkpointing_steps=1, checkpoints_total_limit=KILL_LIMIT, latent_stats_samples=2)
    argv = tiny_args(image_folder, out, KILL_MAX_STEPS, resume_from_checkpoint="latest", **common)
    # The uninterrupted reference runs beside the kills: one thread per process, two cores.
    reference = start_script(tiny_args(image_folder, ref, KILL_MAX_STEPS, **common), tmp_path / "reference.log")

    rng = random.Random(20240817)
    plan = [  # (saves begun in this run before the kill, then seconds to wait)
        (0, rng.uniform(0.3, 2.0)),  # during start-up: building, cleaning up, resuming
        (3, rng.uniform(0.0, 0.2)),  # inside the third save
        (1, 0.0),  # as a save begins
        (2, rng.uniform(0.25, 1.0)),  # anywhere in the steps and saves after a prune
        (2, rng.uniform(0.0, 0.2)),  # inside a save that follows a prune
    ]
    newest, resumes = None, []
    for i, (saves, delay) in enumerate(plan):
        log = tmp_path / f"run{i}.log"
        kill_after(start_script(argv, log), out, saves, delay, log)
        # `latest` took the newest complete checkpoint, never a partial folder. The resume comes before
        # the first save; only a kill during start-up can land before it.
        lines = resumed_lines(log)
        expected = [(str(out / f"checkpoint-{newest}"), newest)] if newest is not None else []
        assert lines == expected or (saves == 0 and lines == []), (lines, expected, log_tail(log))
        resumes.append(newest or 0)
        newest = check_after_kill(out, newest)
    assert len(resumes) == len(plan) >= 5 and resumes == sorted(resumes) and newest

    log = tmp_path / "final.log"
    final = start_script(argv, log)
    final.join(600)
    assert final.exitcode == 0, log_tail(log)
    assert resumed_lines(log) == [(str(out / f"checkpoint-{newest}"), newest)]
    assert sorted(complete_checkpoints(out)) == [KILL_MAX_STEPS - 1, KILL_MAX_STEPS] and partial_folders(out) == set()
    state = json.loads((out / f"checkpoint-{KILL_MAX_STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == KILL_MAX_STEPS and state["images_seen"] == 2 * KILL_MAX_STEPS
    vae = AutoencoderKL.from_pretrained(out)
    with torch.no_grad():
        assert vae(torch.zeros(1, 3, 32, 32)).sample.shape == (1, 3, 32, 32)

    reference.join(600)
    assert reference.exitcode == 0, log_tail(tmp_path / "reference.log")
    killed, uninterrupted = (
        tensors_of(out / f"checkpoint-{KILL_MAX_STEPS}"),
        tensors_of(ref / f"checkpoint-{KILL_MAX_STEPS}"),
    )
    assert killed.keys() == uninterrupted.keys()
    for key in killed:
        assert torch.equal(killed[key], uninterrupted[key]), key
