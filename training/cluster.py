"""Running as many processes on many machines: preemption signals, the shared output folder, per-rank seeds.

Preemption reaches a run along several paths, and each must end in a checkpoint of the step in flight:
- SLURM signals every process of the job step (the launcher, each rank, each DataLoader worker) with
  SIGTERM, or SIGUSR1 N seconds before the time limit with `--signal=USR1@N`;
- Kubernetes signals the container's PID 1, `accelerate launch`, which (as torchrun) forwards SIGTERM,
  SIGINT, SIGHUP and SIGQUIT to its ranks and kills them 30 s later; any other signal (SIGUSR1) kills the
  launcher alone and leaves the ranks running as orphans;
- SLURM's `--signal=B:USR1@N` signals the batch shell, which may pass it on to the launcher.
So: the ranks handle SIGTERM and SIGUSR1 (`StopSignals`); DataLoader workers ignore them
(`ignore_stop_signals`), or the first fetch after the signal would raise "DataLoader worker is killed by
signal"; a rank whose launcher is gone stops as if signalled. The ranks agree on the stop through a
CPU-side all-reduce (`StopVote`) that never waits on the GPU.
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid

import torch
import torch.distributed as dist
from accelerate.utils import broadcast_object_list, gather_object, set_seed

from common.errors import UserError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
LAUNCHER_GONE = int(signal.SIGHUP)  # what a rank reports when its launcher exited: the hang-up of its parent
PREEMPTED_MARKER = "PREEMPTED"  # in --output_dir while the newest checkpoint is of a preempted run
OUTPUT_TOKEN = ".run_token"  # written by rank 0, read by every rank: do all ranks see one --output_dir?


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the stop signals are for the rank, which stops its workers itself."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopSignals:
    """Remembers SIGTERM / SIGUSR1, and notices when the launcher that started this rank has exited.

    The handler only sets a flag: the loop finishes the step in flight, every rank agrees to stop, a
    checkpoint is written and the process exits with the preempted status.
    """

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict = {}
        # torchrun sets TORCHELASTIC_RUN_ID in the ranks it starts: their parent is the launcher.
        self._launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None

    def __enter__(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def poll(self) -> int:
        """The signal received (LAUNCHER_GONE when the launcher exited), 0 when none."""
        if not self.received and self._launcher is not None and os.getppid() != self._launcher:
            self.received = LAUNCHER_GONE
        return self.received


class StopVote:
    """Every rank learns whether any rank wants to stop, without a GPU sync in the step.

    With several processes each step starts an asynchronous all-reduce (max) of this rank's flag over a
    gloo group of its own (CPU tensors: it never waits on the GPU queue) and reads the previous step's
    result, so all ranks stop together one step after the first of them saw the signal. With one process
    the flag is read directly.
    """

    def __init__(self, num_processes: int) -> None:
        self._group = None
        if num_processes > 1:
            # Every rank must create the group, in the same order as any other new_group call.
            self._group = dist.new_group(backend="gloo")
        self._pending = None  # (work, tensor) of the all-reduce in flight

    def __call__(self, local: int) -> int:
        if self._group is None:
            return local
        flag = torch.tensor([local], dtype=torch.int64)
        agreed = 0
        if self._pending is not None:
            work, tensor = self._pending
            work.wait()
            agreed = int(tensor[0])
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return agreed


def check_shared_output_dir(accelerator, output_dir: str) -> None:
    """Stop every rank with one line when they do not all see the same --output_dir.

    Only rank 0 writes checkpoints, and every rank reads them back on resume: a node-local folder
    would make the other nodes resume from step 0 while rank 0 resumes from its checkpoint, and the
    job would hang in its first mismatched collective. Rank 0 writes a fresh token into the folder;
    every rank reads it; the verdict is shared, so all ranks fail (or go on) together.
    """
    if accelerator.num_processes == 1:
        return
    token = [uuid.uuid4().hex if accelerator.is_main_process else None]
    if accelerator.is_main_process:
        with open(os.path.join(output_dir, OUTPUT_TOKEN), "w") as f:
            f.write(token[0])
    broadcast_object_list(token)
    accelerator.wait_for_everyone()
    try:
        with open(os.path.join(output_dir, OUTPUT_TOKEN)) as f:
            seen = f.read().strip() == token[0]
    except OSError:
        seen = False
    blind = [rank for rank, ok in enumerate(gather_object([seen])) if not ok]
    if blind:
        raise UserError(
            f"rank(s) {', '.join(map(str, blind))} do not see rank 0's --output_dir {output_dir!r} (a folder local "
            "to each node?): checkpoints are written by rank 0 and read by every rank, so give a folder on a "
            "filesystem all nodes share"
        )


def seed_ranks_apart(accelerator, seed: int) -> None:
    """Give each rank its own random stream for the training noise (posterior samples, crops are seeded apart
    already). Called once the models are built and synchronised, so initialisation stays the same on every
    rank; accelerate saves and restores each rank's RNG state, so a resume stays exact."""
    if accelerator.num_processes > 1:
        set_seed(seed, device_specific=True)


def write_preempted_marker(output_dir: str, step: int, signum: int, checkpoint: str) -> str:
    """`--output_dir/PREEMPTED`: what a requeue script tests (the launcher's exit status is not the ranks')."""
    path = os.path.join(output_dir, PREEMPTED_MARKER)
    with open(path, "w") as f:
        f.write(f"step {step}\nsignal {signum}\ncheckpoint {checkpoint}\nresume with --resume_from_checkpoint latest\n")
    return path


def clear_preempted_marker(output_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(output_dir, PREEMPTED_MARKER))
