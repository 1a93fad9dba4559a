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

import helpers
import pytest
import torch
import yaml

from hf_sparse_ift.data.config import DataConfig
from hf_sparse_ift.data.pipeline import load_documents, resolve_data_source
from hf_sparse_ift.training.config import load_pretrain_config
from hf_sparse_ift.training.loop import pretrain

FAST = [*helpers.FAST, "train.log_interval=1", "data.prefetch_batches=0"]  # every step logged, no reader thread


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


# 13. the Pile's format: .jsonl.zst files, as shards and as a local copy of the Hub dataset --------------
def pile_documents(n: int, tag: str = "doc") -> list[dict]:
    return [
        {"text": text, "meta": {"pile_set_name": ["Pile-CC", "Github"][i % 2]}}
        for i, text in enumerate(documents(n, tag))
    ]


def write_zst(path: Path, docs: list[dict]) -> str:
    import zstandard

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps(d) + "\n" for d in docs).encode()))
    return str(path)


def test_the_piles_jsonl_zst_trains_and_evaluates(tmp_path, capsys):
    from hf_sparse_ift.cli import main

    train = write_zst(tmp_path / "pile" / "00.jsonl.zst", pile_documents(400))
    validation = write_zst(tmp_path / "pile" / "val.jsonl.zst", pile_documents(60, "held-out"))
    out = tmp_path / "run"
    summary = pretrain(config(out, 2, f"data.data_files={{train: {train}, validation: {validation}}}"))
    assert summary["dataset"] == "json" and summary["validation"] == "split 'validation'"
    resolved = records(out)["run"]["resolved"]["data"]
    assert resolved["data_files"] == {"train": [train], "validation": [validation]}
    assert len(summary["val_loss"]) == 2  # read at step 0 and 2
    capsys.readouterr()
    model = out / "checkpoint-2" / "hf"
    assert main(["perplexity", "--model", str(model), "--data-files", validation, "--batch-size", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "json" and result["data_files"] == {"validation": [validation]}
    assert result["validation"] == "split 'validation'" and result["tokens"] > 0 and result["loss"] > 0


def test_a_local_copy_of_the_pile_streams_through_the_recipes_path(tmp_path):
    """The GPT-3 Small configs stream a Hub dataset of .jsonl.zst shards (train/NN.jsonl.zst, val.jsonl.zst): a
    local folder laid out like it is read by the same `load_dataset(name, split=..., streaming=True)` call, with the
    recipe's shuffle buffer and context, each rank streaming its own shards."""
    from hf_sparse_ift.data.pipeline import BadTextError, PackedStream, load_tokenizer

    pile = tmp_path / "pile-uncopyrighted"
    train_docs = pile_documents(300) + pile_documents(300, "more")
    write_zst(pile / "train" / "00.jsonl.zst", train_docs[:300])
    write_zst(pile / "train" / "01.jsonl.zst", train_docs[300:])
    write_zst(pile / "val.jsonl.zst", pile_documents(40, "held-out"))
    recipes = ("pretrain-gpt3-small-dense", "pretrain-gpt3-small-sw50-set", "pretrain-gpt3-small-sw75-set")
    assert len({str(load_pretrain_config(name).data) for name in recipes}) == 1  # one data path for all three
    cfg = load_pretrain_config("pretrain-gpt3-small-sw75-set", [f"data.dataset={pile}", "data.tokenizer=builtin"])
    assert cfg.data.dataset != "monology/pile-uncopyrighted" and cfg.data.shuffle_buffer == 10000
    source = resolve_data_source(cfg.data)
    # datasets takes the splits from the train/ folder alone (val.jsonl.zst needs a dataset card's `configs` or
    # data.data_files), so validation is held out of the training split, and the records say so
    assert source.dataset == str(pile) and source.data_files is None and source.holdout_every == 100
    texts = [d["text"] for d in train_docs]
    assert [d["text"] for d in load_documents(source, "validation")] == texts[99::100]
    assert [d["text"] for d in load_documents(source, "train")] == [t for i, t in enumerate(texts) if i % 100 != 99]
    tokenizer = load_tokenizer("builtin")
    shards = [PackedStream(source, tokenizer, "train", rank, 2, seed=0, endless=False) for rank in (0, 1)]
    sequences = [[tuple(s.tolist()) for s in shard] for shard in shards]
    assert all(len(seqs) > 0 and all(len(s) == 2048 for s in seqs) for seqs in sequences)
    assert not set(sequences[0]) & set(sequences[1])
    train_docs[310]["text"] = None  # a bad document is named by its shard of the folder
    write_zst(pile / "train" / "01.jsonl.zst", train_docs[300:])
    with pytest.raises(BadTextError, match=r"train/01\.jsonl\.zst, row 11: column 'text' holds None"):
        resolve_data_source(cfg.data)


# 14. bad text: named (file, column, row) or, with data.bad_text=skip, left out and counted -----------------------
def test_bad_text_past_the_checked_documents_is_named_when_reached(tmp_path):
    from hf_sparse_ift.data.pipeline import CHECKED_DOCUMENTS, BadTextError, PackedStream, load_tokenizer

    docs = [{"text": d} for d in documents(CHECKED_DOCUMENTS + 200)]
    docs[CHECKED_DOCUMENTS + 99]["text"] = None  # row 1100: after the documents checked before training
    path = tmp_path / "late.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    source = resolve_data_source(DataConfig(data_files=str(path), validation_split=None, seq_len=32))
    with pytest.raises(BadTextError, match=rf"late\.jsonl, row {CHECKED_DOCUMENTS + 100}: column 'text' holds None"):
        list(PackedStream(source, load_tokenizer("builtin"), "train", endless=False))


def test_skipped_bad_text_is_counted_in_the_records(tmp_path):
    texts = documents(400)
    bad = {0: None, 1: 7, 2: None, 199: None}  # rows 1-3 are trained on first; row 200 is held out (every 100th)
    path = tmp_path / "some-bad.jsonl"
    path.write_text("".join(json.dumps({"text": bad.get(i, t)}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "run"
    summary = pretrain(config(out, 2, f"data.data_files={path}", "data.bad_text=skip"))
    assert summary["skipped_documents"] == {"train": 3, "validation": 1}
    assert records(out)["run"]["resolved"]["data"]["bad_text"] == "skip"
    assert json.loads((out / "train_summary.json").read_text())["skipped_documents"] == {"train": 3, "validation": 1}


# 15. results of different models never mix ---------------------------------------------------------------------
def test_identity_follows_the_tensors_not_the_files(tmp_path):
    from helpers import tiny_config

    from hf_sparse_ift import SparseWideGPTForCausalLM
    from hf_sparse_ift.hub.identity import tensors_sha256

    torch.manual_seed(0)
    model = SparseWideGPTForCausalLM(tiny_config())
    model.save_pretrained(tmp_path / "compressed")
    model.save_pretrained(tmp_path / "plain", sparse_format="plain")
    model.save_pretrained(tmp_path / "sharded", sparse_format="plain", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    digests = {name: tensors_sha256(tmp_path / name) for name in ("compressed", "plain", "sharded")}
    assert len(set(digests.values())) == 1, digests
    mask_name = next(name for name, _ in model.named_buffers() if name.endswith("weight_mask"))
    weight, mask = model.get_parameter(mask_name.removesuffix("_mask")), model.get_buffer(mask_name)
    with torch.no_grad():
        weight[tuple(mask.nonzero()[0])] += 1e-3  # one active weight changed
    model.save_pretrained(tmp_path / "changed")
    assert tensors_sha256(tmp_path / "changed") != digests["plain"]


def test_card_accepts_results_of_a_lossless_decompress(tmp_path, capsys):
    from helpers import tiny_config

    from hf_sparse_ift import SparseWideGPTForCausalLM
    from hf_sparse_ift.cli import main
    from hf_sparse_ift.hub.identity import local_identity

    SparseWideGPTForCausalLM(tiny_config()).save_pretrained(tmp_path / "compressed")
    summary = tmp_path / "summary.json"
    summary.write_text(
        json.dumps({"schema": 2, "model": local_identity(tmp_path / "compressed"), "suite": "builtin", "tasks": []})
    )
    assert main(["decompress", str(tmp_path / "compressed"), str(tmp_path / "plain")]) == 0
    assert main(["card", str(tmp_path / "plain"), "--results", str(summary)]) == 0
    assert "wrote" in capsys.readouterr().out


def test_compare_labels_runs_of_one_model_in_different_dtypes_differently(tmp_path):
    from hf_sparse_ift.evaluation.compare import compare

    model = {"source": "local", "name": "tiny-sw75-set", "step": 6, "tensors_sha256": "a" * 64}
    paths = []
    for dtype in ("float32", "bfloat16"):
        row = {"task": "t", "label": "T", "metric": "acc,none", "value": 0.5, "score": 50.0}
        summary = {"schema": 2, "model": model, "suite": "builtin", "suite_id": "builtin", "tasks": [row]}
        paths.append(tmp_path / f"{dtype}.json")
        paths[-1].write_text(json.dumps({**summary, "dtype": dtype, "model_dtype": dtype}))
    table = compare(paths)
    assert "| tiny-sw75-set (step 6, float32) |" in table and "| tiny-sw75-set (step 6, bfloat16) |" in table


# 16. Ctrl-C: one line saying where the work stopped and the exact command that continues it; exit code 130 --------
def interrupted(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_in_pretrain_names_the_last_checkpoint_and_the_resume_command(tmp_path, monkeypatch, capsys):
    import shlex

    import hf_sparse_ift.training.loop as loop
    from hf_sparse_ift.cli import main

    out = tmp_path / "run"
    argv = ["pretrain", *FAST, f"train.output_dir={out}", "train.max_steps=2", "train.checkpoint_interval=2"]
    with monkeypatch.context() as patch:
        patch.setattr(loop, "pretrain", interrupted)
        assert main(argv) == 130
    assert capsys.readouterr().err == (
        f"hf-sparse-ift pretrain: interrupted: no checkpoint in {out} yet, so nothing to resume; start again "
        f"with: hf-sparse-ift {shlex.join(argv)}\n"
    )
    assert main(argv) == 0
    capsys.readouterr()
    longer = [*argv, "train.max_steps=4"]
    with monkeypatch.context() as patch:
        patch.setattr(loop, "pretrain", interrupted)
        assert main(longer) == 130
    resume = f"hf-sparse-ift {shlex.join([*longer, '--resume'])}"
    assert capsys.readouterr().err == (
        f"hf-sparse-ift pretrain: interrupted: the last checkpoint is {out / 'checkpoint-2'}; continue from it "
        f"with: {resume}\n"
    )
    assert main(shlex.split(resume)[1:]) == 0  # the printed command continues the run
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 4


def test_ctrl_c_stops_a_real_pretrain_with_one_line_and_no_traceback(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    argv = [*FAST, f"train.output_dir={out}", "train.max_steps=10000", "train.checkpoint_interval=1"]

    def as_started_from_a_terminal():
        # An ignored or blocked SIGINT survives exec, and Python then leaves Ctrl-C ignored: a process that native
        # code in this pytest worker left that way would run on. A shell gives its commands the default.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])

    process = subprocess.Popen(
        [sys.executable, "-m", "hf_sparse_ift.cli", "pretrain", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_started_from_a_terminal,
    )
    try:
        deadline = time.time() + 240
        # any checkpoint: on a fast machine checkpoint-1 is already rotated away (keep_checkpoints) between two looks,
        # and the run then blocks writing to the stderr pipe nobody reads until the deadline
        while not any(out.glob("checkpoint-*")) and time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
        status = Path(f"/proc/{process.pid}/status")
        signal_state = [line for line in status.read_text().splitlines() if line.startswith("Sig")]
        process.send_signal(signal.SIGINT)
        try:
            _, err = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # say where it was, not only that it timed out
            process.kill()
            log = process.communicate()[1]
            pytest.fail(
                f"pretrain still ran 120 s after Ctrl-C; {signal_state}; log:\n{log[:3000]}\n...\n{log[-2000:]}"
            )
    finally:
        process.kill()
    assert process.returncode == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"hf-sparse-ift pretrain: interrupted: the last checkpoint is {out}/checkpoint-"), last
    assert last.endswith("train.checkpoint_interval=1 --resume"), last


def test_a_ctrl_c_that_lands_in_a_finalizer_still_stops_training_and_a_second_stops_at_once():
    import signal
    import time

    from hf_sparse_ift.training.loop import stop_at_step_boundary

    class Finalized:
        def __del__(self):  # Python drops a KeyboardInterrupt raised here ("Exception ignored in ...")
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # what a terminal-started process has
    try:
        with stop_at_step_boundary() as stop_requested:
            assert not stop_requested()
            Finalized()
            assert stop_requested()  # remembered: the loop raises KeyboardInterrupt after the step
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(2)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_in_a_study_names_the_runs_kept_and_the_resume_command(tmp_path, monkeypatch, capsys):
    import hf_sparse_ift.study.runner as runner
    from hf_sparse_ift.cli import main

    out = tmp_path / "study"
    (out / "runs" / "dense" / "seed-0").mkdir(parents=True)
    (out / "runs" / "dense" / "seed-0" / "train_summary.json").write_text("{}")
    checkpoint = out / "runs" / "sw-s75-set" / "seed-0" / "checkpoint-20"
    checkpoint.mkdir(parents=True)
    (checkpoint / "manifest.json").write_text(json.dumps({"files": {}}))
    monkeypatch.setattr(runner, "run_study", interrupted)
    argv = ["study", "--config", "study-cpu-small", "--output-dir", str(out)]
    assert main(argv) == 130
    assert capsys.readouterr().err == (
        f"hf-sparse-ift study: interrupted: 1 run(s) finished in {out / 'runs'}; {checkpoint.parent} resumes from "
        f"checkpoint-20; continue with: hf-sparse-ift study --config study-cpu-small --output-dir {out} --resume\n"
    )


def test_a_model_folder_without_tokenizer_is_scored_with_tokenizer(tmp_path, monkeypatch, capsys):
    from helpers import tiny_config
    from lm_eval.models import huggingface as lm_eval_hf

    from hf_sparse_ift import SparseWideGPTForCausalLM
    from hf_sparse_ift.cli import main

    bare = tmp_path / "bare"  # save_pretrained of a model alone: no tokenizer
    SparseWideGPTForCausalLM(tiny_config(vocab_size=4096, n_positions=64)).save_pretrained(bare)
    argv = ["perplexity", "--model", str(bare), "--tokenizer", "builtin", "--batch-size", "2", "--max-batches", "1"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 2 * 64

    class Loaded(Exception):
        pass

    given = {}

    def load(self, **kwargs):  # stands in for lm-eval's model loading: what evaluate hands it is the point
        given.update(kwargs)
        raise Loaded

    monkeypatch.setattr(lm_eval_hf.HFLM, "__init__", load)
    with pytest.raises(Loaded):
        main(
            [
                "evaluate",
                "--model",
                str(bare),
                "--tokenizer",
                "builtin",
                "--suite",
                "builtin",
                "--output-dir",
                str(tmp_path),
            ]
        )
    assert given["pretrained"] == str(bare.resolve()) and len(given["tokenizer"]) == 4096
