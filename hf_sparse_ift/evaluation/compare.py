"""Markdown tables of evaluation summaries. One table per suite and task set, never one column that averages
different task sets; the paper's published rows sit only beside rows of the ``paper`` suite; a ``--limit`` run is
marked partial wherever it appears; an average over fewer benchmarks than the suite has is marked as such."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputNotFoundError, OutputExistsError, UsageError
from .suites import PAPER_SUITE, PAPER_TABLE15


def _upgrade(s: dict) -> dict:
    """Summaries written before the schema had a version: model as a string, values and average in 0-1."""
    if s.get("schema", 1) >= 2:
        return s
    model = s["model"] if isinstance(s["model"], dict) else {"name": str(s["model"]), "path": str(s["model"])}
    rows = [{**r, "score": 100 * r["value"]} for r in s["tasks"]]
    return {
        **s,
        "schema": 2,
        "model": model,
        "tasks": rows,
        "suite_id": s.get("suite", "?"),
        "scoring": "mean",
        "average": 100 * s["average"],
        "average_over": [r["label"] for r in rows],
        "complete": True,
        "missing": {},
        "partial": s.get("limit") is not None,
    }


def load_summary(path: str | Path) -> dict:
    path = Path(path)
    file = path / "summary.json" if path.is_dir() else path
    if not file.is_file():
        raise InputNotFoundError(f"{path}: no summary.json there (expected the file `evaluate` writes, or its folder)")
    try:
        summary = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{file} is not JSON ({err}); expected a summary.json written by `evaluate`") from None
    if not isinstance(summary, dict) or "tasks" not in summary or "model" not in summary:
        raise UsageError(f"{file} is not a summary.json written by `hf-sparse-ift evaluate` (no 'model' and 'tasks')")
    return _upgrade(summary)


def check_output(output: str | Path, summaries: list[str | Path], overwrite: bool = False) -> None:
    """`output` may receive the tables: not one of the summaries read (it would be replaced by markdown), not a
    folder, and not an existing file unless `overwrite`."""
    out = Path(output)
    inputs = {(Path(p) / "summary.json" if Path(p).is_dir() else Path(p)).resolve() for p in summaries}
    if out.resolve() in inputs:
        raise UsageError(f"--output {output} is one of the summaries compared: writing the tables would destroy it")
    if out.is_dir():
        raise UsageError(f"--output {output} is a folder; name the markdown file to write, e.g. {out / 'compare.md'}")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"--output {output} already exists; pass --overwrite to replace it")


def row_name(s: dict) -> str:
    if s.get("name"):
        name = s["name"]
    else:
        model = s["model"]
        name = model.get("name") or model.get("path") or "?"
        details = [f"step {model['step']}"] if model.get("step") is not None else []
        if s.get("dtype", "auto") != "auto":  # the fp32 and bf16 runs of one model are different rows
            details.append(s.get("model_dtype") or s["dtype"])
        if details:
            name += f" ({', '.join(details)})"
    if s.get("partial"):
        name += f" [partial: --limit {s['limit']:g}]"
    return name


def group_key(s: dict) -> tuple:
    return s.get("suite_id", s.get("suite")), tuple(r["label"] for r in s["tasks"])


def _cell(value: float | None, base: float | None, first: bool, mark: str = "") -> str:
    if value is None:
        return "n/a"
    if first or base is None:
        return f"{value:.1f}{mark}"
    return f"{value:.1f}{mark} ({value - base:+.1f})"


def results_table(summaries: list[dict], paper: bool = False) -> str:
    """One table for summaries of the same suite and tasks (scores in percent; leaderboard-v2: normalised), with
    deltas against the first row."""
    if not summaries:
        raise UsageError("no summaries to tabulate")
    keys = {group_key(s) for s in summaries}
    if len(keys) > 1:
        raise UsageError(
            f"these summaries are of different suites or task sets ({sorted(k[0] for k in keys)}); "
            "compare() puts each in its own table"
        )
    labels = [r["label"] for r in summaries[0]["tasks"]]
    lines = ["| model | " + " | ".join(labels) + " | Average |", "|" + "---|" * (len(labels) + 2)]
    base = {r["label"]: r.get("score") for r in summaries[0]["tasks"]}
    base_avg = summaries[0].get("average")
    notes = []
    for i, s in enumerate(summaries):
        scores = {r["label"]: r.get("score") for r in s["tasks"]}
        cells = [_cell(scores[label], base[label], i == 0) for label in labels]
        mark = ""
        if not s.get("complete", True):
            mark = "*" * (len([n for n in notes if n.startswith("*")]) + 1)
            notes.append(
                f"{mark} {row_name(s)}: average over {len(s['average_over'])} of {len(labels)} "
                f"({', '.join(s['average_over'])}); not scored: "
                + "; ".join(f"{k} ({v.split(':')[0]})" for k, v in s.get("missing", {}).items())
            )
        cells.append(_cell(s.get("average"), base_avg, i == 0, mark))
        lines.append(f"| {row_name(s)} | " + " | ".join(cells) + " |")
    if paper and summaries[0].get("suite_id") == PAPER_SUITE:
        for row in PAPER_TABLE15:
            lines.append(
                f"| {row['model']} | "
                + " | ".join(f"{row[label]:.1f}" if label in row else "–" for label in labels + ["Average"])
                + " |"
            )
    if any(s.get("partial") for s in summaries):
        notes.append("partial: scored on the first --limit examples of each task, not comparable with full runs")
    if summaries[0].get("scoring") == "leaderboard-v2":
        notes.append(
            "Open LLM Leaderboard v2 normalised scores (0 = random guessing, 100 = all correct); raw "
            "lm-eval scores are in summary.json and results.md"
        )
    return "\n".join(lines) + "\n" + "".join(f"\n{n}" for n in notes) + ("\n" if notes else "")


def raw_table(summary: dict) -> str:
    """Raw lm-eval scores beside the normalised ones (leaderboard-v2), per benchmark and subtask."""
    lines = ["| benchmark | task | metric | raw | normalised | rule |", "|---|---|---|---|---|---|"]
    for r in summary["tasks"]:
        if r.get("missing"):
            lines.append(f"| {r['label']} | {r['task']} | {r['metric']} | n/a | n/a | not scored |")
            continue
        lines.append(
            f"| {r['label']} | {r['task']} | {r['metric']} | {r['value']:.4f} | {r['score']:.2f} | "
            f"{r.get('rule', '')} |"
        )
        for sub in r.get("subtasks", []):
            lines.append(
                f"| | {sub['task']} | k = {sub['num_choices']} | {sub['raw']:.4f} | {sub['normalised']:.2f} | |"
            )
    return "\n".join(lines) + "\n"


def compare(paths: list[str | Path], paper: bool = False, names: list[str] | None = None) -> str:
    """Tables of several `summary.json` files: one per suite and task set, in the order given; the first row of
    each is the baseline for deltas."""
    if names is not None and len(names) != len(paths):
        raise UsageError(
            f"--names {','.join(names)!r} gives {len(names)} name(s) for {len(paths)} summaries: give one per "
            "summary, in the same order, or leave --names out"
        )
    if names is not None and any(not name.strip() for name in names):
        raise UsageError(f"--names {','.join(names)!r} holds an empty name: give one non-empty name per summary")
    summaries = []
    for i, p in enumerate(paths):
        s = load_summary(p)
        if names:
            s["name"] = names[i]
        summaries.append(s)
    if not summaries:
        raise UsageError("compare needs at least one summary.json")
    groups: dict[tuple, list[dict]] = {}
    for s in summaries:
        groups.setdefault(group_key(s), []).append(s)
    parts = []
    for (suite_id, labels), group in groups.items():
        title = f"### Suite `{suite_id}`: {', '.join(labels)}"
        if group[0].get("scoring") == "leaderboard-v2":
            title += " (normalised)"
        parts.append(title + "\n\n" + results_table(group, paper=paper))
    if paper and PAPER_SUITE not in {k[0] for k in groups}:
        parts.append(
            "(--paper: the paper's published rows are zero-shot ARC, HellaSwag, TruthfulQA, MMLU and "
            "Winogrande; they are shown only beside summaries of the `paper` suite, and none was given)\n"
        )
    return "\n".join(parts)
