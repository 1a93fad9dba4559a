"""A study's results: results.json, results.md (table + verdict), loss_vs_flops.png,
final_loss_vs_sparsity.png and spectral_gap.png, all computed from the runs' own files.

Spread is the sample standard deviation over seeds. A difference "exceeds the seed spread" when the two
arms' mean ± std intervals do not overlap (|Δ| > std_a + std_b); with one seed there is no spread to judge by.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

from .arms import Arm, flop_accounting, sw_name
from .config import StudyConfig

logger = logging.getLogger("hf_sparse_ift.study")


def spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "values": []}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


# ----------------------------------------------------------------------------------------------
# Reading a run
# ----------------------------------------------------------------------------------------------
def read_scalars(folder: Path, tags: tuple[str, ...]) -> dict[str, list[tuple[int, float, float]]]:
    """TensorBoard scalars under `folder`: tag -> [(step, value, wall_time)], the last write of each step kept."""
    out: dict[str, dict[int, tuple[float, float]]] = {t: {} for t in tags}
    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        return {t: [] for t in tags}
    for directory in sorted({p.parent for p in folder.rglob("events.out.tfevents*")}):
        acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
        acc.Reload()
        available = set(acc.Tags().get("scalars", []))
        for tag in tags:
            if tag in available:
                for e in acc.Scalars(tag):
                    out[tag][e.step] = (e.value, e.wall_time)
    return {t: [(s, v, w) for s, (v, w) in sorted(d.items())] for t, d in out.items()}


def _spectral_of(model) -> dict:
    from ..sparsity.spectral import mean_stats, model_spectral_stats

    return mean_stats(model_spectral_stats(model))


def spectral_endpoints(cfg, folder: Path) -> dict:
    """Mean Ramanujan / weighted spectral gap of the initial masks (rebuilt from the seeds) and of the final
    checkpoint's masks."""
    from accelerate.utils import set_seed

    from ..models.sparse_wide_gpt.modeling_sparse_wide_gpt import SparseWideGPTForCausalLM
    from ..sparsity.dst import DSTEngine
    from ..training.checkpoint import list_checkpoints

    set_seed(cfg.train.seed)
    model = SparseWideGPTForCausalLM(cfg.model_config())
    DSTEngine(model, None, cfg.dst, total_steps=cfg.steps())
    out = {"initial": _spectral_of(model)}
    checkpoints = list_checkpoints(folder)
    if checkpoints and (checkpoints[-1] / "hf").is_dir():
        final = SparseWideGPTForCausalLM.from_pretrained(checkpoints[-1] / "hf")
        out["final"] = _spectral_of(final)
        out["final_step"] = int(checkpoints[-1].name.split("-")[1])
    return out


def read_run(study: StudyConfig, arm: Arm, seed: int, accounting: dict) -> dict | None:
    folder = arm.run_dir(study, seed)
    path = folder / "train_summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    tags = ("val/loss", "dst/mean_ramanujan_gap", "dst/mean_weighted_spectral_gap")
    scalars = read_scalars(folder, tags)
    wall = {s: w for s, _, w in scalars["val/loss"]}
    t0 = wall.get(0)
    # A resumed run's summary holds only the evaluations after the resume: TensorBoard has them all.
    losses = {s: v for s, v, _ in scalars["val/loss"]}
    losses.update({int(s): v for s, v in summary["val_loss"]})
    curve = []
    for step, loss in sorted(losses.items()):
        tokens = step * accounting["tokens_per_step"]
        if t0 is not None and step in wall:
            seconds = wall[step] - t0
        else:  # no tracker: spread the run's wall time evenly over its steps
            seconds = summary["wall_seconds"] * step / max(summary["steps"], 1)
        curve.append(
            {
                "step": step,
                "tokens": tokens,
                "flops_ideal": tokens * accounting["flops_per_token"]["training_ideal"],
                "flops_executed": tokens * accounting["flops_per_token"]["training_executed"],
                "wall_seconds": seconds,
                "loss": loss,
            }
        )
    run = {
        "seed": seed,
        "folder": str(folder),
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "wall_seconds": summary["wall_seconds"],
        "tokens_per_s": summary.get("tokens_per_s"),
        "final_val_loss": losses.get(summary["steps"]),
        "final_train_loss": summary.get("final_train_loss"),
        "val_curve": curve,
    }
    if arm.kind == "sparse-wide" and study.study.spectral_gap:
        cfg = arm.pretrain_config(str(folder), seed)
        ends = spectral_endpoints(cfg, folder)
        series = {"ramanujan_gap": [], "weighted_spectral_gap": []}
        if "initial" in ends:
            for key in series:
                if key in ends["initial"]:
                    series[key].append((0, ends["initial"][key]))
        for key in series:
            series[key] += [(s, v) for s, v, _ in scalars[f"dst/mean_{key}"]]
            if "final" in ends and key in ends["final"]:
                series[key].append((ends["final_step"], ends["final"][key]))
        run["spectral"] = series
    return run


# ----------------------------------------------------------------------------------------------
# Verdict
# ----------------------------------------------------------------------------------------------
def _fmt(x, digits=4):
    return "n/a" if x is None else f"{x:.{digits}f}"


def compare(a: dict, b: dict) -> dict | None:
    """a vs b on final validation loss (lower is better)."""
    la, lb = a["final_val_loss"], b["final_val_loss"]
    if la["mean"] is None or lb["mean"] is None:
        return None
    delta = la["mean"] - lb["mean"]
    if la["std"] is None or lb["std"] is None:
        beyond = None
    else:
        beyond = abs(delta) > la["std"] + lb["std"]
    winner, loser = (a, b) if delta < 0 else (b, a)
    return {
        "a": a["name"],
        "b": b["name"],
        "delta": delta,
        "winner": winner["name"],
        "loser": loser["name"],
        "margin": abs(delta),
        "exceeds_seed_spread": beyond,
    }


def _sentence(c: dict) -> str:
    if c["exceeds_seed_spread"] is None:
        judged = "only one seed: the seed spread is unknown, so this is not evidence either way"
    elif c["exceeds_seed_spread"]:
        judged = "this exceeds the seed spread (mean ± std intervals do not overlap)"
    else:
        judged = "this is within the seed spread (mean ± std intervals overlap): no real difference shown"
    return f"**{c['winner']}** beats {c['loser']} by {c['margin']:.4f} nats of validation loss; {judged}."


def verdict(arms: list[dict]) -> dict:
    by = {a["name"]: a for a in arms}
    lines, comparisons = [], {"paper_iso_flop": [], "total_iso_flop": [], "iso_time": [], "dynamic_vs_static": []}
    sw = [a for a in arms if a["kind"] == "sparse-wide" and a["final_val_loss"]["mean"] is not None]
    dense = by.get("dense")
    if dense and dense["final_val_loss"]["mean"] is not None and sw:
        best = min(sw, key=lambda a: a["final_val_loss"]["mean"])
        c = compare(best, dense)
        comparisons["paper_iso_flop"].append(c)
        lines.append(
            "Equal sparse-layer FLOPs (the paper's iso-FLOP: block layers only; Sparse Wide's wider "
            f"embeddings, LM head and attention cost extra): best Sparse Wide arm is {best['name']}. " + _sentence(c)
        )
        for a in sw:
            if a is not best:
                comparisons["paper_iso_flop"].append(compare(a, dense))
    for s in sorted({a["sparsity"] for a in arms if a["kind"] == "dense-iso-flop"}):
        control = by.get(f"dense-iso-flop-s{round(s * 100)}")
        group = [a for a in sw if a["sparsity"] == s]
        if control is None or control["final_val_loss"]["mean"] is None or not group:
            continue
        best = min(group, key=lambda a: a["final_val_loss"]["mean"])
        c = compare(best, control)
        comparisons["total_iso_flop"].append(c)
        for a in group:
            if a is not best:
                comparisons["total_iso_flop"].append(compare(a, control))
        lines.append(
            f"Equal total ideal training FLOPs at sparsity {s:g} (LM head and attention included): "
            f"{best['name']} vs {control['name']} (d_model {control['d_model']}). " + _sentence(c)
        )
    for a in arms:
        if a["kind"] != "dense-iso-time":
            continue
        ref = by.get(a["iso_time_reference"])
        if ref is None or ref["final_val_loss"]["mean"] is None or a["final_val_loss"]["mean"] is None:
            continue
        c = compare(ref, a)
        comparisons["iso_time"].append(c)
        measured = ""
        if ref["wall_seconds"]["mean"] and a["wall_seconds"]["mean"]:
            measured = (
                f"; measured in the runs: {ref['wall_seconds']['mean']:.0f} s vs {a['wall_seconds']['mean']:.0f} s "
                "(evaluation and checkpoints included, shared machine)"
            )
        lines.append(
            f"Equal wall-clock on this hardware (masks on dense weights): {ref['name']} vs {a['name']} "
            f"({a['steps']} dense steps for {ref['steps']} Sparse Wide steps, from the calibration{measured}). "
            + _sentence(c)
        )
    for s in sorted({a["sparsity"] for a in sw}):
        static = by.get(sw_name(s, "static"))
        if static is None or static["final_val_loss"]["mean"] is None:
            continue
        for a in sw:
            if a["sparsity"] == s and a["method"] != "static":
                c = compare(a, static)
                comparisons["dynamic_vs_static"].append(c)
                lines.append(f"Dynamic vs static masks at sparsity {s:g}: " + _sentence(c))
    return {"lines": lines, "comparisons": comparisons}


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def collect(study: StudyConfig, arms: list[Arm], calibration: dict | None) -> list[dict]:
    rows = []
    for arm in arms:
        if arm.steps is None:
            continue
        acc = flop_accounting(arm.pretrain_config(str(Path(study.study.output_dir) / "tmp"), study.study.seeds[0]))
        runs = [r for seed in study.study.seeds if (r := read_run(study, arm, seed, acc)) is not None]
        row = {
            "name": arm.name,
            "kind": arm.kind,
            "sparsity": arm.sparsity,
            "method": arm.method,
            "notes": arm.notes,
            **acc,
            "runs": runs,
            "seeds_finished": [r["seed"] for r in runs],
            "final_val_loss": spread([r["final_val_loss"] for r in runs]),
            "wall_seconds": spread([r["wall_seconds"] for r in runs]),
        }
        if arm.kind == "dense-iso-time" and calibration:
            cal = calibration["arms"][arm.name]
            row["iso_time_reference"] = cal["reference_arm"]
            row["notes"] = row["notes"] + [
                f"steps from calibration: {cal['reference_arm']} {cal['sparse_wide_seconds_per_step']:.4f} s/step vs "
                f"dense {cal['dense_seconds_per_step']:.4f} s/step (x{cal['ratio']:.3f})"
            ]
        rows.append(row)
    return rows


def _sci(x: float) -> str:
    return f"{x:.3g}"


def markdown(study: StudyConfig, rows: list[dict], calibration: dict | None, data_check: dict, v: dict) -> str:
    base = study.base
    lines = ["# Does Sparse Wide pay off? Study results", ""]
    lines.append(
        f"Data: `{base.data.dataset}`"
        + (f" ({base.data.data_files})" if base.data.data_files else "")
        + f", tokenizer `{base.data.tokenizer}`, {base.data.seq_len} tokens x {base.train.global_batch_size} "
        f"sequences per step. Seeds {study.study.seeds} (train.seed = model.mask_seed = dst.seed); data order "
        + (
            "identical across arms and seeds (no shuffle buffer)."
            if base.data.shuffle_buffer == 0
            else "identical across arms, different between seeds (shuffle buffer seeded by train.seed)."
        )
    )
    epoch = data_check.get("tokens_in_one_epoch")
    lines.append(
        f"Largest arm: {data_check['tokens_needed_max_arm']:,} training tokens; one epoch of the training "
        "split: "
        + (
            f"{epoch:,} tokens ({data_check['epochs_max_arm']:.2f} epochs)."
            if epoch
            else f"more than {data_check['tokens_in_one_epoch_at_least']:,} tokens (< 1 epoch)."
        )
    )
    summaries = [Path(run["folder"]) / "train_summary.json" for r in rows for run in r["runs"]]
    start = Path(study.study.output_dir) / "study_config.yaml"
    if summaries and start.exists():
        elapsed = max(p.stat().st_mtime for p in summaries) - start.stat().st_mtime
        lines.append(
            f"Study wall time: {elapsed / 60:.1f} minutes from its start to the end of its last run "
            f"({sum(len(r['runs']) for r in rows)} runs; calibration included)."
        )
    if data_check.get("warning"):
        lines += ["", f"> **REPEATED DATA — NO CLAIM MAY REST ON THIS STUDY.** {data_check['warning']}."]
    lines += [
        "",
        "| arm | d_model / d_ff | layer sparsity | params total | params active | block-layer FLOPs/token (fwd) "
        "| train FLOPs/token ideal | train FLOPs/token executed | tokens | wall-clock s (mean) | final val loss "
        "(mean ± std, n) |",
        "|" + "---|" * 11,
    ]
    for r in rows:
        f = r["flops_per_token"]
        loss = r["final_val_loss"]
        loss_text = "not run" if loss["mean"] is None else (f"{loss['mean']:.4f} ± {_fmt(loss['std'])} (n={loss['n']})")
        wall = r["wall_seconds"]["mean"]
        lines.append(
            f"| {r['name']} | {r['d_model']} / {r['d_ff']} | {r['layer_sparsity']:.4f} | {r['params_total']:,} | "
            f"{r['params_active']:,} | {_sci(f['block_layers_forward'])} | {_sci(f['training_ideal'])} | "
            f"{_sci(f['training_executed'])} | {r['tokens']:,} | {'n/a' if wall is None else f'{wall:.0f}'} | "
            f"{loss_text} |"
        )
    lines += [
        "",
        "FLOPs per token from `iso_flop.count_flops` (the numbers `hf-sparse-ift plan` prints): block-layer = "
        "the six linears of every block, sparse ones at their active weights (what the paper keeps iso-FLOP); "
        "training = 3 x forward; *ideal* counts sparse layers at their active weights (the paper's accounting), *executed* "
        "counts them as the masked-dense matmuls a GPU or CPU runs. Wall-clock: measured on a shared machine, "
        "evaluation included.",
    ]
    notes = [f"- {r['name']}: {n}" for r in rows for n in r["notes"]]
    if notes:
        lines += ["", *notes]
    if calibration:
        lines += ["", f"Iso-time calibration ({calibration['device']}): {calibration['method']}."]
    lines += ["", "## Verdict", ""]
    lines += [f"- {line}" for line in v["lines"]] or ["- Not enough finished arms to compare."]
    lines += [
        "",
        "Spread: sample std over seeds. Plots: `loss_vs_flops.png` (validation loss against tokens, ideal "
        "training FLOPs and wall-clock), `final_loss_vs_sparsity.png`, `spectral_gap.png` (mean Ramanujan gap "
        "2·sqrt(d−1) − μ̂ and weighted spectral gap of the mask graphs, Sparse-IFT §3.1). All runs in one "
        f"TensorBoard view: `tensorboard --logdir {Path(study.study.output_dir) / 'runs'}`.",
        "",
    ]
    return "\n".join(lines)


def _mean_curve(runs: list[dict], key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    steps = sorted(set.intersection(*[{p["step"] for p in r["val_curve"]} for r in runs])) if runs else []
    xs, ys, lo, hi = [], [], [], []
    for s in steps:
        pts = [next(p for p in r["val_curve"] if p["step"] == s) for r in runs]
        xs.append(statistics.fmean(p[key] for p in pts))
        losses = [p["loss"] for p in pts]
        ys.append(statistics.fmean(losses))
        lo.append(min(losses))
        hi.append(max(losses))
    return xs, ys, lo, hi


def _style(row: dict, i: int) -> dict:
    colors = [
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
    ]
    ls = {"dense": "-", "dense-iso-flop": "--", "dense-iso-time": ":", "sparse-wide": "-"}[row["kind"]]
    return {"color": colors[i % len(colors)], "linestyle": ls, "linewidth": 2.2 if row["kind"] == "dense" else 1.5}


def plots(out: Path, rows: list[dict]) -> list[str]:
    """The study's figures (matplotlib, written as PNG into `out`); returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["runs"] and r["final_val_loss"]["mean"] is not None]
    written = [_plot_curves(plt, out, rows), _plot_final_loss(plt, out, rows)]
    spectral = [r for r in rows if any("spectral" in run for run in r["runs"])]
    if spectral:
        written.append(_plot_spectral(plt, out, spectral))
    return written


def _plot_curves(plt, out: Path, rows: list[dict]) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    for i, r in enumerate(rows):
        for ax, key, label in zip(
            axes,
            ("tokens", "flops_ideal", "wall_seconds"),
            ("training tokens", "ideal training FLOPs", "wall-clock seconds (measured)"),
        ):
            xs, ys, lo, hi = _mean_curve(r["runs"], key)
            pts = [(x, y, a, b) for x, y, a, b in zip(xs, ys, lo, hi) if x > 0]
            if not pts:
                continue
            x, y, a, b = map(list, zip(*pts))
            ax.plot(x, y, label=f"{r['name']} (n={len(r['runs'])})", **_style(r, i))
            ax.fill_between(x, a, b, alpha=0.12, color=_style(r, i)["color"])
            ax.set_xlabel(label)
            ax.set_xscale("log")
    axes[0].set_ylabel("validation loss (mean over seeds; band: min-max)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Validation loss vs tokens, ideal training FLOPs and wall-clock")
    return _save(plt, fig, out, "loss_vs_flops.png")


def _plot_final_loss(plt, out: Path, rows: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(8, 5.5))
    dense = next((r for r in rows if r["kind"] == "dense"), None)
    if dense:
        ax.axhline(dense["final_val_loss"]["mean"], color="k", linewidth=1.5, label="dense base")
        if dense["final_val_loss"]["std"]:
            m, s = dense["final_val_loss"]["mean"], dense["final_val_loss"]["std"]
            ax.axhspan(m - s, m + s, color="k", alpha=0.08)
    methods = sorted({r["method"] for r in rows if r["kind"] == "sparse-wide"})
    for _j, method in enumerate(methods):
        pts = sorted(
            (r["sparsity"], r["final_val_loss"]["mean"], r["final_val_loss"]["std"] or 0.0)
            for r in rows
            if r["kind"] == "sparse-wide" and r["method"] == method
        )
        if dense:
            pts = [(0.0, dense["final_val_loss"]["mean"], dense["final_val_loss"]["std"] or 0.0)] + pts
        x, y, e = zip(*pts)
        ax.errorbar(x, y, yerr=e, marker="o", capsize=4, label=f"Sparse Wide + {method}")
    for kind, marker in (("dense-iso-flop", "s"), ("dense-iso-time", "^")):
        pts = [
            (r["sparsity"], r["final_val_loss"]["mean"], r["final_val_loss"]["std"] or 0.0)
            for r in rows
            if r["kind"] == kind
        ]
        if pts:
            x, y, e = zip(*sorted(pts))
            ax.errorbar(
                x,
                y,
                yerr=e,
                marker=marker,
                linestyle="none",
                capsize=4,
                color="gray",
                label={
                    "dense-iso-flop": "dense widened to SW's total FLOPs",
                    "dense-iso-time": "dense, SW's wall-clock",
                }[kind],
            )
    ax.set_xlabel("sparsity s (Sparse Wide widens by sqrt(1/(1-s)); 0 = dense base)")
    ax.set_ylabel("final validation loss (mean ± std over seeds)")
    ax.legend(fontsize=8)
    ax.set_title("Final validation loss vs sparsity")
    return _save(plt, fig, out, "final_loss_vs_sparsity.png")


def _plot_spectral(plt, out: Path, spectral: list[dict]) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for i, r in enumerate(spectral):
        for ax, key in zip(axes, ("ramanujan_gap", "weighted_spectral_gap")):
            series = [dict(run["spectral"][key]) for run in r["runs"] if run.get("spectral", {}).get(key)]
            if not series:
                continue
            steps = sorted(set.intersection(*[set(s) for s in series]))
            ax.plot(
                steps,
                [statistics.fmean(s[t] for s in series) for t in steps],
                marker=".",
                label=r["name"],
                **_style(r, i),
            )
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


def write_report(study: StudyConfig, arms: list[Arm], calibration: dict | None, data_check: dict) -> dict:
    out = Path(study.study.output_dir)
    rows = collect(study, arms, calibration)
    v = verdict(rows)
    results = {
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "study": study.to_dict()["study"],
        "data": data_check,
        "calibration": calibration,
        "arms": rows,
        "verdict": v,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    (out / "results.md").write_text(markdown(study, rows, calibration, data_check, v))
    results["plots"] = plots(out, rows)
    logger.info("wrote %s", out / "results.md")
    return results


__all__ = ["compare", "read_scalars", "spread", "verdict", "write_report"]
