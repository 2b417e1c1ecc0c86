"""Streaming image data for the Transfusion VAE: sources, mixture, transforms, resumable loader, held-out samples."""

from common.errors import DataError

from .demo import demo_sources
from .records import count_records
from .resolve import ResolvedSource, check_sources, detect_kind, list_images, missing_files, resolve_sources
from .sample import sample_images
from .specs import SourceSpec, load_mixture, parse_source, source_fields
from .stream import ImageStream, build_eval_stream, build_train_stream, make_dataloader
from .transforms import CROP_MODES, MAX_IMAGE_PIXELS, BadImageError, eval_transform, load_image, to_rgb, train_transform

__all__ = [
    "CROP_MODES",
    "MAX_IMAGE_PIXELS",
    "BadImageError",
    "DataError",
    "ImageStream",
    "ResolvedSource",
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
    "missing_files",
    "parse_source",
    "resolve_sources",
    "sample_images",
    "source_fields",
    "to_rgb",
    "train_transform",
]
