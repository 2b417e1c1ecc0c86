"""The weighted, rank-split, exactly resumable image stream.

Per node (one rank x one DataLoader worker) the pipeline is

    each source -> its part for this node                               sources.open_records
    -> datasets.interleave_datasets(probabilities = normalised weights)  HF, resumable
    -> block shuffle (ours, see below)
    -> decode + transform (bad files skipped and counted per source)

Split. Each source is split across ranks, then each rank's part across its DataLoader
workers, so ranks see disjoint data whose union is the whole source, and what a rank sees does
not depend on its number of workers. Local folders: a round-robin over the file list, which
is reshuffled every epoch with (seed, epoch), the same on every rank. Parquet / webdataset /
hub: whole shards per node when there are enough (parquet is resharded by row group first),
else one record in N. `datasets.distributed.split_dataset_by_node` is not used: in datasets
5.x it splits lazily at iteration time, after interleaving, so with sources of unequal shard
counts it falls back to striding over the whole mixture and every rank reads every byte.

Shuffle. HF's `IterableDataset.shuffle` loses the examples sitting in its buffer when a state
is reloaded, so the shuffle here is a block shuffle whose state can be re-derived: pull
`shuffle_block` raw (undecoded) records, permute them with an RNG seeded from (seed, node,
epoch, block), emit. The state is the HF state at the block start plus (epoch, block, offset);
a restore reloads the HF state, re-reads the block, re-permutes it and skips `offset` records.
Crops and flips are drawn from an RNG seeded from (seed, node, epoch, sample ordinal), so a
resumed stream yields identical tensors. With `infinite=True` a finished interleave starts the
next epoch (new file order, new source-choice and block RNGs).

Another number of ranks. A run resumed on P' processes from a checkpoint of P (`hand_over`) cannot continue
each old node's stream, whose part of the data depends on P. Every node's state is in the checkpoint, so each
new node first reads what every old node had left of its epoch, in the old node's order, and keeps record i of
each such rest when i % (new nodes) is its own index: together the new nodes see each of those records once,
with the crop the old node would have drawn (its RNG parts). Then they run whole epochs split the new way,
numbered after the last old one. Exact in data, not in order: the run is not the one P processes would have
made. Every new node reads (undecoded) all the old nodes' rests and decodes its share; a checkpoint written
during a hand-over resumes on the same number of processes only.

Cost to know about: when an interleaved iterator over a hub dataset's parquet shards closes,
datasets sleeps 5 s (`datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN`, a workaround
for apache/arrow#45214) - once per epoch and worker here.
"""

from __future__ import annotations

import copy
import itertools
import logging
import warnings

import numpy as np
import torch

from common.errors import DataError

from .records import open_records
from .resolve import ResolvedSource, as_resolved, resolve_source
from .specs import SourceSpec, parse_source
from .transforms import (
    CROP_MODES,
    INTERPOLATIONS,
    MAX_IMAGE_PIXELS,
    BadImageError,
    eval_transform,
    load_image,
    train_transform,
)

logger = logging.getLogger(__name__)

STATE_VERSION = 1
STOPPING_STRATEGIES = ("first_exhausted", "all_exhausted", "all_exhausted_without_replacement")
MAX_LOGGED_SKIPS = 20  # per source and worker; later bad files are logged at debug level

# Purpose tags keep the RNG streams for file order, source choice, block order and crops apart.
_FILE_ORDER, _MIXING, _BLOCK, _CROP = 1, 2, 3, 4


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (SeedSequence hashing, so nearby parts don't collide)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _unbatch(batch: dict) -> dict:
    return {key: values[0] for key, values in batch.items()}


class ImageStream(torch.utils.data.IterableDataset):
    """Yields {"pixel_values": (3, R, R) float32 in [-1, 1], "source": int64, "skipped": (S,) int64, "key": str}.

    `skipped` counts the bad files of each source skipped since the previously yielded sample of
    this worker (sum it over a batch). `state_dict()` / `load_state_dict()` give an exact resume
    (plain Python types only); StatefulDataLoader calls them per worker.
    """

    def __init__(
        self,
        sources: list[ResolvedSource],
        resolution: int,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_block: int = 1000,
        random_flip: bool = False,
        infinite: bool = True,
        stopping_strategy: str = "all_exhausted",
        max_samples: int | None = None,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        interpolation: str = "bilinear",
        crop_mode: str = "resize",
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if stopping_strategy not in STOPPING_STRATEGIES:
            raise DataError(f"stopping_strategy {stopping_strategy!r} is not one of {list(STOPPING_STRATEGIES)}")
        if interpolation not in INTERPOLATIONS:
            raise DataError(f"interpolation {interpolation!r} is not one of {sorted(INTERPOLATIONS)}")
        if crop_mode not in CROP_MODES:
            raise DataError(f"crop_mode {crop_mode!r} is not one of {list(CROP_MODES)}")
        if shuffle_block < 1 or resolution < 1:
            raise DataError(f"shuffle_block ({shuffle_block}) and resolution ({resolution}) must be >= 1")
        self.sources = sources
        self.source_names = [s.name for s in sources]
        self.resolution = resolution
        self.train = train
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_block = shuffle_block if train else 1
        self.random_flip = random_flip
        self.infinite = infinite
        self.stopping_strategy = stopping_strategy
        self.max_samples = max_samples
        self.max_image_pixels = max_image_pixels
        self.interpolation = interpolation
        self.crop_mode = crop_mode  # train only; eval always resizes + centre-crops
        self._pending: dict | None = None  # a loaded state, used by the next __iter__
        self._live: dict | None = None  # the state of the running iteration
        self._handover: dict | None = None  # what a run on another number of processes left (hand_over)
        self._first_epoch = 0

    # -----------------------------------------------------------------------------------------
    # State
    # -----------------------------------------------------------------------------------------

    def _fresh_state(self) -> dict:
        worker, num_workers = _worker()
        return {
            "version": STATE_VERSION,
            "sources": list(self.source_names),
            "node": {"rank": self.rank, "world_size": self.world_size, "worker": worker, "num_workers": num_workers},
            "seed": self.seed,
            "shuffle_block": self.shuffle_block,
            "epoch": self._first_epoch,
            "block": 0,  # blocks finished in this epoch
            "offset": 0,  # records of the current block consumed (yielded or skipped)
            "upstream": None,  # HF state_dict at the start of the current block; None = epoch start
            "skipped": [0] * len(self.sources),  # bad files per source, this worker, since the start
            "finished": False,
            # The old nodes' states whose epochs this node first helps finish (hand_over); None once done.
            "handover": copy.deepcopy(self._handover),
        }

    def state_dict(self) -> dict:
        state = self._pending or self._live or self._fresh_state()
        return copy.deepcopy(state)

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError(f"not an ImageStream state (version {STATE_VERSION}): keys {sorted(state or {})}")
        self._pending = copy.deepcopy(state)

    def hand_over(self, states: list[dict]) -> None:
        """Continue the data of a run saved with another number of ranks (or workers): `states` are the stream
        states of all its nodes (`node_states` of every rank's loader state). Every stream of the new run first
        yields its share of what those nodes had left of their epochs (together: each of those records once,
        none twice, with the crops the old nodes would have drawn), then whole epochs split the new way,
        numbered after the last old one. Exact in data; the order of the records is not the old run's."""
        if not states:
            raise DataError("no data-stream states to continue from")
        for state in states:
            if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
                raise DataError(f"not an ImageStream state (version {STATE_VERSION})")
            for key, mine in (
                ("sources", self.source_names),
                ("seed", self.seed),
                ("shuffle_block", self.shuffle_block),
            ):
                if state[key] != mine:
                    raise DataError(
                        f"cannot continue the data stream: it was saved with {key}={state[key]} and now has {key}={mine}"
                    )
            if state.get("handover"):
                raise DataError(
                    "the checkpoint was written while its run was still finishing the epoch of an earlier run on "
                    "another number of processes: resume it on the number of processes that wrote it"
                )
        nodes = sorted(copy.deepcopy(states), key=lambda s: (s["node"]["rank"], s["node"]["worker"]))
        self._handover = {"nodes": nodes, "item": 0, "passed": 0}
        self._first_epoch = max(s["epoch"] for s in nodes) + 1
        self._pending = None

    def _start_state(self) -> dict:
        if self._pending is None:
            return self._fresh_state()
        state, self._pending = self._pending, None
        expected = self._fresh_state()
        for key in ("sources", "node", "seed", "shuffle_block"):
            if state[key] != expected[key]:
                raise DataError(
                    f"cannot resume the data stream exactly: it was saved with {key}={state[key]} "
                    f"and now has {key}={expected[key]}"
                )
        return state

    # -----------------------------------------------------------------------------------------
    # Iteration
    # -----------------------------------------------------------------------------------------

    def _node_dataset(self, epoch: int, node: dict):
        """The interleaved raw records of one node (`node`: rank, world_size, worker, num_workers) in `epoch`."""
        import datasets

        # Zero-weight sources are left out (they keep their index in `source_names`); an eval
        # stream reads its single source whatever its weight.
        active = [s for s in self.sources if s.spec.weight > 0 or not self.train]
        parts = [
            open_records(
                s,
                rank=node["rank"],
                world_size=node["world_size"],
                worker=node["worker"],
                num_workers=node["num_workers"],
                max_samples=self.max_samples,
                order_seed=derive_seed(self.seed, _FILE_ORDER, epoch, s.index) if self.train else None,
            )
            for s in active
        ]
        if len(parts) == 1:
            return parts[0]
        total = sum(s.spec.weight for s in active)
        return datasets.interleave_datasets(
            parts,
            probabilities=[s.spec.weight / total for s in active],
            seed=derive_seed(self.seed, _MIXING, *_place(node), epoch),
            stopping_strategy=self.stopping_strategy,
        )

    def _block_order(self, size: int, node: int, num_nodes: int, epoch: int, block: int) -> np.ndarray:
        if not self.train:
            return np.arange(size)
        return np.random.default_rng(derive_seed(self.seed, _BLOCK, node, num_nodes, epoch, block)).permutation(size)

    def _sample(self, record: dict, rng_parts: tuple) -> dict:
        image = load_image(record["bytes"] if record["bytes"] is not None else record["path"], self.max_image_pixels)
        if self.train:
            rng = np.random.default_rng(derive_seed(self.seed, _CROP, *rng_parts))
            pixels = train_transform(
                image,
                self.resolution,
                rng,
                random_flip=self.random_flip,
                interpolation=self.interpolation,
                crop_mode=self.crop_mode,
            )
        else:
            pixels = eval_transform(image, self.resolution, interpolation=self.interpolation)
        return {
            "pixel_values": pixels,
            "source": torch.tensor(record["source"], dtype=torch.int64),
            "key": record["key"],
        }

    def _log_skip(self, state: dict, record: dict, reason: str) -> None:
        count = state["skipped"][record["source"]]
        name = self.source_names[record["source"]]
        level = logging.WARNING if count <= MAX_LOGGED_SKIPS else logging.DEBUG
        logger.log(level, "skipping bad image %r of source '%s': %s", record["key"], name, reason)
        if count == MAX_LOGGED_SKIPS:
            logger.warning("source '%s': %d bad images so far; further ones are logged at debug level", name, count)

    def _epoch_records(self, state: dict, node: dict):
        """(record, crop RNG parts) of `node`'s records in `state`'s epoch, from `state`'s position to the epoch's
        end, in its block-shuffled order; advances `state` (block, offset, upstream) before each record."""
        epoch, (rank, world_size, worker, num_workers) = state["epoch"], _place(node)
        reader, readers = rank * num_workers + worker, world_size * num_workers
        upstream_ds = self._node_dataset(epoch, node)
        if state["upstream"] is not None:
            upstream_ds.load_state_dict(state["upstream"])
        # .iter() rather than iter(): HF's __iter__ would split the data again across the
        # DataLoader workers, and we already gave each worker its own part.
        upstream = upstream_ds.iter(batch_size=1)
        while True:
            records = [_unbatch(batch) for batch in itertools.islice(upstream, self.shuffle_block)]
            if not records:
                return
            next_upstream = upstream_ds.state_dict()  # position after this block
            order = self._block_order(len(records), reader, readers, epoch, state["block"])
            for j in range(state["offset"], len(records)):
                state["offset"] = j + 1
                yield records[order[j]], (reader, readers, epoch, state["block"] * self.shuffle_block + j)
            state.update(block=state["block"] + 1, offset=0, upstream=next_upstream)

    def _handover_records(self, handover: dict, reader: int, readers: int):
        """This reader's share of what the nodes of a run on another number of processes left of their epochs:
        each old node's remaining records in its own order, record i of them kept by reader i % readers.
        Crops are drawn as the old node would have drawn them."""
        while handover["item"] < len(handover["nodes"]):
            old = handover["nodes"][handover["item"]]
            for record, rng_parts in self._epoch_records(old, old["node"]):
                handover["passed"] += 1
                if (handover["passed"] - 1) % readers == reader:
                    yield record, rng_parts
            handover.update(item=handover["item"] + 1, passed=0)

    def _samples(self, records, state: dict, pending: list[int]):
        """Decoded samples of (record, crop RNG parts); bad files skipped and counted in state and pending."""
        for record, rng_parts in records:
            try:
                sample = self._sample(record, rng_parts)
            except BadImageError as error:
                state["skipped"][record["source"]] += 1
                pending[record["source"]] += 1
                # The message only: a log handler keeping the exception would keep its
                # traceback, and with it this generator and its open readers, alive.
                self._log_skip(state, record, str(error))
                continue
            sample["skipped"] = torch.tensor(pending, dtype=torch.int64)
            pending[:] = [0] * len(self.sources)
            yield sample

    def __iter__(self):
        worker, num_workers = _worker()
        if num_workers > 1:
            import fsspec.asyn  # the submodule itself: `import fsspec` alone does not load it

            fsspec.asyn.reset_lock()  # as HF does in workers: a lock forked from the parent can hang
        state = self._live = self._start_state()
        pending = [0] * len(self.sources)
        if state.get("handover"):
            reader, readers = self.rank * num_workers + worker, self.world_size * num_workers
            yield from self._samples(self._handover_records(state["handover"], reader, readers), state, pending)
            state["handover"] = None
        node = state["node"]
        while not state["finished"]:
            epoch, whole_epoch, yielded = state["epoch"], state["block"] == 0 and state["offset"] == 0, 0
            for sample in self._samples(self._epoch_records(state, node), state, pending):
                yielded += 1
                yield sample
            if not self.infinite:
                state["finished"] = True
            elif whole_epoch and yielded == 0:
                # Without this an endless stream would spin through empty epochs forever.
                raise DataError(
                    f"rank {self.rank} worker {worker}: a whole epoch of {self.source_names} gave no "
                    f"usable image ({sum(state['skipped'])} bad files skipped; fewer images than "
                    f"ranks x workers = {self.world_size * num_workers}?)"
                )
            else:
                state.update(epoch=epoch + 1, block=0, offset=0, upstream=None)


def node_states(loader_state: dict) -> list[dict]:
    """The ImageStream state of each DataLoader worker (one, without workers) in a StatefulDataLoader's state_dict."""
    if "dataset_state" in loader_state:
        found = [loader_state["dataset_state"]]
    else:
        found = [
            w.get("dataset_state") for w in loader_state.get("_snapshot", {}).get("_worker_snapshots", {}).values()
        ]
    if not found or any(not isinstance(s, dict) for s in found):
        raise DataError("a data-loader state without the stream state of each of its workers")
    return found


def _place(node: dict) -> tuple[int, int, int, int]:
    return node["rank"], node["world_size"], node["worker"], node["num_workers"]


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------


def _as_specs(sources) -> list[SourceSpec | ResolvedSource]:
    return [parse_source(s) if isinstance(s, str) else s for s in sources]


def build_train_stream(
    sources,
    resolution: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle_block: int = 1000,
    random_flip: bool = False,
    infinite: bool = True,
    stopping_strategy: str = "all_exhausted",
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    interpolation: str = "bilinear",
    crop_mode: str = "resize",
) -> ImageStream:
    """The weighted training mixture for one rank: shuffled, random crops (`crop_mode`), endless by default.

    `sources`: specs (or their strings), resolved here, or ResolvedSource, used as they are."""
    resolved = as_resolved(_as_specs(sources))
    return ImageStream(
        resolved,
        resolution,
        train=True,
        seed=seed,
        rank=rank,
        world_size=world_size,
        shuffle_block=shuffle_block,
        random_flip=random_flip,
        infinite=infinite,
        stopping_strategy=stopping_strategy,
        max_image_pixels=max_image_pixels,
        interpolation=interpolation,
        crop_mode=crop_mode,
    )


def build_eval_stream(
    source: SourceSpec | str,
    resolution: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    max_samples: int | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    interpolation: str = "bilinear",
) -> ImageStream:
    """One source, each image once across ranks and workers, sorted order, center crops.

    `max_samples` keeps the first images of the whole source (before the split across ranks).
    """
    spec = _as_specs([source])[0]
    if max_samples is not None and max_samples < 1:
        raise DataError(f"max_samples must be >= 1, got {max_samples}")
    resolved = resolve_source(spec, 0)
    return ImageStream(
        [resolved],
        resolution,
        train=False,
        rank=rank,
        world_size=world_size,
        infinite=False,
        max_samples=max_samples,
        max_image_pixels=max_image_pixels,
        interpolation=interpolation,
    )


def make_dataloader(stream: ImageStream, batch_size: int, num_workers: int = 0, **kw):
    """A torchdata StatefulDataLoader: its state_dict()/load_state_dict() resume the stream exactly."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    with warnings.catch_warnings():  # torchdata calls torch.set_vital, which this torch deprecates: not ours to fix
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        return StatefulDataLoader(stream, batch_size=batch_size, num_workers=num_workers, **kw)
