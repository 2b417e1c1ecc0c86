"""Where the frozen nets' weights come from: torch hub's cache, else a download that an offline machine
refuses in one line instead of hanging; and a fingerprint of what was loaded, which the ranks of a
job compare (each node reads its own cache)."""

from __future__ import annotations

import hashlib
import os
import socket
import urllib.parse
from collections.abc import Callable
from typing import TypeVar

import torch
from accelerate.utils import gather_object

from common.errors import PerceptionWeightsError
from common.helpers import hub_offline


def hub_checkpoint_path(url: str) -> str:
    """Where torch.hub (and torchvision) cache the file of `url`."""
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _offline_reason(url: str, timeout: float = 3.0) -> str | None:
    """Why `url` cannot be downloaded now (HF_HUB_OFFLINE set, host unreachable), or None."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        # A short TCP probe: a firewalled machine would otherwise hang in the download.
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{parsed.hostname} is unreachable ({err.__class__.__name__})"


def fetch_checkpoint(url: str, hint: str) -> str:
    """Local path of `url`'s file: the torch hub cache if present, else a download; `hint` ends the error."""
    path = hub_checkpoint_path(url)
    if os.path.isfile(path):
        return path
    reason = _offline_reason(url)
    if reason is not None:
        raise PerceptionWeightsError(
            f"{os.path.basename(path)} is not in {os.path.dirname(path)} and cannot be downloaded ({reason}): {hint}"
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # torchvision-style names carry a sha256 prefix ("vgg16-397923af.pth"); check it like torch.hub does.
    match = torch.hub.HASH_REGEX.search(os.path.basename(path))
    torch.hub.download_url_to_file(url, path, hash_prefix=match.group(1) if match else None, progress=False)
    return path


def weights_digest(module: torch.nn.Module) -> str:
    """The first 16 hex digits of a sha256 over a module's state dict (names, dtypes, shapes, bytes): two
    modules share a digest only when they hold the same weights, bit for bit."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def weights_fingerprint(nets: dict[str, torch.nn.Module | None], kind: str) -> dict[str, str]:
    """{network name: '<kind> <digest>'} of the frozen networks that exist (None: the term is off)."""
    return {name: f"{kind} {weights_digest(net)}" for name, net in nets.items() if net is not None}


def _rank_list(ranks: list[int]) -> str:
    """'0-3, 6': ranks as runs of consecutive numbers."""
    runs: list[list[int]] = []
    for rank in ranks:
        if runs and rank == runs[-1][1] + 1:
            runs[-1][1] = rank
        else:
            runs.append([rank, rank])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def check_same_weights(gathered: list[dict[str, str] | str]) -> None:
    """Stop (one line, the same on every rank) unless every rank loaded the same perception weights.

    `gathered[rank]` is that rank's `weights_fingerprint`, or the one-line error it hit loading them. Ranks
    whose networks differ would train on different losses while rank 0's model card names its own weights.
    """
    failed = {rank: item for rank, item in enumerate(gathered) if isinstance(item, str)}
    if failed:
        first = min(failed)
        raise PerceptionWeightsError(
            f"rank(s) {_rank_list(sorted(failed))} could not load the perception weights (rank {first}: "
            f"{failed[first]})"
        )
    groups: dict[tuple, list[int]] = {}
    for rank, fingerprint in enumerate(gathered):
        groups.setdefault(tuple(sorted(fingerprint.items())), []).append(rank)
    if len(groups) == 1:
        return
    described = "; ".join(
        f"rank(s) {_rank_list(ranks)}: " + (", ".join(f"{name} {what}" for name, what in key) or "none")
        for key, ranks in groups.items()
    )
    raise PerceptionWeightsError(
        f"the ranks loaded different perception weights ({described}): each node reads its own torch hub / "
        "Hugging Face cache, so give every node the same files (a shared TORCH_HOME and HF_HOME, or identical copies)"
    )


Built = TypeVar("Built")


def build_on_every_node(
    accelerator, build: Callable[[], Built], fingerprint: Callable[[Built], dict[str, str]]
) -> Built:
    """`build()` on each node's local main process first (it fills that node's torch hub / HF cache, a download
    at most once per node), then on the node's other ranks. With several processes the ranks then compare what
    they loaded (`fingerprint` of what was built, or the one-line error `build` raised) and all stop in one line
    (`check_same_weights`) when a rank failed or holds other weights, instead of a rank exiting alone while the
    others wait in their next collective, or computing its share with other networks."""
    built, failure = None, None
    with accelerator.local_main_process_first():
        try:
            built = build()
        except PerceptionWeightsError as e:
            failure = e
    if accelerator.num_processes > 1:
        check_same_weights(gather_object([str(failure) if failure is not None else fingerprint(built)]))
    if failure is not None:
        raise failure
    return built
