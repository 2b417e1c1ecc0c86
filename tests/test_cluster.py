"""What several nodes, a cluster's log files and GPU back-end settings need, checked on CPU.

- every rank must see rank 0's --output_dir (a node-local folder would make the nodes resume from
  different steps and hang): a real 2-rank run whose ranks see different folders stops in one line;
- rank 0 resolves the checkpoint to resume from and every rank takes its answer;
- with stderr in a file there is no carriage-return progress bar, a log line per logging step instead;
- the trainer's and the evaluator's back-end flags (TF32, deterministic kernels, cuDNN autotuning);
- torch.compile applied after accelerate.prepare gives the eager losses.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import set_seed

import train_vae
from common.helpers import set_torch_backends
from tiny import batch, tiny_config
from training.config import TrainConfig


@pytest.mark.e2e
def test_ranks_that_see_different_output_folders_stop_in_one_line(image_folder, tmp_path, tiny_args, two_rank_launch):
    """Each rank runs in a folder of its own with a relative --output_dir: two nodes with node-local disks."""
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
    wrapper = tmp_path / "node_local.py"
    wrapper.write_text(
        textwrap.dedent(
            f"""
            import os, sys
            sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
            os.chdir(os.path.join({str(tmp_path)!r}, "node" + os.environ["LOCAL_RANK"]))
            import train_vae
            train_vae.main(sys.argv[1:])
            """
        )
    )
    cmd, env = two_rank_launch(tiny_args(image_folder, "out", 4))
    cmd[cmd.index("train_vae.py")] = str(wrapper)
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    errors = [line for line in output.splitlines() if "train_vae.py: error:" in line]
    assert len(errors) == 2, output[-3000:]  # one line per rank, the same verdict on both
    assert all("rank(s) 1 do not see rank 0's --output_dir 'out'" in line for line in errors), errors
    # torchrun prints its own ChildFailedError traceback; none of ours may appear
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert not re.search(rf'File "{re.escape(repo)}/(?!\.venv/)', output), output[-3000:]
    assert not list((tmp_path / "node0" / "out").glob("checkpoint-*"))  # stopped before any training


class FakeAccelerator:
    def __init__(self, rank: int):
        self.process_index, self.num_processes, self.is_main_process = rank, 2, rank == 0


def test_every_rank_resumes_from_the_checkpoint_rank_0_found(tmp_path, monkeypatch):
    """Rank 1's own folder holds a newer checkpoint (a stale copy, a node-local disk): it still takes rank 0's."""
    sent = {}

    def broadcast(objects, from_process=0):  # rank 0 sends; rank 1 receives what rank 0 sent
        if "value" in sent:
            objects[0] = sent["value"]
        else:
            sent["value"] = objects[0]
        return objects

    monkeypatch.setattr(train_vae, "broadcast_object_list", broadcast)
    folders = {rank: tmp_path / f"rank{rank}" for rank in (0, 1)}
    for rank, step in ((0, 4), (1, 6)):
        checkpoint = folders[rank] / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text("{}")
    found = [
        train_vae.resolve_resume(
            types.SimpleNamespace(output_dir=str(folders[rank]), resume_from_checkpoint="latest"),
            FakeAccelerator(rank),
        )
        for rank in (0, 1)
    ]
    assert found == [str(folders[0] / "checkpoint-4")] * 2


@pytest.mark.e2e
def test_a_log_file_gets_progress_lines_not_a_progress_bar(image_folder, tmp_path, tiny_args, repo_root):
    argv = tiny_args(image_folder, tmp_path / "out", 3, logging_steps=1)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "train_vae.py", *argv], cwd=repo_root, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\r" not in done.stderr, "a carriage-return progress bar went into the log file"
    for step in (1, 2, 3):
        assert f"step {step}/3: loss " in done.stderr, done.stderr[-3000:]


@pytest.fixture
def restore_backends():
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
    )
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2:4]
    torch.use_deterministic_algorithms(saved[4])


def test_backend_flags(restore_backends):
    set_torch_backends(allow_tf32=True, cudnn_benchmark=True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    set_torch_backends(allow_tf32=False, deterministic=True, cudnn_benchmark=True)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert not torch.backends.cudnn.benchmark, "autotuning picks kernels by timing: not deterministic"
    assert torch.backends.cudnn.deterministic and torch.are_deterministic_algorithms_enabled()


def test_evaluator_uses_the_trainers_tf32_setting(restore_backends, monkeypatch):
    import eval_vae

    seen = []
    monkeypatch.setattr(eval_vae, "set_torch_backends", lambda allow_tf32: seen.append(allow_tf32))
    for flag in ([], ["--no-allow_tf32"]):
        cfg, _ = eval_vae.parse_config(
            eval_vae.EvalConfig, ["--pretrained_model_name_or_path", "x", "--dataset", "y", *flag], "eval_vae.py"
        )
        with pytest.raises(Exception):  # noqa: B017, PT011 - stops at the missing model, after the backends are set
            eval_vae.Evaluator(cfg, types.SimpleNamespace(device=torch.device("cpu"), mixed_precision="no"))
    assert seen == [TrainConfig().allow_tf32, False]


@pytest.mark.e2e
def test_compiled_after_prepare_gives_the_eager_losses(tmp_path, monkeypatch):
    """--torch_compile compiles the prepared (DDP-wrapped, on GPUs) model; aot_eager runs dynamo and AOT autograd
    without a C++ compiler, so the losses must match eager closely."""

    def run(compile_: bool) -> list[dict]:
        for state in (AcceleratorState, GradientState, PartialState):
            state._reset_state()
        cfg = tiny_config(tmp_path, disc_start=1, learning_rate=1e-4, torch_compile=compile_)
        set_seed(0)
        trainer = train_vae.Trainer(cfg, Accelerator(cpu=True))
        if compile_:
            assert hasattr(trainer.model, "_orig_mod"), "the prepared model was not compiled"
        batches = [batch(i) for i in range(3)]
        return [trainer.train_step(x, step) for step, x in enumerate(batches)]

    monkeypatch.setattr(train_vae.torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    eager, compiled = run(False), run(True)
    for e, c in zip(eager, compiled, strict=True):
        for key in ("loss/total", "loss/l1", "loss/kl", "disc/loss"):
            if key in e:
                torch.testing.assert_close(c[key], e[key], rtol=1e-4, atol=1e-6, msg=key)


def test_a_steady_state_step_syncs_with_the_host_only_to_apply_or_skip_each_update(tmp_path, monkeypatch):
    """Each `.item()`, `bool()`, `.tolist()`, ... of a tensor drains a GPU's queue. Outside logging steps a step
    makes two: whether G's and whether D's update is finite (the LR schedules and the EMA must not advance on a
    skipped step, which only the host can decide). The stop vote rides on G's (its multi-process form: the next
    test), the log window and the loss make none."""
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    cfg = tiny_config(tmp_path, lecam_weight=0.1, use_ema=True, learning_rate=1e-4)
    set_seed(0)
    trainer = train_vae.Trainer(cfg, Accelerator(cpu=True))
    x = batch(0)
    trainer.train_step(x, 0)  # the first step builds optimizer states and the scaler's lazy parts
    syncs = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kw):
            syncs.append(_name)
            return _original(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    window = train_vae.LogWindow()
    logs = trainer.train_step(x, 1)
    window.add(logs, 2)
    monkeypatch.undo()
    assert syncs == ["__bool__", "__bool__"], syncs


def test_the_stop_vote_of_several_ranks_is_read_in_the_finiteness_sync(monkeypatch):
    """With several processes the vote is an all-reduce on the training's own process group (no gloo side group),
    read in the one `.tolist()` that also reads whether the update is finite. Checked on a one-rank gloo group
    standing in for the training's (two real ranks: tests/test_preemption.py)."""
    import torch.distributed as dist

    from training.cluster import StopVote

    monkeypatch.setattr(dist, "new_group", lambda *a, **kw: pytest.fail("a side group"))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        vote = StopVote(num_processes=2, device=torch.device("cpu"))
        syncs = []
        original = torch.Tensor.tolist
        monkeypatch.setattr(torch.Tensor, "tolist", lambda t: syncs.append("tolist") or original(t))
        monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: pytest.fail("a second host sync"))
        assert vote.finite_and_vote(torch.tensor(2.5), 0) is True and vote.agreed == 0
        assert vote.finite_and_vote(torch.tensor(float("inf")), 15) is False and vote.agreed == 15
        assert vote.finite_and_vote(torch.tensor(1.0), 0) is True and vote.agreed == 0  # each step votes anew
        assert syncs == ["tolist"] * 3
        monkeypatch.undo()
        assert vote.now(10) == 10 and vote.agreed == 10
    finally:
        dist.destroy_process_group()
