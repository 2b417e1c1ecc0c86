"""Atomic, resumable checkpoints on top of `accelerator.save_state`.

A checkpoint is written to `checkpoint-N.tmp/` and renamed to `checkpoint-N/` only when
every rank has finished writing, so a kill at any moment leaves either the previous set of
complete checkpoints or the new one — never a half-written folder that `latest` could pick.
Pruning renames a folder away before deleting it, for the same reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import torch
from accelerate.utils import load as accelerate_load

from vae.errors import CheckpointError, UserError

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def check_writable(output_dir: str) -> None:
    """Fail with one line now rather than after hours of training."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise UserError(f"output folder {output_dir!r} is not writable ({e.strerror or e})") from None


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints as (step, path), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, TRAINER_STATE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve(output_dir: str, resume: str | None) -> str | None:
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    if not os.path.isfile(os.path.join(resume, TRAINER_STATE)):
        raise CheckpointError(f"--resume_from_checkpoint {resume!r} is not a complete checkpoint folder")
    return resume


def clean_partial(output_dir: str) -> None:
    """Remove folders left by a save or a prune that was interrupted."""
    for name in os.listdir(output_dir):
        if name.startswith("checkpoint-") and name.endswith((".tmp", ".deleting")):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def prune(output_dir: str, limit: int | None) -> None:
    if limit is None:
        return
    found = list_checkpoints(output_dir)
    for _, path in found[: max(len(found) - limit, 0)]:
        doomed = path + ".deleting"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def save(accelerator, output_dir: str, step: int, extra: dict, data_state: dict, limit: int | None) -> str:
    """Every rank writes its part into checkpoint-N.tmp; the main process then renames it."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    # Each rank streams different data: its position goes in its own file.
    torch.save(data_state, os.path.join(tmp, f"data_state_{accelerator.process_index}.pt"))
    if accelerator.is_main_process:
        extra = dict(extra, world_size=accelerator.num_processes)
        with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
            json.dump(extra, f, indent=2)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(final):  # e.g. a re-run of the same step after a resume
            os.rename(final, final + ".deleting")
            shutil.rmtree(final + ".deleting")
        os.rename(tmp, final)
        prune(output_dir, limit)
    accelerator.wait_for_everyone()
    return final


def load_extra(path: str, rank: int, world_size: int) -> tuple[dict, dict]:
    """(trainer state, this rank's data-stream state) of a checkpoint."""
    with open(os.path.join(path, TRAINER_STATE)) as f:
        extra = json.load(f)
    saved_world = extra.pop("world_size", world_size)
    if saved_world != world_size:
        raise CheckpointError(
            f"{path} was written by {saved_world} processes; resume it with the same number "
            f"(got {world_size}) so every rank continues its own data stream"
        )
    # accelerate's load_state skips an RNG file it cannot read (a damaged file, or a pickle that would
    # run code) with one info line and carries on: the run would go on drawing other random numbers
    # than the one it claims to continue. Read it again here and stop instead.
    rng = _read_pickle(os.path.join(path, f"random_states_{rank}.pkl"), accelerate_load)
    if not isinstance(rng, dict) or "torch_manual_seed" not in rng:
        raise CheckpointError(f"refused to resume from {path}: random_states_{rank}.pkl holds no RNG state")
    data_state = _read_pickle(os.path.join(path, f"data_state_{rank}.pt"), lambda f: torch.load(f, weights_only=True))
    return extra, data_state


def _read_pickle(file: str, load):
    """`load` is a weights_only loader: a file that would import or call anything is refused, in one line."""
    try:
        return load(file)
    except Exception as e:  # noqa: BLE001 - refused pickle, damaged zip, missing file: all end the resume
        raise CheckpointError(f"refused to resume from {file}: {load_error(e)}") from None


def load_error(e: Exception) -> str:
    """One line for a failed checkpoint load (torch's weights_only refusal is a page of advice)."""
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    if unsafe:
        return f"it would load {unsafe.group(1)} (weights_only unpickling refuses anything but tensors and plain data)"
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
