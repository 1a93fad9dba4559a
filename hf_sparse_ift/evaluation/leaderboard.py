"""Open LLM Leaderboard v2 scores from lm-eval's raw results.

lm-eval reports raw accuracies; the leaderboard shows *normalised* scores (lm-eval itself does not normalise,
see https://huggingface.co/spaces/open-llm-leaderboard/open_llm_leaderboard/discussions/1011). The rules, from
the leaderboard's documentation:

* [N] "Scores Normalization", https://huggingface.co/docs/leaderboards/open_llm_leaderboard/normalization
  (source: github.com/huggingface/leaderboards, docs/source/en/open_llm_leaderboard/normalization.md):
  a multiple-choice score is rescaled between its random baseline ``1/k`` (k choices) and 1, scores below the
  baseline count as 0, and the result is in percent: ``max(0, (raw - 1/k) / (1 - 1/k)) * 100``. Tasks with
  subtasks (BBH, MuSR) are normalised per subtask and the normalised subtask scores averaged (unweighted).
  Generative tasks (MATH, IFEval) have lower bound 0, i.e. ``raw * 100``.
* [A] "About", https://huggingface.co/docs/leaderboards/open_llm_leaderboard/about ("Task Evaluations and
  Parameters", source docs/source/en/open_llm_leaderboard/about.md): metric and ``num_choices`` per task —
  MMLU-Pro ``acc`` with 10 choices; GPQA ``acc_norm`` with 4; BBH ``acc_norm`` with the 24 subtask counts below
  (object counting: 19, "should be 18 but we added a '0' choice"); MuSR ``acc_norm``, murder mysteries 2, object
  placement 5, team allocation 3; MATH level 5 ``exact_match``, num_choices 0; IFEval strict accuracy at prompt
  and instruction level (``prompt_level_strict_acc`` and ``inst_level_strict_acc``), num_choices 0.
* [C] the leaderboard's normalisation notebook linked from [N]: GPQA and MATH use the lm-eval group's value
  (``leaderboard_gpqa`` acc_norm, ``leaderboard_math_hard`` exact_match: means over all their questions), and the
  IFEval score is the mean of the instruction-level and prompt-level strict accuracies. The leaderboard's
  average is the mean of the six normalised scores.
"""

from __future__ import annotations

from ..errors import UsageError

# [A] BBH subtasks and their number of choices.
BBH_CHOICES = {
    "sports_understanding": 2,
    "tracking_shuffled_objects_three_objects": 3,
    "navigate": 2,
    "snarks": 2,
    "date_understanding": 6,
    "reasoning_about_colored_objects": 18,
    "object_counting": 19,
    "logical_deduction_seven_objects": 7,
    "geometric_shapes": 11,
    "web_of_lies": 2,
    "movie_recommendation": 6,
    "logical_deduction_five_objects": 5,
    "salient_translation_error_detection": 6,
    "disambiguation_qa": 3,
    "temporal_sequences": 4,
    "hyperbaton": 2,
    "logical_deduction_three_objects": 3,
    "causal_judgement": 2,
    "formal_fallacies": 2,
    "tracking_shuffled_objects_seven_objects": 7,
    "ruin_names": 6,
    "penguins_in_a_table": 5,
    "boolean_expressions": 2,
    "tracking_shuffled_objects_five_objects": 5,
}
# [A], [N] MuSR subtasks (lm-eval task suffixes) and their number of choices.
MUSR_CHOICES = {"murder_mysteries": 2, "object_placements": 5, "team_allocation": 3}
GPQA_CHOICES = 4  # [A], [N]
MMLU_PRO_CHOICES = 10  # [A]

BENCHMARKS = ("mmlu_pro", "bbh", "gpqa", "math_hard", "ifeval", "musr")
BENCHMARK_LABELS = {
    "mmlu_pro": "MMLU-Pro",
    "bbh": "BBH",
    "gpqa": "GPQA",
    "math_hard": "MATH Lvl 5",
    "ifeval": "IFEval",
    "musr": "MuSR",
}


def rescale(raw: float, num_choices: int) -> float:
    """[N] ``max(0, (raw - 1/k) / (1 - 1/k)) * 100``; ``num_choices`` 0 means no random baseline (``raw * 100``)."""
    lower = 1.0 / num_choices if num_choices > 0 else 0.0
    if raw < lower:
        return 0.0
    return (raw - lower) / (1.0 - lower) * 100.0


def _metric(results: dict, task: str, key: str) -> float:
    if task not in results:
        raise UsageError(f"lm-eval results have no entry {task!r} (have: {sorted(results)})")
    if key not in results[task]:
        raise UsageError(f"lm-eval results for {task!r} have no metric {key!r} (have: {sorted(results[task])})")
    return float(results[task][key])


def _subtasks(results: dict, group: str, table: dict[str, int], metric: str) -> list[dict]:
    rows = []
    for key in sorted(results):
        if not key.startswith(group + "_") or metric not in results[key]:
            continue
        name = key[len(group) + 1 :]
        if name not in table:
            raise UsageError(f"{key}: unknown {group} subtask {name!r}; the leaderboard lists {sorted(table)}")
        raw = float(results[key][metric])
        rows.append({"task": key, "num_choices": table[name], "raw": raw, "normalised": rescale(raw, table[name])})
    if not rows:
        raise UsageError(f"lm-eval results have no {group}_<subtask> entries with {metric!r}")
    return rows


def normalise(benchmark: str, task: str, results: dict) -> dict:
    """One benchmark's leaderboard score from lm-eval's ``results`` dict (task -> metrics) of the run of ``task``
    (the lm-eval group or task name, e.g. ``leaderboard_bbh``). Returns ``raw`` (lm-eval's number, 0-1),
    ``normalised`` (0-100), the metric(s) used, the rule and, for BBH/MuSR, per-subtask rows."""
    if benchmark in ("bbh", "musr"):
        # [N] per subtask, then the unweighted mean; raw = lm-eval's group value (mean over all questions).
        table = BBH_CHOICES if benchmark == "bbh" else MUSR_CHOICES
        subtasks = _subtasks(results, task, table, "acc_norm,none")
        raw = (
            _metric(results, task, "acc_norm,none")
            if "acc_norm,none" in results.get(task, {})
            else sum(s["raw"] for s in subtasks) / len(subtasks)
        )
        return {
            "metric": "acc_norm,none",
            "raw": raw,
            "normalised": sum(s["normalised"] for s in subtasks) / len(subtasks),
            "subtasks": subtasks,
            "rule": "mean over subtasks of max(0, (acc_norm - 1/k) / (1 - 1/k)) * 100, k per subtask",
        }
    if benchmark == "gpqa":
        raw = _metric(results, task, "acc_norm,none")  # [C] the group's value over diamond, extended and main
        return {
            "metric": "acc_norm,none",
            "raw": raw,
            "normalised": rescale(raw, GPQA_CHOICES),
            "rule": f"max(0, (acc_norm - 1/{GPQA_CHOICES}) / (1 - 1/{GPQA_CHOICES})) * 100",
        }
    if benchmark == "mmlu_pro":
        raw = _metric(results, task, "acc,none")
        return {
            "metric": "acc,none",
            "raw": raw,
            "normalised": rescale(raw, MMLU_PRO_CHOICES),
            "rule": f"max(0, (acc - 1/{MMLU_PRO_CHOICES}) / (1 - 1/{MMLU_PRO_CHOICES})) * 100",
        }
    if benchmark == "math_hard":
        raw = _metric(results, task, "exact_match,none")  # [C] group value; [A] num_choices 0: not rescaled
        return {"metric": "exact_match,none", "raw": raw, "normalised": rescale(raw, 0), "rule": "exact_match * 100"}
    if benchmark == "ifeval":
        inst = _metric(results, task, "inst_level_strict_acc,none")
        prompt = _metric(results, task, "prompt_level_strict_acc,none")
        raw = (inst + prompt) / 2  # [C] mean of the two strict accuracies; [A] num_choices 0: not rescaled
        return {
            "metric": "inst_level_strict_acc,none+prompt_level_strict_acc,none",
            "raw": raw,
            "normalised": rescale(raw, 0),
            "inst_level_strict_acc": inst,
            "prompt_level_strict_acc": prompt,
            "rule": "(inst_level_strict_acc + prompt_level_strict_acc) / 2 * 100",
        }
    raise UsageError(f"unknown leaderboard-v2 benchmark {benchmark!r}; expected one of {list(BENCHMARKS)}")


def average(scores: dict[str, float | None]) -> dict:
    """[C] the mean of the six normalised scores. A missing benchmark (None) is never silently dropped: the result
    says over which benchmarks the mean was taken and whether that is all six."""
    present = {k: v for k, v in scores.items() if v is not None}
    missing = [k for k in BENCHMARKS if k not in present]
    value = sum(present.values()) / len(present) if present else None
    return {
        "average": value,
        "average_over": [k for k in BENCHMARKS if k in present],
        "missing": missing,
        "complete": not missing,
    }
