"""The kinds of source, in one table: what each is, how it is listed and how its records are read.

Every place that behaves differently per kind (detection, resolution, record streams, counts, the
held-out sample) looks the kind up here and branches on its `reader`, never on a list of names of
its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import DataError

# How a resolved source's records are read; `None`: the kind is resolved into another one first.
FILES = "files"  # an image file list under a root (read after shuffling, by path)
PARQUET = "parquet"  # parquet shard files (split by file, then row group, then row)
WEBDATASET = "webdataset"  # .tar shard files (split by file, then by sample)
HUB = "hub"  # a `datasets` streaming IterableDataset
READERS = (FILES, PARQUET, WEBDATASET, HUB)


@dataclass(frozen=True)
class Kind:
    name: str
    reader: str | None
    about: str
    # Folder layouts: split name -> subfolder (ImageNet, COCO) or category (FFHQ; None = every image);
    # None: the kind has no splits of its own (a plain folder: the folder itself).
    splits: dict[str, str | None] | None = field(default=None, hash=False)
    shard_suffix: str | None = None  # the file name ending of the kind's shards

    @property
    def is_folder(self) -> bool:
        return self.reader == FILES


# The folder layouts are the reference implementation's (lavinal712/AutoencoderKL, branch
# transfusion_vae): ImageNet train/val, COCO 2017, FFHQ with its ffhq-dataset-v2.json.
TABLE = (
    Kind("folder", FILES, "any image folder, searched recursively"),
    Kind(
        "imagenet",
        FILES,
        "ImageNet: train/ and val/ class folders",
        splits={"train": "train", "val": "val", "validation": "val"},
    ),
    Kind(
        "coco",
        FILES,
        "COCO 2017: train2017/, val2017/, test2017/",
        splits={
            "train": "train2017",
            "train2017": "train2017",
            "val": "val2017",
            "validation": "val2017",
            "val2017": "val2017",
            "test": "test2017",
            "test2017": "test2017",
        },
    ),
    Kind(
        "ffhq",
        FILES,
        "FFHQ: images1024x1024/, split by ffhq-dataset-v2.json's categories",
        splits={
            "train": "training",
            "training": "training",
            "val": "validation",
            "validation": "validation",
            "all": None,
        },
    ),
    Kind("parquet", PARQUET, "parquet shards (a glob, a file or a folder)", shard_suffix=".parquet"),
    Kind("webdataset", WEBDATASET, "webdataset .tar shards (a glob, a file or a folder)", shard_suffix=".tar"),
    Kind("hub", HUB, "a Hugging Face Hub dataset id, streamed"),
    Kind("hub_snapshot", None, "a local copy of a Hub dataset repository: one split's shards"),
)
KIND = {k.name: k for k in TABLE}
KINDS = ("auto", *KIND)  # what a source spec's `kind` may say
FOLDER_KINDS = tuple(k.name for k in TABLE if k.is_folder)


def kind_of(name: str, source: str = "?") -> Kind:
    """The table row of `name`; a one-line DataError for an unknown kind."""
    try:
        return KIND[name]
    except KeyError:
        raise DataError(f"source '{source}': unknown kind {name!r}; expected one of {list(KINDS)}") from None


def reader_of(name: str) -> str:
    """How records of a resolved source of kind `name` are read (one of READERS)."""
    reader = kind_of(name).reader
    if reader is None:
        raise DataError(f"kind {name!r} is resolved into another kind before it is read")
    return reader
