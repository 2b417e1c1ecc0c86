"""Evaluation metric throughput: PSNR, SSIM, LPIPS and FID through metrics/, then eval_vae end to end.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_eval.py
    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_eval.py --device cuda --batch_size 64 --batches 8

Each metric runs on the same (reference, reconstruction) batches in [-1, 1] at --resolution,
alternating the metrics in rounds; images/s counts image pairs. Weights are random where the
real ones cannot be downloaded, with the real architectures and code paths (the cost is the
same): LPIPS-VGG from `build_lpips(pretrained=False)`; FID through `metrics.build_fid` with
torch-fidelity's Inception v3 (2048-d pool3, TF-compatible resize to 299) loaded from a file of
random weights written here, and with a tiny custom feature extractor for comparison; FID's
final compute() (2048² covariances, matrix square root) is timed once. --end_to_end also runs
eval_vae.main on a folder of photographs with a freshly initialised --preset model (decode
included, rFID on the random Inception), and reports its images/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from unittest import mock

import torch

# The repository root, for the trainer's packages: the script runs without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import metrics
from losses.perceptual import build_lpips


class TinyFeatures(torch.nn.Module):
    """A small custom FID extractor: uint8 (B, 3, H, W) -> 64-d (two strided convs and a mean)."""

    num_features = 64

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 4, 4), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 127.5 - 1).mean(dim=(2, 3))


def write_random_inception(path: str, seed: int = 0) -> None:
    """torch-fidelity's Inception v3 with random (He-scaled) weights, saved in its own file format."""
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    # Build the architecture only: no download, no weight loading.
    with (
        mock.patch.object(tfi, "load_state_dict_from_url", return_value={}),
        mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", return_value=None),
    ):
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(seed)
    state = net.state_dict()
    for name, tensor in state.items():
        if name.endswith("conv.weight"):  # keep activations finite through ~50 random layers
            tensor.copy_(torch.randn(tensor.shape, generator=g) * (2.0 / tensor[0].numel()) ** 0.5)
    torch.save(state, path)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--batches", type=int, default=2, help="timed batches per metric and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (1: shared cores)")
    p.add_argument(
        "--end_to_end",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run eval_vae.main on a folder of photographs",
    )
    p.add_argument("--preset", default="small", help="model preset of the end-to-end run")
    p.add_argument("--num_images", type=int, default=32, help="images of the end-to-end run")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="bench_eval_")

    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.resolution, args.resolution)
    x = (torch.rand(shape, generator=g) * 2 - 1).to(device)
    # A reconstruction: x plus noise, slightly out of range.
    y = (x + 0.1 * torch.randn(shape, generator=g).to(device)).clamp(-1.2, 1.2)
    x_u8, y_u8 = metrics.to_uint8(x), metrics.to_uint8(y)

    lpips = build_lpips(pretrained=False).to(device)
    inception_path = None
    try:
        inception_path = os.path.join(tmp, "inception-random.pth")
        write_random_inception(inception_path)
        fid_inception = metrics.build_fid(weights_path=inception_path).to(device)
    except ImportError:  # torch-fidelity missing (e.g. on a bare GPU image): custom extractor only
        fid_inception, inception_path = None, None
    fid_tiny = metrics.build_fid(feature_extractor=TinyFeatures()).to(device)

    def fid_update(fid):
        fid.update(x_u8, real=True)
        fid.update(y_u8, real=False)

    tasks = {
        "PSNR": lambda: metrics.psnr(metrics.to_unit(x), metrics.to_unit(y)),
        "SSIM (7×7 uniform)": lambda: metrics.ssim(metrics.to_unit(x), metrics.to_unit(y)),
        "SSIM (11-tap gaussian)": lambda: metrics.ssim(metrics.to_unit(x), metrics.to_unit(y), window="gaussian"),
        "LPIPS-VGG": lambda: lpips(x, y),
        "image_metrics": lambda: metrics.image_metrics(x, y, lpips=lpips),
        "FID update, tiny extractor": lambda: fid_update(fid_tiny),
    }
    if fid_inception is not None:
        tasks["FID update, Inception pool3"] = lambda: fid_update(fid_inception)
    seconds = {name: [] for name in tasks}
    names = list(tasks)
    with torch.no_grad():
        for fn in tasks.values():  # warm-up
            fn()
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                synchronize(device)
                tic = time.perf_counter()
                for _ in range(args.batches):
                    tasks[name]()
                synchronize(device)
                seconds[name].append((time.perf_counter() - tic) / args.batches)
        timed_compute = {}
        for label, fid in (("tiny", fid_tiny), ("Inception", fid_inception)):
            if fid is not None:
                tic = time.perf_counter()
                fid.compute()
                timed_compute[label] = time.perf_counter() - tic

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(
        f"torch {torch.__version__} | {where} | {args.resolution}² | batch {args.batch_size} | "
        f"{args.batches} batches × {args.rounds} rounds per metric | random weights"
    )
    print(f"  {'metric':<30}{'img/s':>10}{'ms/image':>10}")
    for name in names:
        s = statistics.fmean(seconds[name]) / args.batch_size
        print(f"  {name:<30}{1 / s:>10.1f}{1e3 * s:>10.2f}")
    for label, s in timed_compute.items():
        print(f"  FID compute() once, {label:<13}{s:>17.2f} s")

    if args.end_to_end:
        end_to_end(args, tmp, inception_path)


def end_to_end(args, tmp: str, inception_path: str | None) -> None:
    """eval_vae.main on --num_images photographs: encode, decode, all four metrics, the JSON."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_data
    import eval_vae
    from autoencoder.models import build_vae

    images = os.path.join(tmp, "images")
    bench_data.write_images(images, "jpeg", args.num_images, 512, 384)
    model = os.path.join(tmp, "model")
    torch.manual_seed(0)
    build_vae(args.preset).save_pretrained(model)
    argv = ["--pretrained_model_name_or_path", model, "--dataset", images, "--resolution", str(args.resolution)]
    argv += ["--batch_size", str(args.batch_size), "--num_workers", "0", "--perception_weights", "random"]
    argv += ["--output_dir", os.path.join(tmp, "eval-out"), "--grid_images", "0"]
    extractor = None
    if inception_path:
        argv += ["--inception_weights", inception_path]
    else:
        extractor = TinyFeatures()
    result = eval_vae.main(argv, feature_extractor=extractor)
    print(
        f"eval_vae end to end: preset {args.preset}, {result['num_images']} images at {args.resolution}², "
        f"{result['images_per_second']:.2f} img/s ({result['seconds']:.1f} s; encode + decode + PSNR/SSIM/LPIPS/rFID)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
