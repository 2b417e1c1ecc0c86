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
    assert f"stopped by signal {int(signal.SIGUSR1)} at step 3" in caplog.text
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is gone with the run

    monkeypatch.setattr(TransfusionLoss, "generator_loss", original)
    run_main(tiny_args(image_folder, tmp_path / "stopped", 6, checkpointing_steps=100, resume_from_checkpoint="latest"))
    assert_same_checkpoint(tmp_path / "whole" / "checkpoint-6", tmp_path / "stopped" / "checkpoint-6", tensors_of)


def test_sigterm_on_a_two_rank_run_then_resume_equals_uninterrupted(
    image_folder, tmp_path, tiny_args, tensors_of, two_rank_launch, repo_root
):
    """SLURM sends SIGTERM to every task of the job step: here to both ranks of a real 2-process DDP run."""

    def launch(argv, log, port=29500):
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
    resumed = launch(argv(tmp_path / "stopped", resume_from_checkpoint="latest"), logs["resumed"], port=29511)
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
