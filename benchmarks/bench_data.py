"""Data path throughput: decode + Resize + RandomCrop, per worker, for JPEG and PNG, next to the training step.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_data.py --step_images_per_s 0.5
    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_data.py --workers 0,1,2,4,8 --step_images_per_s 110

Writes --num_images photographs of --width×--height (crops of scikit-image's colour photos,
so that the codecs see natural images, not noise) as JPEG (quality 90) and PNG into a temporary
folder, then measures for each format:
  raw      load_image + train_transform in this process, no DataLoader: decode and transform
           apart, milliseconds per image on one core
  loader   the trainer's real path, data.build_train_stream + data.make_dataloader (HF
           streaming, block shuffle, crops) for each --workers value: the time to the first
           batch (worker start-up, stream set-up) and the steady images/s after it, in total
           and per worker
and compares the steady rate with the images/s the training step consumes: --step_images_per_s,
or measured here (our step, bench_train_step's builders) when not given. On a machine with few
cores the workers and the step share the CPU, so a loader that keeps up alone can still slow the
step; "keeps up" below means the loader alone is at least --margin times faster than the step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

# The repository root, for the trainer's packages: the script runs without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data

PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "rocket",
    "stereo_motorcycle",
)


def write_images(folder: str, fmt: str, n: int, width: int, height: int, seed: int = 0) -> None:
    """n natural images of width×height: random crops (0.5–1 of the photo) of scikit-image photos, resized."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        image = image[0] if isinstance(image, tuple) else image
        photos.append(Image.fromarray(image).convert("RGB"))
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        photo = photos[i % len(photos)]
        scale = rng.uniform(0.5, 1.0)
        w, h = int(photo.width * scale), int(photo.height * scale)
        left, top = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        image = photo.crop((left, top, left + w, top + h)).resize((width, height), Image.Resampling.BICUBIC)
        if fmt == "jpeg":
            image.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
        else:
            image.save(os.path.join(folder, f"{i:05d}.png"))


def raw_rates(folder: str, resolution: int, repeats: int = 1) -> dict[str, float]:
    """Milliseconds per image for decoding and for the train transform, one process, one core."""
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    rng = np.random.default_rng(0)
    decode, transform = [], []
    for _ in range(repeats):
        for path in files:
            tic = time.perf_counter()
            image = data.load_image(path)
            mid = time.perf_counter()
            data.train_transform(image, resolution, rng)
            decode.append(mid - tic)
            transform.append(time.perf_counter() - mid)
    ms_decode, ms_transform = 1e3 * statistics.median(decode), 1e3 * statistics.median(transform)
    return {"decode_ms": ms_decode, "transform_ms": ms_transform, "images_per_s": 1e3 / (ms_decode + ms_transform)}


def loader_rates(folder: str, resolution: int, batch_size: int, workers: int, images: int) -> dict[str, float]:
    """The training data path: time to the first batch, then steady images/s over `images` images."""
    source = data.SourceSpec(name=os.path.basename(folder), path=folder, kind="folder")
    stream = data.build_train_stream([source], resolution, seed=0, shuffle_block=1000)
    loader = data.make_dataloader(
        stream,
        batch_size,
        num_workers=workers,
        generator=torch.Generator().manual_seed(0),
        persistent_workers=workers > 0,
    )
    tic = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - tic
    n_batches = max(1, images // batch_size)
    tic = time.perf_counter()
    for _ in range(n_batches):
        batch = next(it)
    seconds = time.perf_counter() - tic
    assert batch["pixel_values"].shape == (batch_size, 3, resolution, resolution)
    del it, loader  # stop the workers before the next setting starts its own
    rate = n_batches * batch_size / seconds
    return {"first_batch_s": first, "images_per_s": rate, "per_worker": rate / max(1, workers)}


class _Repeat(torch.utils.data.IterableDataset):
    """One ready tensor, yielded forever: a DataLoader with nothing to do but move samples."""

    def __init__(self, sample: torch.Tensor):
        super().__init__()
        self.sample = sample

    def __iter__(self):
        while True:
            yield self.sample.clone()


def transport_rates(resolution: int, batch_size: int, workers: int, images: int, rounds: int = 2) -> dict[str, float]:
    """Images/s a DataLoader moves from `workers` processes when samples cost nothing to make:
    float32 [-1, 1] (what the stream yields now) against uint8 (4× fewer bytes); alternating rounds, median."""
    dtypes = {"float32": torch.float32, "uint8": torch.uint8}
    rates = {name: [] for name in dtypes}
    for r in range(rounds):
        for name in list(dtypes) if r % 2 == 0 else list(dtypes)[::-1]:
            loader = torch.utils.data.DataLoader(
                _Repeat(torch.zeros(3, resolution, resolution, dtype=dtypes[name])),
                batch_size=batch_size,
                num_workers=workers,
            )
            it = iter(loader)
            next(it)
            n = max(1, images // batch_size)
            tic = time.perf_counter()
            for _ in range(n):
                next(it)
            rates[name].append(n * batch_size / (time.perf_counter() - tic))
            del it, loader
    return {name: statistics.median(r) for name, r in rates.items()}


def measure_step(preset: str, resolution: int, batch_size: int) -> float:
    """Images/s of our training step (G + D, GAN on), 1 warm-up + 2 timed steps."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_train_step

    argv = ["--preset", preset, "--resolution", str(resolution), "--batch_size", str(batch_size)]
    argv += ["--variants", "ours", "--baseline", "ours", "--steps", "2", "--rounds", "1", "--warmup", "1"]
    result = bench_train_step.main(argv)
    return result["runs"][0]["rows"][0]["images_per_s"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_images", type=int, default=200)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--resolution", type=int, default=256, help="training crop")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--workers", default="0,1,2", help="comma list of DataLoader worker counts")
    p.add_argument("--formats", default="jpeg,png")
    p.add_argument(
        "--images", type=int, default=None, help="images timed per setting and round (default: --num_images)"
    )
    p.add_argument("--rounds", type=int, default=2, help="alternating measurement rounds (median)")
    p.add_argument(
        "--step_images_per_s", type=float, default=None, help="what the training step consumes; measured when absent"
    )
    p.add_argument("--step_preset", default="small", help="preset of the measured step")
    p.add_argument(
        "--step_resolution", type=int, default=None, help="resolution of the measured step (default --resolution)"
    )
    p.add_argument("--step_batch_size", type=int, default=2)
    p.add_argument("--margin", type=float, default=1.5, help="'keeps up' needs loader rate >= margin × step rate")
    p.add_argument("--dir", default=None, help="image folder root to reuse (default: a temporary one)")
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    formats = [f.strip() for f in args.formats.split(",")]
    images = args.images or args.num_images

    root = args.dir or tempfile.mkdtemp(prefix="bench_data_")
    for fmt in formats:
        folder = os.path.join(root, fmt)
        if not (os.path.isdir(folder) and len(os.listdir(folder)) >= args.num_images):
            write_images(folder, fmt, args.num_images, args.width, args.height)
    print(
        f"{args.num_images} {args.width}×{args.height} images per format in {root}; crop {args.resolution}², "
        f"batch {args.batch_size}; {os.cpu_count()} CPUs",
        flush=True,
    )

    # Rounds alternate the settings (forward, then backward) so that load from other processes hits
    # them alike; each figure is the median over rounds.
    settings = [(fmt, None) for fmt in formats] + [(fmt, w) for fmt in formats for w in workers]
    measured = {key: [] for key in settings}
    for r in range(args.rounds):
        for fmt, w in settings if r % 2 == 0 else settings[::-1]:
            folder = os.path.join(root, fmt)
            if w is None:
                measured[fmt, w].append(raw_rates(folder, args.resolution, repeats=1))
            else:
                measured[fmt, w].append(loader_rates(folder, args.resolution, args.batch_size, w, images))

    def median(key, field):
        return statistics.median(m[field] for m in measured[key])

    for fmt in formats:
        folder = os.path.join(root, fmt)
        size_kb = statistics.fmean(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 1024
        print(
            f"{fmt:>5} raw (1 core, no DataLoader): {size_kb:.0f} KB/file, decode {median((fmt, None), 'decode_ms'):.2f} ms, "
            f"resize+crop+tensor {median((fmt, None), 'transform_ms'):.2f} ms -> "
            f"{median((fmt, None), 'images_per_s'):.0f} img/s",
            flush=True,
        )
    rows = [
        (fmt, w, {k: median((fmt, w), k) for k in ("first_batch_s", "images_per_s", "per_worker")})
        for fmt in formats
        for w in workers
    ]

    for w in [w for w in workers if w > 0][:1]:
        t = transport_rates(args.resolution, args.batch_size, w, 4 * images, args.rounds)
        print(
            f"transport only ({w} worker, ready {args.resolution}² samples): float32 {t['float32']:.0f} img/s, "
            f"uint8 {t['uint8']:.0f} img/s",
            flush=True,
        )

    step_rate = args.step_images_per_s
    step_note = "given"
    if step_rate is None:
        res = args.step_resolution or args.resolution
        step_rate = measure_step(args.step_preset, res, args.step_batch_size)
        step_note = f"measured: preset {args.step_preset}, {res}², batch {args.step_batch_size}"
    print(f"\ntraining step consumes {step_rate:.2f} img/s ({step_note})")
    print(
        f"  {'format':<7}{'workers':>8}{'first batch':>13}{'img/s':>9}{'per worker':>12}{'× step':>9}  keeps up (≥{args.margin}×)?"
    )
    for fmt, w, rate in rows:
        ratio = rate["images_per_s"] / step_rate
        print(
            f"  {fmt:<7}{w:>8}{rate['first_batch_s']:>12.2f}s{rate['images_per_s']:>9.1f}{rate['per_worker']:>12.1f}"
            f"{ratio:>8.1f}×  {'yes' if ratio >= args.margin else 'NO'}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
