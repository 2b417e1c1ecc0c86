"""A real-DiT recipe: gFID against training steps of a DiT / SiT-style model trained on a VAE's latents.

    PYTHONPATH=. python benchmarks/dit_recipe.py cache --vae vae-out --source /data/ImageNet/train --out_dir lat
    PYTHONPATH=. python benchmarks/dit_recipe.py train --latents lat --model XL --steps 400000 \
        --eval_at 50000,100000,200000,400000 --out_dir dit-xl
    PYTHONPATH=. python benchmarks/dit_recipe.py estimate --model XL --steps 400000   # GPU hours, no GPU needed

The offline equivalent of the papers' gFID-vs-steps tables (DiT, SiT, LightningDiT, REPA-E, EQ-VAE),
one GPU, one process; the latent probe of `eval_vae.py --probe` (metrics/probe.py) at a real size:

1. `cache`: every image of `--source` (any source the trainer accepts: a folder, an ImageNet / COCO /
   FFHQ layout, parquet, webdataset, a Hub dataset), resized on its shorter side and centre-cropped
   to `--resolution` (`--flip` adds each image's mirror, as DiT's random flips; `--labels folder` stores each
   image's class, the first folder of its key: ImageNet's `<wnid>/`), encoded once by
   metrics.probe.encode_latents: a seeded sample z ~ q(z|x), normalised with the VAE's own
   convention (z − shift_factor) · scaling_factor (autoencoder/latents.py). Written to
   `latents.safetensors` and `latents.json` (VAE, source, count, mean and std of the cached latents).
2. `train`: diffusers' `DiTTransformer2DModel` of a DiT size (`--model S|B|L|XL`, depth/width/heads of
   facebookresearch/DiT's models.py, `--patch_size` 2 by default), built by metrics.probe.build_probe_model:
   unconditional (one class, label dropout off); `--class_conditional`: the same DiT with the cache's classes
   and a null class, labels dropped to it with p = `--class_dropout` (0.1, DiT's), sampled with
   classifier-free guidance `--cfg_scale` on every channel (DiT's sample.py guides the first 3 channels
   only), classes i mod K. Objective: flow matching with SiT's linear interpolant
   and velocity prediction, as the probe: x_t = (1 − t)·z + t·ε, the network predicts v = ε − z (MSE),
   t ~ U(0, 1), timestep fed as 1000·t (metrics.probe.flow_loss; SiT runs t the other way, t = 1 at the
   data, and its network also outputs a σ it does not use); not DiT's DDPM ε-prediction. AdamW (weight decay 0), constant lr 1e-4,
   batch 256 (DiT's and SiT's), EMA of the weights (decay 0.9999, torch's AveragedModel) used for
   every sample. Batches are drawn with replacement from the cached latents by a seeded generator.
3. at each `--eval_at` step: `--fid_samples` samples of the EMA model (metrics.probe.sample_flow: Euler,
   `--sample_steps` steps from t = 1 to 0, the same seeded noise at every evaluation), decoded by the
   VAE, against `--fid_real` centre crops drawn at random (seeded) across the whole of `--fid_source`
   (default: the cached source; data.sample_images) under
   torch-fidelity's Inception (metrics.fid, 2048-d pool3; weights from the torch hub cache or
   `--inception_weights`, never downloaded). Prints and writes (`dit_recipe.json`, `fid_vs_steps.txt`)
   the steps-vs-FID points, training images/s and the achieved TFLOP/s (and the first `--sample_grid`
   samples of each evaluation as `samples_step<N>.png`); the EMA model goes to
   `<out_dir>/ema` (diffusers folder). Every `--checkpoint_every` steps and at the end `<out_dir>/checkpoint`
   keeps what a resume needs (weights, EMA, AdamW, the batch generator, points, losses); the same command
   continues from it, and a larger `--steps` trains on.

What differs from the papers' protocol: unconditional by default (their headline gFIDs are class-conditional
on ImageNet, with and without CFG: `--class_conditional`, `--cfg_scale`); Euler with `--sample_steps` steps (SiT: an adaptive
ODE solver or 250 SDE steps; DiT: 250 DDPM steps); the real side is `--fid_real` (default 10 000) random
crops of the source (ADM's reference batch: all of ImageNet's training set) and the fake side
`--fid_samples` (default 10 000; the papers: 50 000); one process. diffusers' DiT gives every block its
own timestep/label embedder, so it has more parameters than DiT's models.py (e.g. 749.8 M vs 675 M for
XL/2 with 1000 classes); its forward costs the same: `estimate` counts it with torch's FlopCounterMode
and gets DiT's Table 4 Gflops (multiply-adds) within 1 %.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import sys
import time

import torch
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data
from autoencoder.models import load_vae, vae_config
from common.errors import ConfigError, DataError, UserError
from metrics import probe
from metrics.fid import build_fid, compute_fid
from metrics.pixel import to_uint8

# facebookresearch/DiT models.py: DiT_S/B/L/XL = (depth, hidden size, heads); head dim 64 for all four.
# "toy" is no DiT size: a one-block model for CPU tests.
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16), "toy": (1, 32, 2)}
# DiT paper (arXiv 2212.09748) Table 4: Gflops of one forward at 256² (32×32×4 latents); multiply-adds.
DIT_PAPER_GFLOPS = {
    ("S", 2): 6.06, ("S", 4): 1.41, ("S", 8): 0.36,
    ("B", 2): 23.01, ("B", 4): 5.56, ("B", 8): 1.42,
    ("L", 2): 80.71, ("L", 4): 19.70, ("L", 8): 5.01,
    ("XL", 2): 118.64, ("XL", 4): 29.05, ("XL", 8): 7.39,
}  # fmt: skip
H100_BF16_TFLOPS = 989.4  # H100 SXM dense bf16 peak (NVIDIA's datasheet; 1979 is with sparsity)
LATENTS_FILE, META_FILE, RESULT_FILE, TABLE_FILE = (
    "latents.safetensors",
    "latents.json",
    "dit_recipe.json",
    "fid_vs_steps.txt",
)
TRAIN_STREAM = 1  # derive_seed stream of the recipe's batch generator
SAMPLE_STREAM = 5  # the probe's own stream for its sampling noise (metrics/probe.py)


# ---------------------------------------------------------------------------------------------
# Model and cost
# ---------------------------------------------------------------------------------------------


def dit_settings(size: str, patch_size: int, seed: int = 0, **extra) -> probe.ProbeSettings:
    """The probe's settings with a DiT size's depth / heads / head dim and the patch size."""
    depth, width, heads = DIT_SIZES[size]
    return probe.ProbeSettings(
        num_layers=depth, num_heads=heads, head_dim=width // heads, patch_size=patch_size, seed=seed, **extra
    )


def forward_macs(size: str, patch_size: int, channels: int = 4, latent_size: int = 32) -> float:
    """Multiply-adds of one forward of one latent (DiT's "Gflops" count), by torch's FlopCounterMode on a
    meta-device model (no memory, no weights): FlopCounterMode counts 2 FLOPs per multiply-add."""
    settings = dit_settings(size, patch_size)
    with torch.device("meta"):
        model = probe.build_probe_model(channels, latent_size, settings)
        x = torch.zeros(1, channels, latent_size, latent_size)
        t = torch.zeros(1)
    with FlopCounterMode(display=False) as counter:
        probe.predict_velocity(model, x, t)
    return counter.get_total_flops() / 2


def decoder_macs(vae: str, latent_size: int) -> float:
    """Multiply-adds of one VAE decode of a latent_size² latent (a preset, JSON, folder; meta device)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL.from_config(vae_config(vae))
        z = torch.zeros(1, model.config.latent_channels, latent_size, latent_size)
    with FlopCounterMode(display=False) as counter:
        model.decode(z)
    return counter.get_total_flops() / 2


def gpu_hours(flops: float, peak_tflops: float, mfu: float) -> float:
    """Hours of one GPU doing `flops` FLOPs at `mfu` of its `peak_tflops`."""
    return flops / (peak_tflops * 1e12 * mfu) / 3600


def cost_estimate(args) -> dict:
    """FLOPs and GPU hours of a run: training 3 × forward (forward + backward ≈ 2 × forward) per latent per step;
    each evaluation `fid_samples` × `sample_steps` forwards plus one decode per sample (Inception left out)."""
    fwd = forward_macs(args.model, args.patch_size, args.latent_channels, args.latent_size)
    train = 2 * 3 * fwd * args.batch_size * args.steps
    evals = len(args.eval_at) if args.eval_at else 1
    decode = decoder_macs(args.vae_config, args.latent_size) if args.vae_config else 0.0
    sample = 2 * (fwd * args.sample_steps + decode) * args.fid_samples * evals
    return {
        "forward_gmacs": fwd / 1e9,
        "decode_gmacs": decode / 1e9,
        "train_pflop": train / 1e15,
        "sample_pflop": sample / 1e15,
        "peak_tflops": args.peak_tflops,
        "assumed_mfu": args.mfu,
        "train_gpu_hours": gpu_hours(train, args.peak_tflops, args.mfu),
        "sample_gpu_hours": gpu_hours(sample, args.peak_tflops, args.mfu),
    }


# ---------------------------------------------------------------------------------------------
# 1. Latent cache
# ---------------------------------------------------------------------------------------------


def autocast_for(device: torch.device, precision: str):
    if precision == "no":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def encode_source(vae, args, autocast) -> tuple[torch.Tensor, list[str]]:
    """Normalised latents of every centre crop of the source (and of its mirror with --flip), with their keys."""
    stream = data.build_eval_stream(args.source, args.resolution, max_samples=args.max_images)
    loader = data.make_dataloader(stream, args.batch_size, args.num_workers)
    seed = data.stream.derive_seed(args.seed, 0)
    latents, keys = [], []
    for batch in loader:
        pixels = to_uint8(batch["pixel_values"], "round")
        crops = list(batch["key"])
        if args.flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])
            crops = crops + [f"{k}#flip" for k in crops]
        latents.append(
            probe.encode_latents(vae, pixels, crops, seed=seed, batch_size=args.batch_size, autocast=autocast)
        )
        keys += crops
        print(f"\rcached {len(keys)} latents", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    if not keys:
        raise DataError(f"the source {args.source!r} yielded no readable images")
    return torch.cat(latents), keys


def folder_labels(keys: list[str]) -> tuple[torch.Tensor, list[str]]:
    """(label per key, class names sorted): a key's class is its first folder (ImageNet's `<wnid>/<file>`)."""
    if any("/" not in k for k in keys):
        bad = next(k for k in keys if "/" not in k)
        raise DataError(f"--labels folder: the key {bad!r} lies in no folder; class folders hold the images")
    names = [k.split("/", 1)[0] for k in keys]
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[n] for n in names], dtype=torch.long), classes


def cache(args) -> dict:
    device = torch.device(args.device)
    vae = load_vae(args.vae).to(device).eval().requires_grad_(False)
    latents, keys = encode_source(vae, args, autocast_for(device, args.mixed_precision))
    std = latents.std().item()
    meta = {
        "vae": args.vae,
        "source": args.source,
        "resolution": args.resolution,
        "flip": args.flip,
        "seed": args.seed,
        "count": len(keys),
        "latent_shape": list(latents.shape[1:]),
        "dtype": args.latent_dtype,
        "mean": latents.mean().item(),
        "std": std,
        "convention": "latents = (z - shift_factor) * scaling_factor, z ~ q(z|x) (metrics.probe.encode_latents)",
        "shift_factor_scaling_factor": list(probe.latent_factors(vae.config)),
    }
    if not probe.LATENT_STD_RANGE[0] <= std <= probe.LATENT_STD_RANGE[1]:
        print(
            f"warning: the cached latents have std {std:.3f} under the VAE's scaling_factor/shift_factor: the "
            "config's factors were not measured on this model (an exported model's are)",
            file=sys.stderr,
        )
    os.makedirs(args.out_dir, exist_ok=True)
    dtype = getattr(torch, args.latent_dtype)
    tensors = {"latents": latents.to(dtype).contiguous()}
    if args.labels == "folder":
        tensors["labels"], meta["classes"] = folder_labels(keys)
        print(f"{len(meta['classes'])} classes (the keys' first folder)")
    save_file(tensors, os.path.join(args.out_dir, LATENTS_FILE))
    with open(os.path.join(args.out_dir, META_FILE), "w") as f:
        json.dump({**meta, "keys": keys}, f, indent=1)
    print(f"{len(keys)} latents {tuple(latents.shape[1:])} (mean {meta['mean']:.4f}, std {std:.4f}) -> {args.out_dir}")
    return meta


def read_cache(folder: str) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(latents, class labels or None, latents.json) of a folder written by `cache`."""
    paths = [os.path.join(folder, name) for name in (LATENTS_FILE, META_FILE)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"no latent cache in {folder!r} (missing {os.path.basename(missing[0])}): run `cache` first")
    with open(paths[1]) as f:
        meta = json.load(f)
    tensors = load_file(paths[0])
    return tensors["latents"], tensors.get("labels"), meta


# ---------------------------------------------------------------------------------------------
# 2-3. Training, sampling, FID
# ---------------------------------------------------------------------------------------------


def real_side(fid, args, meta, device) -> int:
    """--fid_real centre crops drawn at random across the whole FID source (data.sample_images, seeded) into the
    metric's real side; their count."""
    source = args.fid_source or meta["source"]
    spec = data.parse_source(source)
    images, _ = data.sample_images([spec], args.fid_real, meta["resolution"], seed=args.seed)
    for chunk in images.split(args.eval_batch_size):
        fid.update(to_uint8(chunk, "round").to(device), real=True)
    return len(images)


def evaluate(model, vae, fid, settings, shape, args, autocast, step: int, num_classes: int = 0) -> float:
    """gFID of --fid_samples samples of `model` (seeded Euler noise, the same at every evaluation)."""
    device = next(model.parameters()).device
    with autocast():
        if num_classes:
            samples = sample_guided(model, args.fid_samples, shape, num_classes, args.cfg_scale, settings, device)
        else:
            samples = probe.sample_flow(model, args.fid_samples, shape, settings, device=device)
    images = probe.decode_latents(vae, samples.float(), args.eval_batch_size, autocast)
    if args.sample_grid:  # the first samples (seeded noise: the same ones at every step), for a look
        from torchvision.utils import save_image

        grid = os.path.join(args.out_dir, f"samples_step{step}.png")
        save_image(images[: args.sample_grid].float() / 255.0, grid, nrow=min(8, args.sample_grid))
    fid.reset()  # the fake side only: built with reset_real_features=False
    for chunk in images.split(args.eval_batch_size):
        fid.update(chunk.to(fid.device), real=False)
    return compute_fid(fid)


def train_loop(model, latents, args, device, autocast, on_eval, resume=None, on_checkpoint=None, labels=None):
    """AdamW (no weight decay), constant lr, EMA; calls on_eval(ema_model, step) at each --eval_at step and
    on_checkpoint(step, model, ema, optimizer, generator, losses) every --checkpoint_every steps and at the end.
    `resume`: a checkpoint (load_checkpoint) to continue from; `labels`: class labels (conditional training).
    Returns [(step, loss)] of every --log_every-th step (and every evaluated one) and the EMA model."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model.to(device).train()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay), use_buffers=True)
    ema.update_parameters(model)  # the first update copies: the EMA starts at the initial weights, as DiT's
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(data.stream.derive_seed(args.seed, TRAIN_STREAM))
    first, losses, evals = 1, [], set(args.eval_at)
    if resume is not None:
        model.load_state_dict(resume["model"])
        ema.load_state_dict(resume["ema"])
        optimizer.load_state_dict(resume["optimizer"])
        gen.set_state(resume["generator"])
        first, losses = resume["state"]["step"] + 1, [tuple(x) for x in resume["state"]["losses"]]
    for step in range(first, args.steps + 1):
        idx = torch.randint(len(latents), (args.batch_size,), generator=gen)
        t = torch.rand(args.batch_size, generator=gen)
        noise = torch.randn((args.batch_size, *latents.shape[1:]), generator=gen)
        z = latents[idx].to(device).float()
        with autocast():
            if labels is None:
                loss = probe.flow_loss(model, z, t.to(device), noise.to(device))
            else:  # labels dropped to the null class with --class_dropout, from the same generator
                y = labels[idx].masked_fill(
                    torch.rand(args.batch_size, generator=gen) < args.class_dropout, len_null(model)
                )
                loss = conditional_flow_loss(model, z, t.to(device), noise.to(device), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update_parameters(model)
        if step % args.log_every == 0 or step in evals:
            losses.append((step, loss.item()))
            print(f"step {step}: loss {losses[-1][1]:.4f}", file=sys.stderr, flush=True)
        if step in evals:
            ema.module.eval()
            on_eval(ema.module, step)
            model.train()
        if on_checkpoint is not None and (step % args.checkpoint_every == 0 or step == args.steps):
            on_checkpoint(step, model, ema, optimizer, gen, losses)
    return losses, ema.module


def build_dit(channels: int, size: int, settings: probe.ProbeSettings, num_classes: int = 0):
    """The probe's model (metrics.probe.build_probe_model): unconditional, or with `num_classes` labels and a null
    label (index num_classes, for classifier-free guidance); label drops come from the recipe's generator
    (train_loop), not diffusers' own dropout."""
    return probe.build_probe_model(channels, size, settings, num_classes=num_classes or 1)


def len_null(model) -> int:
    """The null label's index: the number of classes."""
    return int(model.config.num_embeds_ada_norm)


def velocity(model, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(x_t, timestep=t * probe.TIMESTEP_SCALE, class_labels=labels).sample


def conditional_flow_loss(model, z, t, noise, labels) -> torch.Tensor:
    """metrics.probe.flow_loss with class labels: x_t = (1 − t)·z + t·ε, MSE to v = ε − z."""
    tt = t.view(-1, 1, 1, 1)
    return torch.nn.functional.mse_loss(velocity(model, (1 - tt) * z + tt * noise, t, labels), noise - z)


@torch.no_grad()
def sample_guided(model, count: int, shape, num_classes: int, cfg_scale: float, settings, device) -> torch.Tensor:
    """metrics.probe.sample_flow with classes: sample i of class i mod num_classes, the probe's seeded noise, Euler
    from t = 1 to 0 on v_null + cfg_scale·(v_class − v_null) (every channel; cfg_scale 1: v_class alone)."""
    gen = torch.Generator().manual_seed(data.stream.derive_seed(settings.seed, SAMPLE_STREAM))
    noise = torch.randn((count, *shape), generator=gen)
    labels = torch.arange(count) % num_classes
    times = torch.linspace(1.0, 0.0, settings.sample_steps + 1).tolist()
    out = []
    for start in range(0, count, settings.batch_size):
        x = noise[start : start + settings.batch_size].to(device)
        y = labels[start : start + settings.batch_size].to(device)
        null = torch.full_like(y, num_classes)
        for t_now, t_next in itertools.pairwise(times):
            t = torch.full((len(x),), t_now, device=device)
            if cfg_scale == 1.0:
                v = velocity(model, x, t, y)
            else:
                v_class, v_null = velocity(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
                v = v_null + cfg_scale * (v_class - v_null)
            x = x + (t_next - t_now) * v
        out.append(x.float().cpu())
    return torch.cat(out)


# What a resumed run must share with the run that wrote the checkpoint (--steps, --eval_at and the FID flags may change).
RESUME_KEYS = (
    "model", "patch_size", "batch_size", "lr", "ema_decay", "seed", "mixed_precision", "class_conditional", "class_dropout"
)  # fmt: skip
CHECKPOINT_DIR = "checkpoint"


def save_checkpoint(out_dir: str, step, model, ema, optimizer, gen, state: dict) -> None:
    """<out_dir>/checkpoint: weights and EMA (safetensors), optimizer (torch.save of tensors and numbers), the batch
    generator's state, state.json; written to checkpoint.tmp first, then swapped in."""
    final, tmp, old = (os.path.join(out_dir, CHECKPOINT_DIR + suffix) for suffix in ("", ".tmp", ".old"))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    def tensors(module) -> dict:
        return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}

    save_file(tensors(model), os.path.join(tmp, "model.safetensors"))
    save_file(tensors(ema), os.path.join(tmp, "ema.safetensors"))
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    save_file({"generator": gen.get_state()}, os.path.join(tmp, "generator.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({**state, "step": step}, f)
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(args, device) -> dict | None:
    """The checkpoint of --out_dir to resume from (--resume), None when there is none; ConfigError (one line) when
    it was written with other settings or latents."""
    folder = os.path.join(args.out_dir, CHECKPOINT_DIR)
    if not args.resume or not os.path.isfile(os.path.join(folder, "state.json")):
        return None
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    differ = [k for k in RESUME_KEYS if state["settings"].get(k) != getattr(args, k)]
    if state["latents"] != os.path.abspath(args.latents):
        differ.append("latents")
    if differ:
        were = ", ".join(f"--{k} {state['settings'].get(k, state.get(k))}" for k in differ)
        raise ConfigError(f"{folder} was written with {were}: resume with those, or use another --out_dir")
    return {
        "state": state,
        "model": load_file(os.path.join(folder, "model.safetensors"), device=str(device)),
        "ema": load_file(os.path.join(folder, "ema.safetensors"), device=str(device)),
        "optimizer": torch.load(os.path.join(folder, "optimizer.pt"), map_location=device, weights_only=True),
        "generator": load_file(os.path.join(folder, "generator.safetensors"))["generator"],
    }


def train(args) -> dict:
    latents, labels, meta = read_cache(args.latents)
    if args.class_conditional and labels is None:
        raise ConfigError(f"--class_conditional: {args.latents!r} holds no labels; cache with --labels folder")
    num_classes = len(meta["classes"]) if args.class_conditional else 0
    device = torch.device(args.device)
    autocast = autocast_for(device, args.mixed_precision)
    shape = tuple(latents.shape[1:])
    settings = dit_settings(
        args.model,
        args.patch_size,
        seed=args.seed,
        batch_size=args.eval_batch_size,
        sample_steps=args.sample_steps,
        samples=args.fid_samples,
    )
    if shape[1] % args.patch_size or shape[1] != shape[2]:
        raise ConfigError(f"--patch_size {args.patch_size} does not divide the cached latents' {shape[1:]} grid")
    resume = load_checkpoint(args, device)
    os.makedirs(args.out_dir, exist_ok=True)
    fid = build_fid(args.inception_weights, features=args.fid_features, reset_real_features=False).to(device)
    vae = load_vae(args.vae or meta["vae"]).to(device).eval().requires_grad_(False)
    num_real = real_side(fid, args, meta, device)
    model = build_dit(shape[0], shape[1], settings, num_classes)
    macs = forward_macs(args.model, args.patch_size, shape[0], shape[1])
    done = resume["state"] if resume else {"points": [], "train_seconds": 0.0, "step": 0}
    points, clock = list(done["points"]), {"train": done["train_seconds"], "mark": time.perf_counter()}

    def on_eval(ema_model, step):
        clock["train"] += time.perf_counter() - clock["mark"]
        start = time.perf_counter()
        value = evaluate(ema_model, vae, fid, settings, shape, args, autocast, step, num_classes)
        points[:] = [p for p in points if p["step"] != step]  # a resumed run measures a step again: the new one counts
        points.append({"step": step, "fid": value, "eval_seconds": time.perf_counter() - start})
        print(f"step {step}: FID {value:.3f} ({args.fid_samples} samples, {args.sample_steps} Euler steps)")
        clock["mark"] = time.perf_counter()

    def on_checkpoint(step, *objects_and_losses):
        clock["train"] += time.perf_counter() - clock["mark"]
        run = {"settings": {k: getattr(args, k) for k in RESUME_KEYS}, "latents": os.path.abspath(args.latents)}
        run.update(points=points, train_seconds=clock["train"], losses=objects_and_losses[-1])
        save_checkpoint(args.out_dir, step, *objects_and_losses[:-1], run)
        clock["mark"] = time.perf_counter()

    labels = labels if num_classes else None
    losses, ema_model = train_loop(model, latents, args, device, autocast, on_eval, resume, on_checkpoint, labels)
    clock["train"] += time.perf_counter() - clock["mark"]
    images_per_s = (args.steps - done["step"]) * args.batch_size / max(clock["train"] - done["train_seconds"], 1e-9)
    record = {
        "config": vars(args),
        "cache": meta,
        "resumed_from_step": done["step"],
        "model": {"size": args.model, "patch_size": args.patch_size, "depth_width_heads": DIT_SIZES[args.model]},
        "classes": num_classes,
        "parameters": sum(p.numel() for p in model.parameters()),
        "objective": "linear flow matching (SiT): x_t = (1-t) z + t eps, v = eps - z, t ~ U(0,1); Euler sampling",
        "fid": "torch-fidelity Inception " + str(args.fid_features) + "-d",
        "fid_real_images": num_real,
        "points": sorted(points, key=lambda p: p["step"]),
        "loss": losses,
        "train_seconds": clock["train"],
        "train_images_per_s": images_per_s,
        "forward_gmacs": macs / 1e9,
        "achieved_tflops": 2 * 3 * macs * images_per_s / 1e12,
    }
    write_outputs(args.out_dir, record)
    ema_model.save_pretrained(os.path.join(args.out_dir, "ema"))
    return record


def write_outputs(out_dir: str, record: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, RESULT_FILE), "w") as f:
        json.dump(record, f, indent=1)
    lines = [f"{'step':>10} {'FID':>10}"] + [f"{p['step']:>10} {p['fid']:>10.3f}" for p in record["points"]]
    lines.append(
        f"train: {record['train_images_per_s']:.1f} latents/s, {record['achieved_tflops']:.2f} TFLOP/s achieved "
        f"({record['forward_gmacs']:.3f} GMACs per forward, x3 for training)"
    )
    with open(os.path.join(out_dir, TABLE_FILE), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def steps_list(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step numbers, got {text!r}") from None
    return values


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="XL", choices=tuple(DIT_SIZES), help="DiT size (toy: a 1-block test model)")
    p.add_argument("--patch_size", type=int, default=2, choices=(1, 2, 4, 8))
    p.add_argument("--steps", type=int, default=400_000, help="training steps")
    p.add_argument("--batch_size", type=int, default=256, help="latents per training step")
    p.add_argument(
        "--eval_at", type=steps_list, default=None, help="steps at which to sample and measure FID, e.g. 50000,100000"
    )
    p.add_argument("--fid_samples", type=int, default=10_000, help="samples per FID evaluation (the papers: 50000)")
    p.add_argument("--sample_steps", type=int, default=250, help="Euler steps per sample")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cache", help="encode a source's centre crops once into <out_dir>/latents.safetensors")
    c.add_argument("--vae", required=True, help="the VAE: a folder, checkpoint, Hub id or single file")
    c.add_argument("--source", required=True, help="a source as the trainer's --source takes it")
    c.add_argument("--resolution", type=int, default=256)
    c.add_argument(
        "--max_images",
        type=int,
        default=None,
        help="the source's first N images in its sorted order (a class-sorted layout: the first classes only)",
    )
    c.add_argument("--flip", action="store_true", help="also cache each image's horizontal mirror")
    c.add_argument(
        "--labels",
        default="none",
        choices=("none", "folder"),
        help="folder: store each image's class, the first folder of its key (ImageNet's <wnid>/), for --class_conditional",
    )
    c.add_argument("--latent_dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    c.add_argument("--batch_size", type=int, default=64)
    c.add_argument("--out_dir", required=True)
    t = sub.add_parser("train", help="train a DiT on cached latents, FID at --eval_at steps")
    t.add_argument("--latents", required=True, help="a folder written by `cache`")
    add_model_flags(t)
    t.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, constant (DiT's, SiT's)")
    t.add_argument("--ema_decay", type=float, default=0.9999)
    t.add_argument(
        "--class_conditional", action="store_true", help="condition on the cache's labels (cache --labels folder)"
    )
    t.add_argument("--class_dropout", type=float, default=0.1, help="labels dropped to the null class (DiT's 0.1)")
    t.add_argument("--cfg_scale", type=float, default=1.0, help="classifier-free guidance when sampling (1: none)")
    t.add_argument("--vae", default=None, help="decoder for the samples (default: the cache's VAE)")
    t.add_argument("--fid_source", default=None, help="real side of FID (default: the cached source)")
    t.add_argument(
        "--fid_real",
        type=int,
        default=10_000,
        help="real images, drawn at random across --fid_source (held in memory: N·3·R²·4 bytes)",
    )
    t.add_argument("--fid_features", type=int, default=2048, choices=(2048, 768, 192, 64))
    t.add_argument(
        "--inception_weights", default=None, help="torch-fidelity's Inception file (default: torch hub cache)"
    )
    t.add_argument("--eval_batch_size", type=int, default=256)
    t.add_argument("--sample_grid", type=int, default=64, help="samples saved as samples_step<N>.png (0: none)")
    t.add_argument("--log_every", type=int, default=100)
    t.add_argument(
        "--checkpoint_every", type=int, default=5000, help="steps between checkpoints (<out_dir>/checkpoint)"
    )
    t.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from <out_dir>/checkpoint when there is one (--steps may be raised to train on)",
    )
    t.add_argument("--out_dir", required=True)
    for q in (c, t):
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        q.add_argument(
            "--mixed_precision", default=None, choices=("bf16", "no"), help="bf16 autocast (default: on CUDA)"
        )
        q.add_argument("--num_workers", type=int, default=4)
        q.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("estimate", help="FLOPs and GPU hours of a run (arithmetic; nothing runs)")
    add_model_flags(e)
    e.add_argument("--latent_channels", type=int, default=4)
    e.add_argument("--latent_size", type=int, default=32)
    e.add_argument("--vae_config", default="transfusion", help="VAE whose decode is counted ('' for none)")
    e.add_argument("--peak_tflops", type=float, default=H100_BF16_TFLOPS, help="the GPU's dense bf16 peak")
    e.add_argument("--mfu", type=float, default=0.4, help="assumed fraction of the peak reached (not measured)")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Flag errors before anything is built: p.error prints one line and exits with status 2."""
    positive = (
        "steps",
        "batch_size",
        "fid_samples",
        "sample_steps",
        "eval_batch_size",
        "log_every",
        "fid_real",
        "checkpoint_every",
    )
    for key in positive:
        if getattr(args, key, 1) < 1:
            p.error(f"--{key} must be >= 1, got {getattr(args, key)}")
    if getattr(args, "eval_at", None):
        bad = [s for s in args.eval_at if not 1 <= s <= args.steps]
        if bad:
            p.error(f"--eval_at steps must lie in [1, --steps={args.steps}], got {bad}")
    if getattr(args, "sample_grid", 0) < 0:
        p.error(f"--sample_grid must be >= 0, got {args.sample_grid}")
    if args.command == "train" and not args.eval_at:
        args.eval_at = [args.steps]
    if args.command == "train" and not 0.0 <= args.class_dropout < 1.0:
        p.error(f"--class_dropout must lie in [0, 1), got {args.class_dropout}")
    if args.command == "train" and not 0.0 <= args.ema_decay < 1.0:
        p.error(f"--ema_decay must lie in [0, 1), got {args.ema_decay}")
    if args.command == "estimate" and not 0.0 < args.mfu <= 1.0:
        p.error(f"--mfu must lie in (0, 1], got {args.mfu}")
    if args.command in ("cache", "train") and args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here")
    if args.command in ("cache", "train") and args.mixed_precision is None:
        args.mixed_precision = "bf16" if args.device.startswith("cuda") else "no"


def print_estimate(args) -> dict:
    est = cost_estimate(args)
    print(
        f"DiT-{args.model}/{args.patch_size} on {args.latent_channels}x{args.latent_size}²: "
        f"{est['forward_gmacs']:.2f} GMACs per forward; decode {est['decode_gmacs']:.1f} GMACs per sample\n"
        f"train {args.steps} steps x {args.batch_size}: {est['train_pflop']:.0f} PFLOP = "
        f"{est['train_gpu_hours']:.1f} GPU hours at {args.mfu:.0%} of {args.peak_tflops:g} TFLOP/s (assumed)\n"
        f"sample {len(args.eval_at or [1])} x {args.fid_samples} x {args.sample_steps} steps + decode: "
        f"{est['sample_pflop']:.0f} PFLOP = {est['sample_gpu_hours']:.1f} GPU hours"
    )
    return est


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        if args.command == "estimate":
            return print_estimate(args)
        if args.device == "cpu":
            torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
        return cache(args) if args.command == "cache" else train(args)
    except UserError as e:
        print(f"dit_recipe.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
