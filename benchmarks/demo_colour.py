"""How much colour does a model keep? Held-out PSNR, chroma ratio and colour error of any exported model folder.

Reconstructs the demo's 16 held-out crops (`data.demo_sources`: four photographs the demo never trains on, two of
them colour), or the images of `--heldout`, through the posterior mean, as the trainer's validation does, and
prints per image and overall: PSNR, the input's and the reconstruction's mean |Cb, Cr| (BT.601) and the chroma
ratio `metrics.chroma_ratio` (mean over the images whose input has mean |Cb, Cr| >= 0.02 of reconstruction /
input: 1 keeps the colours' strength, 0 is grey), the colour error `metrics.chroma_error` (mean |Cb, Cr| of
reconstruction - input / the input's, over the same images: 0 = the input's colours, 1 = grey, above 1 = wrong
hues) and the grey images' tint (the reconstructions' mean |Cb, Cr| where the input is grey). The model: an exported folder (`outputs/demo`), a training
checkpoint (`outputs/demo/checkpoint-600`, its EMA weights when it has them) or anything `load_vae` loads.

Run from the repository root:

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/demo_colour.py outputs/demo
    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/demo_colour.py outputs/demo/checkpoint-300 --per_image
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

import torch

# The repository root, for the trainer's packages: the script runs without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data
from autoencoder.models import load_vae
from common.errors import UserError
from data.specs import SourceSpec
from metrics import chroma, chroma_error, chroma_ratio, image_metrics, load_images, reconstruct, to_unit
from metrics.pixel import MIN_CHROMA


def held_out(folder: str | None, resolution: int) -> torch.Tensor:
    """The held-out images (N, 3, R, R) in [-1, 1]: `folder`'s, or the demo's crops written to a temporary folder."""
    if folder is not None:
        return load_images(SourceSpec(name="heldout", path=folder, kind="folder"), resolution, count=10**6)
    with tempfile.TemporaryDirectory() as tmp:
        _, source = data.demo_sources(tmp, resolution)
        return load_images(source, resolution, count=10**6)


def measure(vae: torch.nn.Module, images: torch.Tensor, batch_size: int = 8) -> dict:
    """{psnr: mean dB, chroma_ratio, chroma_error, grey_tint, colour_images,
    per_image: [(psnr, input chroma, recon chroma, colour error)]}. grey_tint: the reconstructions' mean chroma
    over the grey inputs (0 when they come back grey; nan without grey inputs)."""
    recon = reconstruct(vae, images, batch_size=batch_size)
    ref, rec = to_unit(images), to_unit(recon)
    psnr = image_metrics(images, recon)["psnr"]
    ratio, kept = chroma_ratio(ref, rec)
    error, _ = chroma_error(ref, rec)
    errors = [chroma_error(ref[i : i + 1], rec[i : i + 1], min_chroma=0.0)[0] for i in range(len(ref))]
    per_image = list(zip(psnr.tolist(), chroma(ref).tolist(), chroma(rec).tolist(), errors, strict=True))
    grey = chroma(ref) < MIN_CHROMA
    tint = chroma(rec)[grey].mean().item() if grey.any() else math.nan
    return {
        "psnr": psnr.mean().item(),
        "chroma_ratio": ratio,
        "chroma_error": error,
        "grey_tint": tint,
        "colour_images": kept,
        "per_image": per_image,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an exported model folder, a training checkpoint folder, a Hub id")
    parser.add_argument("--heldout", help="a folder of held-out images (default: the demo's 16 held-out crops)")
    parser.add_argument("--resolution", type=int, default=64, help="crop size (default 64, the demo's)")
    parser.add_argument("--per_image", action="store_true", help="also print each image's PSNR and chroma")
    args = parser.parse_args(argv)
    try:
        vae = load_vae(args.model).eval()
        images = held_out(args.heldout, args.resolution)
    except UserError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    with torch.no_grad():
        result = measure(vae, images)
    if args.per_image:
        print("| image | PSNR | input mean abs(Cb, Cr) | reconstruction | kept | colour error |")
        print("|---|---|---|---|---|---|")
        for i, (p, c_in, c_out, err) in enumerate(result["per_image"]):
            kept = f"{c_out / c_in:.2f} | {err:.2f}" if c_in >= MIN_CHROMA else "grey, left out | –"
            print(f"| {i} | {p:.2f} | {c_in:.4f} | {c_out:.4f} | {kept} |")
    ratio = result["chroma_ratio"]
    colour = (
        f"{ratio:.3f} over {result['colour_images']} colour images, colour error {result['chroma_error']:.3f}"
        if not math.isnan(ratio)
        else "no colour image"
    )
    if not math.isnan(result["grey_tint"]):
        colour += f", grey images' tint {result['grey_tint']:.3f}"
    print(
        f"{os.path.normpath(args.model)}: held-out PSNR {result['psnr']:.2f} dB ({len(images)} images), "
        f"chroma ratio {colour}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
