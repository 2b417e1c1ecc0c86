"""The Hugging Face Hub: fail fast before training, fail soft after it.

    repo_id = prepare_repo(hub_model_id, private)      # before training: token, offline, create, write access
    pusher = BackgroundPusher(repo_id)                 # --hub_strategy every_save: non-blocking uploads
    pusher.push(folder, "step 5000")                   #   at each checkpoint (never fatal)
    pusher.finish(timeout=600)                         #   at the end
    push_folder(repo_id, output_dir)                   # the final upload; on failure a HubError says
                                                       # how to upload the intact folder later

Every failure is a `HubError` with one line (no traceback from inside huggingface_hub), and
nothing here sends a request when HF_HUB_OFFLINE is set. The token comes from HF_TOKEN or
`hf auth login` and is never written anywhere.
"""

from __future__ import annotations

import inspect
import logging
import shlex
import shutil
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from common.errors import HubError
from common.helpers import hub_offline, one_line

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0  # huggingface_hub's HTTP client has no timeout of its own
# What never goes to the Hub: resumable state, logs, the demo's copy of its photographs, the
# per-checkpoint grids, the staging folders of `--hub_strategy every_save`.
HUB_IGNORE = ["checkpoint-*", "checkpoint-*/**", "logs/**", "demo_data/**", "samples/**", "hub_staging/**", "*.tmp"]


def _call(what: str, fn: Callable, timeout: float):
    """fn() on a daemon thread; HubError when it raises or has not answered within `timeout` seconds."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller as one line
            box["error"] = e

    thread = threading.Thread(target=target, name=f"hub-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise HubError(f"{what}: no answer from the Hub within {timeout:g} s (network down or blocked?)")
    if "error" in box:
        raise HubError(f"{what}: {one_line(box['error'])}")
    return box.get("value")


def upload_command(repo_id: str, folder: str, ignore_patterns: Sequence[str] | None = None) -> str:
    """The `hf upload` command line that uploads `folder` as the repo's root, with our exclusions."""
    patterns = HUB_IGNORE if ignore_patterns is None else ignore_patterns
    parts = ["hf", "upload", repo_id, folder, "."] + [f"--exclude={p}" for p in patterns]
    return " ".join(shlex.quote(p) for p in parts)


def _api(api, token: str | None):
    if api is not None:
        return api
    from huggingface_hub import HfApi

    return HfApi(token=token)


def prepare_repo(
    repo_id: str, private: bool = False, token: str | None = None, *, api=None, timeout: float = DEFAULT_TIMEOUT_S
) -> str:
    """Check, before any training, that the run can push to `repo_id`; returns the full repo id.

    HubError (one line) when HF_HUB_OFFLINE is set (no request is sent), when there is no token,
    when the repository cannot be created or found, or when the token cannot write to it.
    """
    if hub_offline():
        raise HubError(f"cannot push to {repo_id!r}: HF_HUB_OFFLINE is set (unset it, or drop --push_to_hub)")
    if token is None:
        from huggingface_hub import get_token

        token = get_token()
    if not token:
        raise HubError(f"cannot push to {repo_id!r}: no Hugging Face token (set HF_TOKEN or run `hf auth login`)")
    api = _api(api, token)
    repo = _call(
        f"cannot create or find Hub repository {repo_id!r}",
        lambda: api.create_repo(repo_id, token=token, private=private, exist_ok=True),
        timeout,
    )
    full_id = getattr(repo, "repo_id", None) or repo_id
    _check_write(api, full_id, token, timeout)
    logger.info("Hub repository %s is ready (write access checked)", full_id)
    return full_id


def _check_write(api, repo_id: str, token: str, timeout: float) -> None:
    what = f"the token cannot write to {repo_id!r}"
    check = getattr(api, "auth_check", None)
    if check is not None and "write" in inspect.signature(check).parameters:
        _call(what, lambda: check(repo_id, token=token, write=True), timeout)
        return
    # An older huggingface_hub without auth_check(write=...): the repo must be in the user's or an org's namespace.
    who = _call("cannot check the token (whoami)", lambda: api.whoami(token=token), timeout) or {}
    namespaces = {who.get("name")} | {org.get("name") for org in who.get("orgs", [])}
    if repo_id.split("/")[0] not in namespaces:
        raise HubError(f"{what}: it belongs to {who.get('name')!r}, not to the namespace {repo_id.split('/')[0]!r}")


def push_folder(
    repo_id: str,
    folder: str,
    *,
    commit_message: str = "Upload Transfusion VAE",
    token: str | None = None,
    api=None,
    ignore_patterns: Sequence[str] | None = None,
    timeout: float | None = None,
) -> str:
    """Upload `folder` (minus HUB_IGNORE) to `repo_id`; returns the commit URL.

    On any failure the folder stays as it is and the HubError (one line) holds the exact
    `hf upload` command to run later. `timeout` (s) bounds the wait (None: as long as it takes).
    """
    patterns = list(HUB_IGNORE if ignore_patterns is None else ignore_patterns)
    later = f"the model is intact in {folder}; upload it later with: {upload_command(repo_id, folder, patterns)}"
    if hub_offline():
        raise HubError(f"not uploaded to {repo_id} (HF_HUB_OFFLINE is set); {later}")
    try:
        api = _api(api, token)
        info = _call(
            f"upload to {repo_id} failed",
            lambda: api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                ignore_patterns=patterns,
                commit_message=commit_message,
                token=token,
            ),
            timeout if timeout is not None else 1e9,
        )
    except HubError as e:
        raise HubError(f"{e}; {later}") from None
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    logger.info("pushed %s to %s", folder, url)
    return url


class BackgroundPusher:
    """Uploads export folders while training goes on (`--hub_strategy every_save`).

    `push(folder, message)` starts `HfApi.upload_folder(..., run_as_future=True)` and returns at
    once. At most one upload is in flight: a push made while one runs is queued, and a newer push
    replaces a queued one (only the newest state is worth uploading); the queued push starts as
    soon as the running one ends. A failed upload logs one warning line and is never fatal; the
    next push uploads the whole folder again, so it carries everything the failed one missed.

    The folder must not change once pushed: export each checkpoint into a fresh folder. With
    `cleanup=True` the pusher deletes the folder when its upload ended or when it was replaced.
    `api` is an HfApi (or a stand-in with the same `upload_folder`); tests pass a stub.
    """

    def __init__(
        self, repo_id: str, *, token: str | None = None, api=None, ignore_patterns: Sequence[str] | None = None
    ):
        self.repo_id = repo_id
        self.token = token
        self.api = api
        self.ignore_patterns = list(HUB_IGNORE if ignore_patterns is None else ignore_patterns)
        self._lock = threading.RLock()  # _done may run inside _start, on the same thread
        self._running: tuple[Future, str, str, bool] | None = None
        self._queued: tuple[str, str, bool] | None = None
        self._idle = threading.Event()
        self._idle.set()
        self.uploaded: list[str] = []  # commit messages of the uploads that succeeded
        self.failures = 0
        self.last_error: str | None = None

    def push(self, folder: str, commit_message: str, cleanup: bool = False) -> None:
        """Upload `folder` in the background (or queue it behind the running upload); never raises."""
        with self._lock:
            self._idle.clear()
            if self._running is not None:
                if self._queued is not None:
                    logger.info("Hub upload %r superseded by %r before it started", self._queued[1], commit_message)
                    self._discard(*self._queued)
                self._queued = (folder, commit_message, cleanup)
                return
            self._start(folder, commit_message, cleanup)

    def _start(self, folder: str, message: str, cleanup: bool) -> None:
        """Called with the lock held."""
        try:
            if hub_offline():
                raise HubError("HF_HUB_OFFLINE is set")
            self.api = _api(self.api, self.token)
            future = self.api.upload_folder(
                repo_id=self.repo_id,
                folder_path=folder,
                commit_message=message,
                ignore_patterns=self.ignore_patterns,
                token=self.token,
                run_as_future=True,
            )
        except Exception as e:  # noqa: BLE001 - a push is never fatal
            future = Future()
            future.set_exception(e)
        self._running = (future, folder, message, cleanup)
        future.add_done_callback(self._done)

    def _done(self, future: Future) -> None:
        with self._lock:
            running = self._running
            if running is None or running[0] is not future:
                return
            _, folder, message, cleanup = running
            error = future.exception()
            if error is None:
                self.uploaded.append(message)
                self.last_error = None
                logger.info("pushed %r to https://huggingface.co/%s", message, self.repo_id)
            else:
                self.failures += 1
                self.last_error = one_line(error)
                logger.warning(
                    "Hub upload %r to %s failed (%s); the next save retries", message, self.repo_id, self.last_error
                )
            self._discard(folder, message, cleanup)
            self._running = None
            if self._queued is not None:
                queued, self._queued = self._queued, None
                self._start(*queued)  # calls _done at once (re-entrantly) when the upload fails to start
            else:
                self._idle.set()

    @staticmethod
    def _discard(folder: str, message: str, cleanup: bool) -> None:
        if cleanup:
            shutil.rmtree(folder, ignore_errors=True)

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    def finish(self, timeout: float | None = None) -> bool:
        """Wait for the running and queued uploads; True when they all ended (whether or not they succeeded)."""
        done = self._idle.wait(timeout)
        if not done:
            logger.warning("Hub uploads still running after %s s; not waiting longer", timeout)
        return done
