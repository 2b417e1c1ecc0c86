"""The tiny training setup several test modules build a Trainer from (not a test module: nothing to collect)."""

from __future__ import annotations

import torch

from training.config import TrainConfig


def tiny_config(tmp_path, **extra) -> TrainConfig:
    """A TrainConfig for seconds-long CPU steps: tiny preset, 32², batch 2, random perception nets, no ID term,
    the GAN on from step 0; `extra` overrides any field."""
    kw = dict(
        source=[str(tmp_path)],
        model_config="tiny",
        resolution=32,
        train_batch_size=2,
        disc_start=0,
        perception_weights="random",
        id_weight=0.0,
        report_to="none",
        output_dir=str(tmp_path / "out"),
        learning_rate=1e-3,
    )
    kw.update(extra)
    cfg = TrainConfig(**kw)
    cfg.check()
    return cfg


def batch(seed: int = 0) -> torch.Tensor:
    """(2, 3, 32, 32) in [-1, 1], from its own generator."""
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
