"""A fixed-seed random sample spread over the whole of each source (held-out batches, latent statistics).

Where the images come from, and what that costs, per kind of source:

- local folders (any layout): files drawn at random from the full sorted file list, so every class
  folder / split subfolder is reachable; one file read per image.
- parquet: rows drawn uniformly over every row of every shard; reads every shard's footer once
  (row counts), then each row group that holds a drawn row, in batches of 64 rows.
- webdataset: a tar has no index, so shards are drawn at random (as many as images, at most all)
  and each drawn shard is read once through, keeping random samples of it (about count / shards
  per shard).
- hub: the dataset's shards (row groups where it can be resharded) are drawn at random and the
  first rows of each are taken; reads about one batch per drawn shard, never the whole dataset.

With several sources, `count` is split in proportion to their weights (largest remainder,
ties to the earlier source). Unreadable images are skipped, replaced by further draws, and
counted in a warning; a source with too few readable images is a DataError. The same sources,
count, resolution and seed always give the same images in the same order.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import os

import numpy as np
import torch

from common.errors import DataError

from .kinds import FILES, HUB, PARQUET, WEBDATASET, reader_of
from .records import image_value, record_key, shard_labels, webdataset_samples
from .resolve import ResolvedSource, resolve_source, spec_of
from .specs import SourceSpec, check_weights
from .stream import derive_seed
from .transforms import INTERPOLATIONS, MAX_IMAGE_PIXELS, BadImageError, eval_transform, load_image

logger = logging.getLogger(__name__)

_PERMUTE_LIMIT = 4_000_000  # above this many items, draw indices one by one instead of permuting all


def split_count(count: int, weights: list[float]) -> list[int]:
    """`count` split in proportion to `weights`: floors, then the largest remainders (earlier source on ties)."""
    total = float(sum(weights))
    quotas = [count * w / total for w in weights]
    shares = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - shares[i]), i))
    for i in by_remainder[: count - sum(shares)]:
        shares[i] += 1
    return shares


def _random_order(n: int, rng: np.random.Generator):
    """0..n-1 in a random order, lazily (no n-sized array for huge n)."""
    if n <= _PERMUTE_LIMIT:
        yield from (int(i) for i in rng.permutation(n))
        return
    seen: set[int] = set()
    while len(seen) < n:
        i = int(rng.integers(n))
        if i not in seen:
            seen.add(i)
            yield i


class _Collector:
    """Decodes candidates until `wanted` images are kept; counts the bad ones."""

    def __init__(self, wanted: int, resolution: int, interpolation: str):
        self.wanted, self.resolution, self.interpolation = wanted, resolution, interpolation
        self.images: list[torch.Tensor] = []
        self.keys: list[str] = []
        self.bad = 0

    @property
    def missing(self) -> int:
        return self.wanted - len(self.images)

    def add(self, data, key: str) -> None:
        if self.missing <= 0:
            return
        try:
            image = load_image(data, MAX_IMAGE_PIXELS)
        except BadImageError as error:
            self.bad += 1
            logger.debug("held-out sample: skipping bad image %r: %s", key, error)
            return
        self.images.append(eval_transform(image, self.resolution, interpolation=self.interpolation))
        self.keys.append(key)


def _from_folder(src: ResolvedSource, out: _Collector, rng: np.random.Generator) -> None:
    for i in _random_order(len(src.files), rng):
        if out.missing <= 0:
            return
        rel = src.files[i].decode("utf-8")
        out.add(os.path.join(src.root, rel), f"{src.name}/{rel}")


def _from_parquet(src: ResolvedSource, out: _Collector, rng: np.random.Generator) -> None:
    import pyarrow.parquet as pq

    files = [f.decode("utf-8") for f in src.files]
    labels = shard_labels(files)
    metadata = [pq.ParquetFile(f).metadata for f in files]
    group_starts = [
        list(itertools.accumulate((m.row_group(g).num_rows for g in range(m.num_row_groups)), initial=0))
        for m in metadata
    ]
    file_starts = list(itertools.accumulate((starts[-1] for starts in group_starts), initial=0))
    order = _random_order(file_starts[-1], rng)
    while out.missing > 0:
        drawn = []  # (file, row in the file)
        for row in itertools.islice(order, out.missing):
            f = bisect.bisect_right(file_starts, row) - 1
            drawn.append((f, row - file_starts[f]))
        if not drawn:
            return
        wanted: dict[tuple[int, int], set[int]] = {}  # (file, row group) -> rows in the file
        for f, row in drawn:
            wanted.setdefault((f, bisect.bisect_right(group_starts[f], row) - 1), set()).add(row)
        found = {}
        for (f, g), rows in sorted(wanted.items()):
            reader = pq.ParquetFile(files[f])
            columns = [c for c in dict.fromkeys([*src.image_columns, "__key__"]) if c in reader.schema_arrow.names]
            start = group_starts[f][g]
            for batch in reader.iter_batches(batch_size=64, row_groups=[g], columns=columns):
                table = batch.to_pydict()
                for row in sorted(r for r in rows if start <= r < start + batch.num_rows):
                    data, path, original = image_value({c: table[c][row - start] for c in table}, src.image_columns)
                    found[(f, row)] = (
                        data if data is not None else path,
                        record_key(f"{src.name}/{labels[f]}", row, str(original)),
                    )
                start += batch.num_rows
        for f, row in drawn:  # in draw order: the sample does not depend on the file layout
            out.add(*found[(f, row)])


def _from_shards(num_shards: int, out: _Collector, rng: np.random.Generator, candidates) -> None:
    """Random shards, about wanted / shards images from each; `candidates(shard, skip)` yields
    (data, key) of one shard in a fixed order, from its `skip`-th candidate on. A second pass
    takes more from the shards visited when the first fell short (small shards, bad images)."""
    order = list(_random_order(num_shards, rng))
    per_shard = math.ceil(out.wanted / min(out.wanted, num_shards))
    used = dict.fromkeys(order, 0)
    for cap in (per_shard, None):
        for s in order:
            kept = 0
            for data, key in candidates(s, used[s]):
                if out.missing <= 0 or (cap is not None and kept >= cap):
                    break
                used[s] += 1
                before = len(out.images)
                out.add(data, key)
                kept += len(out.images) - before
            if out.missing <= 0:
                return


def _from_webdataset(src: ResolvedSource, out: _Collector, rng: np.random.Generator) -> None:
    files = [f.decode("utf-8") for f in src.files]
    labels = shard_labels(files)
    base = int(rng.integers(2**62))

    def candidates(s, skip):
        samples = list(webdataset_samples(files[s], src.image_columns))  # a tar has no index: read it through
        for index in np.random.default_rng((base, s)).permutation(len(samples))[skip:].tolist():
            key, found = samples[index]
            yield image_value(found, src.image_columns)[0], record_key(f"{src.name}/{labels[s]}", index, key)

    _from_shards(len(files), out, rng, candidates)


def _from_hub(src: ResolvedSource, out: _Collector, rng: np.random.Generator) -> None:
    from datasets import Image

    ds = src.hub
    for column in src.image_columns:
        if ds.features is not None and isinstance(ds.features.get(column), Image):
            ds = ds.cast_column(column, Image(decode=False))
    ds = ds.reshard()  # parquet-backed datasets: one shard per row group
    num_shards = ds.num_shards

    def candidates(s, skip):
        shard = ds.shard(num_shards=num_shards, index=s, contiguous=True)
        for row, example in enumerate(itertools.islice(shard, skip, None), start=skip):
            data, path, original = image_value(example, src.image_columns)
            yield (data if data is not None else path), record_key(f"{src.name}/shard{s}", row, str(original))

    _from_shards(num_shards, out, rng, candidates)


_SAMPLERS = {FILES: _from_folder, PARQUET: _from_parquet, WEBDATASET: _from_webdataset, HUB: _from_hub}


def sample_images(
    sources: list[SourceSpec | ResolvedSource],
    count: int,
    resolution: int,
    *,
    seed: int = 0,
    interpolation: str = "bilinear",
) -> tuple[torch.Tensor, list[str]]:
    """`count` images drawn at random (fixed `seed`) across the whole of each source, split by weight.

    Returns ((count, 3, R, R) float32 in [-1, 1], eval transform: shorter side resized to R then
    centre-cropped; their keys). Raises DataError when a source has too few readable images. Specs
    are resolved here; ResolvedSource are used as they are (no second listing).
    """
    if count < 1 or resolution < 1:
        raise DataError(f"count ({count}) and resolution ({resolution}) must be >= 1")
    if interpolation not in INTERPOLATIONS:
        raise DataError(f"interpolation {interpolation!r} is not one of {sorted(INTERPOLATIONS)}")
    specs = [spec_of(s) for s in sources]
    check_weights(specs)
    images, keys = [], []
    for index, (source, share) in enumerate(zip(sources, split_count(count, [s.weight for s in specs]), strict=True)):
        if share == 0:
            continue
        spec = spec_of(source)
        src = source if isinstance(source, ResolvedSource) else resolve_source(spec, index)
        out = _Collector(share, resolution, interpolation)
        rng = np.random.default_rng(derive_seed(seed, index, share))
        _SAMPLERS[reader_of(src.kind)](src, out, rng)
        if out.bad:
            logger.warning("held-out sample of source '%s': skipped %d unreadable image(s)", spec.name, out.bad)
        if out.missing > 0:
            raise DataError(
                f"source '{spec.name}': only {len(out.images)} readable images for a sample of "
                f"{share} ({out.bad} unreadable skipped)"
            )
        images += out.images
        keys += out.keys
    return torch.stack(images), keys
