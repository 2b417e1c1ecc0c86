"""Training curves from the trainer's JSON-lines log: held-out metrics, loss terms, λ, the discriminator, latents.

Each line of the log is one JSON object {"step": int, "<key>": float, ...}. The keys plotted are
the trainer's (see PANELS); a key the log lacks, or one that is 0 at every step (a term switched
off, e.g. --lpips_weight 0), leaves its curve out, a panel with no curve is dropped, and a log with
nothing to plot gives no figure. A dashed vertical line marks the step the GAN term starts in every
panel.
"""

from __future__ import annotations

import json
import math
import os

# (title, [(key, legend label)], log y-axis when every value is positive)
PANELS: list[tuple[str, list[tuple[str, str]], bool]] = [
    ("held-out PSNR (dB)", [("validation/psnr", "PSNR")], False),
    ("held-out SSIM", [("validation/ssim", "SSIM")], False),
    ("held-out LPIPS", [("validation/lpips", "LPIPS")], False),
    ("total loss", [("loss/total", "total"), ("loss/nll", "nll")], True),
    ("L1", [("loss/l1", "L1")], True),
    ("LPIPS loss", [("loss/lpips", "LPIPS")], True),
    ("KL", [("loss/kl", "KL")], True),
    ("ID (MoCo)", [("loss/id", "ID")], True),
    ("GAN (generator)", [("loss/gan", "G loss")], True),
    ("adaptive weight λ and GAN factor", [("loss/adaptive_weight", "λ"), ("loss/gan_factor", "gan_factor")], False),
    ("discriminator mean logits", [("disc/logits_real", "real"), ("disc/logits_fake", "fake")], False),
    ("discriminator hinge loss", [("disc/loss", "D loss")], False),
    ("learning rate", [("lr/generator", "generator")], True),
    (
        "latent KL (nats/element), dead and inactive channels",
        [
            ("latent/kl_mean", "mean KL"),
            ("latent/kl_min", "min KL"),
            ("latent/dead_channels", "dead channels"),
            ("latent/inactive_channels", "inactive channels"),
        ],
        True,
    ),
    (
        "latent DCT share > ½ Nyquist, equivariance PSNR",
        [
            ("latent/hf_share", "hf share latent"),
            ("latent/hf_share_image", "hf share image"),
            ("latent/equivariance_psnr_scale", "PSNR ×0.5 (dB)"),
            ("latent/equivariance_psnr_rot90", "PSNR rot90 (dB)"),
        ],
        False,
    ),
]
# λ spans orders of magnitude while gan_factor ramps in [0, 1]: the latter gets its own right-hand axis; so do
# the dead-channel count (next to KL in nats) and the equivariance PSNRs in dB (next to shares in [0, 1]).
SECONDARY_AXIS_KEYS = {
    "loss/gan_factor",
    "latent/dead_channels",
    "latent/inactive_channels",
    "latent/equivariance_psnr_scale",
    "latent/equivariance_psnr_rot90",
}
GAN_START_GID = "gan_start"  # the gid of the dashed GAN-start lines (tests look for it)
COLUMNS = 3


def read_log(log_path: str) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} sorted by step, finite values only; the last value wins for a repeated step.

    Lines that are not JSON objects with an integer "step" (a line cut by a crash, a blank line)
    are skipped. A missing file reads as empty.
    """
    series: dict[str, dict[int, float]] = {}
    if not os.path.isfile(log_path):
        return {}
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                continue
            step = record["step"]
            for key, value in record.items():
                if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if math.isfinite(value):
                    series.setdefault(key, {})[step] = float(value)  # a resumed run re-logs steps: keep the latest
    return {key: sorted(points.items()) for key, points in series.items()}


def infer_gan_start(series: dict[str, list[tuple[int, float]]]) -> int | None:
    """The first step with a positive GAN factor (the GAN term's weight), when the log has that key."""
    return next((step for step, value in series.get("loss/gan_factor", []) if value > 0), None)


def build_figure(series: dict[str, list[tuple[int, float]]], gan_start: int | None = None):
    """A matplotlib Figure of the panels that have data (None when none has), GAN start marked in each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    shown = {k for k, points in series.items() if any(v != 0 for _, v in points)}  # all-zero: a term that is off
    panels = [(title, [(k, lab) for k, lab in curves if k in shown], log) for title, curves, log in PANELS]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    rows = -(-len(panels) // COLUMNS)
    cols = min(COLUMNS, len(panels))
    fig = Figure(figsize=(5.0 * cols, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, whatever matplotlib's default is on this machine
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    steps = [step for _, curves, _ in panels for key, _ in curves for step, _ in series[key]]
    steps += [gan_start] if gan_start is not None else []
    for ax, (title, curves, log) in zip(axes, panels, strict=False):
        _draw_panel(ax, title, curves, log, series, gan_start)
        if max(steps) > min(steps):
            ax.set_xlim(min(steps), max(steps))  # one step axis for every panel, so they line up
    return fig


def _draw_panel(ax, title: str, curves, log: bool, series, gan_start: int | None) -> None:
    primary = [(k, lab) for k, lab in curves if k not in SECONDARY_AXIS_KEYS]
    secondary = [(k, lab) for k, lab in curves if k in SECONDARY_AXIS_KEYS]
    handles = []
    if primary:
        handles += _plot(ax, primary, series)
        if log and all(v > 0 for k, _ in primary for _, v in series[k]):
            ax.set_yscale("log")
    if secondary:
        twin = ax.twinx() if primary else ax
        handles += _plot(twin, secondary, series, style="--" if primary else "-", colour_offset=len(primary))
    if gan_start is not None:
        ax.axvline(gan_start, color="grey", linestyle="--", linewidth=1, gid=GAN_START_GID, label="GAN start")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    if len(handles) > 1:
        ax.legend(handles=handles, fontsize=8, loc="best")


def _plot(ax, curves, series, style: str = "-", colour_offset: int = 0) -> list:
    handles = []
    for i, (key, label) in enumerate(curves):
        steps, values = zip(*series[key], strict=False)
        marker = "o" if len(steps) < 20 else None  # sparse validation points stay visible
        (line,) = ax.plot(steps, values, style, marker=marker, markersize=3, label=label, color=f"C{i + colour_offset}")
        handles.append(line)
    return handles


def plot_training_curves(log_path: str, png_path: str, gan_start: int | None = None) -> str | None:
    """Plot the training log at `log_path` into a PNG; returns `png_path`, or None when there is nothing to plot.

    gan_start: the step the GAN term switches on (the trainer's --disc_start); None takes the first
    step with a positive "loss/gan_factor" when the log has one. A missing or empty log, or one
    without any plotted key, writes nothing and returns None.
    """
    series = read_log(log_path)
    if gan_start is None:
        gan_start = infer_gan_start(series)
    fig = build_figure(series, gan_start)
    if fig is None:
        return None
    os.makedirs(os.path.dirname(png_path) or ".", exist_ok=True)
    fig.savefig(png_path, dpi=100)
    return png_path
