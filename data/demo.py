"""A tiny real-photo data set that works offline: the colour photographs shipped with scikit-image."""

from __future__ import annotations

import os

from .sources import SourceSpec

# Six photos to train on, two held out for evaluation (a cat and a rocket: scenes unlike any
# training photo, so held-out numbers are not flattered).
TRAIN_PHOTOS = ("astronaut", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle")
HELDOUT_PHOTOS = ("chelsea", "rocket")


def _photo(name: str):
    import skimage.data

    image = getattr(skimage.data, name)()
    return image[0] if isinstance(image, tuple) else image  # stereo_motorcycle -> (left, right, disparity)


def _write_png(name: str, directory: str) -> None:
    from PIL import Image

    target = os.path.join(directory, f"{name}.png")
    if os.path.isfile(target):
        return
    # Write then rename: several ranks may call this at once, and a reader must never see half a file.
    tmp = f"{target}.{os.getpid()}.tmp"
    Image.fromarray(_photo(name)).convert("RGB").save(tmp, format="PNG")
    os.replace(tmp, target)


def demo_sources(cache_dir: str) -> tuple[SourceSpec, SourceSpec]:
    """Write the scikit-image photos as PNG under cache_dir/{train,heldout} (idempotent, offline)."""
    for split, names in (("train", TRAIN_PHOTOS), ("heldout", HELDOUT_PHOTOS)):
        directory = os.path.join(cache_dir, split)
        os.makedirs(directory, exist_ok=True)
        for name in names:
            _write_png(name, directory)
    train = SourceSpec(name="demo_train", path=os.path.join(cache_dir, "train"), kind="folder")
    heldout = SourceSpec(name="demo_heldout", path=os.path.join(cache_dir, "heldout"), kind="folder")
    return train, heldout
