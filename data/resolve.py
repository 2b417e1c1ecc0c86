"""Resolution: a source spec's kind found, its files listed, and checked to hold something to read.

Done once per job (train_vae.py lists on rank 0 and broadcasts the result; the streams and the
held-out sample take resolved sources as they are): listing an ImageNet folder is an os.walk of 1.28 M
files.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import DataError
from common.helpers import one_line

from .kinds import FILES, HUB, KIND, PARQUET, TABLE, WEBDATASET, kind_of
from .specs import SourceSpec, check_weights, squeezed

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp")  # tried when no column has the Image type
FFHQ_JSON = "ffhq-dataset-v2.json"
FFHQ_IMAGES = "images1024x1024"
FFHQ_NUM_TRAINING = 60000  # fallback without the json: images 00000-59999 are "training"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The Hub's shard names (datasets' push_to_hub, the Hub's conversions): 'train-00000-of-00294.parquet',
# older ones with a fingerprint, 'train-00000-of-00001-5e3f9a0b1c2d3e4f.parquet'.
HUB_SHARD_NAME = re.compile(r"^(?P<split>\w+(?:\.\w+)*)-\d{5}-of-\d{5}(?:-[0-9a-f]+)?\.parquet$")
HUB_CARD_KEYS = re.compile(r"^(configs|dataset_info):", re.M)  # top-level keys of a dataset card's YAML header
HUB_SNAPSHOT_DEPTH = 3  # folder levels below a snapshot's root searched for Hub shard names


@dataclass
class ResolvedSource:
    """A source after its kind is known and its files are listed (done once, in the main process)."""

    spec: SourceSpec
    index: int
    kind: str  # how it is read: a folder kind, parquet, webdataset or hub (a hub_snapshot becomes one of the last 3)
    root: str | None = None
    # Folder kinds: paths relative to `root`; parquet/webdataset: shard files. Stored as a numpy
    # bytes array: it pickles to DataLoader workers and hashes (HF fingerprints gen_kwargs) far
    # faster than a list of a million Python strings.
    files: np.ndarray | None = None
    hub: object | None = None  # datasets.IterableDataset for kind "hub"
    image_columns: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _has_dataset_card(path: str) -> bool:
    """Whether `path`/README.md is a Hub dataset card: a YAML header with `configs:` or `dataset_info:`."""
    try:
        with open(os.path.join(path, "README.md"), encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return False
    if not text.startswith("---"):
        return False
    header = text[3:].split("\n---", 1)[0]
    return HUB_CARD_KEYS.search(header) is not None


def _has_hub_shards(path: str, depth: int = HUB_SNAPSHOT_DEPTH) -> bool:
    """Whether a file named like a Hub shard ('<split>-NNNNN-of-NNNNN.parquet') lies in `path` or up to
    `depth` folder levels below it (hidden folders, such as `hf download`'s .cache/, skipped)."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return False
    if any(HUB_SHARD_NAME.match(e.name) for e in entries if e.is_file()):
        return True
    return depth > 0 and any(
        _has_hub_shards(e.path, depth - 1) for e in entries if not e.name.startswith(".") and e.is_dir()
    )


def _shard_kind(name: str) -> str | None:
    """The kind whose shards are named like `name` (by its ending), if any."""
    lowered = name.lower()
    return next((k.name for k in TABLE if k.shard_suffix and lowered.endswith(k.shard_suffix)), None)


def detect_kind(path: str) -> str:
    """Guess the kind of a source from its path."""
    if _is_glob(path) or os.path.isfile(path):
        return _shard_kind(path) or "folder"
    if os.path.isdir(path):
        entries = set(os.listdir(path))
        if FFHQ_JSON in entries or FFHQ_IMAGES in entries:
            return "ffhq"
        if entries & {"train2017", "val2017", "test2017"}:
            return "coco"
        if _has_dataset_card(path):
            return "hub_snapshot"
        if any(os.path.isdir(os.path.join(path, d)) for d in ("train", "val") if d in entries):
            return "imagenet"
        shard_kinds = [k for k in (_shard_kind(e) for e in sorted(entries)) if k]
        if "parquet" in shard_kinds:
            return "hub_snapshot" if any(HUB_SHARD_NAME.match(e) for e in entries) else "parquet"
        if shard_kinds:
            return shard_kinds[0]
        # Last, as it may list subfolders: shards named the Hub's way below the root (data/, <config>/).
        return "hub_snapshot" if _has_hub_shards(path) else "folder"
    if _HUB_ID.match(path):
        return "hub"
    return "folder"  # reported as a missing folder


def list_images(directory: str) -> list[str]:
    """Image files under `directory` (recursive, sorted, hidden files skipped), relative, '/'-separated."""
    found = []
    for current, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_dir = os.path.relpath(current, directory)
        for name in files:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            found.append(name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/"))
    return sorted(found)


def _as_bytes_array(paths: list[str]) -> np.ndarray:
    return np.array([p.encode("utf-8") for p in paths], dtype=np.bytes_)


def _split_dir(spec: SourceSpec, kind: str) -> str:
    choices = KIND[kind].splits
    if spec.split not in choices:
        raise DataError(
            f"source '{spec.name}': split {spec.split!r} is not one of {sorted(choices)} for a {kind} folder"
        )
    return choices[spec.split]


def _ffhq_files(spec: SourceSpec) -> list[str]:
    category = _split_dir(spec, "ffhq")
    images_dir = os.path.join(spec.path, FFHQ_IMAGES)
    if not os.path.isdir(images_dir):
        raise DataError(f"source '{spec.name}': FFHQ folder {spec.path} has no {FFHQ_IMAGES}/ directory")
    on_disk = [f"{FFHQ_IMAGES}/{p}" for p in list_images(images_dir)]
    if category is None:
        return on_disk
    json_path = os.path.join(spec.path, FFHQ_JSON)
    if os.path.isfile(json_path):
        try:
            with open(json_path) as f:
                metadata = json.load(f)
        except (OSError, ValueError) as exc:
            raise DataError(f"source '{spec.name}': cannot read {json_path}: {squeezed(exc)}") from None
        wanted = {
            entry["image"]["file_path"].replace("\\", "/")
            for entry in metadata.values()
            if entry.get("category") == category
        }
        return [p for p in on_disk if p in wanted]
    logger.warning(
        "source '%s': %s not found; using the FFHQ convention that images 0-%d are 'training'",
        spec.name,
        FFHQ_JSON,
        FFHQ_NUM_TRAINING - 1,
    )

    def is_training(rel: str) -> bool:
        stem = Path(rel).stem
        return stem.isdigit() and int(stem) < FFHQ_NUM_TRAINING

    return [p for p in on_disk if is_training(p) == (category == "training")]


def _resolve_folder(spec: SourceSpec, kind: str, index: int) -> ResolvedSource:
    if not os.path.isdir(spec.path):
        raise DataError(f"source '{spec.name}': folder {spec.path} does not exist")
    if kind == "ffhq":
        root, files = spec.path, _ffhq_files(spec)
    else:
        root = spec.path if KIND[kind].splits is None else os.path.join(spec.path, _split_dir(spec, kind))
        if not os.path.isdir(root):
            raise DataError(f"source '{spec.name}': split folder {root} does not exist")
        files = list_images(root)
    if not files:
        raise DataError(
            f"source '{spec.name}': no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
            f"under {root}" + (f" for split {spec.split!r}" if kind == "ffhq" else "")
        )
    return ResolvedSource(spec, index, kind, root=root, files=_as_bytes_array(files))


def _shard_files(spec: SourceSpec, extension: str) -> list[str]:
    pattern = spec.path
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", f"*{extension}")
    files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
    if not files:
        raise DataError(f"source '{spec.name}': no {extension} files match {spec.path}")
    return [os.path.abspath(f) for f in files]


def _image_columns(features, spec: SourceSpec) -> list[str]:
    from datasets import Image

    columns = list(features) if features is not None else []
    if spec.image_column != "auto":
        if features is not None and spec.image_column not in columns:
            raise DataError(f"source '{spec.name}': image column {spec.image_column!r} not in columns {columns}")
        return [spec.image_column]
    typed = [c for c in columns if isinstance(features[c], Image)]
    if typed:
        return typed
    named = [c for c in IMAGE_COLUMN_NAMES if c in columns]
    if named:
        return named
    raise DataError(f"source '{spec.name}': no image column among {columns}; set image_column=...")


def _load_table_source(kind: str, files):
    import datasets

    # The reader names of the shard kinds are datasets' packaged builders of the same name.
    files = [f.decode("utf-8") if isinstance(f, bytes) else str(f) for f in files]
    return datasets.load_dataset(KIND[kind].reader, data_files=files, split="train", streaming=True)


def _resolve_table(spec: SourceSpec, kind: str, index: int, files: list[str] | None = None) -> ResolvedSource:
    if files is None:
        files = _shard_files(spec, KIND[kind].shard_suffix)
    try:
        ds = _load_table_source(kind, files)
        features = ds.features
    except Exception as exc:  # noqa: BLE001 - any reader failure is a configuration error here
        raise DataError(f"source '{spec.name}': cannot read {kind} shards {spec.path}: {one_line(exc)}") from None
    return ResolvedSource(spec, index, kind, files=_as_bytes_array(files), image_columns=_image_columns(features, spec))


def _resolve_hub(spec: SourceSpec, kind: str, index: int, local: bool = False) -> ResolvedSource:
    import datasets

    try:
        # With HF_HUB_OFFLINE=1 this fails at once (no request is made); online, the hub
        # client's own timeouts bound it.
        ds = datasets.load_dataset(spec.path, name=spec.config, split=spec.split, streaming=True)
        features = ds.features
    except Exception as exc:  # noqa: BLE001 - unreachable, gated, missing split... all fatal here
        if local:
            raise DataError(
                f"source '{spec.name}': cannot read the Hub dataset folder {spec.path} "
                f"(config={spec.config}, split={spec.split}): {one_line(exc)}"
            ) from None
        offline = " (HF_HUB_OFFLINE is set)" if datasets.config.HF_HUB_OFFLINE else ""
        raise DataError(
            f"source '{spec.name}': hub dataset {spec.path!r} (config={spec.config}, split={spec.split}) "
            f"is unreachable{offline}: {one_line(exc)}"
        ) from None
    return ResolvedSource(spec, index, "hub", hub=ds, image_columns=_image_columns(features, spec))


def hub_snapshot_splits(path: str, config: str | None = None) -> tuple[str, dict[str, list[str]]]:
    """(file format, {split: sorted data files}) of a local copy of a Hub dataset repository, as
    `datasets.load_dataset(path, name=config)` reads it: the dataset card's `configs:` when it has them,
    else the Hub's file naming conventions ('data/<split>-NNNNN-of-NNNNN.parquet' and others)."""
    import datasets

    builder = datasets.load_dataset_builder(os.path.abspath(path), name=config)
    data_files = builder.config.data_files or {}
    return builder.name, {split: sorted(str(f) for f in files) for split, files in data_files.items()}


def _resolve_hub_snapshot(spec: SourceSpec, kind: str, index: int) -> ResolvedSource:
    """One split of a downloaded Hub dataset: its parquet (or .tar) shards read like the parquet
    (webdataset) kind, so ranks get whole shards and a resume is exact; other formats (image
    folders, JSON, ...) are read by `datasets` as a hub dataset would be."""
    if not os.path.isdir(spec.path):
        raise DataError(f"source '{spec.name}': Hub dataset folder {spec.path} does not exist")
    try:
        file_format, splits = hub_snapshot_splits(spec.path, spec.config)
    except Exception as exc:  # noqa: BLE001 - an unknown config, a bad card, no data files: fatal here
        raise DataError(
            f"source '{spec.name}': cannot read the Hub dataset folder {spec.path} (config={spec.config}): "
            f"{one_line(exc)}"
        ) from None
    if spec.split not in splits:
        raise DataError(
            f"source '{spec.name}': split {spec.split!r} is not in the Hub dataset folder {spec.path}"
            + (f" (config {spec.config})" if spec.config else "")
            + f"; its splits: {', '.join(sorted(splits)) or 'none'}"
        )
    if file_format in KIND and KIND[file_format].reader in (PARQUET, WEBDATASET):
        return _resolve_table(spec, file_format, index, files=splits[spec.split])
    return _resolve_hub(spec, "hub", index, local=True)


def resolve_source(spec: SourceSpec, index: int = 0) -> ResolvedSource:
    """Detect the kind, list files / open the hub dataset, and check there is something to read."""
    if not isinstance(spec, SourceSpec):
        raise DataError(f"expected a SourceSpec, got {spec!r}")
    kind = detect_kind(spec.path) if spec.kind == "auto" else kind_of(spec.kind, spec.name).name
    return _RESOLVERS[KIND[kind].reader](spec, kind, index)


def resolve_sources(sources: list[SourceSpec]) -> list[ResolvedSource]:
    check_weights(sources)
    return [resolve_source(spec, i) for i, spec in enumerate(sources)]


def spec_of(source: SourceSpec | ResolvedSource) -> SourceSpec:
    return source.spec if isinstance(source, ResolvedSource) else source


def as_resolved(sources: list[SourceSpec | ResolvedSource]) -> list[ResolvedSource]:
    """Sources already resolved (listed once per job by the trainer's main process) as they are; specs
    resolved here, each with its place in the list as its index."""
    check_weights([spec_of(s) for s in sources])
    return [s if isinstance(s, ResolvedSource) else resolve_source(s, i) for i, s in enumerate(sources)]


def missing_files(sources: list[ResolvedSource], per_source: int = 8) -> list[str]:
    """Which of up to `per_source` listed files of each source (first, last and evenly spaced between) do not
    exist here: a few stat calls that tell whether this machine sees the files another one listed."""
    missing = []
    for src in sources:
        if src.files is None or not len(src.files):
            continue
        picks = sorted(set(np.linspace(0, len(src.files) - 1, min(per_source, len(src.files))).astype(int).tolist()))
        for i in picks:
            path = src.files[i].decode("utf-8")
            path = path if src.root is None else os.path.join(src.root, path)
            if not os.path.isfile(path):
                missing.append(path)
    return missing


# How each reader's sources are resolved (None: a Hub snapshot, resolved into one of the others).
_RESOLVERS = {
    FILES: _resolve_folder,
    PARQUET: _resolve_table,
    WEBDATASET: _resolve_table,
    HUB: _resolve_hub,
    None: _resolve_hub_snapshot,
}


def check_sources(sources: list[SourceSpec]) -> None:
    """Raise DataError (one line) for anything that would fail later: call before training."""
    resolve_sources(sources)
