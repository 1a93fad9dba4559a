"""Evaluation, comparison, perplexity and model cards on a checkpoint made by the pretraining command."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from test_pretrain import overrides
from test_remote_code import BLOCKER

from hf_sparse_ift.cli import main
from hf_sparse_ift.evaluation.harness import PAPER_TABLE15, builtin_tasks_dir, compare, evaluate, perplexity
from hf_sparse_ift.training.loop import pretrain
from hf_sparse_ift.training.config import load_pretrain_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = pretrain(load_pretrain_config("pretrain-tiny", overrides(out, 6, 6)))
    return out / "checkpoint-6" / "hf", summary


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return evaluate(str(trained[0]), suite="builtin", batch_size=4, device="cpu", limit=12, output_dir=out), out


def test_evaluate_writes_lm_eval_json_summary_and_table(evaluated):
    summary, out = evaluated
    assert [r["task"] for r in summary["tasks"]] == ["sparse_ift_docstring_mc", "sparse_ift_arithmetic_gen"]
    assert [r["metric"] for r in summary["tasks"]] == ["acc_norm,none", "exact_match,strip"]
    for r in summary["tasks"]:
        assert 0.0 <= r["value"] <= 1.0 and (12 * r["value"]).is_integer()  # 12 examples scored
    assert summary["average"] == pytest.approx(sum(r["value"] for r in summary["tasks"]) / 2)
    raw = json.loads((out / "lm_eval_sparse_ift_docstring_mc.json").read_text())
    assert raw["results"]["sparse_ift_docstring_mc"]["acc_norm,none"] == summary["tasks"][0]["value"]
    table = (out / "results.md").read_text()
    assert "| DocstringMC | ArithmeticGen | Average |" in table


def run_lm_eval_cli(checkpoint, out, env):
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
           f"pretrained={checkpoint},trust_remote_code=True", "--tasks", "sparse_ift_docstring_mc",
           "--include_path", str(builtin_tasks_dir()), "--device", "cpu", "--batch_size", "4", "--limit", "12",
           "--output_path", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(out.rglob("results_*.json")).read_text())
    return result["results"]["sparse_ift_docstring_mc"]["acc_norm,none"]


@pytest.mark.slow
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


def test_compare_puts_models_side_by_side_with_deltas_and_the_paper(evaluated, tmp_path):
    summary, out = evaluated
    better = json.loads(json.dumps(summary))
    better["tasks"][0]["value"] += 0.05
    better["average"] += 0.025
    (tmp_path / "b.json").write_text(json.dumps(better))
    table = compare([out, tmp_path / "b.json"], paper=True, names=["dense", "sw75"])
    lines = table.strip().splitlines()
    assert lines[0] == "| model | DocstringMC | ArithmeticGen | Average |"
    assert lines[2].startswith("| dense | ")
    assert lines[3].startswith("| sw75 | ") and "(+5.0)" in lines[3] and "(+2.5)" in lines[3]
    assert len(lines) == 4 + len(PAPER_TABLE15) and "paper: Sparse Wide 75% SET" in lines[-1]
    assert main(["compare", str(out), str(tmp_path / "b.json"), "--output", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.md").read_text().count("\n") == 4


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
    assert results == {"sparse_ift_docstring_mc": pytest.approx(evaluated[0]["tasks"][0]["value"]),
                       "sparse_ift_arithmetic_gen": pytest.approx(evaluated[0]["tasks"][1]["value"])}
    assert data["model-index"][0]["name"] == "me/tiny-sw75"
    text = card.text
    assert "| d_model | 32 | 64 |" in text and "| d_ff | 128 | 256 |" in text  # FAST overrides, s = 0.75
    assert "AutoModelForCausalLM.from_pretrained(\"me/tiny-sw75\", trust_remote_code=True)" in text
    assert "| dynamic sparse training | set," in text
