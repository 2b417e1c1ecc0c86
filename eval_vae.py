"""Evaluate AutoencoderKL reconstructions: rFID, PSNR, SSIM, LPIPS, the model next to baselines.

    python eval_vae.py --pretrained_model_name_or_path vae-out --dataset /data/ImageNet \
        --split validation --resolution 256 --baseline stabilityai/sd-vae-ft-mse
    accelerate launch --multi_gpu eval_vae.py ...            # each rank evaluates its own images

--dataset is a path or hub id, or the trainer's source syntax (--validation_source), e.g.
name=in1k,path=/data/in1k,kind=hub_snapshot,split=validation; keys it leaves out come from
--split, --dataset_config and --image_column.

Different VAE papers and trainers report different numbers for the same model because their
protocols differ. Every choice is a flag here and is written into the output. "The reference"
below is the reference implementation (lavinal712/AutoencoderKL, branch transfusion_vae):
  --latent {mean,sample}    decode the posterior mean (default; deterministic) or a sample
                            (the reference; seeded per image, so any batch size / rank count
                            gives the same noise)
  --uint8 {round,truncate}  how [-1, 1] becomes the uint8 PNG / FID input; the reference
                            truncates, which loses a grey level even on references
  --ssim_window {uniform,gaussian}  scikit-image's default 7×7 (the reference) or Wang et al.'s
                            11-tap Gaussian σ 1.5
  --interpolation {bilinear,bicubic}  the shorter-side resize filter; bilinear = torchvision's
                            Resize on PIL images, as the reference
  --fid_backend {torch-fidelity,pytorch-fid,clean-fid}  the rFID package: its own Inception file,
                            resize to 299 and Fréchet distance (metrics/fid.py); the reference ran
                            `python -m pytorch_fid gt/ rec/`, i.e. pytorch-fid
  --protocol seed           all of them as the reference: sample, truncate, uniform, bilinear,
                            pytorch-fid
Fixed: Resize(R) shorter side + CenterCrop(R); PSNR and SSIM per image on float [0, 1]
clipped (data_range 1, float64, equal to scikit-image), averaged; LPIPS-VGG v0.1 per image on
the unclipped [-1, 1] tensors, as the reference; rFID = FID between the uint8 reference crops (real)
and the uint8 reconstructions (fake), the very images --save_images writes, with the
--fid_backend package's Inception v3 pool3 and Fréchet distance (torch-fidelity by default; the
three share the TF Inception weights but resize to 299 differently, so their numbers differ:
compare a table only with one made by the same backend). Means are over images, std is the
population std (np.std, as the reference prints). The reconstruction path
(metrics.reconstruct, metrics.image_metrics) is the trainer's: its held-out numbers equal these.

Side effects (progress bar, stdout, JSON, the table, the grid, --update_model_card) happen on
the main process only; with --save_images each rank writes the PNGs of its own images
(disjoint files) rather than funnelling 50k images through rank 0.

--probe (off by default) adds the latent probe (metrics/probe.py, docs/latent_quality.md): a small
DiT trained with rectified flow on each model's normalised latents of seeded crops of this split,
the same settings for every model; held-out loss at fixed t, the loss curves (probe_curve.png),
gFID of its samples, a second table. It runs on the main process only, after the gathering.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

import data
import metrics
from autoencoder.models import is_single_file, load_vae
from common.cli import fail, parse_config, to_dict
from common.errors import ModelError, UserError
from common.helpers import set_torch_backends, stderr_is_terminal, text_seed
from data.kinds import HUB, reader_of
from evaluation.config import PROTOCOLS, EvalConfig
from evaluation.probing import run_probes, write_probe_outputs
from evaluation.report import CUSTOM_FID, latent_table, markdown_table, noise_table, probe_table
from losses.perceptual import build_lpips
from losses.weights import build_on_every_node, weights_fingerprint
from metrics import drift, image_metrics, latents, reconstruct, save_grid
from metrics import fid as fid_backends
from publishing.card import load_card, update_model_card, update_model_card_probe

PROG = "eval_vae.py"

# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


@dataclass
class ModelUnderEval:
    """One model under evaluation and its running FID state."""

    label: str
    path: str
    role: str
    vae: torch.nn.Module
    fid: object | None
    nonfinite: int = 0
    latent: dict | None = None  # metrics.latents sums over this rank's images


def drift_pair(models: list[ModelUnderEval]) -> tuple[ModelUnderEval, ModelUnderEval] | None:
    """(the model, the first baseline) when the baseline is there and shares the model's latent space."""
    model = models[0]
    base = next((m for m in models if m.role == "baseline"), None)
    if base is None or not drift.same_latent_space(model.vae, base.vae):
        return None
    return model, base


def model_labels(paths: list[str]) -> list[str]:
    """Short unique table labels: the last path component (or hub id), numbered on clashes."""
    labels = []
    for path in paths:
        base = os.path.basename(os.path.normpath(path)) if os.path.exists(path) else path
        label, n = base, 2
        while label in labels:
            label, n = f"{base} ({n})", n + 1
        labels.append(label)
    return labels


NOISE_TAG = "@noise"  # per-image metric names of --latent_noise: "psnr@noise0.1"


def noise_entry(cfg: EvalConfig, summary: dict, config) -> dict | None:
    """The model's --latent_noise record: per σ, the means over images of each metric (and their std)."""
    if not cfg.latent_noise:
        return None
    sigmas, by_sigma = cfg.latent_noise_sigma, {}
    for sigma in sigmas:
        tag = f"{NOISE_TAG}{sigma:g}"
        by_sigma[f"{sigma:g}"] = {name[: -len(tag)]: v for name, v in summary.items() if name.endswith(tag)}
    return {"sigmas": list(sigmas), "scaling_factor": float(config.scaling_factor or 1.0), "metrics": by_sigma}


def image_noise_seed(seed: int, key: str) -> int:
    """A per-image seed: the sampled latent depends on the image, never on batching or rank."""
    return text_seed(f"{seed}:{key}")


def safe_name(text: str) -> str:
    """A file name for an image key or model label ('val/n01/x.JPEG' -> 'val__n01__x.JPEG')."""
    return re.sub(r"[^\w.-]", "_", text.replace("/", "__"))


def save_pngs(folder: str, keys: list[str], images_u8: torch.Tensor) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for key, img in zip(keys, images_u8.permute(0, 2, 3, 1).cpu().numpy(), strict=False):  # (B, H, W, 3)
        Image.fromarray(img).save(os.path.join(folder, safe_name(key) + ".png"))


def dataset_source(cfg: EvalConfig) -> data.SourceSpec:
    """--dataset as a data.SourceSpec: a path / hub id, or the trainer's 'name=..,path=..,kind=..' syntax
    (an existing path with '=' in it stays a path); --split, --dataset_config and --image_column fill
    the keys it leaves out. Named after the folder (a path) or the whole id (a hub id), as the card shows it."""
    text = cfg.dataset
    described = "=" in text and not os.path.exists(text)
    path = str(data.source_fields(text).get("path", "")) if described else text
    defaults = {
        "name": os.path.basename(os.path.normpath(path)) if os.path.exists(path) else path,
        "split": cfg.split,
        "config": cfg.dataset_config,
        "image_column": cfg.image_column,
    }
    return data.parse_source(text, defaults) if described else data.SourceSpec(path=text, **defaults)


def load_models(cfg: EvalConfig) -> list[tuple[str, str, str, torch.nn.Module]]:
    """(label, path, role, vae) for the model and each baseline; ModelError on the first bad one."""
    paths = [cfg.pretrained_model_name_or_path, *cfg.baseline]
    roles = ["model"] + ["baseline"] * len(cfg.baseline)
    out = []
    for label, path, role in zip(model_labels(paths), paths, roles, strict=False):
        vae = load_vae(path, config=cfg.model_config if is_single_file(path) else None)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if cfg.resolution % factor:
            raise ModelError(
                f"--resolution {cfg.resolution} is not divisible by {path!r}'s downsampling factor {factor}"
            )
        out.append((label, path, role, vae.eval().requires_grad_(False)))
    return out


def build_lpips_on_every_node(cfg: EvalConfig, accelerator: Accelerator) -> torch.nn.Module:
    """LPIPS, built on each node's local main process first (it reads that node's torch hub cache), then on the
    node's other ranks; the ranks then compare what they loaded and all stop in one line when one failed (a node
    without the VGG16 file) or holds other weights (`losses.weights.build_on_every_node`): its ranks would
    otherwise exit alone and leave the others waiting in the first gather, or score their share of the images
    with another network."""

    def build() -> torch.nn.Module:
        if cfg.perception_weights == "random":
            torch.manual_seed(cfg.seed)  # the same random VGG on every rank and in every run
        return build_lpips(pretrained=cfg.perception_weights == "pretrained")

    return build_on_every_node(
        accelerator, build, lambda net: weights_fingerprint({"LPIPS": net}, cfg.perception_weights)
    )


def build_fids(n: int, cfg: EvalConfig, inception_path: str | None, feature_extractor: torch.nn.Module | None) -> list:
    """One FID metric per model sharing one feature network; synced explicitly (see finish_fid)."""
    if not cfg.fid:
        return [None] * n
    backend = cfg.resolved_protocol()["fid_backend"]
    first = metrics.build_fid(
        inception_path, feature_extractor, features=cfg.fid_features, backend=backend, sync_on_compute=False
    )
    return [first] + [metrics.build_fid(feature_extractor=first.inception, sync_on_compute=False) for _ in range(n - 1)]


def finish_fid(fid, is_main: bool, backend: str = "torch-fidelity") -> float | None:
    """Sum FID states over ranks (a collective: every rank calls it), compute on the main process only.

    The value is the --fid_backend package's own Fréchet distance of the summed statistics.

    The 2048×2048 eigen-decomposition takes seconds; one rank doing it is enough.
    """
    fid.sync()
    if not is_main:
        return None
    if int(fid.real_features_num_samples) < 2:
        return None  # FID needs at least two images per side
    return metrics.compute_fid(fid, backend)


def protocol_record(cfg: EvalConfig, chosen: dict[str, str], mixed_precision: str, inception_path: str | None) -> dict:
    seed_like = chosen == PROTOCOLS["seed"]
    res = cfg.resolution
    noise = f"per-image torch.Generator seeded from sha256(seed={cfg.seed}, key)"
    window = (
        ", 7x7 uniform window, sample covariance)"
        if chosen["ssim_window"] == "uniform"
        else ", gaussian_weights, sigma 1.5, population covariance)"
    )
    random_vgg = f" (torch.manual_seed({cfg.seed}); NOT LPIPS, smoke runs only)"
    return {
        "name": "seed" if seed_like else ("default" if chosen == PROTOCOLS["default"] else "custom"),
        **chosen,
        "latent_noise": noise if chosen["latent"] == "sample" else None,
        "preprocessing": f"Resize({res}, PIL {chosen['interpolation']}) shorter side + CenterCrop({res}), [-1, 1]",
        "psnr": "per image on float [0,1] clipped, data_range 1, float64 (= skimage peak_signal_noise_ratio), "
        "mean over images",
        "ssim": "per image on float [0,1] clipped, data_range 1, float64, channel mean, valid-region mean "
        "(= skimage structural_similarity" + window,
        "lpips": f"lpips v0.1 vgg, {cfg.perception_weights} VGG16 trunk"
        + (random_vgg if cfg.perception_weights == "random" else "")
        + ", on [-1,1] decoder output (not clipped)",
        "rfid": (
            f"{fid_backends.describe(chosen['fid_backend'], fid_layer(cfg.fid_features))}; mean and covariance "
            "from float64 feature sums; "
            f"real = uint8 reference crops, fake = uint8 reconstructions ({chosen['uint8']})"
            if cfg.fid
            else "skipped (--no-fid)"
        ),
        "fid_backend_version": fid_backends.package_version(chosen["fid_backend"]),
        "inception_weights": inception_path,
        "lpips_weights": cfg.perception_weights,
        "std": "population std over images (np.std)",
        "mixed_precision": mixed_precision,
        "tf32": cfg.allow_tf32,
    }


def fid_layer(features: int) -> str:
    return "2048-d pool3" if features == 2048 else f"{features}-d layer (NOT the standard 2048-d pool3)"


def versions() -> dict[str, str]:
    import diffusers
    import skimage
    import torchmetrics

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "torchmetrics": torchmetrics.__version__,
        "scikit-image": skimage.__version__,
        "python": sys.version.split()[0],
    }


def sum_all(sums: list[dict]) -> dict:
    """The ranks' metrics.latents sums added up."""
    total = None
    for s in sums:
        total = latents.add_sums(total, s)
    return total


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------


class Evaluator:
    """Holds what one evaluation needs; `run` goes over this rank's images, `result` gathers them."""

    def __init__(self, cfg: EvalConfig, accelerator: Accelerator, feature_extractor=None, lpips=None):
        self.cfg, self.accelerator = cfg, accelerator
        self.device = accelerator.device
        self.protocol = cfg.resolved_protocol()
        self.mixed_precision = cfg.mixed_precision or accelerator.mixed_precision or "no"
        set_torch_backends(cfg.allow_tf32)

        # Cheap checks first — data, models, FID weights, LPIPS weights — each fails with one line; the
        # model comes before the metric weights so that a mistyped model path is the first thing reported.
        self.source = dataset_source(cfg)
        data.check_sources([self.source])
        self.source_kind = data.detect_kind(self.source.path) if self.source.kind == "auto" else self.source.kind
        models = load_models(cfg)
        use_inception = cfg.fid and feature_extractor is None
        backend = self.protocol["fid_backend"]
        self.inception_path = (
            metrics.resolve_inception_weights(cfg.inception_weights, backend) if use_inception else None
        )
        self.lpips = (lpips if lpips is not None else build_lpips_on_every_node(cfg, accelerator)).to(self.device)
        fids = build_fids(len(models), cfg, self.inception_path, feature_extractor)
        self.models = [
            ModelUnderEval(label, path, role, vae.to(self.device), fid.to(self.device) if fid is not None else None)
            for (label, path, role, vae), fid in zip(models, fids, strict=False)
        ]
        self.record = protocol_record(cfg, self.protocol, self.mixed_precision, self.inception_path)
        self.drift_pair = drift_pair(self.models)
        if cfg.fid and feature_extractor is not None:
            self.record["rfid"] += CUSTOM_FID

        # Our own autocast rather than Accelerator's: AcceleratorState is a process-wide
        # singleton that refuses a second setting, and tests run several evaluations.
        amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.mixed_precision)
        self.autocast = contextlib.nullcontext
        if amp_dtype:
            self.autocast = lambda: torch.autocast(self.device.type, dtype=amp_dtype)

        self.per_image: list[tuple[str, dict[str, dict[str, float]]]] = []  # (key, {label: {metric: value}})
        self.grid_rows: list[tuple[str, list[torch.Tensor]]] = []
        self.skipped = 0
        self.seconds = 0.0

    def loader(self):
        stream = data.build_eval_stream(
            self.source,
            self.cfg.resolution,
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
            max_samples=self.cfg.max_samples,
            interpolation=self.protocol["interpolation"],
        )
        # Not accelerator.prepare'd: the stream already gives each rank its own images, and
        # prepare would pad the last batch with duplicates.
        return data.make_dataloader(stream, self.cfg.batch_size, self.cfg.num_workers)

    def expected_images(self, resolved) -> int | None:
        """This rank's share of the images when known up front, else None: folders (the file list), parquet
        shards and Hub dataset folders of them (the shards' footers), hub splits with a count.

        resolved: the stream's data.ResolvedSource (listed files or the opened hub split).
        """
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        if reader_of(resolved.kind) != HUB:
            count = data.count_records(resolved, rank=rank, world_size=world, max_samples=self.cfg.max_samples)
            if count is not None:
                return count
            total = None  # webdataset: unknown without reading every tar
        else:
            splits = getattr(getattr(resolved.hub, "info", None), "splits", None) or {}
            total = getattr(splits.get(self.source.split), "num_examples", None)
        if self.cfg.max_samples is not None:
            total = self.cfg.max_samples if total is None else min(total, self.cfg.max_samples)
        if total is None:
            return None
        return len(range(rank, total, world))  # round-robin split: rank r gets images r, r + world, ...

    def run(self) -> None:
        is_main = self.accelerator.is_main_process
        world = self.accelerator.num_processes
        desc = "eval" if world == 1 else f"eval (rank 0 of {world})"
        # Main process only: images/s and the ETA of its own share (the ranks split the images evenly).
        loader = self.loader()
        total = self.expected_images(loader.dataset.sources[0]) if is_main else None
        # A log file (stderr not a terminal: SLURM, Kubernetes) gets no carriage-return bar; the table says the rest.
        progress = tqdm(
            total=total, desc=desc, unit="img", dynamic_ncols=True, disable=not is_main or not stderr_is_terminal()
        )
        start = time.perf_counter()
        for batch in loader:
            self.skipped += int(batch["skipped"].sum())  # (B, sources): unreadable files met before each image
            self.evaluate_batch(batch["pixel_values"].to(self.device, torch.float32), list(batch["key"]))
            progress.update(len(batch["key"]))
        self.seconds = time.perf_counter() - start
        progress.close()

    @torch.no_grad()
    def evaluate_batch(self, x: torch.Tensor, keys: list[str]) -> None:
        """x: (B, 3, R, R) in [-1, 1]; every model reconstructs the same images."""
        cfg, protocol = self.cfg, self.protocol
        ref_u8 = metrics.to_uint8(x, protocol["uint8"])  # (B, 3, R, R) uint8, as saved and fed to FID
        latent = "mode" if protocol["latent"] == "mean" else "sample"
        values: dict[str, dict] = {k: {} for k in keys}
        recons_u8 = []
        for m in self.models:
            # Fresh per-image generators for every model: each model decodes with the same noise.
            generators = None
            if latent == "sample":
                generators = [torch.Generator().manual_seed(image_noise_seed(cfg.seed, k)) for k in keys]
            recon = reconstruct(
                m.vae, x, latent=latent, batch_size=len(x), generator=generators, autocast=self.autocast
            )  # (B, 3, R, R) float32, unclamped
            m.nonfinite += int((~torch.isfinite(recon).flatten(1).all(dim=1)).sum())
            if cfg.latent_diagnostics:  # on the posterior mean, whatever --latent decodes
                m.latent = latents.add_sums(m.latent, latents.batch_sums(m.vae, x, self.autocast)[0])
            scores = image_metrics(x, recon, lpips=self.lpips, ssim_window=protocol["ssim_window"])
            scores |= self.noise_scores(m, x, keys)
            scores = {name: v.tolist() for name, v in scores.items()}
            for i, k in enumerate(keys):
                values[k][m.label] = {name: v[i] for name, v in scores.items()}
            rec_u8 = metrics.to_uint8(recon, protocol["uint8"])
            recons_u8.append(rec_u8)
            if m.fid is not None:
                m.fid.update(ref_u8, real=True)
                m.fid.update(rec_u8, real=False)
            if cfg.save_images:
                save_pngs(os.path.join(cfg.output_dir, "images", safe_name(m.label)), keys, rec_u8)
        if cfg.save_images:
            save_pngs(os.path.join(cfg.output_dir, "images", "reference"), keys, ref_u8)
        if self.drift_pair is not None:
            model, base = self.drift_pair
            moved = drift.encoder_drift(model.vae, base.vae, x, len(x), autocast=self.autocast)
            for name, v in moved.items():
                for i, k in enumerate(keys):
                    values[k][model.label][f"drift_{name}"] = v[i].item()
        self.per_image.extend(values.items())
        for i, k in enumerate(keys[: max(0, cfg.grid_images - len(self.grid_rows))]):
            self.grid_rows.append((k, [ref_u8[i].cpu()] + [r[i].cpu() for r in recons_u8]))

    def noise_scores(self, m: ModelUnderEval, x: torch.Tensor, keys: list[str]) -> dict[str, torch.Tensor]:
        """{"psnr@noise<σ>", ...: per-image values} of --latent_noise's decodes of μ + σ/scaling_factor·ε; the same ε
        (a generator per image, seeded from the key) for every σ and every model."""
        if not self.cfg.latent_noise:
            return {}
        generators = [torch.Generator().manual_seed(text_seed(f"{self.cfg.seed}:latent-noise:{k}")) for k in keys]
        sigmas = self.cfg.latent_noise_sigma
        recons = metrics.noisy_reconstructions(m.vae, x, sigmas, generators, autocast=self.autocast)
        out = {}
        for sigma, recon in recons.items():
            scores = image_metrics(x, recon, lpips=self.lpips, ssim_window=self.protocol["ssim_window"])
            out |= {f"{name}{NOISE_TAG}{sigma:g}": v for name, v in scores.items()}
        return out

    def result(self) -> tuple[dict, list]:
        """Gather every rank's images (collectives: all ranks call this); rFID only on the main process."""
        is_main = self.accelerator.is_main_process
        # Every image was evaluated on exactly one rank: gather, no padding to remove.
        per_image = sorted(gather_object(self.per_image))
        grid_rows = sorted(gather_object(self.grid_rows), key=lambda row: row[0])[: self.cfg.grid_images]
        skipped = sum(gather_object([self.skipped]))
        seconds = max(gather_object([self.seconds]))
        nonfinite = [sum(gather_object([m.nonfinite])) for m in self.models]
        latent_sums = [[s for s in gather_object([m.latent]) if s is not None] for m in self.models]
        backend = self.protocol["fid_backend"]
        rfids = [finish_fid(m.fid, is_main, backend) if m.fid is not None else None for m in self.models]

        keys = [k for k, _ in per_image]
        if len(set(keys)) != len(keys):
            raise RuntimeError(f"{len(keys) - len(set(keys))} images were evaluated twice across ranks")
        result = {
            "dataset": self.cfg.dataset,
            "dataset_name": self.source.name,
            "source": {**asdict(self.source), "kind": self.source_kind},
            "split": self.source.split,
            "resolution": self.cfg.resolution,
            "num_images": len(keys),
            "skipped_images": skipped,
            "world_size": self.accelerator.num_processes,
            "seconds": seconds,
            "images_per_second": len(keys) / seconds if seconds > 0 else None,
            "protocol": self.record,
            "latent_noise": (
                "per model: decode(mu + sigma / scaling_factor * eps), mu the posterior mean, sigma in units of the "
                "normalised latent (z - shift_factor) * scaling_factor (the model's config), eps ~ N(0, I) from a "
                f"torch.Generator per image seeded from sha256({self.cfg.seed}:latent-noise:key), one eps for every "
                "sigma and model; PSNR / SSIM / LPIPS as the results table"
                if self.cfg.latent_noise
                else None
            ),
            "models": [],
            "versions": versions(),
            "config": to_dict(self.cfg),
        }
        for m, rfid, bad, sums in zip(self.models, rfids, nonfinite, latent_sums, strict=False):
            acc = metrics.MeanStd()
            for _, per_model in per_image:
                acc.update(**{name: [v] for name, v in per_model[m.label].items()})
            summary = acc.summary()
            noisy = {name: summary.pop(name) for name in list(summary) if NOISE_TAG in name}
            result["models"].append(
                {
                    "label": m.label,
                    "path": m.path,
                    "role": m.role,
                    "latent_channels": m.vae.config.latent_channels,
                    "nonfinite_reconstructions": bad,
                    "metrics": {
                        "rfid": {"value": rfid, "count": len(keys) if m.fid is not None else 0},
                        **summary,
                    },
                    "latent": latents.summarize(sum_all(sums)) if sums else None,
                    "latent_noise": noise_entry(self.cfg, noisy, m.vae.config),
                    "drift_from": self.drift_pair[1].label if self.drift_pair and m is self.drift_pair[0] else None,
                }
            )
        return result, grid_rows


def evaluate(
    cfg: EvalConfig,
    feature_extractor: torch.nn.Module | None = None,
    lpips: torch.nn.Module | None = None,
    accelerator: Accelerator | None = None,
) -> dict:
    """Run the evaluation; returns the result dict (also written as JSON; rFID only on the main process).

    Raises a common.errors.UserError subclass (one line: data, model, metric weights, LPIPS weights,
    model card) before any image is processed. `feature_extractor` replaces Inception for rFID (tests only);
    `lpips` is a prebuilt LPIPS module matching cfg.perception_weights (several runs in one process).
    """
    accelerator = accelerator or Accelerator()
    evaluator = Evaluator(cfg, accelerator, feature_extractor, lpips)
    if cfg.update_model_card and accelerator.is_main_process:
        load_card(cfg.update_model_card)  # an unreadable card fails now, not after the evaluation
    if cfg.perception_weights == "random" and accelerator.is_main_process:
        print(
            "WARNING: LPIPS uses a RANDOM VGG16 backbone (--perception_weights random): its numbers are NOT LPIPS.",
            flush=True,
        )
    evaluator.run()
    result, grid_rows = evaluator.result()
    if cfg.probe and accelerator.is_main_process:
        run_probes(cfg, evaluator, result)  # rank 0 alone; the other ranks wait below
    if accelerator.is_main_process:
        write_outputs(cfg, result, grid_rows)
    accelerator.wait_for_everyone()
    return result


# ----------------------------------------------------------------------------------------
# Latent probe (--probe): how fast a small DiT learns each model's latents (metrics/probe.py)
# ----------------------------------------------------------------------------------------


def write_outputs(cfg: EvalConfig, result: dict, grid_rows: list) -> None:
    """Main process only: the table on stdout, the JSON, the table as .md, the comparison grid, the model card."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    table = markdown_table(result)
    print(table, flush=True)
    if any(m["latent"] is not None for m in result["models"]):
        print("\n" + latent_table(result), flush=True)
    markdown = table
    if result.get("latent_noise"):
        markdown += "\n\n" + noise_table(result)
        print("\n" + noise_table(result), flush=True)
    for m in result["models"]:
        if m["nonfinite_reconstructions"]:
            bad = m["nonfinite_reconstructions"]
            print(f"WARNING: {m['label']}: {bad} reconstructions have NaN/inf pixels", flush=True)
    if grid_rows:
        # The uint8 images FID sees: a row of references, then a row per model, 8 images a row.
        reference, *recons = (torch.stack(tiles) for tiles in zip(*(row for _, row in grid_rows), strict=False))
        labels = ["reference", *(m["label"] for m in result["models"])]
        grid_path = os.path.join(cfg.output_dir, "grid.png")
        save_grid(reference, recons, grid_path, labels=labels)
        result["grid"] = {"path": grid_path, "rows": labels, "images": [key for key, _ in grid_rows]}
    with open(os.path.join(cfg.output_dir, "eval.md"), "w") as f:
        f.write(markdown + "\n")
    if result.get("probe"):
        write_probe_outputs(cfg, result)  # the probe table (stdout, appended to eval.md) and probe_curve.png
    json_path = cfg.output_json or os.path.join(cfg.output_dir, "eval.json")
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {json_path}", flush=True)
    if cfg.update_model_card:
        print(f"wrote {update_model_card(cfg.update_model_card, result, table)}", flush=True)
        if result.get("probe"):
            print(f"wrote {update_model_card_probe(cfg.update_model_card, result, probe_table(result))}", flush=True)


def main(
    argv: list[str] | None = None,
    feature_extractor: torch.nn.Module | None = None,
    lpips: torch.nn.Module | None = None,
) -> dict:
    cfg, _ = parse_config(EvalConfig, argv, PROG, description=__doc__.split("\n\n")[0])
    try:
        return evaluate(cfg, feature_extractor=feature_extractor, lpips=lpips)
    except UserError as e:
        if PartialState().is_main_process:  # every rank hits the same check; one line is enough
            fail(PROG, str(e))
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
