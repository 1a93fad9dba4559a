"""Evaluation, comparison, perplexity and model cards on a checkpoint made by the pretraining command."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import BLOCKER, overrides
from huggingface_hub import ModelCard

from hf_sparse_ift.cli import main
from hf_sparse_ift.evaluation.compare import compare
from hf_sparse_ift.evaluation.harness import evaluate
from hf_sparse_ift.evaluation.perplexity import perplexity
from hf_sparse_ift.evaluation.suites import builtin_tasks_dir
from hf_sparse_ift.training.config import load_pretrain_config
from hf_sparse_ift.training.loop import pretrain


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = pretrain(load_pretrain_config("pretrain-tiny", overrides(out, 6, 6)))
    return out / "checkpoint-6" / "hf", summary


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    summary = evaluate(str(trained[0]), suite="builtin", batch_size=4, device="cpu", limit=12, output_dir=root)
    return summary, Path(summary["output_dir"])


def test_evaluate_writes_lm_eval_json_summary_and_table(evaluated, trained):
    summary, out = evaluated
    run = trained[0].parent.parent.name  # train.output_dir's last component
    assert out.parent.name == f"{run}-checkpoint-6" and out.name == "builtin-limit12"  # <run>-checkpoint-<N>/<suite>
    assert summary["model"]["run"] == run and summary["model"]["step"] == 6
    assert [r["task"] for r in summary["tasks"]] == ["sparse_ift_docstring_mc", "sparse_ift_arithmetic_gen"]
    assert [r["metric"] for r in summary["tasks"]] == ["acc_norm,none", "exact_match,strip"]
    for r in summary["tasks"]:
        assert 0.0 <= r["value"] <= 1.0 and (12 * r["value"]).is_integer()  # 12 examples scored
    assert summary["average"] == pytest.approx(100 * sum(r["value"] for r in summary["tasks"]) / 2)
    assert summary["partial"] is True and summary["limit"] == 12 and summary["complete"] is True
    raw = json.loads((out / "lm_eval_sparse_ift_docstring_mc.json").read_text())
    assert raw["results"]["sparse_ift_docstring_mc"]["acc_norm,none"] == summary["tasks"][0]["value"]
    table = (out / "results.md").read_text()
    assert "| DocstringMC | ArithmeticGen | Average |" in table


def run_lm_eval_cli(checkpoint, out, env):
    cmd = [
        str(Path(sys.executable).parent / "lm_eval"),
        "--model",
        "hf",
        "--model_args",
        f"pretrained={checkpoint},trust_remote_code=True",
        "--tasks",
        "sparse_ift_docstring_mc",
        "--include_path",
        str(builtin_tasks_dir()),
        "--device",
        "cpu",
        "--batch_size",
        "4",
        "--limit",
        "12",
        "--output_path",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(out.rglob("results_*.json")).read_text())
    return result["results"]["sparse_ift_docstring_mc"]["acc_norm,none"]


@pytest.mark.parametrize("without_package", [False, True])
def test_real_lm_eval_cli_scores_our_checkpoint(trained, evaluated, tmp_path, without_package):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    if without_package:
        site = tmp_path / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
        env["PYTHONPATH"] = str(site)
    score = run_lm_eval_cli(trained[0], tmp_path / "out", env)
    assert score == evaluated[0]["tasks"][0]["value"]  # same harness, same examples, same model


def test_compare_puts_models_side_by_side_with_deltas_but_the_paper_only_beside_its_suite(evaluated, tmp_path):
    summary, out = evaluated
    better = json.loads(json.dumps(summary))
    better["tasks"][0]["score"] += 5.0
    better["average"] += 2.5
    (tmp_path / "b.json").write_text(json.dumps(better))
    table = compare([out, tmp_path / "b.json"], paper=True, names=["dense", "sw75"])
    lines = table.strip().splitlines()
    assert lines[0] == "### Suite `builtin`: DocstringMC, ArithmeticGen"
    assert lines[2] == "| model | DocstringMC | ArithmeticGen | Average |"
    assert lines[4].startswith("| dense [partial: --limit 12] | ")
    assert lines[5].startswith("| sw75 [partial: --limit 12] | ") and "(+5.0)" in lines[5] and "(+2.5)" in lines[5]
    assert "| paper: " not in table  # the paper's zero-shot five never sit beside another task set
    assert "shown only beside summaries of the `paper` suite" in table
    assert main(["compare", str(out), str(tmp_path / "b.json"), "--output", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.md").read_text().count(" (step 6) [partial: --limit 12] |") == 2


def test_perplexity_matches_the_training_validation_loss(trained):
    checkpoint, summary = trained
    result = perplexity(str(checkpoint), batch_size=4, max_batches=2, seq_len=32)
    assert result["loss"] == pytest.approx(summary["val_loss"][-1][1], rel=1e-5)
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-6)


def test_card_renders_and_validates_with_huggingface_hub(trained, evaluated, tmp_path):
    import shutil

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(trained[0], checkpoint)
    _, out = evaluated
    assert main(["card", str(checkpoint), "--results", str(out / "summary.json"), "--repo-id", "me/tiny-sw75"]) == 0
    card = ModelCard.load(checkpoint / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"sparse", "sparse-ift", "dynamic-sparse-training", "set"} <= set(data["tags"])
    results = {r.dataset_name: r.metric_value for r in card.data.eval_results}
    assert results == {
        "sparse_ift_docstring_mc": pytest.approx(100 * evaluated[0]["tasks"][0]["value"], abs=0.01),
        "sparse_ift_arithmetic_gen": pytest.approx(100 * evaluated[0]["tasks"][1]["value"], abs=0.01),
    }
    assert all(r.metric_name.endswith("(partial: --limit 12)") for r in card.data.eval_results)
    assert data["model-index"][0]["name"] == "me/tiny-sw75"
    text = card.text
    assert "| d_model | 32 | 64 |" in text and "| d_ff | 128 | 256 |" in text  # FAST overrides, s = 0.75
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-sw75", trust_remote_code=True)' in text
    assert "| dynamic sparse training | set," in text
    assert "### `builtin` suite, partial: first 12 examples per task" in text
    # the training export is saved compressed, and the card says how its sparse layers are stored
    assert "compressed `bitmask-values-v1` layout" in text and "`hf-sparse-ift decompress`" in text


def test_card_is_named_after_the_training_run_not_the_folder(trained, tmp_path):
    import shutil

    checkpoint = tmp_path / "checkpoint-6" / "hf"
    shutil.copytree(trained[0], checkpoint)
    assert main(["card", str(checkpoint)]) == 0
    card = ModelCard.load(checkpoint / "README.md")
    run = trained[0].parent.parent.name
    assert card.data.to_dict()["model_name"] == run and card.text.lstrip().startswith(f"# {run}\n")
