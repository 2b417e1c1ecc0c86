"""data/: layouts, mixture statistics, rank split, exact resume, bad files, colour modes, validation.

Everything runs offline on tiny images written into tmp_path.
"""

import io
import itertools
import json
import math
import os
import struct
import tarfile
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from data import (
    BadImageError,
    DataError,
    SourceSpec,
    build_eval_stream,
    build_train_stream,
    check_sources,
    demo_sources,
    detect_kind,
    load_image,
    load_mixture,
    make_dataloader,
    parse_source,
    to_rgb,
)
from data.transforms import eval_transform, train_transform


@pytest.fixture(autouse=True)
def short_arrow_shutdown_sleep(monkeypatch):
    # datasets sleeps 5 s whenever an interleaved iterator over parquet shards closes (a
    # workaround for apache/arrow#45214); fine once per epoch in training, too slow for tests
    # that close dozens of tiny epochs. 0.1 s is the delay reported to avoid the hang.
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.1)


# ---------------------------------------------------------------------------------------------
# Helpers that write tiny images and the ImageNet / COCO / FFHQ folder layouts
# ---------------------------------------------------------------------------------------------


def image_bytes(color=(200, 30, 60), size=(24, 18), fmt="JPEG", mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def textured_bytes(seed: int, size=(24, 18), fmt="JPEG") -> bytes:
    """Noise, so that a different crop or flip gives different pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write(path, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def colour(i: int) -> tuple:
    return (37 * i % 256, 91 * i % 256, 53 * i % 256)


def make_imagenet(root):
    for split, per_class in (("train", 3), ("val", 2)):
        for c, wnid in enumerate(("n01440764", "n01443537")):
            for i in range(per_class):
                write(f"{root}/{split}/{wnid}/{wnid}_{i}.JPEG", image_bytes(colour(10 * c + i)))
    return root


def make_coco(root):
    for split, count in (("train2017", 5), ("val2017", 3), ("test2017", 2)):
        for i in range(count):
            write(f"{root}/{split}/{i:012d}.jpg", image_bytes(colour(i)))
    write(f"{root}/annotations/captions_train2017.json", b"{}")
    return root


FFHQ_CATEGORIES = {0: "training", 1: "validation", 2: "training", 3: "training", 4: "validation", 1000: "training"}


def make_ffhq(root, with_json=True):
    # The json deliberately disagrees with the "first 60000 are training" convention (1 and 4 are
    # validation) so the test proves the json is read; 5.png exists on disk but not in the json.
    metadata = {}
    for index, category in FFHQ_CATEGORIES.items():
        rel = f"images1024x1024/{index // 1000 * 1000:05d}/{index:05d}.png"
        write(f"{root}/{rel}", image_bytes(colour(index), fmt="PNG"))
        metadata[str(index)] = {"category": category, "image": {"file_path": rel, "pixel_size": [24, 18]}}
    write(f"{root}/images1024x1024/00000/00005.png", image_bytes(colour(5), fmt="PNG"))
    if with_json:
        write(f"{root}/ffhq-dataset-v2.json", json.dumps(metadata).encode())
    return root


def make_folder(root):
    write(f"{root}/a.jpg", image_bytes(colour(1)))
    write(f"{root}/b.png", image_bytes(colour(2), fmt="PNG"))
    write(f"{root}/c.webp", image_bytes(colour(3), fmt="WEBP"))
    write(f"{root}/sub/d.JPG", image_bytes(colour(4)))
    write(f"{root}/sub/deeper/e.bmp", image_bytes(colour(5), fmt="BMP"))
    write(f"{root}/README.txt", b"not an image, not listed")
    write(f"{root}/.hidden.jpg", image_bytes(colour(6)))
    return root


def make_parquet(root, files=2, rows=4, row_group_size=None, bad_rows=()):
    for f in range(files):
        images = []
        for r in range(rows):
            data = b"not an image" if (f, r) in bad_rows else textured_bytes(10 * f + r)
            images.append({"bytes": data, "path": f"pq{f}_{r}.jpg"})
        table = pa.table({"image": images, "label": list(range(rows))})
        os.makedirs(root, exist_ok=True)
        pq.write_table(table, f"{root}/part-{f:03d}.parquet", row_group_size=row_group_size or rows)
    return f"{root}/*.parquet"


def make_webdataset(root, shards=2, per_shard=3, bad_members=()):
    os.makedirs(root, exist_ok=True)
    for s in range(shards):
        with tarfile.open(f"{root}/shard-{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"s{s}_{i:04d}"
                data = b"garbage" if (s, i) in bad_members else textured_bytes(100 + 20 * s + i)
                for name, payload in ((f"{key}.jpg", data), (f"{key}.cls", str(i).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return f"{root}/*.tar"


def keys_of(stream):
    return [sample["key"] for sample in stream]


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "kind", "split", "expected"),
    [
        ("imagenet", "imagenet", "train", 6),
        ("imagenet", "imagenet", "val", 4),
        ("coco", "coco", "train2017", 5),
        ("coco", "coco", "val", 3),
        ("ffhq", "ffhq", "training", 4),
        ("ffhq", "ffhq", "validation", 2),
        ("folder", "folder", "train", 5),
        ("parquet", "parquet", "train", 8),
        ("webdataset", "webdataset", "train", 6),
    ],
)
def test_each_layout_reads_every_image_once(tmp_path, layout, kind, split, expected):
    makers = {
        "imagenet": make_imagenet,
        "coco": make_coco,
        "ffhq": make_ffhq,
        "folder": make_folder,
        "parquet": make_parquet,
        "webdataset": make_webdataset,
    }
    path = makers[layout](str(tmp_path / layout))
    assert detect_kind(path) == kind
    keys = keys_of(build_eval_stream(SourceSpec(layout, path, split=split), 16))
    assert len(keys) == expected
    assert len(set(keys)) == expected
    if layout == "ffhq":
        wanted = {i for i, c in FFHQ_CATEGORIES.items() if c == split}
        assert {int(os.path.basename(k)[:5]) for k in keys} == wanted
    if layout == "folder":
        assert sorted(keys) == ["a.jpg", "b.png", "c.webp", "sub/d.JPG", "sub/deeper/e.bmp"]


def test_every_kind_is_resolved_read_and_sampled_through_the_one_table():
    # Each place that branches per kind looks up the kind's reader in data/kinds.py: a kind whose
    # reader one of them does not know would fail only when a user first names it.
    from data import kinds, records, resolve, sample

    assert set(kinds.KINDS) == {"auto"} | {k.name for k in kinds.TABLE}
    assert kinds.FOLDER_KINDS == ("folder", "imagenet", "coco", "ffhq")
    for kind in kinds.TABLE:
        assert kind.reader in resolve._RESOLVERS, kind.name
        if kind.reader is not None:
            assert kind.reader in records._OPENERS and kind.reader in sample._SAMPLERS, kind.name
    with pytest.raises(DataError, match="unknown kind 'zip'"):
        kinds.kind_of("zip", "odd")
    with pytest.raises(DataError, match="resolved into another kind"):
        kinds.reader_of("hub_snapshot")


def test_ffhq_without_json_uses_index_convention(tmp_path):
    root = make_ffhq(str(tmp_path / "FFHQ"), with_json=False)
    train = keys_of(build_eval_stream(SourceSpec("ffhq", root, split="train"), 16))
    assert sorted(int(os.path.basename(k)[:5]) for k in train) == [0, 1, 2, 3, 4, 5, 1000]  # all < 60000
    with pytest.raises(DataError, match="no image files"):
        check_sources([SourceSpec("ffhq", root, split="validation")])


def test_eval_stream_is_sorted_center_crop_and_deterministic(tmp_path):
    root = str(tmp_path / "imgs")
    half = np.zeros((16, 32, 3), np.uint8)
    half[:, 16:] = 255  # left half black, right half white
    write(f"{root}/x.png", b"")
    Image.fromarray(half).save(f"{root}/x.png")
    first = list(build_eval_stream(SourceSpec("x", root), 16))
    second = list(build_eval_stream(SourceSpec("x", root), 16))
    pixels = first[0]["pixel_values"]
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    # Center crop of width 16 from 32: columns 8..23 -> 8 black columns then 8 white ones.
    assert torch.all(pixels[:, :, :8] == -1) and torch.all(pixels[:, :, 8:] == 1)
    assert torch.equal(pixels, second[0]["pixel_values"])


# ---------------------------------------------------------------------------------------------
# Mixture statistics and the split across ranks / workers
# ---------------------------------------------------------------------------------------------


def test_mixture_proportions_match_weights(tmp_path):
    weights = {"big": 6.0, "mid": 3.0, "small": 1.0}
    sources = []
    for i, name in enumerate(weights):
        for j in range(20):  # epochs of ~200 samples: the 2000 draws span ~10 epochs
            write(str(tmp_path / name / f"{j}.png"), image_bytes(colour(i * 20 + j), size=(8, 8), fmt="PNG"))
        sources.append(SourceSpec(name, str(tmp_path / name), weight=weights[name]))
    stream = build_train_stream(sources, 8, seed=3, shuffle_block=16)
    n = 2000
    counts = np.zeros(3, int)
    for _, sample in zip(range(n), stream, strict=False):  # the stream is endless
        counts[int(sample["source"])] += 1
    total = sum(weights.values())
    for count, weight in zip(counts, weights.values(), strict=True):
        p = weight / total
        sigma = math.sqrt(n * p * (1 - p))
        # 4.5 binomial standard deviations: a correct sampler fails this once in ~150,000 runs.
        assert abs(count - n * p) < 4.5 * sigma, (counts, p)


@pytest.fixture
def finite_sources(tmp_path):
    folder = str(tmp_path / "folder")
    for i in range(7):
        write(f"{folder}/{i}.jpg", image_bytes(colour(i)))
    # One file and one row group: fewer shards than nodes -> the example-level split path.
    parquet = make_parquet(str(tmp_path / "pq"), files=1, rows=5)
    webdataset = make_webdataset(str(tmp_path / "wds"), shards=2, per_shard=3)  # shard-level path
    return [
        SourceSpec("folder", folder, weight=2.0),
        SourceSpec("pq", parquet, weight=1.0),
        SourceSpec("wds", webdataset, weight=1.0),
    ]


def test_two_ranks_disjoint_and_union_is_everything(finite_sources):
    def rank_keys(rank, world_size):
        stream = build_train_stream(
            finite_sources,
            16,
            seed=5,
            rank=rank,
            world_size=world_size,
            infinite=False,
            shuffle_block=4,
            stopping_strategy="all_exhausted_without_replacement",
        )
        return [f"{int(s['source'])}:{s['key']}" for s in stream]

    everything = rank_keys(0, 1)
    assert len(everything) == 7 + 5 + 6 == len(set(everything))
    rank0, rank1 = rank_keys(0, 2), rank_keys(1, 2)
    assert len(rank0) == len(set(rank0)) and len(rank1) == len(set(rank1))
    assert not set(rank0) & set(rank1)
    assert set(rank0) | set(rank1) == set(everything)
    assert rank0 and rank1


def test_dataloader_workers_split_a_rank_without_loss_or_duplicates(finite_sources):
    def loader_keys(num_workers):
        stream = build_train_stream(
            finite_sources,
            16,
            rank=1,
            world_size=2,
            infinite=False,
            shuffle_block=4,
            stopping_strategy="all_exhausted_without_replacement",
        )
        return [k for batch in make_dataloader(stream, batch_size=2, num_workers=num_workers) for k in batch["key"]]

    single, double = loader_keys(0), loader_keys(2)
    assert len(double) == len(set(double))
    assert sorted(single) == sorted(double)


def test_fewer_webdataset_shards_than_readers_are_split_by_sample(tmp_path):
    """2 shards for up to 2 ranks x 3 DataLoader workers: each reader keeps its own samples of a shard, so
    every sample is read once in an epoch, none by two readers (readers never share a whole shard)."""
    from data.records import open_records
    from data.resolve import resolve_source

    src = resolve_source(SourceSpec("wds", make_webdataset(str(tmp_path / "wds"), shards=2, per_shard=5)))
    everything = sorted(r["key"] for r in open_records(src))
    assert len(everything) == 10
    # (4, 2): 8 readers of 5-sample shards, reader k of n keeping index k mod n of a shard: some get none.
    for world_size, num_workers, all_busy in ((2, 3, True), (3, 1, True), (4, 2, False)):
        parts = [
            [r["key"] for r in open_records(src, rank=rank, world_size=world_size, worker=w, num_workers=num_workers)]
            for rank in range(world_size)
            for w in range(num_workers)
        ]
        assert sorted(itertools.chain(*parts)) == everything, (world_size, num_workers)  # each sample once
        assert all(parts) == all_busy


@pytest.mark.parametrize("kind", ["folder", "parquet"])
def test_eval_ranks_split_the_first_max_samples(tmp_path, kind):
    if kind == "folder":
        path = str(tmp_path / "f")
        for i in range(9):
            write(f"{path}/{i}.png", image_bytes(colour(i), fmt="PNG"))
        first = [f"{i}.png" for i in range(5)]
    else:
        path = make_parquet(str(tmp_path / "p"), files=3, rows=3)
        first = [f"e/part-{f:03d}.parquet/{r}:pq{f}_{r}.jpg" for f in range(3) for r in range(3)][:5]
    spec = SourceSpec("e", path)
    parts = [keys_of(build_eval_stream(spec, 16, rank=r, world_size=2, max_samples=5)) for r in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(first)
    assert parts[0] == keys_of(build_eval_stream(spec, 16, rank=0, world_size=2, max_samples=5))  # deterministic


def test_hub_branch_with_a_decoding_image_feature(tmp_path):
    # No network here: stand in for a hub dataset with a local streaming dataset whose column has
    # HF's Image feature (decode=True), as hub datasets do. The stream must keep the bytes
    # (cast to decode=False) and still split it across ranks.
    import datasets

    from data.resolve import ResolvedSource
    from data.stream import ImageStream

    make_parquet(str(tmp_path / "pq"), files=2, rows=3)
    files = sorted(str(p) for p in (tmp_path / "pq").glob("*.parquet"))
    hub = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
    hub = hub.cast_column("image", datasets.Image())
    spec = SourceSpec("hubby", "someone/something", kind="hub")
    parts = []
    for rank in range(2):
        src = ResolvedSource(spec, 0, "hub", hub=hub, image_columns=["image"])
        parts.append(keys_of(ImageStream([src], 16, train=False, rank=rank, world_size=2, infinite=False)))
    assert not set(parts[0]) & set(parts[1])
    assert all(key.startswith(f"hubby/part{rank}of2/") for rank in range(2) for key in parts[rank])
    originals = sorted(key.split(":", 1)[1] for key in parts[0] + parts[1])
    assert originals == sorted(f"pq{f}_{r}.jpg" for f in range(2) for r in range(3))


# ---------------------------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def resume_sources(tmp_path):
    folder = str(tmp_path / "folder")
    for i in range(6):
        write(f"{folder}/{i}.jpg", textured_bytes(200 + i, size=(20 + i, 17 + i % 3)))
    write(f"{folder}/bad.jpg", b"")  # a skip inside the stream, so skip counts are resumed too
    # One parquet row group: with 2 workers it takes the example-level split (filter with
    # indices); the 2 tar shards take the shard-level split.
    parquet = make_parquet(str(tmp_path / "pq"), files=1, rows=6, bad_rows={(0, 4)})
    webdataset = make_webdataset(str(tmp_path / "wds"), shards=2, per_shard=2)
    return [
        SourceSpec("folder", folder, weight=0.5),
        SourceSpec("pq", parquet, weight=0.3),
        SourceSpec("wds", webdataset, weight=0.2),
    ]


def _batches(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_same(expected, actual):
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual, strict=True):
        assert a["key"] == b["key"]
        assert torch.equal(a["source"], b["source"])
        assert torch.equal(a["skipped"], b["skipped"])
        assert torch.equal(a["pixel_values"], b["pixel_values"])


def _roundtrip(state, tmp_path):
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return torch.load(path, weights_only=True)  # plain Python types only


@pytest.mark.parametrize(("num_workers", "persistent"), [(0, False), (2, False), (2, True)])
def test_resume_twice_gives_the_same_batches(resume_sources, tmp_path, num_workers, persistent):
    def loader():
        stream = build_train_stream(resume_sources, 16, seed=11, shuffle_block=5, random_flip=True)
        return make_dataloader(stream, batch_size=3, num_workers=num_workers, persistent_workers=persistent)

    k1, k2, rest = 4, 5, 6  # 45 samples: several blocks and epochs (about 16 records per epoch)
    reference = iter(loader())
    _batches(reference, k1)
    expected = _batches(reference, k2 + rest)
    assert sum(int(b["skipped"].sum()) for b in expected) > 0

    first = loader()
    first_iter = iter(first)
    _batches(first_iter, k1)
    state = _roundtrip(first.state_dict(), tmp_path)
    del first_iter, first

    second = loader()
    second.load_state_dict(state)
    second_iter = iter(second)
    _assert_same(expected[:k2], _batches(second_iter, k2))
    state = _roundtrip(second.state_dict(), tmp_path)
    del second_iter, second

    third = loader()
    third.load_state_dict(state)
    _assert_same(expected[k2:], _batches(iter(third), rest))
    if num_workers == 0:  # the resumed stretch crossed epoch boundaries (reshuffled file order, new RNGs)
        assert state["dataset_state"]["epoch"] >= 1 and third.state_dict()["dataset_state"]["epoch"] >= 2


@pytest.mark.parametrize(
    ("taken", "new_world"), [((3, 4), 1), ((5,), 2), ((3, 14), 1)], ids=["2to1", "1to2", "2to1_other_epochs"]
)
def test_resume_on_another_number_of_ranks_sees_each_image_of_the_epoch_once(tmp_path, taken, new_world):
    """Old ranks stopped mid-epoch; the new ranks first share out what each old rank had left of its epoch (each
    of those images once, with the crop the old rank would have drawn), then run whole epochs split the new way.
    A state saved in the middle of that hand-over resumes exactly. (In "other_epochs" one old rank is two
    epochs further on, whose file order differs: its rest may repeat images of the other's, as it would have.)"""
    folder = str(tmp_path / "images")
    for i in range(12):
        write(f"{folder}/{i:02d}.jpg", textured_bytes(300 + i, size=(21 + i % 4, 19)))
    old_world, per_epoch, everything = len(taken), 12 // len(taken), sorted(f"{i:02d}.jpg" for i in range(12))

    def stream(rank, world):
        return build_train_stream([folder], 16, seed=3, rank=rank, world_size=world, shuffle_block=4)

    states, consumed, left = [], [], []  # left: (key, pixels) each old rank would still yield in its epoch
    for rank, count in enumerate(taken):
        old = stream(rank, old_world)
        iterator = iter(old)
        consumed += [s["key"] for s in _batches(iterator, count)[count - count % per_epoch :]]
        states.append(_roundtrip(old.state_dict(), tmp_path))
        left += [(s["key"], s["pixel_values"]) for s in _batches(iterator, per_epoch - count % per_epoch)]
    if len({s["epoch"] for s in states}) == 1:  # one epoch: what was consumed and what is left are all of it
        assert sorted(consumed + [key for key, _ in left]) == everything

    handed, following = [], []
    for rank in range(new_world):
        new = stream(rank, new_world)
        new.hand_over(states)
        share = sum(len(range(rank, per_epoch - count % per_epoch, new_world)) for count in taken)
        iterator = iter(new)
        first = _batches(iterator, 1)
        saved = _roundtrip(new.state_dict(), tmp_path)
        rest = _batches(iterator, share - 1 + 12 // new_world)
        again = stream(rank, new_world)
        again.load_state_dict(saved)  # saved during the hand-over: continues it exactly
        _assert_same(rest, _batches(iter(again), len(rest)))
        handed += (first + rest)[:share]
        following += [s["key"] for s in rest[share - 1 :]]
        assert new.state_dict()["epoch"] == max(s["epoch"] for s in states) + 1
    for sample in handed:  # each image left once, none twice, cropped as the old rank would have
        match = [i for i, (key, pixels) in enumerate(left) if key == sample["key"]]
        match = [i for i in match if torch.equal(left[i][1], sample["pixel_values"])]
        assert match, sample["key"]
        left.pop(match[0])
    assert not left
    assert sorted(following) == everything  # then whole epochs split across the new ranks


def test_hand_over_refuses_another_stream(tmp_path):
    folder = str(tmp_path / "images")
    for i in range(4):
        write(f"{folder}/{i}.jpg", textured_bytes(i))
    old = build_train_stream([folder], 16, seed=1, shuffle_block=4)
    next(iter(old))
    with pytest.raises(DataError, match="saved with seed=1 and now has seed=2"):
        build_train_stream([folder], 16, seed=2, shuffle_block=4).hand_over([old.state_dict()])
    in_hand_over = build_train_stream([folder], 16, seed=1, shuffle_block=4)
    in_hand_over.hand_over([old.state_dict()])
    with pytest.raises(DataError, match="resume it on the number of processes that wrote it"):
        build_train_stream([folder], 16, seed=1, shuffle_block=4).hand_over([in_hand_over.state_dict()])


def test_stream_state_is_plain_python_and_mismatch_is_refused(resume_sources):
    stream = build_train_stream(resume_sources, 16, seed=1, shuffle_block=5)
    iterator = iter(stream)
    for _ in range(7):
        next(iterator)
    state = stream.state_dict()

    def check(value):
        if isinstance(value, dict):
            assert all(isinstance(k, str) for k in value)
            for v in value.values():
                check(v)
        elif isinstance(value, list):
            for v in value:
                check(v)
        else:
            assert value is None or type(value) in (int, float, str, bool), type(value)

    check(state)
    other = build_train_stream(resume_sources, 16, seed=1, shuffle_block=6)
    other.load_state_dict(state)
    with pytest.raises(DataError, match="shuffle_block"):
        next(iter(other))


# ---------------------------------------------------------------------------------------------
# A downloaded Hub dataset (`hf download ID --repo-type dataset --local-dir DIR`)
# ---------------------------------------------------------------------------------------------

HUB_CARD = """---
license: other
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: validation
    path: data/validation-*
dataset_info:
  features:
  - name: image
    dtype: image
  - name: label
    dtype: int64
---

# A dataset card
"""
SNAPSHOT_ROWS = {"train": (4, 3), "validation": (5,)}  # rows per shard


def make_hub_snapshot(root, card=True):
    """What `hf download` leaves: a dataset card, shards named the Hub's way under data/, hf's hidden .cache/.

    Every image is different; its stored path names its split, shard and row ('train_1_2.jpg')."""
    for s, (split, shards) in enumerate(SNAPSHOT_ROWS.items()):
        for shard, rows in enumerate(shards):
            images = [
                {"bytes": textured_bytes(500 + 100 * s + 10 * shard + r), "path": f"{split}_{shard}_{r}.jpg"}
                for r in range(rows)
            ]
            table = pa.table({"image": images, "label": list(range(rows))})
            os.makedirs(f"{root}/data", exist_ok=True)
            pq.write_table(table, f"{root}/data/{split}-{shard:05d}-of-{len(shards):05d}.parquet", row_group_size=2)
    write(f"{root}/.gitattributes", b"*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    write(f"{root}/.cache/huggingface/download/data/train-00000-of-00002.parquet.metadata", b"0123abcd\n")
    if card:
        write(f"{root}/README.md", HUB_CARD.encode())
    return root


def snapshot_images(split):
    return sorted(f"{split}_{shard}_{r}.jpg" for shard, rows in enumerate(SNAPSHOT_ROWS[split]) for r in range(rows))


def originals(keys):
    """The stored image paths behind record keys '<source>/<shard>/<row>:<original>'."""
    return sorted(key.split(":", 1)[1] for key in keys)


@pytest.mark.parametrize("card", [True, False])
def test_hub_snapshot_is_found_by_its_path_and_read_by_split(tmp_path, card):
    root = make_hub_snapshot(str(tmp_path / "in1k"), card=card)
    assert detect_kind(root) == "hub_snapshot"
    validation = keys_of(build_eval_stream(parse_source(f"path={root},split=validation"), 16))
    assert originals(validation) == snapshot_images("validation")
    assert all(k.startswith("in1k/validation-00000-of-00001.parquet/") for k in validation)
    # The path alone, as `--source /data/in1k` gives it: training reads the train split, only it.
    train = keys_of(build_train_stream([parse_source(root)], 16, infinite=False, shuffle_block=3))
    assert originals(train) == snapshot_images("train") and len(train) == len(set(train))
    # The trainer's held-out sample of `--validation_source path=...,split=validation`.
    from data import sample_images

    _, held_out = sample_images([parse_source(f"path={root},split=validation")], 3, 16)
    assert set(originals(held_out)) < set(snapshot_images("validation"))
    with pytest.raises(DataError) as info:
        check_sources([parse_source(f"name=in1k,path={root},split=val")])
    message = str(info.value)
    assert "'val'" in message and "its splits: train, validation" in message and "\n" not in message, message


def test_only_hub_named_or_carded_parquet_folders_are_snapshots(tmp_path):
    make_parquet(str(tmp_path / "plain"))  # part-000.parquet: all shards, as before
    write(str(tmp_path / "plain" / "README.md"), b"# my shards\n\nNo YAML header.\n")
    assert detect_kind(str(tmp_path / "plain")) == "parquet"
    assert len(keys_of(build_eval_stream(SourceSpec("plain", str(tmp_path / "plain")), 16))) == 8
    images = make_folder(str(tmp_path / "images"))
    write(f"{images}/README.md", b"---\ntitle: photos\n---\n")  # a YAML header, but no dataset card keys
    assert detect_kind(images) == "folder"
    # Shards named the Hub's way are enough, in the root or a few folders down.
    nested = make_hub_snapshot(str(tmp_path / "nested" / "default"), card=False)
    assert detect_kind(str(tmp_path / "nested")) == detect_kind(f"{nested}/data") == "hub_snapshot"
    # A dataset card is enough, whatever the shards are called (here as the Hub's parquet conversion names them).
    converted = str(tmp_path / "converted")
    make_parquet(f"{converted}/default/train", files=2, rows=2)
    make_parquet(f"{converted}/default/validation", files=1, rows=3)
    card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: default/train/*.parquet\n"
    write(
        f"{converted}/README.md",
        (card + "  - split: validation\n    path: default/validation/*.parquet\n---\n").encode(),
    )
    assert detect_kind(converted) == "hub_snapshot"
    assert len(keys_of(build_eval_stream(SourceSpec("c", converted, split="validation"), 16))) == 3
    # kind=hub_snapshot on a folder without data files, or with an unknown config: one line.
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot read the Hub dataset folder") as info:
        check_sources([SourceSpec("empty", str(tmp_path / "empty"), kind="hub_snapshot")])
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="nope") as info:
        check_sources([SourceSpec("snap", nested, config="nope")])
    assert "\n" not in str(info.value)


def test_hub_snapshot_trains_on_disjoint_rank_parts_and_resumes_exactly(tmp_path):
    spec = SourceSpec("snap", make_hub_snapshot(str(tmp_path / "snap")))  # kind auto, split train

    def rank_keys(rank, world_size):
        stream = build_train_stream([spec], 16, seed=2, rank=rank, world_size=world_size, infinite=False)
        return keys_of(stream)

    everything = rank_keys(0, 1)
    assert originals(everything) == snapshot_images("train")
    for world_size in (2, 3):  # 2 shards for 2 ranks; row groups for 3
        parts = [rank_keys(r, world_size) for r in range(world_size)]
        assert all(parts) and sorted(itertools.chain(*parts)) == sorted(everything)
        assert sum(len(p) for p in parts) == len(everything)  # disjoint

    def stream():
        return build_train_stream([spec], 16, seed=2, rank=1, world_size=2, shuffle_block=2, random_flip=True)

    reference = list(itertools.islice(iter(stream()), 11))  # about 3 epochs of rank 1's shard
    first = stream()
    iterator = iter(first)
    for _ in range(5):
        next(iterator)
    state = _roundtrip(first.state_dict(), tmp_path)
    assert state["epoch"] >= 1 and state["offset"] > 0  # mid-block, past an epoch boundary
    resumed = stream()
    resumed.load_state_dict(state)
    _assert_same(reference[5:], list(itertools.islice(iter(resumed), 6)))


def test_count_records_is_what_each_rank_reads(tmp_path):
    from data import count_records
    from data.resolve import resolve_source

    root = make_hub_snapshot(str(tmp_path / "snap"))
    specs = [SourceSpec("snap", root, split=split) for split in SNAPSHOT_ROWS]
    specs.append(SourceSpec("one", make_parquet(str(tmp_path / "one"), files=1, rows=5)))  # one row group: by rows
    specs.append(SourceSpec("folder", make_folder(str(tmp_path / "folder"))))
    for spec in specs:
        src = resolve_source(spec)
        for world_size, max_samples in itertools.product((1, 2, 3), (None, 3)):
            for rank in range(world_size):
                stream = build_eval_stream(spec, 16, rank=rank, world_size=world_size, max_samples=max_samples)
                counted = count_records(src, rank=rank, world_size=world_size, max_samples=max_samples)
                assert counted == len(keys_of(stream)), (spec.name, spec.split, world_size, max_samples, rank)
    tars = resolve_source(SourceSpec("wds", make_webdataset(str(tmp_path / "wds"))))
    assert count_records(tars) is None  # a tar has no index


def test_hub_snapshot_in_another_format_is_read_by_datasets(tmp_path):
    root = str(tmp_path / "imgs")
    for split, count in (("train", 3), ("test", 2)):
        for i in range(count):
            write(f"{root}/{split}/{i}.png", image_bytes(colour(10 * count + i), fmt="PNG"))
    card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: train/*\n"
    write(f"{root}/README.md", (card + "  - split: test\n    path: test/*\n---\n").encode())
    assert detect_kind(root) == "hub_snapshot"  # its card wins over the train/ folder
    keys = keys_of(build_eval_stream(SourceSpec("imgs", root, split="test"), 16))
    assert sorted(k.rsplit("/", 2)[1:] for k in keys) == [["test", "0.png"], ["test", "1.png"]]


# ---------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------


def test_bad_files_are_skipped_and_counted_per_source(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write(f"{a}/bomb.png", image_bytes(colour(5), size=(40, 40), fmt="PNG"))  # 1600 px > limit below
    write(f"{a}/good1.jpg", image_bytes(colour(1), size=(20, 20)))
    write(f"{a}/good2.png", image_bytes(colour(2), size=(20, 20), fmt="PNG"))
    write(f"{a}/png_named.jpg", image_bytes(colour(3), size=(20, 20), fmt="PNG"))  # wrong extension: fine
    write(f"{a}/text.png", b"hello, I am text with an image extension\n")
    write(f"{a}/truncated.jpg", textured_bytes(4, size=(64, 64))[:400])
    write(f"{a}/zero.jpg", b"")
    write(f"{a}/zz.jpg", image_bytes(colour(6), size=(20, 20)))
    write(f"{b}/good.jpg", image_bytes(colour(7), size=(20, 20)))
    write(f"{b}/zero.jpeg", b"")

    # Sorted order (eval stream): each sample reports the bad files skipped just before it.
    stream = build_eval_stream(SourceSpec("a", a), 16, max_image_pixels=1000)
    samples = list(stream)
    assert [(s["key"], int(s["skipped"][0])) for s in samples] == [
        ("good1.jpg", 1),
        ("good2.png", 0),
        ("png_named.jpg", 0),
        ("zz.jpg", 3),
    ]
    assert stream.state_dict()["skipped"] == [4]

    # A mixture through the DataLoader: counted per source.
    stream = build_train_stream(
        [SourceSpec("a", a), SourceSpec("b", b)],
        16,
        infinite=False,
        max_image_pixels=1000,
        stopping_strategy="all_exhausted_without_replacement",
    )
    batches = list(make_dataloader(stream, batch_size=2))
    assert sorted(k for batch in batches for k in batch["key"]) == [
        "good.jpg",
        "good1.jpg",
        "good2.png",
        "png_named.jpg",
        "zz.jpg",
    ]
    assert stream.state_dict()["skipped"] == [4, 1]
    reported = sum(batch["skipped"].sum(0) for batch in batches).tolist()
    assert reported[0] <= 4 and reported[1] <= 1 and sum(reported) >= 3  # all but any trailing skips


def test_bad_records_in_parquet_and_webdataset_are_skipped(tmp_path):
    parquet = make_parquet(str(tmp_path / "pq"), files=1, rows=4, bad_rows={(0, 1)})
    tars = make_webdataset(str(tmp_path / "wds"), shards=1, per_shard=4, bad_members={(0, 2)})
    for spec, good in ((SourceSpec("pq", parquet), 3), (SourceSpec("wds", tars), 3)):
        stream = build_eval_stream(spec, 16)
        samples = list(stream)
        assert len(samples) == good
        assert stream.state_dict()["skipped"] == [1]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"just text", "UnidentifiedImageError"),
        (image_bytes(size=(64, 64))[:200], "(?i)truncated"),
    ],
)
def test_load_image_rejects_bad_bytes(data, reason):
    with pytest.raises(BadImageError, match=reason):
        load_image(data)


def test_pil_decompression_bomb_warning_is_a_skip(monkeypatch):
    data = image_bytes(size=(40, 40), fmt="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 px: PIL warns (between 1x and 2x)
    with pytest.raises(BadImageError, match="DecompressionBomb"):
        load_image(data, max_pixels=10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 px: PIL raises
    with pytest.raises(BadImageError, match="DecompressionBomb"):
        load_image(data, max_pixels=10**9)


# ---------------------------------------------------------------------------------------------
# Colour modes
# ---------------------------------------------------------------------------------------------


def pixel(img):
    return tuple(int(v) for v in np.asarray(img)[0, 0])


def png16(width, height, color_type, samples):
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB)."""

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    rows = np.asarray(samples, dtype=">u2").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_modes_convert_to_the_right_rgb():
    assert pixel(to_rgb(Image.new("L", (2, 2), 77))) == (77, 77, 77)
    assert pixel(to_rgb(Image.new("1", (2, 2), 1))) == (255, 255, 255)
    assert pixel(to_rgb(Image.new("LA", (2, 2), (100, 0)))) == (255, 255, 255)  # transparent -> white
    assert pixel(to_rgb(Image.new("LA", (2, 2), (100, 255)))) == (100, 100, 100)
    r, g, b = pixel(to_rgb(Image.new("RGBA", (2, 2), (200, 0, 0, 128))))  # 128/255 over white
    assert abs(r - (200 * 128 + 255 * 127) / 255) <= 1 and abs(g - 255 * 127 / 255) <= 1 and g == b
    assert pixel(to_rgb(Image.new("RGBA", (2, 2), (10, 20, 30, 255)))) == (10, 20, 30)
    assert pixel(to_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0)))) == (255, 0, 0)
    assert pixel(to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 255)))) == (0, 0, 0)

    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 200, 30, 250, 0, 5] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert [tuple(p) for p in np.asarray(to_rgb(palette))[0]] == [(10, 200, 30), (250, 0, 5)]
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=1)  # index 1 transparent
    assert [tuple(p) for p in np.asarray(load_image(buffer.getvalue()))[0]] == [(10, 200, 30), (255, 255, 255)]

    values = np.array([[0, 2570, 32896, 65535]], dtype=np.uint16)  # /257 = 0, 10, 128, 255
    for img in (Image.fromarray(values), Image.fromarray(values.astype(np.int32), mode="I")):
        assert [p[0] for p in np.asarray(to_rgb(img))[0]] == [0, 10, 128, 255]
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")  # 16-bit grayscale PNG
    assert [p[0] for p in np.asarray(load_image(buffer.getvalue()))[0]] == [0, 10, 128, 255]

    rgb16 = load_image(png16(2, 1, 2, [65535, 0, 32896, 2570, 51400, 300]))
    assert np.abs(np.asarray(rgb16, dtype=float)[0] - np.array([[255, 0, 128], [10, 200, 1.17]])).max() <= 1


def test_animated_gif_uses_first_frame_and_exif_is_applied():
    frames = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    first = load_image(buffer.getvalue())
    assert first.mode == "RGB" and pixel(first) == (255, 0, 0)

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), (0, 128, 0)).save(buffer, format="JPEG", exif=exif)
    assert load_image(buffer.getvalue()).size == (10, 20)


def test_tiny_images_are_upscaled_and_transforms_are_deterministic():
    one = load_image(image_bytes((10, 20, 30), size=(1, 1), fmt="PNG"))
    expected = torch.tensor([10, 20, 30], dtype=torch.float32).div(127.5).sub(1).view(3, 1, 1).expand(3, 16, 16)
    assert torch.allclose(eval_transform(one, 16), expected, atol=1e-6)
    assert torch.allclose(train_transform(one, 16, np.random.default_rng(0)), expected, atol=1e-6)

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    a = train_transform(noise, 16, np.random.default_rng(1), random_flip=True)
    b = train_transform(noise, 16, np.random.default_rng(1), random_flip=True)
    assert a.shape == (3, 16, 16) and torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    crops = {train_transform(noise, 16, np.random.default_rng(s)).sum().item() for s in range(8)}
    assert len(crops) > 1  # the crop position really is random


# ---------------------------------------------------------------------------------------------
# Configuration: parsing, mixtures, validation
# ---------------------------------------------------------------------------------------------


def test_parse_source_and_mixtures(tmp_path):
    spec = parse_source("name=coco,path=/data/COCO,weight=0.1,split=train")
    assert spec == SourceSpec("coco", "/data/COCO", weight=0.1, split="train")
    assert parse_source("/data/ImageNet").name == "ImageNet"
    with pytest.raises(DataError, match="unknown key"):
        parse_source("name=x,path=/y,wieght=2")

    specs = load_mixture("transfusion", data_root="/mnt/data")
    assert [(s.name, s.kind, s.split, s.weight) for s in specs] == [
        ("imagenet", "imagenet", "train", 1281167),
        ("coco", "coco", "train2017", 118287),
        ("ffhq", "ffhq", "training", 60000),
    ]
    assert specs[0].path == "/mnt/data/ImageNet"
    assert all(s.kind == "hub" for s in load_mixture("transfusion_hub"))
    with pytest.raises(DataError, match="data root"):
        load_mixture("transfusion")
    bad = tmp_path / "mix.yaml"
    bad.write_text("sources:\n  - {path: /x, weigth: 1}\n")
    with pytest.raises(DataError, match="unknown key"):
        load_mixture(str(bad))


def test_check_sources_errors_are_one_line(tmp_path):
    make_folder(str(tmp_path / "ok"))
    ok = SourceSpec("ok", str(tmp_path / "ok"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    cases = [
        ([SourceSpec("gone", str(tmp_path / "missing"))], "does not exist"),
        ([SourceSpec("empty", str(tmp_path / "empty"))], "no image files"),
        ([ok, SourceSpec("neg", str(tmp_path / "ok"), weight=-1.0)], "weight"),
        ([SourceSpec("zero", str(tmp_path / "ok"), weight=0.0)], "sum to more than 0"),
        ([SourceSpec("odd", str(tmp_path / "ok"), kind="zip")], "unknown kind"),
        ([SourceSpec("hub", "no-such-user/no-such-dataset")], "unreachable"),
        ([SourceSpec("coco", make_coco(str(tmp_path / "COCO")), split="train2014")], "split"),
    ]
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    for sources, fragment in cases:
        with pytest.raises(DataError) as info:
            check_sources(sources)
        message = str(info.value)
        assert fragment in message and "\n" not in message, message
        assert any(f"'{s.name}'" in message for s in sources) or "weights" in message, message
    check_sources([ok])


def test_demo_heldout_crops_come_from_photos_never_trained_on(tmp_path):
    import skimage.data

    from data.demo import HELDOUT_CROPS, TRAIN_EXT, train_files

    train, heldout = demo_sources(str(tmp_path / "demo"), 32)
    train_names, crop_names = sorted(os.listdir(train.path)), sorted(os.listdir(heldout.path))
    assert heldout.path.endswith("heldout_32") and len(crop_names) >= 16
    trained_photos = {name for name, _ in train_files().values()}
    crop_photos = {name.rsplit("_", 1)[0] for name in crop_names}
    assert crop_photos == set(HELDOUT_CROPS) and not crop_photos & trained_photos
    assert {n.removesuffix(TRAIN_EXT).removesuffix("_gbr") for n in train_names} == trained_photos

    # Colour-dominated training set, held-out crops both colour and grey.
    def is_grey(path):
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max() <= 1

    grey_train = sum(is_grey(os.path.join(train.path, n)) for n in train_names)
    assert grey_train * 3 == len(train_names)  # each colour photograph twice, each grey one once
    grey_crops = [is_grey(os.path.join(heldout.path, n)) for n in crop_names]
    assert any(grey_crops) and not all(grey_crops)
    # Pixels: every crop is the window of its own photograph centred at the listed fractions, and
    # no training file is one of those photographs.
    train_arrays = [np.asarray(Image.open(os.path.join(train.path, n))) for n in train_names]
    for photo_name, centres in HELDOUT_CROPS.items():
        photo = np.asarray(to_rgb(Image.fromarray(getattr(skimage.data, photo_name)())))
        height, width = photo.shape[:2]
        for i, (fx, fy) in enumerate(centres):
            crop = np.asarray(Image.open(os.path.join(heldout.path, f"{photo_name}_{i}.png")))
            left = min(max(round(fx * width - 16), 0), width - 32)
            top = min(max(round(fy * height - 16), 0), height - 32)
            assert np.array_equal(crop, photo[top : top + 32, left : left + 32])
        assert not any(a.shape == photo.shape and np.array_equal(a, photo) for a in train_arrays)
    astronaut = np.asarray(Image.open(os.path.join(train.path, f"astronaut{TRAIN_EXT}")))
    assert np.array_equal(astronaut, skimage.data.astronaut())  # full photographs, unresampled
    assert np.array_equal(
        np.asarray(Image.open(os.path.join(train.path, f"astronaut_gbr{TRAIN_EXT}"))), astronaut[:, :, [1, 2, 0]]
    )  # channels rotated once: red turns blue
    # Idempotent: nothing is rewritten by a second call.
    stamp = os.path.getmtime(os.path.join(heldout.path, crop_names[0]))
    assert demo_sources(str(tmp_path / "demo"), 32) == (train, heldout)
    assert os.path.getmtime(os.path.join(heldout.path, crop_names[0])) == stamp
    check_sources([train, heldout])


@pytest.mark.parametrize("size", [(500, 375), (333, 500), (1024, 683), (37, 53)])
def test_eval_transform_is_pixel_identical_to_torchvision_resize_centercrop(size):
    """The reference eval crop: torchvision Resize(R) (bilinear on PIL) + CenterCrop(R) + [-1, 1]."""
    import torchvision.transforms as T

    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    reference = T.Compose([T.Resize(64), T.CenterCrop(64), T.PILToTensor()])(img).float() / 127.5 - 1
    assert torch.equal(eval_transform(img, 64, interpolation="bilinear"), reference)


# ---------------------------------------------------------------------------------------------
# Training crop modes
# ---------------------------------------------------------------------------------------------


def as_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(3, R, R) in [-1, 1] -> (R, R, 3) uint8, exactly inverting to_tensor."""
    return np.round((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)


def windows_of(big: np.ndarray, small: np.ndarray) -> list[tuple[int, int]]:
    """Every (top, left) where `small` sits pixel-exactly inside `big`."""
    views = np.lib.stride_tricks.sliding_window_view(big, small.shape)[:, :, 0]
    return [tuple(int(v) for v in p) for p in np.argwhere((views == small).all(axis=(2, 3, 4)))]


def noise_image(width, height, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(90, 70), (333, 200), (50, 120)])
def test_resize_crop_mode_is_torchvision_resize_then_random_crop(size):
    import torchvision.transforms.functional as TF

    img = noise_image(*size, seed=sum(size))
    for seed in range(4):
        ours = train_transform(img, 32, np.random.default_rng(seed), crop_mode="resize")
        assert torch.equal(ours, train_transform(img, 32, np.random.default_rng(seed)))  # the default
        resized = TF.resize(img, 32)  # bilinear, shorter side -> 32, as torchvision's Resize(32)
        draws = np.random.default_rng(seed)
        left = int(draws.integers(0, resized.width - 32 + 1))
        top = int(draws.integers(0, resized.height - 32 + 1))
        reference = TF.pil_to_tensor(TF.crop(resized, top, left, 32, 32)).float() / 127.5 - 1
        assert torch.equal(ours, reference)


def test_native_crop_mode_is_an_exact_window_without_resampling():
    img = noise_image(90, 70, seed=1)
    big = np.asarray(img)
    positions = set()
    for seed in range(6):
        crop = as_uint8(train_transform(img, 16, np.random.default_rng(seed), crop_mode="native"))
        found = windows_of(big, crop)
        assert len(found) == 1, found  # noise: a window occurs once
        positions.add(found[0])
    assert len(positions) > 1  # the window position is random
    # A side below the resolution: shorter side resized up to R first (bilinear), then a window.
    import torchvision.transforms.functional as TF

    small = noise_image(10, 30, seed=2)
    crop = as_uint8(train_transform(small, 16, np.random.default_rng(0), crop_mode="native"))
    assert crop.shape == (16, 16, 3) and windows_of(np.asarray(TF.resize(small, 16)), crop)


def test_random_scale_size_stays_between_resolution_and_native():
    from data.transforms import random_scale_size

    draws = [random_scale_size(40, 19, 16, np.random.default_rng(s)) for s in range(300)]
    assert set(draws) == {16, 17, 18, 19}  # uniform over [R, shorter side], both ends included
    assert min(np.bincount(draws)[16:]) > 40  # ~75 each
    assert {random_scale_size(12, 50, 16, np.random.default_rng(s)) for s in range(20)} == {16}  # never below R
    assert {random_scale_size(16, 16, 16, np.random.default_rng(s)) for s in range(20)} == {16}


def test_random_scale_crop_mode_is_a_crop_of_a_resize_to_the_drawn_size():
    import torchvision.transforms.functional as TF

    from data.transforms import random_scale_size

    img = noise_image(120, 64, seed=3)
    sizes = set()
    for seed in range(6):
        size = random_scale_size(*img.size, 16, np.random.default_rng(seed))  # the transform's first draw
        sizes.add(size)
        assert 16 <= size <= 64
        crop = as_uint8(train_transform(img, 16, np.random.default_rng(seed), crop_mode="random_scale"))
        assert windows_of(np.asarray(TF.resize(img, size)), crop), size
    assert len(sizes) > 1


def test_crop_mode_is_validated_up_front(tmp_path):
    make_folder(str(tmp_path / "f"))
    with pytest.raises(DataError, match="crop_mode"):
        build_train_stream([SourceSpec("f", str(tmp_path / "f"))], 16, crop_mode="centre")
    from data import CROP_MODES

    assert CROP_MODES == ("resize", "native", "random_scale")


def test_native_stream_yields_windows_and_resumes_exactly(tmp_path):
    folder = tmp_path / "native"
    originals = {}
    for i in range(5):
        img = noise_image(40 + 7 * i, 30 + 3 * i, seed=50 + i)
        write(str(folder / f"{i}.png"), b"")
        img.save(folder / f"{i}.png")
        originals[f"{i}.png"] = np.asarray(img)

    def stream():
        return build_train_stream(
            [SourceSpec("n", str(folder))], 16, seed=4, shuffle_block=3, random_flip=False, crop_mode="native"
        )

    reference = list(itertools.islice(iter(stream()), 14))  # crosses two epochs of 5 images
    for sample in reference:
        assert windows_of(originals[sample["key"]], as_uint8(sample["pixel_values"]))
    first = stream()
    iterator = iter(first)
    for _ in range(6):
        next(iterator)
    state = first.state_dict()
    resumed = stream()
    resumed.load_state_dict(state)
    _assert_same(reference[6:], list(itertools.islice(iter(resumed), 8)))


# ---------------------------------------------------------------------------------------------
# Record keys: unique by construction
# ---------------------------------------------------------------------------------------------


def make_repetitive_sources(root):
    """Two tar shards repeating the same __key__s, a parquet file holding byte-identical images."""
    os.makedirs(f"{root}/wds", exist_ok=True)
    for s in range(2):
        with tarfile.open(f"{root}/wds/shard-{s}.tar", "w") as tar:
            for i in range(3):
                payload = textured_bytes(300 + 10 * s + i)
                info = tarfile.TarInfo(f"sample_{i}.jpg")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    same = textured_bytes(7)
    rows = [{"bytes": same, "path": None}, {"bytes": same, "path": None}, {"bytes": textured_bytes(8), "path": None}]
    os.makedirs(f"{root}/pq", exist_ok=True)
    pq.write_table(pa.table({"image": rows}), f"{root}/pq/dup.parquet", row_group_size=1)  # 3 row groups
    return SourceSpec("wds", f"{root}/wds/*.tar"), SourceSpec("pq", f"{root}/pq/*.parquet")


def test_record_keys_are_unique_when_images_or_keys_repeat(tmp_path):
    wds, parquet = make_repetitive_sources(str(tmp_path))
    for spec, count in ((wds, 6), (parquet, 3)):
        keys = keys_of(build_eval_stream(spec, 16))
        assert len(keys) == count == len(set(keys)), keys
        assert all(k.startswith(f"{spec.name}/") for k in keys)
        for world_size in (2, 3):  # across ranks: each row once, under the same key as on one rank
            parts = [keys_of(build_eval_stream(spec, 16, rank=r, world_size=world_size)) for r in range(world_size)]
            assert sorted(itertools.chain(*parts)) == sorted(keys)
    keys = keys_of(build_eval_stream(wds, 16))
    assert sorted(keys) == sorted(f"wds/shard-{s}.tar/{i}:sample_{i}" for s in range(2) for i in range(3))
    assert sorted(keys_of(build_eval_stream(parquet, 16))) == [f"pq/dup.parquet/{r}" for r in range(3)]
    # Training: the two ranks' parts are disjoint and cover every row (parquet split by row group).
    both = [keys_of(build_train_stream([parquet], 16, rank=r, world_size=2, infinite=False)) for r in range(2)]
    assert not set(both[0]) & set(both[1]) and sorted(both[0] + both[1]) == [f"pq/dup.parquet/{r}" for r in range(3)]


def test_eval_over_repeated_keys_yields_every_row_once(tmp_path):
    wds, parquet = make_repetitive_sources(str(tmp_path))
    batches = list(make_dataloader(build_eval_stream(wds, 16), batch_size=4))
    pixels = {key: image for batch in batches for key, image in zip(batch["key"], batch["pixel_values"], strict=True)}
    assert sum(len(batch["key"]) for batch in batches) == len(pixels) == 6
    for s in range(2):  # the same __key__ in both shards, different images behind it
        assert not torch.equal(pixels[f"wds/shard-0.tar/{s}:sample_{s}"], pixels[f"wds/shard-1.tar/{s}:sample_{s}"])
    rows = {s["key"]: s["pixel_values"] for s in build_eval_stream(parquet, 16)}
    assert len(rows) == 3 and torch.equal(rows["pq/dup.parquet/0"], rows["pq/dup.parquet/1"])


# ---------------------------------------------------------------------------------------------
# Held-out samples spread over the data
# ---------------------------------------------------------------------------------------------


def make_many_classes(root, classes=20, per_class=5):
    for c in range(classes):
        for i in range(per_class):
            write(f"{root}/train/n{c:08d}/n{c:08d}_{i}.JPEG", textured_bytes(1000 + 10 * c + i, size=(20, 16)))
    return root


def test_resolved_sources_are_used_as_they_are_not_listed_again(tmp_path, monkeypatch):
    """The trainer lists once and hands the resolved sources on: the stream and the held-out sample (the
    export's latent statistics too) then list nothing, and give what they give from the specs."""
    import data.resolve
    from data import sample_images

    specs = [SourceSpec("a", make_many_classes(str(tmp_path / "a"), classes=3, per_class=2), weight=2.0)]
    specs.append(SourceSpec("b", make_folder(str(tmp_path / "b"))))
    walks, list_images = [], data.resolve.list_images
    monkeypatch.setattr(data.resolve, "list_images", lambda root: walks.append(root) or list_images(root))
    resolved = data.resolve_sources(specs)
    assert len(walks) == 2
    from_resolved = sample_images(resolved, 6, 16, seed=4), keys_of(build_train_stream(resolved, 16, infinite=False))
    assert len(walks) == 2  # nothing listed again
    from_specs = sample_images(specs, 6, 16, seed=4), keys_of(build_train_stream(specs, 16, infinite=False))
    assert len(walks) == 2 + 2 * 2  # specs: listed by each
    assert from_resolved[0][1] == from_specs[0][1] and torch.equal(from_resolved[0][0], from_specs[0][0])
    assert from_resolved[1] == from_specs[1]


def test_sample_images_covers_the_whole_folder_and_is_reproducible(tmp_path):
    from data import sample_images

    spec = SourceSpec("imagenet", make_many_classes(str(tmp_path / "ImageNet")))
    images, keys = sample_images([spec], 16, 16, seed=0)
    assert images.shape == (16, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and len(keys) == len(set(keys)) == 16
    classes = {key.split("/")[1] for key in keys}
    assert len(classes) >= 5  # 16 draws over 20 classes: a first-N sample would cover 4
    first_files = keys_of(build_eval_stream(spec, 16, max_samples=16))
    assert {k.split("/", 1)[1] for k in keys} != set(first_files)
    again, again_keys = sample_images([spec], 16, 16, seed=0)
    assert again_keys == keys and torch.equal(again, images)
    assert sample_images([spec], 16, 16, seed=1)[1] != keys
    # Each image is the eval transform (resize + centre crop) of the file its key names.
    root = os.path.join(spec.path, "train")
    for image, key in zip(images[:3], keys[:3], strict=True):
        assert torch.equal(image, eval_transform(load_image(os.path.join(root, key.split("/", 1)[1])), 16))


def test_sample_images_splits_count_by_weight_and_skips_bad_files(tmp_path):
    from data import sample_images
    from data.sample import split_count

    assert split_count(10, [3.0, 1.0]) == [8, 2]  # 7.5 / 2.5: the tie goes to the earlier source
    assert split_count(7, [1.0, 1.0, 1.0]) == [3, 2, 2]
    assert split_count(5, [1.0, 0.0]) == [5, 0]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for i in range(30):
        write(f"{a}/{i:02d}.png", image_bytes(colour(i), size=(12, 12), fmt="PNG"))
        write(f"{b}/{i:02d}.png", image_bytes(colour(100 + i), size=(12, 12), fmt="PNG"))
    for i in range(5):
        write(f"{a}/bad{i}.jpg", b"not an image")
    images, keys = sample_images([SourceSpec("a", a, weight=3.0), SourceSpec("b", b, weight=1.0)], 12, 8, seed=2)
    assert [k.split("/")[0] for k in keys] == ["a"] * 9 + ["b"] * 3
    assert not any("bad" in k for k in keys) and len(images) == 12
    with pytest.raises(DataError, match="only 30 readable"):
        sample_images([SourceSpec("a", a)], 31, 8)


def test_sample_images_from_parquet_and_webdataset_shards(tmp_path):
    from data import sample_images

    parquet = make_parquet(str(tmp_path / "pq"), files=4, rows=6, row_group_size=2, bad_rows={(1, 1)})
    tars = make_webdataset(str(tmp_path / "wds"), shards=5, per_shard=4, bad_members={(2, 0)})
    for spec, total in ((SourceSpec("pq", parquet), 23), (SourceSpec("wds", tars), 19)):
        images, keys = sample_images([spec], 10, 16, seed=3)
        assert len(set(keys)) == 10 and images.shape == (10, 3, 16, 16)
        assert len({k.split("/")[1] for k in keys}) >= 3  # spread over the shards
        assert sample_images([spec], 10, 16, seed=3)[1] == keys
        reference = {s["key"]: s["pixel_values"] for s in build_eval_stream(spec, 16)}
        assert len(reference) == total
        for image, key in zip(images, keys, strict=True):  # the same key and pixels as the eval stream's
            assert torch.equal(image, reference[key])
        assert len(sample_images([spec], total, 16)[1]) == total  # every readable image, bad ones replaced
        with pytest.raises(DataError, match="readable"):
            sample_images([spec], total + 1, 16)


def test_sample_images_from_a_hub_style_dataset(tmp_path, monkeypatch):
    import datasets

    import data.sample
    from data.resolve import ResolvedSource

    make_parquet(str(tmp_path / "pq"), files=3, rows=4, row_group_size=2)
    files = sorted(str(p) for p in (tmp_path / "pq").glob("*.parquet"))
    hub = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
    hub = hub.cast_column("image", datasets.Image())
    monkeypatch.setattr(
        data.sample,
        "resolve_source",
        lambda spec, index: ResolvedSource(spec, index, "hub", hub=hub, image_columns=["image"]),
    )
    spec = SourceSpec("hubby", "someone/something", kind="hub")
    images, keys = data.sample.sample_images([spec], 5, 16, seed=1)
    assert len(set(keys)) == 5 and images.shape == (5, 3, 16, 16)
    assert len({k.split("/")[1] for k in keys}) >= 3  # several of the 6 row-group shards
    assert data.sample.sample_images([spec], 5, 16, seed=1)[1] == keys
    assert len(data.sample.sample_images([spec], 12, 16)[1]) == 12
