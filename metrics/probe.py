"""The latent probe: how fast a small diffusion transformer learns a VAE's latents (eval_vae.py --probe).

A VAE exists for the diffusion model trained on its latents, and two VAEs with equal rFID can
give latents that a diffusion model learns at very different speeds (VA-VAE / LightningDiT, arXiv
2501.01423; REPA-E; "Improving the Diffusability of Autoencoders", arXiv 2502.14831; EQ-VAE, arXiv
2502.09509). The probe measures that directly, at a size that runs on a CPU:

1. data: `crops_per_image` seeded random crops (`crop_mode`, as the trainer's) of every image of
   the evaluated split (at most `max_images`); a fixed fraction of the *images* (chosen by a
   seeded hash of their keys, so every crop of an image is on one side) is held out.
2. latents: each crop encoded once; a seeded sample z ~ q(z|x) (one generator per crop, seeded from
   its key: the latents a diffusion model trains on, and the ones the exported `scaling_factor` was
   measured on, so the posterior's own noise counts), normalised with the model's own convention
   `(z - shift_factor) * scaling_factor` (shift_factor None -> 0), then by `normalise` (standardise:
   global, one number, or channel, each channel's own mean and std over the training latents), cached.
3. model: diffusers' `DiTTransformer2DModel`, 4 layers, 4 heads of 32, patch 2, initialised as DiT's
   `initialize_weights` (initialize_like_dit: adaLN-zero, the untrained probe outputs zeros), in/out
   channels = the latent channels, unconditional (a single class, label dropout off); an EMA of its
   weights (diffusers EMAModel, warmup power 2/3, capped at `ema_decay`) for the held-out loss and samples.
4. objective: rectified flow, x_t = (1 − t)·z + t·ε, the network predicts v = ε − z (MSE),
   t ~ U(0, 1) (uniform: every noise level weighs the same, as the fixed-t held-out losses do),
   timestep fed as 1000·t; Adam, constant learning rate, `steps` steps of `batch_size` latents drawn
   with replacement. Every random draw (init, batches, t, ε, held-out noise, sampling noise, KID's
   subsets) comes from its own seeded generator (the init and KID inside torch.random.fork_rng), never
   from the global RNG: two runs with one seed give identical numbers on CPU.
5. report: the training-loss curve, the held-out loss at fixed t ∈ {0.25, 0.5, 0.75} with fixed
   noise on latents of images the probe never trained on (EMA weights; and the trained weights'),
   comparable only between VAEs of one latent shape (it includes denoising error that depends on C·h·w
   and the per-channel variance), gFID and KID of `samples` decoded samples (Euler, `sample_steps`
   steps from t = 1 to 0) against the uint8 crops of the held-out images under the evaluation's FID
   feature network, and the seconds it took.

A small probe (about 1.4 M parameters at 8 latent channels) on a few hundred latents is a relative measure between VAEs evaluated
with the same settings, not a gFID as published.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

import data
from common.errors import DataError, MetricError
from common.helpers import text_seed
from data.resolve import resolve_source
from data.stream import ImageStream, derive_seed
from metrics.fid import compute_fid
from metrics.pixel import to_uint8
from metrics.reconstruction import latent_noise

LATENT_STD_RANGE = (0.75, 1.33)  # normalised latents outside it were not normalised by measured factors
PROBE_T = (0.25, 0.5, 0.75)  # the noise levels of the held-out loss
TIMESTEP_SCALE = 1000.0  # DiT's sinusoidal timestep embedding expects DDPM-like step numbers
# Stream ids of derive_seed: one generator per purpose.
_CROPS, _SPLIT, _INIT, _TRAIN, _HELD, _SAMPLE, _ENCODE, _KID = range(8)
NORMALISATIONS = ("global", "channel")
CHANNEL_STD_FLOOR = 1e-4  # --probe_normalise channel: a constant channel is divided by this, not by ~0
EMA_POWER = 2.0 / 3.0  # diffusers EMAModel's warmup: decay = min(ema_decay, 1 - (1 + step)^(-power))
KID_SUBSET_SIZE = 1000  # torchmetrics' default; capped by the smaller side


@dataclass(frozen=True)
class ProbeSettings:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-4
    seed: int = 0
    crops_per_image: int = 8
    crop_mode: str = "random_scale"
    held_out_fraction: float = 0.25
    max_images: int | None = 1024
    samples: int = 256  # decoded samples for gFID; 0 = no gFID
    sample_steps: int = 50  # Euler steps of the flow
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    patch_size: int = 2
    normalise: str = "global"  # NORMALISATIONS
    ema_decay: float = 0.9999  # DiT's; with EMA_POWER warmup; 0 = sample from the trained weights
    t_eval: tuple[float, ...] = field(default=PROBE_T)

    def record(self) -> dict:
        out = asdict(self)
        out["t_eval"] = list(self.t_eval)
        return out


# ---------------------------------------------------------------------------------------------
# Latent convention
# ---------------------------------------------------------------------------------------------


def latent_factors(config: Mapping) -> tuple[float, float]:
    """(shift_factor, scaling_factor) of a diffusers VAE config; a missing / None shift is 0, a missing scale 1."""
    get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    shift, scale = get("shift_factor", None), get("scaling_factor", None)
    return float(shift or 0.0), float(1.0 if scale is None else scale)


def normalise_latents(z: torch.Tensor, config: Mapping) -> torch.Tensor:
    """z ~ q(z|x) -> what a diffusion model trains on: (z - shift_factor) * scaling_factor (autoencoder/latents.py)."""
    shift, scale = latent_factors(config)
    return (z - shift) * scale


def denormalise_latents(latents: torch.Tensor, config: Mapping) -> torch.Tensor:
    """The inverse of normalise_latents: latents / scaling_factor + shift_factor, what the decoder takes."""
    shift, scale = latent_factors(config)
    return latents / scale + shift


# ---------------------------------------------------------------------------------------------
# Data: seeded random crops, a held-out set of images
# ---------------------------------------------------------------------------------------------


@dataclass
class ProbeData:
    """uint8 crops (N, 3, R, R), the image key of each crop, and which crops train / are held out."""

    pixels: torch.Tensor
    image_keys: list[str]
    crop_keys: list[str]
    train_images: list[str]
    held_out_images: list[str]

    @property
    def train_index(self) -> torch.Tensor:
        train = set(self.train_images)
        return torch.tensor([i for i, k in enumerate(self.image_keys) if k in train], dtype=torch.long)

    @property
    def held_out_index(self) -> torch.Tensor:
        held = set(self.held_out_images)
        return torch.tensor([i for i, k in enumerate(self.image_keys) if k in held], dtype=torch.long)


def _key_rank(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:probe-split:{key}".encode()).digest()[:8], "little")


def split_images(keys: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train keys, held-out keys), both sorted: the round(fraction·N) keys (at least 1, at most N − 1) with the
    smallest seeded hash are held out; which image lands where depends on its key and the seed only."""
    keys = sorted(set(keys))
    if len(keys) < 2:
        raise DataError(f"the probe needs at least 2 images (one to train on, one held out), got {len(keys)}")
    count = min(len(keys) - 1, max(1, round(fraction * len(keys))))
    ranked = sorted(keys, key=lambda k: (_key_rank(seed, k), k))
    held = set(ranked[:count])
    return [k for k in keys if k not in held], [k for k in keys if k in held]


def load_probe_data(
    source: data.SourceSpec | str,
    resolution: int,
    settings: ProbeSettings,
    *,
    max_samples: int | None = None,
    interpolation: str = "bilinear",
) -> ProbeData:
    """`crops_per_image` seeded random crops of each of the source's first min(max_samples, max_images) images.

    The images are the evaluation's (the same cut of the source); crop k of every image comes from a
    training-style stream seeded with (seed, k), read on this process alone (rank 0 of 1).
    """
    spec = data.parse_source(source) if isinstance(source, str) else source
    limits = [n for n in (max_samples, settings.max_images) if n is not None]
    resolved = resolve_source(spec, 0)
    crops: dict[tuple[str, int], torch.Tensor] = {}
    for k in range(settings.crops_per_image):
        stream = ImageStream(
            [resolved],
            resolution,
            train=True,
            seed=derive_seed(settings.seed, _CROPS, k),
            shuffle_block=1,
            infinite=False,
            max_samples=min(limits) if limits else None,
            interpolation=interpolation,
            crop_mode=settings.crop_mode,
        )
        for sample in stream:
            crops[(sample["key"], k)] = to_uint8(sample["pixel_values"][None], "round")[0]
    if not crops:
        raise DataError(f"the probe's source {spec.path!r} yielded no readable images")
    order = sorted(crops)  # by image key, then crop index
    train, held = split_images([key for key, _ in order], settings.held_out_fraction, settings.seed)
    return ProbeData(
        pixels=torch.stack([crops[o] for o in order]),
        image_keys=[key for key, _ in order],
        crop_keys=[f"{key}#crop{k}" for key, k in order],
        train_images=train,
        held_out_images=held,
    )


def _crop_seed(seed: int, crop_key: str) -> int:
    return text_seed(f"{seed}:probe-latent:{crop_key}")


@torch.no_grad()
def encode_latents(
    vae,
    pixels_u8: torch.Tensor,
    crop_keys: Sequence[str],
    *,
    seed: int,
    batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """Normalised latents (N, C, h, w) float32 on the CPU: a seeded sample z = μ + σ·ε of q(z|x) per crop (ε from a
    generator seeded by the crop's key, so batching never changes it), then (z − shift) · scale."""
    device = next(vae.parameters()).device
    autocast = autocast or contextlib.nullcontext
    out = []
    for start in range(0, len(pixels_u8), batch_size):
        x = pixels_u8[start : start + batch_size].to(device).float().div(127.5).sub(1.0)
        with autocast():
            posterior = vae.encode(x).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()
        keys = crop_keys[start : start + batch_size]
        generators = [torch.Generator().manual_seed(_crop_seed(seed, k)) for k in keys]
        noise = latent_noise(mean.shape, generators, device).to(device)
        out.append(normalise_latents(mean + std * noise, vae.config).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# The probe network and its objective
# ---------------------------------------------------------------------------------------------


def build_probe_model(channels: int, size: int, settings: ProbeSettings, num_classes: int = 1) -> DiTTransformer2DModel:
    """A small DiT on (channels, size, size) latents, seeded init, no label dropout of diffusers' own (it would
    draw from the global RNG): unconditional (one class) for the probe; benchmarks/dit_recipe.py asks for more."""
    if size % settings.patch_size:
        raise MetricError(f"the probe's patch size {settings.patch_size} does not divide the latent size {size}")
    with torch.random.fork_rng(devices=[]):  # the seeded init leaves the global RNG as it was
        torch.manual_seed(derive_seed(settings.seed, _INIT))
        model = DiTTransformer2DModel(
            num_attention_heads=settings.num_heads,
            attention_head_dim=settings.head_dim,
            in_channels=channels,
            out_channels=channels,
            num_layers=settings.num_layers,
            sample_size=size,
            patch_size=settings.patch_size,
            num_embeds_ada_norm=num_classes,
        )
        initialize_like_dit(model)
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model


@torch.no_grad()
def initialize_like_dit(model: DiTTransformer2DModel) -> None:
    """DiT's `initialize_weights` (facebookresearch/DiT models.py) on diffusers' module names: xavier-uniform
    Linear weights and zero biases, the patch embedding like a Linear, N(0, 0.02) label table and timestep MLP
    weights, then adaLN-zero: each block's modulation (norm1.linear) and the final layer (proj_out_1, the final
    modulation; proj_out_2, the output) zeroed, so the untrained network outputs zeros. The sin-cos position
    embedding is diffusers' fixed buffer, as DiT's. Unlike DiT, diffusers gives every block its own timestep /
    label embedding (DiT shares one); each is initialised as DiT's one."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    proj = model.pos_embed.proj
    torch.nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    torch.nn.init.zeros_(proj.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        torch.nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        torch.nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        torch.nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)


def predict_velocity(model: DiTTransformer2DModel, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    labels = torch.zeros(len(x_t), dtype=torch.long, device=x_t.device)
    return model(x_t, timestep=t * TIMESTEP_SCALE, class_labels=labels).sample


def flow_loss(model, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rectified flow: x_t = (1 − t)·z + t·ε, target v = ε − z; mean squared error over every element."""
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * z + tt * noise
    return F.mse_loss(predict_velocity(model, x_t, t), noise - z)


def train_probe(
    model: DiTTransformer2DModel,
    latents: torch.Tensor,
    settings: ProbeSettings,
    *,
    device: torch.device | str = "cpu",
    desc: str = "probe",
    progress: bool = True,
    ema: EMAModel | None = None,
) -> list[float]:
    """Adam for `steps` steps on batches drawn with replacement from `latents` (CPU); returns the per-step losses.
    `ema` (probe_ema): stepped after every optimizer step."""
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    gen = torch.Generator().manual_seed(derive_seed(settings.seed, _TRAIN))
    losses = []
    bar = tqdm(range(settings.steps), desc=desc, unit="step", dynamic_ncols=True, disable=not progress)
    for _ in bar:
        idx = torch.randint(len(latents), (settings.batch_size,), generator=gen)
        t = torch.rand(settings.batch_size, generator=gen)
        noise = torch.randn((settings.batch_size, *latents.shape[1:]), generator=gen)
        loss = flow_loss(model, latents[idx].to(device), t.to(device), noise.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.step(model.parameters())
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.4f}")
    bar.close()
    model.eval()
    return losses


@torch.no_grad()
def held_out_losses(
    model: DiTTransformer2DModel, latents: torch.Tensor, settings: ProbeSettings, device="cpu"
) -> dict[str, float]:
    """{str(t): flow loss at that fixed t} over `latents`, noise from a generator seeded by (seed, t's index)."""
    out = {}
    for i, t_value in enumerate(settings.t_eval):
        gen = torch.Generator().manual_seed(derive_seed(settings.seed, _HELD, i))
        noise = torch.randn(latents.shape, generator=gen)
        total = 0.0
        for start in range(0, len(latents), settings.batch_size):
            z = latents[start : start + settings.batch_size].to(device)
            t = torch.full((len(z),), t_value, device=device)
            total += flow_loss(model, z, t, noise[start : start + len(z)].to(device)).item() * len(z)
        out[f"{t_value:g}"] = total / len(latents)
    return out


@torch.no_grad()
def sample_flow(
    model: DiTTransformer2DModel, count: int, shape: Sequence[int], settings: ProbeSettings, device="cpu"
) -> torch.Tensor:
    """`count` latents (CPU) by Euler steps of dx/dt = v̂ from x_1 = ε (seeded) down to t = 0."""
    gen = torch.Generator().manual_seed(derive_seed(settings.seed, _SAMPLE))
    noise = torch.randn((count, *shape), generator=gen)
    times = torch.linspace(1.0, 0.0, settings.sample_steps + 1).tolist()
    out = []
    for start in range(0, count, settings.batch_size):
        x = noise[start : start + settings.batch_size].to(device)
        for t_now, t_next in itertools.pairwise(times):
            v = predict_velocity(model, x, torch.full((len(x),), t_now, device=device))
            x = x + (t_next - t_now) * v
        out.append(x.cpu())
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int, autocast=None) -> torch.Tensor:
    """Normalised latents -> uint8 (N, 3, R, R) images (rounded), through the model's own convention."""
    device = next(vae.parameters()).device
    autocast = autocast or contextlib.nullcontext
    out = []
    for chunk in latents.split(batch_size):
        with autocast():
            images = vae.decode(denormalise_latents(chunk.to(device), vae.config)).sample
        out.append(to_uint8(images.float(), "round").cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# One probe of one VAE
# ---------------------------------------------------------------------------------------------


def real_fid(fid, pixels_u8: torch.Tensor, batch_size: int):
    """Feed the crops as the real side of a FID (or KID) metric built with reset_real_features=False (kept across
    models); the evaluator gives the held-out images' crops only, never one the probe trained on."""
    device = fid.device
    for chunk in pixels_u8.split(batch_size):
        fid.update(chunk.to(device), real=True)
    return fid


def build_kid(fid, real_count: int, fake_count: int):
    """A torchmetrics KernelInceptionDistance on `fid`'s feature network (uint8 input, the real side kept across
    models), subsets of min(KID_SUBSET_SIZE, real_count, fake_count); None when a side has fewer than 2 images."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(KID_SUBSET_SIZE, real_count, fake_count)
    if size < 2:
        return None
    kid = KernelInceptionDistance(feature=fid.inception, subset_size=size, reset_real_features=False, normalize=False)
    return kid.to(fid.device)


def probe_ema(model: DiTTransformer2DModel, settings: ProbeSettings) -> EMAModel:
    """diffusers EMAModel of the probe's weights: decay min(ema_decay, 1 − (1 + step)^(−2/3)) (its warmup)."""
    return EMAModel(model.parameters(), decay=settings.ema_decay, use_ema_warmup=True, power=EMA_POWER)


def standardise(latents: torch.Tensor, train_idx: torch.Tensor, mode: str) -> tuple[torch.Tensor, dict]:
    """(latents the probe sees, the record): x = (latents − shift) / scale.

    global: the model's own factors as they are (shift 0, scale 1) when they leave the latents' std within
    LATENT_STD_RANGE, else the latents' own mean and std (one number each). channel: each channel's mean and
    std over the training latents (std floored at CHANNEL_STD_FLOOR), so every channel weighs the same in the
    loss. record["shift"], record["scale"]: what sampling undoes before decoding (floats or per-channel lists)."""
    config_std = latents.std().item()
    if mode == "channel":
        train = latents[train_idx]
        shift = train.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
        scale = train.std(dim=(0, 2, 3)).clamp_min(CHANNEL_STD_FLOOR).view(1, -1, 1, 1)
        text = "channel (each channel standardised with its mean and std over the probe's training latents)"
        record = {"shift": shift.flatten().tolist(), "scale": scale.flatten().tolist()}
    elif LATENT_STD_RANGE[0] <= config_std <= LATENT_STD_RANGE[1]:
        shift, scale, text = 0.0, 1.0, "config"
        record = {"shift": shift, "scale": scale}
    else:
        # A checkpoint folder's config still holds the preset's scaling_factor (the export measures the real one):
        # latents that far from unit std would give losses that compare with no other row.
        shift, scale = latents.mean().item(), config_std
        text = (
            f"measured (the config's factors gave std {config_std:.3f}; standardised with the latents' own mean "
            f"{shift:.4f} and std {scale:.4f})"
        )
        record = {"shift": shift, "scale": scale}
    record["normalisation"] = text
    record["latent_std"] = config_std  # after the model's own scaling_factor / shift_factor
    return (latents - shift) / scale, record


def unstandardise(samples: torch.Tensor, record: dict) -> torch.Tensor:
    """The inverse of standardise: back to the model's own convention for decoding."""
    shift, scale = record["shift"], record["scale"]
    if isinstance(shift, list):
        shift, scale = torch.tensor(shift).view(1, -1, 1, 1), torch.tensor(scale).view(1, -1, 1, 1)
    return samples * scale + shift


def sample_scores(vae, model, shape, record: dict, settings: ProbeSettings, fid, kid, fid_backend, autocast):
    """{"gfid", "gfid_error", "kid", "kid_std"} of settings.samples decoded samples of `model` (its EMA weights)."""
    device = next(vae.parameters()).device
    samples = sample_flow(model, settings.samples, shape, settings, device=device)
    images = decode_latents(vae, unstandardise(samples, record), settings.batch_size, autocast)
    out = {"gfid": None, "gfid_error": None, "kid": None, "kid_std": None}
    for metric in (fid, kid):
        if metric is not None:
            metric.reset()  # the fake side only: the metrics were built with reset_real_features=False
            for chunk in images.split(settings.batch_size):
                metric.update(chunk.to(metric.device), real=False)
    try:
        out["gfid"] = compute_fid(fid, fid_backend)
    except MetricError as e:  # e.g. a covariance product without a real square root on few samples
        out["gfid_error"] = str(e)
    if kid is not None:
        with torch.random.fork_rng(devices=[]):  # KID's subsets come from torch.randperm: seeded, global RNG kept
            torch.manual_seed(derive_seed(settings.seed, _KID))
            mean, std = kid.compute()
        out["kid"], out["kid_std"] = mean.item(), std.item()
    return out


def run_probe(
    vae,
    probe_data: ProbeData,
    settings: ProbeSettings,
    *,
    fid=None,
    kid=None,
    fid_backend: str = "torch-fidelity",
    autocast=None,
    desc: str = "probe",
    progress: bool = True,
) -> dict:
    """Encode, train, measure one VAE; returns the JSON-ready record.

    fid, kid: torchmetrics FrechetInceptionDistance / KernelInceptionDistance whose real side already holds the
    held-out crops (real_fid); their fake sides are reset here, filled with the decoded samples and compared.
    """
    device = next(vae.parameters()).device
    start = time.perf_counter()
    latents = encode_latents(
        vae,
        probe_data.pixels,
        probe_data.crop_keys,
        seed=derive_seed(settings.seed, _ENCODE),
        batch_size=settings.batch_size,
        autocast=autocast,
    )
    train_idx, held_idx = probe_data.train_index, probe_data.held_out_index
    latents, norm = standardise(latents, train_idx, settings.normalise)
    channels, size = latents.shape[1], latents.shape[2]
    model = build_probe_model(channels, size, settings)
    ema = probe_ema(model, settings)
    encoded = time.perf_counter()
    losses = train_probe(model, latents[train_idx], settings, device=device, desc=desc, progress=progress, ema=ema)
    trained = time.perf_counter()
    held_raw = held_out_losses(model, latents[held_idx], settings, device=device)
    ema.copy_to(model.parameters())  # the held-out loss and the samples: the EMA weights, as DiT samples
    held = held_out_losses(model, latents[held_idx], settings, device=device)
    scores = {"gfid": None, "gfid_error": None, "kid": None, "kid_std": None}
    if fid is not None and settings.samples > 0:
        scores = sample_scores(vae, model, latents.shape[1:], norm, settings, fid, kid, fid_backend, autocast)
    seconds = time.perf_counter() - start
    window = min(10, len(losses))
    return {
        "held_out_loss": held,
        "held_out_loss_mean": sum(held.values()) / len(held),
        "held_out_loss_raw": held_raw,  # the trained weights, without EMA
        "train_loss": losses,
        "train_loss_first": sum(losses[:window]) / window if window else None,
        "train_loss_last": sum(losses[-window:]) / window if window else None,
        **scores,
        "gfid_samples": settings.samples if fid is not None else 0,
        "latent_shape": list(latents.shape[1:]),
        **norm,
        "latent_mean": latents.mean().item(),
        "num_train_latents": len(train_idx),
        "num_held_out_latents": len(held_idx),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": seconds,
        "seconds_encode": encoded - start,
        "seconds_per_step": (trained - encoded) / max(1, settings.steps),
    }


# ---------------------------------------------------------------------------------------------
# Output: the loss curves of every model in one PNG
# ---------------------------------------------------------------------------------------------


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing running mean over `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_probe_curves(curves: Mapping[str, Sequence[float]], png_path: str, title: str = "") -> str | None:
    """One axis: each model's probe training loss (running mean over steps/50), log y; None when there is no curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    curves = {label: list(v) for label, v in curves.items() if v}
    if not curves:
        return None
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    steps = max(len(v) for v in curves.values())
    window = max(1, steps // 50)
    for i, (label, values) in enumerate(curves.items()):
        ax.plot(range(1, len(values) + 1), smooth(values, window), color=f"C{i}", label=label)
    if all(v > 0 and math.isfinite(v) for values in curves.values() for v in values):
        ax.set_yscale("log")
    ax.set_xlabel("probe step")
    ax.set_ylabel(f"flow-matching loss (running mean of {window})")
    ax.set_title(title or "latent probe: training loss", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    os.makedirs(os.path.dirname(png_path) or ".", exist_ok=True)
    fig.savefig(png_path, dpi=100)
    return png_path
