"""What each evaluation suite runs: lm-eval task, few-shot count, metric, column label and how it is scored.

* ``openllm``: the Open LLM Leaderboard v1 — ARC-Challenge 25-shot acc_norm, HellaSwag 10-shot acc_norm,
  TruthfulQA mc2 0-shot, MMLU 5-shot acc (unweighted mean over its 57 subjects, as the leaderboard), Winogrande
  5-shot acc, GSM8K 5-shot exact match; average = mean of the six.
* ``paper``: the Sparse-IFT paper's Table 15 — the first five of those, zero-shot; average of the five.
* ``leaderboard-v2``: the Open LLM Leaderboard v2, lm-eval's ``leaderboard`` group (MMLU-Pro 5-shot, BBH 3-shot,
  GPQA 0-shot, MATH level 5 4-shot, IFEval 0-shot, MuSR 0-shot; the few-shot counts are the task YAMLs'), no chat
  template (base models), scored the leaderboard's way (see leaderboard.py).
* ``leaderboard-v2-builtin``: the same six formats as small offline copies shipped in
  hf_sparse_ift/builtin/tasks/leaderboard_v2, scored by the same code.
* ``builtin``: two small tasks shipped in hf_sparse_ift/builtin/tasks (multiple choice and generate-until).
* or any comma-separated lm-eval task names / local task YAMLs (``--include-path`` for folders of YAMLs).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import UsageError
from ..resources import builtin_dir


@dataclass(frozen=True)
class TaskSpec:
    task: str
    num_fewshot: int | None
    metric: str  # lm-eval result key, e.g. "acc_norm,none"
    label: str  # column name in tables
    benchmark: str = ""  # leaderboard-v2 benchmark key ("bbh", "gpqa", ...): selects the normalisation rule


@dataclass(frozen=True)
class Suite:
    name: str
    specs: tuple[TaskSpec, ...]
    scoring: str = "mean"  # "mean" of the raw metrics, or "leaderboard-v2" normalisation
    lm_eval_dirs: tuple[str, ...] | None = None  # lm-eval task folders to index (None: all of lm-eval's tasks)
    optional: frozenset[str] = field(default_factory=frozenset)  # benchmarks that may be missing (gated data)
    fixed_fewshot: bool = False  # the suite's few-shot counts are part of its definition

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.specs]


_OPENLLM = (
    TaskSpec("arc_challenge", 25, "acc_norm,none", "ARC"),
    TaskSpec("hellaswag", 10, "acc_norm,none", "HellaSwag"),
    TaskSpec("truthfulqa_mc2", 0, "acc,none", "TruthfulQA"),
    TaskSpec("mmlu", 5, "acc,none", "MMLU"),
    TaskSpec("winogrande", 5, "acc,none", "Winogrande"),
    TaskSpec("gsm8k", 5, "exact_match,strict-match", "GSM8K"),
)


def _leaderboard_v2(prefix: str) -> tuple[TaskSpec, ...]:
    # Few-shot counts and metrics: lm_eval/tasks/leaderboard/*/ YAMLs and the leaderboard's "About" page
    # (https://huggingface.co/docs/leaderboards/open_llm_leaderboard/about, "Task Evaluations and Parameters").
    return (
        TaskSpec(f"{prefix}_mmlu_pro", 5, "acc,none", "MMLU-Pro", "mmlu_pro"),
        TaskSpec(f"{prefix}_bbh", 3, "acc_norm,none", "BBH", "bbh"),
        TaskSpec(f"{prefix}_gpqa", 0, "acc_norm,none", "GPQA", "gpqa"),
        TaskSpec(f"{prefix}_math_hard", 4, "exact_match,none", "MATH Lvl 5", "math_hard"),
        TaskSpec(f"{prefix}_ifeval", 0, "inst_level_strict_acc,none+prompt_level_strict_acc,none", "IFEval", "ifeval"),
        TaskSpec(f"{prefix}_musr", 0, "acc_norm,none", "MuSR", "musr"),
    )


SUITES: dict[str, Suite] = {
    "openllm": Suite("openllm", _OPENLLM),
    "paper": Suite("paper", tuple(replace(s, num_fewshot=0) for s in _OPENLLM[:5])),
    "leaderboard-v2": Suite(
        "leaderboard-v2",
        _leaderboard_v2("leaderboard"),
        scoring="leaderboard-v2",
        lm_eval_dirs=("leaderboard",),
        optional=frozenset({"gpqa"}),
        fixed_fewshot=True,
    ),
    "leaderboard-v2-builtin": Suite(
        "leaderboard-v2-builtin",
        _leaderboard_v2("builtin_leaderboard"),
        scoring="leaderboard-v2",
        lm_eval_dirs=(),
        optional=frozenset({"gpqa"}),
        fixed_fewshot=True,
    ),
    "builtin": Suite(
        "builtin",
        (
            TaskSpec("sparse_ift_docstring_mc", 0, "acc_norm,none", "DocstringMC"),
            TaskSpec("sparse_ift_arithmetic_gen", 0, "exact_match,strip", "ArithmeticGen"),
        ),
        lm_eval_dirs=(),
    ),
}

# Sparse-IFT paper, Table 15 (GPT-3 Small on the Pile, SET), in percent: zero-shot, the `paper` suite's tasks.
PAPER_TABLE15 = [
    {
        "model": "paper: GPT-3 Small dense",
        "ARC": 20.8,
        "HellaSwag": 27.2,
        "TruthfulQA": 47.0,
        "MMLU": 24.6,
        "Winogrande": 49.4,
        "Average": 33.8,
    },
    {
        "model": "paper: Sparse Wide 50% SET",
        "ARC": 20.6,
        "HellaSwag": 27.4,
        "TruthfulQA": 47.4,
        "MMLU": 25.6,
        "Winogrande": 49.6,
        "Average": 34.1,
    },
    {
        "model": "paper: Sparse Wide 75% SET",
        "ARC": 22.1,
        "HellaSwag": 27.8,
        "TruthfulQA": 47.5,
        "MMLU": 25.6,
        "Winogrande": 50.4,
        "Average": 34.7,
    },
]
PAPER_SUITE = "paper"


def builtin_tasks_dir() -> Path:
    return builtin_dir() / "tasks"


def task_names(suite_or_tasks: str) -> list[str]:
    return [t.strip() for t in suite_or_tasks.split(",") if t.strip()]


def resolve_suite(suite_or_tasks: str, num_fewshot: int | None = None) -> Suite:
    """A suite by name, or an ad-hoc suite of comma-separated lm-eval task names (metric: the first of acc_norm,
    acc, exact_match reported). Task names are checked against lm-eval's index by the harness."""
    if suite_or_tasks in SUITES:
        suite = SUITES[suite_or_tasks]
        if num_fewshot is not None:
            if suite.fixed_fewshot:
                raise UsageError(
                    f"--num-fewshot {num_fewshot} cannot be used with --suite {suite.name}: its few-shot "
                    f"counts are part of the leaderboard's definition "
                    f"({', '.join(f'{s.label} {s.num_fewshot}' for s in suite.specs)})"
                )
            suite = replace(suite, specs=tuple(replace(s, num_fewshot=num_fewshot) for s in suite.specs))
        return suite
    names = task_names(suite_or_tasks)
    suites = [name for name in names if name in SUITES]
    if suites:
        tasks = ",".join(spec.task for spec in SUITES[suites[0]].specs)
        raise UsageError(
            f"--suite {suite_or_tasks!r}: {suites[0]!r} is a suite, and a suite cannot be combined with other names; "
            f"pass --suite {suites[0]} alone, or its tasks by name ({tasks}) with the others"
        )
    if not names:
        raise UsageError(
            f"--suite {suite_or_tasks!r} is empty: expected one of {sorted(SUITES)} or comma-separated "
            "lm-eval task names"
        )
    return Suite("+".join(names), tuple(TaskSpec(n, num_fewshot, "", n) for n in names))
