"""Training-step throughput and peak memory: our Trainer's step against the reference loop.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_train_step.py            # CPU, a few minutes
    PYTHONPATH=. python benchmarks/bench_train_step.py --device cuda --preset transfusion \
        --resolution 256 --batch_size 16 --mixed_precision bf16 --variants ours,reference

A step is one G step then one D step on the same batch, GAN on from step 0 (disc_start=0),
random-weight LPIPS-VGG and MoCo (same cost as the real ones). Variants (--variants):

  ours                  train_vae.Trainer(cfg, accelerator).train_step: the trainer itself, built
                        by its own constructor, nothing re-implemented here
  reference             the reference loop: the semantics of the reference implementation
                        (lavinal712/AutoencoderKL, branch transfusion_vae), written here as the
                        independent comparison: the loss module's direct path (λ from two
                        autograd.grad on decoder.conv_out.weight, then loss.backward() through
                        everything again), LPIPS and MoCo weights with requires_grad=True and the
                        real image's features built with a graph, real and fake through D in
                        separate calls, plain torch Adam, no grad-norm or non-finite checks
  reference_alternating reference, updating the AE only on every other batch as the reference does
                        after disc_start: the batch in between is a D step that runs the VAE forward
                        again. A "step" is those two batches (one AE update); img/s counts the AE's images
  ours_ref_lambda       ours with --adaptive_weight_mode reference (direct λ, frozen nets)
  ours_channels_last    ours with --channels_last
  ours_compile          ours with --torch_compile (slow first step; inductor draws its own posterior
                        noise, so its first-step losses differ from the others)
  ours_fused_adam       ours with both optimizers swapped for torch.optim.Adam(fused=True) (what
                        build_optimizer picks on CUDA and CPU anyway: a control)
  ours_foreach_adam     ours with both optimizers swapped for torch.optim.Adam(foreach=True)
  ours_cudnn_benchmark  ours with torch.backends.cudnn.benchmark on during its steps (CUDA)

The "ours" variants differ from the trainer only by config or by the optimizer objects swapped on
the built trainer. A former `ours_nosync` variant (an _update that never reads the gradient norm
on the host) was dropped: it needed a re-implemented update, and train_step's skip accounting
reads the step's outcome on the host anyway.

Every variant is built from the same random seed (identical weights) and takes its first step on the
same batch and posterior noise, so the first-step losses printed must agree. Timing alternates
the variants in rounds (A B C, then C B A, ...) so that load from other processes on a shared
machine hits them alike; the ratio column is the median of the per-round ratios to the
baseline variant (--baseline, default reference). Peak memory is measured while each variant is
built and warmed up, one after the other, as what that variant adds on top of what was already
resident (weights, optimizer state, activations): torch.cuda.max_memory_allocated on GPU, the
process RSS (sampled every ms, after malloc_trim) on CPU. --batch_sizes 8,16,32 instead times
the first variant at each batch size and reports the whole process's peak at each. MFU (GPU,
Transfusion preset) counts 3.1 TFLOP of useful work per 256² image for every variant.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import sys
import threading
import time
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

# The repository root, for the trainer's packages: the script runs without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_vae
from training.config import TrainConfig

# A Transfusion-preset step with LPIPS, MoCo and D at 256² (forward + backward, counted by hand).
TFLOP_PER_IMAGE_256 = 3.1
# Dense bf16/fp16 tensor-core peaks (TFLOP/s) by a substring of torch.cuda.get_device_name(), the most specific
# first. NVIDIA's H100, H200 and A100 data sheets list them with 2:4 sparsity, twice these: H100 SXM 1,979, PCIe 1,513,
# NVL 1,671; H200 SXM 1,979, NVL 1,671; A100 624. ("GH200" matches "H200": its GPU's peak is the H100 SXM's.)
PEAK_TFLOPS = {"H100 NVL": 835.0, "H100 PCIe": 756.0, "H200 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}
H200_BF16_DENSE_TFLOPS = PEAK_TFLOPS["H200"]

VARIANTS = (
    "ours",
    "reference",
    "reference_alternating",
    "ours_ref_lambda",
    "ours_channels_last",
    "ours_compile",
    "ours_fused_adam",
    "ours_foreach_adam",
    "ours_cudnn_benchmark",
)


# ----------------------------------------------------------------------------------------
# Memory and time
# ----------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc), so RSS reflects live memory."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Bytes a block adds at its peak over what was allocated when it began (`peak`), and the process's
    peak during the block (`absolute`): CUDA allocator on GPU, RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self.absolute = device, 0, 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _malloc_trim()
            self.base = self.high = _rss_bytes()
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.001):
            self.high = max(self.high, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.absolute = torch.cuda.max_memory_allocated(self.device)
        else:
            self.stop.set()
            self.thread.join()
            self.absolute = max(self.high, _rss_bytes())
        self.peak = self.absolute - self.base


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------
# Our step: train_vae.Trainer itself
# ----------------------------------------------------------------------------------------


def train_config(args, **overrides) -> TrainConfig:
    cfg = TrainConfig(
        model_config=args.preset,
        resolution=args.resolution,
        train_batch_size=args.batch_size,
        mixed_precision=args.mixed_precision,
        disc_start=0,
        perception_weights="random",
        adaptive_weight_max=args.adaptive_weight_max,
        report_to="none",
        dataloader_num_workers=0,
        seed=args.seed,
        **overrides,
    )
    cfg.check()
    return cfg


def swap_adam(t: train_vae.Trainer, **impl) -> None:
    """Replace both of the built trainer's optimizers (and their schedules) by torch Adam with `impl`
    (fused=True, foreach=True): same parameters, hyper-parameters and schedules. Before the first step."""
    cfg = t.cfg
    adam = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, **impl)
    opt_g = torch.optim.Adam([p for p in t.vae.parameters() if p.requires_grad], lr=cfg.learning_rate, **adam)
    opt_d = torch.optim.Adam(
        t.loss_fn.discriminator.parameters(), lr=cfg.disc_learning_rate or cfg.learning_rate, **adam
    )
    sched_g, sched_d = train_vae.build_schedules(cfg, opt_g, opt_d)
    t.opt_g, t.opt_d, t.sched_g, t.sched_d = t.accelerator.prepare(opt_g, opt_d, sched_g, sched_d)


def build_trainer(cfg: TrainConfig, accelerator: Accelerator, adam: dict | None = None) -> train_vae.Trainer:
    """train_vae.Trainer(cfg, accelerator) in train mode, as Trainer.fit leaves it; `adam` swaps its optimizers."""
    t = train_vae.Trainer(cfg, accelerator)
    if adam is not None:
        swap_adam(t, **adam)
    t.model.train()
    t.loss_fn.train()
    return t


# ----------------------------------------------------------------------------------------
# The reference loop
# ----------------------------------------------------------------------------------------


def _identity_with_real_graph(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """IdentityLoss.forward as the reference runs it: the real image's MoCo features are built with a graph."""
    return F.mse_loss(self.features(reconstructions).float(), self.features(inputs).float())


class ReferenceStep:
    """The reference loop: the reference implementation's semantics on the same losses, model and optimizer settings.

    Built with the trainer's builders in the trainer's order (loss, then autoencoder), so one random seed gives
    the same weights as train_vae.Trainer. `__call__` is the benchmark's unit (one AE update and one
    D update); `train_batch` is one batch of the reference's own schedule on a data stream.

    alternating: the reference after disc_start updates the AE only on every other batch; the batch
    in between is a D step that reconstructs that batch again (a VAE forward, no graph).
    """

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, alternating: bool = False):
        self.accelerator, self.alternating, device = accelerator, alternating, accelerator.device
        self.loss_fn = train_vae.build_loss(cfg).to(device)
        self.vae = train_vae.build_autoencoder(cfg).to(device)
        for net in (self.loss_fn.perceptual, self.loss_fn.identity):
            if net is not None:
                net.requires_grad_(True)  # the reference's LPIPS and MoCo keep gradients
        if self.loss_fn.identity is not None:
            self.loss_fn.identity.forward = types.MethodType(_identity_with_real_graph, self.loss_fn.identity)
        self.disc = self.loss_fn.discriminator
        adam = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
        self.opt_g = torch.optim.Adam(self.vae.parameters(), **adam)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), **adam)
        self.vae.train()
        self.loss_fn.train()

    def autoencoder_step(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """One AE update on x; returns (the detached reconstruction, logs)."""
        train_vae.requires_grad(self.disc, False)  # Lightning's toggle_optimizer: G's backward skips D's weights
        with self.accelerator.autocast():
            posterior = self.vae.encode(x).latent_dist
            recon = self.vae.decode(posterior.sample()).sample
            loss, logs = self.loss_fn.generator_loss(
                x,
                recon,
                posterior.mean,
                posterior.logvar,
                step,
                last_layer_weight=self.vae.decoder.conv_out.weight,
                last_layer_input=None,
                discriminator=self.disc,
            )
        loss.backward()  # through LPIPS, MoCo (weights and real branch too) and D once more
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        return recon.detach(), {f"loss/{k}": v for k, v in logs.items()}

    def discriminator_step(self, x: torch.Tensor, step: int, recon: torch.Tensor | None = None) -> dict:
        """One D update on x and `recon`, or (None) a fresh reconstruction of x, as the reference's D batch."""
        if recon is None:
            with torch.no_grad(), self.accelerator.autocast():
                recon = self.vae.decode(self.vae.encode(x).latent_dist.sample()).sample
        train_vae.requires_grad(self.disc, True)
        with self.accelerator.autocast():
            d_loss, d_logs = self.loss_fn.discriminator_loss(x, recon, step, discriminator=self.disc)
        d_loss.backward()
        self.opt_d.step()
        self.opt_d.zero_grad(set_to_none=True)
        return {f"disc/{k}": v for k, v in d_logs.items()}

    def __call__(self, x: torch.Tensor, step: int) -> dict:
        """One AE update, then (GAN on) one D update: on the same reconstruction, or, alternating, on a
        fresh one of the next batch (the same tensor here)."""
        recon, out = self.autoencoder_step(x, step)
        if self.loss_fn.gan_active(step):
            d_logs = self.discriminator_step(x, step, None if self.alternating else recon)
            # The alternating D step sees another reconstruction: its loss is not comparable, so named apart.
            prefix = "disc_next_batch" if self.alternating else "disc"
            out.update({f"{prefix}/{k.split('/', 1)[1]}": v for k, v in d_logs.items()})
        return out

    def train_batch(self, x: torch.Tensor, batch_index: int) -> dict:
        """One batch of the reference's schedule, the step being the batch index: an AE update on every
        batch before disc_start; after it, alternating, the reference's training_step (optimizer index =
        batch index % 2): even batches update the AE, odd ones D on a fresh reconstruction of that
        batch; not alternating, AE then D on every batch."""
        if not self.loss_fn.gan_active(batch_index):
            return self.autoencoder_step(x, batch_index)[1]
        if not self.alternating:
            return self(x, batch_index)
        if batch_index % 2:
            return self.discriminator_step(x, batch_index)
        return self.autoencoder_step(x, batch_index)[1]


# ----------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    step: object
    seconds: list[float] = field(default_factory=list)  # per round, per step
    peak_bytes: int = 0
    first_logs: dict = field(default_factory=dict)
    steps_done: int = 0


OUR_CONFIGS = {
    "ours_ref_lambda": dict(adaptive_weight_mode="reference"),
    "ours_channels_last": dict(channels_last=True),
    "ours_compile": dict(torch_compile=True),
}
OUR_ADAMS = {"ours_fused_adam": dict(fused=True), "ours_foreach_adam": dict(foreach=True)}


def build_variant(name: str, args, accelerator: Accelerator):
    """A callable (x, step) -> logs for the named variant."""
    if name in ("reference", "reference_alternating"):
        return ReferenceStep(train_config(args), accelerator, alternating=name == "reference_alternating")
    t = build_trainer(train_config(args, **OUR_CONFIGS.get(name, {})), accelerator, OUR_ADAMS.get(name))
    if name == "ours_cudnn_benchmark":

        def step(x, i):
            torch.backends.cudnn.benchmark = True
            try:
                return t.train_step(x, i)
            finally:
                torch.backends.cudnn.benchmark = False

        return step
    return t.train_step


def run_steps(v: Variant, x: torch.Tensor, n: int) -> dict:
    logs = {}
    for _ in range(n):
        logs = v.step(x, v.steps_done)
        v.steps_done += 1
    return logs


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


LOSS_KEYS = ("loss/total", "loss/nll", "loss/kl", "loss/gan", "loss/adaptive_weight", "disc/loss")


def loss_table(variants: list[Variant]) -> str:
    ref = variants[0].first_logs
    lines = [
        "first-step losses (identical weights, batch and noise; torch.compile draws other posterior noise):",
        f"  {'variant':<22}" + "".join(f"{k.split('/')[-1]:>16}" for k in LOSS_KEYS) + f"{'max rel diff':>15}",
    ]
    for v in variants:
        vals = [v.first_logs.get(k) for k in LOSS_KEYS]
        diffs = [
            abs(a - ref[k]) / max(abs(ref[k]), 1e-12)
            for a, k in zip(vals, LOSS_KEYS, strict=True)
            if a is not None and k in ref
        ]
        lines.append(
            f"  {v.name:<22}"
            + "".join(f"{a:>16.8g}" if a is not None else f"{'n/a':>16}" for a in vals)
            + f"{max(diffs):>15.2e}"
        )
    return "\n".join(lines)


def results_table(
    variants: list[Variant], baseline: str, batch: int, flop_per_image: float | None, peak_tflops: float
) -> tuple[str, list[dict]]:
    base = next((v for v in variants if v.name == baseline), variants[0])
    ratio_head, spread_head = "× " + base.name, "(round min–max)"
    head = f"  {'variant':<22}{'img/s':>9}{'s/step':>10}{'peak mem':>12}{ratio_head:>12}{spread_head:>18}"
    if flop_per_image:
        head += f"{'MFU':>8}"
    lines, rows = [head], []
    for v in variants:
        s_per_step = statistics.fmean(v.seconds)
        ratios = [b / s for b, s in zip(base.seconds, v.seconds, strict=True)]
        ratio = statistics.median(ratios)
        row = {
            "variant": v.name,
            "images_per_s": batch / s_per_step,
            "s_per_step": s_per_step,
            "peak_bytes": v.peak_bytes,
            "ratio_to_" + base.name: ratio,
            "round_ratios": ratios,
        }
        line = (
            f"  {v.name:<22}{batch / s_per_step:>9.2f}{s_per_step:>10.3f}{fmt_bytes(v.peak_bytes):>12}"
            f"{ratio:>11.2f}×{f'{min(ratios):.2f}–{max(ratios):.2f}':>18}"
        )
        if flop_per_image:
            row["mfu"] = batch / s_per_step * flop_per_image / (peak_tflops * 1e12)
            line += f"{100 * row['mfu']:>7.1f}%"
        lines.append(line)
        rows.append(row)
    return "\n".join(lines), rows


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--preset", default="small", help="autoencoder.models preset (transfusion, small, tiny) or a JSON config"
    )
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument(
        "--batch_sizes", default=None, help="comma list: time the first variant at each batch size (a sweep)"
    )
    p.add_argument("--mixed_precision", default="no", choices=("no", "bf16"), help="bf16 autocast (the recipe) or none")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--variants",
        default="ours,ours_ref_lambda,reference,reference_alternating",
        help=f"comma list of {', '.join(VARIANTS)}",
    )
    p.add_argument("--baseline", default="reference", help="variant the ratio column divides by")
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant (split over --rounds)")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed steps per variant before timing (the first one checks losses)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1 on CPU, where OpenMP threads spinning on cores shared "
        "with other processes made steps several times slower; torch's default on GPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--adaptive_weight_max",
        type=float,
        default=1e8,
        help="λ clamp; above the recipe's 1e4 so that the first-step λ of random nets is compared, "
        "not clamped alike (same cost)",
    )
    p.add_argument(
        "--tflop_per_image",
        type=float,
        default=None,
        help=f"for MFU; default on GPU {TFLOP_PER_IMAGE_256} × (resolution/256)² for the transfusion "
        "preset, else no MFU",
    )
    p.add_argument(
        "--peak_tflops", type=float, default=H200_BF16_DENSE_TFLOPS, help="device peak for MFU (H200 bf16 dense)"
    )
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup, --steps and --rounds must be >= 1")
    return args


def header(args, accelerator: Accelerator) -> str:
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    n_params = sum(p.numel() for p in train_vae.build_vae(args.preset).parameters()) / 1e6
    return (
        f"torch {torch.__version__} | {name} | preset {args.preset} ({n_params:.1f} M) | {args.resolution}² | "
        f"batch {args.batch_size} | {args.mixed_precision} | GAN on, random LPIPS/MoCo | "
        f"{args.warmup} warm-up + {args.steps} timed steps per variant in {args.rounds} rounds"
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    device = accelerator.device
    if device.type == "cuda":  # as train_vae.main with the default --allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    flop = args.tflop_per_image
    if flop is None and args.preset == "transfusion" and device.type == "cuda":
        flop = TFLOP_PER_IMAGE_256 * (args.resolution / 256) ** 2
    flop = flop * 1e12 if flop else None
    print(header(args, accelerator), flush=True)

    g = torch.Generator().manual_seed(args.seed)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [args.batch_size]
    x = (torch.rand(max(batch_sizes), 3, args.resolution, args.resolution, generator=g) * 2 - 1).to(device)

    variants = []
    for name in args.variants:
        with PeakMemory(device) as mem:
            set_seed(args.seed)
            v = Variant(name, build_variant(name, args, accelerator))
            torch.manual_seed(args.seed + 1)  # the same posterior noise in every variant's first step
            v.first_logs = {k: float(val) for k, val in run_steps(v, x[: args.batch_size], 1).items()}
            run_steps(v, x[: args.batch_size], args.warmup - 1)
            synchronize(device)
        v.peak_bytes = mem.peak
        variants.append(v)
        print(f"built and warmed up {name}: peak +{fmt_bytes(v.peak_bytes)}", flush=True)
    print(loss_table(variants), flush=True)

    result = {
        "config": dict(vars(args)),
        "device": header(args, accelerator),
        "first_step_losses": {v.name: v.first_logs for v in variants},
        "runs": [],
    }
    per_round = max(1, args.steps // args.rounds)
    for bs in batch_sizes:
        xb = x[:bs]
        timed = variants if len(batch_sizes) == 1 else variants[:1]
        if len(batch_sizes) > 1:
            for v in timed:
                v.seconds = []
                with PeakMemory(device) as mem:
                    run_steps(v, xb, 1)  # warm the new shapes (allocator, cudnn) outside the timing
                    synchronize(device)
                v.peak_bytes = mem.absolute
        for r in range(args.rounds):
            for v in timed if r % 2 == 0 else timed[::-1]:
                synchronize(device)
                tic = time.perf_counter()
                run_steps(v, xb, per_round)
                synchronize(device)
                v.seconds.append((time.perf_counter() - tic) / per_round)
        table, rows = results_table(timed, args.baseline, bs, flop, args.peak_tflops)
        title = f"batch {bs}: {per_round * args.rounds} timed steps per variant"
        if len(batch_sizes) > 1:
            title += " (peak mem: the whole process's, at this batch size)"
        print(title + "\n" + table, flush=True)
        result["runs"].append({"batch_size": bs, "rows": rows})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
