"""AutoencoderKL weights in the original latent-diffusion ("LDM") key layout: one .safetensors file.

That is the layout ComfyUI's and AUTOMATIC1111's VAE loaders read (`encoder.down.0.block.0.conv1.weight`,
`decoder.up.3.upsample.conv.weight`, `encoder.mid.attn_1.q.weight` as a 1×1 convolution, ...), and the one
diffusers' `AutoencoderKL.from_single_file` converts from. `ldm_state_dict` is the inverse of diffusers'
`convert_ldm_vae_checkpoint` (diffusers/loaders/single_file_utils.py, diffusers 0.42): the same key
renames read the other way, the decoder's up blocks numbered in reverse (diffusers' `up_blocks.0` is the
lowest resolution, LDM's `up.0` the highest), `conv_shortcut` -> `nin_shortcut`, `conv_norm_out` ->
`norm_out`, the mid-block attention's linear weights back to (C, C, 1, 1) convolution weights. The file holds
the weights only: `scaling_factor` / `shift_factor` stay in the diffusers folder's config.json.
"""

from __future__ import annotations

import re

import torch
from safetensors.torch import save_file

from common.errors import ModelError

_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_RENAMES = (
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\."), r"encoder.down.\1.block.\2."),
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\."), r"encoder.down.\1.downsample.conv."),
    (re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\."), None),  # mid.block_{j+1}
    (re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\."), None),  # up.{n-1-i}.block.{j}
    (re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\."), None),  # up.{n-1-i}.upsample.conv
    (re.compile(r"^(encoder|decoder)\.conv_norm_out\."), r"\1.norm_out."),
)
_ATTENTION_KEY = re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.")
_SAME = re.compile(r"^((encoder|decoder)\.(conv_in|conv_out)|quant_conv|post_quant_conv)\.(weight|bias)$")


def ldm_key(key: str, num_up_blocks: int) -> str:
    """The LDM name of one diffusers AutoencoderKL tensor; ModelError for a tensor the layout has no place for."""
    if _SAME.match(key):
        return key
    m = _ATTENTION_KEY.match(key)
    if m:
        return f"{m[1]}.mid.attn_1.{_ATTENTION[m[2]]}." + key[m.end() :]
    for pattern, replacement in _RENAMES:
        m = pattern.match(key)
        if not m:
            continue
        tail = key[m.end() :]
        if replacement is not None:
            new = m.expand(replacement)
        elif "mid_block" in pattern.pattern:
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}."
        elif "resnets" in pattern.pattern:
            new = f"decoder.up.{num_up_blocks - 1 - int(m[1])}.block.{m[2]}."
        else:
            new = f"decoder.up.{num_up_blocks - 1 - int(m[1])}.upsample.conv."
        return new + tail.replace("conv_shortcut.", "nin_shortcut.")
    raise ModelError(f"no place for the tensor {key!r} in the original LDM VAE layout")


def ldm_state_dict(vae) -> dict[str, torch.Tensor]:
    """`vae`'s weights (a diffusers AutoencoderKL) under their LDM names, contiguous CPU tensors, dtype kept."""
    num_up_blocks = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        name = ldm_key(key, num_up_blocks)
        if ".mid.attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # nn.Linear (C, C) -> the 1×1 Conv2d the LDM AttnBlock uses
        out[name] = value.detach().cpu().contiguous()
    return out


def save_single_file(vae, path: str) -> str:
    """Write `vae` as one .safetensors file in the LDM layout (what ComfyUI / A1111 load as a VAE)."""
    if not path.endswith(".safetensors"):
        raise ModelError(f"a single-file VAE is written as .safetensors, got {path!r}")
    save_file(ldm_state_dict(vae), path, metadata={"format": "pt"})
    return path
