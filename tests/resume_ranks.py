"""A train_vae.py run that records, per rank, what tests/test_train.py's resume tests check. Not a test module.

`python tests/resume_ranks.py RECORD_DIR -- <train_vae.py flags>` (or under `accelerate launch`) builds the Trainer as
train_vae.main does, resumes, writes a checkpoint at once when it resumed (its tensors must equal the checkpoint's),
trains to --max_train_steps and writes RECORD_DIR/rank<R>.json: the RNG seed and a digest of the torch RNG state right
after the resume, the keys of the images this rank trained on in order, and digests of its weights (replicas agree).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from accelerate.utils import set_seed

import train_vae
from common.cli import parse_config
from training.config import TrainConfig


class RecordingLoader:
    """The trainer's data loader, noting the key of every image it hands out."""

    def __init__(self, loader, keys: list[str]):
        self.loader, self.keys = loader, keys

    def __iter__(self):
        for batch in self.loader:
            self.keys.extend(batch["key"])
            yield batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


def weights_digest(module: torch.nn.Module) -> str:
    """A digest of every parameter's bytes (buffers left out: each rank keeps its own BatchNorm statistics)."""
    digest = hashlib.sha256()
    for name, tensor in module.named_parameters():
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run(record_dir: str, argv: list[str]) -> dict:
    cfg, _ = parse_config(TrainConfig, argv, "train_vae.py")
    accelerator = train_vae.build_accelerator(cfg)
    set_seed(cfg.seed)  # as train_vae.main: every rank builds its networks from the same random state
    trainer = train_vae.Trainer(cfg, accelerator)
    trainer.attach_data(train_vae.resolve_data(cfg))
    trainer.maybe_resume()
    record = {"rank": accelerator.process_index, "initial_seed": torch.initial_seed(), "keys": []}
    record["rng_state"] = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
    if cfg.resume_from_checkpoint:
        record["saved_at_resume"] = trainer.save_checkpoint()
    trainer.dataloader = RecordingLoader(trainer.dataloader, record["keys"])
    trainer.fit()
    record["weights"] = {
        "vae": weights_digest(trainer.vae),
        "discriminator": weights_digest(trainer.loss_fn.discriminator),
    }
    with open(os.path.join(record_dir, f"rank{accelerator.process_index}.json"), "w") as f:
        json.dump(record, f)
    return record


if __name__ == "__main__":
    logging.basicConfig(format="%(relativeCreated)d ms %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run(sys.argv[1], sys.argv[sys.argv.index("--") + 1 :])
