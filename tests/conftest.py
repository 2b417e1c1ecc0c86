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
