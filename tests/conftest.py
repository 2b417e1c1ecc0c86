"""Every test runs offline: nothing may reach a model or dataset hub."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def smooth_image(rng: np.random.Generator, h: int = 40, w: int = 48) -> Image.Image:
    """Low-frequency colour fields: learnable by a tiny VAE in a few steps, unlike noise."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    channels = [np.sin(rng.uniform(1, 4) * xx + rng.uniform(1, 4) * yy + rng.uniform(0, 6)) for _ in range(3)]
    return Image.fromarray(((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(10):
        smooth_image(rng).save(root / f"{i:03d}.png")
    return str(root)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: OpenMP threads spinning on 2 cores shared with other work made
    these tests 2-4x slower (modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Helpers shared by several test modules. Test modules must not import each other (a module's
# import would also collect its tests' module-level state), so these live here as fixtures.

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_args(folder, out, steps, **extra) -> list[str]:
    """train_vae.py argv for a seconds-long CPU run: tiny preset, 32², random perception nets, no ID term."""
    args = {
        "source": folder,
        "model_config": "tiny",
        "resolution": 32,
        "train_batch_size": 2,
        "max_train_steps": steps,
        "disc_start": 1,
        "perception_weights": "random",
        "id_weight": 0,
        "output_dir": str(out),
        "checkpointing_steps": 2,
        "validation_steps": 100,
        "logging_steps": 1,
        "dataloader_num_workers": 0,
        "report_to": "none",
        "num_validation_images": 2,
        "latent_stats_samples": 4,
        "shuffle_block": 4,
        "learning_rate": 1e-3,
    }
    args.update(extra)
    argv = []
    for key, value in args.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def _run_main(argv: list[str]) -> None:
    """train_vae.main in this process, with accelerate's singletons reset around it."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    import train_vae

    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    try:
        train_vae.main(argv)
    finally:
        for state in (AcceleratorState, GradientState, PartialState):
            state._reset_state()


def _tensors_of(checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor of a training checkpoint folder: VAE, discriminator and both optimizers' state."""
    from safetensors.torch import load_file

    vae_file = os.path.join(checkpoint, "vae", "diffusion_pytorch_model.safetensors")
    out = {f"vae.{k}": v for k, v in load_file(vae_file).items()}
    out.update({f"disc.{k}": v for k, v in load_file(os.path.join(checkpoint, "discriminator.safetensors")).items()})
    for name in ("optimizer.bin", "optimizer_1.bin"):
        state = torch.load(os.path.join(checkpoint, name), weights_only=True)["state"]
        for pid, slots in state.items():
            for slot, value in slots.items():
                out[f"{name}.{pid}.{slot}"] = torch.as_tensor(value)
    return out


@pytest.fixture(scope="session")
def repo_root() -> str:
    """Absolute path of the repository root."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_args():
    """`tiny_args(folder, out, steps, **flags)` -> train_vae.py argv of a tiny CPU run; flags override."""
    return _tiny_args


@pytest.fixture(scope="session")
def run_main():
    """`run_main(argv)`: train_vae.main in this process, accelerate's singletons reset around it."""
    return _run_main


@pytest.fixture(scope="session")
def tensors_of():
    """`tensors_of(checkpoint_dir)` -> {name: tensor} of its VAE, discriminator and optimizer states."""
    return _tensors_of


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it): a fixed rendezvous port can still be held by a
    process of an earlier run that has not finished exiting."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_launch(argv: list[str], port: int | None = None) -> tuple[list[str], dict[str, str]]:
    """(command, environment) of `accelerate launch` running train_vae.py on 2 real DDP ranks on CPU (gloo).

    Runs at the same time need different rendezvous ports; by default each launch gets a free one."""
    import sys

    port = free_port() if port is None else port

    cmd = [
        os.path.join(os.path.dirname(sys.executable), "accelerate"),
        "launch",
        "--config_file",
        os.path.join(REPO_ROOT, "accelerate_configs", "cpu_2proc.yaml"),
        "--main_process_port",
        str(port),
        "train_vae.py",
        *argv,
    ]
    return cmd, dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="session")
def two_rank_launch():
    """`two_rank_launch(argv)` -> (command, env) of a 2-process CPU DDP run of train_vae.py; run it in the repo root."""
    return _two_rank_launch


@pytest.fixture
def terminal(capsys, monkeypatch):
    """eval_vae draws its progress bars (its own, the probe's) as on a terminal (in a log file they are left out);
    returns capsys."""
    import eval_vae
    from evaluation import probing

    monkeypatch.setattr(eval_vae, "stderr_is_terminal", lambda: True)
    monkeypatch.setattr(probing, "stderr_is_terminal", lambda: True)
    return capsys


@pytest.fixture
def accelerator():
    """A CPU Accelerator, with accelerate's process-wide singletons reset before and after the test."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    yield Accelerator(cpu=True)
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
