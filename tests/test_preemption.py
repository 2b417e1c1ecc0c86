"""Preemption: SIGTERM (SLURM, Kubernetes, spot instances) and SIGUSR1 (SLURM's --signal=USR1@N before a
time limit) make the trainer finish the step in flight on every rank, write a checkpoint and exit with
status 75; resuming from that checkpoint gives the same weights as a run that was never stopped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import psutil
import pytest
import torch

import train_vae

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_same_checkpoint(a, b, tensors_of):
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys() and len(ta) > 100
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=0, msg=key)


def test_sigusr1_checkpoints_the_current_step_and_resume_is_exact(
    image_folder, tmp_path, monkeypatch, caplog, tiny_args, run_main, tensors_of
):
    from losses import TransfusionLoss

    run_main(tiny_args(image_folder, tmp_path / "whole", 6, checkpointing_steps=100))
    assert (tmp_path / "whole" / "DONE").read_text().startswith("step 6\n")
    assert not (tmp_path / "whole" / "PREEMPTED").exists()

    original = TransfusionLoss.generator_loss

    def signal_at_step_2(self, *args, **kw):
        if args[4] == 2:  # global_step: the signal lands in the middle of step 2
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, *args, **kw)

    monkeypatch.setattr(TransfusionLoss, "generator_loss", signal_at_step_2)
    with pytest.raises(SystemExit) as stopped:
        run_main(tiny_args(image_folder, tmp_path / "stopped", 6, checkpointing_steps=100))
    assert stopped.value.code == train_vae.PREEMPTED_EXIT_CODE == 75
    assert sorted(p.name for p in (tmp_path / "stopped").glob("checkpoint-*")) == ["checkpoint-3"]
    assert not (tmp_path / "stopped" / "config.json").exists()  # stopped, not finished: nothing exported
    assert not (tmp_path / "stopped" / "DONE").exists()
    marker = (tmp_path / "stopped" / "PREEMPTED").read_text()
    assert f"checkpoint {tmp_path / 'stopped' / 'checkpoint-3'}\n" in marker and marker.startswith("step 3\n")
    assert f"stopped by signal {int(signal.SIGUSR1)} at step 3" in caplog.text
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is gone with the run

    monkeypatch.setattr(TransfusionLoss, "generator_loss", original)
    run_main(tiny_args(image_folder, tmp_path / "stopped", 6, checkpointing_steps=100, resume_from_checkpoint="latest"))
    assert_same_checkpoint(tmp_path / "whole" / "checkpoint-6", tmp_path / "stopped" / "checkpoint-6", tensors_of)
    assert (tmp_path / "stopped" / "DONE").is_file() and not (tmp_path / "stopped" / "PREEMPTED").exists()


def test_a_stop_during_a_periodic_save_takes_that_checkpoint_and_the_marker_follows(
    image_folder, tmp_path, monkeypatch, run_main, tiny_args
):
    """SIGUSR1 arrives while step 4's periodic checkpoint is being written: PREEMPTED appears at once naming the last
    complete checkpoint (step 2), is rewritten to name step 4 once that is complete, and the run stops there: no
    second save of step 5, and no Hub export of the checkpoint a preemption stops at (step 2's is exported)."""
    from training import checkpointing

    out = tmp_path / "out"
    pushed, seen_during_save = [], []

    class Pusher:
        def __init__(self, repo_id):
            pass

        def push(self, folder, message, cleanup=False):
            pushed.append(message)

    monkeypatch.setattr(train_vae.hub, "prepare_repo", lambda *a, **kw: "someone/vae")
    monkeypatch.setattr(train_vae.hub, "BackgroundPusher", Pusher)
    original = checkpointing.save

    def save(accelerator, output_dir, step, *args, **kw):
        if step == 4:
            os.kill(os.getpid(), signal.SIGUSR1)
            deadline = time.time() + 10  # written by a thread of its own: no Python bytecode needed here
            while not (out / "PREEMPTED").exists() and time.time() < deadline:
                time.sleep(0.01)
            seen_during_save.append((out / "PREEMPTED").read_text())
        return original(accelerator, output_dir, step, *args, **kw)

    monkeypatch.setattr(checkpointing, "save", save)
    argv = tiny_args(image_folder, out, 8, checkpointing_steps=2, push_to_hub=True, hub_model_id="someone/vae")
    with pytest.raises(SystemExit) as stopped:
        run_main([*argv, "--hub_strategy", "every_save"])
    assert stopped.value.code == 75
    assert seen_during_save == [
        f"step 2\nsignal {int(signal.SIGUSR1)}\ncheckpoint {out / 'checkpoint-2'}\n"
        "resume with --resume_from_checkpoint latest\n"
    ]
    assert (
        (out / "PREEMPTED")
        .read_text()
        .startswith(f"step 4\nsignal {int(signal.SIGUSR1)}\ncheckpoint {out / 'checkpoint-4'}\n")
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert pushed == ["Step 2: exported model"]
    assert not (out / "DONE").exists()


def test_sigterm_on_a_two_rank_run_then_resume_equals_uninterrupted(
    image_folder, tmp_path, tiny_args, tensors_of, two_rank_launch, repo_root
):
    """SLURM sends SIGTERM to every task of the job step: here to both ranks of a real 2-process DDP run."""

    def launch(argv, log, port=None):
        cmd, env = two_rank_launch(argv, port)
        return subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)

    steps = 40
    argv = lambda out, **kw: tiny_args(image_folder, out, steps, checkpointing_steps=2, **kw)  # noqa: E731
    # Open for the whole test: the launched runs write into them.
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("whole", "stopped", "resumed")}  # noqa: SIM115

    stopped = launch(argv(tmp_path / "stopped"), logs["stopped"])
    deadline = time.time() + 300
    while not (tmp_path / "stopped" / "checkpoint-2").is_dir():
        assert stopped.poll() is None and time.time() < deadline, (tmp_path / "stopped.log").read_text()[-3000:]
        time.sleep(0.05)
    workers = [
        p for p in psutil.Process(stopped.pid).children(recursive=True) if "train_vae.py" in " ".join(p.cmdline())
    ]
    assert len(workers) == 2
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    stopped.wait(timeout=300)
    log = (tmp_path / "stopped.log").read_text()
    assert "stopped by signal 15 at step" in log, log[-3000:]
    assert re.search(r"exitcode\s*:\s*75 ", log), log[-3000:]  # torchrun's report of each rank's exit status
    checkpoints = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "stopped").glob("checkpoint-*"))
    last = checkpoints[-1]
    assert 2 <= last < steps, checkpoints
    assert not list((tmp_path / "stopped").glob("checkpoint-*.tmp")), "a half-written checkpoint was left"

    # The uninterrupted run and the resumed one run side by side: the same 2 cores, less wall time.
    whole = launch(argv(tmp_path / "whole"), logs["whole"])
    resumed = launch(argv(tmp_path / "stopped", resume_from_checkpoint="latest"), logs["resumed"])
    assert whole.wait(timeout=600) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert (
        f"resumed from {tmp_path / 'stopped' / f'checkpoint-{last}'} at step {last}"
        in (tmp_path / "resumed.log").read_text()
    )
    assert_same_checkpoint(
        tmp_path / "whole" / f"checkpoint-{steps}", tmp_path / "stopped" / f"checkpoint-{steps}", tensors_of
    )
    for f in logs.values():
        f.close()


# ----------------------------------------------------------------------------------------
# Every path a preemption signal takes on a cluster, with DataLoader workers
# ----------------------------------------------------------------------------------------

STEPS = 24


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie waiting for a reaper that is not us counts as gone)."""
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_gone(launcher: subprocess.Popen, tree: list[psutil.Process], log, launcher_s: float, grace_s: float) -> str:
    """Wait up to launcher_s for the signalled launcher, then up to grace_s more for every process of its tree
    (ranks, data workers); assert none is left running and return the run's log (the Path `log`)."""
    launcher.wait(timeout=launcher_s)
    deadline = time.time() + grace_s
    while _alive(tree) and time.time() < deadline:
        time.sleep(0.2)
    text = log.read_text()
    assert not _alive(tree), f"left running: {[p.pid for p in _alive(tree)]}\n{text[-3000:]}"
    return text


def _worker_args(tiny_args, image_folder, out, **kw):
    """Two data workers per rank, checkpoints only when stopped or at the end, a log line every step."""
    return tiny_args(
        image_folder, out, STEPS, **(dict(dataloader_num_workers=2, checkpointing_steps=1000, shuffle_block=2) | kw)
    )


@pytest.fixture(scope="module")
def uninterrupted_two_rank_run(image_folder, tmp_path_factory, tiny_args, two_rank_launch, repo_root):
    out = tmp_path_factory.mktemp("whole") / "out"
    cmd, env = two_rank_launch(_worker_args(tiny_args, image_folder, out))
    done = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _logged_steps(out) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.parametrize("path", ["every_process", "launcher_sigterm", "launcher_sigusr1"])
def test_preemption_by_every_signal_path_with_data_workers(
    path, image_folder, tmp_path, tiny_args, two_rank_launch, repo_root, tensors_of, uninterrupted_two_rank_run
):
    """SLURM signals every process of the job step (workers included); Kubernetes signals the launcher (PID 1);
    `--signal=B:USR1` reaches the launcher, which does not forward SIGUSR1 and dies of it. Each ends in a
    checkpoint of the step in flight, the PREEMPTED marker and no process left; the resumed run equals an
    uninterrupted one bit for bit."""
    out = tmp_path / "out"
    cmd, env = two_rank_launch(_worker_args(tiny_args, image_folder, out))
    with open(tmp_path / "stopped.log", "w") as log:
        launcher = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while _logged_steps(out) < 3:  # training is under way on both ranks
            assert launcher.poll() is None and time.time() < deadline, (tmp_path / "stopped.log").read_text()[-3000:]
            time.sleep(0.05)
        tree = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
        ranks = [p for p in tree[1:] if "train_vae.py" in " ".join(p.cmdline())]
        assert len(ranks) >= 2 + 2 * 2, f"expected 2 ranks with 2 data workers each, found {len(ranks)}"
        if path == "every_process":
            for p in tree:
                p.send_signal(signal.SIGTERM)
        else:
            launcher.send_signal(signal.SIGTERM if path == "launcher_sigterm" else signal.SIGUSR1)
        text = _wait_gone(launcher, tree, tmp_path / "stopped.log", launcher_s=300, grace_s=120)
    assert "is killed by signal" not in text, text[-3000:]
    marker = (out / "PREEMPTED").read_text()
    step = int(re.search(r"^step (\d+)$", marker, flags=re.M).group(1))
    assert 3 <= step < STEPS, marker
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{step}"], text[-3000:]

    cmd, env = two_rank_launch(_worker_args(tiny_args, image_folder, out, resume_from_checkpoint="latest"))
    resumed = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert not (out / "PREEMPTED").exists()  # the requeued run took over: nothing left to requeue
    assert_same_checkpoint(uninterrupted_two_rank_run / f"checkpoint-{STEPS}", out / f"checkpoint-{STEPS}", tensors_of)


def test_a_save_slower_than_the_launchers_window_still_leaves_a_checkpoint_to_resume(
    image_folder, tmp_path, tiny_args, two_rank_launch, repo_root, tensors_of, uninterrupted_two_rank_run
):
    """torchrun SIGKILLs its ranks TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds after it forwards SIGTERM: here 2, against
    saves slowed by 4 s (slow storage). The ranks die inside the preemption's save, yet PREEMPTED, written as the
    signal arrived, names the last complete checkpoint, and the requeued run resumes from it exactly."""
    from training.checkpointing import TEST_SAVE_DELAY

    out = tmp_path / "out"
    argv = _worker_args(tiny_args, image_folder, out, checkpointing_steps=4)
    cmd, env = two_rank_launch(argv)
    env.update({"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "2", TEST_SAVE_DELAY: "4"})
    with open(tmp_path / "stopped.log", "w") as log:
        launcher = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline, logged = time.time() + 300, None
        while logged is None or _logged_steps(out) <= logged:  # a step logged after checkpoint-4 was complete
            assert launcher.poll() is None and time.time() < deadline, (tmp_path / "stopped.log").read_text()[-3000:]
            if logged is None and (out / "checkpoint-4" / "trainer_state.json").is_file():
                logged = _logged_steps(out)
            time.sleep(0.05)
        tree = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
        launcher.send_signal(signal.SIGTERM)
        text = _wait_gone(launcher, tree, tmp_path / "stopped.log", launcher_s=120, grace_s=60)
    assert "forcefully exiting" in text, text[-3000:]  # torchrun's SIGKILL after its 2 s window
    assert list(out.glob("checkpoint-*.tmp")), "the preemption's save did not begin"
    complete = sorted(p.name for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file())
    assert complete == ["checkpoint-4"], complete
    marker = (out / "PREEMPTED").read_text()
    assert marker.startswith(f"step 4\nsignal {int(signal.SIGTERM)}\ncheckpoint {out / 'checkpoint-4'}\n"), marker

    cmd, env = two_rank_launch(
        _worker_args(tiny_args, image_folder, out, checkpointing_steps=4, resume_from_checkpoint="latest")
    )
    resumed = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in resumed.stdout + resumed.stderr
    assert (out / "DONE").is_file() and not (out / "PREEMPTED").exists()
    assert_same_checkpoint(uninterrupted_two_rank_run / f"checkpoint-{STEPS}", out / f"checkpoint-{STEPS}", tensors_of)


def test_each_rank_draws_its_own_noise(uninterrupted_two_rank_run):
    """Posterior samples differ across ranks: their RNG states, saved per rank, differ (they would be equal if
    every rank drew the same noise)."""
    from accelerate.utils import load

    checkpoint = uninterrupted_two_rank_run / f"checkpoint-{STEPS}"
    states = [load(checkpoint / f"random_states_{rank}.pkl") for rank in (0, 1)]
    assert not torch.equal(states[0]["torch_manual_seed"], states[1]["torch_manual_seed"])
