"""The training script end to end: exact resume, 2-process DDP, NaN steps, export, the Hub token."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

import train_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def tiny_args(folder, out, steps, **extra):
    args = {
        "source": folder, "model_config": "tiny", "resolution": 32, "train_batch_size": 2,
        "max_train_steps": steps, "disc_start": 1, "perception_weights": "random", "id_weight": 0,
        "output_dir": str(out), "checkpointing_steps": 2, "validation_steps": 100, "logging_steps": 1,
        "dataloader_num_workers": 0, "report_to": "none", "num_validation_images": 2,
        "latent_stats_samples": 4, "shuffle_block": 4, "learning_rate": 1e-3,
    }
    args.update(extra)
    argv = []
    for key, value in args.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def run_main(argv):
    """train_vae.main in this process, with accelerate's singletons reset around it."""
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    try:
        train_vae.main(argv)
    finally:
        for state in (AcceleratorState, GradientState, PartialState):
            state._reset_state()


def tensors_of(checkpoint):
    out = {f"vae.{k}": v for k, v in load_file(os.path.join(checkpoint, "vae", "diffusion_pytorch_model.safetensors")).items()}
    out.update({f"disc.{k}": v for k, v in load_file(os.path.join(checkpoint, "discriminator.safetensors")).items()})
    for name in ("optimizer.bin", "optimizer_1.bin"):
        state = torch.load(os.path.join(checkpoint, name), weights_only=True)["state"]
        for pid, slots in state.items():
            for slot, value in slots.items():
                out[f"{name}.{pid}.{slot}"] = torch.as_tensor(value)
    return out


def test_resume_equals_uninterrupted_run(image_folder, tmp_path):
    """2k steps in one go == k steps, resume, k steps: weights, D, both optimizers, EMA, data position."""
    extra = dict(use_ema=True, ema_decay=0.9)
    run_main(tiny_args(image_folder, tmp_path / "a", 6, **extra))
    run_main(tiny_args(image_folder, tmp_path / "b", 4, **extra))
    run_main(tiny_args(image_folder, tmp_path / "b", 6, resume_from_checkpoint="latest", **extra))
    a, b = tmp_path / "a" / "checkpoint-6", tmp_path / "b" / "checkpoint-6"
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys() and len(ta) > 100
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=0, msg=key)
    ema_a = load_file(os.path.join(a, "vae_ema", "diffusion_pytorch_model.safetensors"))
    ema_b = load_file(os.path.join(b, "vae_ema", "diffusion_pytorch_model.safetensors"))
    for key in ema_a:
        assert torch.equal(ema_a[key], ema_b[key]), key
    assert torch.load(a / "data_state_0.pt", weights_only=True) == torch.load(b / "data_state_0.pt", weights_only=True)
    state_a, state_b = (json.loads((p / "trainer_state.json").read_text()) for p in (a, b))
    for key in ("global_step", "images_seen", "skipped_g_steps", "skipped_d_steps"):
        assert state_a[key] == state_b[key], key
    # The run really trained: the weights moved away from the step-4 checkpoint.
    t4 = tensors_of(tmp_path / "b" / "checkpoint-4")
    assert not torch.equal(t4["vae.decoder.conv_out.weight"], ta["vae.decoder.conv_out.weight"])
    assert not torch.equal(t4["disc.model.0.weight"] if "disc.model.0.weight" in t4 else next(v for k, v in t4.items() if k.startswith("disc.") and v.is_floating_point()),
                           ta["disc.model.0.weight"] if "disc.model.0.weight" in ta else next(v for k, v in ta.items() if k.startswith("disc.") and v.is_floating_point()))
