"""Time to quality: held-out PSNR / SSIM / LPIPS against training time, our trainer against the reference loop.

    HF_HUB_OFFLINE=1 python benchmarks/convergence.py              # small preset, 2 × 20 min of training
    HF_HUB_OFFLINE=1 python benchmarks/convergence.py --smoke      # seconds, tiny preset (CI)
    HF_HUB_OFFLINE=1 python benchmarks/convergence.py --preset tiny --minutes 3 --gan off --seeds 0 1 2
    HF_HUB_OFFLINE=1 python benchmarks/convergence.py --preset tiny --minutes 3 --gan off --seed 1 --out_dir c/seed1
    HF_HUB_OFFLINE=1 python benchmarks/convergence.py --collect c/seed0 c/seed1 c/seed2 --out_dir c

Two questions, asked separately. Speed of learning: --gan off trains both runs with the same loss
(no GAN), batches and updates, so the time to quality measures the trainer's own speed. Quality
with the GAN on (--gan on, the default, from --disc_start): a GAN trades PSNR for realism, so the
time to the reference's final held-out LPIPS is reported beside the PSNR one (a random-weight VGG
here: a fixed feature distance the GAN does not optimise, not the published metric). One draw is
noise: --seeds runs one draw per seed (each into OUT_DIR/seedN), --collect summarises draws run as
separate processes (every recorded flag equal but the seed, each seed once), and both print every
draw's ratios with each ratio's median and range (convergence_draws.py).

Two runs train the same autoencoder from the same initial weights, on the same batches in the same
order (two data iterators built identically: native-scale crops of the bundled photographs,
`data.demo_sources`), with the same loss (random-weight LPIPS, ID term off, GAN from --disc_start
with --gan_ramp_steps, λ clamp, lr, batch) and the same posterior noise stream (each run keeps its
own copy of torch's RNG state):

  ours       train_vae.Trainer(cfg, accelerator).train_step with the trainer's defaults: fast λ,
             frozen perception nets, an AE and a D update on every batch
  reference  the reference loop of benchmarks/bench_train_step.py (ReferenceStep.train_batch): λ by
             two autograd.grad, perception nets with requires_grad, real features with a graph, plain
             Adam and, after disc_start, the reference's schedule: the AE on even batches, D on odd
             ones on a fresh reconstruction of that batch (--reference_schedule every_batch: AE
             then D on every batch instead)

Both runs count steps in batches (the GAN switch-on and ramp reach them at the same batch). Each
gets --minutes of its own training time (data loading included, evaluation excluded). They run
interleaved in one process, --slice_s seconds of one then of the other (order swapped every
round), so load from other processes on a shared machine hits both alike. Every --eval_every_s of
a run's training time, and at 25 / 50 / 100 % of the budget, its held-out PSNR / SSIM / LPIPS are
measured by metrics.held_out_metrics (posterior mean, as the trainer's validation) on the
same fixed crops of photographs never trained on, with one random-weight LPIPS net for both. What is
measured is an exponential moving average of each run's weights (--ema_decay, default 0.99, stepped
after every AE update of that run, as the trainer's --use_ema does): with the GAN on, the raw
weights' PSNR swings by about ±1 dB from one evaluation to the next, enough to move the
time-to-PSNR ratio by a third either way. The raw weights' PSNR is recorded beside it (psnr_raw)
with its own ratio.

A draw prints (and writes to --out_dir: convergence.txt, convergence.json with every point,
convergence.png with the curves) the metrics at 25 / 50 / 100 % of the budget, the batches and
updates each run did, and three time-to-quality ratios (time_to_target): the training time ours
needs to reach the reference loop's final value (its last evaluation; the first crossing, linear
between evaluation points) divided by the reference loop's total training time, for the PSNR of
the EMA weights, the PSNR of the raw weights and the LPIPS of the EMA weights (lower is better).
Below 1 ours gets there sooner; the target is ≤ 0.5; "never" when ours does not get there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel

# The repository root, for the trainer's packages: the script runs without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data
import train_vae
from bench_train_step import ReferenceStep, build_trainer, synchronize
from common.errors import UserError
from convergence_draws import load_draws, write_draws
from losses.perceptual import build_lpips
from metrics import held_out_metrics, load_images
from publishing import export
from training.config import DEMO_DEFAULTS, TrainConfig

RUNS = ("ours", "reference")
GAN_NEVER = 2**31 - 1  # --gan off: a --disc_start no run reaches
FRACTIONS = (0.25, 0.5, 1.0)  # of the budget: the table's rows
METRICS = ("psnr", "ssim", "lpips")
FIRST_STEP_KEYS = ("loss/total", "loss/nll", "loss/kl", "loss/gan", "loss/adaptive_weight")
# --smoke: what CI can afford; explicit flags still win.
SMOKE = dict(
    preset="tiny",
    resolution=32,
    batch_size=2,
    minutes=0.1,
    eval_every_s=2.0,
    slice_s=1.0,
    num_heldout=4,
    eval_batch_size=4,
)
DEFAULTS = dict(
    preset="small",
    resolution=64,
    batch_size=4,
    minutes=20.0,
    slice_s=10.0,
    num_heldout=32,
    eval_batch_size=16,
)


@dataclass
class Run:
    """One of the two trainings and its own clock, counters, RNG state and evaluation points."""

    name: str
    step: Callable[[torch.Tensor, int], dict]  # (batch on the device, batch index) -> logs
    vae: torch.nn.Module
    batches: Iterator[torch.Tensor]
    ema: EMAModel | None = None  # of vae, stepped after each AE update; None with --ema_decay 0
    rng: dict = field(default_factory=dict)
    train_s: float = 0.0
    batches_done: int = 0
    ae_updates: int = 0
    d_updates: int = 0
    first_batch_sum: float | None = None
    first_logs: dict = field(default_factory=dict)
    points: list[dict] = field(default_factory=list)
    marks: list[float] = field(default_factory=list)  # training times (s) still to evaluate at, ascending


# ----------------------------------------------------------------------------------------
# Building the two runs
# ----------------------------------------------------------------------------------------


def train_config(args) -> TrainConfig:
    """The one configuration both runs are built from."""
    cfg = TrainConfig(
        model_config=args.preset,
        resolution=args.resolution,
        train_batch_size=args.batch_size,
        learning_rate=args.lr,
        disc_start=args.disc_start,
        gan_ramp_steps=args.gan_ramp_steps,
        perception_weights="random",
        id_weight=0.0,
        crop_mode="native",
        shuffle_block=DEMO_DEFAULTS["shuffle_block"],
        dataloader_num_workers=0,
        mixed_precision=args.mixed_precision,
        report_to="none",
        seed=args.seed,
        output_dir=args.out_dir,
    )
    cfg.check()
    return cfg


def batch_stream(cfg: TrainConfig, accelerator: Accelerator, train_source) -> Iterator[torch.Tensor]:
    """The trainer's own data loader over the training photographs: endless (B, 3, R, R) batches in [-1, 1]."""
    _, loader = train_vae.build_dataloader(cfg, accelerator, [train_source])
    return (batch["pixel_values"] for batch in loader)


def save_rng(run: Run, device: torch.device) -> None:
    run.rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        run.rng["cuda"] = torch.cuda.get_rng_state(device)


def load_rng(run: Run, device: torch.device) -> None:
    torch.set_rng_state(run.rng["cpu"])
    if "cuda" in run.rng:
        torch.cuda.set_rng_state(run.rng["cuda"], device)


def build_runs(args, accelerator: Accelerator, train_source) -> dict[str, Run]:
    """Both runs from one seed: identical initial weights, data order and posterior noise stream."""
    cfg = train_config(args)
    device = accelerator.device
    set_seed(args.seed)
    trainer = build_trainer(cfg, accelerator)  # the trainer's defaults: fast λ, frozen nets, AE and D every batch
    set_seed(args.seed)
    reference = ReferenceStep(cfg, accelerator, alternating=args.reference_schedule == "alternating")
    runs = {
        "ours": Run("ours", trainer.train_step, trainer.vae, batch_stream(cfg, accelerator, train_source)),
        "reference": Run(
            "reference", reference.train_batch, reference.vae, batch_stream(cfg, accelerator, train_source)
        ),
    }
    for run in runs.values():
        if args.ema_decay > 0:
            run.ema = EMAModel(run.vae.parameters(), decay=args.ema_decay)
            run.ema.to(device)
        torch.manual_seed(args.seed + 1)  # the same noise stream for both, kept apart from here on
        save_rng(run, device)
    return runs


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------
# Training in interleaved slices, evaluation on the run's own clock
# ----------------------------------------------------------------------------------------


def evaluate(run: Run, images: torch.Tensor, lpips, args, accelerator: Accelerator) -> None:
    """Held-out metrics of the run's EMA weights (the curve compared), and PSNR of its raw weights beside them."""
    # With an EMA only the raw weights' PSNR is kept: their LPIPS (the costly metric) is not computed.
    raw_lpips = lpips if run.ema is None else None
    raw, _ = held_out_metrics(run.vae, images, raw_lpips, args.eval_batch_size, autocast=accelerator.autocast)
    metrics = raw
    if run.ema is not None:
        averaged = export.averaged_copy(run.vae, run.ema)  # a few MB; the run's own weights stay untouched
        metrics, _ = held_out_metrics(averaged, images, lpips, args.eval_batch_size, autocast=accelerator.autocast)
    run.points.append(
        {
            "train_s": run.train_s,
            "batches": run.batches_done,
            "ae_updates": run.ae_updates,
            "d_updates": run.d_updates,
            **metrics,
            "psnr_raw": raw["psnr"],
        }
    )
    while run.marks and run.marks[0] <= run.train_s:
        run.marks.pop(0)
    shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in METRICS if k in metrics)
    print(f"{run.name:<10} {run.train_s:8.1f} s  {run.batches_done:6d} batches  {shown}", flush=True)


def train_slice(
    run: Run, seconds: float, budget_s: float, images: torch.Tensor, lpips, args, accelerator: Accelerator
) -> None:
    """Train `run` for `seconds` of its own training time (never past its budget), evaluating at its marks."""
    device = accelerator.device
    load_rng(run, device)
    end = min(run.train_s + seconds, budget_s)
    while run.train_s < end:
        synchronize(device)
        tic = time.perf_counter()
        x = next(run.batches).to(device)
        logs = run.step(x, run.batches_done)
        ae_updated = any(k.startswith("loss/") for k in logs)
        if run.ema is not None and ae_updated:
            run.ema.step(run.vae.parameters())
        synchronize(device)
        run.train_s += time.perf_counter() - tic
        if run.batches_done == 0:
            run.first_batch_sum = float(x.double().sum())
            run.first_logs = {k: float(v) for k, v in logs.items()}
        run.batches_done += 1
        run.ae_updates += ae_updated
        run.d_updates += any(k.startswith("disc/") for k in logs)
        if run.marks and run.train_s >= run.marks[0]:
            evaluate(run, images, lpips, args, accelerator)  # not on the run's clock
    save_rng(run, device)


def train_interleaved(
    runs: dict[str, Run], budget_s: float, images: torch.Tensor, lpips, args, accelerator: Accelerator
) -> None:
    marks = sorted(
        {
            *(k * args.eval_every_s for k in range(1, math.ceil(budget_s / args.eval_every_s))),
            *(f * budget_s for f in FRACTIONS),
        }
    )
    for run in runs.values():
        run.marks = list(marks)
        evaluate(run, images, lpips, args, accelerator)  # t = 0: the same weights, so the same numbers
    order, rounds = list(runs.values()), 0
    while any(run.train_s < budget_s for run in order):
        for run in order if rounds % 2 == 0 else order[::-1]:
            if run.train_s < budget_s:
                train_slice(run, args.slice_s, budget_s, images, lpips, args, accelerator)
        rounds += 1


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------


def time_to_reach(points: list[dict], target: float, key: str = "psnr", lower_is_better: bool = False) -> float | None:
    """Training time at which points[key] first reaches `target` (at or above it; at or below it with
    lower_is_better, as for LPIPS), linear between evaluation points; None if never."""
    sign = -1.0 if lower_is_better else 1.0
    if points and sign * points[0][key] >= sign * target:
        return points[0]["train_s"]
    for prev, cur in itertools.pairwise(points):
        if sign * cur[key] >= sign * target:
            frac = (target - prev[key]) / (cur[key] - prev[key])
            return prev["train_s"] + frac * (cur["train_s"] - prev["train_s"])
    return None


def point_at(points: list[dict], seconds: float) -> dict:
    """The first evaluation at or after `seconds` of training time (the one that mark triggered)."""
    return next((p for p in points if p["train_s"] >= seconds - 1e-9), points[-1])


def first_step_check(runs: dict[str, Run]) -> dict:
    """Whether both runs took their first batch on the same images with the same AE losses."""
    ours, ref = runs["ours"], runs["reference"]
    diffs = [
        abs(ours.first_logs[k] - ref.first_logs[k]) / max(abs(ref.first_logs[k]), 1e-12)
        for k in FIRST_STEP_KEYS
        if k in ours.first_logs and k in ref.first_logs
    ]
    return {
        "same_first_batch": ours.first_batch_sum == ref.first_batch_sum,
        "max_rel_diff_first_step_losses": max(diffs) if diffs else None,
    }


def time_to_target(ours: Run, ref: Run, key: str, lower_is_better: bool = False) -> dict | None:
    """The time-to-quality ratio: the training time ours needs to reach the reference loop's final `key` (its last
    evaluation: at or above it, at or below for LPIPS), over the reference's total training time (below 1: ours gets
    there sooner; None if never). None when the points carry no `key` (--ema_decay 0 keeps no raw-weight copy)."""
    if key not in ref.points[-1]:
        return None
    target, ref_total = ref.points[-1][key], ref.points[-1]["train_s"]
    t_ours = time_to_reach(ours.points, target, key, lower_is_better)
    return {
        f"target_{key.removesuffix('_raw')}": target,
        "ours_s": t_ours,
        "reference_total_s": ref_total,
        "ratio": None if t_ours is None else t_ours / ref_total,
    }


def time_to_lpips(ours: Run, ref: Run) -> dict | None:
    """Ours' time to the reference loop's final held-out LPIPS (lower is better) over the reference's total."""
    return time_to_target(ours, ref, "lpips", lower_is_better=True)


def run_summary(run: Run) -> dict:
    return {
        "train_s": run.train_s,
        "batches": run.batches_done,
        "ae_updates": run.ae_updates,
        "d_updates": run.d_updates,
        "first_step_logs": run.first_logs,
        "points": run.points,
    }


def summary_numbers(runs: dict[str, Run], budget_s: float, args, header: str) -> dict:
    """One draw's result (convergence.json): the table rows at 25 / 50 / 100 % of the budget, the three ratios,
    the first-step check and every evaluation point of both runs."""
    ours, ref = runs["ours"], runs["reference"]
    table = [
        {"fraction": frac, "run": run.name, **point_at(run.points, frac * budget_s)}
        for frac in FRACTIONS
        for run in (ours, ref)
    ]
    return {
        "header": header,
        "config": {k: v for k, v in vars(args).items() if k != "smoke"} | {"smoke": args.smoke},
        "budget_s": budget_s,
        "table": table,
        "time_to_psnr": time_to_target(ours, ref, "psnr"),
        "time_to_psnr_raw": time_to_target(ours, ref, "psnr_raw"),
        "time_to_lpips": time_to_lpips(ours, ref),
        "first_step": first_step_check(runs),
        "runs": {run.name: run_summary(run) for run in (ours, ref)},
    }


def reached_text(ttq: dict) -> str:
    return (
        "never reached it" if ttq["ratio"] is None else f"reached it after {ttq['ours_s']:.1f} s -> {ttq['ratio']:.2f}"
    )


def ratio_lines(result: dict) -> list[str]:
    """The three time-to-quality lines of the printed summary."""
    ema_decay, runs = result["config"]["ema_decay"], result["runs"]
    weights = f"EMA {ema_decay:g} weights" if ema_decay > 0 else "raw weights"
    ttp, raw, lpips = result["time_to_psnr"], result["time_to_psnr_raw"], result["time_to_lpips"]
    if ttp["ratio"] is None:
        best = max(p["psnr"] for p in runs["ours"]["points"])
        lines = [
            f"time-to-PSNR ({weights}): ours never reached the reference loop's final PSNR {ttp['target_psnr']:.2f} dB "
            f"within its {runs['ours']['train_s']:.0f} s (its best: {best:.2f} dB)"
        ]
    else:
        lines = [
            f"time-to-PSNR ratio ({weights}): ours reached the reference loop's final PSNR {ttp['target_psnr']:.2f} dB "
            f"after {ttp['ours_s']:.1f} s; reference total {ttp['reference_total_s']:.1f} s -> {ttp['ratio']:.2f} "
            "(target <= 0.5)"
        ]
    if ema_decay > 0:
        lines.append(
            f"  the same on the raw weights (noisier from one evaluation to the next): the reference's final raw PSNR "
            f"{raw['target_psnr']:.2f} dB; ours {reached_text(raw)}"
        )
    if lpips is not None:
        lines.append(
            f"time-to-LPIPS ({weights}, random-weight VGG): the reference's final LPIPS "
            f"{lpips['target_lpips']:.4f}; ours {reached_text(lpips)}"
        )
    return lines


def summary_text(result: dict) -> str:
    """What is printed and written to convergence.txt, from the result alone."""
    lines = [
        result["header"],
        "",
        f"  {'budget':>6}  {'run':<10}{'train time':>11}{'batches':>9}{'AE upd':>8}{'D upd':>7}"
        f"{'PSNR':>8}{'SSIM':>8}{'LPIPS':>8}",
    ]
    for i, p in enumerate(result["table"]):
        label = f"{100 * p['fraction']:.0f}%" if i % 2 == 0 else ""
        lines.append(
            f"  {label:>6}  {p['run']:<10}{p['train_s']:>10.1f}s{p['batches']:>9}{p['ae_updates']:>8}"
            f"{p['d_updates']:>7}{p['psnr']:>8.2f}{p['ssim']:>8.4f}{p.get('lpips', math.nan):>8.4f}"
        )
    lines += ["", *ratio_lines(result)]
    for name, run in result["runs"].items():
        lines.append(
            f"{name}: {run['batches']} batches ({run['batches'] / run['train_s']:.3f}/s), "
            f"{run['ae_updates']} AE updates, {run['d_updates']} D updates in {run['train_s']:.1f} s of training"
        )
    check, (ours, ref) = result["first_step"], result["runs"].values()
    lines.append(
        f"first batch identical: {'yes' if check['same_first_batch'] else 'NO'}; first-step AE losses "
        f"max rel diff {check['max_rel_diff_first_step_losses']:.2e}; initial PSNR "
        f"{ours['points'][0]['psnr']:.4f} / {ref['points'][0]['psnr']:.4f}"
    )
    return "\n".join(lines)


def summarize(runs: dict[str, Run], budget_s: float, args, header: str) -> tuple[str, dict]:
    result = summary_numbers(runs, budget_s, args, header)
    return summary_text(result), result


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, color in zip(RUNS, ("tab:blue", "tab:orange"), strict=True):
        points = result["runs"][name]["points"]
        minutes = [p["train_s"] / 60 for p in points]
        for ax, key in zip(axes, METRICS, strict=True):
            if key in points[0]:
                ax.plot(minutes, [p[key] for p in points], marker=".", color=color, label=name)
        if result["config"]["ema_decay"] > 0:
            axes[0].plot(
                minutes, [p["psnr_raw"] for p in points], color=color, alpha=0.35, linewidth=0.8, label=f"{name}, raw"
            )
    ttp = result["time_to_psnr"]
    axes[0].axhline(ttp["target_psnr"], color="gray", linestyle="--", linewidth=0.8, label="reference's final PSNR")
    if ttp["ours_s"] is not None:
        axes[0].axvline(
            ttp["ours_s"] / 60,
            color="tab:blue",
            linestyle=":",
            linewidth=0.8,
            label=f"ours reaches it (ratio {ttp['ratio']:.2f})",
        )
    for ax, key in zip(axes, METRICS, strict=True):
        ax.set_xlabel("training time (min, evaluation excluded)")
        ax.set_ylabel(
            {"psnr": "held-out PSNR (dB)", "ssim": "held-out SSIM", "lpips": "held-out LPIPS (random VGG)"}[key]
        )
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(result["header"].split("\n")[0], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--smoke", action="store_true", help=f"CI: {', '.join(f'{k} {v}' for k, v in SMOKE.items())} unless given"
    )
    p.add_argument("--minutes", type=float, default=None, help="training time per run (default 20)")
    p.add_argument("--preset", default=None, help="autoencoder.models preset (default small)")
    p.add_argument("--resolution", type=int, default=None, help="crop size (default 64)")
    p.add_argument("--batch_size", type=int, default=None, help=f"default {DEFAULTS['batch_size']}")
    p.add_argument("--lr", type=float, default=4e-4, help="Adam lr of AE and D (constant)")
    p.add_argument("--disc_start", type=int, default=0, help="batch at which the GAN switches on (both runs)")
    p.add_argument(
        "--gan",
        default="on",
        choices=("on", "off"),
        help="off: no GAN in either run (--disc_start ignored): the same loss, batches and updates, so time to "
        "quality measures the trainer's own speed; on: the GAN from --disc_start",
    )
    p.add_argument(
        "--gan_ramp_steps",
        type=int,
        default=0,
        help="ramp the GAN weight over this many batches after disc_start (0: at once, the trainer's default)",
    )
    p.add_argument(
        "--reference_schedule",
        default="alternating",
        choices=("alternating", "every_batch"),
        help="the reference loop after disc_start: AE and D on alternate batches (the reference's) or both "
        "on every batch",
    )
    p.add_argument(
        "--eval_every_s",
        type=float,
        default=None,
        help="evaluate every N s of a run's training time (default: 1/20 of the budget, 60 s for 20 min)",
    )
    p.add_argument("--slice_s", type=float, default=None, help="training seconds of one run before switching (10)")
    p.add_argument(
        "--num_heldout", type=int, default=None, help="held-out crops to evaluate on, at most (32; the demo has 16)"
    )
    p.add_argument("--eval_batch_size", type=int, default=None, help="(16)")
    p.add_argument(
        "--ema_decay",
        type=float,
        default=0.99,
        help="evaluate an EMA of each run's weights with this decay, stepped after every AE update (0: the raw weights)",
    )
    p.add_argument("--mixed_precision", default="no", choices=("no", "bf16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default 1 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="run one draw per seed, one after another, each into OUT_DIR/seedN, then print every draw's ratios "
        "with their median and range (convergence_seeds.txt/.json in OUT_DIR); overrides --seed",
    )
    p.add_argument(
        "--collect",
        nargs="+",
        default=None,
        metavar="DIR",
        help="train nothing: summarise draws already run (each DIR holds a convergence.json), e.g. seeds run as "
        "parallel processes, into OUT_DIR/convergence_seeds.txt/.json",
    )
    p.add_argument(
        "--out_dir", default=None, help="default outputs/convergence (outputs/convergence_smoke with --smoke)"
    )
    return p


def parse_args(argv=None, p: argparse.ArgumentParser | None = None):
    p = p or build_parser()
    args = p.parse_args(argv)

    def fail(message: str):  # one line, exit 2, no usage text
        p.exit(2, f"{p.prog}: error: {message}\n")

    if args.collect and args.seeds is not None:
        fail("--seeds trains new draws, --collect summarises draws already run: give one")
    for key, value in (SMOKE if args.smoke else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.eval_every_s is None:
        args.eval_every_s = 60 * args.minutes / 20
    if args.out_dir is None:
        args.out_dir = os.path.join("outputs", "convergence_smoke" if args.smoke else "convergence")
    if args.minutes <= 0 or args.eval_every_s <= 0 or args.slice_s <= 0:
        fail("--minutes, --eval_every_s and --slice_s must be positive")
    if not 0 <= args.ema_decay < 1:
        fail("--ema_decay must be in [0, 1)")
    if args.gan == "off":
        args.disc_start = GAN_NEVER
    return args


def gan_text(args) -> str:
    if args.disc_start == GAN_NEVER:
        return "GAN off"
    return f"GAN from batch {args.disc_start} (ramp {args.gan_ramp_steps})"


def main(argv=None) -> dict:
    """One draw (--seed), several one after another (--seeds), or a summary of draws already run (--collect)."""
    parser = build_parser()
    args = parse_args(argv, parser)
    try:
        if args.collect:
            return write_draws(load_draws(args.collect), args.out_dir)
        if args.seeds is None:
            return run_draw(args)
        results = []
        for seed in args.seeds:
            draw = argparse.Namespace(**vars(args))
            draw.seed, draw.out_dir = seed, os.path.join(args.out_dir, f"seed{seed}")
            results.append(run_draw(draw))
        return write_draws(results, args.out_dir)
    except UserError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def run_draw(args) -> dict:
    """Train both runs once (one seed) and write convergence.txt/.json/.png to args.out_dir."""
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    os.makedirs(args.out_dir, exist_ok=True)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    device = accelerator.device
    budget_s = 60 * args.minutes

    train_source, heldout_source = data.demo_sources(os.path.join(args.out_dir, "demo_data"), args.resolution)
    images = load_images(heldout_source, args.resolution, args.num_heldout).to(device)
    torch.manual_seed(args.seed + 2)
    lpips = build_lpips(pretrained=False).to(device)  # one random-weight net: both runs measured alike
    runs = build_runs(args, accelerator, train_source)
    if not same_weights(runs["ours"].vae, runs["reference"].vae):
        raise RuntimeError("the two runs do not start from the same autoencoder weights")

    n_params = sum(p.numel() for p in runs["ours"].vae.parameters()) / 1e6
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    header = (
        f"convergence: preset {args.preset} ({n_params:.1f} M), {args.resolution}² native crops of the demo "
        f"photographs, batch {args.batch_size}, lr {args.lr:g}, {gan_text(args)}, seed {args.seed}, "
        f"{args.minutes:g} min of training per run\n"
        f"{name} | torch {torch.__version__} | {args.mixed_precision} | random LPIPS, ID off | "
        f"{'EMA ' + format(args.ema_decay, 'g') if args.ema_decay > 0 else 'raw'} weights evaluated | reference "
        f"schedule {args.reference_schedule} | interleaved {args.slice_s:g} s slices | held-out: "
        f"{len(images)} crops of photographs never trained on, every {args.eval_every_s:g} s"
    )
    print(header, flush=True)
    wall = time.perf_counter()
    train_interleaved(runs, budget_s, images, lpips, args, accelerator)
    text, result = summarize(runs, budget_s, args, header)
    result["wall_s"] = time.perf_counter() - wall
    paths = {ext: os.path.join(args.out_dir, f"convergence.{ext}") for ext in ("txt", "json", "png")}
    text += f"\nwall time {result['wall_s']:.0f} s; wrote {', '.join(paths.values())}"
    print(text, flush=True)
    with open(paths["txt"], "w") as f:
        f.write(text + "\n")
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=2)
    plot(result, paths["png"])
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
