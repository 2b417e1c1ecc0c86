"""A tiny real-photo data set that works offline: the photographs shipped with scikit-image.

Training: full photographs (written once as uncompressed BMP: a training crop decodes the whole
photograph, and BMP decodes ~7x faster than PNG, whose decoding took a fifth of the demo's CPU time),
colour-dominated. Every colour photograph is written twice: as is and with its channels rotated once
(RGB -> GBR, so red turns blue), so two of every three training files are colour. The photographs are
mostly warm (an orange space suit, coffee, a red retina): trained on them as they are, a small
autoencoder learns a warm cast and brings a blue night sky back brown or grey; with both rotations
(GBR and BRG, every channel seeing the same colours) its best guess for any colour is grey, and in
900 steps it stayed grey (docs/measurements.md, "Colour kept", has the trials).
Held out: fixed resolution² crops of four photographs never trained on (two colour, two grey),
cut at hand-picked positions covering flat sky, fur, faces, lights, metal and grass.
"""

from __future__ import annotations

import contextlib
import os

from PIL import Image

from common.errors import DataError

from .resolve import list_images
from .specs import SourceSpec
from .transforms import resize_shorter_side, to_rgb

COLOUR_TRAIN = (
    "astronaut",
    "coffee",
    "colorwheel",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "retina",
    "stereo_motorcycle",
)
GREY_TRAIN = ("brick", "cell", "clock", "grass", "gravel", "moon", "page", "text")
# Held-out photograph -> crop centres as fractions (x, y) of its width and height.
HELDOUT_CROPS = {
    "chelsea": ((0.3, 0.4), (0.7, 0.45), (0.55, 0.8), (0.1, 0.5), (0.85, 0.15)),  # eyes, nose, whiskers, fur
    "rocket": ((0.3, 0.15), (0.08, 0.4), (0.5, 0.33), (0.93, 0.55), (0.6, 0.9)),  # night sky, towers, lights
    "camera": ((0.35, 0.3), (0.8, 0.75), (0.85, 0.3)),  # face and coat, tripod on grass, buildings
    "coins": ((0.3, 0.35), (0.75, 0.7), (0.5, 0.85)),
}


def _photo(name: str) -> Image.Image:
    import skimage.data

    try:
        image = getattr(skimage.data, name)()
    except Exception as exc:  # noqa: BLE001 - missing file, missing optional downloader, old scikit-image
        raise DataError(
            f"demo data: scikit-image cannot provide the photograph {name!r}: {type(exc).__name__}: {exc}"
        ) from None
    image = image[0] if isinstance(image, tuple) else image  # stereo_motorcycle -> (left, right, disparity)
    return to_rgb(Image.fromarray(image))  # grey -> RGB; the RGBA logo composited over white


TRAIN_EXT = ".bmp"  # lossless like PNG, without the inflate pass
HELDOUT_EXT = ".png"  # 16 small crops, read once


def _write_image(image_fn, target: str) -> None:
    if os.path.isfile(target):
        return
    # Write then rename: several ranks may call this at once, and a reader must never see half a file.
    tmp = f"{target}.{os.getpid()}.tmp"
    if target.endswith(".png"):
        image_fn().save(tmp, format="PNG", compress_level=1)  # 3-4x faster to write than the default 6
    else:
        image_fn().save(tmp, format="BMP")
    os.replace(tmp, target)


def _crop(photo: Image.Image, centre: tuple[float, float], resolution: int) -> Image.Image:
    if min(photo.size) < resolution:
        photo = resize_shorter_side(photo, resolution, "bilinear")
    width, height = photo.size
    left = min(max(round(centre[0] * width - resolution / 2), 0), width - resolution)
    top = min(max(round(centre[1] * height - resolution / 2), 0), height - resolution)
    return photo.crop((left, top, left + resolution, top + resolution))


# Channel orders of the colour copies: as is, and rotated once (red -> blue, green -> red, blue -> green).
CHANNEL_ROTATIONS = {"": (0, 1, 2), "_gbr": (1, 2, 0)}


def train_files() -> dict[str, tuple[str, tuple[int, int, int]]]:
    """Training file name -> (photograph, channel order)."""
    files = {
        f"{name}{suffix}{TRAIN_EXT}": (name, order)
        for name in COLOUR_TRAIN
        for suffix, order in CHANNEL_ROTATIONS.items()
    }
    files.update({f"{name}{TRAIN_EXT}": (name, (0, 1, 2)) for name in GREY_TRAIN})
    return files


def demo_sources(cache_dir: str, resolution: int = 64) -> tuple[SourceSpec, SourceSpec]:
    """(training photographs, held-out crops) written as BMP / PNG under cache_dir (idempotent, offline).

    cache_dir/train holds the full photographs; cache_dir/heldout_<resolution> the held-out
    crops, already resolution², so the evaluation transform leaves them untouched.
    """
    if resolution < 1:
        raise DataError(f"demo data: resolution must be >= 1, got {resolution}")
    train_dir = os.path.join(cache_dir, "train")
    os.makedirs(train_dir, exist_ok=True)
    wanted = train_files()
    for stale in set(list_images(train_dir)) - set(wanted):  # left by an older demo: maybe a held-out photo
        with contextlib.suppress(FileNotFoundError):  # another rank removed it first
            os.remove(os.path.join(train_dir, stale))
    for file, (name, order) in wanted.items():

        def image(name=name, order=order):
            photo = _photo(name)
            return photo if order == (0, 1, 2) else Image.merge("RGB", [photo.getchannel(c) for c in order])

        _write_image(image, os.path.join(train_dir, file))
    heldout_dir = os.path.join(cache_dir, f"heldout_{resolution}")
    os.makedirs(heldout_dir, exist_ok=True)
    for name, centres in HELDOUT_CROPS.items():
        for i, centre in enumerate(centres):
            _write_image(
                lambda name=name, centre=centre: _crop(_photo(name), centre, resolution),
                os.path.join(heldout_dir, f"{name}_{i}{HELDOUT_EXT}"),
            )
    train = SourceSpec(name="demo_train", path=train_dir, kind="folder")
    heldout = SourceSpec(name="demo_heldout", path=heldout_dir, kind="folder")
    return train, heldout
