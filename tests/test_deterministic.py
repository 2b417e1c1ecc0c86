"""`--deterministic`: the step runs no op that torch refuses on CUDA, and the replaced resizes give the same values.

torch.use_deterministic_algorithms(True) raises on CUDA in the backward of some ops (its docstring's list). A CPU
cannot raise there, but it runs the same aten ops: a TorchDispatchMode records every op one training step runs
(both optimizer steps, λ's gradients, the caller's backward). Without deterministic mode the ID term (kornia's
resize) and the equivariance term (antialiased bilinear) run such ops; with it, their resizes are matmuls
(losses/separable.py) and no op of the list is left.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import set_seed
from torch.utils._python_dispatch import TorchDispatchMode

import train_vae
from common.helpers import set_torch_backends
from losses.equivariance import equivariant_transform
from losses.identity import moco_resize
from tiny import tiny_config

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


@pytest.fixture
def restore_backends():
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:]


def trainer_and_batch(tmp_path, **flags) -> tuple[train_vae.Trainer, torch.Tensor]:
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    cfg = tiny_config(tmp_path, **flags)
    set_seed(0)
    size = cfg.resolution
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return train_vae.Trainer(cfg, Accelerator(cpu=True)), x


def nondeterministic_ops_of_a_step(trainer, x: torch.Tensor, step: int, deterministic: bool) -> set[str]:
    torch.use_deterministic_algorithms(deterministic)
    try:
        with RecordOps() as recorder:
            logs = trainer.train_step(x, step)
    finally:
        torch.use_deterministic_algorithms(False)
    assert "disc/loss" in logs  # D's update ran too
    return recorder.ops & set(CUDA_NONDETERMINISTIC)


# On top of L1 + LPIPS + GAN + KL: nothing, the ID term (the recipe's), the equivariance term; and the ops of the
# list each runs without deterministic mode. ResNet-50's 1×1 adaptive pool is a mean in aten: none of them.
TERMS = {
    "none": ({}, set()),
    # Above 224², as the recipe's 256²: kornia then blurs (reflect padding) before it shrinks (LPIPS off: quicker).
    "id": (
        {"id_weight": 0.2, "resolution": 232, "lpips_weight": 0.0},
        {"reflection_pad2d_backward", "upsample_bicubic2d_backward"},
    ),
    "equivariance": (
        {"equivariance_weight": 1.0, "equivariance_prob": 1.0, "equivariance_scales": [0.5]},
        {"_upsample_bilinear2d_aa_backward"},
    ),
    # EQ-VAE's scheme: plain bilinear (no antialiasing) on a transform drawn every step.
    "eqvae": (
        {"equivariance_mode": "eqvae", "equivariance_prob": 1.0, "resolution": 96},
        {"upsample_bilinear2d_backward"},
    ),
}


@pytest.mark.parametrize("term", list(TERMS))
def test_deterministic_mode_leaves_no_op_without_a_deterministic_cuda_kernel(tmp_path, term, restore_backends):
    flags, without = TERMS[term]
    trainer, x = trainer_and_batch(tmp_path, **flags)
    assert nondeterministic_ops_of_a_step(trainer, x, 0, deterministic=False) == without
    assert nondeterministic_ops_of_a_step(trainer, x, 1, deterministic=True) == set()


def grads_of(fn, x: torch.Tensor, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    torch.use_deterministic_algorithms(deterministic)
    try:
        y = fn(x)
    finally:
        torch.use_deterministic_algorithms(False)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((y * upstream).sum(), x)
    return y.detach(), grad


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("moco_resize", (2, 3, 256, 256)),  # shrink: Gaussian blur with reflect padding, then bicubic
        ("moco_resize", (1, 3, 200, 232)),  # enlarge one side, shrink the other
        ("equivariance 0.5", (2, 8, 32, 32)),
        ("equivariance 0.75 turned", (2, 3, 64, 48)),
        ("eqvae 0.5 turned", (2, 8, 32, 32)),  # plain bilinear, no antialiasing
    ],
)
def test_the_matmul_resizes_equal_the_originals_in_value_and_gradient(name, shape, restore_backends):
    fn = {
        "moco_resize": moco_resize,
        "equivariance 0.5": lambda t: equivariant_transform(t, 0.5),
        "equivariance 0.75 turned": lambda t: equivariant_transform(t, 0.75, quarter_turns=1),
        "eqvae 0.5 turned": lambda t: equivariant_transform(t, 0.5, quarter_turns=3, antialias=False),
    }[name]
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    (y, g), (y_det, g_det) = grads_of(fn, x, False), grads_of(fn, x, True)
    assert y_det.shape == y.shape
    torch.testing.assert_close(y_det, y, rtol=0, atol=2e-5)
    torch.testing.assert_close(g_det, g, rtol=0, atol=2e-5)
    assert not torch.equal(y_det, torch.zeros_like(y_det))


def test_warn_mode_sets_torchs_warn_only(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, warn_only=False: seen.append(warn_only))
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        set_torch_backends(True, deterministic=True, warn_only=True)
        set_torch_backends(True, deterministic=True)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
    assert seen == [True, False]
