"""What only a GPU shows about the training step, checked in one command; exit status 1 if any check fails.

    python benchmarks/gpu_selftest.py                        # CUDA: Transfusion preset, 256², bf16 and fp16
    python benchmarks/gpu_selftest.py --device cpu --tiny    # CPU: tiny preset, 32², every check end to end (toy)

Every step is the real trainer's: `train_vae.build_accelerator` (TF32, cuDNN autotuning, the --deterministic check)
and `train_vae.Trainer(cfg, accelerator).train_step`, one G and one D update, the GAN on from step 0 (λ measured),
L1 + LPIPS-VGG + ID (MoCo ResNet-50) + KL, random perception weights (the same cost as the real ones), on smooth
random images (bicubic-upsampled noise plus a little pixel noise). Checks, each printed PASS or FAIL with its figures:

  throughput     per precision (--precisions) and batch size (--batch_sizes, smallest first, a fresh trainer each):
                 img/s, MFU (--tflop_per_image over the device's dense bf16/fp16 peak, --peak_tflops), peak memory,
                 skipped steps. A batch that runs out of memory is reported as not fitting (larger ones are not tried)
                 with the largest that fits; fails on a non-finite loss or a skipped step, or if no batch size fits
  syncs          per precision: host syncs in one steady-state step at the smallest batch size, with the loop's stop
                 vote and log window (CUDA: torch.cuda.set_sync_debug_mode; CPU: Tensor methods that read a value),
                 each with its line of code; fails above --max_syncs (2: whether G's and whether D's update is finite)
  memory         bf16 (CPU: fp32) at --memory_batch, without and with --gradient_checkpointing: peak memory of a
                 steady step; fails if the first two steps' losses differ by more than --memory_rtol (`loss_diff`),
                 or (CUDA) if checkpointing does not lower the peak
  fp16_scale     G's and D's grad scalers' scales after --fp16_steps fp16 steps on new images each; fails if
                 either fell below its start / --max_fp16_backoff (each skipped step halves it)
  deterministic  --deterministic on with the recipe's loss and the equivariance term (×0.5 on every step): two
                 runs of --deterministic_steps steps equal bit for bit (weights of G and D, losses); torch raising
                 for an op without a deterministic kernel fails it. On CUDA in a child process: cuBLAS reads
                 CUBLAS_WORKSPACE_CONFIG when it starts (its output is kept; only its verdict is printed)
  compile        --torch_compile against eager, the same weights, images and posterior noise (inductor's
                 fallback_random): the losses of --compile_steps steps within --compile_rtol (`loss_diff`)

Each measurement builds its trainer inside a function that returns only figures, and the next build first collects
it (Trainer sits in reference cycles), so a peak is the measured trainer's own. A check that raises (out of memory,
a compiler error, anything) is a FAIL with the exception's first line; the checks after it still run, --json FILE
(every figure) is still written and the exit status is 1.

fp16 on the CPU (--tiny): accelerate has neither fp16 autocast nor a grad scaler there, so the accelerator gets
torch.autocast("cpu", float16) and G's CPU GradScaler before the Trainer is built, as accelerate makes its CUDA ones
(and as tests/test_fp16.py does); the Trainer makes D's own. --tiny turns the ID term off (MoCo runs at 224² whatever
the image size: minutes on a CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the trainer's packages, without PYTHONPATH
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random perception weights: nothing is downloaded

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate.state import AcceleratorState, GradientState, PartialState  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402

import train_vae  # noqa: E402
from bench_train_step import PEAK_TFLOPS, TFLOP_PER_IMAGE_256, PeakMemory, fmt_bytes, synchronize  # noqa: E402
from common.helpers import one_line  # noqa: E402
from training.config import TrainConfig  # noqa: E402

CHECKS = ("throughput", "syncs", "memory", "fp16_scale", "deterministic", "compile")
LOSS_KEYS = ("loss/total", "loss/l1", "loss/lpips", "loss/id", "loss/kl", "loss/gan", "disc/loss")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    data: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------
# The trainer, built as train_vae.main builds it
# ----------------------------------------------------------------------------------------


def reset_accelerate() -> None:
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()


def selftest_config(args, precision: str, **overrides) -> TrainConfig:
    """The recipe's loss (GAN from step 0) on the preset; fp16 on the CPU is completed by `build`."""
    kw = dict(
        model_config=args.preset,
        resolution=args.resolution,
        train_batch_size=args.memory_batch,
        mixed_precision=precision,
        disc_start=0,
        perception_weights="random",
        report_to="none",
        dataloader_num_workers=0,
        output_dir=args.out_dir,
        seed=args.seed,
    )
    if args.tiny:
        kw["id_weight"] = 0.0
    kw.update(overrides)
    cfg = TrainConfig(**kw)
    cfg.check()
    return cfg


def release() -> None:
    """Free what earlier measurements left: Trainer sits in reference cycles, so only the garbage collector frees a
    trainer its measuring function has returned from; and accelerate's singletons."""
    reset_accelerate()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build(args, precision: str, **overrides) -> train_vae.Trainer:
    """A Trainer in train mode on a fresh accelerator (train_vae.build_accelerator: backends, deterministic check),
    after the earlier ones are freed. Call it inside a function that returns figures only, never the trainer."""
    release()
    cfg = selftest_config(args, precision, **overrides)
    accelerator = train_vae.build_accelerator(cfg)
    if precision == "fp16" and accelerator.scaler is None:  # CPU: what accelerate does for fp16 on a GPU
        accelerator.native_amp = True  # its autocast: torch.autocast("cpu", float16)
        accelerator.scaler = torch.amp.GradScaler("cpu", **train_vae.scaler_kwargs(cfg).to_kwargs())
    set_seed(args.seed)
    trainer = train_vae.Trainer(cfg, accelerator)  # prepare() hands G's scaler to both optimizers; D's is its own
    trainer.model.train()
    trainer.loss_fn.train()
    return trainer


def images(args, n: int, seed: int) -> torch.Tensor:
    """(n, 3, R, R) in [-1, 1]: bicubic-upsampled 16×-coarser noise plus a little pixel noise."""
    g = torch.Generator().manual_seed(seed)
    r = args.resolution
    low = torch.rand(n, 3, max(r // 16, 2), max(r // 16, 2), generator=g) * 2 - 1
    x = F.interpolate(low, size=(r, r), mode="bicubic", align_corners=False)
    x = x + 0.05 * torch.randn(n, 3, r, r, generator=g)
    return x.clamp(-1, 1).to(args.device)


def floats(logs: dict) -> dict[str, float]:
    return {k: float(v) for k, v in logs.items()}


def loss_diff(a: dict, b: dict, pixels: int) -> float:
    """The largest |a − b| / max(|a|, |b|, floor) over LOSS_KEYS, floor = max(|a's|, |b's| loss/total) / pixels.

    G's total is a sum over the C·H·W pixels while its terms are logged as means, so the floor is the loss per pixel:
    a term near zero (loss/gan, D's mean logit on x̂, of either sign) is compared on the scale of the loss it is part
    of, not on its own; a term above the floor (and the total) is compared relatively. disc/loss gets the same floor.
    """
    floor = max(abs(a.get("loss/total", 0.0)), abs(b.get("loss/total", 0.0))) / pixels
    keys = [k for k in LOSS_KEYS if k in a and k in b]
    return max((abs(a[k] - b[k]) / max(abs(a[k]), abs(b[k]), floor, 1e-12) for k in keys), default=0.0)


def pixels(args) -> int:
    return 3 * args.resolution**2


# ----------------------------------------------------------------------------------------
# Checks: each trainer lives inside one function that returns figures
# ----------------------------------------------------------------------------------------


def peak_tflops(args) -> float | None:
    if args.peak_tflops or args.device != "cuda":
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def time_batch(args, precision: str, bs: int) -> dict:
    """A fresh trainer at batch size bs: warm-up (optimizer states, allocator, cuDNN's autotuner), then timed steps."""
    trainer = build(args, precision)
    x = images(args, bs, seed=bs)
    for step in range(args.warmup):
        trainer.train_step(x, step)
    skipped = trainer.state.skipped_g_steps + trainer.state.skipped_d_steps
    with PeakMemory(torch.device(args.device)) as mem:
        synchronize(torch.device(args.device))
        tic = time.perf_counter()
        for step in range(args.warmup, args.warmup + args.steps):
            logs = trainer.train_step(x, step)
        synchronize(torch.device(args.device))
        seconds = (time.perf_counter() - tic) / args.steps
    row = {
        "batch_size": bs,
        "fits": True,
        "images_per_s": bs / seconds,
        "s_per_step": seconds,
        "peak_bytes": mem.absolute,
        "skipped_steps": trainer.state.skipped_g_steps + trainer.state.skipped_d_steps - skipped,
        "finite": all(bool(torch.isfinite(v).all()) for v in logs.values()),
        "losses": floats(logs),
    }
    flop, peak = args.tflop_per_image, peak_tflops(args)
    row["mfu"] = row["images_per_s"] * flop / peak if flop and peak else None
    return row


def check_throughput(args, precision: str) -> Check:
    """Smallest batch first; the first that runs out of memory ends the sweep (a larger one would not fit either)."""
    rows, parts = [], []
    for bs in sorted(set(args.batch_sizes)):
        try:
            row = time_batch(args, precision, bs)
        except torch.OutOfMemoryError as e:
            rows.append({"batch_size": bs, "fits": False, "error": one_line(e)})
            larger = ", ".join(str(b) for b in sorted(set(args.batch_sizes)) if b > bs)
            parts.append(f"batch {bs}: does not fit (out of memory)" + (f"; {larger} not tried" if larger else ""))
            break
        rows.append(row)
        mfu = f"MFU {100 * row['mfu']:.1f} %" if row["mfu"] is not None else "MFU n/a"
        parts.append(
            f"batch {bs}: {row['images_per_s']:.2f} img/s, {mfu}, peak {fmt_bytes(row['peak_bytes'])}"
            + ("" if row["finite"] else ", NON-FINITE loss")
            + (f", {row['skipped_steps']} skipped steps" if row["skipped_steps"] else "")
        )
    fit = [r for r in rows if r["fits"]]
    largest = max((r["batch_size"] for r in fit), default=None)
    ok = bool(fit) and all(r["finite"] and not r["skipped_steps"] for r in fit)
    parts.append(f"largest batch that fits: {largest}" if fit else "no batch size fits")
    return Check(f"throughput {precision}", ok, "; ".join(parts), {"rows": rows, "largest_fitting_batch": largest})


@contextlib.contextmanager
def record_syncs(device: str):
    """Yields a list that fills with the code line of each host sync inside the block."""
    found: list[str] = []
    if device == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield found
            finally:
                torch.cuda.set_sync_debug_mode("default")
        found += [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
        return
    originals = {}
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        originals[name] = original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **kw):
            caller = traceback.extract_stack(limit=2)[0]
            found.append(f"{caller.filename}:{caller.lineno}")
            return _original(self, *a, **kw)

        setattr(torch.Tensor, name, counted)
    try:
        yield found
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def count_syncs(args, precision: str) -> list[str]:
    """The code line of each host sync in one steady-state step at the smallest batch size."""
    trainer = build(args, precision)
    x = images(args, min(args.batch_sizes), seed=0)
    for step in range(args.warmup):  # the first steps build optimizer states
        trainer.train_step(x, step)
    synchronize(torch.device(args.device))
    with record_syncs(args.device) as found:
        logs = trainer.train_step(x, args.warmup)
        train_vae.LogWindow().add(logs, len(x))  # what the loop does with them outside logging steps
        # (the ranks' stop vote is read inside train_step, in the sync that decides whether G's update is finite)
    return found


def check_syncs(args, precision: str) -> Check:
    found = count_syncs(args, precision)
    where = {}
    for line in found:
        short = os.path.relpath(line, REPO) if line.startswith(REPO) else line
        where[short] = where.get(short, 0) + 1
    listed = ", ".join(f"{k} ×{n}" for k, n in where.items()) or "none"
    detail = f"{len(found)} host syncs in a steady-state step (at most {args.max_syncs}): {listed}"
    return Check(f"syncs {precision}", len(found) <= args.max_syncs, detail, {"count": len(found), "where": where})


def memory_run(args, precision: str, checkpointing: bool, x: torch.Tensor) -> dict:
    """Two steps on a fresh trainer; the second's peak (the first builds the optimizer states)."""
    trainer = build(args, precision, gradient_checkpointing=checkpointing)
    torch.manual_seed(args.seed + 1)
    first = floats(trainer.train_step(x, 0))
    with PeakMemory(torch.device(args.device)) as mem:
        second = floats(trainer.train_step(x, 1))
    return {"losses": [first, second], "peak_bytes": mem.absolute}


def check_memory(args) -> Check:
    precision = "bf16" if args.device == "cuda" else "no"
    x = images(args, args.memory_batch, seed=1)
    plain, ckpt = (memory_run(args, precision, checkpointing, x) for checkpointing in (False, True))
    diff = max(loss_diff(a, b, pixels(args)) for a, b in zip(plain["losses"], ckpt["losses"], strict=True))
    lower = ckpt["peak_bytes"] < plain["peak_bytes"]
    ok = diff <= args.memory_rtol and (lower or args.device != "cuda")
    detail = (
        f"batch {args.memory_batch}, {precision.replace('no', 'fp32')}: peak {fmt_bytes(plain['peak_bytes'])} without, "
        f"{fmt_bytes(ckpt['peak_bytes'])} with --gradient_checkpointing; losses of 2 steps within {diff:.1e} "
        f"(at most {args.memory_rtol:g})" + ("" if args.device == "cuda" else "; CPU: RSS, lower peak not required")
    )
    return Check("memory", ok, detail, {"without": plain, "with": ckpt, "loss_diff": diff})


def fp16_scales(args) -> dict:
    trainer = build(args, "fp16")
    scalers = (trainer.accelerator.scaler, trainer.d_scaler)
    start = [float(scaler.get_scale()) for scaler in scalers]
    for i in range(args.fp16_steps):
        trainer.train_step(images(args, args.memory_batch, seed=1000 + i), i)
    scale, d_scale = (float(scaler.get_scale()) for scaler in scalers)
    st = trainer.state
    return {
        "scale": scale,
        "d_scale": d_scale,
        "start": start,
        "skipped_g_steps": st.skipped_g_steps,
        "skipped_d_steps": st.skipped_d_steps,
    }


def check_fp16_scale(args) -> Check:
    d = fp16_scales(args)
    (g0, d0), limit = d["start"], args.max_fp16_backoff
    ok = d["scale"] >= g0 / limit and d["d_scale"] >= d0 / limit
    detail = (
        f"G's scale {d['scale']:g} (from {g0:g}), D's {d['d_scale']:g} (from {d0:g}) after {args.fp16_steps} steps "
        f"(at least start / {limit:g}); skipped {d['skipped_g_steps']} G and {d['skipped_d_steps']} D steps"
    )
    return Check("fp16_scale", ok, detail, d)


def deterministic_run(args, mode: str, **overrides) -> tuple[list[dict], dict]:
    precision = "bf16" if args.device == "cuda" else "no"
    trainer = build(args, precision, deterministic=mode, **overrides)
    torch.manual_seed(args.seed + 1)
    logs = [
        floats(trainer.train_step(images(args, args.memory_batch, seed=i), i)) for i in range(args.deterministic_steps)
    ]
    modules = {"vae": trainer.vae, "discriminator": trainer.loss_fn.discriminator}
    state = {f"{n}.{k}": v.detach().cpu().clone() for n, m in modules.items() for k, v in m.state_dict().items()}
    return logs, state


def two_runs_equal(args, mode: str, **overrides) -> tuple[bool, str]:
    (logs_a, state_a), (logs_b, state_b) = (deterministic_run(args, mode, **overrides) for _ in range(2))
    differ = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    same = logs_a == logs_b and not differ
    return (
        same,
        "equal bit for bit"
        if same
        else f"differ ({len(differ)} tensors, losses {'equal' if logs_a == logs_b else 'not equal'})",
    )


@contextlib.contextmanager
def restored_backends():
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:]


def check_deterministic(args) -> Check:
    """--deterministic on with the recipe's loss and the equivariance term (a ×0.5 downscale on every step): their
    resizes run as matmuls (losses/separable.py); an op torch has no deterministic kernel for raises."""
    eq = dict(equivariance_weight=0.5, equivariance_prob=1.0, equivariance_scales=[0.5])
    with restored_backends():
        try:
            same, how = two_runs_equal(args, "on", **eq)
        except RuntimeError as e:  # torch.use_deterministic_algorithms: an op without a deterministic kernel
            return Check("deterministic", False, f"stopped: {one_line(e)}")
    terms = "the recipe's loss" + (" (ID off: --tiny)" if args.tiny else "") + " + equivariance"
    return Check("deterministic", same, f"{terms}, {args.deterministic_steps} steps: two runs {how}")


def deterministic_in_child(args, argv: list[str]) -> Check:
    """check_deterministic in a new process, whose cuBLAS starts with CUBLAS_WORKSPACE_CONFIG set. Its output is
    kept: only its verdict is printed, by this process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "deterministic.json")
        env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--checks", "deterministic", "--json", out]
        done = subprocess.run(cmd, env=env, check=False, capture_output=True, text=True)
        if not os.path.isfile(out):
            last = next((line.strip() for line in reversed(done.stderr.splitlines()) if line.strip()), "")
            return Check("deterministic", False, f"the child process exited with {done.returncode}: {last}")
        with open(out) as f:
            (check,) = json.load(f)["checks"]
            return Check(**check)


def compile_run(args, precision: str, compiled: bool, batches: list[torch.Tensor]) -> tuple[list[dict], float]:
    """The losses of len(batches) steps of a fresh trainer, and the seconds they took (with compilation)."""
    with compile_backend(args.compile_backend):
        trainer = build(args, precision, torch_compile=compiled)
        torch.manual_seed(args.seed + 1)
        tic = time.perf_counter()
        losses = [floats(trainer.train_step(x, i)) for i, x in enumerate(batches)]
        return losses, time.perf_counter() - tic


def check_compile(args) -> Check:
    precision = "bf16" if args.device == "cuda" else "no"
    batches = [images(args, args.memory_batch, seed=i) for i in range(args.compile_steps)]
    losses = {}
    for compiled in (False, True):
        losses[compiled], seconds = compile_run(args, precision, compiled, batches)
    diff = max(loss_diff(e, c, pixels(args)) for e, c in zip(losses[False], losses[True], strict=True))
    detail = (
        f"{args.compile_backend}, {precision.replace('no', 'fp32')}: losses of {args.compile_steps} steps within {diff:.1e} of eager "
        f"(at most {args.compile_rtol:g}); compiled steps took {seconds:.0f} s with compilation"
    )
    return Check("compile", diff <= args.compile_rtol, detail, {"eager": losses[False], "compiled": losses[True]})


@contextlib.contextmanager
def compile_backend(backend: str):
    """train_vae's torch.compile with this backend; inductor draws the posterior noise with eager's RNG."""
    original = train_vae.torch.compile
    train_vae.torch.compile = functools.partial(original, backend=backend)
    try:
        if backend == "inductor":
            import torch._inductor.config as inductor_config

            with inductor_config.patch(fallback_random=True):
                yield
        else:
            yield
    finally:
        train_vae.torch.compile = original


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="toy size: tiny preset, 32², few steps, ID term off")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma list of {', '.join(CHECKS)}")
    p.add_argument("--preset", default=None, help="autoencoder preset (default transfusion; tiny with --tiny)")
    p.add_argument("--resolution", type=int, default=None, help="default 256 (32 with --tiny)")
    p.add_argument("--precisions", default="bf16,fp16", help="throughput and syncs: comma list of bf16, fp16")
    p.add_argument("--batch_sizes", type=int_list, default=None, help="throughput: default 8,16,32 (1,2 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per batch size (default 3; 1 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per batch size (default 10; 2 with --tiny)")
    p.add_argument("--memory_batch", type=int, default=None, help="memory, fp16, deterministic, compile: batch size")
    p.add_argument("--max_syncs", type=int, default=2, help="host syncs allowed in a steady-state step")
    p.add_argument("--fp16_steps", type=int, default=None, help="default 50 (4 with --tiny)")
    p.add_argument(
        "--max_fp16_backoff", type=float, default=4.0, help="how far below its start a grad scaler's scale may fall"
    )
    p.add_argument("--memory_rtol", type=float, default=1e-3, help="losses with and without checkpointing")
    p.add_argument("--deterministic_steps", type=int, default=3)
    p.add_argument("--compile_steps", type=int, default=3)
    p.add_argument("--compile_rtol", type=float, default=2e-2, help="losses compiled against eager")
    p.add_argument("--compile_backend", default=None, help="default inductor on CUDA, aot_eager on CPU (no compiler)")
    p.add_argument("--tflop_per_image", type=float, default=None, help=f"default {TFLOP_PER_IMAGE_256} × (R/256)²")
    p.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (default: by device name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every check and figure here")
    args = p.parse_args(argv)
    toy = args.tiny
    defaults = dict(
        preset="tiny" if toy else "transfusion",
        resolution=32 if toy else 256,
        batch_sizes=[1, 2] if toy else [8, 16, 32],
        warmup=1 if toy else 3,
        steps=2 if toy else 10,
        memory_batch=2 if toy else 8,
        fp16_steps=4 if toy else 50,
        compile_backend="inductor" if args.device == "cuda" else "aot_eager",
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tflop_per_image is None and args.preset == "transfusion":
        args.tflop_per_image = TFLOP_PER_IMAGE_256 * (args.resolution / 256) ** 2
    args.checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    args.precisions = [c.strip() for c in args.precisions.split(",") if c.strip()]
    if not args.checks or set(args.checks) - set(CHECKS):
        p.error(f"--checks: choose from {', '.join(CHECKS)}")
    if not args.precisions or set(args.precisions) - {"bf16", "fp16"}:
        p.error("--precisions: choose from bf16, fp16")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu --tiny for the toy run)")
    if min(args.batch_sizes + [args.warmup, args.steps, args.memory_batch, args.fp16_steps]) < 1:
        p.error("batch sizes, --warmup, --steps, --memory_batch and --fp16_steps must be >= 1")
    return args


def header(args) -> str:
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    terms = "L1 + LPIPS + GAN (λ) + KL, ID off (--tiny)" if args.tiny else "L1 + LPIPS + GAN (λ) + ID + KL"
    return (
        f"gpu_selftest: torch {torch.__version__} | {device} | preset {args.preset} | {args.resolution}² | "
        f"{terms}, random perception weights | checks {', '.join(args.checks)}"
    )


def guarded(name: str, check) -> Check:
    """check(), or a FAIL named `name` with the first line of what it raised (out of memory, a compiler error,
    anything), so that the checks after it still run."""
    try:
        return check()
    except Exception as e:  # noqa: BLE001 - any failure is this check's verdict, not the run's end
        result = Check(name, False, f"raised {one_line(e)}")
    release()  # the exception is gone: what its frames held can be freed
    return result


def planned_checks(args, argv: list[str]) -> list[tuple[str, object]]:
    """(name, function) of each check to run, in order."""
    plan = []
    for precision in args.precisions:
        if "throughput" in args.checks:
            plan.append((f"throughput {precision}", functools.partial(check_throughput, args, precision)))
        if "syncs" in args.checks:
            plan.append((f"syncs {precision}", functools.partial(check_syncs, args, precision)))
    if "memory" in args.checks:
        plan.append(("memory", functools.partial(check_memory, args)))
    if "fp16_scale" in args.checks:
        plan.append(("fp16_scale", functools.partial(check_fp16_scale, args)))
    if "deterministic" in args.checks:
        here = args.device == "cpu" or args.checks == ["deterministic"]
        run = (
            functools.partial(check_deterministic, args)
            if here
            else functools.partial(deterministic_in_child, args, argv)
        )
        plan.append(("deterministic", run))
    if "compile" in args.checks:
        plan.append(("compile", functools.partial(check_compile, args)))
    return plan


def run_checks(args, argv: list[str]) -> list[Check]:
    results = []
    for name, check in planned_checks(args, argv):
        c = guarded(name, check)
        print(f"{'PASS' if c.ok else 'FAIL'}  {c.name:<26} {c.detail}", flush=True)
        results.append(c)
    release()
    return results


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)  # OpenMP threads spinning on shared cores made CPU steps several times slower
    print(header(args), flush=True)
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as out_dir:
        args.out_dir = out_dir
        results = run_checks(args, argv)
    failed = [c.name for c in results if not c.ok]
    print(
        f"gpu_selftest: {len(results)} checks, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''} "
        f"({time.perf_counter() - tic:.0f} s)",
        flush=True,
    )
    result = {"header": header(args), "checks": [asdict(c) for c in results], "failed": failed}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def cli(argv: list[str] | None = None) -> None:
    """Exit status 1 when a check failed."""
    raise SystemExit(1 if main(argv)["failed"] else 0)


if __name__ == "__main__":
    cli()
