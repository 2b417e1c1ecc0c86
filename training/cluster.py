"""Running as many processes on many machines: preemption signals, the shared output folder, per-rank seeds.

Preemption reaches a run along several paths, and each must end in a checkpoint of the step in flight:
- SLURM signals every process of the job step (the launcher, each rank, each DataLoader worker) with
  SIGTERM, or SIGUSR1 N seconds before the time limit with `--signal=USR1@N`;
- Kubernetes signals the container's PID 1, `accelerate launch`, which (as torchrun) forwards SIGTERM,
  SIGINT, SIGHUP and SIGQUIT to its ranks and kills them TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (30 by
  default) later; any other signal (SIGUSR1) kills the launcher alone and leaves the ranks running as orphans;
- SLURM's `--signal=B:USR1@N` signals the batch shell, which may pass it on to the launcher.
So: the ranks handle SIGTERM and SIGUSR1 (`StopSignals`); DataLoader workers ignore them
(`ignore_stop_signals`), or the first fetch after the signal would raise "DataLoader worker is killed by
signal"; a rank whose launcher is gone stops as if signalled. A rank can be killed at any instant after the
signal (torchrun kills its ranks TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds after forwarding it), so the rank
writes `--output_dir/PREEMPTED`, naming the newest complete checkpoint, the moment the signal arrives; it is
rewritten to name the checkpoint of the stop once that is complete. The ranks agree on the stop through
`StopVote`, an all-reduce on the training's own process group read at the host sync the step already makes.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import signal
import threading
import uuid

import torch
import torch.distributed as dist
from accelerate.utils import broadcast_object_list, gather_object, set_seed

from common.errors import UserError
from training.checkpointing import list_checkpoints

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
LAUNCHER_GONE = int(signal.SIGHUP)  # what a rank reports when its launcher exited: the hang-up of its parent
PREEMPTED_MARKER = "PREEMPTED"  # in --output_dir from the moment a stop signal arrives: requeue the job
DONE_MARKER = "DONE"  # in --output_dir once training has finished and the model is exported
OUTPUT_TOKEN = ".run_token"  # written by rank 0, read by every rank: do all ranks see one --output_dir?


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the stop signals are for the rank, which stops its workers itself."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopSignals:
    """Remembers SIGTERM / SIGUSR1, and notices when the launcher that started this rank has exited.

    The handler only sets a flag: the loop finishes the step in flight, every rank agrees to stop, a
    checkpoint is written and the process exits with the preempted status. Given `output_dir`, the
    `PREEMPTED` marker is written as the signal arrives: by a thread woken through `signal.set_wakeup_fd`,
    so also while the main thread waits in a collective or a kernel (where Python runs no handler), and
    otherwise at the next `poll()`.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        self.received = 0
        self.output_dir = output_dir
        self._previous: dict = {}
        # torchrun sets TORCHELASTIC_RUN_ID in the ranks it starts: their parent is the launcher.
        self._launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        self._lock = threading.Lock()
        self._marked = False
        self._watcher = None  # (read fd, write fd, previous wakeup fd, thread)

    def __enter__(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if self.output_dir is not None:
            read, write = os.pipe()
            os.set_blocking(write, False)  # the C-level handler must never block
            previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            thread = threading.Thread(target=self._watch, args=(read,), name="stop-signal-marker", daemon=True)
            thread.start()
            self._watcher = (read, write, previous, thread)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._watcher is not None:
            read, write, previous, thread = self._watcher
            signal.set_wakeup_fd(previous)
            with contextlib.suppress(OSError):
                os.write(write, b"\0")  # no signal is numbered 0: the watcher's cue to end
            thread.join(timeout=5)
            for fd in (read, write):
                os.close(fd)
            self._watcher = None

    def _handle(self, signum, frame) -> None:
        self.received = signum  # runs in the main thread between bytecodes: no lock, no I/O here

    def _watch(self, fd: int) -> None:
        """Python writes each handled signal's number to the wakeup fd as it arrives, in C."""
        stop_numbers = {int(sig) for sig in STOP_SIGNALS}
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            for signum in data:
                if signum in stop_numbers:
                    self._mark(signum)
            if not data or 0 in data:
                return

    def _mark(self, signum: int) -> None:
        with self._lock:
            if self._marked or self.output_dir is None:
                return
            self._marked = True
        try:
            write_preempted_marker(self.output_dir, signum)
        except OSError as e:
            logger.warning("could not write %s: %s", os.path.join(self.output_dir, PREEMPTED_MARKER), e)

    def poll(self) -> int:
        """The signal received (LAUNCHER_GONE when the launcher exited), 0 when none."""
        if not self.received and self._launcher is not None and os.getppid() != self._launcher:
            self.received = LAUNCHER_GONE
        if self.received:
            self._mark(self.received)  # the launcher's exit, or a signal the watcher has not seen yet
        return self.received


class StopVote:
    """Every rank learns whether any rank wants to stop, at the host sync the step already makes.

    With several processes the flag travels in an all-reduce (max) on the training's own process group
    (NCCL on GPUs: no side group, no other network interface, --ddp_timeout applies), issued after the
    autoencoder's backward pass on every rank; its result is read in the same `.tolist()` that reads
    whether the update is finite. On a GPU the all-reduce is queued like a kernel: no new host sync. With
    one process the flag is read directly.
    """

    def __init__(self, num_processes: int, device: torch.device) -> None:
        self._distributed = num_processes > 1
        self._flag = torch.zeros(1, dtype=torch.int64, device=device) if self._distributed else None
        self.agreed = 0  # the largest signal number any rank reported at the last vote

    def finite_and_vote(self, grad_norm: torch.Tensor, local: int) -> bool:
        """Whether `grad_norm` (identical on every rank) is finite; sets `agreed` in the same host sync."""
        if not self._distributed:
            self.agreed = local
            return bool(torch.isfinite(grad_norm))
        self._flag.fill_(local)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        finite, self.agreed = torch.cat([torch.isfinite(grad_norm).reshape(1).long(), self._flag]).tolist()
        return bool(finite)

    def now(self, local: int) -> int:
        """A vote outside the step (after a save: a stop signalled during it reuses that checkpoint)."""
        if self._distributed:
            self._flag.fill_(local)
            dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
            local = int(self._flag.item())
        self.agreed = local
        return local


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


def _write_atomically(path: str, text: str) -> None:
    """Several ranks (on several nodes) may write a marker at once: each writes its own file, then renames."""
    tmp = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_preempted_marker(output_dir: str, signum: int, checkpoint: str | None = None) -> str:
    """`--output_dir/PREEMPTED`: what a requeue script tests (the launcher's exit status is not the ranks').

    Names `checkpoint`, by default the newest complete one found now: checkpoints are renamed into place
    complete and only ever replaced by newer ones, so a marker written late by a rank never names an older
    checkpoint than one written before it."""
    if checkpoint is None:
        found = list_checkpoints(output_dir)
        checkpoint = found[-1][1] if found else None
    step = int(os.path.basename(checkpoint).split("-")[-1]) if checkpoint else 0
    named = checkpoint or "none (no complete checkpoint yet: the requeued run starts over)"
    path = os.path.join(output_dir, PREEMPTED_MARKER)
    _write_atomically(
        path, f"step {step}\nsignal {signum}\ncheckpoint {named}\nresume with --resume_from_checkpoint latest\n"
    )
    return path


def write_done_marker(output_dir: str, step: int) -> str:
    """`--output_dir/DONE`: training reached its last step and the model is exported in --output_dir."""
    path = os.path.join(output_dir, DONE_MARKER)
    _write_atomically(path, f"step {step}\nmodel {output_dir}\n")
    with contextlib.suppress(FileNotFoundError):  # a stop signalled after the last step: nothing left to requeue
        os.remove(os.path.join(output_dir, PREEMPTED_MARKER))
    return path


def clear_markers(output_dir: str) -> None:
    """At start (rank 0, before any rank handles a signal): this run decides anew whether it is preempted or done."""
    for name in (PREEMPTED_MARKER, DONE_MARKER):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(output_dir, name))
        for tmp in glob.glob(os.path.join(glob.escape(output_dir), f"{name}.*.tmp")):
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
