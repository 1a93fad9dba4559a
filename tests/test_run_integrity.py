"""A run uses exactly what it was given and records exactly what it used (issue: trust).

Each test here failed on 97f2aa0: data_files were ignored, fallbacks were recorded as the data asked for,
single files were validated on their own training documents, a dense run logged sparsity 1.0, a corrupt
newest checkpoint stopped --resume, two runs wrote into one folder, and --resume on a finished run rewrote
its summary.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hf_sparse_ift.training.config import DataConfig, load_pretrain_config
from hf_sparse_ift.training.data import load_documents, resolve_data_source
from hf_sparse_ift.training.loop import pretrain

FAST = [
    "model.n_layer=2",
    "model.dense_hidden_size=32",
    "model.dense_intermediate_size=128",
    "model.n_head=2",
    "data.seq_len=32",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "train.eval_batches=2",
    "train.log_interval=1",
    "train.trackers=[]",
    "train.progress_bar=false",
    "dst.update_interval=3",
    "data.prefetch_batches=0",
]


def config(out, steps=2, *extra):
    return load_pretrain_config(
        "pretrain-tiny",
        FAST
        + [
            f"train.output_dir={out}",
            f"train.max_steps={steps}",
            f"train.checkpoint_interval={steps}",
            f"train.eval_interval={steps}",
            *extra,
        ],
    )


def write_jsonl(path: Path, docs: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def documents(n: int, tag: str = "doc") -> list[str]:
    return [f"{tag} {i}: " + " ".join(f"w{(i * 31 + j) % 997}" for j in range(20 + i % 17)) for i in range(n)]


def records(out: Path) -> dict:
    return {
        "summary": json.loads((out / "train_summary.json").read_text()),
        "run": yaml.safe_load((out / "run_config.yaml").read_text()),
    }


# 1. data_files alone are the data; dataset=json without files is an error ----------------------------------
def test_data_files_alone_are_read_and_recorded(tmp_path):
    path = write_jsonl(tmp_path / "my.jsonl", documents(400))
    out = tmp_path / "run"
    summary = pretrain(config(out, 2, f"data.data_files={path}"))
    assert summary["dataset"] == "json"
    resolved = records(out)["run"]["resolved"]["data"]
    assert resolved["dataset"] == "json" and resolved["data_files"] == {"train": [path]}
    assert resolved["fallback"] is None


def test_the_loader_follows_compressed_file_names(tmp_path):
    import gzip

    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in documents(50)))
    (tmp_path / "b.txt.xz").write_bytes(b"")
    source = resolve_data_source(DataConfig(data_files=str(tmp_path / "a.jsonl.gz"), validation_split=None))
    assert source.dataset == "json" and len(list(load_documents(source, "train"))) == 50
    with pytest.raises(ValueError, match=r"a local-file loader needs data\.data_files"):
        DataConfig(dataset="json").validate()


# 2. records name what was used; --resume changes are applied and recorded, or refused -------------------
def test_offline_fallback_is_written_into_every_record(tmp_path):
    out = tmp_path / "run"
    pretrain(
        config(
            out,
            2,
            "data.dataset=no-such-user/no-such-dataset",
            "data.tokenizer=openai-community/gpt2",
            "train.trackers=[tensorboard]",
        )
    )
    got = records(out)
    resolved = got["run"]["resolved"]
    assert resolved["data"]["dataset"] == "builtin" and resolved["data"]["tokenizer"] == "builtin"
    assert "could not be reached (offline" in resolved["data"]["fallback"]
    assert any("BUILT-IN corpus" in d for d in resolved["decisions"])
    assert got["summary"]["dataset"] == "builtin" and got["summary"]["tokenizer"] == "builtin"
    export = out / "checkpoint-2" / "hf"
    exported = yaml.safe_load((export / "training_config.yaml").read_text())
    assert exported["resolved"]["data"]["dataset"] == "builtin"
    card = (export / "README.md").read_text()
    assert "no-such-user/no-such-dataset" not in card.split("---")[1]  # the card's metadata names no unused data
    from hf_sparse_ift.training.run import resolve_run  # the tracker's hparams are run.flat()

    flat = resolve_run(
        config(tmp_path / "x", 2, "data.dataset=no-such-user/no-such-dataset", "data.tokenizer=openai-community/gpt2"),
        1,
    ).flat()
    assert flat["resolved.data.dataset"] == "builtin"


def test_resume_refuses_changed_recipe_and_records_extension(tmp_path):
    out = tmp_path / "run"
    pretrain(config(out, 2))
    with pytest.raises(ValueError, match=r"optim.lr: 0.003 -> 0.0001 differ"):
        pretrain(config(out, 2, "optim.lr=1e-4"), resume=True)
    summary = pretrain(config(out, 4, "train.checkpoint_interval=4"), resume=True)
    assert summary["steps"] == 4
    assert records(out)["run"]["resolved"]["resume_changes"] == [
        "train.checkpoint_interval: 2 -> 4",
        "train.eval_interval: 2 -> 4",
        "train.max_steps: 2 -> 4",
    ]
    assert [step for step, _ in summary["val_loss"]] == [0, 2, 4]  # the history before the resume is kept


# 3. a single local file is validated on documents it never trains on ---------------------------------
def test_single_file_holds_out_a_disjoint_validation_slice(tmp_path):
    docs = documents(250)
    path = write_jsonl(tmp_path / "one.jsonl", docs)
    source = resolve_data_source(DataConfig(data_files=path, holdout_every=10))
    train = [d["text"] for d in load_documents(source, "train")]
    validation = [d["text"] for d in load_documents(source, "validation")]
    assert validation == docs[9::10] and not set(train) & set(validation)
    assert sorted(train + validation) == sorted(docs)
    out = tmp_path / "run"
    summary = pretrain(config(out, 2, f"data.data_files={path}"))
    assert "held out" in summary["validation"] and "not trained on" in summary["validation"]
    assert any("held out" in d for d in records(out)["run"]["resolved"]["decisions"])


# 5. sparsity is the fraction of zeros ------------------------------------------------------------------
@pytest.mark.parametrize("sparsity, method, expected", [(0.0, "static", 0.0), (0.75, "set", 0.75)])
def test_sparsity_means_the_fraction_of_zeros(tmp_path, sparsity, method, expected):
    out = tmp_path / "run"
    summary = pretrain(config(out, 1, f"model.sparsity={sparsity}", f"dst.method={method}"))
    assert summary["sparse_layer_sparsity"] == pytest.approx(expected, abs=2e-3)
    model = records(out)["run"]["resolved"]["model"]
    assert model["sparsity"] == sparsity
    from transformers import AutoModelForCausalLM

    from hf_sparse_ift.sparsity import parameter_counts

    counts = parameter_counts(AutoModelForCausalLM.from_pretrained(out / "checkpoint-1" / "hf"))
    assert model["model_sparsity"] == counts["inactive"] / counts["total"]  # zeros over all parameters
    assert (counts["inactive"] == 0) if sparsity == 0 else (0 < model["model_sparsity"] < sparsity)


# 9. a corrupt newest checkpoint is skipped, saying so --------------------------------------------------
def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, caplog):
    out = tmp_path / "run"
    pretrain(config(out, 4, "train.checkpoint_interval=2", "train.keep_checkpoints=3"))
    weights = out / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # half-written
    summary = pretrain(config(out, 6, "train.checkpoint_interval=2", "train.keep_checkpoints=3"), resume=True)
    assert summary["steps"] == 6
    assert "skipped checkpoint-4" in caplog.text and "model.safetensors has 100 bytes" in caplog.text


# 10. one output folder, one run ------------------------------------------------------------------------
def test_a_second_run_into_the_same_folder_is_refused_and_a_stale_lock_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
        with pytest.raises(FileExistsError, match=f"in use by another run \\(process {sleeper.pid}"):
            pretrain(config(out, 1))
        assert not list(out.glob("checkpoint-*"))
    finally:
        sleeper.kill()
        sleeper.wait()
    summary = pretrain(config(out, 1))  # the lock's process is gone: taken over
    assert summary["steps"] == 1 and not (out / ".lock").exists()


# 11. --resume on a finished run changes nothing; a raised max_steps continues it ----------------------------
def test_resume_of_a_finished_run_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(config(out, 2))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    pretrain(config(out, 2), resume=True)
    assert "already finished at step 2" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (out / "train_summary.json").unlink()  # killed after its last checkpoint, before the summary
    assert pretrain(config(out, 2), resume=True)["steps"] == 2 and (out / "train_summary.json").exists()
    assert pretrain(config(out, 3, "train.checkpoint_interval=2"), resume=True)["steps"] == 3


# 12. the exported tokenizer loads without a remote-code question ---------------------------------------
def test_exported_tokenizer_loads_without_asking(tmp_path):
    out = tmp_path / "run"
    pretrain(config(out, 1))
    code = (
        "import hf_sparse_ift, sys\nfrom transformers import AutoTokenizer\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\nprint(len(t), t.eos_token)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(out / "checkpoint-1" / "hf")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4096", "<|endoftext|>"] and "[y/N]" not in done.stdout + done.stderr


def test_loss_and_grad_norm_of_a_log_line_belong_to_the_same_step():
    from hf_sparse_ift.training.loop import DeferredScalars

    pending = DeferredScalars(torch.device("cpu"))
    assert pending.push(torch.tensor([2.5, 0.5]), step=1) is None
    assert pending.push(torch.tensor([2.0, 0.25]), step=2) == {"step": 1, "loss": 2.5, "grad_norm": 0.5}
    assert pending.flush() == {"step": 2, "loss": 2.0, "grad_norm": 0.25}
