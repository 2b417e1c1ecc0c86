"""`--deterministic`: which terms stop it on CUDA, and that the list is the truth about the step's ops.

torch.use_deterministic_algorithms(True) raises on CUDA in the backward of some ops (its docstring's list). A CPU
cannot raise there, but it runs the same aten ops: a TorchDispatchMode records every op one training step runs
(both optimizer steps, λ's gradients, the caller's backward) and the test compares the ops of that list it finds
with the terms `TrainConfig.nondeterministic_terms` names.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import set_seed
from torch.utils._python_dispatch import TorchDispatchMode

import train_vae
from common.errors import ConfigError
from tiny import tiny_config
from training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# The aten ops behind torch.use_deterministic_algorithms' "will throw a RuntimeError" list (torch 2.14) that a
# training step could reach: interpolate linear/bilinear/bicubic/trilinear (with or without antialias),
# reflection padding, the pools named there, grid_sample, NLLLoss, CTCLoss, EmbeddingBag, put_, histc, bincount.
CUDA_NONDETERMINISTIC = (
    "upsample_linear1d_backward",
    "upsample_bilinear2d_backward",
    "upsample_bicubic2d_backward",
    "upsample_trilinear3d_backward",
    "_upsample_bilinear2d_aa_backward",
    "_upsample_bicubic2d_aa_backward",
    "reflection_pad1d_backward",
    "reflection_pad2d_backward",
    "reflection_pad3d_backward",
    "avg_pool3d_backward",
    "_adaptive_avg_pool2d_backward",
    "_adaptive_avg_pool3d_backward",
    "adaptive_max_pool2d_backward",
    "fractional_max_pool2d_backward",
    "fractional_max_pool3d_backward",
    "max_unpool2d",
    "max_unpool3d",
    "grid_sampler_2d_backward",
    "grid_sampler_3d_backward",
    "nll_loss_forward",
    "nll_loss2d_forward",
    "_ctc_loss_backward",
    "_embedding_bag_backward",
    "put_",
    "histc",
    "bincount",
)


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


def nondeterministic_ops_of_a_step(tmp_path, **flags) -> set[str]:
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    cfg = tiny_config(tmp_path, **flags)
    set_seed(0)
    trainer = train_vae.Trainer(cfg, Accelerator(cpu=True))
    size = cfg.resolution
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with RecordOps() as recorder:
        logs = trainer.train_step(x, 0)
    assert "disc/loss" in logs  # D's update ran too
    return recorder.ops & set(CUDA_NONDETERMINISTIC)


# The trainer's default (recipe) terms, one at a time on top of L1 + LPIPS + GAN + KL, and the step without them.
TERMS = {
    "none": ({}, []),
    # Above 224², as the recipe's 256²: kornia then blurs before it shrinks (LPIPS off, to keep it quick).
    "id": ({"id_weight": 0.2, "resolution": 232, "lpips_weight": 0.0}, ["--id_weight"]),
    "equivariance": ({"equivariance_weight": 1.0, "equivariance_prob": 1.0}, ["--equivariance_weight"]),
}


@pytest.mark.parametrize("term", list(TERMS))
def test_the_terms_named_are_those_whose_step_runs_an_op_without_a_deterministic_cuda_kernel(tmp_path, term):
    flags, named = TERMS[term]
    found = nondeterministic_ops_of_a_step(tmp_path, **flags)
    cfg = tiny_config(tmp_path, **flags)
    assert [t.split()[0] for t in cfg.nondeterministic_terms()] == named
    assert bool(found) == bool(named), f"{term}: ops {sorted(found)}, named {named}"
    if term == "id":
        # kornia's Gaussian antialias pads by reflection, then samples bicubic; ResNet-50's 1×1 adaptive pool is a
        # mean in aten (no adaptive-pool kernel), so it is not among them.
        assert found == {"reflection_pad2d_backward", "upsample_bicubic2d_backward"}
    if term == "equivariance":
        assert found == {"_upsample_bilinear2d_aa_backward"}


def test_deterministic_on_is_refused_on_cuda_in_one_line_naming_the_terms():
    recipe = TrainConfig(deterministic="on")  # the default loss: ID on, equivariance off
    with pytest.raises(ConfigError) as err:
        recipe.check_deterministic("cuda")
    message = str(err.value)
    assert "\n" not in message and "--id_weight 0.2" in message and "--equivariance_weight" not in message
    assert "--deterministic warn" in message
    both = TrainConfig(deterministic="on", equivariance_weight=0.5)
    with pytest.raises(ConfigError, match=r"--id_weight 0\.2 .* and of --equivariance_weight 0\.5"):
        both.check_deterministic("cuda")
    # Accepted: on the CPU, in warn mode, off, and on CUDA once those terms are off (or the transform draws no
    # downscale: quarter turns only, or a term that is never drawn).
    recipe.check_deterministic("cpu")
    TrainConfig(deterministic="warn", equivariance_weight=0.5).check_deterministic("cuda")
    TrainConfig().check_deterministic("cuda")
    TrainConfig(deterministic="on", id_weight=0.0).check_deterministic("cuda")
    for eq in ({"equivariance_scales": [1.0]}, {"equivariance_prob": 0.0}):
        TrainConfig(deterministic="on", id_weight=0.0, equivariance_weight=0.5, **eq).check_deterministic("cuda")


def test_the_trainer_refuses_before_building_a_model(tmp_path, monkeypatch, capsys):
    """main() stops in one line, exit 2, after the accelerator and before the loss or the autoencoder is built."""
    built = []
    monkeypatch.setattr(train_vae, "build_loss", lambda cfg: built.append("loss"))
    monkeypatch.setattr(train_vae, "build_vae", lambda *a, **k: built.append("vae"))
    monkeypatch.setattr(train_vae.Accelerator, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(train_vae, "set_torch_backends", lambda *a, **k: built.append("backends"))
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    argv = ["--source", str(tmp_path), "--deterministic", "on", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        train_vae.main([*argv, "--report_to", "none", "--perception_weights", "random"])
    assert exit_info.value.code == 2 and built == []
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_vae.py: error: --deterministic on: on CUDA") and "\n" not in err


def test_warn_mode_sets_torchs_warn_only(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, warn_only=False: seen.append(warn_only))
    from common.helpers import set_torch_backends

    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        set_torch_backends(True, deterministic=True, warn_only=True)
        set_torch_backends(True, deterministic=True)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
    assert seen == [True, False]
