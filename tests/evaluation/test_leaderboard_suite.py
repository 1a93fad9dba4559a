"""The leaderboard-v2 suite end to end on the local copies of its task formats (offline), the results layout and
its guards, and model cards with v2 results."""

import contextlib
import dataclasses
import io
import json
import shutil

import lm_eval
import pytest
from helpers import save_tiny, snapshot
from huggingface_hub import ModelCard

from hf_sparse_ift.cli import main
from hf_sparse_ift.evaluation import suites
from hf_sparse_ift.hub.identity import tensors_sha256

MUSR_CHOICES = {"murder_mysteries": 2, "object_placements": 5, "team_allocation": 3}  # leaderboard docs, "About"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "checkpoint-6" / "hf", seed=0)


def evaluate_cli(model, out, *extra):
    return main(
        [
            "evaluate",
            "--model",
            str(model),
            "--suite",
            "leaderboard-v2-builtin",
            "--limit",
            "2",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--output-dir",
            str(out),
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def v2_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert evaluate_cli(tiny, out) == 0
    return out / "tiny-sw75-set-checkpoint-6" / "leaderboard-v2-builtin-limit2", printed.getvalue()


def rescale(raw, k):
    return max(0.0, (raw - 1 / k) / (1 - 1 / k)) * 100


def test_v2_suite_runs_offline_and_normalises_lm_evals_raw_scores(v2_run, tiny):
    folder, printed = v2_run
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["summary.json", "results.md"]
        + [f"lm_eval_builtin_leaderboard_{b}.json" for b in ("mmlu_pro", "bbh", "gpqa", "math_hard", "ifeval", "musr")]
    )
    summary = json.loads((folder / "summary.json").read_text())
    raw = {
        b: json.loads((folder / f"lm_eval_builtin_leaderboard_{b}.json").read_text())
        for b in ("mmlu_pro", "bbh", "gpqa", "math_hard", "ifeval", "musr")
    }
    res = {b: r["results"] for b, r in raw.items()}
    # recomputed here from lm-eval's own files: k from the task configs, the rules of the leaderboard docs
    bbh = [
        rescale(v["acc_norm,none"], len(raw["bbh"]["configs"][t]["doc_to_choice"]))
        for t, v in res["bbh"].items()
        if t != "builtin_leaderboard_bbh"
    ]
    musr = [
        rescale(v["acc_norm,none"], MUSR_CHOICES[t.split("musr_")[1]])
        for t, v in res["musr"].items()
        if t != "builtin_leaderboard_musr"
    ]
    ifeval = res["ifeval"]["builtin_leaderboard_ifeval"]
    expected = {
        "MMLU-Pro": rescale(res["mmlu_pro"]["builtin_leaderboard_mmlu_pro"]["acc,none"], 10),
        "BBH": sum(bbh) / 3,
        "GPQA": rescale(res["gpqa"]["builtin_leaderboard_gpqa"]["acc_norm,none"], 4),
        "MATH Lvl 5": 100 * res["math_hard"]["builtin_leaderboard_math_hard"]["exact_match,none"],
        "IFEval": 50 * (ifeval["inst_level_strict_acc,none"] + ifeval["prompt_level_strict_acc,none"]),
        "MuSR": sum(musr) / 3,
    }
    assert len(bbh) == 3 and len(musr) == 3
    assert {r["label"]: r["score"] for r in summary["tasks"]} == pytest.approx(expected)
    assert summary["average"] == pytest.approx(sum(expected.values()) / 6) and summary["complete"] is True
    assert [r["num_fewshot"] for r in summary["tasks"]] == [5, 3, 0, 4, 0, 0]  # the leaderboard's few-shot counts
    for r in summary["tasks"]:
        assert r["rule"] and 0 <= r["value"] <= 1  # raw kept beside the normalised score
    # the model's identity and the run's settings
    model = summary["model"]
    assert model["path"] == str(tiny.resolve()) and model["run"] == "tiny-sw75-set" and model["step"] == 6
    assert model["tensors_sha256"] == tensors_sha256(tiny) and model["weight_files"] == ["model.safetensors"]
    assert (
        summary["suite"],
        summary["limit"],
        summary["partial"],
        summary["dtype"],
        summary["lm_eval_version"],
        summary["apply_chat_template"],
    ) == ("leaderboard-v2-builtin", 2, True, "auto", lm_eval.__version__, False)
    # the printed table: normalised scores, the run marked partial, then the raw ones
    assert "| model | MMLU-Pro | BBH | GPQA | MATH Lvl 5 | IFEval | MuSR | Average |" in printed
    assert f"| tiny-sw75-set (step 6) [partial: --limit 2] | {expected['MMLU-Pro']:.1f} |" in printed
    assert "Raw lm-eval scores:" in printed and (folder / "results.md").read_text().startswith("| model | MMLU-Pro")


def test_earlier_results_are_not_overwritten_without_overwrite(v2_run, tiny, capsys):
    folder, _ = v2_run
    before = snapshot(folder.parent.parent)
    assert evaluate_cli(tiny, folder.parent.parent) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "--overwrite" in err and "Traceback" not in err
    assert snapshot(folder.parent.parent) == before


def test_overwrite_replaces_the_folder_and_full_runs_go_elsewhere_than_partial_ones(tiny, tmp_path):
    old = tmp_path / "tiny-sw75-set-checkpoint-6" / "builtin-limit2"
    old.mkdir(parents=True)
    (old / "summary.json").write_text(json.dumps({"model": {"tensors_sha256": tensors_sha256(tiny)}}))  # this model's
    (old / "lm_eval_stale_task.json").write_text("{}")
    args = [
        "evaluate",
        "--model",
        str(tiny),
        "--suite",
        "builtin",
        "--limit",
        "2",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--output-dir",
        str(tmp_path),
    ]
    assert main(args) == 2 and (old / "lm_eval_stale_task.json").exists()
    assert main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in old.iterdir()) == [
        "lm_eval_sparse_ift_arithmetic_gen.json",
        "lm_eval_sparse_ift_docstring_mc.json",
        "results.md",
        "summary.json",
    ]
    assert json.loads((old / "summary.json").read_text())["suite"] == "builtin"
    assert not (tmp_path / "tiny-sw75-set-checkpoint-6" / "builtin").exists()  # a full run would go there


def test_gated_gpqa_is_reported_and_the_average_is_marked_over_five(tiny, tmp_path, monkeypatch, capsys):
    # the real leaderboard_gpqa task: its data (Idavidrein/gpqa) is gated, and unreachable offline
    local = suites.SUITES["leaderboard-v2-builtin"]
    specs = tuple(dataclasses.replace(s, task="leaderboard_gpqa") if s.benchmark == "gpqa" else s for s in local.specs)
    monkeypatch.setitem(
        suites.SUITES,
        "leaderboard-v2-builtin",
        dataclasses.replace(local, specs=specs, lm_eval_dirs=("leaderboard/gpqa",)),
    )
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tiny),
                "--suite",
                "leaderboard-v2-builtin",
                "--limit",
                "1",
                "--batch-size",
                "4",
                "--device",
                "cpu",
                "--output-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "GPQA not scored" in captured.err and "Idavidrein/gpqa" in captured.err and "gated" in captured.err
    assert "average is over the other 5 benchmarks" in captured.err
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    scores = {r["label"]: r["score"] for r in summary["tasks"]}
    assert scores["GPQA"] is None and summary["complete"] is False
    assert summary["average_over"] == ["MMLU-Pro", "BBH", "MATH Lvl 5", "IFEval", "MuSR"]
    assert summary["average"] == pytest.approx(sum(v for v in scores.values() if v is not None) / 5)
    assert "GPQA" in summary["missing"]
    assert (
        "| n/a |" in captured.out
        and "* tiny-sw75-set (step 6) [partial: --limit 1]: average over 5 of 6" in captured.out
    )


def test_card_carries_v2_results_as_model_index_and_refuses_another_checkpoints(v2_run, tiny, tmp_path, capsys):
    folder, _ = v2_run
    summary = json.loads((folder / "summary.json").read_text())
    mine = tmp_path / "mine"
    shutil.copytree(tiny, mine)
    assert main(["card", str(mine), "--results", str(folder)]) == 0
    card = ModelCard.load(mine / "README.md")
    index = card.data.to_dict()["model-index"][0]
    assert index["name"] == "tiny-sw75-set"  # the training run, not the folder
    entries = {r["dataset"]["name"]: r for r in index["results"]}
    assert sorted(entries) == [
        "BBH (3-Shot)",
        "GPQA (0-Shot)",
        "IFEval (0-Shot)",
        "MATH Lvl 5 (4-Shot)",
        "MMLU-PRO (5-Shot)",
        "MuSR (0-Shot)",
    ]
    ifeval = entries["IFEval (0-Shot)"]
    assert ifeval["metrics"][0]["type"] == "inst_level_strict_acc and prompt_level_strict_acc"
    assert ifeval["metrics"][0]["value"] == pytest.approx(summary["tasks"][4]["score"], abs=0.005)
    assert ifeval["metrics"][0]["name"] == "strict accuracy (partial: --limit 2)"
    assert ifeval["dataset"]["args"] == {"num_few_shot": 0}
    assert "Open LLM Leaderboard v2, normalised scores" in card.text

    other = save_tiny(tmp_path / "other", seed=1)  # same architecture, other weights
    readme_before = (other / "README.md").read_bytes() if (other / "README.md").exists() else None
    assert main(["card", str(other), "--results", str(folder / "summary.json")]) == 2
    err = capsys.readouterr().err
    assert "not from this checkpoint" in err and str(tiny.resolve()) in err and "--allow-other-checkpoint" in err
    assert ((other / "README.md").read_bytes() if (other / "README.md").exists() else None) == readme_before
    assert main(["card", str(other), "--results", str(folder / "summary.json"), "--allow-other-checkpoint"]) == 0
