"""The model card (README.md) of a Transfusion VAE, on huggingface_hub's ModelCard: one module for both writers.

`build_model_card` writes the card of an exported model (the trainer's export); `update_model_card`
adds an evaluation's results to a card (`eval_vae.py --update_model_card`): a marked section,
replaced on a re-run, and model-index metadata.

Everything comes in as plain values, so the card can be rebuilt from a finished folder or a test
without a trainer. Local data paths appear in the body by their last component only, and the
loading snippet uses the Hub id or a relative path: a card never carries this machine's paths.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from autoencoder.models import is_hub_id, is_url
from common.errors import ModelCardError
from common.helpers import one_line
from data import detect_kind
from data.kinds import HUB, kind_of
from evaluation.report import REPORTED_METRICS, metric_value, standard_fid
from losses.regularisers import EQVAE_SCALES
from training.runlog import CURVES_PNG

TAGS = ["diffusers", "autoencoder", "vae", "transfusion", "autoencoderkl"]
GRID_PNG = "reconstructions.png"  # the last held-out grid, copied in by publishing/export.py
# Images shown when the export folder holds them.
IMAGES = (
    (CURVES_PNG, "Training curves"),
    (GRID_PNG, "Held-out inputs, each row above its reconstructions"),
)


def _source_fields(source) -> dict:
    """name, path, split, weight, kind of a data.SourceSpec or a mapping with those keys."""
    get = source.get if isinstance(source, Mapping) else (lambda key, default=None: getattr(source, key, default))
    out = {
        "name": get("name"),
        "path": str(get("path", "")),
        "split": get("split"),
        "weight": get("weight", 1.0),
        "kind": get("kind", "auto"),
    }
    if out["kind"] in (None, "auto"):
        out["kind"] = detect_kind(out["path"])
    return out


def _is_hub_dataset(row: dict) -> bool:
    """A source streamed from the Hub by its dataset id (data/kinds.py's table: its reader), not a local copy."""
    return kind_of(row["kind"], row["path"]).reader == HUB


def public_path(path: str) -> str:
    """A local path as a card may show it: relative paths as given, absolute ones by their last component(s)."""
    path = str(path).rstrip("/") or "/"
    if not os.path.isabs(path) and not path.startswith("~"):
        return path
    head, tail = os.path.split(path)
    if any(ch in tail for ch in "*?["):  # a shard glob: keep the folder it globs in
        tail = f"{os.path.basename(head)}/{tail}"
    return f".../{tail}"


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _scales(scales: Sequence[float]) -> str:
    """EQ-VAE's scales as the card shows them: '8/32, ..., 31/32' (the first, an ellipsis, the last, in 32nds)."""
    return f"{round(scales[0] * 32)}/32, ..., {round(scales[-1] * 32)}/32"


def _recipe_lines(recipe: Mapping) -> list[str]:
    r = defaultdict(lambda: None, recipe)  # TrainConfig.recipe(): the fields marked recipe=True
    terms = [
        f"{_fmt(r['l1_weight'])}·L1",
        f"{_fmt(r['lpips_weight'])}·LPIPS-VGG",
        f"{_fmt(r['gan_weight'])}·λ·GAN",
        f"{_fmt(r['id_weight'])}·ID (MoCo v2)",
        f"{_fmt(r['kl_weight'])}·KL",
    ]
    ramp = r["gan_ramp_steps"] or 0
    lines = [
        "L = " + " + ".join(terms),
        "",
        f"- GAN: pix2pix NLayer PatchGAN (hinge loss), on from step {r['disc_start']}"
        + (f", generator weight ramped linearly over {ramp} steps" if ramp else ", switched on at once (as the recipe)")
        + (f"; adaptive weight λ clamped to {_fmt(r['adaptive_weight_max'])}" if r["adaptive_weight_max"] else ""),
        "- ID term: " + ("on" if (r["id_weight"] or 0) > 0 else "**off** (`id_weight` 0)"),
    ]
    if r["lecam_weight"]:
        lines.append(f"- LeCAM regularisation of the discriminator: weight {_fmt(r['lecam_weight'])}")
    if r["equivariance_mode"] == "eqvae":
        lines.append(
            f"- equivariance, EQ-VAE's scheme: with probability {_fmt(r['equivariance_prob'])} the step's whole loss is "
            f"that of (T(x), decode(T(z))), T a scale uniform in {{{_scales(EQVAE_SCALES)}}} and a quarter turn; else prior "
            f"preservation, at a random low resolution with probability {_fmt(r['eqvae_low_res_prob'])}"
        )
    elif r["equivariance_weight"]:
        turns = ", quarter turns" if r["equivariance_rotations"] else ""
        lines.append(
            f"- equivariance, additive term (ours, after EQ-VAE): weight {_fmt(r['equivariance_weight'])}, probability "
            f"{_fmt(r['equivariance_prob'])}, scales {r['equivariance_scales']}{turns}"
        )
    if r["latent_noise_aug"]:
        lines.append(
            f"- latent noise augmentation (ours, after σ-VAE and l-DeTok): the decoder trained on z + σ·std(z)·ε, "
            f"σ ~ U[0, {_fmt(r['latent_noise_aug'])}] per image"
        )
    if r["vf_weight"]:
        lines.append(
            f"- DINOv2 alignment (VA-VAE's VF loss; its foundation model, preprocessing and λ's nll differ from the "
            f"reference's, listed in the trainer's docs/recipe.md): weight {_fmt(r['vf_weight'])}, margins "
            f"{_fmt(r['vf_margin_cos'])} / {_fmt(r['vf_margin_distmat'])}"
            + (f" from step {r['vf_margin_start']} (0 before)" if r["vf_margin_start"] else "")
            + (f", foundation model {r['vf_model']}" if r["vf_model"] else "")
        )
    return lines


def hub_repo_of(start: str) -> str | None:
    """The Hub repository a start model names: a Hub id as it is, a huggingface.co file URL's repository
    (`https://huggingface.co/owner/name/blob/main/vae.safetensors` -> owner/name); None for local paths."""
    m = re.match(r"https?://(?:www\.)?huggingface\.co/([^/]+/[^/]+)/(?:blob|resolve)/", start)
    if m:
        return m[1]
    return start if not is_url(start) and "/" in start and is_hub_id(start) else None


def _start_sentence(base_model: str, loaded_as_is: bool) -> str:
    shown = base_model if is_url(base_model) else public_path(base_model)
    if loaded_as_is:
        return f" Fine-tuned from `{shown}` (loaded as it is, with its own config)."
    return f" Initialised from `{shown}` (its tensors copied into this architecture)."


def _metrics_table(initial: Mapping, final: Mapping) -> str:
    names = list(final) + [k for k in initial if k not in final]
    if not names:
        return "_No held-out metrics were recorded._"
    rows = [f"| {k} | {_fmt(initial.get(k, float('nan')))} | {_fmt(final.get(k, float('nan')))} |" for k in names]
    return "\n".join(["| metric | step 0 | final |", "|---|---|---|", *rows])


def _latent_section(stats: Mapping | None, kept: Mapping | None = None) -> str:
    if not stats:
        return "_Latent statistics were not computed._"
    rows = [
        f"| {c} | {m:.4f} | {s:.4f} |"
        for c, (m, s) in enumerate(zip(stats["latents_mean"], stats["latents_std"], strict=True))
    ]
    measured = (
        f"Sampled latents z ~ q(z|x) of {stats['num_images']} images ({stats.get('images', 'held-out images')}), "
        f"seed {stats['seed']}:"
    )
    if kept is None:
        lines = [
            measured,
            "",
            f"- overall mean μ = {stats['mean']:.6f}, std σ = {stats['std']:.6f}",
            f"- `shift_factor` = μ = {stats['shift_factor']:.6f}, `scaling_factor` = 1/σ = "
            f"{stats['scaling_factor']:.6f} (in `config.json`)",
            "- `config.json` holds no `latents_mean` / `latents_std`: diffusers' SDXL-family pipelines would "
            "otherwise normalise twice. The per-channel statistics are in `latent_stats.json`:",
        ]
    else:
        lines = [
            "`config.json` keeps the start model's latent convention unchanged"
            + (f" ({kept['reason']})" if kept.get("reason") else "")
            + ": "
            + ", ".join(f"`{k}` = {kept[k]}" for k in ("scaling_factor", "shift_factor", "latents_mean", "latents_std"))
            + ".",
            "",
            measured,
            "",
            f"- overall mean μ = {stats['mean']:.6f}, std σ = {stats['std']:.6f} (1/σ = {stats['scaling_factor']:.6f}); "
            "not in `config.json`. Per channel, in `latent_stats.json`:",
        ]
    return "\n".join([*lines, "", "| channel | mean | std |", "|---|---|---|", *rows])


def build_model_card(
    *,
    folder: str | None = None,
    repo_id: str | None = None,
    license: str = "other",
    base_model: str | None = None,
    sources: Sequence = (),
    heldout_name: str | None = None,
    heldout_disjoint: bool = True,
    num_validation_images: int | None = None,
    recipe: Mapping | None = None,
    steps: int = 0,
    images_seen: int = 0,
    batch_size: int | None = None,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
    resolution: int | None = None,
    vae_config: Mapping | None = None,
    num_parameters: int | None = None,
    perception_weights: str = "pretrained",
    metrics_initial: Mapping | None = None,
    metrics_final: Mapping | None = None,
    latent_stats: Mapping | None = None,
    has_discriminator: bool = False,
    base_loaded_as_is: bool = False,
    kept_latent_convention: Mapping | None = None,
    single_file: str | None = None,
) -> ModelCard:
    """The card of an exported model: YAML metadata, then one section per helper below.

    folder: the export folder (its basename names a local model; images in it are embedded).
    repo_id: the Hub repository when pushed (metadata and loading snippet use it), else None.
    base_model: the start model (`--pretrained_model_name_or_path` or `--init_from`): a hub id, path or
        single file (metadata only when it is a hub id), else None; `base_loaded_as_is`: it was loaded
        with its own config (--pretrained_model_name_or_path), not copied into another architecture.
    sources: data.SourceSpec objects or mappings (name, path, split, weight, kind); hub ids go into
        the `datasets` metadata, local sources are listed in the body only.
    perception_weights: what the LPIPS/MoCo nets actually were: "pretrained", "random", or "none" (both terms off).
    heldout_disjoint: False when the held-out images come from the training data.
    latent_stats: the dict `vae.export.latent_statistics` returns (plus "images": how they were drawn).
    kept_latent_convention: the start model's scaling_factor / shift_factor / latents_mean / latents_std (and
        "reason") when config.json keeps them, else None (config.json holds the measured values).
    single_file: the file name of the single-file (original LDM layout) copy of the weights, when written.
    """
    rows = [_source_fields(s) for s in sources]
    hub_datasets = [r["path"] for r in rows if _is_hub_dataset(r)]
    data = ModelCardData(
        license=license,
        library_name="diffusers",
        tags=list(TAGS),
        base_model=hub_repo_of(base_model) if base_model else None,
        datasets=hub_datasets or None,
    )
    name = repo_id or (os.path.basename(os.path.abspath(folder)) if folder else "transfusion-vae")
    load_from = repo_id or (f"./{name}" if folder else ".")
    random_nets = perception_weights == "random"
    sections = [
        _head_section(name, random_nets, heldout_disjoint, base_model, base_loaded_as_is),
        _model_section(dict(vae_config or {}), resolution, num_parameters, has_discriminator),
        _training_section(
            dict(recipe or {}),
            perception_weights,
            steps,
            images_seen,
            resolution,
            batch_size,
            num_processes,
            gradient_accumulation_steps,
        ),
        _mixture_section(rows),
        _heldout_section(
            num_validation_images, heldout_name, heldout_disjoint, metrics_initial, metrics_final, random_nets
        )
        + _images_section(folder),
        _usage_section(latent_stats, kept_latent_convention, load_from, repo_id, single_file),
    ]
    body = "\n\n".join("\n".join(s).rstrip() for s in sections)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


# -- the sections of build_model_card: each returns its lines ------------------------------------------------


def _head_section(name, random_nets, heldout_disjoint, base_model, base_loaded_as_is) -> list[str]:
    head = [f"# {name.split('/')[-1]}", ""]
    if random_nets:
        head += [
            "> **WARNING: the LPIPS (VGG16) and MoCo perception nets were RANDOM "
            "during training. This model is a smoke test, not a usable autoencoder.**",
            "",
        ]
    if not heldout_disjoint:
        head += [
            "> **Note:** the held-out images are not disjoint from the training data (they come from a "
            "training source), so the held-out metrics below flatter the model.",
            "",
        ]
    head += [
        "A diffusers `AutoencoderKL` trained with the Transfusion VAE recipe "
        "([Transfusion, arXiv 2408.11039](https://arxiv.org/abs/2408.11039), app. A; reference implementation "
        "[lavinal712/AutoencoderKL, branch transfusion_vae]"
        "(https://github.com/lavinal712/AutoencoderKL/tree/transfusion_vae))."
        + (_start_sentence(base_model, base_loaded_as_is) if base_model else ""),
    ]
    return head


def _model_section(vae_config: Mapping, resolution, num_parameters, has_discriminator) -> list[str]:
    channels = vae_config.get("latent_channels")
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1) if vae_config.get("block_out_channels") else None
    shape = f" ({resolution}² → {resolution // factor}²×{channels})" if factor and resolution else ""
    model = [
        "## Model",
        "",
        f"- latent channels: {channels}" + (f", downsampling ×{factor}{shape}" if factor else ""),
        f"- block_out_channels: {list(vae_config.get('block_out_channels', ()))}, "
        f"layers_per_block: {vae_config.get('layers_per_block')}"
        + (f", {num_parameters / 1e6:.1f} M parameters" if num_parameters else ""),
    ]
    if has_discriminator:
        model.append(
            "- `discriminator/`: the PatchGAN discriminator at the end of training (`model.safetensors` + "
            "`config.json`), for fine-tuning with its GAN term warm (`--init_discriminator`)"
        )
    return model


def _training_section(
    recipe: Mapping, perception_weights, steps, images_seen, resolution, batch_size, num_processes, accumulation
) -> list[str]:
    nets = "none (the LPIPS and ID terms are off)" if perception_weights == "none" else f"**{perception_weights}**"
    return [
        "## Training",
        "",
        *_recipe_lines(recipe),
        "",
        "- perception nets (LPIPS-VGG, MoCo): " + nets,
        f"- steps: {steps}, images seen: {images_seen}, resolution: {resolution}²",
        f"- batch: {batch_size} per device × {num_processes} process(es) × {accumulation} "
        f"accumulation = {(batch_size or 0) * num_processes * accumulation} images per step",
    ]


def _mixture_section(rows: list[dict]) -> list[str]:
    if not rows:
        return ["## Data mixture", "", "_Not recorded._"]
    total = sum(float(r["weight"]) for r in rows) or 1.0
    lines = ["## Data mixture", "", "| source | path | split | weight | probability |", "|---|---|---|---|---|"]
    for r in rows:
        where = (
            f"[{r['path']}](https://huggingface.co/datasets/{r['path']})"
            if _is_hub_dataset(r)
            else f"`{public_path(r['path'])}` (local {r['kind']})"
        )
        weight = float(r["weight"])
        shown = str(int(weight)) if weight.is_integer() else f"{weight:g}"
        lines.append(f"| {r['name']} | {where} | {r['split'] or '–'} | {shown} | {weight / total:.3f} |")
    return lines


def _heldout_section(count, source, disjoint, metrics_initial, metrics_final, random_nets) -> list[str]:
    lines = [
        "## Held-out reconstruction (posterior mean"
        + (f", {count} images" if count else "")
        + (f", source {source}" if source else "")
        + ")",
        "",
        "Held out: disjoint from the training data." if disjoint else "**Not disjoint from the training data.**",
        "",
        _metrics_table(metrics_initial or {}, metrics_final or {}),
    ]
    if random_nets:
        lines += ["", "LPIPS here is computed with the same random VGG: only its trend means anything."]
    return lines


def _images_section(folder: str | None) -> list[str]:
    """The IMAGES the export folder holds, each with its caption (appended to the held-out section)."""
    images = []
    for filename, caption in IMAGES:
        if folder and os.path.isfile(os.path.join(folder, filename)):
            images += [f"![{caption}]({filename})", "", caption, ""]
    return [""] + images if images else []


def _usage_section(latent_stats, kept_latent_convention, load_from, repo_id, single_file) -> list[str]:
    usage = [
        "## Latent statistics",
        "",
        _latent_section(latent_stats, kept_latent_convention),
        "",
        "## Use",
        "",
        "```python",
        "from diffusers import AutoencoderKL",
        "",
        f'vae = AutoencoderKL.from_pretrained("{load_from}")' + ("" if repo_id else "  # the folder holding this card"),
        "posterior = vae.encode(images).latent_dist      # images in [-1, 1], (B, 3, H, W)",
        "shift = vae.config.shift_factor or 0.0            # None in SD 1.x / SDXL-style configs",
        "latents = (posterior.sample() - shift) * vae.config.scaling_factor"
        + ("  # mean 0, std 1" if kept_latent_convention is None else ""),
        "recon = vae.decode(latents / vae.config.scaling_factor + shift).sample",
        "```",
    ]
    if single_file:
        usage += [
            "",
            f"`{single_file}`: the same weights in the original latent-diffusion key layout, for ComfyUI "
            "(`models/vae/`) and AUTOMATIC1111 (`models/VAE/`); diffusers reads it with "
            f'`AutoencoderKL.from_single_file("{single_file}", config="{load_from}")`.',
        ]
    return usage


# ----------------------------------------------------------------------------------------
# Evaluation results (eval_vae.py --update_model_card)
# ----------------------------------------------------------------------------------------

CARD_TASK = "image-to-image"
CARD_METRICS = REPORTED_METRICS  # the columns of the results table, the same names and order


def load_card(folder: str):
    """The folder's README.md as a huggingface_hub ModelCard, or a minimal diffusers card when there is none."""
    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        meta = ModelCardData(library_name="diffusers")
        return ModelCard(f"---\n{meta.to_yaml()}\n---\n\n# {os.path.basename(os.path.abspath(folder))}\n")
    try:
        return ModelCard.load(path)  # an existing file: read locally, never fetched from the Hub
    except (ValueError, OSError, yaml.YAMLError) as e:  # UnicodeDecodeError is a ValueError
        raise ModelCardError(f"cannot read the model card {path!r}: {one_line(e, name=False, limit=200)}") from None


def card_dataset(result: dict) -> tuple[str, str]:
    """(dataset_type, dataset_name) for model-index: the hub id (or a local folder's name), and what was measured."""
    return result["dataset_name"], f"{result['dataset_name']} {result['split']}, {result['resolution']}²"


def card_eval_results(result: dict) -> list:
    """model-index entries (huggingface_hub EvalResult) of the evaluated model (not the baselines).

    Only numbers that mean what their name says: rFID with the standard 2048-d Inception features,
    LPIPS with the pretrained VGG; PSNR and SSIM always (when finite).
    """
    model = next(m for m in result["models"] if m["role"] == "model")
    protocol = result["protocol"]
    standard = standard_fid(result["config"]["fid_features"], protocol["rfid"])
    values = {key: metric_value(model["metrics"], key) for key, _ in CARD_METRICS}
    if not standard:
        values["rfid"] = None
    if protocol["lpips_weights"] != "pretrained":
        values["lpips"] = None
    dataset_type, dataset_name = card_dataset(result)
    return [
        EvalResult(
            task_type=CARD_TASK,
            task_name="Image reconstruction",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_config=result["config"].get("dataset_config"),
            dataset_split=result["split"],
            metric_type=key,
            metric_name=name,
            metric_value=round(float(values[key]), 4),
        )
        for key, name in CARD_METRICS
        if values[key] is not None and math.isfinite(values[key])
    ]


def section_markers(kind: str, result: dict) -> tuple[str, str]:
    """The (start, end) HTML comments around the card's `kind` section ("results", "probe") of one dataset /
    split / resolution: a re-run with the same three replaces that section."""
    dataset_type, _ = card_dataset(result)
    key = re.sub(r"[^\w./-]+", "_", f"{dataset_type} {result['split']} {result['resolution']}")
    return f"<!-- eval_vae {kind} {key} -->", f"<!-- /eval_vae {kind} {key} -->"


def card_section(result: dict, table: str) -> tuple[str, str, str]:
    """(start marker, end marker, the section between them) of one dataset / split / resolution."""
    _, dataset_name = card_dataset(result)
    start, end = section_markers("results", result)
    body = (
        f"## Reconstruction: {dataset_name}\n\n"
        f"{result['num_images']} images, evaluated with `eval_vae.py` (the JSON it writes holds every setting).\n\n"
        f"{table}\n"
    )
    return start, end, body


def replace_section(text: str, start: str, end: str, body: str) -> str:
    """`text` with the section between the markers `start` and `end` replaced by `body` (appended when absent)."""
    section = f"{start}\n{body}{end}"
    if start in text and end in text.split(start, 1)[1]:
        before, rest = text.split(start, 1)
        return before + section + rest.split(end, 1)[1]
    return text.rstrip("\n") + "\n\n" + section + "\n"


def update_model_card(folder: str, result: dict, table: str) -> str:
    """Write the results into <folder>/README.md: a marked section (replaced on a re-run) and model-index metadata."""
    card = load_card(folder)
    start, end, body = card_section(result, table)
    card.text = replace_section(card.text, start, end, body)
    new = card_eval_results(result)
    replaced = {(r.task_type, r.dataset_type, r.dataset_name, r.dataset_split) for r in new}
    kept = [
        r
        for r in (card.data.eval_results or [])
        if (r.task_type, r.dataset_type, r.dataset_name, r.dataset_split) not in replaced
    ]
    card.data.eval_results = kept + new or None
    if card.data.eval_results and not card.data.model_name:
        card.data.model_name = os.path.basename(os.path.abspath(folder))  # model-index needs a name
    path = os.path.join(folder, "README.md")
    card.save(path)
    return path


# ----------------------------------------------------------------------------------------
# Latent probe results (eval_vae.py --probe --update_model_card)
# ----------------------------------------------------------------------------------------


def update_model_card_probe(folder: str, result: dict, table: str) -> str:
    """Write the latent probe's table into <folder>/README.md as its own marked section (replaced on a re-run).

    No model-index metadata: the probe's numbers are a relative measure between the VAEs of one
    evaluation (a small DiT on few latents), not a gFID as published.
    """
    card = load_card(folder)
    _, dataset_name = card_dataset(result)
    start, end = section_markers("probe", result)
    body = (
        f"## Latent probe: {dataset_name}\n\n"
        "How fast a small diffusion transformer learns this VAE's normalised latents (held-out flow-matching "
        "loss, lower is easier; gFID of its samples), next to the other VAEs of the same evaluation "
        "(`eval_vae.py --probe`; docs/latent_quality.md in the training repository).\n\n"
        f"{table}\n"
    )
    card.text = replace_section(card.text, start, end, body)
    path = os.path.join(folder, "README.md")
    card.save(path)
    return path
