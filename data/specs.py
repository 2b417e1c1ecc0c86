"""Source specs: what a `--source` string or a mixture file says, checked, before anything is listed.

A spec names a hub dataset id, a local folder, a glob of parquet / webdataset shards or a local copy of
a Hub dataset repository (data/kinds.py lists the kinds), with a weight, a split and a name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

from common.errors import DataError

MIXTURES_DIR = Path(__file__).resolve().parent / "mixtures"


def squeezed(text) -> str:
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
        raise DataError(f"mixture file {file} is not valid YAML/JSON: {squeezed(exc)}") from None
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
