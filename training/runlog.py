"""The run's own record in --output_dir: metrics.jsonl, the curves image, the held-out grids, tracker images.

    <output_dir>/metrics.jsonl          one JSON object per logged step: {"step": N, "<key>": value, ...}
    <output_dir>/training_curves.png   redrawn from metrics.jsonl at each validation (training/curves.py)
    <output_dir>/samples/step_N.png    the held-out inputs above their reconstructions, one per validation

Main process only: the trainer calls these where `accelerator.is_main_process`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

from training.curves import plot_training_curves

METRICS_LOG = "metrics.jsonl"
SAMPLES_DIR = "samples"  # held-out reconstruction grids, one per validation
CURVES_PNG = "training_curves.png"


class RunLog:
    """The files above, in one output folder."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.metrics_path = os.path.join(output_dir, METRICS_LOG)
        self.curves_path = os.path.join(output_dir, CURVES_PNG)

    def grid_path(self, step: int) -> str:
        return os.path.join(self.output_dir, SAMPLES_DIR, f"step_{step:07d}.png")

    def append(self, step: int, scalars: Mapping[str, float]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")

    def truncate_after(self, step: int) -> None:
        """After a resume: drop what the interrupted run logged past its checkpoint (it is trained again)."""
        if not os.path.isfile(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.metrics_path, "w") as f:
            f.writelines(kept)

    def plot_curves(self, gan_start: int | None) -> str | None:
        """Redraw training_curves.png from the whole log; None when there is nothing to plot yet."""
        return plot_training_curves(self.metrics_path, self.curves_path, gan_start=gan_start)


def log_images(accelerator, grid: torch.Tensor, step: int) -> None:
    """Send a (3, H, W) uint8 grid to whichever trackers are active."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation/reconstructions", grid, step)
        elif tracker.name == "wandb":
            import wandb  # only when the run reports to wandb

            tracker.log({"validation/reconstructions": wandb.Image(grid.permute(1, 2, 0).numpy())}, step=step)
