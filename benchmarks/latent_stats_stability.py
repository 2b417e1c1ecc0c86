"""How stable is σ (the overall std of sampled latents, 1/scaling_factor) for a given `--latent_stats_samples`?

Draws two disjoint samples of distinct random crops of the scikit-image photographs (seeds
2k and 2k+1 for pair k), computes `autoencoder.latents.latent_statistics` on the first N crops of each for
every N, and prints |σ₁ − σ₂| / σ (σ = their mean), |μ₁ − μ₂| / σ and the largest per-channel
relative difference of the stds. Each crop: a random photograph, its shorter side resized to a
log-uniform random size between `--min_scale` × the crop size and its native size, a random crop.
The smallest resize leaves thousands of crop positions per photograph, so keeping the samples
disjoint (the second redraws the rare crop the first already holds) does not bias it.

Run from the repository root:

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/latent_stats_stability.py --vae outputs/demo
    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/latent_stats_stability.py --preset small  # random init
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

# The repository root, for the trainer's packages: the script runs without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autoencoder.latents import latent_statistics
from autoencoder.models import build_vae, load_vae
from data.transforms import to_rgb

# Photographs shipped with scikit-image (no download): colour and grey, natural and microscopy.
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
    "camera",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
    "cell",
    "clock",
)
LEVELS = 8  # resize levels per photograph, log-spaced between the crop size and the native size


def pyramids(resolution: int, min_scale: float) -> list[list[np.ndarray]]:
    """For each photograph: RGB uint8 arrays with the shorter side at LEVELS log-spaced sizes."""
    import skimage.data

    out = []
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        image = to_rgb(Image.fromarray(image[0] if isinstance(image, tuple) else image))
        short = min(image.size)
        smallest = round(min_scale * resolution)
        sizes = sorted({round(s) for s in np.geomspace(smallest, max(short, smallest), LEVELS)})
        levels = []
        for size in sizes:
            scale = size / short
            w, h = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
            levels.append(np.asarray(image.resize((w, h), Image.Resampling.BILINEAR)))
        out.append(levels)
    return out


def crop_params(
    rng: np.random.Generator,
    photos: list[list[np.ndarray]],
    count: int,
    resolution: int,
    taken: set,
    redrawn: list[int],
) -> list[tuple]:
    """`count` distinct (photo, level, top, left) crops not in `taken` (which they are added to)."""
    params = []
    while len(params) < count:
        p = int(rng.integers(len(photos)))
        level = int(rng.integers(len(photos[p])))
        h, w = photos[p][level].shape[:2]
        crop = (p, level, int(rng.integers(h - resolution + 1)), int(rng.integers(w - resolution + 1)))
        if crop in taken:
            redrawn[0] += 1
        else:
            taken.add(crop)
            params.append(crop)
    return params


def crops(photos, params, resolution: int) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1]."""
    arrays = [photos[p][level][y : y + resolution, x : x + resolution] for p, level, y, x in params]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--vae", help="exported model folder, training checkpoint or hub id")
    which.add_argument("--preset", help="randomly initialised preset (small, tiny, transfusion)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--min_scale", type=float, default=2.0, help="smallest shorter side, in crop sizes")
    parser.add_argument("--pairs", type=int, default=1, help="independent pairs of samples (seeds 2k, 2k+1)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vae = (load_vae(args.vae) if args.vae else build_vae(args.preset)).eval()
    photos = pyramids(args.resolution, args.min_scale)
    redrawn = [0]
    n_max = max(args.sizes)
    started = time.perf_counter()
    rows: dict[int, list[tuple]] = {n: [] for n in args.sizes}
    for pair in range(args.pairs):
        taken: set = set()  # the second sample skips the first one's crops: disjoint, and no repeats within
        params = [
            crop_params(np.random.default_rng(2 * pair + i), photos, n_max, args.resolution, taken, redrawn)
            for i in (0, 1)
        ]
        images = [crops(photos, p, args.resolution) for p in params]
        for n in args.sizes:
            s1, s2 = (latent_statistics(vae, x[:n], args.batch_size, seed=2 * pair + i) for i, x in enumerate(images))
            sigma = (s1["std"] + s2["std"]) / 2
            channel = max(abs(a - b) / ((a + b) / 2) for a, b in zip(s1["latents_std"], s2["latents_std"], strict=True))
            rows[n].append(
                (
                    s1["std"],
                    s2["std"],
                    abs(s1["std"] - s2["std"]) / sigma,
                    abs(s1["mean"] - s2["mean"]) / sigma,
                    channel,
                )
            )
    source = f"--vae {args.vae}" if args.vae else f"--preset {args.preset} (random init)"
    print(
        f"\n{source}, {len(PHOTOS)} scikit-image photographs, random {args.resolution}² crops, "
        f"{args.pairs} pair(s) of disjoint samples ({redrawn[0]} repeated crops redrawn), "
        f"{time.perf_counter() - started:.0f} s\n"
    )
    print("| images N | σ₁ | σ₂ | \\|σ₁−σ₂\\|/σ | \\|μ₁−μ₂\\|/σ | max over channels \\|σc₁−σc₂\\|/σc |")
    print("|---|---|---|---|---|---|")
    for n, values in rows.items():
        mean = [sum(v[i] for v in values) / len(values) for i in range(5)]
        worst = max(v[2] for v in values)
        spread = f"{mean[2]:.2%}" + (f" (max {worst:.2%})" if len(values) > 1 else "")
        print(f"| {n} | {mean[0]:.4f} | {mean[1]:.4f} | {spread} | {mean[3]:.2%} | {mean[4]:.2%} |")
    if not math.isfinite(sum(v[2] for vs in rows.values() for v in vs)):
        raise SystemExit("non-finite statistics")


if __name__ == "__main__":
    main()
