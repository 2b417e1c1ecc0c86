"""The benchmarks still run against the trainer: the convergence benchmark end to end (smoke), its two
runs starting alike, its time-to-PSNR arithmetic, and bench_train_step's first-step agreement."""

from __future__ import annotations

import gc
import glob
import itertools
import json
import os
import subprocess
import sys
import warnings
import weakref

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from PIL import Image

import data
import train_vae
from losses import TransfusionLoss
from training.config import TrainConfig

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_train_step  # benchmarks/ is not a package: its scripts import their neighbours
import convergence
import convergence_draws
import demo_colour
import gpu_selftest

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIRST_STEP_KEYS = ("loss/total", "loss/nll", "loss/kl", "loss/gan", "loss/adaptive_weight")


def reset_accelerate():
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """Each test builds its own Accelerator: reset accelerate's process-wide singletons around it."""
    reset_accelerate()
    yield
    reset_accelerate()


def is_script(path: str) -> bool:
    """A benchmark script, not a module its neighbours import (convergence_draws.py)."""
    with open(path) as f:
        return 'if __name__ == "__main__":' in f.read()


# Run in a fresh interpreter: each benchmark script as `python benchmarks/X.py --help` runs it (its own folder first
# on sys.path, never the repository root), our packages dropped from sys.modules before each, so only the script's
# own path setup can find them; third-party imports stay loaded, so the whole check costs about one start-up.
HELP_CHILD = """
import contextlib, io, json, os, runpy, sys
repo, scripts = sys.argv[1], sys.argv[2:]
base = [p for p in sys.path if p not in ("", repo, os.getcwd())]
results = {}
for script in scripts:
    for name, module in list(sys.modules.items()):
        file = os.path.abspath(getattr(module, "__file__", None) or "/")
        if file.startswith(repo + os.sep) and "site-packages" not in file:
            del sys.modules[name]
    path = os.path.join(repo, "benchmarks", script)
    sys.path[:] = [os.path.dirname(path)] + base
    sys.argv = [path, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code or 0
    except Exception as e:
        code = f"{type(e).__name__}: {e}"
    results[script] = [code, out.getvalue()[:6]]
print(json.dumps(results))
"""


@pytest.mark.e2e
def test_every_benchmark_runs_from_the_repo_root_without_pythonpath():
    """`python benchmarks/X.py --help` from the repository root, as benchmarks/README.md runs them: each script
    finds the trainer's packages itself (a fresh interpreter without PYTHONPATH, so nothing this process imported
    helps)."""
    scripts = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "benchmarks", "*.py")) if is_script(p))
    assert len(scripts) >= 8, scripts
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", HELP_CHILD, REPO, *scripts],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = {s: r for s, r in results.items() if r != [0, "usage:"]}
    assert not failed, failed


def test_time_to_reach_interpolates_between_evaluations():
    points = [{"train_s": 0.0, "psnr": 10.0}, {"train_s": 10.0, "psnr": 12.0}, {"train_s": 20.0, "psnr": 14.0}]
    assert convergence.time_to_reach(points, 13.0) == pytest.approx(15.0)
    assert convergence.time_to_reach(points, 12.0) == pytest.approx(10.0)
    assert convergence.time_to_reach(points, 9.0) == 0.0
    assert convergence.time_to_reach(points, 14.5) is None
    # The first crossing counts, not a later one after a dip.
    dip = [*points[:2], {"train_s": 20.0, "psnr": 11.0}, {"train_s": 30.0, "psnr": 13.0}]
    assert convergence.time_to_reach(dip, 11.5) == pytest.approx(7.5)


def test_time_to_reach_lower_is_better_for_lpips():
    points = [{"train_s": 0.0, "lpips": 0.3}, {"train_s": 10.0, "lpips": 0.2}, {"train_s": 20.0, "lpips": 0.25}]
    assert convergence.time_to_reach(points, 0.25, "lpips", lower_is_better=True) == pytest.approx(5.0)
    assert convergence.time_to_reach(points, 0.3, "lpips", lower_is_better=True) == 0.0
    assert convergence.time_to_reach(points, 0.1, "lpips", lower_is_better=True) is None
    assert convergence.time_to_reach(points, 0.25, "lpips") == 0.0  # higher-is-better reads it the other way


def test_median_and_range_rank_never_reached_last():
    stats = convergence_draws.median_and_range([0.5, None, 0.4])
    assert stats == {"median": 0.5, "min": 0.4, "max": None, "never_reached": 1, "draws": 3}
    assert convergence_draws.median_and_range([0.4, None, None])["median"] is None
    assert convergence_draws.median_and_range([0.2, 0.6, 0.4, 0.3])["median"] == pytest.approx(0.35)


@pytest.mark.e2e
def test_convergence_seeds_gan_off_keeps_every_draw_and_summarises(tmp_path, capsys):
    """--gan off: neither run touches D; --seeds: one folder per draw, and the summary's median is the draws'."""
    out = tmp_path / "out"
    result = convergence.main(
        ["--smoke", "--minutes", "0.02", "--gan", "off", "--seeds", "3", "4", "--out_dir", str(out)]
    )
    assert [row["seed"] for row in result["draws"]] == [3, 4]
    for seed, draw in zip((3, 4), result["results"], strict=True):
        assert (out / f"seed{seed}" / "convergence.json").exists() and draw["config"]["seed"] == seed
        for run in draw["runs"].values():
            assert run["d_updates"] == 0 and run["ae_updates"] == run["batches"] > 0
    ratios = [row["ratio"] for row in result["draws"]]
    assert result["summary"]["ratio"] == convergence_draws.median_and_range(ratios)
    with open(out / "convergence_seeds.json") as f:
        assert json.load(f)["draws"] == result["draws"]
    assert "time-to-PSNR (EMA weights): median" in capsys.readouterr().out
    # --collect rebuilds the same summary from the folders, training nothing.
    again = convergence.main(["--collect", str(out / "seed3"), str(out / "seed4"), "--out_dir", str(tmp_path / "c")])
    assert again["draws"] == result["draws"] and again["summary"] == result["summary"]


@pytest.mark.e2e
def test_both_loops_start_from_the_same_weights_batch_and_losses(tmp_path):
    args = convergence.parse_args(["--smoke", "--out_dir", str(tmp_path)])
    accelerator = Accelerator(cpu=True)
    train, _ = data.demo_sources(str(tmp_path / "demo_data"), args.resolution)
    runs = convergence.build_runs(args, accelerator, train)
    ours, ref = runs["ours"], runs["reference"]
    assert convergence.same_weights(ours.vae, ref.vae)
    logs = {}
    for run in (ours, ref):
        x = next(run.batches)
        assert x.shape == (args.batch_size, 3, args.resolution, args.resolution)
        convergence.load_rng(run, accelerator.device)  # each run's own noise stream, as in the benchmark
        logs[run.name] = x, run.step(x, 0)
    (x_ours, logs_ours), (x_ref, logs_ref) = logs["ours"], logs["reference"]
    assert torch.equal(x_ours, x_ref)
    assert "disc/loss" in logs_ours and not any(k.startswith("disc/") for k in logs_ref)  # batch 0: the AE's
    assert logs_ours["loss/adaptive_weight"] > 0  # the GAN is on from batch 0: λ is compared too
    for key in FIRST_STEP_KEYS:
        torch.testing.assert_close(logs_ours[key], logs_ref[key], rtol=1e-5, atol=0, msg=lambda m, k=key: f"{k}: {m}")
    # The second batch is the same for both as well; the reference loop spends it on D.
    x_ours, x_ref = next(ours.batches), next(ref.batches)
    assert torch.equal(x_ours, x_ref) and not torch.equal(x_ours, logs["ours"][0])
    assert set(ref.step(x_ref, 1)) == {f"disc/{k}" for k in ("loss", "logits_real", "logits_fake", "lecam")}


@pytest.mark.e2e
def test_convergence_smoke_writes_table_json_and_curves(tmp_path, capsys):
    out = tmp_path / "out"
    result = convergence.main(["--smoke", "--minutes", "0.05", "--out_dir", str(out)])
    printed = capsys.readouterr().out
    for line in ("budget", "time-to-PSNR", "first batch identical: yes"):
        assert line in printed
    with open(out / "convergence.json") as f:
        saved = json.load(f)
    assert saved["time_to_psnr"] == result["time_to_psnr"]
    budget = saved["budget_s"]
    assert budget == pytest.approx(3.0)
    for name in ("ours", "reference"):
        run = saved["runs"][name]
        points = run["points"]
        assert len(points) >= 3 and points[0]["train_s"] == 0 and points[-1]["train_s"] >= budget
        assert all(a["train_s"] < b["train_s"] for a, b in itertools.pairwise(points))
        assert all(
            set(p) >= {"psnr", "psnr_raw", "ssim", "lpips", "batches", "ae_updates", "d_updates"} for p in points
        )
        assert run["batches"] == points[-1]["batches"] > 0 and run["ae_updates"] > 0
        # The curve is the EMA's (--ema_decay 0.99 by default): equal to the raw weights before any update,
        # lagging behind them after.
        assert points[0]["psnr"] == points[0]["psnr_raw"]
        assert any(p["psnr"] != p["psnr_raw"] for p in points[1:])
    ours, ref = saved["runs"]["ours"], saved["runs"]["reference"]
    assert ours["points"][0] == ref["points"][0]  # the same initial weights, measured alike
    assert ours["ae_updates"] == ours["d_updates"] == ours["batches"]  # ours: AE and D on every batch
    assert ref["ae_updates"] + ref["d_updates"] == ref["batches"]  # the reference: one or the other
    assert saved["first_step"]["same_first_batch"] and saved["first_step"]["max_rel_diff_first_step_losses"] <= 1e-5
    assert [(row["fraction"], row["run"]) for row in saved["table"]] == [
        (f, n) for f in (0.25, 0.5, 1.0) for n in ("ours", "reference")
    ]
    ttp = saved["time_to_psnr"]
    assert ttp["target_psnr"] == ref["points"][-1]["psnr"]
    assert ttp["ratio"] is None or ttp["ratio"] == pytest.approx(ttp["ours_s"] / ttp["reference_total_s"])
    raw = saved["time_to_psnr_raw"]
    assert raw["target_psnr"] == ref["points"][-1]["psnr_raw"]
    assert raw["ratio"] is None or raw["ratio"] == pytest.approx(raw["ours_s"] / ttp["reference_total_s"])
    assert (out / "convergence.txt").read_text().startswith("convergence: preset tiny")
    with Image.open(out / "convergence.png") as png:
        assert png.size[0] > 500 and png.size[1] > 200


@pytest.mark.e2e
def test_bench_train_step_variants_agree_on_the_first_step():
    """The trainer's step and the reference loop: same weights, batch and noise give the same first-step losses."""
    variants = ["ours", "reference", "reference_alternating", "ours_foreach_adam"]  # + the optimizer swap
    argv = ["--preset", "tiny", "--resolution", "32", "--batch_size", "2", "--device", "cpu"]
    argv += ["--steps", "1", "--rounds", "1", "--variants", ",".join(variants)]
    result = bench_train_step.main(argv)
    losses = result["first_step_losses"]
    assert list(losses) == variants
    for name in variants[1:]:
        for key in (*FIRST_STEP_KEYS, "disc/loss"):
            if key in losses[name]:  # reference_alternating's D loss is on another reconstruction
                assert losses[name][key] == pytest.approx(losses["ours"][key], rel=1e-5), (name, key)
    assert "disc/loss" not in losses["reference_alternating"]
    assert [row["variant"] for row in result["runs"][0]["rows"]] == variants


@pytest.mark.e2e
def test_gpu_selftest_runs_every_check_on_cpu_and_a_failed_check_exits_non_zero(tmp_path, capsys):
    """The GPU self-test at toy size: every check runs through the real trainer and reports its figures; the sync
    limit set one below the step's two decisions (is G's, is D's update finite) fails, and the exit status is 1.
    fp16 runs under CPU autocast with a CPU grad scaler for G and the Trainer's own for D."""
    out = tmp_path / "selftest.json"
    argv = ["--device", "cpu", "--tiny", "--batch_sizes", "2", "--steps", "1", "--fp16_steps", "2"]
    argv += ["--deterministic_steps", "2", "--compile_steps", "2", "--max_syncs", "1", "--json", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        gpu_selftest.cli(argv)
    assert exit_info.value.code == 1
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    checks = {c["name"]: c for c in result["checks"]}
    expected = ["throughput bf16", "syncs bf16", "throughput fp16", "syncs fp16", "memory", "fp16_scale"]
    assert list(checks) == [*expected, "deterministic", "compile"]
    assert result["failed"] == [n for n, c in checks.items() if not c["ok"]]
    syncs = checks["syncs bf16"]
    assert not syncs["ok"] and syncs["data"]["count"] == 2 and "FAIL  syncs bf16" in printed
    for precision in ("bf16", "fp16"):
        syncs = checks[f"syncs {precision}"]
        assert syncs["ok"] == (syncs["data"]["count"] <= 1)
        # G's decision is read with the ranks' stop vote in training/cluster.py, D's in train_vae.py
        assert all(where.startswith(("train_vae.py:", "training/cluster.py:")) for where in syncs["data"]["where"])
        (row,) = checks[f"throughput {precision}"]["data"]["rows"]
        assert row["batch_size"] == 2 and row["images_per_s"] > 0 and row["peak_bytes"] > 0
        assert checks[f"throughput {precision}"]["ok"], checks[f"throughput {precision}"]["detail"]
    for name in ("memory", "deterministic", "compile"):
        assert checks[name]["ok"], checks[name]["detail"]
    assert checks["memory"]["data"]["loss_diff"] == 0  # checkpointing recomputes the same forward on the CPU
    fp16 = checks["fp16_scale"]
    g_start = train_vae.scaler_kwargs(TrainConfig(resolution=32)).init_scale  # 2^16 / 3·32², rounded: 2^4
    assert fp16["ok"] and fp16["data"]["start"] == [g_start, TransfusionLoss.D_FP16_INIT_SCALE], fp16["detail"]
    assert printed.strip().splitlines()[-1].startswith("gpu_selftest: 8 checks, ")


def selftest_args(*extra: str):
    args = gpu_selftest.parse_args(["--device", "cpu", "--tiny", *extra])
    args.out_dir = None  # set by the caller when a trainer is built
    return args


def test_gpu_selftest_frees_each_trainer_before_the_next_peak_is_measured(tmp_path, monkeypatch):
    """Trainer sits in reference cycles: a trainer still referenced, or only unreachable, while the next one is
    measured would add to its peak. Automatic collection is off here, so only the self-test's own collection counts."""
    args = selftest_args("--batch_sizes", "1,2", "--steps", "1", "--warmup", "1", "--memory_batch", "1")
    args.out_dir = str(tmp_path)
    trainers, alive_at_peaks = [], []
    build = gpu_selftest.build

    def tracked_build(*a, **k):
        trainer = build(*a, **k)
        trainers.append(weakref.ref(trainer))
        return trainer

    class TrackedPeak(gpu_selftest.PeakMemory):
        def __enter__(self):
            alive_at_peaks.append([i for i, ref in enumerate(trainers) if ref() is not None])
            return super().__enter__()

    monkeypatch.setattr(gpu_selftest, "build", tracked_build)
    monkeypatch.setattr(gpu_selftest, "PeakMemory", TrackedPeak)
    gc.collect()
    gc.disable()
    try:
        gpu_selftest.check_throughput(args, "bf16")
        gpu_selftest.check_memory(args)
    finally:
        gc.enable()
    assert len(trainers) == 4
    assert alive_at_peaks == [[0], [1], [2], [3]]  # at each peak, the trainer being measured and no other


def test_gpu_selftest_a_check_that_raises_fails_alone(tmp_path, monkeypatch, capsys):
    """An exception inside a check (a compiler error, an out-of-memory) is that check's FAIL with one line; the
    checks after it run, --json is written, the summary printed, the exit status 1."""

    def compiler_error(args):
        raise RuntimeError("backend='inductor' raised:\nCompilationError: at 12:4 ...")

    def out_of_memory(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\n(details)")

    monkeypatch.setattr(gpu_selftest, "check_memory", compiler_error)
    monkeypatch.setattr(gpu_selftest, "check_fp16_scale", lambda args: gpu_selftest.Check("fp16_scale", True, "ran"))
    monkeypatch.setattr(gpu_selftest, "check_compile", out_of_memory)
    out = tmp_path / "s.json"
    with pytest.raises(SystemExit) as exit_info:
        gpu_selftest.cli(["--device", "cpu", "--tiny", "--checks", "memory,fp16_scale,compile", "--json", str(out)])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1:] == [
        f"FAIL  {'memory':<26} raised RuntimeError: backend='inductor' raised:",
        f"PASS  {'fp16_scale':<26} ran",
        f"FAIL  {'compile':<26} raised OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        lines[-1],
    ]
    assert lines[-1].startswith("gpu_selftest: 3 checks, 2 failed: memory, compile (")
    result = json.loads(out.read_text())
    assert [(c["name"], c["ok"]) for c in result["checks"]] == [
        ("memory", False),
        ("fp16_scale", True),
        ("compile", False),
    ]


def test_gpu_selftest_loss_diff_compares_near_zero_terms_on_the_loss_per_pixel():
    pixels = 3 * 32 * 32
    a = {"loss/total": 2000.0, "loss/l1": 0.40, "loss/gan": 0.002, "disc/loss": 0.7, "loss/adaptive_weight": 300.0}
    # The GAN term crosses zero (relative difference 2 on its own) by 0.004, 0.6 % of the loss per pixel (0.65).
    b = {**a, "loss/gan": -0.002, "loss/adaptive_weight": 900.0}  # not a loss: not compared
    assert gpu_selftest.loss_diff(a, b, pixels) == pytest.approx(0.004 / (2000 / pixels))
    assert gpu_selftest.loss_diff(a, b, pixels) < 2e-2  # --compile_rtol
    assert gpu_selftest.loss_diff(a, {**a, "loss/total": 2200.0}, pixels) == pytest.approx(200 / 2200)
    assert gpu_selftest.loss_diff(a, {**a, "loss/l1": 0.44}, pixels) == pytest.approx(0.04 / (2000 / pixels))
    assert gpu_selftest.loss_diff(a, {**a, "disc/loss": 0.77}, pixels) > 2e-2  # a 10 % change in D's loss fails
    assert gpu_selftest.loss_diff(a, dict(a), pixels) == 0


def test_gpu_selftest_a_batch_that_runs_out_of_memory_does_not_fit(monkeypatch):
    """Smallest batch first; the first out-of-memory ends the sweep and the largest batch that fits is reported;
    FAIL only when none fits (or a fitting batch skipped a step)."""
    tried, rows = [], {"finite": True, "skipped_steps": 0}

    def time_batch(args, precision, bs):
        tried.append(bs)
        if bs > 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return {"batch_size": bs, "fits": True, "images_per_s": 10.0, "peak_bytes": 2**30, "mfu": 0.25, **rows}

    monkeypatch.setattr(gpu_selftest, "time_batch", time_batch)
    args = selftest_args("--batch_sizes", "4,1,8,2")
    check = gpu_selftest.check_throughput(args, "bf16")
    assert tried == [1, 2, 4] and check.ok and check.data["largest_fitting_batch"] == 2, check.detail
    assert "batch 4: does not fit (out of memory); 8 not tried; largest batch that fits: 2" in check.detail
    assert [r["fits"] for r in check.data["rows"]] == [True, True, False]
    rows["skipped_steps"] = 1
    assert not gpu_selftest.check_throughput(args, "bf16").ok
    rows["skipped_steps"] = 0
    args.batch_sizes = [4, 8]
    check = gpu_selftest.check_throughput(args, "bf16")
    assert not check.ok and check.data["largest_fitting_batch"] is None and "no batch size fits" in check.detail


def test_gpu_selftest_peak_tflops_by_device_name(monkeypatch):
    """Dense bf16 peaks: the most specific name first (an H100 NVL or PCIe is not an H100 SXM)."""
    args = selftest_args()
    args.device = "cuda"
    expected = {
        "NVIDIA H100 80GB HBM3": 989.0,
        "NVIDIA H100 PCIe": 756.0,
        "NVIDIA H100 NVL": 835.0,
        "NVIDIA H200": 989.0,
        "NVIDIA H200 NVL": 835.0,
        "NVIDIA A100-SXM4-80GB": 312.0,
        "NVIDIA GeForce RTX 4090": None,
    }
    for name, peak in expected.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, name=name: name)
        assert gpu_selftest.peak_tflops(args) == peak, name
    args.peak_tflops = 500.0
    assert gpu_selftest.peak_tflops(args) == 500.0
    assert gpu_selftest.PEAK_TFLOPS["H200"] == bench_train_step.H200_BF16_DENSE_TFLOPS  # one table


def test_gpu_selftest_record_syncs_on_cuda_counts_the_sync_warnings(monkeypatch):
    """CUDA's sync debug mode warns at each host sync: each such warning is one sync at its line, other warnings are
    not, and the mode is back to default after the block, also when the block raises."""
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    with gpu_selftest.record_syncs("cuda") as found:
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        line = sys._getframe().f_lineno - 1
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert found == [f"{__file__}:{line}"] and modes == ["warn", "default"]
    with pytest.raises(KeyboardInterrupt), gpu_selftest.record_syncs("cuda"):
        raise KeyboardInterrupt
    assert modes[-1] == "default"


def test_demo_colour_reports_the_chroma_ratio_of_a_saved_model(tmp_path, capsys):
    from autoencoder.models import build_vae
    from metrics import chroma, chroma_error, chroma_ratio, reconstruct, to_unit

    torch.manual_seed(0)
    build_vae("tiny").save_pretrained(tmp_path / "model")
    (tmp_path / "heldout").mkdir()
    gen = torch.Generator().manual_seed(0)
    for i, image in enumerate(torch.rand(3, 16, 16, 3, generator=gen)):
        image = image.mean(-1, keepdim=True).expand(-1, -1, 3) if i == 2 else image  # one grey image, left out
        Image.fromarray((image * 255).round().to(torch.uint8).numpy()).save(tmp_path / "heldout" / f"{i}.png")
    demo_colour.main([str(tmp_path / "model"), "--heldout", str(tmp_path / "heldout"), "--resolution", "16"])
    out = capsys.readouterr().out
    images = demo_colour.held_out(str(tmp_path / "heldout"), 16)
    vae = demo_colour.load_vae(str(tmp_path / "model")).eval()
    recon = to_unit(reconstruct(vae, images, batch_size=8))
    ratio, kept = chroma_ratio(to_unit(images), recon)
    error, _ = chroma_error(to_unit(images), recon)
    tint = chroma(recon[2:]).item()
    assert kept == 2 and (
        f"chroma ratio {ratio:.3f} over 2 colour images, colour error {error:.3f}, grey images' tint {tint:.3f}" in out
    ), out


# --collect on hand-made draw folders: a convergence.json with what the summary reads, no training.
DRAW_CONFIG = dict(preset="tiny", minutes=3.0, gan="off", disc_start=2**31 - 1, gan_ramp_steps=0, seeds=None)


def fake_draw(folder, seed: int, ratios=(0.5, 0.5, 0.5), **config) -> str:
    """A finished draw's convergence.json. `ratios`: ours' time to the reference's final PSNR over the reference's
    total on the EMA weights, the same on the raw weights, and to the reference's final LPIPS (None: never)."""
    points = {name: [{"train_s": 180.0, "psnr": 17.0, "lpips": 0.09}] for name in convergence.RUNS}
    result = {
        "header": f"convergence: seed {seed}",
        "config": DRAW_CONFIG | {"seed": seed, "out_dir": str(folder), "collect": None} | config,
        "time_to_psnr": {"ratio": ratios[0]},
        "time_to_psnr_raw": {"ratio": ratios[1]},
        "time_to_lpips": {"ratio": ratios[2]},
        "runs": {name: {"train_s": 180.0, "batches": 90, "points": p} for name, p in points.items()},
    }
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "convergence.json"), "w") as f:
        json.dump(result, f)
    return str(folder)


def collect_error(argv, capsys) -> str:
    """The one line --collect prints for a bad set of draws (exit 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        convergence.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_collect_summarises_draws_that_differ_only_in_seed_and_folder(tmp_path, capsys):
    folders = [fake_draw(tmp_path / f"s{seed}", seed, (ratio,) * 3) for seed, ratio in ((0, 0.4), (1, None), (2, 0.6))]
    result = convergence.main(["--collect", *folders, "--out_dir", str(tmp_path / "all")])
    assert [row["seed"] for row in result["draws"]] == [0, 1, 2]
    assert result["summary"]["ratio"] == {"median": 0.6, "min": 0.4, "max": None, "never_reached": 1, "draws": 3}
    assert (tmp_path / "all" / "convergence_seeds.json").exists()


def test_collect_a_folder_without_a_draw_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = collect_error(["--collect", fake_draw(tmp_path / "s0", 0), str(tmp_path / "empty")], capsys)
    assert "empty holds no convergence.json" in err


@pytest.mark.parametrize(
    ("key", "value"),
    [("gan", "on"), ("minutes", 10.0), ("disc_start", 50), ("gan_ramp_steps", 25), ("preset", "small")],
)
def test_collect_draws_with_other_settings_than_the_seed_is_a_one_line_error(tmp_path, capsys, key, value):
    folders = [fake_draw(tmp_path / "s0", 0), fake_draw(tmp_path / "s1", 1, **{key: value})]
    err = collect_error(["--collect", *folders, "--out_dir", str(tmp_path / "all")], capsys)
    assert f"differ in more than the seed: {key} {DRAW_CONFIG[key]!r} vs {value!r}" in err
    assert not (tmp_path / "all").exists()


def test_collect_one_seed_twice_is_a_one_line_error(tmp_path, capsys):
    folders = [fake_draw(tmp_path / "a", 1), fake_draw(tmp_path / "b", 2), fake_draw(tmp_path / "c", 1)]
    err = collect_error(["--collect", *folders], capsys)
    assert f"seed 1 twice ({tmp_path / 'a'} and {tmp_path / 'c'})" in err


def test_collect_with_seeds_is_a_one_line_error(tmp_path, capsys):
    err = collect_error(["--collect", fake_draw(tmp_path / "s0", 0), "--seeds", "0", "1"], capsys)
    assert "--seeds trains new draws, --collect summarises draws already run" in err


def lpips_run(name: str, points: list[tuple[float, float]]) -> convergence.Run:
    """A run that only carries evaluation points (training time in s, held-out LPIPS)."""
    return convergence.Run(name, None, None, None, points=[{"train_s": t, "lpips": v} for t, v in points])


def test_time_to_lpips_targets_the_reference_final_lpips_lower_is_better():
    """The target is the reference's final LPIPS (not its best, not ours'), reached at ours' first crossing at or
    below it (linear between evaluations), over the reference's total training time (not ours')."""
    ref = lpips_run("reference", [(0.0, 0.20), (50.0, 0.08), (100.0, 0.10)])  # its best (0.08) is not its final
    ours = lpips_run("ours", [(0.0, 0.20), (20.0, 0.15), (40.0, 0.09), (60.0, 0.12), (80.0, 0.05)])
    result = convergence.time_to_lpips(ours, ref)
    assert result["target_lpips"] == 0.10 and result["reference_total_s"] == 100.0
    assert result["ours_s"] == pytest.approx(20.0 + 20.0 * (0.10 - 0.15) / (0.09 - 0.15))  # 36.7 s, first crossing
    assert result["ratio"] == pytest.approx(result["ours_s"] / 100.0)
    # A crossing exactly at an evaluation point: that point's time.
    ours_at_point = lpips_run("ours", [(0.0, 0.20), (30.0, 0.10), (60.0, 0.05)])
    assert convergence.time_to_lpips(ours_at_point, ref)["ratio"] == pytest.approx(0.30)
    # Never at or below the target: no ratio; LPIPS not measured (--ema_decay 0 keeps only PSNR): no section.
    assert convergence.time_to_lpips(lpips_run("ours", [(0.0, 0.2), (60.0, 0.11)]), ref)["ratio"] is None
    no_lpips = convergence.Run("reference", None, None, None, points=[{"train_s": 100.0, "psnr": 15.0}])
    assert convergence.time_to_lpips(ours, no_lpips) is None


def test_collect_summarises_each_ratio_from_its_own_measure(tmp_path, capsys):
    """ratio (EMA PSNR), ratio_raw and ratio_lpips each get their median and range from their own section."""
    draws = [(0, 0.40, 0.90, None), (1, 0.50, None, 0.30), (2, None, 0.70, 0.20)]  # seed, EMA PSNR, raw PSNR, LPIPS
    folders = [fake_draw(tmp_path / f"s{seed}", seed, ratios) for seed, *ratios in draws]
    summary = convergence.main(["--collect", *folders, "--out_dir", str(tmp_path / "all")])["summary"]
    assert summary["ratio"] == {"median": 0.50, "min": 0.40, "max": None, "never_reached": 1, "draws": 3}
    assert summary["ratio_raw"] == {"median": 0.90, "min": 0.70, "max": None, "never_reached": 1, "draws": 3}
    assert summary["ratio_lpips"] == {"median": 0.30, "min": 0.20, "max": None, "never_reached": 1, "draws": 3}
    printed = capsys.readouterr().out
    assert "time-to-PSNR (raw weights): median 0.90, range 0.70–never over 3 draws (1 never reached)" in printed
    assert "time-to-LPIPS (EMA weights): median 0.30, range 0.20–never over 3 draws (1 never reached)" in printed
