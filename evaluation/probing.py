"""The latent probe inside an evaluation (eval_vae.py --probe): one probe per model, its table and curves."""

from __future__ import annotations

import os

import metrics
from common.helpers import stderr_is_terminal
from evaluation.config import EvalConfig
from evaluation.report import probe_table, standard_fid
from metrics import probe as latent_probe

PROBE_CURVE_PNG = "probe_curve.png"


def probe_settings(cfg: EvalConfig) -> latent_probe.ProbeSettings:
    return latent_probe.ProbeSettings(
        steps=cfg.probe_steps,
        batch_size=cfg.probe_batch_size,
        lr=cfg.probe_lr,
        seed=cfg.probe_seed,
        crops_per_image=cfg.probe_crops_per_image,
        crop_mode=cfg.probe_crop_mode,
        held_out_fraction=cfg.probe_held_out_fraction,
        max_images=cfg.probe_max_images,
        samples=cfg.probe_samples,
        sample_steps=cfg.probe_sample_steps,
        normalise=cfg.probe_normalise,
        ema_decay=cfg.probe_ema_decay,
    )


def run_probes(cfg: EvalConfig, evaluator, result: dict) -> None:
    """Main process only: the same probe (data, settings, seeds) on every model; fills result["probe"] (the
    settings, the split, how gFID was measured) and each model's result["models"][i]["probe"].

    evaluator: eval_vae.Evaluator after its run (source, protocol, record, models, device, autocast)."""
    settings = probe_settings(cfg)
    probe_data = latent_probe.load_probe_data(
        evaluator.source,
        cfg.resolution,
        settings,
        max_samples=cfg.max_samples,
        interpolation=evaluator.protocol["interpolation"],
    )
    backend = evaluator.protocol["fid_backend"]
    fid, kid = None, None
    first_fid = next((m.fid for m in evaluator.models if m.fid is not None), None)
    held_pixels = probe_data.pixels[probe_data.held_out_index]  # the real side: images the probe never trained on
    if first_fid is not None and settings.samples > 0:
        # The evaluation's feature network; the held-out crops' features stay as the real side for every model.
        fid = metrics.build_fid(feature_extractor=first_fid.inception, reset_real_features=False).to(evaluator.device)
        kid = latent_probe.build_kid(fid, len(held_pixels), settings.samples)
        for metric in (fid, kid):
            if metric is not None:
                latent_probe.real_fid(metric, held_pixels, settings.batch_size)
    standard = standard_fid(cfg.fid_features, evaluator.record["rfid"])
    gfid = "skipped (--no-fid or --probe_samples 0)"
    if fid is not None:
        gfid = (
            f"FID of {settings.samples} decoded probe samples ({settings.sample_steps} Euler steps, EMA weights) "
            f"against the {len(held_pixels)} uint8 crops of the held-out images, with the rFID feature network: "
            f"{evaluator.record['rfid']}"
        )
    kid_text = "skipped (no gFID, or a side with fewer than 2 images)"
    if kid is not None:
        kid_text = (
            f"torchmetrics KernelInceptionDistance on the same features and images: polynomial kernel "
            f"(x·y/d + 1)^3, unbiased MMD² over {kid.subsets} subsets of {kid.subset_size} (seeded)"
        )
    result["probe"] = {
        "settings": settings.record(),
        "objective": "rectified flow: x_t = (1-t) z + t eps, predict v = eps - z, MSE; t ~ U(0,1); timestep 1000 t",
        "latents": "seeded sample of q(z|x) per crop, (z - shift_factor) * scaling_factor (shift None -> 0), then "
        f"--probe_normalise {settings.normalise}",
        "model": f"diffusers DiTTransformer2DModel, {settings.num_layers} layers, {settings.num_heads} heads of "
        f"{settings.head_dim}, patch {settings.patch_size}, DiT's initialisation (adaLN-zero), unconditional "
        f"(one class); EMA decay min({settings.ema_decay:g}, 1 - (1 + step)^(-2/3)) for the held-out loss and "
        "samples",
        "num_images": len(probe_data.train_images) + len(probe_data.held_out_images),
        "num_crops": len(probe_data.pixels),
        "train_images": probe_data.train_images,
        "held_out_images": probe_data.held_out_images,
        "gfid": gfid,
        "gfid_standard": standard and fid is not None,
        "kid": kid_text,
        "rank": "main process only",
    }
    for i, (m, entry) in enumerate(zip(evaluator.models, result["models"], strict=True)):
        desc = f"probe {i + 1}/{len(evaluator.models)} {m.label}"
        entry["probe"] = latent_probe.run_probe(
            m.vae,
            probe_data,
            settings,
            fid=fid,
            kid=kid,
            fid_backend=backend,
            autocast=evaluator.autocast,
            desc=desc,
            progress=stderr_is_terminal(),
        )


def write_probe_outputs(cfg: EvalConfig, result: dict) -> None:
    """Main process only: the probe table on stdout and appended to eval.md, every model's loss curve in one PNG."""
    table = probe_table(result)
    print(table, flush=True)
    for m in result["models"]:
        if m["probe"]["gfid_error"]:
            print(f"WARNING: {m['label']}: probe gFID failed: {m['probe']['gfid_error']}", flush=True)
        if m["probe"]["normalisation"].startswith("measured"):  # e.g. a checkpoint folder: the preset's factor
            print(f"NOTE: {m['label']}: latents {m['probe']['normalisation']}", flush=True)
    with open(os.path.join(cfg.output_dir, "eval.md"), "a") as f:
        f.write("\n" + table + "\n")
    curves = {m["label"]: m["probe"]["train_loss"] for m in result["models"]}
    title = f"latent probe: {result['dataset_name']} {result['split']}, {result['resolution']}²"
    result["probe"]["curve_png"] = latent_probe.plot_probe_curves(
        curves, os.path.join(cfg.output_dir, PROBE_CURVE_PNG), title
    )
