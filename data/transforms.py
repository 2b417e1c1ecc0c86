"""Decoding any image file into RGB, and the train / eval crops.

Train (`crop_mode`):
  resize        Resize(shorter side -> R) -> RandomCrop(R)   (the recipe; torchvision's Resize + RandomCrop)
  native        RandomCrop(R) at the image's own scale, no resampling (images with a side < R are
                first resized so the shorter side is R)
  random_scale  Resize(shorter side -> S), S uniform in [R, native shorter side] -> RandomCrop(R)
then -> [-1, 1], optional horizontal flip.
Eval:  Resize(shorter side -> R) -> CenterCrop(R) -> [-1, 1].

Resizing defaults to PIL's bilinear filter, the default of torchvision's `Resize` on PIL images
(which the reference implementation, lavinal712/AutoencoderKL branch transfusion_vae, uses);
PIL's filters are antialiased when downscaling (their support grows with the scale factor).
Images smaller than R are upscaled the same way. Every random choice (scale, crop position,
flip) comes from a numpy Generator the caller passes in, so a resumed stream can redraw exactly
the same crop.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from common.errors import DataError

# An explicit limit instead of relying on PIL's global: images above it are skipped as bad files.
# The value is PIL's own warning threshold (about 9459 x 9459); PIL's DecompressionBombWarning is
# also turned into a skip, so raising this alone does not admit bigger images.
MAX_IMAGE_PIXELS = 89_478_485

INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
}

CROP_MODES = ("resize", "native", "random_scale")

WHITE = (255, 255, 255)


class BadImageError(ValueError):
    """A file that cannot be decoded into an image (corrupt, truncated, not an image, too large)."""


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def load_image(source: bytes | str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode bytes or a file path into an RGB PIL image; raise BadImageError for any bad file."""
    if source is None:
        raise BadImageError("no image data")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise BadImageError("empty file (0 bytes)")
        fp = io.BytesIO(source)
    else:
        fp = os.fspath(source)
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice its limit; for us that is a skip too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise BadImageError(f"{width}x{height} exceeds the limit of {max_pixels} pixels")
                img.seek(0)  # first frame of animated GIF / APNG / multi-page TIFF
                img.load()  # truncated files fail here, not at open()
                return to_rgb(img)
    except BadImageError:
        raise
    except Exception as exc:  # decoders of untrusted files raise anything
        # (OSError, SyntaxError, struct.error, ZeroDivisionError, DecompressionBomb*...), and
        # one bad file in a million must never stop a run; the caller counts it as skipped.
        raise BadImageError(f"{type(exc).__name__}: {exc}") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: EXIF rotation applied, transparency over white."""
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        # Dropping alpha would expose whatever colour sits under transparent pixels (often black
        # or garbage); compositing over white is what a viewer shows.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, and I (32-bit, holds 16-bit PNG data)
        # PIL's own convert("L") clips 16-bit values at 255 (everything above 1/257 turns white).
        values = np.asarray(img).astype(np.float64)
        values = np.clip(values, 0, 65535) / 257.0
        return Image.fromarray(np.round(values).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        values = np.clip(np.asarray(img, dtype=np.float64), 0, 255)  # same convention as PIL's "F" -> "L"
        return Image.fromarray(np.round(values).astype(np.uint8), mode="L").convert("RGB")
    try:
        return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, HSV
    except ValueError as exc:
        raise BadImageError(f"cannot convert mode {mode} to RGB: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def resize_shorter_side(img: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """Resize so the shorter side is exactly `size` (up or down), keeping the aspect ratio."""
    width, height = img.size
    if min(width, height) == size:
        return img
    # The long side as torchvision's Resize(int) computes it (truncated, not rounded), so our
    # crops are pixel-identical to torchvision's.
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    return img.resize(new_size, INTERPOLATIONS[interpolation])


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 RGB image -> float32 (3, H, W) in [-1, 1]."""
    array = np.asarray(img, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    return tensor.float().div_(127.5).sub_(1.0)


def random_scale_size(width: int, height: int, resolution: int, rng: np.random.Generator) -> int:
    """The shorter side random_scale resizes to: uniform integer in [R, native shorter side] (R if smaller)."""
    return int(rng.integers(resolution, max(resolution, min(width, height)) + 1))


def train_transform(
    img: Image.Image,
    resolution: int,
    rng: np.random.Generator,
    *,
    random_flip: bool = False,
    interpolation: str = "bilinear",
    crop_mode: str = "resize",
) -> torch.Tensor:
    """Scale per `crop_mode` -> RandomCrop -> optional flip -> (3, R, R) in [-1, 1]."""
    if crop_mode == "resize":
        img = resize_shorter_side(img, resolution, interpolation)
    elif crop_mode == "native":
        if min(img.size) < resolution:
            img = resize_shorter_side(img, resolution, interpolation)
    elif crop_mode == "random_scale":
        img = resize_shorter_side(img, random_scale_size(*img.size, resolution, rng), interpolation)
    else:
        raise DataError(f"crop_mode {crop_mode!r} is not one of {list(CROP_MODES)}")
    width, height = img.size
    left = rng.integers(0, width - resolution + 1).item()
    top = rng.integers(0, height - resolution + 1).item()
    img = img.crop((left, top, left + resolution, top + resolution))
    # Draw the flip even when disabled so the crop sequence doesn't depend on the flag.
    flip = bool(rng.integers(0, 2))
    if random_flip and flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(img)


def eval_transform(img: Image.Image, resolution: int, *, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize(shorter side) -> CenterCrop -> (3, R, R) in [-1, 1]."""
    img = resize_shorter_side(img, resolution, interpolation)
    width, height = img.size
    left = round((width - resolution) / 2.0)  # torchvision's CenterCrop rounding
    top = round((height - resolution) / 2.0)
    return to_tensor(img.crop((left, top, left + resolution, top + resolution)))
