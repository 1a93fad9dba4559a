"""The study's figures (matplotlib, PNG): every arm's validation loss against tokens, ideal training FLOPs and
running seconds; final loss against sparsity; the spectral gaps of the Sparse Wide masks."""

from __future__ import annotations

import statistics
from pathlib import Path

from .config import ArmKind
from .results import ArmResult, RunResult

COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#000000",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
)
LINE_STYLES = {
    ArmKind.DENSE: "-",
    ArmKind.DENSE_ISO_FLOP: "--",
    ArmKind.DENSE_ISO_FLOP_TOKENS: "-.",
    ArmKind.SPARSE_WIDE: "-",
    ArmKind.DENSE_ISO_TIME: ":",
}
# the dense controls on the final-loss plot: marker and legend
CONTROL_MARKERS = {
    ArmKind.DENSE_ISO_FLOP: ("s", "dense widened to SW's total FLOPs"),
    ArmKind.DENSE_ISO_FLOP_TOKENS: ("D", "dense on more tokens, SW's total FLOPs"),
    ArmKind.DENSE_ISO_TIME: ("^", "dense, SW's wall-clock"),
}
CURVE_AXES = (
    ("tokens", "training tokens"),
    ("flops_ideal", "ideal training FLOPs"),
    ("wall_seconds", "running seconds (measured)"),
)


def _style(arm: ArmResult, index: int) -> dict:
    return {
        "color": COLORS[index % len(COLORS)],
        "linestyle": LINE_STYLES[arm.kind],
        "linewidth": 2.2 if arm.kind is ArmKind.DENSE else 1.5,
    }


def _mean_curve(runs: list[RunResult], axis: str) -> list[tuple[float, float, float, float]]:
    """(mean x, mean loss, min loss, max loss) at the steps every seed evaluated."""
    steps = sorted(set.intersection(*[{p.step for p in run.val_curve} for run in runs]))
    points = []
    for step in steps:
        at_step = [next(p for p in run.val_curve if p.step == step) for run in runs]
        losses = [p.loss for p in at_step]
        x = statistics.fmean(getattr(p, axis) for p in at_step)
        points.append((x, statistics.fmean(losses), min(losses), max(losses)))
    return points


def plots(out: Path, arms: list[ArmResult]) -> list[str]:
    """Write the figures into `out`; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [arm for arm in arms if arm.finished]
    written = [_plot_curves(plt, out, finished), _plot_final_loss(plt, out, finished)]
    spectral = [arm for arm in finished if any(run.spectral for run in arm.runs)]
    if spectral:
        written.append(_plot_spectral(plt, out, spectral))
    return written


def _plot_curves(plt, out: Path, arms: list[ArmResult]) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    for index, arm in enumerate(arms):
        style = _style(arm, index)
        for ax, (axis, label) in zip(axes, CURVE_AXES):
            points = [p for p in _mean_curve(arm.runs, axis) if p[0] > 0]  # log axes
            if not points:
                continue
            x, y, low, high = map(list, zip(*points))
            ax.plot(x, y, label=f"{arm.name} (n={len(arm.runs)})", **style)
            ax.fill_between(x, low, high, alpha=0.12, color=style["color"])
            ax.set_xlabel(label)
            ax.set_xscale("log")
    axes[0].set_ylabel("validation loss (mean over seeds; band: min-max)")
    axes[0].legend(fontsize=7)  # one legend: every arm has the same colour and line style in all three panels
    fig.suptitle("Validation loss of every arm vs tokens, ideal training FLOPs and running seconds")
    return _save(plt, fig, out, "loss_vs_flops.png")


def _loss_point(arm: ArmResult) -> tuple[float, float, float]:
    return arm.sparsity, arm.final_val_loss.mean, arm.final_val_loss.std or 0.0


def _plot_final_loss(plt, out: Path, arms: list[ArmResult]) -> str:
    fig, ax = plt.subplots(figsize=(8, 5.5))
    dense = next((arm for arm in arms if arm.kind is ArmKind.DENSE), None)
    if dense:
        mean, std = dense.final_val_loss.mean, dense.final_val_loss.std
        ax.axhline(mean, color="k", linewidth=1.5, label="dense base")
        if std:
            ax.axhspan(mean - std, mean + std, color="k", alpha=0.08)
    sparse_wide = [arm for arm in arms if arm.kind is ArmKind.SPARSE_WIDE]
    # one series per method and layout: a block arm sits at the same sparsity as its masked twin
    for block, method in sorted({(arm.block, arm.method) for arm in sparse_wide}):
        points = sorted(_loss_point(arm) for arm in sparse_wide if (arm.block, arm.method) == (block, method))
        if dense:
            points = [(0.0, *_loss_point(dense)[1:])] + points
        x, y, error = zip(*points)
        layout = "" if block == 1 else f", {block}x{block} blocks"
        style = {"marker": "o"} if block == 1 else {"marker": "P", "linestyle": "--"}
        ax.errorbar(x, y, yerr=error, capsize=4, label=f"Sparse Wide + {method}{layout}", **style)
    for kind, (marker, label) in CONTROL_MARKERS.items():
        for block in sorted({arm.block for arm in arms if arm.kind is kind}):
            points = sorted(_loss_point(arm) for arm in arms if arm.kind is kind and arm.block == block)
            x, y, error = zip(*points)
            layout = "" if block == 1 else f" ({block}x{block} blocks)"
            color = "gray" if block == 1 else "darkgoldenrod"
            ax.errorbar(x, y, yerr=error, marker=marker, linestyle="none", capsize=4, color=color, label=label + layout)
    ax.set_xlabel("sparsity s (Sparse Wide widens by sqrt(1/(1-s)); 0 = dense base)")
    ax.set_ylabel("final validation loss (mean ± std over seeds)")
    ax.legend(fontsize=8)
    ax.set_title("Final validation loss vs sparsity")
    return _save(plt, fig, out, "final_loss_vs_sparsity.png")


def _plot_spectral(plt, out: Path, arms: list[ArmResult]) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for index, arm in enumerate(arms):
        for ax, key in zip(axes, ("ramanujan_gap", "weighted_spectral_gap")):
            series = [dict(run.spectral[key]) for run in arm.runs if run.spectral and run.spectral.get(key)]
            if not series:
                continue
            steps = sorted(set.intersection(*[set(s) for s in series]))
            means = [statistics.fmean(s[step] for s in series) for step in steps]
            ax.plot(steps, means, marker=".", label=arm.name, **_style(arm, index))
    axes[0].set_title("Ramanujan gap 2·sqrt(d−1) − μ̂(mask graph), mean over layers")
    axes[1].set_title("weighted spectral gap μ₀(|W|) − μ̂(|W|), mean over layers")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    return _save(plt, fig, out, "spectral_gap.png")


def _save(plt, fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name
