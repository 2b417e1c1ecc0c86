"""Peak memory of the fast λ path's two weight gradients at decoder.conv_out, whole-batch fp32 copy vs chunked.

    PYTHONPATH=. python benchmarks/bench_lambda_memory.py --batch 8 --resolution 256 --channels 128

Under bf16/fp16 autocast the input of decoder.conv_out (B, 128, R, R for the Transfusion preset) is half
precision. λ's fast path needs ∇_W nll and ∇_W g from it in float32 (losses.functional.conv_weight_grad); upcasting
the whole input makes a float32 copy of it per call (~1 GB at batch 32, 256²). The chunked version upcasts at most
WEIGHT_GRAD_CHUNK_BYTES (64 MiB) at a time. CPU: the process's peak resident memory (VmHWM, reset through
/proc/self/clear_refs) above what it held before each variant, the variants alternated over --rounds.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

# The repository root, for the trainer's packages: the script runs without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from losses.functional import conv_weight_grad


def whole_batch(layer_input, conv, grad_output):
    """The former conv_weight_grad: one float32 copy of the whole input per call."""
    return torch.nn.grad.conv2d_weight(
        layer_input.float(), conv.weight.shape, grad_output.float(), stride=1, padding=1, dilation=1, groups=1
    )


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def peak_above_now(fn) -> tuple[float, torch.Tensor]:
    """(MiB of peak RSS above the RSS before the call, result)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = rss_kib("VmRSS:")
    result = fn()
    return (rss_kib("VmHWM:") - before) / 1024, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    args = parser.parse_args()
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(args.channels, 3, 3, padding=1)
    shape = (args.batch, args.channels, args.resolution, args.resolution)
    layer_input = torch.randn(shape).to(getattr(torch, args.dtype))
    coefs = [torch.randn(args.batch, 3, args.resolution, args.resolution) for _ in range(2)]
    variants = {
        "whole-batch fp32 copy": lambda: [whole_batch(layer_input, conv, c) for c in coefs],
        "chunked (conv_weight_grad)": lambda: [conv_weight_grad(layer_input, conv, c) for c in coefs],
    }
    peaks: dict[str, list[float]] = {name: [] for name in variants}
    results = {}
    for r in range(args.rounds):
        for name in list(variants) if r % 2 == 0 else list(variants)[::-1]:
            peak, results[name] = peak_above_now(variants[name])
            peaks[name].append(peak)
    input_mib = layer_input.numel() * layer_input.element_size() / 2**20
    print(
        f"conv_out input {tuple(shape)} {args.dtype}: {input_mib:.0f} MiB (its float32 copy: {2 * input_mib:.0f} MiB)"
    )
    for name, values in peaks.items():
        print(f"  {name:<28} peak above start: {sorted(values)[len(values) // 2]:7.0f} MiB (median of {len(values)})")
    a, b = results.values()
    diff = max((x - y).abs().max().item() / y.abs().max().item() for x, y in zip(a, b, strict=True))
    print(f"  largest difference between the two gradients, relative to their largest entry: {diff:.1e}")


if __name__ == "__main__":
    main()
