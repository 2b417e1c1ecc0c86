"""Several draws of benchmarks/convergence.py (one seed each): every draw's time-to-quality ratios and each ratio's
median and range over the draws, "never reached" ranking above every number.

`convergence.py --seeds 0 1 2` trains the draws one after another and summarises them here;
`convergence.py --collect DIR...` summarises draws already run (e.g. as parallel processes, one per seed), after
checking that they are draws of one setting: every recorded flag equal but the seed and the output folder.
"""

from __future__ import annotations

import json
import math
import os

from common.errors import DataError

DRAW_RATIOS = {
    "ratio": ("time_to_psnr", "time-to-PSNR (EMA weights)"),
    "ratio_raw": ("time_to_psnr_raw", "time-to-PSNR (raw weights)"),
    "ratio_lpips": ("time_to_lpips", "time-to-LPIPS (EMA weights)"),
}


def median_and_range(values: list[float | None]) -> dict:
    """Median, min and max of ratios where None (never reached) ranks above every number: the median of
    [0.4, 0.5, never] is 0.5, of [0.4, never, never] never (None)."""
    ranked = sorted(math.inf if v is None else v for v in values)
    n = len(ranked)
    middle = ranked[n // 2] if n % 2 else (ranked[n // 2 - 1] + ranked[n // 2]) / 2

    def finite(v: float) -> float | None:
        return None if math.isinf(v) else v

    return {
        "median": finite(middle),
        "min": finite(ranked[0]),
        "max": finite(ranked[-1]),
        "never_reached": sum(v is None for v in values),
        "draws": n,
    }


def draw_row(result: dict) -> dict:
    """One draw's figures: its ratios, final held-out metrics of both runs and their batches per second."""
    runs = result["runs"]
    config = result["config"]
    gan = "off" if config.get("gan") == "off" else f"from batch {config['disc_start']}"
    row = {"seed": config["seed"], "gan": gan}
    for key, (section, _) in DRAW_RATIOS.items():
        row[key] = (result.get(section) or {}).get("ratio")
    for name, run in runs.items():  # ours, reference
        last = run["points"][-1]
        row[f"{name}_psnr"] = last["psnr"]
        row[f"{name}_lpips"] = last.get("lpips")
        row[f"{name}_batches_per_s"] = run["batches"] / run["train_s"]
    return row


# What may differ between draws summarised together: the seed and where each was written.
PER_DRAW = ("seed", "seeds", "out_dir", "collect")


def load_draws(folders: list[str]) -> list[dict]:
    """Each folder's convergence.json; a one-line DataError for a folder without one, draws whose recorded settings
    differ in more than the seed, or one seed twice."""
    results = []
    for folder in folders:
        path = os.path.join(folder, "convergence.json")
        try:
            with open(path) as f:
                results.append(json.load(f))
        except FileNotFoundError:
            raise DataError(
                f"--collect: {folder} holds no convergence.json (not a finished convergence.py draw)"
            ) from None
        except json.JSONDecodeError as e:
            raise DataError(f"--collect: {path} is not valid JSON ({e})") from None
    first = results[0]["config"]
    seen = {}
    for folder, result in zip(folders, results, strict=True):
        config = result["config"]
        differ = sorted(k for k in (first.keys() | config.keys()) - set(PER_DRAW) if first.get(k) != config.get(k))
        if differ:
            shown = ", ".join(f"{k} {first.get(k)!r} vs {config.get(k)!r}" for k in differ)
            raise DataError(f"--collect: {folders[0]} and {folder} differ in more than the seed: {shown}")
        if config["seed"] in seen:
            raise DataError(f"--collect: seed {config['seed']} twice ({seen[config['seed']]} and {folder})")
        seen[config["seed"]] = folder
    return results


def fmt_ratio(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def write_draws(results: list[dict], out_dir: str) -> dict:
    """Print and write (convergence_seeds.txt / .json) every draw and each ratio's median and range."""
    rows = [draw_row(r) for r in results]
    summary = {key: median_and_range([row[key] for row in rows]) for key in DRAW_RATIOS}
    lines = [f"{len(rows)} draws; first: {results[0]['header'].splitlines()[0]}", ""]
    lines.append(
        f"  {'seed':>4}  {'GAN':<15}{'PSNR ratio':>10}{'raw':>7}{'LPIPS ratio':>12}   {'PSNR ours/ref':>15}"
        f"{'LPIPS ours/ref':>17}{'batches/s ours/ref':>20}"
    )
    for row in rows:
        lpips = "–" if row["ours_lpips"] is None else f"{row['ours_lpips']:.4f}/{row['reference_lpips']:.4f}"
        lines.append(
            f"  {row['seed']:>4}  {row['gan']:<15}{fmt_ratio(row['ratio']):>10}{fmt_ratio(row['ratio_raw']):>7}"
            f"{fmt_ratio(row['ratio_lpips']):>12}   {row['ours_psnr']:>7.2f}/{row['reference_psnr']:<7.2f}"
            f"{lpips:>17}{row['ours_batches_per_s']:>11.3f}/{row['reference_batches_per_s']:.3f}"
        )
    lines.append("")
    for key, (_, label) in DRAW_RATIOS.items():
        stats = summary[key]
        lines.append(
            f"{label}: median {fmt_ratio(stats['median'])}, range {fmt_ratio(stats['min'])}–"
            f"{fmt_ratio(stats['max'])} over {stats['draws']} draws ({stats['never_reached']} never reached)"
        )
    text = "\n".join(lines)
    print(text, flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "convergence_seeds.txt"), "w") as f:
        f.write(text + "\n")
    result = {"draws": rows, "summary": summary, "results": results}
    with open(os.path.join(out_dir, "convergence_seeds.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result
