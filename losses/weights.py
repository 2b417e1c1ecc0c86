"""Where the frozen nets' weights come from: torch hub's cache, else a download that an offline machine
refuses in one line instead of hanging."""

from __future__ import annotations

import os
import socket
import urllib.parse

import torch

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
