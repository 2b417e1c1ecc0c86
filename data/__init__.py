"""Streaming image data for the Transfusion VAE: sources, mixture, transforms, resumable loader, held-out samples."""

from .demo import demo_sources
from .sample import sample_images
from .sources import (
    DataError,
    SourceSpec,
    check_sources,
    count_records,
    detect_kind,
    list_images,
    load_mixture,
    parse_source,
    source_fields,
)
from .stream import ImageStream, build_eval_stream, build_train_stream, make_dataloader
from .transforms import CROP_MODES, MAX_IMAGE_PIXELS, BadImageError, eval_transform, load_image, to_rgb, train_transform

__all__ = [
    "CROP_MODES",
    "MAX_IMAGE_PIXELS",
    "BadImageError",
    "DataError",
    "ImageStream",
    "SourceSpec",
    "build_eval_stream",
    "build_train_stream",
    "check_sources",
    "count_records",
    "demo_sources",
    "detect_kind",
    "eval_transform",
    "list_images",
    "load_image",
    "load_mixture",
    "make_dataloader",
    "parse_source",
    "sample_images",
    "source_fields",
    "to_rgb",
    "train_transform",
]
