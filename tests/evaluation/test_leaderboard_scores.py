"""Open LLM Leaderboard v2 normalisation against hand-computed cases, on synthetic lm-eval result files."""

import json

import pytest

from hf_sparse_ift.evaluation import leaderboard
from hf_sparse_ift.evaluation.compare import compare
from hf_sparse_ift.evaluation.harness import score_task, summarise_scores
from hf_sparse_ift.evaluation.suites import SUITES


def test_rescale_between_the_random_baseline_and_one():
    assert leaderboard.rescale(0.6, 4) == pytest.approx(46.6667, abs=1e-4)  # the docs' GPQA example
    assert leaderboard.rescale(0.37, 10) == pytest.approx(30.0)  # (0.37 - 0.1) / 0.9
    assert leaderboard.rescale(0.25, 4) == 0.0 and leaderboard.rescale(0.1, 4) == 0.0  # at / below chance
    assert leaderboard.rescale(1.0, 19) == pytest.approx(100.0)
    assert leaderboard.rescale(0.05, 0) == pytest.approx(5.0)  # generative: no baseline


def lm_eval_results(prefix="leaderboard"):
    """What `lm_eval --tasks leaderboard` writes under "results" (only the keys the normalisation reads)."""
    return {
        f"{prefix}_mmlu_pro": {"acc,none": 0.37, "acc_stderr,none": 0.004},
        f"{prefix}_bbh": {"acc_norm,none": 0.40},
        f"{prefix}_bbh_boolean_expressions": {"acc_norm,none": 0.75},  # k = 2  -> 50
        f"{prefix}_bbh_object_counting": {"acc_norm,none": 0.05},  # k = 19 -> below 1/19 -> 0
        f"{prefix}_bbh_geometric_shapes": {"acc_norm,none": 0.20},  # k = 11 -> (0.2 - 1/11) / (10/11) = 12
        f"{prefix}_gpqa": {"acc_norm,none": 0.31},  # group value, k = 4 -> 8
        f"{prefix}_gpqa_diamond": {"acc_norm,none": 0.9},  # (subtasks are not used)
        f"{prefix}_math_hard": {"exact_match,none": 0.05},  # -> 5
        f"{prefix}_math_hard_algebra": {"exact_match,none": 0.5},
        f"{prefix}_ifeval": {
            "inst_level_strict_acc,none": 0.5,
            "prompt_level_strict_acc,none": 0.4,
            "inst_level_loose_acc,none": 0.9,
            "prompt_level_loose_acc,none": 0.9,
        },  # -> 45
        f"{prefix}_musr": {"acc_norm,none": 0.5667},
        f"{prefix}_musr_murder_mysteries": {"acc_norm,none": 0.7},  # k = 2 -> 40   (the docs' MuSR example)
        f"{prefix}_musr_object_placements": {"acc_norm,none": 0.4},  # k = 5 -> 25
        f"{prefix}_musr_team_allocation": {"acc_norm,none": 0.6},  # k = 3 -> 40
    }


EXPECTED = {"MMLU-Pro": 30.0, "BBH": (50 + 0 + 12) / 3, "GPQA": 8.0, "MATH Lvl 5": 5.0, "IFEval": 45.0, "MuSR": 35.0}


@pytest.fixture
def results_file(tmp_path):
    path = tmp_path / "results_2025.json"
    path.write_text(json.dumps({"results": lm_eval_results()}))
    return path


def test_every_benchmark_is_normalised_as_the_leaderboard_does(results_file):
    results = json.loads(results_file.read_text())["results"]
    rows = [
        {"label": s.label, "benchmark": s.benchmark, **score_task(s, results, "leaderboard-v2")}
        for s in SUITES["leaderboard-v2"].specs
    ]
    assert {r["label"]: r["score"] for r in rows} == pytest.approx(EXPECTED)
    raw = {r["label"]: r["value"] for r in rows}  # raw scores kept beside the normalised ones
    assert raw == pytest.approx(
        {"MMLU-Pro": 0.37, "BBH": 0.40, "GPQA": 0.31, "MATH Lvl 5": 0.05, "IFEval": 0.45, "MuSR": 0.5667}
    )
    bbh = next(r for r in rows if r["label"] == "BBH")
    assert {s["task"].rsplit("bbh_", 1)[1]: (s["num_choices"], round(s["normalised"], 6)) for s in bbh["subtasks"]} == {
        "boolean_expressions": (2, 50.0),
        "object_counting": (19, 0.0),
        "geometric_shapes": (11, 12.0),
    }
    avg = summarise_scores(rows, "leaderboard-v2")
    assert avg["average"] == pytest.approx(sum(EXPECTED.values()) / 6) and avg["complete"] is True
    assert avg["average_over"] == list(EXPECTED)


def test_without_gpqa_the_average_is_over_five_and_says_so(results_file):
    results = json.loads(results_file.read_text())["results"]
    del results["leaderboard_gpqa"], results["leaderboard_gpqa_diamond"]
    rows = []
    for s in SUITES["leaderboard-v2"].specs:
        if s.benchmark == "gpqa":
            rows.append(
                {
                    "label": s.label,
                    "benchmark": s.benchmark,
                    "score": None,
                    "value": None,
                    "metric": s.metric,
                    "task": s.task,
                    "missing": "GPQA not scored: gated",
                }
            )
        else:
            rows.append(
                {"label": s.label, "benchmark": s.benchmark, "task": s.task, **score_task(s, results, "leaderboard-v2")}
            )
    avg = summarise_scores(rows, "leaderboard-v2")
    five = [v for k, v in EXPECTED.items() if k != "GPQA"]
    assert avg == {
        "average": pytest.approx(sum(five) / 5),
        "complete": False,
        "average_over": ["MMLU-Pro", "BBH", "MATH Lvl 5", "IFEval", "MuSR"],
    }


def test_the_local_copies_are_scored_by_the_same_rules():
    results = lm_eval_results("builtin_leaderboard")
    rows = {s.label: score_task(s, results, "leaderboard-v2")["score"] for s in SUITES["leaderboard-v2-builtin"].specs}
    assert rows == pytest.approx(EXPECTED)


def test_unknown_subtasks_and_missing_metrics_are_errors_not_guesses():
    results = lm_eval_results()
    results["leaderboard_bbh_new_puzzle"] = {"acc_norm,none": 0.5}
    with pytest.raises(ValueError, match="unknown leaderboard_bbh subtask 'new_puzzle'"):
        leaderboard.normalise("bbh", "leaderboard_bbh", results)
    with pytest.raises(ValueError, match="no metric 'prompt_level_strict_acc,none'"):
        leaderboard.normalise(
            "ifeval", "leaderboard_ifeval", {"leaderboard_ifeval": {"inst_level_strict_acc,none": 0.5}}
        )


def _summary(suite, labels, scores, average, **extra):
    return {
        "schema": 2,
        "model": {"name": extra.pop("name", "m")},
        "suite": suite,
        "suite_id": suite,
        "scoring": extra.pop("scoring", "mean"),
        "tasks": [{"label": label, "score": v} for label, v in zip(labels, scores)],
        "average": average,
        "average_over": [label for label, v in zip(labels, scores) if v is not None],
        "complete": None not in scores,
        "partial": False,
        "limit": None,
        **extra,
    }


def test_compare_gives_each_suite_its_own_table_and_marks_partial_and_incomplete(tmp_path):
    v2 = list(EXPECTED)
    paper_labels = ["ARC", "HellaSwag", "TruthfulQA", "MMLU", "Winogrande"]
    files = {
        "paper_a": _summary("paper", paper_labels, [21.0, 27.0, 47.0, 25.0, 50.0], 34.0, name="a"),
        "v2_a": _summary("leaderboard-v2", v2, list(EXPECTED.values()), 23.9, name="a", scoring="leaderboard-v2"),
        "v2_b": _summary(
            "leaderboard-v2",
            v2,
            [30.0, 20.0, None, 5.0, 45.0, 35.0],
            27.0,
            name="b",
            scoring="leaderboard-v2",
            missing={"GPQA": "GPQA not scored: gated"},
        ),
        "paper_b": _summary(
            "paper", paper_labels, [22.0, 28.0, 47.0, 25.0, 50.0], 34.4, name="b", partial=True, limit=100
        ),
    }
    for name, s in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(s))
    text = compare([tmp_path / f"{n}.json" for n in files], paper=True)
    tables = text.split("### ")[1:]
    assert [t.splitlines()[0] for t in tables] == [
        "Suite `paper`: ARC, HellaSwag, TruthfulQA, MMLU, Winogrande",
        "Suite `leaderboard-v2`: MMLU-Pro, BBH, GPQA, MATH Lvl 5, IFEval, MuSR (normalised)",
    ]
    paper_table, v2_table = tables
    assert "| b [partial: --limit 100] | 22.0 (+1.0) |" in paper_table and "| paper: GPT-3 Small dense |" in paper_table
    assert "paper:" not in v2_table  # the paper's rows only beside the paper suite
    assert "| b | 30.0 (+0.0) | 20.0 (-0.7) | n/a | 5.0 (+0.0) | 45.0 (+0.0) | 35.0 (+0.0) | 27.0* (+3.1) |" in v2_table
    assert "* b: average over 5 of 6 (MMLU-Pro, BBH, MATH Lvl 5, IFEval, MuSR); not scored: GPQA" in v2_table
