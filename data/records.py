"""Raw record streams: one source's records for one reader (a DataLoader worker of one rank).

Every source becomes a Hugging Face streaming `IterableDataset` of *raw* records

    {"bytes": binary | None, "path": str | None, "key": str, "source": int}

(undecoded: local folders carry only the path, the file is read after shuffling), so that a
shuffle block holds file names or compressed bytes, never decoded pixels.
"""

from __future__ import annotations

import os
import re

import numpy as np

from .kinds import FILES, HUB, PARQUET, WEBDATASET, reader_of
from .resolve import ResolvedSource


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


def image_value(example, columns):
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


def record_key(prefix: str, index: int, original: str) -> str:
    """'<source>/<shard>/<row>:<original key>': unique even when images or `__key__`s repeat."""
    return f"{prefix}/{index}:{original}" if original else f"{prefix}/{index}"


def _hub_record(example, index, columns, source, prefix):
    data, path, original = image_value(example, columns)
    return {
        "bytes": data,
        "path": path if data is None else None,
        "key": record_key(prefix, index, str(original)),
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
                        data, path, original = image_value({c: table[c][i] for c in table}, columns)
                        yield {
                            "bytes": data,
                            "path": path if data is None else None,
                            "source": source,
                            "key": record_key(f"{name}/{label}", row + i, str(original)),
                        }
                row += batch.num_rows


def webdataset_samples(file: str, columns):
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
        for index, (key, found) in enumerate(webdataset_samples(file, columns)):
            if _kept(index, keep):
                data, _, _ = image_value(found, columns)
                yield {"bytes": data, "path": None, "source": source, "key": record_key(f"{name}/{label}", index, key)}


def _row_group_units(units):
    """Parquet units (file, label, -1 = whole file) -> one unit per row group."""
    import pyarrow.parquet as pq

    return [
        (file, label, g)
        for file, label, group in units
        for g in (range(pq.ParquetFile(file).num_row_groups) if group < 0 else [group])
    ]


def _split_units(units, part: int, num_parts: int, keep, reader: str):
    """Part `part` of `num_parts`: whole shard files when there are enough (parquet: else row
    groups), else every row index r with r % num_parts == part in every shard (`keep`)."""
    if num_parts == 1:
        return units, keep
    if keep is not None:  # already split by rows: r % n == k, then every num_parts-th of those
        return units, (keep[0] + keep[1] * part, keep[1] * num_parts)
    if len(units) < num_parts and reader == PARQUET:
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
    if reader_of(src.kind) == PARQUET:
        kwargs["row_groups"] = groups
    generator = _parquet_records if reader_of(src.kind) == PARQUET else _webdataset_records
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

    reader = reader_of(src.kind)
    if reader == FILES:
        total = len(src.files)
    elif reader == PARQUET:
        files = [f.decode("utf-8") for f in src.files]
        if max_samples is None:  # the rank's units, as open_records splits them
            units, keep = _split_units([(f, f, -1) for f in files], rank, world_size, None, PARQUET)
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


def _open_files(src: ResolvedSource, rank, world_size, worker, num_workers, order_seed, max_samples):
    import datasets

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


def _open_shards(src: ResolvedSource, rank, world_size, worker, num_workers, order_seed, max_samples):
    files = [f.decode("utf-8") for f in src.files]
    labels = shard_labels(files)
    units = [(files[i], labels[i], -1) for i in _order(len(files), order_seed)]
    if max_samples is not None:
        ds = _table_dataset(src, units, None).take(max_samples)
        return _split_examples(_split_examples(ds, rank, world_size), worker, num_workers)
    keep = None
    for part, num_parts in ((rank, world_size), (worker, num_workers)):
        units, keep = _split_units(units, part, num_parts, keep, reader_of(src.kind))
    return _table_dataset(src, units, keep)


def _open_hub(src: ResolvedSource, rank, world_size, worker, num_workers, order_seed, max_samples):
    from datasets import Image

    ds = src.hub  # shard order fixed (order_seed unused): reordering a hub dataset's shards needs datasets' private API
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


_OPENERS = {FILES: _open_files, PARQUET: _open_shards, WEBDATASET: _open_shards, HUB: _open_hub}


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
    opener = _OPENERS[reader_of(src.kind)]
    return opener(src, rank, world_size, worker, num_workers, order_seed, max_samples)
