"""Where images come from: source specs, mixture files, validation, and raw record streams.

A source is a hub dataset id, a local folder in one of the reference implementation's layouts
(lavinal712/AutoencoderKL, branch transfusion_vae: ImageNet, COCO, FFHQ)
or any image folder, a glob of parquet shards, a glob of webdataset `.tar` shards, or a local copy
of a Hub dataset repository (`hf download ID --repo-type dataset --local-dir DIR`: kind
`hub_snapshot`, one split's shards read like the parquet / webdataset kinds). Every
source becomes a Hugging Face streaming `IterableDataset` of *raw* records

    {"bytes": binary | None, "path": str | None, "key": str, "source": int}

(undecoded: local folders carry only the path, the file is read after shuffling), so that a
shuffle block holds file names or compressed bytes, never decoded pixels.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from common.errors import DataError
from common.helpers import one_line

logger = logging.getLogger(__name__)

KINDS = ("auto", "hub", "hub_snapshot", "folder", "imagenet", "coco", "ffhq", "parquet", "webdataset")
FOLDER_KINDS = ("folder", "imagenet", "coco", "ffhq")
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp")  # tried when no column has the Image type
FFHQ_JSON = "ffhq-dataset-v2.json"
FFHQ_IMAGES = "images1024x1024"
FFHQ_NUM_TRAINING = 60000  # fallback without the json: images 00000-59999 are "training"

# Split names each layout accepts, mapped to the directory / category they select.
SPLITS = {
    "imagenet": {"train": "train", "val": "val", "validation": "val"},
    "coco": {
        "train": "train2017",
        "train2017": "train2017",
        "val": "val2017",
        "validation": "val2017",
        "val2017": "val2017",
        "test": "test2017",
        "test2017": "test2017",
    },
    "ffhq": {"train": "training", "training": "training", "val": "validation", "validation": "validation", "all": None},
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The Hub's shard names (datasets' push_to_hub, the Hub's conversions): 'train-00000-of-00294.parquet',
# older ones with a fingerprint, 'train-00000-of-00001-5e3f9a0b1c2d3e4f.parquet'.
HUB_SHARD_NAME = re.compile(r"^(?P<split>\w+(?:\.\w+)*)-\d{5}-of-\d{5}(?:-[0-9a-f]+)?\.parquet$")
HUB_CARD_KEYS = re.compile(r"^(configs|dataset_info):", re.M)  # top-level keys of a dataset card's YAML header
HUB_SNAPSHOT_DEPTH = 3  # folder levels below a snapshot's root searched for Hub shard names
MIXTURES_DIR = Path(__file__).resolve().parent / "mixtures"


def _squeezed(text) -> str:
    """Foreign error text (YAML, OS, hub client) squeezed into one line."""
    return " ".join(str(text).split())


@dataclass
class SourceSpec:
    name: str  # label used in logs and skip counts
    path: str  # hub id | local dir | glob of *.parquet | glob of *.tar
    weight: float = 1.0
    kind: str = "auto"  # auto|hub|hub_snapshot|folder|imagenet|coco|ffhq|parquet|webdataset
    split: str = "train"  # ImageNet train/val, COCO train2017/val2017/..., FFHQ training/validation, hub split
    config: str | None = None  # hub config name
    image_column: str = "auto"


# ---------------------------------------------------------------------------------------------
# Parsing: CLI strings and mixture files
# ---------------------------------------------------------------------------------------------


def _default_name(path: str) -> str:
    stem = Path(path.rstrip("/")).name or path
    stem = re.split(r"[*?\[]", stem)[0].rstrip("-_.") or Path(path).parent.name
    return stem.split(".")[0] or "source"


def _spec_from_mapping(entry: dict, where: str) -> SourceSpec:
    known = {f.name for f in fields(SourceSpec)}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    if not entry.get("path"):
        raise DataError(f"{where}: missing 'path'")
    values = dict(entry)
    values["path"] = str(values["path"])
    values.setdefault("name", _default_name(values["path"]))
    try:
        values["weight"] = float(values.get("weight", 1.0))
    except (TypeError, ValueError):
        raise DataError(f"{where}: weight {values.get('weight')!r} is not a number") from None
    for key in ("name", "kind", "split", "image_column"):
        if key in values:
            values[key] = str(values[key])
    if values.get("config") in ("", "none", "None"):
        values["config"] = None
    return SourceSpec(**values)


def source_fields(text: str) -> dict[str, str]:
    """The key=value pairs of 'name=coco,path=/data/COCO,split=train'; {'path': text} for a bare path / hub id."""
    text = text.strip()
    if "=" not in text:
        return {"path": text}
    entry = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise DataError(f"source {text!r}: expected key=value pairs separated by commas, got {item!r}")
        entry[key.strip()] = value.strip()
    return entry


def parse_source(text: str, defaults: dict | None = None) -> SourceSpec:
    """Parse 'name=coco,path=/data/COCO,weight=0.1,split=train' or a bare path / hub id.

    `defaults`: values of SourceSpec fields the text leaves out (e.g. the evaluator's --split).
    """
    text = text.strip()
    return _spec_from_mapping({**(defaults or {}), **source_fields(text)}, f"source {text!r}")


def load_mixture(path_or_name: str, data_root: str | None = None) -> list[SourceSpec]:
    """Read a YAML/JSON mixture file, or a ready-made one by name ('transfusion', 'transfusion_hub').

    The file holds `sources:` (a list of SourceSpec fields); '{data_root}' in a path is replaced by
    `data_root`. 'transfusion' is ImageNet train + COCO train2017 + FFHQ training under data_root,
    weighted by their image counts (1281167 / 118287 / 60000).
    """
    import yaml

    file = Path(path_or_name)
    if not file.is_file():
        named = MIXTURES_DIR / f"{path_or_name}.yaml"
        if not named.is_file():
            available = sorted(p.stem for p in MIXTURES_DIR.glob("*.yaml"))
            raise DataError(f"mixture {path_or_name!r} is neither a file nor one of {available}")
        file = named
    try:
        content = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise DataError(f"mixture file {file} is not valid YAML/JSON: {_squeezed(exc)}") from None
    if isinstance(content, dict):
        unknown = sorted(set(content) - {"sources", "description"})
        if unknown:
            raise DataError(f"mixture file {file}: unknown top-level key(s) {unknown}; expected 'sources'")
        content = content.get("sources")
    if not isinstance(content, list) or not content:
        raise DataError(f"mixture file {file}: expected a non-empty list of sources")
    specs = []
    for i, entry in enumerate(content):
        where = f"mixture file {file}, source #{i}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected a mapping, got {entry!r}")
        if "{data_root}" in str(entry.get("path", "")):
            if data_root is None:
                raise DataError(f"{where}: path {entry['path']!r} needs a data root (--data_root)")
            entry = {**entry, "path": str(entry["path"]).replace("{data_root}", str(data_root).rstrip("/"))}
        specs.append(_spec_from_mapping(entry, where))
    return specs


# ---------------------------------------------------------------------------------------------
# Resolution: kind detection, file listing, validation
# ---------------------------------------------------------------------------------------------


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


def detect_kind(path: str) -> str:
    """Guess the kind of a source from its path."""
    lowered = path.lower()
    if _is_glob(path) or os.path.isfile(path):
        if lowered.endswith(".parquet"):
            return "parquet"
        if lowered.endswith(".tar"):
            return "webdataset"
        return "folder"
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
        if any(e.endswith(".parquet") for e in entries):
            return "hub_snapshot" if any(HUB_SHARD_NAME.match(e) for e in entries) else "parquet"
        if any(e.endswith(".tar") for e in entries):
            return "webdataset"
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
    choices = SPLITS[kind]
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
            raise DataError(f"source '{spec.name}': cannot read {json_path}: {_squeezed(exc)}") from None
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
        root = spec.path if kind == "folder" else os.path.join(spec.path, _split_dir(spec, kind))
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

    builder = "parquet" if kind == "parquet" else "webdataset"
    files = [f.decode("utf-8") if isinstance(f, bytes) else str(f) for f in files]
    return datasets.load_dataset(builder, data_files=files, split="train", streaming=True)


def _resolve_table(spec: SourceSpec, kind: str, index: int, files: list[str] | None = None) -> ResolvedSource:
    if files is None:
        files = _shard_files(spec, ".parquet" if kind == "parquet" else ".tar")
    try:
        ds = _load_table_source(kind, files)
        features = ds.features
    except Exception as exc:  # noqa: BLE001 - any reader failure is a configuration error here
        raise DataError(f"source '{spec.name}': cannot read {kind} shards {spec.path}: {one_line(exc)}") from None
    return ResolvedSource(spec, index, kind, files=_as_bytes_array(files), image_columns=_image_columns(features, spec))


def _resolve_hub(spec: SourceSpec, index: int, local: bool = False) -> ResolvedSource:
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


def _resolve_hub_snapshot(spec: SourceSpec, index: int) -> ResolvedSource:
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
    if file_format in ("parquet", "webdataset"):
        return _resolve_table(spec, file_format, index, files=splits[spec.split])
    return _resolve_hub(spec, index, local=True)


def resolve_source(spec: SourceSpec, index: int = 0) -> ResolvedSource:
    """Detect the kind, list files / open the hub dataset, and check there is something to read."""
    if not isinstance(spec, SourceSpec):
        raise DataError(f"expected a SourceSpec, got {spec!r}")
    if spec.kind not in KINDS:
        raise DataError(f"source '{spec.name}': unknown kind {spec.kind!r}; expected one of {list(KINDS)}")
    kind = detect_kind(spec.path) if spec.kind == "auto" else spec.kind
    if kind in FOLDER_KINDS:
        return _resolve_folder(spec, kind, index)
    if kind in ("parquet", "webdataset"):
        return _resolve_table(spec, kind, index)
    if kind == "hub_snapshot":
        return _resolve_hub_snapshot(spec, index)
    return _resolve_hub(spec, index)


def check_weights(sources: list[SourceSpec]) -> None:
    if not sources:
        raise DataError("no data sources given")
    names = [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"duplicate source name(s) {duplicates}")
    for s in sources:
        if not isinstance(s.weight, (int, float)) or not math.isfinite(s.weight) or s.weight < 0:
            raise DataError(f"source '{s.name}': weight {s.weight!r} must be a finite number >= 0")
    if sum(s.weight for s in sources) <= 0:
        raise DataError(f"source weights {[s.weight for s in sources]} must sum to more than 0")


def resolve_sources(sources: list[SourceSpec]) -> list[ResolvedSource]:
    check_weights(sources)
    return [resolve_source(spec, i) for i, spec in enumerate(sources)]


def check_sources(sources: list[SourceSpec]) -> None:
    """Raise DataError (one line) for anything that would fail later: call before training."""
    resolve_sources(sources)


# ---------------------------------------------------------------------------------------------
# Raw record streams, one per (rank, dataloader worker)
# ---------------------------------------------------------------------------------------------


def raw_features():
    from datasets import Features, Value

    return Features(
        {"bytes": Value("binary"), "path": Value("string"), "key": Value("string"), "source": Value("int64")}
    )


def _folder_records(shards, root, source):
    for files in shards:
        for rel in files:
            rel = rel.decode("utf-8")
            yield {"bytes": None, "path": os.path.join(root, rel), "key": rel, "source": source}


def _image_value(example, columns):
    """(bytes, path, original key) of a table / hub example's first non-empty image column."""
    value = None
    for column in columns:  # webdataset samples may carry .jpg in one sample and .png in another
        value = example.get(column)
        if value is not None:
            break
    data, path = None, None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        path = value
    return data, path, example.get("__key__") or path or ""


def _record_key(prefix: str, index: int, original: str) -> str:
    """'<source>/<shard>/<row>:<original key>': unique even when images or `__key__`s repeat."""
    return f"{prefix}/{index}:{original}" if original else f"{prefix}/{index}"


def _hub_record(example, index, columns, source, prefix):
    data, path, original = _image_value(example, columns)
    return {
        "bytes": data,
        "path": path if data is None else None,
        "key": _record_key(prefix, index, str(original)),
        "source": source,
    }


def shard_labels(files) -> list[str]:
    """Short unique names of shard files for record keys: paths relative to their common folder."""
    files = [f.decode("utf-8") if isinstance(f, bytes) else str(f) for f in files]
    if len(files) == 1:
        return [os.path.basename(files[0])]
    root = os.path.commonpath([os.path.dirname(f) for f in files])
    return [os.path.relpath(f, root).replace(os.sep, "/") for f in files]


def _kept(row: int, keep) -> bool:
    return keep is None or row % keep[1] == keep[0]


def _parquet_records(files, labels, row_groups, columns, name, source, keep):
    import pyarrow.parquet as pq

    for file, label, group in zip(files, labels, row_groups, strict=True):
        reader = pq.ParquetFile(file)
        sizes = [reader.metadata.row_group(g).num_rows for g in range(reader.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
        available = set(reader.schema_arrow.names)
        wanted = [c for c in dict.fromkeys(list(columns) + ["__key__"]) if c in available]
        for g in range(reader.num_row_groups) if group < 0 else [group]:
            row = starts[g]
            # Small batches: a row group of large images is never held in memory all at once.
            for batch in reader.iter_batches(batch_size=64, row_groups=[g], columns=wanted):
                table = batch.to_pydict()
                for i in range(batch.num_rows):
                    if _kept(row + i, keep):
                        data, path, original = _image_value({c: table[c][i] for c in table}, columns)
                        yield {
                            "bytes": data,
                            "path": path if data is None else None,
                            "source": source,
                            "key": _record_key(f"{name}/{label}", row + i, str(original)),
                        }
                row += batch.num_rows


def _webdataset_samples(file: str, columns):
    """(key, {field: bytes}) per sample of a tar shard, grouped the webdataset way (consecutive members
    sharing the name up to the first dot of the base name); hidden and '__' members are skipped, as
    datasets' own reader does. Only the image fields are read."""
    import tarfile

    current, found = None, {}
    with tarfile.open(file, mode="r|*") as tar:
        for member in tar:
            if not member.isreg() or os.path.basename(member.name).startswith((".", "__")):
                continue
            match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", member.name)
            if not match:
                continue
            key, field_name = match.groups()
            if current is not None and key != current:
                yield current, found
                found = {}
            current = key
            if field_name in columns:
                found[field_name] = tar.extractfile(member).read()
            tar.members = []  # a streaming read must not keep every member's header
    if current is not None:
        yield current, found


def _webdataset_records(files, labels, columns, name, source, keep):
    for file, label in zip(files, labels, strict=True):
        for index, (key, found) in enumerate(_webdataset_samples(file, columns)):
            if _kept(index, keep):
                data, _, _ = _image_value(found, columns)
                yield {"bytes": data, "path": None, "source": source, "key": _record_key(f"{name}/{label}", index, key)}


def _row_group_units(units):
    """Parquet units (file, label, -1 = whole file) -> one unit per row group."""
    import pyarrow.parquet as pq

    return [
        (file, label, g)
        for file, label, group in units
        for g in (range(pq.ParquetFile(file).num_row_groups) if group < 0 else [group])
    ]


def _split_units(units, part: int, num_parts: int, keep, kind: str):
    """Part `part` of `num_parts`: whole shard files when there are enough (parquet: else row
    groups), else every row index r with r % num_parts == part in every shard (`keep`)."""
    if num_parts == 1:
        return units, keep
    if keep is not None:  # already split by rows: r % n == k, then every num_parts-th of those
        return units, (keep[0] + keep[1] * part, keep[1] * num_parts)
    if len(units) < num_parts and kind == "parquet":
        units = _row_group_units(units)
    if len(units) >= num_parts:
        return units[part::num_parts], None
    return units, (part, num_parts)


def _table_dataset(src: ResolvedSource, units, keep):
    import datasets

    files, labels, groups = (list(column) for column in zip(*units, strict=True))
    kwargs = {
        "files": files,
        "labels": labels,
        "columns": tuple(src.image_columns),
        "name": src.name,
        "source": src.index,
        "keep": keep,
    }
    if src.kind == "parquet":
        kwargs["row_groups"] = groups
    generator = _parquet_records if src.kind == "parquet" else _webdataset_records
    # Lists in gen_kwargs are datasets' shards: one per unit, so a resume re-reads one unit at most.
    return datasets.IterableDataset.from_generator(generator, features=raw_features(), gen_kwargs=kwargs)


def _keep_every(example, index, part, num_parts):
    return index % num_parts == part


def _split_examples(ds, part: int, num_parts: int):
    # Example-level split, only for sources with fewer shards than parts: every reader goes
    # through the whole source and keeps one record in num_parts.
    return ds.filter(_keep_every, with_indices=True, fn_kwargs={"part": part, "num_parts": num_parts})


def _split(ds, part: int, num_parts: int):
    """Part `part` of `num_parts` disjoint parts of a hub source: whole shards when possible."""
    if num_parts == 1:
        return ds
    if ds.num_shards < num_parts:
        ds = ds.reshard()  # parquet: one shard per row group
    if ds.num_shards >= num_parts:
        return ds.shard(num_shards=num_parts, index=part, contiguous=False)
    return _split_examples(ds, part, num_parts)


def _order(n: int, order_seed: int | None) -> np.ndarray:
    return np.arange(n) if order_seed is None else np.random.default_rng(order_seed).permutation(n)


def _rows_in(start: int, stop: int, keep) -> int:
    """How many rows r in [start, stop) `keep` keeps (r % n == k)."""
    if keep is None:
        return stop - start
    k, n = keep
    return len(range(start + (k - start) % n, stop, n))


def count_records(
    src: ResolvedSource, *, rank: int = 0, world_size: int = 1, max_samples: int | None = None
) -> int | None:
    """How many records `open_records` gives rank `rank` (over all its DataLoader workers) in the sorted
    order an evaluation reads, when that is cheap to know: folder kinds (the file list) and parquet (the
    shards' footers); else None. Bad images among them are skipped later, so this is an upper bound."""
    import pyarrow.parquet as pq

    if src.kind in FOLDER_KINDS:
        total = len(src.files)
    elif src.kind == "parquet":
        files = [f.decode("utf-8") for f in src.files]
        if max_samples is None:  # the rank's units, as open_records splits them
            units, keep = _split_units([(f, f, -1) for f in files], rank, world_size, None, "parquet")
            count = 0
            for file, _, group in units:
                metadata = pq.ParquetFile(file).metadata
                sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
                start = sum(sizes[:group]) if group >= 0 else 0
                count += _rows_in(start, start + (sizes[group] if group >= 0 else sum(sizes)), keep)
            return count
        total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    else:
        return None
    if max_samples is not None:
        total = min(total, max_samples)
    return len(range(rank, total, world_size))  # round robin: rank r gets records r, r + world_size, ...


def open_records(
    src: ResolvedSource,
    *,
    rank: int = 0,
    world_size: int = 1,
    worker: int = 0,
    num_workers: int = 1,
    order_seed: int | None = None,
    max_samples: int | None = None,
):
    """The raw-record IterableDataset of one source for one DataLoader worker of one rank.

    Ranks get disjoint parts whose union is the whole source, and each rank's part is split the
    same way across its workers (so what a rank sees does not depend on its number of workers).
    `order_seed` permutes the file / shard order (the same permutation on every rank, so the
    parts stay disjoint); None keeps the sorted order. `max_samples` cuts the source to its
    first records before splitting (evaluation).

    Record keys are unique by construction: folders use the file's relative path; parquet and
    webdataset '<source>/<shard file>/<row in shard>:<original key>' (the same whatever the
    number of ranks); hub datasets '<source>/<row>:<original key>' with max_samples, else
    '<source>/part<i>of<n>/<row in part>:<original key>' (i, n: this reader among ranks x workers).
    """
    import datasets
    from datasets import Image

    if src.kind in FOLDER_KINDS:
        files = src.files[:max_samples] if max_samples is not None else src.files
        files = files[_order(len(files), order_seed)]
        # A round-robin over the (shuffled) list: every rank and worker gets work whatever the
        # number of files. The part is one shard: it is already this worker's alone.
        return datasets.IterableDataset.from_generator(
            _folder_records,
            features=raw_features(),
            gen_kwargs={
                "shards": [files[rank::world_size][worker::num_workers]],
                "root": src.root,
                "source": src.index,
            },
        )

    if src.kind in ("parquet", "webdataset"):
        files = [f.decode("utf-8") for f in src.files]
        labels = shard_labels(files)
        units = [(files[i], labels[i], -1) for i in _order(len(files), order_seed)]
        if max_samples is not None:
            ds = _table_dataset(src, units, None).take(max_samples)
            return _split_examples(_split_examples(ds, rank, world_size), worker, num_workers)
        keep = None
        for part, num_parts in ((rank, world_size), (worker, num_workers)):
            units, keep = _split_units(units, part, num_parts, keep, src.kind)
        return _table_dataset(src, units, keep)

    ds = src.hub  # shard order fixed: reordering a hub dataset's shards needs datasets' private API
    features = ds.features
    for column in src.image_columns:
        if features is not None and isinstance(features.get(column), Image):
            ds = ds.cast_column(column, Image(decode=False))  # keep the bytes; decode after shuffling
    to_record = dict(
        function=_hub_record,
        with_indices=True,
        features=raw_features(),
        remove_columns=list(features) if features is not None else None,
    )
    columns = {"columns": src.image_columns, "source": src.index}
    if max_samples is not None:
        # Indexed before the split across ranks: the same key whatever the number of ranks.
        ds = ds.take(max_samples).map(fn_kwargs={**columns, "prefix": src.name}, **to_record)
        ds = _split_examples(_split_examples(ds, rank, world_size), worker, num_workers)
    else:
        ds = _split(_split(ds, rank, world_size), worker, num_workers)
        part = f"{src.name}/part{rank * num_workers + worker}of{world_size * num_workers}"
        ds = ds.map(fn_kwargs={**columns, "prefix": part}, **to_record)
    return ds if features is not None else ds.select_columns(list(raw_features()))
