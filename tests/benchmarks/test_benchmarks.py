"""The benchmarks' CPU smoke modes: the scripts run end to end and write well-formed results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_benchmark_rerun_refused

ROOT = Path(__file__).resolve().parents[2]


# the C allocator's environment is left out, so that block_sparse.py's --malloc auto decides as on a plain machine
ALLOCATOR_ENVIRONMENT = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD")


def run(script, tmp_path, *arguments):
    """Run a benchmark's smoke mode into `tmp_path`, then check that running it again is refused (its results stay)."""
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(tmp_path), *arguments]
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENVIRONMENT and k != "GLIBC_TUNABLES"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result] = tmp_path.glob("*.json")
    report, table = json.loads(result.read_text()), next(tmp_path.glob("*.md")).read_text()
    assert_benchmark_rerun_refused(command, tmp_path, env)
    return report, table


def test_train_throughput_smoke(tmp_path):
    report, table = run("train_throughput.py", tmp_path)
    assert [r["variant"] for r in report["results"]] == ["hf-gpt2", "dense", "sw50-paper", "sw50-w64", "sw75"]
    for r in report["results"]:
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0
    sparse = [r for r in report["results"] if r["variant"].startswith("sw")]
    assert all(r["inactive_weights_exactly_zero"] and r["mask_bytes_per_sparse_weight"] == 1.0 for r in sparse)
    assert all(r["training_flops_per_token_executed"] > r["training_flops_per_token_active"] for r in sparse)
    assert "| sw75 | 64/256 |" in table and report["command"].startswith("train_throughput.py --smoke")


def test_dst_update_cost_smoke(tmp_path):
    report, table = run("dst_update_cost.py", tmp_path)
    assert [m["method"] for m in report["methods"]] == ["set", "rigl", "srigl"]
    assert all(m["update_s"] > 0 and m["train_step_s"] > 0 for m in report["methods"])
    assert "| srigl |" in table


def test_data_loading_smoke(tmp_path):
    report, table = run("data_loading.py", tmp_path)
    assert [(r["tokenize_batch_docs"], r["prefetch_batches"]) for r in report["results"]] == [
        (1000, 0),
        (64, 0),
        (64, 32),
    ] * 2
    for r in report["results"]:
        assert r["pipeline_tokens_per_s"] > 0 and 0 < r["fraction_of_accelerator_rate"] <= 1.0
        assert r["accelerator_busy_s"] <= r["wall_s"]
    assert "| 4 KB documents, 1 in 100 a 400 KB book | prefetch 32 batches" in table


def test_block_sparse_smoke(tmp_path):
    report, table = run("block_sparse.py", tmp_path)
    parts = [(r["part"], r["variant"]) for r in report["results"]]
    # one variant per block kernel measured (native where built, and torch); the first keeps the plain name
    kernels = report["block_kernels"]
    assert kernels in (["native", "torch"], ["torch"]) and report["cpu_kind"] and report["cpu_vector_flags"] is not None
    suffixes = [""] + [f"-{k}" for k in kernels[1:]]
    linear_variants = ["masked", *(f"block-16-{f}{s}" for f in ("constant", "any") for s in suffixes), "iso-dense"]
    block_train = [f"sw75-block16{s}" for s in suffixes]
    assert parts == (
        [("linears", v) for v in linear_variants] * 4  # (attention, MLP in) x (float32, bfloat16)
        + [("train", v) for v in ["dense", *block_train, "sw75-block16-constant", "sw75-masked"]]
        + [("decode", v) for v in ["dense", "sw75-masked", "sw75-condensed", *block_train]]
    )
    for r in report["results"]:
        times = r.get("forward_backward_s") or r.get("step_s") or [r["decode_ms_per_token_median"]]
        assert min(times) > 0
    blocks = [r for r in report["results"] if r["part"] == "train" and "block" in r["variant"]]
    assert all(r["bytes_per_active_weight"] == 16.0 for r in blocks)  # fp32 weight, gradient, two Adam states
    # per block training variant: time and memory; per condensed or block decode variant: speed
    assert len(report["targets"]) == 2 * (len(block_train) + 1) + 1 + len(block_train)
    assert report["load_average_before"] is not None and set(report["load_average_parts"]) == {
        "linears",
        "train",
        "decode",
    }
    assert "| float32 | 0.75 | mlp_in | 256x64 | block-16-any |" in table and "## Batch-1 decode" in table
    # every turn times a step after another variant's and one after the same model's, with the page faults of each
    train = [r for r in report["results"] if r["part"] == "train"]
    for r in train:
        assert len(r["step_s"]) == len(r["step_after_other_model_s"]) == report["repeats"]
        assert len(r["page_faults"]) == len(r["page_faults_after_other_model"]) == report["repeats"]
        assert all(isinstance(f, int) and f >= 0 for f in r["page_faults"] + r["page_faults_after_other_model"])
    # the default is train.cpu_allocator's "auto", decided by the same function and recorded: keep-freed with glibc
    # (`run` leaves the allocator's environment out)
    assert report["malloc"]["setting"] == "auto" and report["malloc"]["applied"] == "keep-freed"
    assert report["malloc"]["mallopt"] == {"M_TRIM_THRESHOLD": 2**31 - 1, "M_MMAP_THRESHOLD": 32 * 2**20}
    assert report["malloc"]["decision"].startswith("train.cpu_allocator=auto: keep-freed")
    assert "C allocator: train.cpu_allocator=auto: keep-freed" in table


def test_block_sparse_unchanged_allocator_is_recorded(tmp_path):
    report, table = run("block_sparse.py", tmp_path, "--parts", "train", "--malloc", "unchanged")
    assert report["malloc"] == {"setting": "unchanged", "applied": "unchanged", "decision": None, "mallopt": {}}
    assert "C allocator unchanged: unchanged" in table and {r["part"] for r in report["results"]} == {"train"}


def test_gpu_block_sparse_smoke(tmp_path):
    """The GPU benchmark's harness on CPU: the Triton kernels in the interpreter, tiny shapes."""
    report, table = run("gpu_block_sparse.py", tmp_path)
    linears = [r for r in report["results"] if r["part"] == "linears"]
    assert {(r["variant"], r["product"]) for r in linears} == {
        (v, p) for v in ["triton", "torch-bsr", "masked", "iso-dense"] for p in ["forward", "grad_input", "grad_blocks"]
    }
    assert len(linears) == 3 * 4 * 3  # linears x variants x products, at one sparsity and block size
    assert all(r["seconds"] > 0 for r in linears)
    assert all(r["relative_error_vs_masked"] <= 1e-5 for r in linears if r["variant"] in ("triton", "torch-bsr"))
    train = [r for r in report["results"] if r["part"] == "train"]
    assert [(r["variant"], r["block_kernel"]) for r in train] == [
        ("dense", None),
        ("sw75-block32", "cpu"),
        ("sw75-masked", None),
    ]
    agreement = report["targets"][0]
    assert agreement["target"].startswith("every block kernel's forward, dX and dW agree") and agreement["met"]
    assert report["triton"] and report["commit"] and report["gpu"].startswith("cpu-")
    assert "| target | measured | met |" in table and "| sw75-block32 |" in table and "Smoke run" in table


def test_results_are_replaced_only_with_overwrite_and_atomically(tmp_path):
    """benchmarks/results_files.py, which every benchmark writes through."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import results_files
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    stem = "cpu-x-2threads-2026-12-04-thing"
    written = results_files.write(tmp_path, stem, {".json": "{}\n", ".md": "# one\n"}, overwrite=False)
    assert written == {".json": tmp_path / f"{stem}.json", ".md": tmp_path / f"{stem}.md"}
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    with pytest.raises(SystemExit) as refused:
        results_files.write(tmp_path, stem, {".json": "{}\n", ".md": "# two\n"}, overwrite=False)
    assert str(tmp_path / f"{stem}.json") in str(refused.value) and "--overwrite" in str(refused.value)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == before
    # one file of the pair is enough to refuse, and the message names just that one
    (tmp_path / f"{stem}.json").unlink()
    with pytest.raises(SystemExit, match=r"thing\.md already exists"):
        results_files.refuse_existing(tmp_path, stem, overwrite=False)
    results_files.write(tmp_path, stem, {".json": "[]\n", ".md": "# two\n"}, overwrite=True)
    assert (tmp_path / f"{stem}.md").read_text() == "# two\n" and (tmp_path / f"{stem}.json").read_text() == "[]\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.json", f"{stem}.md"]  # no partial files left
    assert results_files.tagged(stem, "") == stem and results_files.tagged(stem, "rerun") == f"{stem}-rerun"


def test_a_benchmark_replaces_its_results_with_overwrite(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "block_memory.py"), "--smoke", "--out", str(tmp_path)]
    assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0
    [result] = tmp_path.glob("*.json")
    result.write_text("not the results")
    proc = subprocess.run([*command, "--overwrite"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(result.read_text())["smoke"] is True
    # --tag names the files apart
    assert subprocess.run([*command, "--tag", "second"], capture_output=True, timeout=300).returncode == 0
    assert (tmp_path / f"{result.stem}-second.json").exists() and (tmp_path / f"{result.stem}-second.md").exists()
