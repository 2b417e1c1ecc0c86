"""Build, load and adapt diffusers `AutoencoderKL` models.

The model is diffusers' class, unchanged: presets are just constructor arguments, and a
trained model is a `save_pretrained` folder that loads with `AutoencoderKL.from_pretrained`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL

from common.errors import ModelError
from common.helpers import hub_offline, key_mismatch, one_line

logger = logging.getLogger(__name__)


def _preset(channels: tuple[int, ...], layers: int, latent: int, groups: int, size: int) -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=layers,
        act_fn="silu",
        latent_channels=latent,
        norm_num_groups=groups,
        sample_size=size,
    )


# Transfusion (arXiv 2408.11039; docs/recipe.md, section "Model"): 256² -> 32×32×8, attention only
# in the mid block, ≈ 83.7 M parameters. "small" (3.9 M) and "tiny" (0.3 M) keep the 8× geometry and the
# 8 latent channels at sizes a CPU trains: "tiny" is the offline demo's model and the tests' model, "small"
# the convergence benchmark's.
PRESETS: dict[str, dict] = {
    "transfusion": _preset((128, 256, 512, 512), 2, 8, 32, 256),
    "small": _preset((32, 64, 128, 128), 1, 8, 16, 128),
    "tiny": _preset((16, 32, 32, 32), 1, 8, 8, 32),
}


DEFAULT_PRESET = "transfusion"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# diffusers' latent convention keys of an AutoencoderKL config (autoencoder/latents.py).
LATENT_CONVENTION_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")


def is_hub_id(path: str) -> bool:
    """A name that can only mean a Hub repository: nothing there locally, no path prefix, at most one '/'."""
    return not os.path.exists(path) and not path.startswith((".", "/", "~")) and path.count("/") <= 1


def is_url(path: str) -> bool:
    """An http(s) address (a single file that `from_single_file` downloads), not a local path or Hub id."""
    return path.startswith(("http://", "https://"))


def is_single_file(path: str) -> bool:
    """A single-file checkpoint (original LDM layout; a local file or a URL), as `from_single_file` reads it."""
    return path.lower().endswith(SINGLE_FILE_SUFFIXES) and not os.path.isdir(path)


def model_config_form(name: str, what: str = "model config") -> str:
    """What a model config name (--model_config) is: "preset", "json" (a JSON file) or "model" (a model folder or
    Hub id whose config.json is read). Anything else, a folder without an AutoencoderKL config or (offline) a Hub id
    not in the local cache is a one-line ModelError that starts with `what`."""
    if name in PRESETS:
        return "preset"
    if name.endswith(".json") and os.path.isfile(name):
        return "json"
    if os.path.isdir(name) or ("/" in name and is_hub_id(name)):
        check_model_location(name, what)
        return "model"
    raise ModelError(
        f"unknown {what} {name!r}: use one of {', '.join(PRESETS)}, an existing .json file, "
        "a folder holding config.json or a Hub id"
    )


def check_model_location(path: str, what: str) -> None:
    """Check, without loading anything, that `path` can name an AutoencoderKL: a folder holding one (resolve_vae_location),
    a Hub id (offline, HF_HUB_OFFLINE: only one whose config.json is in the local cache) or, for a start model, a
    single file or URL. One-line ModelError starting with `what` otherwise."""
    if is_url(path):
        return
    if os.path.isfile(path):
        if not is_single_file(path):
            raise ModelError(f"{what} {path!r} is not a model file ({'/'.join(SINGLE_FILE_SUFFIXES)})")
        return
    if os.path.isdir(path):
        try:
            resolve_vae_location(path)
        except ModelError as e:
            raise ModelError(f"{what}: {e}") from None
        return
    if not is_hub_id(path) or is_single_file(path):
        raise ModelError(f"{what} {path!r} does not exist")
    if hub_offline() and not _in_hub_cache(path):
        raise ModelError(
            f"{what} {path!r} is neither a local path nor a Hub model in the local cache, and HF_HUB_OFFLINE is set"
        )


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repository id (huggingface_hub's HFValidationError)
        return False


def vae_config(name: str) -> dict:
    """An AutoencoderKL config (no weights) from a preset name, a JSON file, a model folder or a Hub id."""
    form = model_config_form(name)
    if form == "preset":
        return dict(PRESETS[name])
    if form == "json":
        with open(name) as f:
            config = json.load(f)
    else:
        location, sub = resolve_vae_location(name)
        try:
            config = AutoencoderKL.load_config(location, subfolder=sub)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot read an AutoencoderKL config from {name!r}: {one_line(e, name=False)}") from None
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_vae(preset: str | None = None, latent_channels: int | None = None) -> AutoencoderKL:
    """A freshly initialised AutoencoderKL from a preset name (default: transfusion), a JSON config file,
    a model folder or a Hub id (only its config.json is read)."""
    config = vae_config(preset or DEFAULT_PRESET)
    if latent_channels is not None:
        config["latent_channels"] = latent_channels
    try:
        return AutoencoderKL(**config)
    except (TypeError, ValueError) as e:
        raise ModelError(f"invalid AutoencoderKL config {preset!r}: {e}") from None


def resolve_vae_location(path: str) -> tuple[str, str | None]:
    """Map a user path to (pretrained_model_name_or_path, subfolder).

    Accepts a diffusers folder, a training output folder (the exported model at its root),
    a training checkpoint folder (`checkpoint-N/` holding `vae/` and maybe `vae_ema/`), or a hub id.
    """
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return path, None
        for sub in ("vae_ema", "vae"):
            if os.path.isfile(os.path.join(path, sub, "config.json")):
                return path, sub
        raise ModelError(f"{path!r} is a folder but holds no AutoencoderKL (no config.json, vae/ or vae_ema/)")
    if not is_hub_id(path):
        raise ModelError(f"model path {path!r} does not exist")
    return path, None


def load_vae(
    path: str, subfolder: str | None = None, dtype: torch.dtype | None = None, config: str | None = None
) -> AutoencoderKL:
    """Load a pretrained AutoencoderKL as it is, with its own config: a folder, a training checkpoint, a Hub id,
    or a single file in the original LDM layout (`config`: its config, see `load_single_file`); clear error otherwise."""
    if is_single_file(path):
        return load_single_file(path, config, dtype)
    location, found_sub = resolve_vae_location(path)
    subfolder = subfolder or found_sub
    try:
        vae = AutoencoderKL.from_pretrained(location, subfolder=subfolder, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load AutoencoderKL from {path!r}: {one_line(e, name=False)}") from None
    return vae


def load_single_file(path: str, config: str | None = None, dtype: torch.dtype | None = None) -> AutoencoderKL:
    """`AutoencoderKL.from_single_file` of a .safetensors/.ckpt file (or URL) in the original LDM key layout.

    config: the model's config as a preset name, a JSON file, a folder holding config.json or a Hub id;
    None lets diffusers infer it from the checkpoint (it then fetches that model's config.json from the Hub
    or its cache, so offline pass `config`). .ckpt files are read with torch.load(weights_only=True).
    """
    if not is_url(path) and not os.path.isfile(path):
        raise ModelError(f"single-file checkpoint {path!r} does not exist")
    with tempfile.TemporaryDirectory() as tmp:
        if config is not None and model_config_form(config) != "model":
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump({"_class_name": "AutoencoderKL", **vae_config(config)}, f)
            config = tmp
        elif config is not None:
            location, sub = resolve_vae_location(config)
            config = os.path.join(location, sub) if sub else location
        try:
            return AutoencoderKL.from_single_file(
                path, config=config, torch_dtype=dtype, local_files_only=hub_offline() or None
            )
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            hint = (
                " (offline: give its config, a folder or Hub id holding config.json)"
                if config is None and hub_offline()
                else ""
            )
            raise ModelError(
                f"cannot load AutoencoderKL from the single file {path!r}{hint}: {one_line(e, name=False)}"
            ) from None


def latent_convention(vae: AutoencoderKL) -> dict:
    """The model's latent convention as its config holds it: scaling_factor, shift_factor, latents_mean, latents_std."""
    return {key: vae.config.get(key) for key in LATENT_CONVENTION_KEYS}


@dataclass
class InitReport:
    copied: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)
    latent_convention: dict | None = None  # the source's, taken over when the latent channels match

    def summary(self) -> str:
        lines = [f"init_from: copied {len(self.copied)} tensors exactly"]
        if self.adapted:
            lines.append(
                "  adapted (overlapping latent channels copied, the rest freshly initialised): "
                + ", ".join(self.adapted)
            )
        if self.reinitialized:
            lines.append("  re-initialised: " + ", ".join(self.reinitialized))
        if self.latent_convention:
            lines.append(f"  the source's latent convention taken over: {self.latent_convention}")
        return "\n".join(lines)


# For each latent-facing layer: what its (output, input) channel dims hold. "moments" is
# (mean, logvar) stacked, "latent" the latent channels, None anything else.
_LATENT_DIMS = {
    "encoder.conv_out": ("moments", None),
    "quant_conv": ("moments", "moments"),
    "post_quant_conv": ("latent", "latent"),
    "decoder.conv_in": (None, "latent"),
}


def _channel_index(kind: str | None, size: int, latent: int, overlap: int) -> torch.Tensor:
    if kind is None:
        return torch.arange(size)
    first = torch.arange(overlap)
    return torch.cat([first, latent + first]) if kind == "moments" else first


def _copy_overlap(dst: torch.Tensor, src: torch.Tensor, module: str, old_latent: int, new_latent: int) -> None:
    """Copy the channels that exist in both models into a latent-facing tensor (weight or bias)."""
    overlap = min(old_latent, new_latent)
    kinds = _LATENT_DIMS[module][: dst.ndim]  # (out, in) of a weight, (out,) of a bias; kernel dims untouched
    n = len(kinds)
    index_dst = [_channel_index(k, size, new_latent, overlap) for k, size in zip(kinds, dst.shape[:n], strict=True)]
    index_src = [_channel_index(k, size, old_latent, overlap) for k, size in zip(kinds, src.shape[:n], strict=True)]
    block = src.index_select(0, index_src[0])
    if len(kinds) > 1:
        block = block.index_select(1, index_src[1])
        dst.index_copy_(0, index_dst[0], dst.index_select(0, index_dst[0]).index_copy(1, index_dst[1], block))
    else:
        dst.index_copy_(0, index_dst[0], block)


@torch.no_grad()
def init_from_pretrained(vae: AutoencoderKL, source: AutoencoderKL, adapt_latent: bool = True) -> InitReport:
    """Load `source`'s weights into `vae`; only the latent-facing layers may differ in shape.

    Matching tensors are copied exactly. When the latent channel count differs, the four
    latent-facing layers get their overlapping channels copied (`adapt_latent`) or stay at
    their fresh initialisation. Any other mismatch is an error: the architectures differ.
    With the same latent channels, `vae`'s config takes over the source's latent convention
    (scaling_factor, shift_factor, latents_mean, latents_std): the latents are then the source's.
    """
    report = InitReport()
    src_state = source.state_dict()
    dst_state = vae.state_dict()
    missing, unexpected = key_mismatch(dst_state, src_state)
    if missing or unexpected:
        raise ModelError(
            f"init_from: architectures differ ({len(missing)} missing, {len(unexpected)} unexpected tensors, "
            f"e.g. {(missing + unexpected)[:3]})"
        )
    old_latent = source.config.latent_channels
    new_latent = vae.config.latent_channels
    for name, dst in dst_state.items():
        src = src_state[name]
        if src.shape == dst.shape:
            dst.copy_(src.to(dst.dtype))
            report.copied.append(name)
            continue
        module = name.rsplit(".", 1)[0]
        if module not in _LATENT_DIMS or old_latent == new_latent:
            raise ModelError(
                f"init_from: {name} has shape {tuple(src.shape)} in the source and {tuple(dst.shape)} here; "
                "only the latent-facing layers may differ"
            )
        if adapt_latent:
            _copy_overlap(dst, src.to(dst.dtype), module, old_latent, new_latent)
            report.adapted.append(name)
        else:
            report.reinitialized.append(name)
    if old_latent == new_latent:
        report.latent_convention = latent_convention(source)
        vae.register_to_config(**report.latent_convention)
    return report


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
