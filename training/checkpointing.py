"""Atomic, resumable checkpoints on top of `accelerator.save_state`.

A checkpoint is written to `checkpoint-N.tmp/` and renamed to `checkpoint-N/` only when
every rank has finished writing, so a kill at any moment leaves either the previous set of
complete checkpoints or the new one — never a half-written folder that `latest` could pick.
Pruning renames a folder away before deleting it, for the same reason.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import time
import warnings

import torch
from accelerate.utils import load as accelerate_load
from accelerate.utils import set_seed
from diffusers import AutoencoderKL
from diffusers.training_utils import EMAModel
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file, save_file
from torch import nn

from common.errors import CheckpointError, DataError, UserError
from common.helpers import one_line
from data.stream import derive_seed, node_states
from training.config import CHECKED_AS_MODEL, FIXED_ON_RESUME, FREE_ON_RESUME

logger = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
RUN_CONFIG = "train_config.json"  # the flags of the run that wrote the checkpoint
TEST_SAVE_DELAY = "VAE_TRAINER_TEST_SAVE_DELAY_S"  # read by save() alone: seconds each rank waits mid-save

# AutoencoderKL config keys that decide the shapes of the weights.
MODEL_SHAPE_KEYS = (
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
    "norm_num_groups",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
)


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
    """The checkpoint folder `--resume_from_checkpoint` names: `latest` (None when there is none yet), a
    name without a folder such as `checkpoint-500` inside output_dir (as diffusers' scripts look it up),
    or a path as given."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    bare = os.path.dirname(resume.rstrip(os.sep)) == ""
    path = os.path.join(output_dir, resume) if bare else resume
    if not os.path.isfile(os.path.join(path, TRAINER_STATE)):
        where = f" in --output_dir {output_dir!r}" if bare else ""
        raise CheckpointError(f"--resume_from_checkpoint {resume!r}{where} is not a complete checkpoint folder")
    return path


def previous_run(output_dir: str, record: tuple[str, ...]) -> list[str]:
    """What another run left in output_dir that a new run would mix with: its checkpoints and `record` files."""
    found = [os.path.basename(path) for _, path in list_checkpoints(output_dir)]
    return found + [name for name in record if os.path.exists(os.path.join(output_dir, name))]


def start_over(output_dir: str, leftovers: list[str]) -> None:
    """Remove what previous_run found (checkpoints as a prune removes them)."""
    for name in leftovers:
        path = os.path.join(output_dir, name)
        if CHECKPOINT.match(name):
            _remove_checkpoint(path)
        elif os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


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
        _remove_checkpoint(path)


def _remove_checkpoint(path: str) -> None:
    """Rename a checkpoint away, then delete it: a kill in between leaves `checkpoint-N.deleting`, which
    `latest` never picks and `clean_partial` removes, never a half-deleted `checkpoint-N`."""
    doomed = path + ".deleting"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save(
    accelerator, output_dir: str, step: int, extra: dict, data_state: dict, limit: int | None, config: dict
) -> str:
    """Every rank writes its part into checkpoint-N.tmp; the main process then renames it.

    `config`: the run's flags, kept beside the state so that a resume can say which ones changed.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    # Each rank streams different data: its position goes in its own file.
    torch.save(data_state, os.path.join(tmp, f"data_state_{accelerator.process_index}.pt"))
    if os.environ.get(TEST_SAVE_DELAY):  # tests only: storage slower than the launcher's shutdown window
        time.sleep(float(os.environ[TEST_SAVE_DELAY]))
    if accelerator.is_main_process:
        extra = dict(extra, world_size=accelerator.num_processes)
        with open(os.path.join(tmp, RUN_CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
            json.dump(extra, f, indent=2)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(final):  # e.g. a re-run of the same step after a resume
            _remove_checkpoint(final)
        os.rename(tmp, final)
        prune(output_dir, limit)
    accelerator.wait_for_everyone()
    return final


def check_resume(path: str, config: dict, model_config: dict) -> list[str]:
    """Compare a checkpoint with the run about to resume from it, before anything is loaded.

    Raises CheckpointError (one line) for a model of another shape or a changed flag that the
    restored state would override or could not follow (`resume="fixed"` in training/config.py). Returns the other changed
    flags as "name: old -> new": they take effect, and the run is then no longer a continuation of
    either configuration (a changed --max_train_steps also re-times a non-constant LR schedule).
    """
    with open(os.path.join(path, "vae", "config.json")) as f:
        saved_model = json.load(f)
    for key in MODEL_SHAPE_KEYS:
        old, new = _plain(saved_model.get(key)), _plain(model_config.get(key))
        if key in saved_model and old != new:
            raise CheckpointError(
                f"{path} holds another model ({key} {old}, this run builds {new}): "
                "resume with the --model_config / --latent_channels it was trained with"
            )
    run_file = os.path.join(path, RUN_CONFIG)
    if not os.path.isfile(run_file):  # written by a version of this trainer that did not keep its flags
        return []
    with open(run_file) as f:
        saved = json.load(f)
    changed = {
        k: (saved[k], config[k])
        for k in sorted(set(saved) & set(config))
        if k not in FREE_ON_RESUME and k not in CHECKED_AS_MODEL and saved[k] != config[k]
    }
    fixed = [k for k in FIXED_ON_RESUME if k in changed]
    if fixed:
        listed = ", ".join(f"--{k} {changed[k][0]} (now {changed[k][1]})" for k in fixed)
        raise CheckpointError(
            f"{path} was trained with {listed}; a resumed run keeps these (its optimizer, EMA and data "
            "states hold them): pass the same values, or start a new run from its weights with "
            f"--init_from {os.path.join(path, 'vae')}"
        )
    return [f"{k}: {old} -> {new}" for k, (old, new) in changed.items()]


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def load(accelerator, path: str, config: dict, model_config: dict) -> tuple[dict, dict]:
    """Resume from `path`: check its flags against `config` (check_resume; changes that take effect are
    named in a warning), restore what accelerate saved (models through the load hooks, optimizers,
    schedulers, RNG), and return (trainer state, data position: see load_extra). Written by another number
    of processes, everything but the RNG and the data position restores as it is (the caller re-seeds); with
    another number of DataLoader workers per rank, everything but the data position (the caller hands it over)."""
    for change in check_resume(path, config, model_config):
        if accelerator.is_main_process:
            logger.warning("resuming with a changed flag, %s", change)
    try:
        accelerator.load_state(path)
    except pickle.UnpicklingError as e:  # accelerate loads with weights_only: a pickle that would run code
        raise CheckpointError(f"refused to resume from {path}: {load_error(e)}") from None
    except (RuntimeError, KeyError, ValueError) as e:  # e.g. a model config file edited since
        raise CheckpointError(f"cannot resume from {path}: {load_error(e)}") from None
    return load_extra(path, accelerator.process_index, accelerator.num_processes, config["dataloader_num_workers"])


def load_extra(path: str, rank: int, world_size: int, num_workers: int | None = None) -> tuple[dict, dict]:
    """(trainer state, data position) of a checkpoint. The data position is this rank's loader state when
    `world_size` processes wrote it with `num_workers` DataLoader workers each (None: any); else `{"written_by": N,
    "workers": W, "node_states": [...]}`, the stream state of every node (rank x DataLoader worker) of the N
    processes (W workers each), for the new nodes to share out (ImageStream.hand_over)."""
    with open(os.path.join(path, TRAINER_STATE)) as f:
        extra = json.load(f)
    saved_world = extra.pop("world_size", world_size)
    if saved_world == world_size:
        # accelerate's load_state skips an RNG file it cannot read (a damaged file, or a pickle that would
        # run code) with one info line and carries on: the run would go on drawing other random numbers
        # than the one it claims to continue. Read it again here and stop instead.
        rng = _read_pickle(os.path.join(path, f"random_states_{rank}.pkl"), accelerate_load)
        if not isinstance(rng, dict) or "torch_manual_seed" not in rng:
            raise CheckpointError(f"refused to resume from {path}: random_states_{rank}.pkl holds no RNG state")
        own = _read_data_state(path, rank)
        if num_workers is None or _workers(own) in (None, num_workers):
            return extra, own
    nodes = [s for old in range(saved_world) for s in _node_states(path, old, _read_data_state(path, old))]
    return extra, {"written_by": saved_world, "workers": _workers(_read_data_state(path, 0)), "node_states": nodes}


def _workers(loader_state: dict) -> int | None:
    """The DataLoader workers (0: none) that read a rank's data, as its loader state says; None when it holds no
    stream state yet (saved before the first batch): it then loads as it is."""
    if "dataset_state" in loader_state:
        return 0
    try:
        return node_states(loader_state)[0]["node"]["num_workers"]
    except DataError:
        return None


def _node_states(path: str, rank: int, loader_state: dict) -> list[dict]:
    try:
        return node_states(loader_state)
    except DataError as e:
        raise CheckpointError(f"refused to resume from {path}: data_state_{rank}.pt holds {e}") from None


def _read_data_state(path: str, rank: int) -> dict:
    return _read_pickle(os.path.join(path, f"data_state_{rank}.pt"), lambda f: torch.load(f, weights_only=True))


def reseed(seed: int, step: int, rank: int) -> None:
    """Every RNG of this process (Python, NumPy, torch, CUDA) from (seed, step, rank): a resume whose RNG states
    were saved by another number of processes draws apart on every rank, and the same on a rerun."""
    set_seed(derive_seed(seed, step, rank) % 2**32)  # NumPy takes 32-bit seeds


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
    return one_line(e)


# ----------------------------------------------------------------------------------------
# What accelerate's save/load hooks write beside its own state: the autoencoder as a diffusers
# folder (vae/), the discriminator as safetensors, the EMA as a diffusers folder (vae_ema/)
# ----------------------------------------------------------------------------------------

VAE_DIR = "vae"
EMA_DIR = "vae_ema"
DISCRIMINATOR_FILE = "discriminator.safetensors"
VF_PROJECTION_FILE = "vf_projection.safetensors"


def save_model(discriminator: nn.Module | None, folder: str, vae: AutoencoderKL) -> None:
    """One prepared model of a checkpoint: the discriminator's tensors, or (None) the autoencoder's folder."""
    if discriminator is None:
        vae.save_pretrained(os.path.join(folder, VAE_DIR))
    else:
        save_file(discriminator.state_dict(), os.path.join(folder, DISCRIMINATOR_FILE))


def load_model(discriminator: nn.Module | None, folder: str, vae: AutoencoderKL) -> None:
    """The inverse of save_model, in place."""
    if discriminator is None:
        vae.load_state_dict(AutoencoderKL.from_pretrained(folder, subfolder=VAE_DIR).state_dict())
    else:
        discriminator.load_state_dict(load_file(os.path.join(folder, DISCRIMINATOR_FILE)))


def save_vf_projection(projection: nn.Module, folder: str) -> None:
    """The VF loss's trainable latent projection (trained state, not part of the exported autoencoder)."""
    save_file(projection.state_dict(), os.path.join(folder, VF_PROJECTION_FILE))


def load_vf_projection(projection: nn.Module | None, folder: str) -> None:
    """The inverse of save_vf_projection, in place; refuses a checkpoint whose VF setting differs (on vs off),
    before the optimizer state, whose parameter list it changes, is loaded."""
    path = os.path.join(folder, VF_PROJECTION_FILE)
    if projection is None:
        if os.path.isfile(path):
            raise CheckpointError(
                f"{folder} was trained with the VF loss (--vf_weight > 0): resume it with --vf_weight > 0, or "
                f"start a new run from its weights with --init_from {os.path.join(folder, VAE_DIR)}"
            )
        return
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{folder} was trained without the VF loss: resume it with --vf_weight 0, or start a new run from "
            f"its weights with --init_from {os.path.join(folder, VAE_DIR)}"
        )
    state = load_file(path)
    if "bias" in state and getattr(projection, "bias", None) is None:
        raise CheckpointError(
            f"{folder} holds a VF projection with a bias (trained before the projection became bias-free, as "
            f"VA-VAE's): it cannot resume; start a new run from its weights with --init_from {os.path.join(folder, VAE_DIR)}"
        )
    projection.load_state_dict(state)


def save_ema(ema: EMAModel, folder: str) -> None:
    # EMAModel.save_pretrained builds a freshly initialised model to copy the averages into, which
    # draws from the global (CPU) RNG that the posterior noise also comes from: without the fork,
    # the checkpoint interval would change every later step of the run.
    with torch.random.fork_rng(devices=[]):
        ema.save_pretrained(os.path.join(folder, EMA_DIR))


def load_ema(ema: EMAModel, folder: str, device: torch.device) -> None:
    # EMAModel keeps its own settings (decay, step) in the model's config.json, which AutoencoderKL
    # then warns it does not know, and it loads through a call diffusers itself deprecates:
    # both expected here, so not shown.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            loaded = EMAModel.from_pretrained(os.path.join(folder, EMA_DIR), model_cls=AutoencoderKL)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    ema.load_state_dict(loaded.state_dict())
    ema.to(device)


def check_replicas(accelerator, modules: list[nn.Module], step: int) -> None:
    """DDP keeps every rank's weights identical; verify it (one gather per checkpoint) rather than trust it."""
    if accelerator.num_processes == 1:
        return
    params = [p for module in modules for p in module.parameters()]
    checksum = torch.stack([p.detach().double().sum() for p in params]).to(accelerator.device)  # (n_tensors,)
    gathered = accelerator.gather(checksum[None])  # (world, n_tensors)
    if not bool((gathered == gathered[0]).all()):
        raise RuntimeError(f"ranks hold different weights at step {step}: DDP is out of sync")
    if accelerator.is_main_process:
        logger.info("weights identical across %d ranks at step %d", accelerator.num_processes, step)
