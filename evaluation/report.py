"""The evaluation's tables: results, latent diagnostics and probe, from the result dict eval_vae.py writes as JSON.

REPORTED_METRICS is the one list of reconstruction metrics the results table and the model card report.
"""

from __future__ import annotations

from metrics import latents

# (key in result["models"][i]["metrics"], column name): the results table's columns and the model card's
# model-index entries, in this order.
REPORTED_METRICS = (("rfid", "rFID"), ("psnr", "PSNR"), ("ssim", "SSIM"), ("lpips", "LPIPS"))


def format_cell(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def latent_table(result: dict) -> str:
    """The latent diagnostics (metrics/latents.py), a row per model; printed under the results table."""
    lines = [
        "| latent | inactive channels | KL mean (nats) | KL min (nats) | activity min | hf share latent "
        "| hf share image | hf share image at latent res. | equivariance PSNR ×0.5 (dB) | equivariance PSNR rot90 (dB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        d = m.get("latent")
        if d is None:
            continue
        cells = [format_cell(d[k], 4) for k in ("kl_mean", "kl_min")]
        cells.append(format_cell(min(d["channels"]["activity"]), 4))
        cells += [format_cell(d[k]) for k in ("hf_share", "hf_share_image", "hf_share_image_latent_res")]
        cells += [format_cell(d["equivariance_psnr"][k], 2) for k in ("scale", "rot90")]
        # "label (C ch)": a row of its own kind, not a second "| label |" row of the results table.
        row = f"| {m['label']} ({m['latent_channels']} ch) | {latents.describe_inactive(d)} | "
        lines.append(row + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Inactive: prior-collapsed = KL < {latents.DEAD_KL_NATS:g} nats per element; constant = activity "
        f"Var over images of μ (mean over positions) < {latents.ACTIVE_VAR:g} (Burda et al. 2016). Per-channel "
        "KL, activity, SNR Var(μ)/E[σ²] and hf shares are in the JSON. hf share: "
        f"{latents.HF_BAND}; at latent res.: the image box-filtered to the latent's size first. Equivariance: "
        "decode(T(posterior mean)) vs T(image), losses.equivariance.equivariant_transform."
    )
    return "\n".join(lines)


def noise_table(result: dict) -> str:
    """Noise robustness (--latent_noise): a row per model, PSNR and LPIPS of decode(μ + σ/scaling_factor·ε) per σ."""
    sigmas = next(m["latent_noise"]["sigmas"] for m in result["models"] if m.get("latent_noise"))
    heads = metric_heads(result)
    names = [k for k in ("psnr", "lpips") if k in heads]
    columns = [f"σ={s:g} {heads[k]}" for s in sigmas for k in names]
    lines = ["| latent noise | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for m in result["models"]:
        entry = m.get("latent_noise")
        if entry is None:
            continue
        cells = [format_cell(entry["metrics"][f"{s:g}"].get(k, {}).get("mean")) for s in sigmas for k in names]
        lines.append(f"| {m['label']} (noised) | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Latent noise: decode(μ + σ/scaling_factor·ε), σ in units of the normalised latent's std (the model's "
        "scaling_factor; a training checkpoint's config may still hold the preset's), one seeded ε per image shared "
        "by every σ and model; σ = 0 is the results table with --latent mean. SSIM in the JSON."
    )
    return "\n".join(lines)


CUSTOM_FID = " [custom feature extractor instead of Inception]"  # appended to the protocol's rfid line


def standard_fid(fid_features: int, rfid_protocol: str) -> bool:
    """Whether an FID is the standard one: Inception's 2048-d pool features, not a custom feature extractor."""
    return fid_features == 2048 and CUSTOM_FID not in rfid_protocol


def metric_heads(result: dict) -> dict[str, str]:
    """{metric key: column head} of REPORTED_METRICS, saying so where a number is not what its name means."""
    fid_features = result["config"]["fid_features"]
    heads = dict(REPORTED_METRICS)
    if CUSTOM_FID in result["protocol"]["rfid"]:
        heads["rfid"] = f"{heads['rfid']} (custom features, not FID)"
    elif fid_features != 2048:
        heads["rfid"] = f"{heads['rfid']}-{fid_features}"
    if result["protocol"]["lpips_weights"] != "pretrained":
        heads["lpips"] = f"{heads['lpips']} (RANDOM VGG, not LPIPS)"
    return heads


def metric_value(metrics: dict, key: str) -> float | None:
    """A model's reported number: rFID's value, the mean over images of the others (None when absent)."""
    entry = metrics.get(key) or {}
    return entry.get("value") if key == "rfid" else entry.get("mean")


def drift_line(result: dict) -> str | None:
    """The markdown sentence of the model's encoder drift from the first baseline, when measured."""
    for m in result["models"]:
        if m.get("drift_from"):
            s = m["metrics"]
            return (
                f"Encoder drift of {m['label']} from {m['drift_from']} (posterior means, per image): latent MSE "
                f"{format_cell(s['drift_latent_mse']['mean'], 4)}, cosine {format_cell(s['drift_latent_cosine']['mean'], 4)}; "
                f"{m['label']}'s decoder decodes {m['drift_from']}'s latents at "
                f"{format_cell(s['drift_base_latents_psnr']['mean'], 2)} dB PSNR."
            )
    return None


def markdown_table(result: dict) -> str:
    """The results table: a row per model, a column per REPORTED_METRICS entry; the protocol under it."""
    p = result["protocol"]
    heads = metric_heads(result)
    title = f"{result['dataset_name']} {result['split']} {result['num_images']}, {result['resolution']}²"
    lines = [f"| {title} | " + " | ".join(heads.values()) + " |", "|---|" + "---|" * len(heads)]
    for m in result["models"]:
        cells = [format_cell(metric_value(m["metrics"], key)) for key in heads]
        lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    lines.append("")
    if drift_line(result):
        lines += [drift_line(result), ""]
    lines.append(
        f"Protocol {p['name']}: latent={p['latent']}, uint8={p['uint8']}, ssim_window={p['ssim_window']}, "
        f"{p['preprocessing']}, mixed_precision={p['mixed_precision']}, rFID: {p['rfid']}."
    )
    return "\n".join(lines)


def probe_table(result: dict) -> str:
    """The probe's side-by-side table: a row per model; how it was measured under it.

    The held-out loss mixes the probe's error with the denoising error no model avoids, which depends on the
    latent's shape (C·h·w, the tokens a patch makes) and its per-channel variance: a row whose latent shape
    differs from the first row's is marked "loss not comparable"; its gFID / KID still compare (images)."""
    p = result["probe"]
    s = p["settings"]
    t_keys = [f"{t:g}" for t in s["t_eval"]]
    if p["gfid_standard"]:
        gfid_head, kid_head = "gFID (probe)", "KID (probe)"
    elif p["gfid"].startswith("skipped"):
        gfid_head, kid_head = "gFID", "KID"
    else:
        gfid_head = "gFID (RANDOM/CUSTOM features or not pool3, not gFID)"
        kid_head = "KID (same features, not KID)"
    title = (
        f"probe: {p['num_images']} images × {s['crops_per_image']} crops, {result['resolution']}², {s['steps']} steps"
        f", normalise {s.get('normalise', 'global')}"
    )
    lines = [
        f"| {title} | latent shape | "
        + " | ".join(f"held-out loss t={t}" for t in t_keys)
        + f" | {gfid_head} | {kid_head} | seconds |",
        "|---|---|" + "---|" * (len(t_keys) + 3),
    ]
    reference = result["models"][0]["probe"]["latent_shape"]
    marked = False
    for m in result["models"]:
        r = m["probe"]
        shape = "×".join(map(str, r["latent_shape"]))
        if r["latent_shape"] != reference:
            shape, marked = f"{shape} (loss not comparable)", True
        cells = [format_cell(r["held_out_loss"][t], 4) for t in t_keys]
        kid = "–" if r.get("kid") is None else f"{r['kid']:.4f} ± {r['kid_std']:.4f}"
        cells += [format_cell(r["gfid"], 2), kid]
        lines.append(f"| {m['label']} | {shape} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    lines.append("")
    note = (
        "Held-out losses compare only between rows of one latent shape (the first row's): the loss includes "
        "denoising error no model avoids, which depends on C·h·w and the per-channel variance; gFID and KID "
        "compare across shapes. "
        if marked
        else ""
    )
    lines.append(
        f"Latent probe (docs/latent_quality.md): {p['model']}, {p['objective']}; Adam lr {s['lr']:g}, batch "
        f"{s['batch_size']}, seed {s['seed']}; held-out loss on {len(p['held_out_images'])} images never trained on; "
        f"gFID: {p['gfid']}; KID: {p.get('kid', 'skipped')}. {note}A relative measure between these VAEs, not a "
        "gFID as published."
    )
    return "\n".join(lines)
