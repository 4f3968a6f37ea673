"""The noise experiment's pictures (matplotlib, optional): noise.png, accuracy and loss against the
mixture, one line per method; differences.png, each method's accuracy difference to sft with its
95 % t-interval; resure_dynamics.png, ReSURE's per turn group statistics over training.
"""
import math
from pathlib import Path

import numpy as np

from bench_report import interval_figure, pyplot
from noise_data import MIXTURES


def plot(out, saved, summary, families):
    """Every figure from results.json's contents and the report's summary and comparison families;
    returns the paths written (none without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return []
    paths = [score_figure(plt, out, saved, summary)]
    if families.get("accuracy vs sft"):
        title = "clean-test accuracy minus sft's, paired by seed"
        paths.append(interval_figure(plt, Path(out) / "differences.png",
                                     families["accuracy vs sft"], title, scale=100,
                                     xlabel="accuracy points"))
    dynamics = dynamics_figure(plt, out, saved)
    if dynamics is not None:
        paths.append(dynamics)
    return paths


def score_figure(plt, out, saved, summary):
    """noise.png: clean-test accuracy and loss per mixture, mean and sample std over seeds."""
    mixes = [m for m in MIXTURES if m in saved["plan"]["mixtures"]]
    methods = [v for v in saved["plan"]["methods"] if v in summary]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(mixes))
    for i, v in enumerate(methods):
        shift = (i - len(methods) / 2) * 0.025  # methods side by side, their bars apart
        for ax, key, scale in ((axes[0], "accuracy", 100), (axes[1], "loss", 1)):
            points = [summary[v]["mixtures"][m][key] for m in mixes]
            means = [mean * scale for mean, _ in points]
            errors = [sd * scale if math.isfinite(sd) else 0 for _, sd in points]
            ax.errorbar(x + shift, means, yerr=errors, marker="o", capsize=3, label=v)
    titles = ("clean-test exact match (%)", "clean-test loss per token")
    for ax, title in zip(axes, titles):
        ax.set_xticks(x, mixes)
        ax.set_xlabel("training mixture (more data, lower quality ->)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(out) / "noise.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def moving_mean(values, k):
    """The mean of the last k finite values at each point (nan where none is); k 1: the values."""
    ys = np.array([math.nan if y is None else float(y) for y in values], float)
    if k == 1:
        return ys
    out = np.full(len(ys), np.nan)
    for i in range(len(ys)):
        window = ys[max(0, i - k + 1):i + 1]
        if np.isfinite(window).any():
            out[i] = np.nanmean(window)
    return out


def dynamics_figure(plt, out, saved):
    """resure_dynamics.png: per turn group mu, tau and batch loss, and the flagged share, over
    training (seed 1 of the last mixture); None when no run there recorded a trajectory."""
    last = [m for m in MIXTURES if m in saved["plan"]["mixtures"]][-1]
    seed = saved["plan"]["seeds"][0]
    runs = [r for r in saved["results"]
            if r["mixture"] == last and r["seed"] == seed and r.get("trajectory")]
    if not runs:
        return None
    k = max(1, max(len(r["trajectory"]) for r in runs) // 15)  # flag shares per step are noisy
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 2.8 * len(runs)), squeeze=False)
    for (stats_ax, flags_ax), r in zip(axes, runs):
        plot_run(stats_ax, flags_ax, r, k)
    fig.suptitle(f"ReSURE over training: mixture {last}, seed {seed}")
    fig.tight_layout()
    path = Path(out) / "resure_dynamics.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(stats_ax, flags_ax, r, k):
    """One run's row: mu (solid), tau (dashed), batch loss (dotted) per group; flagged shares."""
    trajectory = r["trajectory"]
    groups = sorted({b for t in trajectory for b in t["groups"]}, key=int)
    for j, b in enumerate(groups):
        points = [(t["step"], *t["groups"][b]) for t in trajectory if b in t["groups"]]
        steps = [p[0] for p in points]
        color = f"C{j}"
        stats_ax.plot(steps, moving_mean([p[1] for p in points], 1), color=color,
                      label=f"turn {b}: mu")
        stats_ax.plot(steps, moving_mean([p[2] for p in points], 1), color=color, ls="--",
                      label=f"turn {b}: tau")
        stats_ax.plot(steps, moving_mean([p[3] for p in points], 1), color=color, ls=":",
                      alpha=0.6)
        flags_ax.plot(steps, moving_mean([p[4] for p in points], k), color=color,
                      label=f"turn {b}")
    steps = [t["step"] for t in trajectory]
    flags_ax.plot(steps, moving_mean([t["flagged"] for t in trajectory], k), color="k", lw=2,
                  label="all")
    stats_ax.set_title(f"{r['variant']}: mu (solid), tau (dashed), batch loss (dotted)", fontsize=9)
    share = f" (mean of the last {k} steps)" if k > 1 else " per step"
    flags_ax.set_title(f"{r['variant']}: flagged share{share}", fontsize=9)
    stats_ax.set_yscale("log")
    stats_ax.legend(fontsize=6, ncol=2)
    flags_ax.legend(fontsize=6)
    for ax in (stats_ax, flags_ax):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
