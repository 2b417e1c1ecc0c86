"""Helpers every package shares: a foreign exception as one line, the offline check, the frozen-module base."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Mapping

import torch
from huggingface_hub import constants
from torch import nn

_TRUE = {"1", "on", "yes", "true"}


def one_line(exc: BaseException, *, name: bool = True, limit: int = 300) -> str:
    """A foreign exception as one short line: its first non-empty line of text, after its class name and
    the HTTP status when there is one (`name=False`: the text alone, or the class name when it has none)."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    if not name:
        return (text or type(exc).__name__)[:limit]
    status = getattr(getattr(exc, "response", None), "status_code", None)
    head = type(exc).__name__ + (f" {status}" if status else "")
    return f"{head}: {text}"[:limit] if text else head


def text_seed(text: str) -> int:
    """A 63-bit seed (what torch.Generator.manual_seed takes) from the sha256 of `text`: the same text gives the
    same seed on every process and run, whatever else was drawn before."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def stderr_is_terminal() -> bool:
    """Progress bars only on a terminal: in a log file (SLURM, Kubernetes) each update would be another line."""
    return sys.stderr.isatty()


def key_mismatch(expected: Mapping, given: Mapping) -> tuple[list[str], list[str]]:
    """(missing, unexpected): the keys of `expected` that `given` lacks and those `given` has beyond them, sorted
    (state dicts that should load into each other)."""
    return sorted(set(expected) - set(given)), sorted(set(given) - set(expected))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, else as huggingface_hub read it at import."""
    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().lower()
    return env in _TRUE if env else bool(constants.HF_HUB_OFFLINE)


class FrozenModule(nn.Module):
    """Base of the frozen networks (LPIPS, MoCo, Inception): weights never train, the module never leaves eval mode.

    Training loops call `.train()` on whole module trees; overriding it here keeps dropout off
    and BatchNorm on running statistics whatever a parent does.
    """

    def freeze(self) -> FrozenModule:
        """Turn off requires_grad everywhere and switch to eval."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(False)


def set_torch_backends(
    allow_tf32: bool, deterministic: bool = False, cudnn_benchmark: bool = False, warn_only: bool = False
) -> None:
    """TF32, deterministic kernels and cuDNN autotuning, the same way for the trainer and the evaluator.

    warn_only: an op without a deterministic kernel warns instead of raising (torch's warn_only)."""
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    # Every step has the same shapes: cuDNN's autotuner picks the fastest kernels once.
    torch.backends.cudnn.benchmark = cudnn_benchmark and not deterministic
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
