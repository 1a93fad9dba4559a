"""Evaluation with lm-eval-harness, side-by-side comparison, perplexity and model cards.

Suites (each a list of (lm-eval task, few-shot, metric)):
* ``openllm``: the Open LLM Leaderboard v1 — ARC-Challenge 25-shot acc_norm, HellaSwag 10-shot acc_norm,
  TruthfulQA mc2 0-shot, MMLU 5-shot acc (unweighted mean over its 57 subjects, as the leaderboard), Winogrande
  5-shot acc, GSM8K 5-shot exact match; average = mean of the six.
* ``paper``: the Sparse-IFT paper's Table 15 — the first five of those, zero-shot; average of the five.
* ``builtin``: two small tasks shipped in hf_sparse_ift/builtin/tasks (multiple choice and generate-until),
  which run offline; tests use them to exercise the same code path.
* or any comma-separated lm-eval task names / local task YAMLs (``--include-path`` for folders of YAMLs).

Models load through lm-eval's `HFLM` (``trust_remote_code=True``), exactly as ``lm_eval --model hf`` would.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from ..resources import builtin_dir


@dataclass(frozen=True)
class TaskSpec:
    task: str
    num_fewshot: int | None
    metric: str          # lm-eval result key, e.g. "acc_norm,none"
    label: str           # column name in tables


SUITES: dict[str, list[TaskSpec]] = {
    "openllm": [
        TaskSpec("arc_challenge", 25, "acc_norm,none", "ARC"),
        TaskSpec("hellaswag", 10, "acc_norm,none", "HellaSwag"),
        TaskSpec("truthfulqa_mc2", 0, "acc,none", "TruthfulQA"),
        TaskSpec("mmlu", 5, "acc,none", "MMLU"),
        TaskSpec("winogrande", 5, "acc,none", "Winogrande"),
        TaskSpec("gsm8k", 5, "exact_match,strict-match", "GSM8K"),
    ],
    "builtin": [
        TaskSpec("sparse_ift_docstring_mc", 0, "acc_norm,none", "DocstringMC"),
        TaskSpec("sparse_ift_arithmetic_gen", 0, "exact_match,strip", "ArithmeticGen"),
    ],
}

# The paper's Table 15: the leaderboard's first five tasks, zero-shot.
SUITES["paper"] = [replace(spec, num_fewshot=0) for spec in SUITES["openllm"][:5]]

# Sparse-IFT paper, Table 15 (GPT-3 Small on the Pile, SET), in percent.
PAPER_TABLE15 = [
    {"model": "paper: GPT-3 Small dense", "ARC": 20.8, "HellaSwag": 27.2, "TruthfulQA": 47.0, "MMLU": 24.6,
     "Winogrande": 49.4, "Average": 33.8},
    {"model": "paper: Sparse Wide 50% SET", "ARC": 20.6, "HellaSwag": 27.4, "TruthfulQA": 47.4, "MMLU": 25.6,
     "Winogrande": 49.6, "Average": 34.1},
    {"model": "paper: Sparse Wide 75% SET", "ARC": 22.1, "HellaSwag": 27.8, "TruthfulQA": 47.5, "MMLU": 25.6,
     "Winogrande": 50.4, "Average": 34.7},
]


def builtin_tasks_dir() -> Path:
    return builtin_dir() / "tasks"


def resolve_tasks(suite_or_tasks: str, num_fewshot: int | None = None) -> list[TaskSpec]:
    """A suite name, or comma-separated task names (metric: acc_norm, acc, exact_match — the first reported)."""
    if suite_or_tasks in SUITES:
        specs = SUITES[suite_or_tasks]
        return [TaskSpec(s.task, num_fewshot if num_fewshot is not None else s.num_fewshot, s.metric, s.label)
                for s in specs]
    names = [t.strip() for t in suite_or_tasks.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--suite {suite_or_tasks!r} is invalid: expected one of {sorted(SUITES)} or task names")
    return [TaskSpec(n, num_fewshot, "", n) for n in names]


def _pick_metric(task_results: dict, wanted: str) -> tuple[str, float]:
    if wanted and wanted in task_results:
        return wanted, float(task_results[wanted])
    for key in ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,none"):
        if key in task_results:
            return key, float(task_results[key])
    numeric = [(k, v) for k, v in task_results.items() if "stderr" not in k and isinstance(v, (int, float))]
    if not numeric:
        raise ValueError(f"no numeric metric in lm-eval results {sorted(task_results)}")
    return numeric[0][0], float(numeric[0][1])


def _score(spec: TaskSpec, results: dict) -> tuple[str, float]:
    if spec.task == "mmlu":  # leaderboard v1: unweighted mean over the 57 subjects
        subjects = [v for k, v in results.items() if k.startswith("mmlu_") and spec.metric in v
                    and k not in ("mmlu_humanities", "mmlu_stem", "mmlu_social_sciences", "mmlu_other")]
        if subjects:
            return spec.metric, sum(float(v[spec.metric]) for v in subjects) / len(subjects)
    return _pick_metric(results[spec.task], spec.metric)


def evaluate(model: str, suite: str = "paper", batch_size: str | int = "auto", dtype: str = "auto",
             device: str | None = None, limit: float | None = None, output_dir: str | Path | None = None,
             include_path: str | None = None, num_fewshot: int | None = None, max_length: int | None = None) -> dict:
    """Score `model` (checkpoint folder or Hub name) on a suite; returns and writes the summary.

    Writes ``<output_dir>/lm_eval_<task>.json`` (lm-eval's own results), ``summary.json`` and ``results.md``.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import hf_sparse_ift  # noqa: F401  (registers the model; remote code covers other environments)

    specs = resolve_tasks(suite, num_fewshot)
    paths = [str(builtin_tasks_dir())] + ([include_path] if include_path else [])
    task_manager = TaskManager(include_path=paths)
    import torch

    kwargs = dict(pretrained=str(model), trust_remote_code=True, dtype=dtype, batch_size=batch_size,
                  device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if max_length:
        kwargs["max_length"] = max_length
    lm = HFLM(**kwargs)
    out = Path(output_dir) if output_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    rows, raw = [], {}
    for spec in specs:
        result = lm_eval.simple_evaluate(model=lm, tasks=[spec.task], num_fewshot=spec.num_fewshot, limit=limit,
                                         task_manager=task_manager, log_samples=False, bootstrap_iters=0)
        results = result["results"]
        metric, value = _score(spec, results)
        rows.append({"task": spec.task, "label": spec.label, "num_fewshot": spec.num_fewshot,
                     "metric": metric, "value": value})
        raw[spec.task] = results
        if out:
            (out / f"lm_eval_{spec.task}.json").write_text(json.dumps(
                {k: result[k] for k in ("results", "configs", "versions", "n-shot") if k in result},
                indent=1, default=str))
    summary = {"model": str(model), "suite": suite, "limit": limit, "tasks": rows,
               "average": sum(r["value"] for r in rows) / len(rows)}
    if out:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        (out / "results.md").write_text(results_table([summary]))
    return summary


def results_table(summaries: list[dict], paper: bool = False) -> str:
    """Markdown table, one row per model (values in percent), with deltas against the first row."""
    labels = []
    for s in summaries:
        for r in s["tasks"]:
            if r["label"] not in labels:
                labels.append(r["label"])
    header = "| model | " + " | ".join(labels) + " | Average |"
    lines = [header, "|" + "---|" * (len(labels) + 2)]
    base = {r["label"]: 100 * r["value"] for r in summaries[0]["tasks"]} if summaries else {}
    base_avg = 100 * summaries[0]["average"] if summaries else 0.0
    for i, s in enumerate(summaries):
        values = {r["label"]: 100 * r["value"] for r in s["tasks"]}
        cells = []
        for label in labels + ["Average"]:
            v = 100 * s["average"] if label == "Average" else values.get(label)
            b = base_avg if label == "Average" else base.get(label)
            if v is None:
                cells.append("–")
            elif i == 0 or b is None:
                cells.append(f"{v:.1f}")
            else:
                cells.append(f"{v:.1f} ({v - b:+.1f})")
        lines.append(f"| {s.get('name') or s['model']} | " + " | ".join(cells) + " |")
    if paper:
        for row in PAPER_TABLE15:
            lines.append(f"| {row['model']} | " + " | ".join(
                f"{row[label]:.1f}" if label in row else "–" for label in labels + ["Average"]) + " |")
    return "\n".join(lines) + "\n"


def compare(paths: list[str | Path], paper: bool = False, names: list[str] | None = None) -> str:
    """Side-by-side table of several `summary.json` files (the first is the baseline for deltas)."""
    summaries = []
    for i, p in enumerate(paths):
        p = Path(p)
        s = json.loads((p / "summary.json" if p.is_dir() else p).read_text())
        if names and i < len(names):
            s["name"] = names[i]
        summaries.append(s)
    if not summaries:
        raise ValueError("compare needs at least one summary.json")
    return results_table(summaries, paper=paper)


def perplexity(model: str, dataset: str = "builtin", tokenizer: str | None = None, split: str = "validation",
               max_batches: int = 50, batch_size: int = 8, seq_len: int | None = None,
               data_files: str | None = None, text_column: str = "text") -> dict:
    """Mean next-token loss and perplexity of `model` on a held-out text stream (packed like training)."""
    import torch
    from transformers import AutoModelForCausalLM

    import hf_sparse_ift  # noqa: F401

    from ..training.data import load_tokenizer, resolve_data_source, validation_batches
    from ..training.config import DataConfig

    lm = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=True).eval()
    tok = load_tokenizer(tokenizer or str(model))  # checkpoints exported by the trainer carry their tokenizer
    seq_len = seq_len or lm.config.max_position_embeddings
    cfg = DataConfig(dataset=dataset, data_files=data_files, text_column=text_column, validation_split=split,
                     seq_len=seq_len, tokenizer=tokenizer or "builtin")
    batches = validation_batches(resolve_data_source(cfg), tok, batch_size, max_batches, rank=0, world_size=1)
    if not batches:
        raise ValueError(f"split {split!r} of {dataset!r} is shorter than one batch of {batch_size}x{seq_len} tokens")
    with torch.no_grad():
        losses = [lm(input_ids=b, labels=b).loss.item() for b in batches]
    loss = sum(losses) / len(losses)
    return {"model": str(model), "dataset": dataset, "split": split, "tokens": len(batches) * batch_size * seq_len,
            "loss": loss, "perplexity": math.exp(loss)}


# ----------------------------------------------------------------------------------------------
# command line: evaluate, compare, perplexity, card
# ----------------------------------------------------------------------------------------------
def add_parsers(sub) -> None:
    p = sub.add_parser("evaluate", help="score a checkpoint or Hub model with lm-eval-harness")
    p.add_argument("--model", required=True, help="checkpoint folder (…/checkpoint-N/hf) or Hub name")
    p.add_argument("--suite", default="paper",
                   help=f"one of {sorted(SUITES)} or comma-separated lm-eval task names (default: paper)")
    p.add_argument("--include-path", help="folder of extra lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=int, help="override the suite's few-shot counts")
    p.add_argument("--batch-size", default="auto", help="integer or auto (default)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available, else cpu)")
    p.add_argument("--limit", type=float, help="examples per task (or a fraction), for quick checks")
    p.add_argument("--output-dir", default="eval_results", help="where lm-eval JSON, summary.json and results.md go")

    c = sub.add_parser("compare", help="side-by-side table of evaluation summaries, with deltas")
    c.add_argument("summaries", nargs="+", help="summary.json files or the folders holding them; first = baseline")
    c.add_argument("--names", help="comma-separated row names")
    c.add_argument("--paper", action="store_true", help="add the paper's Table 15 rows as a reference")
    c.add_argument("--output", help="also write the table to this markdown file")

    x = sub.add_parser("perplexity", help="validation loss / perplexity on held-out text")
    x.add_argument("--model", required=True)
    x.add_argument("--dataset", default="builtin")
    x.add_argument("--data-files")
    x.add_argument("--text-column", default="text")
    x.add_argument("--split", default="validation")
    x.add_argument("--tokenizer")
    x.add_argument("--batch-size", type=int, default=8)
    x.add_argument("--max-batches", type=int, default=50)
    x.add_argument("--seq-len", type=int)

    k = sub.add_parser("card", help="render (and optionally push) the Hub model card of a checkpoint")
    k.add_argument("checkpoint", help="a save_pretrained folder, e.g. outputs/…/checkpoint-600/hf")
    k.add_argument("--results", help="summary.json from `evaluate` (adds the results table and model-index)")
    k.add_argument("--repo-id", help="Hub repo id shown in the card (default: the folder name)")
    k.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder with its card to this Hub repo")
    k.add_argument("--private", action="store_true")


def cmd_evaluate(args) -> int:
    summary = evaluate(args.model, args.suite, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                       limit=args.limit, output_dir=args.output_dir, include_path=args.include_path,
                       num_fewshot=args.num_fewshot)
    print(results_table([summary]), end="")
    print(f"(written to {args.output_dir}/summary.json, results.md and lm_eval_<task>.json)")
    return 0


def cmd_compare(args) -> int:
    table = compare(args.summaries, paper=args.paper, names=args.names.split(",") if args.names else None)
    print(table, end="")
    if args.output:
        Path(args.output).write_text(table)
    return 0


def cmd_perplexity(args) -> int:
    print(json.dumps(perplexity(args.model, args.dataset, args.tokenizer, args.split, args.max_batches,
                                args.batch_size, args.seq_len, args.data_files, args.text_column)))
    return 0


def cmd_card(args) -> int:
    from .model_card import write_model_card

    results = None
    if args.results:
        summary = json.loads(Path(args.results).read_text())
        results = [{"task": r["task"], "metric": r["metric"].split(",")[0], "value": r["value"],
                    "num_fewshot": r.get("num_fewshot")} for r in summary["tasks"]]
    path = write_model_card(args.checkpoint, repo_id=args.repo_id or args.push_to_hub, results=results)
    print(f"wrote {path}")
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.push_to_hub, private=args.private, exist_ok=True)
        api.upload_folder(folder_path=args.checkpoint, repo_id=args.push_to_hub,
                          commit_message="Upload Sparse Wide GPT checkpoint (hf-sparse-ift)")
        print(f"pushed {args.checkpoint} to https://huggingface.co/{args.push_to_hub}")
    return 0


HANDLERS = {"evaluate": cmd_evaluate, "compare": cmd_compare, "perplexity": cmd_perplexity, "card": cmd_card}
